"""``generate``: batched ancestral sampling from a causal LM, recording token log-probs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from polyrl import ConfigError, Context, Rollout, Sampler

from .logits import SamplingSettings, apply_action_mask, process_logits
from .policy import CausalLMPolicy

__all__ = ["TextSamplerConfig", "TextSampler"]


@dataclass
class GenerationSettings:
    """The token distribution a text sampler draws from (shared by ``generate`` and ``vllm``)."""

    max_new_tokens: int = 24
    """Completion length in tokens (``T``); rows that emit EOS earlier are padded."""
    temperature: float = 1.0
    """Softmax temperature (> 0)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 turns top-k off."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1.0 turns it off."""

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampler.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"sampler.temperature must be > 0 (sampling is stochastic), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"sampler.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampler.top_p must be in (0, 1] (1 = off), got {self.top_p}")


@dataclass
class TextSamplerConfig(GenerationSettings):
    """Sampling settings; the policy recomputes log-probs under the same processed distribution."""

    batch_size: int = 32
    """Prompts generated together in one chunk (bounds memory; results do not depend on it
    beyond floating-point noise)."""
    stop_at_eos: bool = True
    """End a completion at the tokenizer's EOS token (the EOS itself is kept as a real action)."""
    reset_column: str | None = None
    """DR-PO's dataset reset: the prompt column (``Context.extra``, e.g. from a JSONL prompts
    file) holding a dataset response that continues the prompt. A sample that is reset starts
    with a random prefix of it (1 to length - 1 tokens, uniform), forced rather than sampled and
    masked out of the loss; the policy completes it. null: no resets."""
    reset_fraction: float = 1.0
    """Probability that a sample is reset to a dataset prefix (with ``reset_column``)."""

    def check(self) -> None:
        super().check()
        if self.batch_size < 1:
            raise ConfigError(f"sampler.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.reset_fraction <= 1.0:
            raise ConfigError(f"sampler.reset_fraction must be in [0, 1], got {self.reset_fraction}")
        if self.reset_column is not None and not self.reset_column:
            raise ConfigError("sampler.reset_column is empty; give a prompt column name or null")


class TextSampler(Sampler):
    """Samples completions of the contexts' prompts with a KV cache.

    ``sample`` returns a :class:`polyrl.Rollout` with

    * ``log_probs [B, T]``: log-prob of each sampled token under the processed distribution
      (temperature, top-k, top-p); 0 after EOS;
    * ``mask [B, T]``: True for real actions, the EOS token included; False after it;
    * ``data``: ``input_ids [B, P+T]`` (prompt left-padded to ``P`` tokens, then the completion,
      pad after EOS), ``attention_mask [B, P+T]`` (0 on padding), ``completion_ids [B, T]``;
    * ``outputs``: ``texts`` (decoded completions without special tokens) and ``completion_ids``
      (lists of the real completion token ids, EOS included);
    * ``meta``: ``temperature``, ``top_k``, ``top_p``, ``prompt_length`` (``P``).

    ``T`` is ``max_new_tokens``, or less when every row stopped earlier. Token ids go end to end:
    decoded text is never tokenised again.

    Two algorithm-specific distributions are sampled the same way the policy scores them:

    * NLPO: when the policy carries an action mask (``policy.set_action_mask``), each step samples
      from the policy restricted to the masking policy's top-p nucleus; ``meta`` records
      ``nlpo_top_p`` and ``nlpo_min_tokens`` so that training recomputes the masked log-probs.
    * DR-PO: with ``reset_column``, a sample starts with a forced prefix of a dataset response.
      Forced tokens are in ``input_ids`` and ``attention_mask`` (and in the texts that rewards
      read) but are not actions: ``mask`` is False and ``log_probs`` 0 there, and
      ``data["forced"] [B, T]`` marks them.
    """

    modality = "text"

    def __init__(self, config: TextSamplerConfig) -> None:
        self.config = config
        self.settings = SamplingSettings(config.temperature, config.top_k, config.top_p)

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def encode_prompts(policy: CausalLMPolicy, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and attention mask, both ``[B, P]`` (an empty prompt becomes BOS)."""
        tok = policy.tokenizer
        ids = tok(prompts)["input_ids"]
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids = [x if len(x) > 0 else [start] for x in ids]
        P = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), P), policy.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), P), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, P - len(x) :] = torch.tensor(x, dtype=torch.long)
            attention_mask[i, P - len(x) :] = 1
        return input_ids, attention_mask

    # ------------------------------------------------------------------ dataset resets (DR-PO)
    def reset_prefixes(
        self, policy: CausalLMPolicy, contexts: list[Context], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Forced prefix ids ``[B, F]`` and their lengths ``[B]`` (0: not reset), or None.

        A context is reset with probability ``reset_fraction``; its prefix length is uniform in
        ``[1, n - 1]`` for a response of ``n`` tokens (and below ``max_new_tokens``).
        """
        cfg = self.config
        if cfg.reset_column is None:
            return None
        tok = policy.tokenizer
        rows: list[list[int]] = []
        for c in contexts:
            if cfg.reset_column not in c.extra:
                raise ValueError(
                    f"sampler.reset_column={cfg.reset_column!r}: prompt {c.prompt!r} has no such column; "
                    f"its columns: {sorted(c.extra)}"
                )
            response = c.extra[cfg.reset_column]
            if not isinstance(response, str):
                raise ValueError(f"sampler.reset_column={cfg.reset_column!r}: expected a string, got {response!r}")
            ids = tok(response, add_special_tokens=False)["input_ids"]
            reset = torch.rand((), generator=generator).item() < cfg.reset_fraction
            longest = min(len(ids) - 1, cfg.max_new_tokens - 1)
            if reset and longest >= 1:
                h = int(torch.randint(1, longest + 1, (), generator=generator))
                rows.append(ids[:h])
            else:
                rows.append([])
        width = max(1, max(len(r) for r in rows))
        forced = torch.full((len(rows), width), policy.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            forced[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return forced, torch.tensor([len(r) for r in rows], dtype=torch.long)

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def stepper(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Callable:
        """A causal LM's next-token logits with a KV cache: ``step(prev, present) -> [b, V]``.

        The first call (``prev`` None) reads the left-padded prompts; later calls feed the
        previous tokens, ``present`` False for finished rows (then padding, attention 0).
        """
        state: dict[str, Any] = {"attn": attention_mask, "past": None}

        def step(prev: torch.Tensor | None, present: torch.Tensor | None) -> torch.Tensor:
            if prev is None:
                ids, attn = input_ids, state["attn"]
                position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
            else:
                attn = state["attn"] = torch.cat([state["attn"], present.long()[:, None]], dim=1)
                ids, position_ids = prev[:, None], (attn.sum(-1, keepdim=True) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, past_key_values=state["past"],
                        use_cache=True)
            state["past"] = out.past_key_values
            return out.logits[:, -1]

        return step

    @torch.no_grad()
    def _generate(
        self,
        step: Callable,
        mask_step: Callable | None,
        b: int,
        device: torch.device,
        generator: torch.Generator,
        pad_id: int,
        eos_id: int | None,
        mask_settings: dict[str, float] | None = None,
        forced: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample one chunk of ``b`` rows from ``step`` (see :meth:`stepper`), masked by NLPO's
        ``mask_step`` when given, with ``forced`` prefixes. Returns completion ids, log-probs,
        action mask and presence mask (the token is in the sequence: an action or a forced
        token), each ``[b, t]``."""
        cfg = self.config
        done = torch.zeros(b, dtype=torch.bool, device=device)
        tokens, logps, masks, presents = [], [], [], []
        prev = present = None
        if forced is not None:
            forced_ids, n_forced = forced[0].to(device), forced[1].to(device)
        for t in range(cfg.max_new_tokens):
            processed = process_logits(step(prev, present), self.settings)
            if mask_step is not None:
                processed = apply_action_mask(processed, mask_step(prev, present), mask_settings["top_p"],
                                              int(mask_settings["min_tokens"]), eos_id)
            logp = processed.log_softmax(-1)  # [b, V]
            probs = logp.exp()
            if probs.device != generator.device:  # draw on the generator's device (deterministic)
                nxt = torch.multinomial(probs.to(generator.device), 1, generator=generator).to(device)
            else:
                nxt = torch.multinomial(probs, 1, generator=generator)
            nxt = nxt.squeeze(1)  # [b]
            present = ~done
            if forced is not None:
                is_forced = t < n_forced
                if t < forced_ids.shape[1]:
                    nxt = torch.where(is_forced, forced_ids[:, t], nxt)
                real = present & ~is_forced
            else:
                real = present
            lp = logp.gather(1, nxt[:, None]).squeeze(1)
            nxt = torch.where(present, nxt, torch.full_like(nxt, pad_id))
            tokens.append(nxt)
            logps.append(torch.where(real, lp, torch.zeros_like(lp)))
            masks.append(real)
            presents.append(present)
            if cfg.stop_at_eos and eos_id is not None:
                done = done | (real & (nxt == eos_id))
            if bool(done.all()):
                break
            prev = nxt  # the next step feeds it; finished rows are padding
        return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(masks, 1), torch.stack(presents, 1)

    def _chunks(self, policy, contexts: list[Context], generator: torch.Generator, make_stepper: Callable,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple | None, dict | None]:
        """Sample every context in chunks of ``batch_size``; returns completion ids, log-probs,
        mask and presence ``[B, T]``, the forced prefixes and NLPO's mask settings."""
        cfg = self.config
        model = policy.model
        device = policy.device
        B = len(contexts)
        forced = self.reset_prefixes(policy, contexts, generator)
        mask_settings = getattr(policy, "action_mask", None)
        mask_model = getattr(policy, "mask_model", None) if mask_settings else None
        was_training = model.training
        model.eval()  # no dropout while sampling
        gathered = contextlib.ExitStack()
        if hasattr(policy, "unsharded"):  # FSDP2: every parameter gathered while sampling, since each
            # process stops at its own step (nothing happens when the policy is not sharded)
            gathered.enter_context(policy.unsharded(recurse=True))
        try:
            chunks = []
            for i in range(0, B, cfg.batch_size):
                sl = slice(i, i + cfg.batch_size)
                step = make_stepper(model, sl)
                mask_step = make_stepper(mask_model, sl) if mask_model is not None else None
                chunks.append(self._generate(
                    step, mask_step, len(contexts[sl]), device, generator, policy.pad_token_id, policy.eos_token_id,
                    mask_settings, None if forced is None else (forced[0][sl], forced[1][sl]),
                ))
        finally:
            model.train(was_training)
            gathered.close()
        T = max(c[0].shape[1] for c in chunks)
        completion = torch.full((B, T), policy.pad_token_id, dtype=torch.long, device=device)
        log_probs = torch.zeros((B, T), dtype=torch.float32, device=device)
        mask = torch.zeros((B, T), dtype=torch.bool, device=device)
        present = torch.zeros((B, T), dtype=torch.bool, device=device)
        for i, (ids, lp, m, pr) in zip(range(0, B, cfg.batch_size), chunks):
            n, t = ids.shape
            completion[i : i + n, :t], log_probs[i : i + n, :t], mask[i : i + n, :t] = ids, lp, m
            present[i : i + n, :t] = pr
        return completion, log_probs, mask, present, forced, (mask_settings if mask_model is not None else None)

    def _finish(self, policy, contexts: list[Context], completion, log_probs, mask, present, forced, mask_settings,
                data: dict[str, torch.Tensor], meta: dict[str, Any]) -> Rollout:
        completion_lists = [row[m].tolist() for row, m in zip(completion.cpu(), present.cpu())]
        texts = policy.tokenizer.batch_decode(completion_lists, skip_special_tokens=True)
        meta = {**self.settings.as_meta(), **meta}
        if mask_settings is not None:
            meta.update(nlpo_top_p=float(mask_settings["top_p"]), nlpo_min_tokens=int(mask_settings["min_tokens"]))
        data = {**data, "completion_ids": completion}
        if forced is not None:
            data["forced"] = present & ~mask  # [B, T] dataset tokens the sample was reset to
        return Rollout(contexts=list(contexts), log_probs=log_probs, mask=mask, data=data,
                       outputs={"texts": texts, "completion_ids": completion_lists}, meta=meta)

    def sample(self, policy: CausalLMPolicy, contexts: list[Context], generator: torch.Generator) -> Rollout:
        """Sample ``B = len(contexts)`` completions (in chunks of ``batch_size``); see the class doc."""
        prompt_ids, prompt_mask = self.encode_prompts(policy, [c.prompt for c in contexts])
        prompt_ids, prompt_mask = prompt_ids.to(policy.device), prompt_mask.to(policy.device)
        completion, log_probs, mask, present, forced, mask_settings = self._chunks(
            policy, contexts, generator, lambda model, sl: self.stepper(model, prompt_ids[sl], prompt_mask[sl]))
        data = {
            "input_ids": torch.cat([prompt_ids, completion], dim=1),
            "attention_mask": torch.cat([prompt_mask, present.long()], dim=1),
        }
        return self._finish(policy, contexts, completion, log_probs, mask, present, forced, mask_settings, data,
                            {"prompt_length": prompt_ids.shape[1]})
