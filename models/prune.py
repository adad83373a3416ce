"""Prune a trained model's feed-forward layers to block-sparse ones by block magnitude.

Run: ``python -m models.prune SOURCE OUT --density 0.5 [--block 32] [--layers 0,1,2]``: reads checkpoint SOURCE
("checkpoints/image64"), keeps in each chosen layer's fc and proj the ``density`` share of ``block`` x ``block``
blocks with the largest Frobenius norm (kernels.blocksparse_layouts.from_dense), and writes checkpoint OUT with
its card. The card keeps the source's codec, data and training record, adds a ``pruned`` record (source, its
weights' SHA-256, density, block, layers) and a training_history entry, and drops the source's held-out figures
(they are not this model's: measure them with ``python -m bench.quality --checkpoint OUT``). A short fine-tune
is ``python train.py KIND --init OUT ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import torch

from kernels import BlockSparseMatMul, layout_from_dense

from .checkpoint import CheckpointError, checkpoint_paths, load_model, save_model
from .model import SparseTransformer
from .sparse_ff import FF_BLOCKS, encode_layout

# card fields of the source that describe the pruned model too (its held-out figures do not)
KEPT_CARD_FIELDS = ("codec", "data", "steps", "tokens_seen", "compute_pf_days", "training", "ema_decay")


@torch.no_grad()
def prune_model(model: SparseTransformer, density: float, block: int = 32,
                layers: Sequence[int] | None = None) -> SparseTransformer:
    """A copy of dense ``model`` whose feed-forward layers ``layers`` (default all) keep only the ``density``
    share of their ``block`` x ``block`` weight blocks, those of the largest norm; the rest of the weights
    are copied. At density 1 it computes what ``model`` does (up to rounding)."""
    if not isinstance(model, SparseTransformer):
        raise ValueError(f"model must be a SparseTransformer, got {type(model).__name__}")
    cfg = model.cfg
    if cfg.ff_layout != "dense":
        raise ValueError(f"only a dense model can be pruned; this one's feed-forward layers are already "
                         f"{cfg.ff_layout!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    if block not in FF_BLOCKS or cfg.d_model % block:
        raise ValueError(f"block must be one of {FF_BLOCKS} dividing d_model ({cfg.d_model}), got {block!r}")
    chosen = tuple(range(cfg.n_layers)) if layers is None else tuple(layers)
    if not chosen or any(isinstance(i, bool) or not isinstance(i, int) for i in chosen) \
            or list(chosen) != sorted(set(chosen)) or not 0 <= chosen[0] <= chosen[-1] < cfg.n_layers:
        raise ValueError(f"layers must be increasing layer numbers in [0, {cfg.n_layers}), got {layers!r}")
    dense_weights = {}  # (layer, matrix) -> W [in, out]
    masks = []
    for i in chosen:
        for name in ("fc", "proj"):
            w = getattr(model.blocks[i].ff, name).weight.t()
            dense_weights[i, name] = w
            masks.append(encode_layout(layout_from_dense(w, block, float(density))))
    new_cfg = dataclasses.replace(cfg, ff_layout="pruned", ff_density=float(density), ff_block=block,
                                  ff_layers=() if len(chosen) == cfg.n_layers else chosen, ff_masks=tuple(masks))
    param = next(model.parameters())
    pruned = SparseTransformer(new_cfg).to(param.device, param.dtype)
    own = pruned.state_dict()
    state = {k: v for k, v in model.state_dict().items() if k in own and own[k].shape == v.shape}
    for (i, name), w in dense_weights.items():
        layer = getattr(pruned.blocks[i].ff, name)
        state[f"blocks.{i}.ff.{name}.weight"] = BlockSparseMatMul(layer.mm.layout, block).from_dense(w)
        state[f"blocks.{i}.ff.{name}.layout"] = layer.layout
    pruned.load_state_dict(state)
    pruned.recompute, pruned.backend = model.recompute, model.backend
    return pruned.train(model.training)


def pruned_card(source_card: dict, source: str, density: float, block: int, layers: Sequence[int]) -> dict:
    """The pruned checkpoint's card (save_model adds config, parameters and weights)."""
    record = {"source": source, "source_sha256": source_card["weights"]["sha256"], "density": density,
              "block": block, "layers": list(layers), "method": "block magnitude (Frobenius norm), fc and proj",
              "source_held_out_bits_per_dim": source_card.get("held_out_bits_per_dim")}
    history = list(source_card.get("training_history") or [])
    return {**{k: source_card[k] for k in KEPT_CARD_FIELDS if k in source_card}, "pruned": record,
            "training_history": [*history, {"steps": 0, "pruned": record}]}


def _layer_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be comma-separated layer numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.prune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="checkpoint to prune (checkpoints/NAME)")
    p.add_argument("out", help="checkpoint to write (a path outside checkpoints/ unless it is to be shipped)")
    p.add_argument("--density", type=float, required=True, help="share of weight blocks kept, in (0, 1]")
    p.add_argument("--block", type=int, default=32, help=f"block size, one of {FF_BLOCKS} (default 32)")
    p.add_argument("--layers", type=_layer_list, help="comma-separated layers to prune (default all)")
    args = p.parse_args(argv)
    if checkpoint_paths(args.out)[0].resolve() == checkpoint_paths(args.source)[0].resolve():
        print("models.prune: error: OUT must differ from SOURCE", file=sys.stderr)
        return 2
    try:
        model = load_model(args.source)
        pruned = prune_model(model, args.density, args.block, args.layers)
        layers = args.layers or list(range(model.cfg.n_layers))
        card = pruned_card(model.card, str(args.source), args.density, args.block, layers)
        path = save_model(pruned, args.out, card)
    except (CheckpointError, ValueError) as e:
        print(f"models.prune: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {pruned.num_parameters():,} parameters (from {model.num_parameters():,}), "
          f"feed-forward density {args.density} in blocks of {args.block}, layers {layers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
