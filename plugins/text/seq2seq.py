"""``seq2seq_lm``: a transformers encoder-decoder LM (T5, BART...) as a polyrl policy, and its
sampler ``seq2seq_generate``, as RL4LMs supports for its seq2seq tasks.

The prompt is the encoder's input; the completion is decoded token by token. Everything else is
the causal LM's: full fine-tuning or LoRA (peft ``SEQ_2_SEQ_LM``), the reference policy (adapter
disabled, or a frozen copy), the value head (on the decoder's last hidden state), NLPO's action
mask and DR-PO's dataset resets, and the sampling distribution shared with training.

Rollout layout (``data``): ``input_ids`` / ``attention_mask`` ``[B, P]`` (encoder, prompts
left-padded), ``decoder_input_ids`` / ``decoder_attention_mask`` ``[B, T]`` (the decoder start
token, then the completion shifted right; 0 attention after EOS) and ``completion_ids`` ``[B, T]``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from polyrl import Context, Rollout

from .logits import action_mask_meta
from .policy import CausalLMConfig, CausalLMPolicy
from .sampler import TextSampler

__all__ = ["Seq2SeqLMPolicy", "Seq2SeqSampler"]


class Seq2SeqLMPolicy(CausalLMPolicy):
    """An encoder-decoder LM (``AutoModelForSeq2SeqLM``) whose ``forward`` recomputes the
    log-probs of sampled completions (config: :class:`CausalLMConfig`)."""

    lora_task_type = "SEQ_2_SEQ_LM"
    auto_class = "AutoModelForSeq2SeqLM"

    def __init__(self, config: CausalLMConfig) -> None:
        super().__init__(config)
        start = self._base_model().config.decoder_start_token_id
        self.decoder_start_token_id = int(start if start is not None else self.pad_token_id)

    supports_chunk_lm_head = False  # T5 rescales the decoder's output before its head

    def _forward_parts(
        self, model: nn.Module, rollout: Rollout, with_values: bool, mask_model: nn.Module | None,
        head_chunks: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        device = self.device
        kwargs: dict[str, Any] = dict(
            input_ids=rollout.data["input_ids"].to(device),
            attention_mask=rollout.data["attention_mask"].to(device),
            decoder_input_ids=rollout.data["decoder_input_ids"].to(device),
            decoder_attention_mask=rollout.data["decoder_attention_mask"].to(device),
            use_cache=False,
        )
        out = model(**kwargs, output_hidden_states=with_values)
        mask_logits = None
        if action_mask_meta(rollout.meta) is not None:
            if mask_model is None:
                raise ValueError("the rollout was sampled under an NLPO action mask but no mask model is set")
            with torch.no_grad():
                mask_logits = mask_model(**kwargs).logits
        hidden = out.decoder_hidden_states[-1] if with_values else None
        return out.logits, mask_logits, hidden, rollout.data["completion_ids"].to(device)


class Seq2SeqSampler(TextSampler):
    """Encodes the prompts once, then decodes with a KV cache (config: :class:`TextSamplerConfig`).

    Returns a rollout in the layout of :mod:`polyrl.plugins.text.seq2seq`, with the same
    ``log_probs``, ``mask``, ``outputs`` and ``meta`` as :class:`TextSampler`.
    """

    @staticmethod
    def seq2seq_stepper(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> Callable:
        encoder = model.get_encoder()
        encoded = encoder(input_ids=input_ids, attention_mask=attention_mask)
        state: dict[str, Any] = {"past": None}

        def step(prev: torch.Tensor | None, present: torch.Tensor | None) -> torch.Tensor:
            ids = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device) if prev is None else prev[:, None]
            out = model(encoder_outputs=encoded, attention_mask=attention_mask, decoder_input_ids=ids,
                        past_key_values=state["past"], use_cache=True)
            state["past"] = out.past_key_values
            return out.logits[:, -1]

        return step

    def sample(self, policy: Seq2SeqLMPolicy, contexts: list[Context], generator: torch.Generator) -> Rollout:
        prompt_ids, prompt_mask = self.encode_prompts(policy, [c.prompt for c in contexts])
        prompt_ids, prompt_mask = prompt_ids.to(policy.device), prompt_mask.to(policy.device)
        start = policy.decoder_start_token_id
        completion, log_probs, mask, present, forced, mask_settings = self._chunks(
            policy, contexts, generator,
            lambda model, sl: self.seq2seq_stepper(model, prompt_ids[sl], prompt_mask[sl], start))
        B = completion.shape[0]
        first = torch.full((B, 1), start, dtype=torch.long, device=completion.device)
        data = {
            "input_ids": prompt_ids,
            "attention_mask": prompt_mask,
            "decoder_input_ids": torch.cat([first, completion[:, :-1]], dim=1),
            "decoder_attention_mask": torch.cat([torch.ones_like(first), present[:, :-1].long()], dim=1),
        }
        return self._finish(policy, contexts, completion, log_probs, mask, present, forced, mask_settings, data,
                            {"prompt_length": prompt_ids.shape[1]})
