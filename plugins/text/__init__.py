"""Text plugin: language models (transformers causal and encoder-decoder LMs, full or LoRA) and
their samplers.

Components:

* policy ``causal_lm`` (:class:`CausalLMPolicy`, config :class:`CausalLMConfig`);
* policy ``seq2seq_lm`` (:class:`Seq2SeqLMPolicy`, same config): T5, BART...;
* sampler ``generate`` (:class:`TextSampler`, config :class:`TextSamplerConfig`) for causal LMs
  and ``seq2seq_generate`` (:class:`Seq2SeqSampler`, same config) for encoder-decoder LMs, both
  producing ``texts`` (and ``completion_ids``) for rewards;
* sampler ``vllm`` (:class:`VLLMSampler`, config :class:`VLLMSamplerConfig`): a colocated vLLM
  engine for causal LMs (vLLM is optional; it is imported only when this sampler is used).

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
from .seq2seq import Seq2SeqLMPolicy, Seq2SeqSampler
from .vllm_sampler import VLLMSampler, VLLMSamplerConfig

__all__ = [
    "CausalLMConfig",
    "CausalLMPolicy",
    "TextSampler",
    "Seq2SeqLMPolicy",
    "Seq2SeqSampler",
    "TextSamplerConfig",
    "VLLMSampler",
    "VLLMSamplerConfig",
    "SamplingSettings",
    "process_logits",
    "token_log_probs",
]


def lm_capabilities(kind: str):
    """The capabilities of a language-model policy config: per-token log-probs, entropies, the
    reference policy (adapter disabled, or a frozen copy when fully fine-tuned), NLPO's token mask,
    and a value head when ``value_head`` is set."""

    def capabilities(config: CausalLMConfig) -> set[str]:
        caps = {kind, "step_log_probs", "entropy", "reference", "token_mask"}
        if config.value_head:
            caps.add("value_head")
        return caps

    return capabilities


@hookimpl
def polyrl_policies() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            name="causal_lm",
            factory=lambda cfg: CausalLMPolicy(cfg),
            config_cls=CausalLMConfig,
            modality="text",
            rollout="tokens",
            capabilities=lm_capabilities("causal_lm"),
            description="transformers causal LM (AutoModelForCausalLM), full fine-tuning or LoRA",
        ),
        ComponentSpec(
            name="seq2seq_lm",
            factory=lambda cfg: Seq2SeqLMPolicy(cfg),
            config_cls=CausalLMConfig,
            modality="text",
            rollout="tokens",
            capabilities=lm_capabilities("seq2seq_lm"),
            description="transformers encoder-decoder LM (AutoModelForSeq2SeqLM: T5, BART), full fine-tuning or LoRA",
        ),
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
            rollout="tokens",
            requires={"causal_lm"},
            capabilities={"dataset_resets"},
            description="batched ancestral sampling with KV cache (temperature, top-k, top-p, EOS)",
        ),
        ComponentSpec(
            name="seq2seq_generate",
            factory=lambda cfg, policy=None: Seq2SeqSampler(cfg),
            config_cls=TextSamplerConfig,
            modality="text",
            produces=("texts", "completion_ids"),
            rollout="tokens",
            requires={"seq2seq_lm"},
            capabilities={"dataset_resets"},
            description="encoder once, then batched decoding with KV cache (temperature, top-k, top-p, EOS)",
        ),
        ComponentSpec(
            name="vllm",
            factory=lambda cfg, policy=None: VLLMSampler(cfg),
            config_cls=VLLMSamplerConfig,
            modality="text",
            produces=("texts", "completion_ids"),
            rollout="tokens",
            requires={"causal_lm"},
            description="a colocated vLLM engine (optional dependency), refreshed with the policy's weights after "
                        "every update; records the engine's log-probs",
        ),
    ]
