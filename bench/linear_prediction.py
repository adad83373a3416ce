"""How well linear prediction codes the audio data: the baseline that motivated the lag inputs.

Run: ``python -m bench.linear_prediction --data /work/datasets/audio12k/audio [--orders 32,128,256]
[--fit-clips 24] [--clips 16]``. Prints a table; the LAST line printed is one line of JSON.

Each 8-bit mu-law sample is predicted from the previous P samples' amplitudes (decoded, linear), and coded with a
Laplace distribution around the prediction, discretised over the mu-law cells (each code's interval of amplitudes,
halfway to its neighbours), at the clip's mean absolute error: bits per byte over ``--clips`` validation clips of
65,536 samples, evenly spread. Two predictors per order P:
- fixed: one set of P weights, least squares over ``--fit-clips`` training clips (a model could learn it);
- per clip: least squares on the clip itself (an oracle: it sees the clip it codes).
The first P samples of each clip are not coded.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench.common import fmt, print_table, spread
from data.loader import open_dataset
from media.audio import AUDIO_TOKENS, mu_law_decode

LEVELS = mu_law_decode(np.arange(256, dtype=np.uint8)).astype(np.float64)  # increasing with the code
EDGES = np.concatenate([[-np.inf], (LEVELS[1:] + LEVELS[:-1]) / 2, [np.inf]])  # code c: [EDGES[c], EDGES[c + 1])


def lagged(x: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """x [T] -> (X [T - order, order] with X[t, k] = x[order + t - 1 - k], y [T - order] = x[order:])."""
    return np.stack([x[order - 1 - k: len(x) - 1 - k] for k in range(order)], 1), x[order:]


def laplace_bits(codes: np.ndarray, prediction: np.ndarray) -> float:
    """Mean bits of codes [n] (uint8 mu-law) under Laplace(prediction, b) over the mu-law cells, b the mean error."""
    codes = codes.astype(np.int64)  # codes + 1 must not wrap at 255
    b = max(float(np.mean(np.abs(LEVELS[codes] - prediction))), 1e-6)

    def cdf(t: np.ndarray) -> np.ndarray:
        return np.where(t < 0, 0.5 * np.exp(np.minimum(t, 0) / b), 1 - 0.5 * np.exp(-np.maximum(t, 0) / b))

    p = cdf(EDGES[codes + 1] - prediction) - cdf(EDGES[codes] - prediction)
    return float(-np.log2(np.maximum(p, 1e-300)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="an audio dataset (data/README.md)")
    ap.add_argument("--orders", default="32,128,256", help="comma-separated predictor orders P (default 32,128,256)")
    ap.add_argument("--fit-clips", type=int, default=24, help="training clips the fixed predictors are fitted on")
    ap.add_argument("--clips", type=int, default=16, help="validation clips coded")
    a = ap.parse_args()
    try:
        orders = [int(p) for p in a.orders.split(",")]
    except ValueError:
        ap.error(f"--orders must be comma-separated integers, got {a.orders!r}")
    if any(not 1 <= p <= 4096 for p in orders) or a.fit_clips < 1 or a.clips < 1:
        ap.error("--orders must be in [1, 4096], --fit-clips and --clips >= 1")
    train = open_dataset("audio", a.data, "train", seq_len=AUDIO_TOKENS)
    val = open_dataset("audio", a.data, "val", seq_len=AUDIO_TOKENS)
    if not len(train) or not len(val):
        raise SystemExit(f"bench/linear_prediction.py: {a.data} needs training and validation clips")
    fit = [LEVELS[np.asarray(train[i], dtype=np.uint8)] for i in spread(len(train), min(a.fit_clips, len(train)))]
    clips = [np.asarray(val[i], dtype=np.uint8) for i in spread(len(val), min(a.clips, len(val)))]
    rows, results = [], []
    for order in orders:
        gram, rhs = np.zeros((order, order)), np.zeros(order)
        for x in fit:
            X, y = lagged(x, order)
            gram += X.T @ X
            rhs += X.T @ y
        weights = np.linalg.solve(gram + 1e-9 * np.eye(order), rhs)
        fixed, own = [], []
        for codes in clips:
            X, _ = lagged(LEVELS[codes], order)
            fixed.append(laplace_bits(codes[order:], X @ weights))
            own.append(laplace_bits(codes[order:], X @ np.linalg.lstsq(X, LEVELS[codes[order:]], rcond=None)[0]))
        results.append({"order": order, "fixed": float(np.mean(fixed)), "per_clip": float(np.mean(own))})
        rows.append([str(order), fmt(results[-1]["fixed"], ".3f"), fmt(results[-1]["per_clip"], ".3f")])
    print_table(f"linear prediction of {len(clips)} validation clips of {a.data} (fixed: fitted on {len(fit)} "
                "training clips)", ["order", "fixed, bits/byte", "per clip (oracle), bits/byte"], rows)
    print(json.dumps({"data": a.data, "clips": len(clips), "fit_clips": len(fit), "results": results}))


if __name__ == "__main__":
    main()
