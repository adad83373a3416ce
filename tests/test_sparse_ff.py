"""Block-sparse feed-forward layers (models/sparse_ff.py) and pruning (models/prune.py): config and cards,
save/load, both decoding steps against the full forward pass, FLOP accounting, training, bad options."""

import json

import pytest
import torch
from helpers import needs_compiler, small_model
from safetensors import safe_open

from models import CheckpointError, ModelConfig, SparseTransformer, codec_card, load_model, save_model
from models.flops import matmul_parameters, training_flops_per_sequence
from models.prune import main as prune_main
from models.prune import prune_model
from models.sparse_ff import decode_layout, encode_layout
from sampling import Decoder
from sampling.compiled_step import CompiledStep

WIDE = dict(ff_layout="random", ff_mult=8, ff_density=0.5, ff_block=16)
SPARSE = {"random-wide-b16": WIDE,
          "banded-b32-layer1": dict(ff_layout="banded", ff_density=0.5, ff_block=32, ff_layers=(1,)),
          "random-b64": dict(ff_layout="random", ff_density=0.25, ff_block=64, ff_seed=3)}


def perturbed(model: SparseTransformer) -> SparseTransformer:
    """Non-trivial weights everywhere (a fresh model's output projections are tiny)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_dense_configs_and_cards_are_unchanged_and_sparse_ones_round_trip():
    dense = ModelConfig()
    assert not any(k.startswith("ff_") and k != "ff_mult" for k in dense.to_dict())
    assert ModelConfig.from_dict(dense.to_dict()) == dense
    sparse = small_model(**WIDE).cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(sparse.to_dict()))) == sparse
    assert sparse.ff_width == 512 and sparse.sparse_ff_layers == (0, 1)
    fc, proj = sparse.ff_layouts(0)
    assert fc.shape == (4, 32) and proj.shape == (32, 4) and fc.sum() == 64 and proj.sum() == 64
    assert not torch.equal(fc, sparse.ff_layouts(1)[0])  # each layer and matrix has its own seed
    assert small_model(**SPARSE["banded-b32-layer1"]).cfg.ff_layouts(0) is None


def test_layouts_encode_to_hex_and_back():
    layout = torch.rand(6, 13, generator=torch.Generator().manual_seed(0)) < 0.3
    layout[0, 0] = True
    assert torch.equal(decode_layout(encode_layout(layout), (6, 13)), layout)
    with pytest.raises(ValueError, match="hex digits"):
        decode_layout("zz", (2, 2))
    with pytest.raises(ValueError, match="at least one block"):
        decode_layout("00", (2, 2))


@pytest.mark.parametrize("bad, match", [
    (dict(ff_layout="lottery"), "ff_layout must be one of"),
    (dict(ff_density=0.5), "only apply to sparse feed-forward layers"),
    (dict(ff_layout="random", ff_density=0.0), "ff_density must be a number in \\(0, 1\\]"),
    (dict(ff_layout="random", ff_density=1.5), "ff_density must be a number in \\(0, 1\\]"),
    (dict(ff_layout="random", ff_block=24), "ff_block must be one of"),
    (dict(ff_layout="random", ff_block=64, d_model=96, n_heads=3), "dividing d_model"),
    (dict(ff_layout="random", ff_layers=(2,)), "ff_layers must be increasing layer numbers in \\[0, 2\\)"),
    (dict(ff_layout="random", ff_layers=(1, 0)), "ff_layers must be increasing"),
    (dict(ff_layout="random", ff_seed=-1), "ff_seed must be an integer"),
    (dict(ff_layout="random", ff_masks=("ff",)), "ff_masks must hold 0 layouts"),
    (dict(ff_layout="pruned"), "ff_masks must hold 4 layouts"),
    (dict(ff_layout="pruned", ff_masks=("ff",) * 4), "layout of 2x8 blocks must be 4 hex digits"),
])
def test_bad_sparse_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        small_model(**bad)


def test_same_parameters_and_flops_as_dense_and_only_listed_blocks_count():
    dense, wide = small_model().cfg, small_model(**WIDE).cfg
    assert matmul_parameters(wide) == matmul_parameters(dense)
    assert training_flops_per_sequence(wide) == training_flops_per_sequence(dense)
    model = small_model(**SPARSE["banded-b32-layer1"])
    fc, proj = model.cfg.ff_layouts(1)
    d = model.cfg.d_model
    listed = (int(fc.sum()) + int(proj.sum())) * 32**2
    assert matmul_parameters(model.cfg) == matmul_parameters(dense) - 2 * 4 * d * d + listed
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2
                  and "emb" not in n)
    assert matmul_parameters(model.cfg) == weights  # the weights that exist are the ones counted


def test_save_load_round_trip_keeps_the_layouts_and_refuses_others(tmp_path):
    model = perturbed(small_model(**WIDE)).eval()
    save_model(model, tmp_path / "m", {"codec": codec_card("audio")})
    loaded = load_model(tmp_path / "m")
    tokens = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(tokens), model(tokens))
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        layout = f.get_tensor("blocks.0.ff.fc.layout")
    assert layout.dtype == torch.uint8 and torch.equal(layout.bool(), model.cfg.ff_layouts(0)[0])
    assert loaded.card["config"]["ff_layout"] == "random" and loaded.card["config"]["ff_seed"] == 0
    with torch.no_grad():  # weights whose layout is not the recipe's
        model.blocks[0].ff.fc.layout.copy_(1 - model.blocks[0].ff.fc.layout)
    save_model(model, tmp_path / "bad", {"codec": codec_card("audio")})
    with pytest.raises(CheckpointError, match="other block layouts than the config builds"):
        load_model(tmp_path / "bad")


STEPS = [pytest.param("compiled", marks=needs_compiler), "pytorch"]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("kw", SPARSE.values(), ids=SPARSE.keys())
def test_decoding_equals_the_full_forward(kw, step):
    model = perturbed(small_model(**kw)).eval()
    tokens = torch.randint(0, 256, (3, 120), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    decoder = Decoder(model, 3, 120, step=step, cache_dtype=torch.float32)  # the exact caches
    assert isinstance(decoder.step, CompiledStep) == (step == "compiled")
    decoder.prefill(tokens[:, :37])
    for pos in range(37, 120):
        torch.testing.assert_close(decoder.step(tokens, pos), full[:, pos], rtol=1e-5, atol=5e-5)


@needs_compiler
def test_the_compiled_step_refuses_blocks_of_8():
    model = small_model(ff_layout="random", ff_density=0.5, ff_block=8)
    with pytest.raises(ValueError, match="multiples of 16 \\(ff_block=8\\)"):
        Decoder(model, 1, 40, step="compiled")
    assert not isinstance(Decoder(model, 1, 40).step, CompiledStep)


def test_pruning_at_density_1_keeps_the_function_and_lower_densities_keep_the_largest_blocks():
    dense = perturbed(small_model()).eval()
    tokens = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(2))
    same = prune_model(dense, 1.0, block=16)
    assert same.cfg.ff_layout == "pruned" and same.cfg.ff_layers == ()
    torch.testing.assert_close(same(tokens), dense(tokens), rtol=1e-5, atol=1e-5)
    half = prune_model(dense, 0.5, block=16, layers=[1])
    assert half.cfg.sparse_ff_layers == (1,) and half.cfg.ff_layouts(0) is None
    w = dense.blocks[1].ff.fc.weight.t()
    norms = w.reshape(4, 16, 16, 16).square().sum((1, 3))
    kept = half.cfg.ff_layouts(1)[0]
    assert kept.sum() == 32 and norms[kept].min() >= norms[~kept].max()
    assert torch.equal(half.blocks[1].ff.fc.dense_weight(), w * kept.repeat_interleave(16, 0).repeat_interleave(16, 1))
    assert torch.equal(half.blocks[0].ff.fc.weight, dense.blocks[0].ff.fc.weight)
    with pytest.raises(ValueError, match="only a dense model can be pruned"):
        prune_model(half, 0.5)
    for bad, match in ((dict(density=0), "density must be"), (dict(density=0.5, block=12), "block must be one of"),
                       (dict(density=0.5, layers=[2]), "layers must be increasing")):
        with pytest.raises(ValueError, match=match):
            prune_model(dense, **bad)


def test_prune_cli_writes_a_checkpoint_whose_card_says_where_it_came_from(tmp_path, capsys):
    model = perturbed(small_model())
    save_model(model, tmp_path / "src", {"codec": codec_card("audio"), "steps": 5, "held_out_bits_per_dim": 7.5,
                                         "training_history": [{"steps": 5}]})
    assert prune_main([str(tmp_path / "src"), str(tmp_path / "out"), "--density", "0.25", "--block", "16"]) == 0
    pruned = load_model(tmp_path / "out")
    card, src_card = pruned.card, json.loads((tmp_path / "src.json").read_text())
    assert card["pruned"]["source_sha256"] == src_card["weights"]["sha256"]
    assert card["pruned"] | {"source": None} == {
        "source": None, "source_sha256": src_card["weights"]["sha256"], "density": 0.25, "block": 16,
        "layers": [0, 1], "method": "block magnitude (Frobenius norm), fc and proj",
        "source_held_out_bits_per_dim": 7.5}
    assert card["steps"] == 5 and "held_out_bits_per_dim" not in card and card["training_history"][0] == {"steps": 5}
    assert card["parameters"] < src_card["parameters"]
    decoder = Decoder(pruned, 1, 20)  # samples like any model
    decoder.step(torch.zeros(1, 0, dtype=torch.long), 0)
    assert prune_main([str(tmp_path / "src"), str(tmp_path / "src"), "--density", "0.5"]) == 2
    assert prune_main([str(tmp_path / "src"), str(tmp_path / "x"), "--density", "2"]) == 2
    assert "density must be a number in (0, 1]" in capsys.readouterr().err


def test_sparse_model_trains_and_decays_its_block_weights():
    from training.optim import make_optimizer

    model = small_model(**WIDE).train()
    optimizer = make_optimizer(model, 1e-2, 0.1)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    assert id(model.blocks[0].ff.fc.weight) in decayed
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(tokens).float().transpose(1, 2), tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model.blocks[0].ff.fc.weight.grad.abs().sum() > 0 and losses[-1] < losses[0]


def test_train_py_trains_a_sparse_wide_model_and_fine_tunes_a_pruned_one(tmp_path, capsys):
    import numpy as np

    import train
    from data import write_imagenet64_npz

    imgs = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    write_imagenet64_npz(tmp_path / "Imagenet64_train_part1.npz", imgs[:4], list(range(4)))
    write_imagenet64_npz(tmp_path / "val_data.npz", imgs[4:], [0, 1])
    common = ["image", "--data", str(tmp_path), "--batch-size", "2", "--peak-tflops", "1", "--quiet",
              "--eval-every", "0", "--eval-items", "2", "--precision", "fp32", "--checkpoints", str(tmp_path / "ck")]
    wide = [*common, "--out", str(tmp_path / "wide"), "--config", "tiny", "--ff-mult", "8", "--ff-layout", "random",
            "--ff-density", "0.5", "--ff-block", "16", "--steps", "2", "--export", "wide"]
    assert train.main(wide) == 0
    model = load_model(tmp_path / "ck" / "wide")
    assert model.cfg.ff_layout == "random" and model.cfg.ff_width == 8 * model.cfg.d_model
    dense = SparseTransformer(ModelConfig.from_dict({**model.card["config"], "ff_mult": 4, "ff_layout": "dense",
                                                     "ff_density": 1.0, "ff_block": 32}))
    assert model.card["compute_pf_days"] == pytest.approx(
        training_flops_per_sequence(dense.cfg) * 2 * 2 / 86400e15)  # 2 steps of 2 sequences, as dense FLOPs
    save_model(prune_model(dense, 0.5, block=16), tmp_path / "ck" / "pruned", {"codec": codec_card("image")})
    tune = [*common, "--out", str(tmp_path / "tune"), "--init", str(tmp_path / "ck" / "pruned"), "--steps", "1",
            "--export", "tuned"]
    assert train.main(tune) == 0
    tuned = load_model(tmp_path / "ck" / "tuned")
    assert tuned.cfg == load_model(tmp_path / "ck" / "pruned").cfg
    assert train.main([*common, "--out", str(tmp_path / "bad"), "--config", "tiny", "--ff-layers", "x"]) == 2
    assert "--ff-layers must be comma-separated" in capsys.readouterr().err
    assert train.main([*common, "--out", str(tmp_path / "bad"), "--config", "tiny", "--ff-density", "0.5"]) == 2
    assert "only apply to sparse feed-forward layers" in capsys.readouterr().err


@pytest.mark.parametrize("compiled", [True, False])
def test_sparse_layer_under_cpu_autocast_returns_bf16_and_computes_in_float32_where_compiled(monkeypatch, compiled):
    """Where float32 runs in compiled C the layer computes in float32 (faster there than the bf16 schedule)
    and casts; elsewhere it computes in bf16 as nn.Linear would. Either way the result is bf16."""
    import kernels.blocksparse_cpu as cpu

    monkeypatch.setattr(cpu, "compiled_for", lambda block: compiled)
    layer = small_model(**WIDE).blocks[0].ff.fc
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    seen = []
    cls = type(layer.mm)
    call = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda mm, a, w, **k: seen.append(a.dtype) or call(mm, a, w, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and seen == [torch.float32 if compiled else torch.bfloat16]
    want = x @ layer.dense_weight().float() + layer.bias
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)
