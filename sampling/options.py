"""The sampling rule: temperature, top-k and top-p, and the token each uniform draw picks.

sampling/compiled_step.c applies the same rule in C (sample_row); tests/test_compiled_step.py and
tests/test_sampler.py check that both pick the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 = greedy; top_k keeps the k likeliest tokens; top_p the smallest set with mass >= p.
    Checked once, here: everything downstream takes a SamplingOptions."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None (off), got {self.top_k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None (off), got {p!r}")


def choose_tokens(logits: torch.Tensor, uniforms: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """logits [B, V], uniforms [B] in [0, 1) -> tokens [B] int64 (inverse CDF of the filtered distribution)."""
    if options.temperature == 0:
        return logits.argmax(-1)
    if options.temperature != 1:
        logits = logits / options.temperature
    if options.top_k is not None and options.top_k < logits.shape[-1]:
        kth = logits.topk(options.top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    # unnormalised probabilities (the inverse CDF below scales by the total); not torch.softmax, whose
    # parallel loop at batch 8 wakes torch's thread pool, which then spins on the cores the compiled step uses
    probs = (logits - logits.amax(-1, keepdim=True)).exp_()
    if options.top_p is not None and options.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the likelier tokens
        keep = before < options.top_p * sorted_p.sum(-1, keepdim=True)
        probs = probs * torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, keep)
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def card_defaults(card: dict | None) -> SamplingOptions:
    """The sampling defaults a model card holds ("sampling": temperature, top_k, top_p, chosen by
    bench/sampling_sweep.py), or SamplingOptions() (temperature 1, no filter) for a card without them.
    ValueError naming the card's field when its values are not valid options."""
    field = (card or {}).get("sampling")
    if field is None:
        return SamplingOptions()
    if not isinstance(field, dict):
        raise ValueError(f"the model card's 'sampling' must be an object, got {type(field).__name__}")
    try:
        return SamplingOptions(field.get("temperature", 1.0), field.get("top_k"), field.get("top_p"))
    except ValueError as e:
        raise ValueError(f"the model card's sampling defaults are invalid: {e}") from None


def resolve_options(card: dict | None, temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None) -> SamplingOptions:
    """The options a user asked for, each value not given (None) taken from the card's defaults
    (:func:`card_defaults`). top_k 0 and top_p 1 turn a filter off whatever the card says; the result holds
    None for a filter that is off. ValueError for a bad value."""
    defaults = card_defaults(card)
    options = SamplingOptions(defaults.temperature if temperature is None else temperature,
                              defaults.top_k if top_k is None else (top_k or None),
                              defaults.top_p if top_p is None else top_p)
    if options.top_p == 1:
        options = SamplingOptions(options.temperature, options.top_k, None)
    return options
