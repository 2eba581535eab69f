"""``causal_lm``: a transformers causal language model as a polyrl policy (full or LoRA)."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

from polyrl import ConfigError, Policy, Rollout
from polyrl.paths import resolve_path

from .logits import SamplingSettings, token_log_probs

__all__ = ["CausalLMConfig", "CausalLMPolicy"]



@dataclass
class CausalLMConfig:
    """A transformers causal LM (``AutoModelForCausalLM``), trained in full or through LoRA."""

    pretrained: str = "assets/tiny-gpt2"
    """Hub id or local folder of a transformers causal LM (relative folders are also looked up
    from the polyrl repository root)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; null for the default."""
    torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Dtype the weights are loaded in (log-probs are always computed in float32)."""
    trust_remote_code: bool = False
    """Allow model code from the Hub repository to run (only passed to transformers when true)."""
    lora_rank: int = 0
    """LoRA rank; 0 trains every weight (full fine-tuning)."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the adapter's output is scaled by lora_alpha / lora_rank)."""
    lora_target_modules: list[str] | None = None
    """Module names LoRA adapts (e.g. [c_attn] for GPT-2); null uses peft's default for the
    architecture."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input; keep 0 so that recomputed log-probs match the sampler's."""
    disable_dropout: bool = True
    """Set every dropout probability of the model to 0, so that log-probs recomputed in training
    mode match the ones recorded while sampling (TRL does the same by default)."""

    def check(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"policy.lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if self.lora_rank > 0 and self.lora_alpha <= 0:
            raise ConfigError(f"policy.lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"policy.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target_modules is not None and len(self.lora_target_modules) == 0:
            raise ConfigError("policy.lora_target_modules is empty; give module names or null for peft's default")


class CausalLMPolicy(Policy):
    """A causal LM whose ``forward`` recomputes the log-probs of sampled completions.

    The rollout (from :class:`polyrl.plugins.text.sampler.TextSampler`) holds
    ``data["input_ids"] [B, P+T]`` (prompts left-padded to ``P`` tokens, then ``T`` completion
    tokens, pad after EOS) and ``data["attention_mask"] [B, P+T]`` (0 on padding). One forward
    pass over prompt + completion gives the logits of every completion token; they are processed
    with the sampler's temperature / top-k / top-p (from ``rollout.meta``) so that the log-probs
    are those of the distribution that was actually sampled.

    Attributes:
        model: the ``transformers`` model (a ``peft.PeftModel`` when ``lora_rank > 0``).
        tokenizer: its tokenizer (left padding; pad token = EOS when the model has none).
    """

    modality = "text"

    def __init__(self, config: CausalLMConfig) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.config = config
        self.source = resolve_path(config.pretrained)
        self._load_kwargs: dict[str, Any] = {}
        if config.revision is not None:
            self._load_kwargs["revision"] = config.revision
        if config.trust_remote_code:
            self._load_kwargs["trust_remote_code"] = True

        tokenizer = AutoTokenizer.from_pretrained(self.source, **self._load_kwargs)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(f"policy.pretrained: the tokenizer of {self.source!r} has neither a pad nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer

        model = self._load_base_model()
        if config.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=config.lora_target_modules,
                task_type="CAUSAL_LM",
            )
            try:
                with warnings.catch_warnings():
                    # GPT-2's Conv1D layers: peft sets fan_in_fan_out itself and says so
                    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
                    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                    model = get_peft_model(model, lora)
            except ValueError as e:
                raise ConfigError(f"policy.lora_target_modules: {e}") from e
        else:
            model.requires_grad_(True)
        self.model: nn.Module = model
        self._ref_holder: list[nn.Module] = []  # the frozen copy for full fine-tuning, not a submodule
        base_forward = inspect.signature(self._base_model().forward).parameters
        self._keep_logits = "logits_to_keep" in base_forward

    # ------------------------------------------------------------------ loading
    def _load_base_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        dtype = self.config.torch_dtype
        model = AutoModelForCausalLM.from_pretrained(
            self.source, dtype=dtype if dtype == "auto" else getattr(torch, dtype), **self._load_kwargs
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.pad_token_id
        if self.config.disable_dropout:
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        return model

    def _base_model(self) -> nn.Module:
        """The underlying transformers model (inside the peft wrapper when there is one)."""
        return self.model.get_base_model() if self.is_lora else self.model

    @property
    def is_lora(self) -> bool:
        return self.config.lora_rank > 0

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    # ------------------------------------------------------------------ log-probs
    def _log_probs(self, model: nn.Module, rollout: Rollout, steps: torch.Tensor | None) -> torch.Tensor:
        """Log-probs ``[B, T]`` (or ``[B, K]`` at ``steps``) of the completion tokens under ``model``.

        Positions where ``rollout.mask`` is False (after EOS) are 0.
        """
        device = self.device
        input_ids = rollout.data["input_ids"].to(device)  # [B, P+T]
        attention_mask = rollout.data["attention_mask"].to(device)  # [B, P+T]
        mask = rollout.mask.to(device)  # [B, T]
        T = mask.shape[1]
        L = input_ids.shape[1]
        P = L - T
        if P < 1:
            raise ValueError(f"rollout has {L} tokens for {T} completion steps: the prompt is empty")
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {}
        if self._keep_logits:
            kwargs["logits_to_keep"] = T + 1  # only the logits that predict completion tokens
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
        ).logits
        logits = logits[:, -(T + 1) : -1]  # [B, T, V]: logits at position P-1+t predict token P+t
        tokens = input_ids[:, P:]  # [B, T]
        if steps is not None:
            steps = steps.to(device)
            logits = logits.gather(1, steps.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
            tokens = tokens.gather(1, steps)
            mask = mask.gather(1, steps)
        lp = token_log_probs(logits, tokens, SamplingSettings.from_meta(rollout.meta))
        return torch.where(mask, lp, torch.zeros_like(lp))

    def forward(self, rollout: Rollout, steps: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs of the rollout's completion tokens, with gradients.

        Args:
            rollout: a text rollout (``data["input_ids"]``, ``data["attention_mask"]``, ``mask``).
            steps: ``None`` for every completion token, or a LongTensor ``[B, K]`` of token indices.

        Returns:
            ``[B, T]`` (or ``[B, K]``) float32 log-probs; 0 where ``rollout.mask`` is False.
        """
        return self._log_probs(self.model, rollout, steps)

    @torch.no_grad()
    def reference_log_probs(self, rollout: Rollout, steps: torch.Tensor | None = None) -> torch.Tensor:
        """The same log-probs under the reference policy (the pretrained model), without gradients.

        With LoRA the adapter is disabled for the pass (no extra memory). With full fine-tuning a
        frozen copy of the pretrained weights is loaded from ``pretrained`` the first time this is
        called (so that it is the initial model even after a resume) and kept on the policy's device.
        """
        with self._reference_model() as ref:
            return self._log_probs(ref, rollout, steps)

    @contextlib.contextmanager
    def _reference_model(self) -> Iterator[nn.Module]:
        if self.is_lora:
            with self.model.disable_adapter():
                yield self.model
            return
        if not self._ref_holder:
            ref = self._load_base_model().requires_grad_(False).eval()
            self._ref_holder.append(ref)
        ref = self._ref_holder[0]
        if next(ref.parameters()).device != self.device:
            ref.to(self.device)
        yield ref

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str) -> None:
        """Save what the ecosystem loads directly, and the tokenizer.

        With LoRA: a peft adapter folder, loadable with
        ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)``.
        Full fine-tuning: a transformers model folder (``AutoModelForCausalLM.from_pretrained(path)``).
        """
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
