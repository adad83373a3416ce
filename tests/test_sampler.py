"""KV-cached sampling: decode/forward exactness per pattern and step, seeds, controls, cancellation, media helpers.

The compiled step's own tests (build, safety, threads, rows per pass) are in tests/test_compiled_step.py.
"""

import numpy as np
import pytest
import torch
from helpers import needs_compiler, small_model

from models import SparseTransformer, codec_card, config_for
from sampling import Decoder, SamplingOptions, choose_tokens, complete_image, generate, generate_audio
from sampling.compiled_step import CompiledStep
from sampling.kv_cache import make_caches
from sampling.step import TorchStep, weight_shards

PATTERNS = [dict(pattern="strided"), dict(pattern="fixed", summary=4),
            dict(pattern="fixed", summary=4, distinct_summaries=True), dict(pattern="all"),
            dict(layer_patterns=("local", "fixed"), summary=4), dict(pattern="strided", lag_inputs=40)]


STEPS = {"compiled": dict(step="compiled"), "torch-1-shard": dict(step="pytorch", shards=1),
         "torch-2-shards": dict(step="pytorch", shards=2)}
STEP_IDS = [pytest.param(name, marks=needs_compiler) if name == "compiled" else name for name in STEPS]


def sample(model, prompt, length, seeds, options=None, step="auto") -> torch.Tensor:
    """generate() to the end: tokens [B, length]."""
    return list(generate(model, prompt, length, seeds, options, step=step))[-1].tokens


@pytest.mark.parametrize("step", STEP_IDS)
@pytest.mark.parametrize("prompt_len", [0, 32, 37])
@pytest.mark.parametrize("kw", PATTERNS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_step_by_step_logits_equal_the_full_forward_at_every_position(kw, prompt_len, step):
    """With float32 caches the steps compute what the full forward does (bfloat16 caches: the next test)."""
    model = small_model(**kw)
    tokens = torch.randint(0, 256, (3, 150), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    decoder = Decoder(model, 3, 150, cache_dtype=torch.float32, **STEPS[step])
    assert isinstance(decoder.step, CompiledStep) == (step == "compiled")
    if prompt_len:
        decoder.prefill(tokens[:, :prompt_len])
    for pos in range(prompt_len, 150):
        logits = decoder.step(tokens, pos)
        torch.testing.assert_close(logits, full[:, pos], rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("step", STEP_IDS)
@pytest.mark.parametrize("kw", PATTERNS[:2] + PATTERNS[4:], ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_bfloat16_caches_the_default_stay_close_to_the_full_forward(kw, step):
    """A float32 model decodes with bfloat16 caches by default: every key and value rounded once (relative error
    at most 2^-9), so the log-probabilities stay within a few hundredths of the full forward's."""
    model = small_model(**kw)
    tokens = torch.randint(0, 256, (3, 150), generator=torch.Generator().manual_seed(1))
    full = model(tokens).log_softmax(-1)
    decoder = Decoder(model, 3, 150, **STEPS[step])
    assert all(c.dtype == torch.bfloat16 for c in decoder.caches)
    decoder.prefill(tokens[:, :37])
    worst = max((decoder.step(tokens, pos).log_softmax(-1) - full[:, pos]).abs().max().item()
                for pos in range(37, 150))
    assert 0 < worst < 0.05


def test_cache_dtype_is_checked_and_sets_what_the_caches_hold():
    model = small_model()
    assert Decoder(model, 1, 40).cache_bytes * 2 == Decoder(model, 1, 40, cache_dtype=torch.float32).cache_bytes
    assert Decoder(model.to(torch.float64), 1, 40).caches[0].dtype == torch.float64  # not narrowed
    for bad in (torch.int8, "bfloat16", 16):
        with pytest.raises(ValueError, match="cache_dtype must be one of"):
            Decoder(small_model(), 1, 40, cache_dtype=bad)


def test_weight_shards_split_the_step_and_must_divide_the_layers():
    model = small_model()  # d_model 64, vocab 256
    assert [weight_shards(model.cfg, t) for t in (0, 1, 2, 3, 6, 64, 100)] == [1, 1, 2, 2, 4, 64, 64]
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    one, four = Decoder(model, 1, 40, shards=1), Decoder(model, 1, 40, shards=4)
    assert isinstance(four.step, TorchStep) and four.step.blocks[0][2].shape == (4, 64, 48)  # qkv: [S, in, 3d / S]
    for pos in range(40):
        torch.testing.assert_close(four.step(tokens, pos), one.step(tokens, pos), rtol=1e-5, atol=1e-5)
    for bad in (0, 3, True, 2.0):
        with pytest.raises(ValueError, match="shards"):
            Decoder(model, 1, 40, shards=bad)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("options", [dict(), dict(top_k=40), dict(top_p=0.9)], ids=["plain", "top-k", "top-p"])
@needs_compiler
def test_both_steps_sample_the_same_tokens(temperature, options):
    """The compiled step's C sampling and the PyTorch step + choose_tokens give the same samples."""
    model = small_model(pattern="strided")
    prompt = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(6))
    opts = SamplingOptions(temperature, **options)
    runs = [sample(model, prompt, 150, [1, 2, 3], opts, step=step) for step in ("compiled", "pytorch")]
    assert torch.equal(runs[0], runs[1])


def test_the_step_is_chosen_once_from_what_can_run():
    model = small_model()
    with pytest.raises(ValueError, match="step must be one of"):
        Decoder(model, 1, 40, step="fast")
    assert isinstance(Decoder(small_model().to(torch.float64), 1, 40).step, TorchStep)  # auto: the PyTorch step
    assert isinstance(Decoder(small_model(vocab=250), 1, 40).step, TorchStep)
    assert isinstance(Decoder(model, 1, 40, shards=2).step, TorchStep)
    with pytest.raises(ValueError, match="step='pytorch'"):
        Decoder(model, 1, 40, shards=2, step="compiled")
    with pytest.raises(ValueError, match="options must be a SamplingOptions"):
        next(generate(model, torch.zeros(1, 0, dtype=torch.long), 10, [0], {"temperature": 1.0}))


def test_caches_keep_only_what_the_pattern_can_still_read():
    cfg = config_for("image", "image-cpu")
    caches = make_caches(cfg, 1)
    per_position = 2 * cfg.d_model * 4  # k and v, fp32
    local, strided = caches[0], caches[1]
    assert local.nbytes == (cfg.stride + 1) * per_position  # the last l + 1 positions
    assert strided.nbytes == cfg.seq_len * per_position
    fixed = make_caches(config_for("audio", "tiny", pattern="fixed", seq_len=4096, summary=16), 1)[0]
    assert fixed.nbytes == (256 + 16 * 4096 // 256) * 2 * 64 * 4  # own block + summaries
    dense = make_caches(cfg, 1, dense=True)
    assert sum(c.nbytes for c in dense) > 1.9 * sum(c.nbytes for c in caches)


def test_samples_depend_on_their_seed_not_on_the_batch():
    model = small_model()
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    together = sample(model, prompt.expand(3, -1).contiguous(), 120, [7, 8, 9])
    for i, seed in enumerate([7, 8, 9]):
        alone = sample(model, prompt, 120, [seed])
        assert torch.equal(alone[0], together[i])
    assert not torch.equal(together[0], together[1])
    assert torch.equal(together[:, :20], prompt.expand(3, -1))  # the prompt is kept


def test_greedy_and_the_filters():
    model = small_model()
    prompt = torch.zeros(2, 5, dtype=torch.long)
    greedy = sample(model, prompt, 60, [1, 2], SamplingOptions(temperature=0))
    assert torch.equal(greedy[0], greedy[1])  # seeds do not matter at temperature 0
    assert torch.equal(sample(model, prompt, 60, [1, 2], SamplingOptions(top_k=1)), greedy)
    assert torch.equal(sample(model, prompt, 60, [1, 2], SamplingOptions(top_p=1e-6)), greedy)


def test_choose_tokens_follows_the_distribution_and_its_filters():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log()[None].expand(1000, -1)
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000  # exact quantiles
    counts = torch.bincount(choose_tokens(logits, u, SamplingOptions()), minlength=4)
    assert counts.tolist() == [100, 200, 300, 400]
    counts = torch.bincount(choose_tokens(logits, u, SamplingOptions(top_k=2)), minlength=4)
    assert counts.tolist() == [0, 0, round(1000 * 3 / 7), round(1000 * 4 / 7)]
    counts = torch.bincount(choose_tokens(logits, u, SamplingOptions(top_p=0.65)), minlength=4)
    assert counts.tolist() == [0, 0, round(1000 * 3 / 7), round(1000 * 4 / 7)]  # 0.4 + 0.3 >= 0.65
    hot = torch.bincount(choose_tokens(logits, u, SamplingOptions(temperature=0.5)), minlength=4)
    assert hot[3] > 400 and hot[0] < 100  # lower temperature sharpens


def test_progress_reports_and_cancellation():
    model = small_model()
    reports = list(generate(model, torch.zeros(1, 10, dtype=torch.long), 110, [0], report_every=25))
    assert [r.done for r in reports] == [35, 60, 85, 110] and reports[-1].finished
    gen = generate(model, torch.zeros(1, 0, dtype=torch.long), 150, [0], report_every=10)
    first = next(gen)
    gen.close()  # cancelled between steps
    assert first.done == 10 and not first.finished


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingOptions(**bad)


def test_bad_generate_arguments_are_refused():
    model = small_model()
    ok = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="seeds"):
        sample(model, ok, 20, [1])
    with pytest.raises(ValueError, match="length"):
        sample(model, ok, 4, [1, 2])
    with pytest.raises(ValueError, match="length"):
        sample(model, ok, 161, [1, 2])
    with pytest.raises(ValueError, match="int64"):
        sample(model, ok.int(), 20, [1, 2])
    with pytest.raises(ValueError, match="prompt tokens"):
        sample(model, ok + 300, 20, [1, 2])
    with pytest.raises(ValueError, match=r"seeds must be 2 integers in 0..18446744073709551615"):
        sample(model, ok, 20, [1, 2**64])  # past what torch.Generator.manual_seed takes: no traceback from it
    assert sample(model, ok, 6, [0, 2**64 - 1]).shape == (2, 6)


def test_image_completion_keeps_the_prompt_rows_bit_for_bit():
    torch.manual_seed(0)
    model = SparseTransformer(config_for("image", "tiny")).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    reports = list(complete_image(model, image, 61, [4, 5, 6], batch_size=2, report_rows=1))
    final = reports[-1]
    assert final.finished and final.done == final.total == 3 * 3 * 192
    assert final.media.shape == (3, 64, 64, 3) and final.media.dtype == np.uint8
    assert (final.media[:, :61] == image[:61]).all()
    assert not (final.media[0, 61:] == final.media[1, 61:]).all()
    single = list(complete_image(model, image, 61, [5], batch_size=1))[-1].media[0]
    assert (single == final.media[1]).all()  # seed 5 alone equals seed 5 in a batch
    with pytest.raises(ValueError, match="prompt_rows"):
        next(complete_image(model, image, 64, [1]))
    with pytest.raises(ValueError, match="audio sampling needs an audio model"):
        next(generate_audio(model, 100, [1]))


def test_audio_generation_from_scratch_and_from_a_prompt():
    torch.manual_seed(0)
    model = SparseTransformer(config_for("audio", "tiny", seq_len=1024)).eval()
    model.card = {"codec": codec_card("audio")}
    scratch = list(generate_audio(model, 300, [1, 2], report_every=100))
    assert [r.done for r in scratch][-1] == 600 and scratch[-1].media.shape == (2, 300)
    prompt = (0.5 * np.sin(np.arange(2000) / 7)).astype(np.float32)
    cont = list(generate_audio(model, 300, [1], prompt=prompt))[-1].media
    assert cont.shape == (1, 1024)  # the last 724 prompt samples + 300 new ones
    from media.audio import mu_law_encode

    assert (cont[0, :724] == mu_law_encode(prompt)[-724:]).all()
    with pytest.raises(ValueError, match="length"):
        next(generate_audio(model, 2000, [1]))
    with pytest.raises(ValueError, match="NaN"):
        next(generate_audio(model, 10, [1], prompt=np.full(10, np.nan, np.float32)))
