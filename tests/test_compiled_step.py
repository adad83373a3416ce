"""The compiled decoding step: equal to the PyTorch step on any thread count and batch, its C sampling,
rows per pass, argument checks, and how the library is built, cached and (never) loaded from elsewhere."""

import os
import shutil
import stat
import subprocess
import tempfile
from types import SimpleNamespace

import pytest
import torch
from helpers import needs_compiler, small_model, wrapped_compiler

from kernels import native
from sampling import Decoder, SamplingOptions, choose_tokens
from sampling import compiled_step as cs
from sampling.compiled_step import CompiledStep, library, prepare

pytestmark = needs_compiler


@pytest.fixture
def env(monkeypatch):
    """monkeypatch for the environment library() reads; the library is looked up afresh under it
    (call library.cache_clear() after each change), and the normal one is restored afterwards."""
    library.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    library.cache_clear()


LAG = dict(lag_inputs=24, token_values="mu_law")


@pytest.mark.parametrize("batch, kw", [(1, {}), (2, {}), (5, {}), (8, {}), (11, {}), (3, LAG)],
                         ids=["1", "2", "5", "8", "11", "3-lag-inputs"])
def test_compiled_step_on_any_thread_count_equals_the_pytorch_step(batch, kw):
    """Rows of every batch size go through each register-blocking case of the C matmul (8 rows where the CPU
    has AVX-512, 4, 2 and 1 rows); the keys of each head are split across the threads and combined; lag inputs
    read the tokens before each position, fewer than K near the start."""
    model = small_model(pattern="strided", **kw)
    tokens = torch.randint(0, 256, (batch, 60), generator=torch.Generator().manual_seed(4))
    exact = dict(step="pytorch", cache_dtype=torch.float32)
    ref, one, three = (Decoder(model, batch, 60, **exact) for _ in range(3))
    three.step = CompiledStep(model, three.caches, three.pos_emb, threads=3)
    one.step = CompiledStep(model, one.caches, one.pos_emb, threads=1)
    with torch.no_grad():
        full = model(tokens)
    for pos in range(60):
        want = ref.step(tokens, pos)
        torch.testing.assert_close(want, full[:, pos], rtol=1e-4, atol=1e-4)
        for decoder in (one, three):
            torch.testing.assert_close(decoder.step(tokens, pos), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_bfloat16_cache_rows_are_rounded_as_torch_rounds(pattern):
    """The compiled step stores each new key and value in a bfloat16 cache rounded to nearest, ties to even, as
    torch's float32 -> bfloat16 conversion does: layer 0 of a bfloat16 cache holds, bit for bit, the rounded rows
    of a float32 one (that layer's keys and values do not depend on the caches). Its logits stay close to the
    PyTorch step's over the same bfloat16 caches."""
    model = small_model(pattern=pattern, summary=4)
    tokens = torch.randint(0, 256, (3, 60), generator=torch.Generator().manual_seed(4))
    half, full, ref = (Decoder(model, 3, 60, step=s, cache_dtype=dt) for s, dt in
                       (("compiled", torch.bfloat16), ("compiled", torch.float32), ("pytorch", torch.bfloat16)))
    for pos in range(60):
        logits = half.step(tokens, pos)
        full.step(tokens, pos)
        torch.testing.assert_close(logits, ref.step(tokens, pos), rtol=0, atol=2e-3)
    stored = [t.abs().sum() > 0 for t in half.caches[0].tensors()]
    assert all(stored)
    for a, b in zip(half.caches[0].tensors(), full.caches[0].tensors(), strict=True):
        assert torch.equal(a, b.to(torch.bfloat16))


def test_caches_the_step_cannot_read_leave_it_to_the_pytorch_step():
    model = small_model()
    assert not isinstance(Decoder(model, 1, 40, cache_dtype=torch.float16).step, CompiledStep)
    with pytest.raises(ValueError, match="caches must be float32 or bfloat16"):
        Decoder(model, 1, 40, step="compiled", cache_dtype=torch.float16)


def test_a_rows_logits_do_not_depend_on_the_batch_it_runs_in():
    """Bit for bit: 11 rows (the layer norm's groups of 8 and 3, the matmul's groups of 8, 2 and 1) against each
    row decoded alone, on two threads."""
    model = small_model(pattern="strided")
    batch, n = 11, 40
    tokens = torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(5))
    together = Decoder(model, batch, n, step="pytorch")
    together.step = CompiledStep(model, together.caches, together.pos_emb, threads=2)
    alone = []
    for _ in range(batch):
        decoder = Decoder(model, 1, n, step="pytorch")
        decoder.step = CompiledStep(model, decoder.caches, decoder.pos_emb, threads=2)
        alone.append(decoder)
    for pos in range(n):
        logits = together.step(tokens, pos)
        for row, decoder in enumerate(alone):
            assert torch.equal(logits[row], decoder.step(tokens[row:row + 1], pos)[0])


def test_compiled_step_refuses_what_it_cannot_run(env):
    model = small_model()
    decoder = Decoder(model, 2, 40, step="compiled")
    with pytest.raises(ValueError, match="tokens before position 1 must be in \\[0, 256\\)"):
        decoder.step(torch.tensor([[3], [256]]), 1)
    with pytest.raises(ValueError, match="pos must be an integer in \\[0, 40\\)"):
        decoder.step(torch.zeros(2, 40, dtype=torch.long), 40)
    with pytest.raises(ValueError, match="tokens must be a tensor \\[2, >= 5\\]"):
        decoder.step(torch.zeros(2, 4, dtype=torch.long), 5)
    lagged = Decoder(small_model(**LAG), 1, 40, step="compiled")
    history = torch.tensor([[-1, 7, 8]])  # the lag inputs read the tokens before pos - 1 too
    with pytest.raises(ValueError, match="tokens before position 3"):
        lagged.step(history, 3)
    lagged.step(history[:, 1:], 2)
    with pytest.raises(ValueError, match="fp32 on the CPU"):
        Decoder(small_model().to(torch.float64), 1, 40, step="compiled")
    with pytest.raises(ValueError, match="multiples of 16"):
        Decoder(small_model(vocab=250), 1, 40, step="compiled")
    env.setenv("STS_FUSED_STEP", "0")
    library.cache_clear()
    assert not isinstance(Decoder(model, 1, 40).step, CompiledStep)
    with pytest.raises(ValueError, match="turned off"):
        Decoder(model, 1, 40, step="compiled")


RULES = {"t1": dict(temperature=1.0), "t0.7": dict(temperature=0.7), "greedy": dict(temperature=0.0),
         "top-k": dict(temperature=1.0, top_k=40), "top-p": dict(temperature=0.8, top_p=0.9),
         "both": dict(temperature=1.2, top_k=60, top_p=0.7), "greedy-top-p": dict(temperature=0.0, top_p=0.5)}


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
def test_c_sampling_picks_what_choose_tokens_picks_from_the_same_logits(rule):
    model = small_model(pattern="strided")
    B, N = 3, 150
    options = SamplingOptions(**rule)
    uniforms = torch.rand(B, N, generator=torch.Generator().manual_seed(5)).clamp_(max=1 - 2**-24)
    in_c = torch.zeros(B, N, dtype=torch.long)
    Decoder(model, B, N, step="compiled").step.sample(in_c, uniforms, options, 0, N)  # "auto": 2 or 3 rows a pass
    for rows_per_pass in (1, 3):
        decoder, again = Decoder(model, B, N, step="compiled"), torch.zeros(B, N, dtype=torch.long)
        decoder.step.rows_per_pass = rows_per_pass
        decoder.step.sample(again, uniforms, options, 0, N)
        assert torch.equal(again, in_c)
    replay = Decoder(model, B, N, step="compiled")
    in_python = torch.zeros(B, N, dtype=torch.long)
    for pos in range(N):
        logits = replay.step(in_python, pos)
        in_python[:, pos] = choose_tokens(logits, uniforms[:, pos], options)
    assert torch.equal(in_c, in_python)
    assert len(in_c.unique()) > (1 if options.temperature == 0 else 20)
    if options.temperature and (options.top_k or options.top_p):  # the filters change the draws
        unfiltered = torch.zeros(B, N, dtype=torch.long)
        Decoder(model, B, N, step="compiled").step.sample(unfiltered, uniforms, SamplingOptions(options.temperature),
                                                          0, N)
        assert (unfiltered != in_c).float().mean() > 0.05


@pytest.mark.parametrize("threads, options, kw", [(2, SamplingOptions(0.9), {}),
                                                  (3, SamplingOptions(0.9, top_k=80, top_p=0.95), {}),
                                                  (2, SamplingOptions(0.9), LAG)],
                         ids=["2-plain", "3-filtered", "2-lag-inputs"])
def test_threads_sampling_their_own_rows_pick_what_the_threads_stepping_together_pick(threads, options, kw):
    """With at least two rows a thread, st_sample gives each thread its own rows for every position (no thread
    waits for another); the tokens equal those of the threads running each step together (one row a pass, or
    the logits of st_step) and those of the calling thread alone (solo), also when a call starts after earlier
    tokens, whose bad values are refused."""
    model = small_model(pattern="strided", **kw)
    B, N, start = 7, 120, 30
    uniforms = torch.rand(B, N, generator=torch.Generator().manual_seed(9)).clamp_(max=1 - 2**-24)
    results = {}
    for rows_per_pass in (B, 1):
        decoder = Decoder(model, B, N, step="pytorch")
        decoder.step = CompiledStep(model, decoder.caches, decoder.pos_emb, threads=threads,
                                    rows_per_pass=rows_per_pass)
        tokens = torch.zeros(B, N, dtype=torch.long)
        decoder.step.sample(tokens, uniforms, options, 0, start)
        decoder.step.sample(tokens, uniforms, options, start, N)
        results[rows_per_pass] = (decoder, tokens)
    assert torch.equal(results[B][1], results[1][1])
    assert len(results[B][1].unique()) > 50
    solo = Decoder(model, B, N, step="pytorch")
    solo.step = CompiledStep(model, solo.caches, solo.pos_emb, threads=threads)
    alone = torch.zeros(B, N, dtype=torch.long)
    for rows, (a, b) in ((B, (0, start)), (3, (start, N))):
        solo.step._sample_rows(alone, uniforms, options, a, b, rows, solo=True)
    assert torch.equal(alone, results[B][1])
    replay = Decoder(model, B, N, step="pytorch")
    replay.step = CompiledStep(model, replay.caches, replay.pos_emb, threads=threads)
    in_python = torch.zeros(B, N, dtype=torch.long)
    for pos in range(N):
        logits = replay.step(in_python, pos)
        in_python[:, pos] = choose_tokens(logits, uniforms[:, pos], options)
    assert torch.equal(results[B][1], in_python)
    decoder, tokens = results[B]
    tokens[6, start - 1] = -1
    with pytest.raises(ValueError, match=f"before position {start}"):
        decoder.step.sample(tokens, uniforms, options, start, start + 1)


def test_auto_rows_per_pass_times_each_grouping_on_the_sampling_itself_and_again_later(monkeypatch):
    """"auto" runs 2, 4 and all 5 rows a pass, on all threads and on the calling thread alone, TUNE_STEPS positions
    each in each of TUNE_ROUNDS rounds after TUNE_STEPS untimed ones, keeps the fastest, and measures again
    RETUNE_EVERY positions later; every position of every row is sampled once, as by a fixed grouping."""
    monkeypatch.setattr("sampling.compiled_step.TUNE_STEPS", 1)
    monkeypatch.setattr("sampling.compiled_step.RETUNE_EVERY", 40)
    model = small_model(pattern="strided")
    B, N = 5, 150
    options = SamplingOptions()
    uniforms = torch.rand(B, N, generator=torch.Generator().manual_seed(7))
    fixed = torch.zeros(B, N, dtype=torch.long)
    decoder = Decoder(model, B, N, step="compiled")
    decoder.step.rows_per_pass = 5
    decoder.step.sample(fixed, uniforms, options, 0, N)
    auto_decoder, calls = Decoder(model, B, N, step="pytorch"), []
    step = auto_decoder.step = CompiledStep(model, auto_decoder.caches, auto_decoder.pos_emb, threads=2)
    assert step.rows_per_pass == "auto"
    run = step._sample_rows
    monkeypatch.setattr(step, "_sample_rows", lambda *a: (calls.append(a[3:]), run(*a)))
    auto = torch.zeros(B, N, dtype=torch.long)
    for start in range(0, N, 30):  # as generate() calls it: one report at a time
        step.sample(auto, uniforms, options, start, min(N, start + 30))
    assert torch.equal(auto, fixed)
    assert [c[1] for c in calls[:-1]] == [c[0] for c in calls[1:]]  # each position once
    assert (calls[0][0], calls[-1][1]) == (0, N)
    groupings = [(2, False), (4, False), (5, False), (2, True), (4, True), (5, True)]
    tune = [(2, False)] + groupings * 3  # one untimed position, then 3 rounds of one position each
    starts = [i for i in range(len(calls)) if [tuple(c[2:]) for c in calls[i:i + len(tune)]] == tune]
    assert [calls[i][0] for i in starts] == [0, 60, 120]  # due 40 after each tune, started by a call with 19 left
    assert all(c[1] - c[0] == 1 for i in starts for c in calls[i:i + len(tune)])
    assert step.tuned_rows in (2, 4, 5) and step.tuned_solo in (False, True)
    one = Decoder(model, 1, N, step="pytorch")
    one.step = CompiledStep(model, one.caches, one.pos_emb, threads=2)
    one.step.sample(torch.zeros(1, N, dtype=torch.long), uniforms[:1].contiguous(), options, 0, N)
    assert one.step.tuned_rows == 1  # one row: only the threads to choose


@pytest.mark.parametrize("solo_speedup, chosen", [(1.1, (2, False)), (1.5, (2, True))])
def test_auto_grouping_takes_the_calling_thread_alone_only_when_clearly_faster(monkeypatch, solo_speedup, chosen):
    """The fastest grouping on all threads wins unless one on the calling thread alone is SOLO_MARGIN times faster."""
    import sampling.compiled_step as compiled_step

    monkeypatch.setattr(compiled_step, "TUNE_STEPS", 4)
    model = small_model(pattern="strided")
    decoder = Decoder(model, 4, 160, step="pytorch")
    step = CompiledStep(model, decoder.caches, decoder.pos_emb, threads=2)
    clock = [0.0]
    seconds = {(2, False): 1.0, (4, False): 1.2, (2, True): 1.0 / solo_speedup, (4, True): 1.3}  # per position
    monkeypatch.setattr(compiled_step, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(step, "_sample_rows", lambda tokens, uniforms, options, start, stop, rows, solo=False:
                        clock.__setitem__(0, clock[0] + (stop - start) * seconds[rows, solo]))
    step.sample(torch.zeros(4, 160, dtype=torch.long), torch.rand(4, 160), SamplingOptions(), 0, 160)
    assert (step.tuned_rows, step.tuned_solo) == chosen


def test_auto_grouping_is_not_decided_by_one_stalled_round(monkeypatch):
    """Each grouping's median round counts: all threads, slowed 5x in their first timed round (as in a fresh
    process), still win over the calling thread alone, which is 1.5x slower in every round."""
    import sampling.compiled_step as compiled_step

    monkeypatch.setattr(compiled_step, "TUNE_STEPS", 4)
    model = small_model(pattern="strided")
    decoder = Decoder(model, 1, 160, step="pytorch")
    step = CompiledStep(model, decoder.caches, decoder.pos_emb, threads=2)
    clock, timed = [0.0], []

    def run(tokens, uniforms, options, start, stop, rows, solo=False):
        timed.append(solo)
        stall = 5.0 if timed.count(False) == 2 else 1.0  # the threads' first timed round (after the untimed one)
        clock[0] += (stop - start) * (1.5 if solo else stall)

    monkeypatch.setattr(compiled_step, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(step, "_sample_rows", run)
    step.sample(torch.zeros(1, 160, dtype=torch.long), torch.rand(1, 160), SamplingOptions(), 0, 160)
    assert timed[:3] == [False, False, True]  # the untimed round, then the rounds alternate
    assert (step.tuned_rows, step.tuned_solo) == (1, False)


def test_c_sampling_refuses_bad_arguments():
    step = Decoder(small_model(), 2, 40, step="compiled").step
    options = SamplingOptions()
    tokens, uniforms = torch.zeros(2, 40, dtype=torch.long), torch.rand(2, 40)
    for bad_tokens, bad_uniforms, match in ((tokens.int(), uniforms, "tokens must be"),
                                            (tokens[:1], uniforms, "tokens must be"),
                                            (tokens, uniforms.double(), "uniforms must be"),
                                            (tokens.t().contiguous().t(), uniforms, "contiguous rows")):
        with pytest.raises(ValueError, match=match):
            step.sample(bad_tokens, bad_uniforms, options, 0, 10)
    with pytest.raises(ValueError, match="positions \\[5, 41\\)"):
        step.sample(tokens, uniforms, options, 5, 41)
    model = small_model()
    for bad in (0, "fast", True, 2.0):
        with pytest.raises(ValueError, match='rows_per_pass must be "auto" or an integer >= 1'):
            CompiledStep(model, Decoder(model, 2, 40, step="pytorch").caches, torch.zeros(40, 64), rows_per_pass=bad)
    tokens[1, 4] = 300
    with pytest.raises(ValueError, match="before position 5"):
        step.sample(tokens, uniforms, options, 5, 10)


def test_library_is_built_once_into_a_private_folder_and_a_missing_or_failing_compiler_is_reported(env, tmp_path):
    model = small_model()
    env.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert "compiled decoding step ready" in prepare()
    folder = tmp_path / "sparse-transformer-studio"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    built = list(folder.glob("compiled_step-*.so"))
    assert len(built) == 1 and not stat.S_IMODE(built[0].stat().st_mode) & 0o022
    library.cache_clear()
    assert library() is not None  # the built library is reused
    assert list(folder.glob("*")) == built
    for cc, match in (("no-such-compiler", "no C compiler \\(no-such-compiler\\)"), ("false", "false")):
        env.setenv("CC", cc)
        library.cache_clear()
        assert not isinstance(Decoder(model, 1, 40).step, CompiledStep)  # auto: the PyTorch step
        with pytest.raises(ValueError, match=f"could not be built.*{match}"):
            Decoder(model, 1, 40, step="compiled")
        assert "unavailable" in prepare() and "PyTorch step" in prepare()


def _bf16_valued(model):
    """The model with every weight rounded to a bfloat16 number, kept in float32 (as a model stored in bfloat16
    loads)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


@pytest.mark.parametrize("plain", [False, True], ids=["native", "plain-build"])
@pytest.mark.parametrize("kw", [dict(), dict(ff_layout="random", ff_density=0.5, ff_block=16, ff_layers=(1,))],
                         ids=["dense", "block-sparse-ff"])
def test_bf16_valued_weights_are_read_as_bf16_with_the_same_logits_bit_for_bit(env, tmp_path, kw, plain):
    """A model whose weights are all bfloat16 numbers: the step reads its matrices from half the bytes (the AVX-512
    tiles, and the 8-wide halves of a plain build) and its logits equal, bit for bit, those of the float32 copies
    at batches 1 to 9; a model with float32 weights keeps reading float32."""
    if plain:
        wrapped_compiler(tmp_path, env, "refuse")
    model = _bf16_valued(small_model(pattern="strided", **kw))
    tokens = torch.randint(0, 256, (9, 40), generator=torch.Generator().manual_seed(8))
    for batch in (1, 2, 5, 9):
        half, full = Decoder(model, batch, 40, step="pytorch"), Decoder(model, batch, 40, step="pytorch")
        half.step = CompiledStep(model, half.caches, half.pos_emb, threads=2)
        full.step = CompiledStep(model, full.caches, full.pos_emb, threads=2, bf16_weights=False)
        assert half.step.weight_bytes * 2 == full.step.weight_bytes
        for pos in range(40):
            assert torch.equal(half.step(tokens[:batch], pos), full.step(tokens[:batch], pos))
    model = small_model(pattern="strided", **kw)  # float32 weights
    mixed = Decoder(model, 1, 40, step="pytorch")
    mixed.step = CompiledStep(model, mixed.caches, mixed.pos_emb)
    matrices = sum(p.numel() for n, p in model.named_parameters()  # a block-sparse one holds its blocks only
                   if p.dim() >= 2 and n.startswith(("blocks.", "head.")))
    assert mixed.step.weight_bytes == 4 * matrices
    with pytest.raises(ValueError, match="bf16_weights must be True or False"):
        CompiledStep(model, mixed.caches, mixed.pos_emb, bf16_weights="yes")


def test_library_built_without_march_native_gives_the_same_logits(env, tmp_path):
    """A compiler that refuses -march=native (as some do) gets a plain build: generic vector code, with the
    8-wide matmul tiles of CPUs without AVX-512 (blocks of 4 and 1 rows for a batch of 5), over float32 and
    bfloat16 caches."""
    wrapped_compiler(tmp_path, env, "refuse")
    model = small_model(pattern="strided")
    tokens = torch.randint(0, 256, (5, 50), generator=torch.Generator().manual_seed(7))
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-3)):
        plain = Decoder(model, 5, 50, step="compiled", cache_dtype=dtype)
        ref = Decoder(model, 5, 50, step="pytorch", cache_dtype=dtype)
        for pos in range(50):
            torch.testing.assert_close(plain.step(tokens, pos), ref.step(tokens, pos), rtol=tolerance, atol=tolerance)


def _planted_library(path, marker):
    """A shared library at ``path`` that creates the file ``marker`` as soon as it is loaded."""
    source = path.with_suffix(".c")
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {\n'
                      f'  FILE *f = fopen("{marker}", "w"); if (f) fclose(f);\n}}\n')
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", str(source), "-o", str(path)], check=True)
    source.unlink()


def test_a_library_planted_in_a_shared_or_unsafe_folder_is_never_loaded(env, tmp_path):
    """Plant a library of the expected name (it leaves a marker file when loaded) in the shared temp folder,
    where an earlier version also looked, and in a cache folder that others can write to: neither is loaded;
    the step is built into a private folder and runs."""
    cc = os.environ.get("CC", "cc")
    path = shutil.which(cc)
    name = native.library_name(cs.SOURCE, path, native.compiler_version(path), native.ARCH_FLAGS[0])
    marker = tmp_path / "planted-library-was-loaded"
    shared = tmp_path / "shared-tmp" / "sparse-transformer-studio"
    shared.mkdir(parents=True)
    _planted_library(shared / name, marker)
    env.setattr(tempfile, "tempdir", str(tmp_path / "shared-tmp"))  # the shared temp folder of this test
    unsafe = tmp_path / "xdg"
    (unsafe / "sparse-transformer-studio").mkdir(parents=True)
    _planted_library(unsafe / "sparse-transformer-studio" / name, marker)
    os.chmod(unsafe / "sparse-transformer-studio", 0o777)  # anyone could have put the library there
    env.setenv("XDG_CACHE_HOME", str(unsafe))
    message = prepare()
    assert "ready" in message and "can be written by others" in message, message
    assert not marker.exists()
    assert cs._status["path"].parent not in (shared, unsafe / "sparse-transformer-studio")
    assert stat.S_IMODE(cs._status["path"].parent.stat().st_mode) == 0o700
    model = small_model()
    assert isinstance(Decoder(model, 1, 40).step, CompiledStep)
    # a planted file in the user's own (private) folder is refused when others may write to the file itself
    library.cache_clear()
    private = tmp_path / "private"
    env.setenv("XDG_CACHE_HOME", str(private))
    (private / "sparse-transformer-studio").mkdir(parents=True, mode=0o700)
    _planted_library(private / "sparse-transformer-studio" / name, marker)
    os.chmod(private / "sparse-transformer-studio" / name, 0o666)
    assert "can be written by others" in prepare()
    assert not marker.exists()


def test_library_name_follows_the_headers_a_source_includes(tmp_path):
    """A header the source includes with quotes is part of what names the build (kernels/vexp.h is shared by
    both compiled sources), so editing it builds afresh; a system header is not read."""
    (tmp_path / "sub").mkdir()
    source = tmp_path / "sub" / "code.c"
    source.write_text('#include <math.h>\n#include "../shared.h"\nint f(void) { return G; }\n')
    header = tmp_path / "shared.h"
    header.write_text('#include "sub/code.c"\n#define G 1\n')  # a cycle back to the source is read once
    name = native.library_name(source, "cc", "cc 1.0", [])
    assert name.startswith("code-") and native.library_name(source, "cc", "cc 1.0", []) == name
    header.write_text('#include "sub/code.c"\n#define G 2\n')
    assert native.library_name(source, "cc", "cc 1.0", []) != name
