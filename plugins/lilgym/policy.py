"""``lilgym_cnn``: a factorised categorical policy over lilGym's actions, from the image and the
sentence.

Network (in the spirit of lilGym's C3+BERT baseline): a 3-layer CNN over the 50x190 observation,
a transformers sentence encoder (any folder that ``AutoModel`` loads, e.g. ``assets/tiny-gpt2``;
mean-pooled hidden states, frozen by default), an embedding of the target truth value, an MLP over
their concatenation, and heads for the action factors plus a value head.

The action distribution factorises as lilGym's baselines do: first the action *type* (STOP, ADD,
REMOVE), then the *position* (tower: the box; scatter: one of the 19x5 cells), then the
*attributes* (tower ADD: colour; scatter ADD: shape, colour, size)::

    pi(a) = p(type) * p(position | type) * p(attr_1 | type, position) * ...

Each factor is a softmax over the choices that still lead to a valid action (the action mask
applied level by level), so invalid actions have probability 0, and the same masks are applied at
sampling and when the update recomputes log-probs. The full ``[n_actions]`` table of log-probs is
computed in one pass, which gives exact log-probs and the exact entropy.

Rollout tensors it reads (written by the ``lilgym`` sampler): ``images [B, T, 50, 190, 3]``
uint8, ``action_masks [B, T, A]`` bool, ``actions [B, T]`` long, ``sentence_ids [B, L]``,
``sentence_mask [B, L]``, ``target [B]``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from polyrl.types import ConfigError, Policy, Rollout

from .actions import GRID_X, GRID_Y, NUM_ACTIONS

__all__ = ["LilGymCNNConfig", "LilGymCNNPolicy", "action_log_prob_table", "LAYOUTS"]

NEG = -1e9
"""Logit of a masked choice (finite, so that fully masked rows stay finite and gradients clean)."""

LAYOUTS = {
    # (ADD factor sizes, REMOVE factor sizes); flat index = [STOP] + ADD (row-major) + REMOVE
    "tower": ((3, 3), (3,)),
    "scatter": ((GRID_X * GRID_Y, 3, 3, 3), (GRID_X * GRID_Y,)),
}
"""The factor sizes of each action type per appearance (position first, then attributes)."""


@dataclass
class LilGymCNNConfig:
    """Settings of the lilGym CNN + sentence-encoder policy."""

    appearance: Literal["tower", "scatter"] = "tower"
    """Which action set the policy acts in: tower (13 actions) or scatter (2661)."""
    sentence_encoder: str = "assets/tiny-gpt2"
    """The transformers model (loaded with AutoModel/AutoTokenizer) that encodes the sentence: a local
    folder, or a Hub id such as 'bert-base-uncased' (lilGym's C3+BERT baseline; downloaded on first use)."""
    train_encoder: bool = False
    """Fine-tune the sentence encoder too (False: frozen, as the C3+BERT baseline)."""
    max_sentence_tokens: int = 64
    """Sentences are cut to this many tokens."""
    channels: list[int] = field(default_factory=lambda: [16, 32, 32])
    """Output channels of the three convolution layers."""
    hidden: int = 128
    """Width of the fused MLP."""
    value_head: bool = True
    """Add a value head (needed by ppo)."""
    initial_stop_logit: float = 0.0
    """Initial bias of STOP in the action-type head (ADD and REMOVE start at 0); negative values make
    early episodes explore longer before stopping."""

    def check(self) -> None:
        if len(self.channels) != 3 or any(c < 1 for c in self.channels):
            raise ConfigError(f"policy.channels: expected three positive integers, got {self.channels}")
        if self.hidden < 1:
            raise ConfigError(f"policy.hidden must be >= 1, got {self.hidden}")
        if self.max_sentence_tokens < 4:
            raise ConfigError(f"policy.max_sentence_tokens must be >= 4, got {self.max_sentence_tokens}")
        from polyrl.paths import resolve_path

        path = Path(resolve_path(self.sentence_encoder))
        if (path / "config.json").is_file():
            return
        owner = self.sentence_encoder.split("/")[0]
        if path.exists() or not _HUB_ID.fullmatch(self.sentence_encoder) or (
                "/" in self.sentence_encoder and Path(resolve_path(owner)).is_dir()):  # a local folder's path
            raise ConfigError(
                f"policy.sentence_encoder: {self.sentence_encoder!r} is neither a transformers model folder (with "
                "config.json) nor a Hub id; accepted: a local folder such as 'assets/tiny-gpt2', any encoder saved "
                "with save_pretrained, or a Hub id such as 'bert-base-uncased' or 'org/name'"
            )


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
"""A Hugging Face Hub model id: ``name`` or ``owner/name``."""


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.masked_fill(~mask, NEG), dim=-1)


def action_log_prob_table(
    type_logits: torch.Tensor,
    add_logits: Sequence[torch.Tensor],
    remove_logits: Sequence[torch.Tensor],
    mask: torch.Tensor,
    layout: tuple[tuple[int, ...], tuple[int, ...]],
) -> torch.Tensor:
    """``[N, A]`` log-probs of every flat action under the factorised, masked distribution.

    ``type_logits [N, 3]``; ``add_logits[i] [N, n_i]`` and ``remove_logits[i]`` for the factors
    of ADD and REMOVE (``layout``); ``mask [N, A]`` bool. Each factor is normalised over the
    choices under which some valid action remains. Invalid actions get about ``-1e9``.
    """
    n = mask.shape[0]
    add_dims, rem_dims = layout
    n_add = 1
    for d in add_dims:
        n_add *= d
    stop_m = mask[:, :1]
    add_m = mask[:, 1 : 1 + n_add].reshape(n, *add_dims)
    rem_m = mask[:, 1 + n_add :].reshape(n, *rem_dims)
    type_mask = torch.stack([stop_m[:, 0], add_m.reshape(n, -1).any(-1), rem_m.reshape(n, -1).any(-1)], dim=-1)
    lp_type = _masked_log_softmax(type_logits, type_mask)  # [N, 3]

    def chain(logits: Sequence[torch.Tensor], m: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        total = torch.zeros(n, device=m.device, dtype=type_logits.dtype)
        for level, lg in enumerate(logits):
            # choices at this level that keep some valid completion, given the earlier choices
            m_level = m.reshape(n, *dims[: level + 1], -1).any(-1) if level + 1 < len(dims) else m
            view = [n] + [1] * level + [dims[level]]
            lp = _masked_log_softmax(lg.reshape(view).expand_as(m_level), m_level)
            total = total.unsqueeze(-1) + lp
        return total.reshape(n, -1)

    lp_add = chain(add_logits, add_m, add_dims) + lp_type[:, 1:2]
    lp_rem = chain(remove_logits, rem_m, rem_dims) + lp_type[:, 2:3]
    table = torch.cat([lp_type[:, :1], lp_add, lp_rem], dim=-1)
    return table.masked_fill(~mask, NEG)


class SentenceEncoder(nn.Module):
    """Mean-pooled hidden states of a transformers model (any AutoModel folder)."""

    def __init__(self, path: str, max_tokens: int, trainable: bool) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        from polyrl.paths import resolve_path

        folder = resolve_path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModel.from_pretrained(folder)
        self.max_tokens = max_tokens
        self.trainable = trainable
        self.dim = int(self.model.config.hidden_size)
        self.model.requires_grad_(trainable)
        if not trainable:
            self.model.eval()

    def tokenize(self, sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(sentences), padding="max_length", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"].bool()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx = torch.enable_grad() if self.trainable and torch.is_grad_enabled() else torch.no_grad()
        with ctx:
            if not self.trainable:
                self.model.eval()
            hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class LilGymCNNPolicy(Policy):
    """See the module documentation."""

    modality = "env"

    def __init__(self, cfg: LilGymCNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.appearance = cfg.appearance
        self.n_actions = NUM_ACTIONS[cfg.appearance]
        self.layout = LAYOUTS[cfg.appearance]
        self.has_value_head = cfg.value_head
        self.encoder = SentenceEncoder(cfg.sentence_encoder, cfg.max_sentence_tokens, cfg.train_encoder)
        c1, c2, c3 = cfg.channels
        self.cnn = nn.Sequential(
            nn.Conv2d(3, c1, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_img = self.cnn(torch.zeros(1, 3, 50, 190)).shape[-1]
        h = cfg.hidden
        self.image_proj = nn.Linear(n_img, h)
        self.sentence_proj = nn.Linear(self.encoder.dim, h)
        self.target_emb = nn.Embedding(2, h)
        self.trunk = nn.Sequential(nn.ReLU(), nn.Linear(3 * h, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        add_dims, rem_dims = self.layout
        self.type_head = nn.Linear(h, 3)
        with torch.no_grad():
            self.type_head.bias.zero_()
            self.type_head.bias[0] = cfg.initial_stop_logit
        self.add_heads = nn.ModuleList(nn.Linear(h, d) for d in add_dims)
        self.remove_heads = nn.ModuleList(nn.Linear(h, d) for d in rem_dims)
        self.value = nn.Linear(h, 1) if cfg.value_head else None

    # ------------------------------------------------------------------ pieces
    def tokenize(self, sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [N, L], mask [N, L])`` of sentences, as stored in rollouts."""
        return self.encoder.tokenize(sentences)

    def features(self, images: torch.Tensor, sentence: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` from ``images [N, 50, 190, 3]`` uint8, ``sentence [N, D]``, ``target [N]``."""
        x = images.to(self.device).permute(0, 3, 1, 2).float() / 255.0
        img = self.image_proj(self.cnn(x))
        fused = torch.cat([img, self.sentence_proj(sentence.to(self.device)), self.target_emb(target.to(self.device).long())], -1)
        return self.trunk(fused)

    def heads(self, h: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(log-prob table [N, A], values [N] or None)``."""
        table = action_log_prob_table(
            self.type_head(h), [m(h) for m in self.add_heads], [m(h) for m in self.remove_heads],
            masks.to(h.device).bool(), self.layout,
        )
        values = self.value(h).squeeze(-1) if self.value is not None else None
        return table, values

    @torch.no_grad()
    def act(self, images: torch.Tensor, masks: torch.Tensor, sentence: torch.Tensor, target: torch.Tensor,
            generator: torch.Generator, deterministic: bool = False,
            forced_stop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample actions for ``N`` states: ``(actions [N], log_probs [N])`` (CPU tensors).
        Rows where ``forced_stop [N]`` is True take STOP (action 0) with its log-prob."""
        table, _ = self.heads(self.features(images, sentence, target), masks)
        table = table.float().cpu()
        if deterministic:
            actions = table.argmax(-1)
        else:
            actions = torch.multinomial(table.exp(), 1, generator=generator).squeeze(-1)
        if forced_stop is not None:
            actions = actions.masked_fill(forced_stop.bool(), 0)
        return actions, table.gather(1, actions.unsqueeze(1)).squeeze(1)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids.to(self.device), mask.to(self.device))

    # ------------------------------------------------------------------ Policy API
    def forward(self, rollout: Rollout, steps: torch.Tensor | None = None, with_values: bool = False,
                with_entropy: bool = False):
        d = rollout.data
        b, t = rollout.mask.shape
        device = self.device
        if steps is None:
            steps = torch.arange(t).expand(b, t)
        steps = steps.to(device)
        k = steps.shape[1]
        valid = rollout.mask.to(device).gather(1, steps)  # only real steps go through the network
        rows, cols = valid.nonzero(as_tuple=True)
        at = steps[rows, cols]
        sentence = self.encode(d["sentence_ids"], d["sentence_mask"])  # [B, D]
        images = d["images"].to(device)[rows, at]
        masks = d["action_masks"].to(device)[rows, at]
        h = self.features(images, sentence[rows], d["target"].to(device)[rows])
        table, values = self.heads(h, masks)
        actions = d["actions"].to(device)[rows, at].long()
        logp = torch.zeros(b, k, device=device, dtype=table.dtype)
        logp = logp.index_put((rows, cols), table.gather(1, actions.unsqueeze(1)).squeeze(1))
        if not (with_values or with_entropy):
            return logp
        out = {"log_probs": logp}
        if with_values:
            if values is None:
                raise ValueError("this lilgym_cnn policy has no value head; set policy.value_head: true")
            out["values"] = torch.zeros(b, k, device=device, dtype=values.dtype).index_put((rows, cols), values)
        if with_entropy:
            p = table.exp()
            ent = -(p * table).masked_fill(~masks.bool(), 0.0).sum(-1)
            out["entropy"] = torch.zeros(b, k, device=device, dtype=ent.dtype).index_put((rows, cols), ent)
        return out

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.trainable_state_dict().items()}, str(out / "model.safetensors"))
        (out / "lilgym_policy.json").write_text(json.dumps({"policy": "lilgym_cnn", **_config_dict(self.cfg)}, indent=2))


def _config_dict(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)
