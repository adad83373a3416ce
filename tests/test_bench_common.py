"""bench.common: the helpers the benchmark scripts share."""

import pytest

from bench.common import spread


def test_spread_picks_evenly_with_both_ends():
    assert list(spread(10, 3)) == [0, 4, 9]
    assert list(spread(276, 2)) == [0, 275] and list(spread(5, 1)) == [0]
    assert list(spread(7, 7)) == list(range(7))


def test_spread_is_distinct_up_to_n_and_repeats_beyond():
    for n in range(1, 40):
        for count in range(1, n + 1):
            picked = spread(n, count)
            assert len(set(picked.tolist())) == count and picked[0] == 0
            assert count == 1 or picked[-1] == n - 1
    assert list(spread(2, 5)) == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("n, count", [(0, 3), (5, 0), (-1, 1)])
def test_spread_refuses_empty_ranges(n, count):
    with pytest.raises(ValueError, match="spread needs"):
        spread(n, count)
