"""bench/train.py's config specs: a named image config, or NAME:LAYERS at another depth."""

import pytest

from bench.train import config_of
from models import config_for


def test_a_name_is_its_config_and_a_depth_changes_only_the_layers():
    assert config_of("image-cpu") == config_for("image", "image-cpu")
    deep = config_of("image-cpu:12")
    assert deep.n_layers == 12 and deep == config_for("image", "image-cpu", n_layers=12)


@pytest.mark.parametrize("bad, message", [("image-cpu:0", "positive whole number"), ("image-cpu:x", "positive"),
                                          ("image-cpu:", "positive"), ("nope:3", "unknown config")])
def test_bad_specs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        config_of(bad)
