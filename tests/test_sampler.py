"""KV-cached sampling: decode/forward exactness per pattern, seeds, controls, cancellation, media helpers."""

import numpy as np
import pytest
import torch

from models import SparseTransformer, codec_card, config_for
from models.completion import complete_image, generate_audio
from models.fused_step import FusedStep, library
from models.kv_cache import make_caches
from models.model import ModelConfig
from models.sampler import Decoder, SamplingCancelled, SamplingOptions, choose_tokens, generate, sample, weight_shards

PATTERNS = [dict(pattern="strided"), dict(pattern="fixed", summary=4),
            dict(pattern="fixed", summary=4, distinct_summaries=True), dict(pattern="all"),
            dict(layer_patterns=("local", "fixed"), summary=4)]


def small_model(seed: int = 0, **kw) -> SparseTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(n_layers=2, d_model=64, n_heads=2, block=16, stride=16, seq_len=160,
                                pos_factors=(10, 16)), **kw})
    model = SparseTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # non-trivial logits
    return model


STEPS = {"fused": dict(fused=True), "torch-1-shard": dict(fused=False, shards=1),
         "torch-2-shards": dict(fused=False, shards=2)}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("prompt_len", [0, 32, 37])
@pytest.mark.parametrize("kw", PATTERNS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_step_by_step_logits_equal_the_full_forward_at_every_position(kw, prompt_len, step):
    model = small_model(**kw)
    tokens = torch.randint(0, 256, (3, 150), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    decoder = Decoder(model, 3, 150, **STEPS[step])
    assert (decoder.fused is not None) == (step == "fused")
    if prompt_len:
        decoder.prefill(tokens[:, :prompt_len])
    for pos in range(prompt_len, 150):
        logits = decoder.step(tokens[:, pos - 1] if pos else None, pos)
        torch.testing.assert_close(logits, full[:, pos], rtol=1e-5, atol=5e-5)


def test_weight_shards_split_the_step_and_must_divide_the_layers():
    model = small_model()  # d_model 64, vocab 256
    assert [weight_shards(model.cfg, t) for t in (0, 1, 2, 3, 6, 64, 100)] == [1, 1, 2, 2, 4, 64, 64]
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    one, four = Decoder(model, 1, 40, shards=1), Decoder(model, 1, 40, shards=4)
    assert four.blocks[0][2].shape == (4, 64, 48)  # qkv: [shards, in, 3 * d_model / shards]
    for pos in range(40):
        prev = tokens[:, pos - 1] if pos else None
        torch.testing.assert_close(four.step(prev, pos), one.step(prev, pos), rtol=1e-5, atol=1e-5)
    for bad in (0, 3, True, 2.0):
        with pytest.raises(ValueError, match="shards"):
            Decoder(model, 1, 40, shards=bad)


@pytest.mark.parametrize("batch", [1, 2, 5, 8, 11])
def test_fused_step_on_any_thread_count_equals_the_pytorch_step(batch):
    """Rows of every batch size go through each register-blocking case of the C matmul (8 rows where the CPU
    has AVX-512, 4, 2 and 1 rows); the keys of each head are split across the threads and combined."""
    model = small_model(pattern="strided")
    tokens = torch.randint(0, 256, (batch, 60), generator=torch.Generator().manual_seed(4))
    ref = Decoder(model, batch, 60, fused=False)
    one, three = Decoder(model, batch, 60, fused=True), Decoder(model, batch, 60, fused=False)
    three.fused = FusedStep(model, three.caches, three.pos_emb, threads=3)
    one.fused = FusedStep(model, one.caches, one.pos_emb, threads=1)
    for pos in range(60):
        prev = tokens[:, pos - 1] if pos else None
        want = ref.step(prev, pos)
        for decoder in (one, three):
            torch.testing.assert_close(decoder.step(prev, pos), want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def env(monkeypatch):
    """monkeypatch for the environment fused_step.library() reads; the library is looked up afresh under it
    (call library.cache_clear() after each change), and the normal one is restored afterwards."""
    library.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    library.cache_clear()


def test_fused_step_refuses_what_it_cannot_run(env):
    model = small_model()
    decoder = Decoder(model, 2, 40, fused=True)
    with pytest.raises(ValueError, match="prev tokens must be in \\[0, 256\\)"):
        decoder.step(torch.tensor([3, 256]), 1)
    with pytest.raises(ValueError, match="pos must be in \\[0, 40\\)"):
        decoder.step(torch.tensor([3, 4]), 40)
    with pytest.raises(ValueError, match="prev given exactly when pos > 0"):
        decoder.step(None, 5)
    with pytest.raises(ValueError, match="fp32 on the CPU"):
        Decoder(small_model().to(torch.float64), 1, 40, fused=True)
    with pytest.raises(ValueError, match="fused must be"):
        Decoder(model, 1, 40, fused="yes")
    assert Decoder(small_model().to(torch.float64), 1, 40).fused is None  # auto: the PyTorch step
    with pytest.raises(ValueError, match="multiples of 16"):
        Decoder(small_model(vocab=250), 1, 40, fused=True)
    assert Decoder(small_model(vocab=250), 1, 40).fused is None
    assert Decoder(model, 1, 40, shards=2).fused is None
    with pytest.raises(ValueError, match="fused=False"):
        Decoder(model, 1, 40, shards=2, fused=True)
    env.setenv("STS_FUSED_STEP", "0")
    library.cache_clear()
    assert Decoder(model, 1, 40).fused is None
    with pytest.raises(ValueError, match="turned off"):
        Decoder(model, 1, 40, fused=True)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_fused_sampling_picks_what_choose_tokens_picks_from_the_same_logits(temperature):
    model = small_model(pattern="strided")
    B, N = 3, 150
    uniforms = torch.rand(B, N, generator=torch.Generator().manual_seed(5)).clamp_(max=1 - 2**-24)
    in_c = torch.zeros(B, N, dtype=torch.long)
    Decoder(model, B, N, fused=True).fused.sample(in_c, uniforms, temperature, 0, N)  # "auto": 2 or 3 rows a pass
    for rows_per_pass in (1, 3):
        decoder, again = Decoder(model, B, N, fused=True), torch.zeros(B, N, dtype=torch.long)
        decoder.fused.rows_per_pass = rows_per_pass
        decoder.fused.sample(again, uniforms, temperature, 0, N)
        assert torch.equal(again, in_c)
    replay, options = Decoder(model, B, N, fused=True), SamplingOptions(temperature)
    in_python = torch.zeros(B, N, dtype=torch.long)
    for pos in range(N):
        logits = replay.step(in_python[:, pos - 1] if pos else None, pos)
        in_python[:, pos] = choose_tokens(logits, uniforms[:, pos], options)
    assert torch.equal(in_c, in_python)
    assert len(in_c.unique()) > (1 if temperature == 0 else 50)
    prompt = torch.randint(0, 256, (B, 20), generator=torch.Generator().manual_seed(6))
    runs = [sample(model, prompt, N, [1, 2, 3], options, fused=fused) for fused in (True, False)]
    assert torch.equal(runs[0], runs[1])  # the C step + C sampling, and the PyTorch step + choose_tokens


def test_auto_rows_per_pass_times_each_grouping_on_the_sampling_itself_and_again_later(monkeypatch):
    """"auto" runs 2, 4 and all 5 rows a pass on TUNE_STEPS positions each, keeps the fastest, and measures
    again RETUNE_EVERY positions later; every position of every row is sampled once, as by a fixed grouping."""
    monkeypatch.setattr("models.fused_step.TUNE_STEPS", 4)
    monkeypatch.setattr("models.fused_step.RETUNE_EVERY", 40)
    model = small_model(pattern="strided")
    B, N = 5, 150
    uniforms = torch.rand(B, N, generator=torch.Generator().manual_seed(7))
    fixed = torch.zeros(B, N, dtype=torch.long)
    decoder = Decoder(model, B, N, fused=True)
    decoder.fused.rows_per_pass = 5
    decoder.fused.sample(fixed, uniforms, 1.0, 0, N)
    fused, calls = Decoder(model, B, N, fused=True).fused, []
    assert fused.rows_per_pass == "auto"
    run = fused._sample_rows
    monkeypatch.setattr(fused, "_sample_rows", lambda *a: (calls.append(a[3:]), run(*a)))
    auto = torch.zeros(B, N, dtype=torch.long)
    for start in range(0, N, 30):  # as generate() calls it: one report at a time
        fused.sample(auto, uniforms, 1.0, start, min(N, start + 30))
    assert torch.equal(auto, fixed)
    assert [stop for _, stop, _ in calls[:-1]] == [start for start, _, _ in calls[1:]]  # each position once
    assert (calls[0][0], calls[-1][1]) == (0, N)
    tunes = [start for start, stop, rows in calls if stop - start == 4 and rows == 2]
    assert tunes == [0, 60, 120]  # 3 x 4 positions; due again at 52 and 112, where fewer than 12 were left
    assert [rows for _, _, rows in calls[:3]] == [2, 4, 5] and fused.tuned_rows in (2, 4, 5)
    one = Decoder(model, 1, N, fused=True).fused
    one.sample(torch.zeros(1, N, dtype=torch.long), uniforms[:1].contiguous(), 1.0, 0, N)
    assert one.tuned_rows == 1  # one row: nothing to choose


def test_fused_sampling_refuses_bad_arguments():
    fused = Decoder(small_model(), 2, 40, fused=True).fused
    tokens, uniforms = torch.zeros(2, 40, dtype=torch.long), torch.rand(2, 40)
    for bad_tokens, bad_uniforms, match in ((tokens.int(), uniforms, "tokens must be"),
                                            (tokens[:1], uniforms, "tokens must be"),
                                            (tokens, uniforms.double(), "uniforms must be"),
                                            (tokens.t().contiguous().t(), uniforms, "contiguous rows")):
        with pytest.raises(ValueError, match=match):
            fused.sample(bad_tokens, bad_uniforms, 1.0, 0, 10)
    with pytest.raises(ValueError, match="positions \\[5, 41\\)"):
        fused.sample(tokens, uniforms, 1.0, 5, 41)
    with pytest.raises(ValueError, match="temperature"):
        fused.sample(tokens, uniforms, -1.0, 0, 10)
    model = small_model()
    for bad in (0, "fast", True, 2.0):
        with pytest.raises(ValueError, match='rows_per_pass must be "auto" or an integer >= 1'):
            FusedStep(model, Decoder(model, 2, 40, fused=False).caches, torch.zeros(40, 64), rows_per_pass=bad)
    tokens[1, 4] = 300
    with pytest.raises(ValueError, match="before position 5"):
        fused.sample(tokens, uniforms, 1.0, 5, 10)


def test_fused_step_is_built_once_and_a_missing_or_failing_compiler_is_reported(env, tmp_path):
    model = small_model()
    env.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert library() is not None
    assert len(list((tmp_path / "sparse-transformer-studio").glob("fused_step-*.so"))) == 1
    library.cache_clear()
    assert library() is not None  # the built library is reused
    assert len(list((tmp_path / "sparse-transformer-studio").glob("*"))) == 1
    for cc, match in (("no-such-compiler", "no C compiler \\(no-such-compiler\\)"), ("false", "false")):
        env.setenv("CC", cc)
        library.cache_clear()
        assert Decoder(model, 1, 40).fused is None  # auto: the PyTorch step
        with pytest.raises(ValueError, match=f"could not be built.*{match}"):
            Decoder(model, 1, 40, fused=True)


def test_fused_step_built_without_march_native_gives_the_same_logits(env, tmp_path):
    """A compiler that refuses -march=native (as some do) gets a plain build: generic vector code, with the
    8-wide matmul tiles of CPUs without AVX-512 (blocks of 4 and 1 rows for a batch of 5)."""
    cc = tmp_path / "cc-without-native"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-march=native" ] && { echo "no native" >&2; exit 1; }; done\n'
                  'exec cc "$@"\n')
    cc.chmod(0o755)
    env.setenv("CC", str(cc))
    env.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = small_model(pattern="strided")
    tokens = torch.randint(0, 256, (5, 50), generator=torch.Generator().manual_seed(7))
    plain, ref = Decoder(model, 5, 50, fused=True), Decoder(model, 5, 50, fused=False)
    for pos in range(50):
        prev = tokens[:, pos - 1] if pos else None
        torch.testing.assert_close(plain.step(prev, pos), ref.step(prev, pos), rtol=1e-5, atol=1e-5)


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
    seen = []
    with pytest.raises(SamplingCancelled):
        sample(model, torch.zeros(1, 0, dtype=torch.long), 150, [0], callback=lambda p: seen.append(p.done) or
               len(seen) < 2, report_every=10)
    assert seen == [10, 20]


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
