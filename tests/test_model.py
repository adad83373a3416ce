"""The Sparse Transformer: calling convention, causality per pattern, init, configs, overfitting."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from models import CONFIGS, ModelConfig, SparseTransformer, config_for
from models.flops import attention_scores, matmul_parameters, training_flops_per_sequence

PATTERNS = [dict(pattern="strided"), dict(pattern="fixed", summary=4),
            dict(pattern="fixed", summary=4, distinct_summaries=True), dict(pattern="all"),
            dict(layer_patterns=("strided", "fixed"), summary=4)]


def small_config(**kw) -> ModelConfig:
    base = dict(n_layers=2, d_model=64, n_heads=2, block=16, stride=16, seq_len=160, pos_factors=(10, 16))
    return ModelConfig(**{**base, **kw})


def random_head(model: SparseTransformer) -> SparseTransformer:
    """The paper's init zeroes the logits layer; give it weights so logits depend on the input."""
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


@pytest.mark.parametrize("kw", PATTERNS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_changing_token_t_never_changes_logits_up_to_t(kw):
    torch.manual_seed(0)
    model = random_head(SparseTransformer(small_config(**kw))).eval()
    tokens = torch.randint(0, 256, (2, 160))
    base = model(tokens)
    for t in (0, 17, 95, 159):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 101) % 256
        out = model(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), t
        if t + 1 < 160:
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().amax() > 0, t  # the next token sees it


def test_first_token_is_scored_from_the_start_embedding_and_loss_is_plain_cross_entropy():
    torch.manual_seed(0)
    model = random_head(SparseTransformer(small_config())).eval()
    a, b = torch.randint(0, 256, (1, 40)), torch.randint(0, 256, (1, 40))
    assert torch.equal(model(a)[:, 0], model(b)[:, 0])  # position 0 depends on nothing
    logits = model(a)
    assert logits.shape == (1, 40, 256)
    loss = F.cross_entropy(logits.flatten(0, 1), a.flatten())
    assert torch.isfinite(loss)


def test_paper_initialisation():
    torch.manual_seed(0)
    cfg = small_config(n_layers=8, d_model=128)
    model = SparseTransformer(cfg)
    tokens = torch.randint(0, 256, (2, 64))
    assert torch.equal(model(tokens), torch.zeros(2, 64, 256))  # zero logits: loss = log 256
    expected = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert model.blocks[3].attn.proj.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert model.blocks[3].ff.proj.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.125 / math.sqrt(128), rel=0.1)
    assert model.pos_emb[0].weight.std().item() == pytest.approx(0.125 / math.sqrt(128 * 2), rel=0.2)


def test_position_embedding_sums_one_table_per_digit():
    model = SparseTransformer(config_for("image", "tiny"))
    r, c, ch = 5, 17, 2
    t = (r * 64 + c) * 3 + ch
    want = model.pos_emb[0].weight[r] + model.pos_emb[1].weight[c] + model.pos_emb[2].weight[ch]
    got = model.position_embedding(torch.tensor([t]))[0]
    assert torch.allclose(got, want)


def test_layers_interleave_local_and_strided():
    cfg = config_for("image", "small")
    assert [cfg.layer_kind(i) for i in range(4)] == ["local", "strided", "local", "strided"]
    assert cfg.layout(0).window == 192 and cfg.layout(1).stride == 192
    assert config_for("audio", "tiny", pattern="fixed").layer_kind(1) == "fixed"
    mixed = config_for("audio", "tiny", layer_patterns=("all", "local"))
    assert [mixed.layer_kind(i) for i in range(2)] == ["all", "local"]


def test_a_strided_layer_shorter_than_a_block_takes_blocks_of_one_column():
    torch.manual_seed(0)
    cfg = small_config(block=32, stride=8, seq_len=256, pos_factors=(32, 8))
    assert cfg.layout(1, 128).block == 16 and cfg.layout(1, 128).rows == 16  # 16 rows a column
    assert cfg.layout(1, 256).block == 32 and cfg.layout(0, 128).block == 32  # full columns; local layers
    assert cfg.layout(1, 96).block == 32  # 12 rows: no block size fits, the padded layout as before
    model = random_head(SparseTransformer(cfg))
    for n in (128, 96):
        tokens, weights = torch.randint(0, 256, (2, n)), torch.randn(2, n, 256)
        out = model(tokens)
        (out * weights).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model.backend = "reference"
        ref = model(tokens)
        (ref * weights).sum().backward()
        model.backend = "auto"
        assert torch.allclose(out, ref, atol=2e-5, rtol=1e-5)
        for g, p in zip(grads, model.parameters(), strict=True):
            assert (g - p.grad).norm() <= 1e-5 * p.grad.norm()
        model.zero_grad()


@pytest.mark.parametrize("kw", PATTERNS[:2], ids=["strided", "fixed"])
def test_cpu_kernels_match_the_dense_reference_in_the_model(kw):
    torch.manual_seed(0)
    model = random_head(SparseTransformer(small_config(**kw)))
    tokens = torch.randint(0, 256, (2, 150))  # shorter than seq_len: layouts for any N
    out = model(tokens)
    model.backend = "reference"
    ref = model(tokens)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-5)


def test_recompute_gives_the_same_gradients():
    torch.manual_seed(0)
    model = random_head(SparseTransformer(small_config(dropout=0.1)))
    tokens = torch.randint(0, 256, (2, 160))
    grads = []
    for recompute in (False, True):
        model.recompute = recompute
        model.zero_grad()
        torch.manual_seed(1)  # same dropout masks
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    torch.manual_seed(0)
    model = random_head(SparseTransformer(small_config()))
    tokens = torch.randint(0, 256, (1, 160))
    ref = model(tokens)
    with torch.autocast("cpu", torch.bfloat16):
        out = model(tokens).float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_a_tiny_model_overfits_a_few_sequences():
    torch.manual_seed(0)
    model = SparseTransformer(small_config(seq_len=128, pos_factors=(8, 16)))
    data = torch.randint(0, 256, (2, 128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = F.cross_entropy(model(data).flatten(0, 1), data.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 < math.log(256)  # random tokens: only memorising gets here


@pytest.mark.parametrize("kw, n_layers", [(dict(pattern="strided", n_layers=3), 6), (dict(pattern="all"), 3)])
def test_a_deepened_model_computes_the_same_function_and_its_new_blocks_learn(kw, n_layers):
    torch.manual_seed(0)
    model = random_head(SparseTransformer(small_config(**kw))).eval()
    grown = model.deepened(n_layers).eval()
    assert grown.cfg == dataclasses.replace(model.cfg, n_layers=n_layers)
    tokens = torch.randint(0, 256, (2, 160))
    torch.testing.assert_close(grown(tokens), model(tokens), atol=1e-6, rtol=0)
    kinds = [grown.cfg.layer_kind(i) for i in range(n_layers)]
    old = model.cfg.n_layers
    for i in range(old, n_layers):
        source = max(j for j in range(old) if kinds[j] == kinds[i])  # the top block of the same kind
        for name, p in grown.blocks[i].named_parameters():
            if name.endswith("proj.weight") or name.endswith("proj.bias"):
                assert not p.any(), (i, name)
            else:
                assert torch.equal(p, model.blocks[source].get_parameter(name)), (i, name)
    loss = F.cross_entropy(grown.train()(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    assert grown.blocks[-1].attn.proj.weight.grad.abs().sum() > 0  # zeroed outputs still get gradients
    assert model.deepened(old) is not model and model.cfg.n_layers == old


def test_deepened_refuses_fewer_layers_and_explicit_layer_patterns():
    model = SparseTransformer(small_config(n_layers=3))
    for bad in (2, 0, True, 4.0):
        with pytest.raises(ValueError, match="n_layers must be an integer >= 3"):
            model.deepened(bad)
    listed = SparseTransformer(small_config(layer_patterns=("local", "all")))
    with pytest.raises(ValueError, match="layer_patterns"):
        listed.deepened(3)


@pytest.mark.parametrize("bad, message", [
    (dict(pattern="dense"), "pattern"), (dict(d_model=96, n_heads=2), "head dim"), (dict(block=48), "block"),
    (dict(dropout=1.0), "dropout"), (dict(n_layers=0), "n_layers"), (dict(seq_len=200), "pos_factors"),
    (dict(pattern="fixed", summary=32), "summary"), (dict(layer_patterns=("local",)), "layer_patterns"),
    (dict(layer_patterns=("local", "dense")), "layer_patterns"),
])
def test_bad_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        small_config(**bad)


def test_config_round_trips_through_a_dict_and_refuses_unknown_fields():
    cfg = small_config(pattern="fixed", summary=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layer": 3})


def test_named_configs():
    assert set(CONFIGS) >= {"tiny", "image-cpu", "audio-cpu", "imagenet64-paper", "audio-paper"}
    img = config_for("image", "image-cpu")
    assert img.seq_len == 12288 and img.pos_factors == (64, 64, 3) and img.stride == 192
    aud = config_for("audio", "audio-cpu")
    assert aud.seq_len == 65536 and aud.pos_factors == (256, 256) and aud.stride == 256
    assert config_for("audio", "tiny", seq_len=1000).pos_factors == (4, 256)
    paper = config_for("image", "imagenet64-paper")
    assert 145e6 < matmul_parameters(paper) < 160e6  # the paper's 152M
    with pytest.raises(ValueError, match="unknown config"):
        config_for("image", "huge")
    with pytest.raises(ValueError, match="kind"):
        config_for("video", "tiny")
    with pytest.raises(ValueError, match="12288"):
        config_for("image", "tiny", seq_len=100)


@pytest.mark.parametrize("bad", [torch.zeros(2, 10), torch.zeros(10, dtype=torch.int64), torch.full((1, 10), 256),
                                 torch.full((1, 10), -1), torch.zeros(1, 161, dtype=torch.long), [[1, 2]]])
def test_bad_tokens_are_refused(bad):
    model = SparseTransformer(small_config())
    with pytest.raises(ValueError, match="token"):
        model(bad)


def test_flops_count_matmuls_and_computed_attention_blocks():
    cfg = config_for("image", "small")
    p = matmul_parameters(cfg)
    model = SparseTransformer(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert p == linear
    scores = attention_scores(cfg)
    dense_causal = cfg.n_layers * cfg.seq_len * (cfg.seq_len + 1) / 2
    assert scores < 0.05 * dense_causal  # sparse: a few percent of dense
    assert training_flops_per_sequence(cfg) == 6 * p * 12288 + 12 * cfg.d_model * scores
    assert dataclasses.replace(cfg, pattern="all").layer_kind(0) == "all"


def test_an_offset_moves_only_the_position_embedding_and_is_checked():
    torch.manual_seed(0)
    model = SparseTransformer(config_for("audio", "tiny", seq_len=1024)).eval()
    torch.nn.init.normal_(model.head.weight)  # zero at initialisation
    tokens = torch.randint(0, 256, (2, 64))
    shift = model.position_embedding(torch.arange(256, 320)) - model.position_embedding(torch.arange(64))
    assert torch.allclose(model.embed(tokens, 256), model.embed(tokens) + shift)
    assert not torch.allclose(model(tokens, offset=256), model(tokens))
    for bad in (-1, 1024 - 63, 2.0, True):
        with pytest.raises(ValueError, match="offset must be an int"):
            model(tokens, offset=bad)


def lag_reference(model: SparseTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Position t's lag input by the definition: sum_k lag[:, k] * value(tokens[t - 1 - k]), one term at a time."""
    B, N = tokens.shape
    out = torch.zeros(B, N, model.cfg.d_model)
    for t in range(N):
        for k in range(min(model.cfg.lag_inputs, t)):
            out[:, t] += model.lag[:, k] * model.token_value[tokens[:, t - 1 - k]][:, None]
    return out


@pytest.mark.parametrize("values", ["linear", "mu_law"])
def test_lag_inputs_add_a_linear_map_of_the_previous_tokens_values(values):
    torch.manual_seed(0)
    model = random_head(SparseTransformer(small_config(lag_inputs=12, token_values=values))).eval()
    assert not model.lag.any()  # zero at initialisation
    torch.nn.init.normal_(model.lag)
    if values == "mu_law":  # the decoded 8-bit mu-law amplitudes: -1 and 1 at the ends, odd around the middle
        assert model.token_value[0] == -1 and model.token_value[255] == 1
        torch.testing.assert_close(model.token_value[128:], -model.token_value[:128].flip(0))
    else:
        torch.testing.assert_close(model.token_value, torch.linspace(-1, 1, 256))
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model.lag_input(tokens), lag_reference(model, tokens), atol=1e-5, rtol=1e-5)
        no_lag = dataclasses.replace(model.cfg, lag_inputs=0, token_values="linear")
        plain = SparseTransformer(no_lag).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lag"})
        torch.testing.assert_close(model.embed(tokens), plain.embed(tokens) + lag_reference(model, tokens),
                                   atol=1e-5, rtol=1e-5)
    base = model(tokens)
    for t in (0, 5, 39):  # causal: token t moves logits after t only, and the next one through the lag inputs too
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 101) % 256
        out = model(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), t
        if t + 1 < 40:
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().amax() > 0, t
    window = model.lag_input(tokens[:, 20:])  # a window starts without the tokens before it
    torch.testing.assert_close(window, lag_reference(model, tokens[:, 20:]), atol=1e-5, rtol=1e-5)


def test_a_model_given_lag_inputs_computes_the_same_function_and_learns_them():
    torch.manual_seed(0)
    model = random_head(SparseTransformer(small_config())).eval()
    grown = model.with_lag_inputs(16, "mu_law").eval()
    assert grown.cfg == dataclasses.replace(model.cfg, lag_inputs=16, token_values="mu_law")
    tokens = torch.randint(0, 256, (2, 160))
    torch.testing.assert_close(grown(tokens), model(tokens), atol=0, rtol=0)
    F.cross_entropy(grown.train()(tokens).flatten(0, 1), tokens.flatten()).backward()
    assert grown.lag.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="already has 16 lag inputs"):
        grown.with_lag_inputs(8, "linear")
    deeper = grown.deepened(3)  # deepening keeps them
    assert deeper.cfg.lag_inputs == 16 and torch.equal(deeper.lag, grown.lag)


@pytest.mark.parametrize("bad, message", [
    (dict(lag_inputs=-1), "lag_inputs must be an integer in"), (dict(lag_inputs=1025), "lag_inputs"),
    (dict(lag_inputs=2.0), "lag_inputs"), (dict(lag_inputs=4, token_values="ulaw"), "token_values must be one of"),
    (dict(lag_inputs=4, token_values="mu_law", vocab=512, pos_factors=(10, 16)), "needs vocab 256"),
    (dict(token_values="mu_law"), "only applies with lag_inputs"),
])
def test_bad_lag_inputs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        small_config(**bad)


def test_lag_inputs_are_in_the_card_and_the_flops_only_when_present():
    cfg = small_config(lag_inputs=8, token_values="mu_law")
    d = cfg.to_dict()
    assert d["lag_inputs"] == 8 and d["token_values"] == "mu_law" and ModelConfig.from_dict(d) == cfg
    assert "lag_inputs" not in small_config().to_dict() and "token_values" not in small_config().to_dict()
    plain = small_config()
    assert matmul_parameters(cfg) == matmul_parameters(plain) + 8 * 64
    assert training_flops_per_sequence(cfg) == training_flops_per_sequence(plain) + 4 * 8 * 64 * 160
