"""``generate``: batched ancestral sampling from a causal LM, recording token log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polyrl import ConfigError, Context, Rollout, Sampler

from .logits import SamplingSettings, process_logits
from .policy import CausalLMPolicy

__all__ = ["TextSamplerConfig", "TextSampler"]


@dataclass
class TextSamplerConfig:
    """Sampling settings; the policy recomputes log-probs under the same processed distribution."""

    max_new_tokens: int = 24
    """Completion length in tokens (``T``); rows that emit EOS earlier are padded."""
    temperature: float = 1.0
    """Softmax temperature (> 0)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 turns top-k off."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1.0 turns it off."""
    batch_size: int = 32
    """Prompts generated together in one chunk (bounds memory; results do not depend on it
    beyond floating-point noise)."""
    stop_at_eos: bool = True
    """End a completion at the tokenizer's EOS token (the EOS itself is kept as a real action)."""

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampler.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"sampler.temperature must be > 0 (sampling is stochastic), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"sampler.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampler.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.batch_size < 1:
            raise ConfigError(f"sampler.batch_size must be >= 1, got {self.batch_size}")


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

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def _generate(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generator: torch.Generator,
        pad_id: int,
        eos_id: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample one chunk. Returns completion ids, log-probs and mask, each ``[b, t]``."""
        cfg = self.config
        b = input_ids.shape[0]
        device = input_ids.device
        done = torch.zeros(b, dtype=torch.bool, device=device)
        tokens, logps, masks = [], [], []
        attn = attention_mask
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        step_ids, past = input_ids, None
        for _ in range(cfg.max_new_tokens):
            out = model(
                input_ids=step_ids,
                attention_mask=attn,
                position_ids=position_ids,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            logp = process_logits(out.logits[:, -1], self.settings).log_softmax(-1)  # [b, V]
            probs = logp.exp()
            if probs.device != generator.device:  # draw on the generator's device (deterministic)
                nxt = torch.multinomial(probs.to(generator.device), 1, generator=generator).to(device)
            else:
                nxt = torch.multinomial(probs, 1, generator=generator)
            nxt = nxt.squeeze(1)  # [b]
            real = ~done
            lp = logp.gather(1, nxt[:, None]).squeeze(1)
            nxt = torch.where(real, nxt, torch.full_like(nxt, pad_id))
            tokens.append(nxt)
            logps.append(torch.where(real, lp, torch.zeros_like(lp)))
            masks.append(real)
            if cfg.stop_at_eos and eos_id is not None:
                done = done | (nxt == eos_id)
            if bool(done.all()):
                break
            # next step: feed the new token; finished rows are padding (attention 0)
            step_ids = nxt[:, None]
            attn = torch.cat([attn, real.long()[:, None]], dim=1)
            position_ids = (attn.sum(-1, keepdim=True) - 1).clamp(min=0)
        return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(masks, 1)

    def sample(self, policy: CausalLMPolicy, contexts: list[Context], generator: torch.Generator) -> Rollout:
        """Sample ``B = len(contexts)`` completions (in chunks of ``batch_size``); see the class doc."""
        cfg = self.config
        model = policy.model
        device = policy.device
        pad_id, eos_id = policy.pad_token_id, policy.eos_token_id
        prompt_ids, prompt_mask = self.encode_prompts(policy, [c.prompt for c in contexts])
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        B, P = prompt_ids.shape

        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            chunks = [
                self._generate(model, prompt_ids[i : i + cfg.batch_size], prompt_mask[i : i + cfg.batch_size],
                               generator, pad_id, eos_id)
                for i in range(0, B, cfg.batch_size)
            ]
        finally:
            model.train(was_training)

        T = max(c[0].shape[1] for c in chunks)
        completion = torch.full((B, T), pad_id, dtype=torch.long, device=device)
        log_probs = torch.zeros((B, T), dtype=torch.float32, device=device)
        mask = torch.zeros((B, T), dtype=torch.bool, device=device)
        for i, (ids, lp, m) in zip(range(0, B, cfg.batch_size), chunks):
            n, t = ids.shape
            completion[i : i + n, :t], log_probs[i : i + n, :t], mask[i : i + n, :t] = ids, lp, m

        completion_lists = [row[m].tolist() for row, m in zip(completion.cpu(), mask.cpu())]
        texts = policy.tokenizer.batch_decode(completion_lists, skip_special_tokens=True)
        return Rollout(
            contexts=list(contexts),
            log_probs=log_probs,
            mask=mask,
            data={
                "input_ids": torch.cat([prompt_ids, completion], dim=1),
                "attention_mask": torch.cat([prompt_mask, mask.long()], dim=1),
                "completion_ids": completion,
            },
            outputs={"texts": texts, "completion_ids": completion_lists},
            meta={**self.settings.as_meta(), "prompt_length": P},
        )
