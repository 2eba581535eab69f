"""The sampling distribution of a language model, shared by the sampler and the policy.

The sampler draws tokens from, and the policy recomputes log-probs under, the *same* processed
distribution: ``softmax(filter(logits / temperature))`` with top-k then top-p (nucleus) filtering,
as in transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper``.
Keeping one function for both is what keeps the importance ratio at 1 before the first update
(a mismatch shows up as a negative KL).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["SamplingSettings", "process_logits", "token_log_probs", "action_mask_meta", "top_p_keep", "apply_action_mask"]


class SamplingSettings:
    """Temperature, top-k and top-p, read from a rollout's ``meta`` (defaults: untouched softmax)."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "SamplingSettings":
        return cls(meta.get("temperature", 1.0), meta.get("top_k", 0), meta.get("top_p", 1.0))

    def as_meta(self) -> dict[str, float | int]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


def process_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Logits ``[..., V]`` of the processed distribution (float32; filtered entries are ``-inf``).

    Order as in transformers' ``generate``: temperature, then top-k, then top-p. Top-p keeps the
    smallest set of most likely tokens whose probability reaches ``top_p`` (at least one token).
    """
    logits = logits.float()
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    vocab = logits.shape[-1]
    if 0 < settings.top_k < vocab:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False, stable=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1.0 - settings.top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Log-probs ``[...]`` of ``tokens [...]`` under the processed distribution of ``logits [..., V]``."""
    logp = process_logits(logits, settings).log_softmax(dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------ NLPO's action mask
def action_mask_meta(meta: Mapping[str, Any]) -> tuple[float, int] | None:
    """``(top_p, min_tokens)`` of NLPO's action mask recorded in a rollout's ``meta``, or None."""
    if "nlpo_top_p" not in meta:
        return None
    return float(meta["nlpo_top_p"]), int(meta.get("nlpo_min_tokens", 1))


def top_p_keep(mask_logits: torch.Tensor, top_p: float, min_tokens: int, always: int | None = None) -> torch.Tensor:
    """Bool ``[..., V]``: the tokens NLPO's masking policy allows.

    The smallest set of most likely tokens of ``softmax(mask_logits)`` whose probability reaches
    ``top_p``, at least ``min_tokens`` of them, plus token ``always`` (EOS), as in RL4LMs'
    ``learned_top_p`` mask.
    """
    sorted_logits, idx = torch.sort(mask_logits.float(), dim=-1, descending=True, stable=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
    remove[..., : max(1, min_tokens)] = False
    keep = ~remove.scatter(-1, idx, remove)
    if always is not None:
        keep[..., always] = True
    return keep


def apply_action_mask(processed: torch.Tensor, mask_logits: torch.Tensor, top_p: float, min_tokens: int,
                      always: int | None = None) -> torch.Tensor:
    """NLPO's masked policy: the processed logits with tokens outside :func:`top_p_keep` set to
    ``-inf``. A row whose support would become empty keeps its processed logits."""
    keep = top_p_keep(mask_logits, top_p, min_tokens, always)
    masked = processed.masked_fill(~keep, float("-inf"))
    empty = torch.isinf(masked).all(dim=-1, keepdim=True)
    return torch.where(empty, processed, masked)
