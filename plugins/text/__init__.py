"""Text plugin: causal language models (transformers, full or LoRA) and their sampler.

Components:

* policy ``causal_lm`` (:class:`CausalLMPolicy`, config :class:`CausalLMConfig`);
* sampler ``generate`` (:class:`TextSampler`, config :class:`TextSamplerConfig`), producing
  ``texts`` (and ``completion_ids``) for rewards.

Example run config::

    policy:  {name: causal_lm, pretrained: assets/tiny-gpt2, lora_rank: 8}
    sampler: {name: generate, max_new_tokens: 24, temperature: 0.7, top_k: 50}
    rewards:
      sentiment: {weight: 1.0}
"""

from __future__ import annotations

from polyrl import ComponentSpec, hookimpl

from .logits import SamplingSettings, process_logits, token_log_probs
from .policy import CausalLMConfig, CausalLMPolicy
from .sampler import TextSampler, TextSamplerConfig

__all__ = [
    "CausalLMConfig",
    "CausalLMPolicy",
    "TextSampler",
    "TextSamplerConfig",
    "SamplingSettings",
    "process_logits",
    "token_log_probs",
]


@hookimpl
def polyrl_policies() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            name="causal_lm",
            factory=lambda cfg: CausalLMPolicy(cfg),
            config_cls=CausalLMConfig,
            modality="text",
            description="transformers causal LM (AutoModelForCausalLM), full fine-tuning or LoRA",
        )
    ]


@hookimpl
def polyrl_samplers() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            name="generate",
            factory=lambda cfg, policy=None: TextSampler(cfg),
            config_cls=TextSamplerConfig,
            modality="text",
            produces=("texts", "completion_ids"),
            description="batched ancestral sampling with KV cache (temperature, top-k, top-p, EOS)",
        )
    ]
