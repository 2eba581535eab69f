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
from polyrl.paths import check_model_source, model_load_errors, resolve_path

from .logits import SamplingSettings, action_mask_meta, apply_action_mask, process_logits

__all__ = ["CausalLMConfig", "CausalLMPolicy"]



@dataclass
class CausalLMConfig:
    """A transformers language model (``AutoModelForCausalLM`` for ``causal_lm``,
    ``AutoModelForSeq2SeqLM`` for ``seq2seq_lm``), trained in full or through LoRA."""

    pretrained: str = "assets/tiny-gpt2"
    """Hub id or local folder of a transformers causal LM (``causal_lm``) or encoder-decoder LM
    (``seq2seq_lm``); relative folders are also looked up from the polyrl repository root."""
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
    value_head: bool = False
    """Add a value head for actor-critic updates (ppo, nlpo, dr_po): a trainable linear layer
    from the last hidden state to a scalar, saved with the trained weights."""

    def check(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"policy.lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if self.lora_rank > 0 and self.lora_alpha <= 0:
            raise ConfigError(f"policy.lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"policy.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target_modules is not None and len(self.lora_target_modules) == 0:
            raise ConfigError("policy.lora_target_modules is empty; give module names or null for peft's default")
        check_model_source(self.pretrained, "policy.pretrained", "a transformers model folder (config.json and weights)")


class CausalLMPolicy(Policy):
    """A causal LM whose ``forward`` recomputes the log-probs of sampled completions.

    The rollout (from :class:`polyrl.plugins.text.sampler.TextSampler`) holds
    ``data["input_ids"] [B, P+T]`` (prompts left-padded to ``P`` tokens, then ``T`` completion
    tokens, pad after EOS) and ``data["attention_mask"] [B, P+T]`` (0 on padding). One forward
    pass over prompt + completion gives the logits of every completion token; they are processed
    with the sampler's temperature / top-k / top-p (from ``rollout.meta``) so that the log-probs
    are those of the distribution that was actually sampled.

    With ``value_head: true`` the policy is also a critic: ``forward(rollout, with_values=True,
    with_entropy=True)`` returns ``{"log_probs", "values", "entropy"}``, the values read from the
    last hidden state at the position that predicts each token. For NLPO, :meth:`set_action_mask`
    installs a frozen masking policy; rollouts sampled under it are scored under the same mask.

    Attributes:
        model: the ``transformers`` model (a ``peft.PeftModel`` when ``lora_rank > 0``).
        tokenizer: its tokenizer (left padding; pad token = EOS when the model has none).
        value_head: ``nn.Linear(hidden, 1)`` or None.
    """

    modality = "text"
    lora_task_type = "CAUSAL_LM"
    auto_class = "AutoModelForCausalLM"

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

        with self._load_errors():
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
                task_type=self.lora_task_type,
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
        self._mask_holder: list[nn.Module] = []  # NLPO's masking policy (a frozen copy), not a submodule
        self.action_mask: dict[str, float] | None = None  # NLPO's top-p settings while a mask model is set
        self.value_head: nn.Linear | None = None
        if config.value_head:
            hidden = _hidden_size(self._base_model().config)
            head = nn.Linear(hidden, 1)
            nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(head.bias)
            self.value_head = head
        base_forward = inspect.signature(self._base_model().forward).parameters
        self._keep_logits = "logits_to_keep" in base_forward

    # ------------------------------------------------------------------ loading
    def _load_errors(self):
        """Hub, network and missing-file failures while loading ``policy.pretrained``, as a
        :class:`ConfigError` that says what to do."""
        return model_load_errors("policy.pretrained", self.config.pretrained,
                                 f"a local transformers model folder loadable by {self.auto_class}")

    def _load_base_model(self) -> nn.Module:
        import transformers

        dtype = self.config.torch_dtype
        kwargs = dict(self._load_kwargs)
        if self.config.disable_dropout:  # models that read dropout rates from the config (T5's attention)
            with self._load_errors():
                model_config = transformers.AutoConfig.from_pretrained(self.source, **self._load_kwargs)
            _zero_dropout(model_config)
            kwargs["config"] = model_config
        try:
            with self._load_errors():
                model = getattr(transformers, self.auto_class).from_pretrained(
                    self.source, dtype=dtype if dtype == "auto" else getattr(torch, dtype), **kwargs
                )
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                raise ConfigError(f"policy.pretrained={self.config.pretrained!r} cannot be loaded as {self.auto_class}: {e}") from None
            raise
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
    def has_value_head(self) -> bool:  # type: ignore[override]
        return self.value_head is not None

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
    def _evaluate(
        self,
        model: nn.Module,
        rollout: Rollout,
        steps: torch.Tensor | None,
        with_values: bool = False,
        with_entropy: bool = False,
        mask_model: nn.Module | None = None,
    ) -> dict[str, torch.Tensor]:
        """Log-probs (and values, entropies) ``[B, T]`` (or ``[B, K]`` at ``steps``) of the
        completion tokens under ``model``; 0 where ``rollout.mask`` is False.

        The distribution is the sampler's (``rollout.meta``: temperature, top-k, top-p and NLPO's
        action mask, computed with ``mask_model``).
        """
        device = self.device
        logits, mask_logits, hidden, tokens = self._forward_parts(model, rollout, with_values, mask_model)
        mask = rollout.mask.to(device)  # [B, T]
        settings = SamplingSettings.from_meta(rollout.meta)
        top = action_mask_meta(rollout.meta)
        if steps is not None:
            steps = steps.to(device)
            pick = lambda x: x.gather(1, steps.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
            logits = pick(logits)
            mask_logits = pick(mask_logits) if mask_logits is not None else None
            hidden = pick(hidden) if hidden is not None else None
            tokens = tokens.gather(1, steps)
            mask = mask.gather(1, steps)
        processed = process_logits(logits, settings)
        if mask_logits is not None:
            processed = apply_action_mask(processed, mask_logits, top[0], int(top[1]), self.eos_token_id)
        logp_all = processed.log_softmax(dim=-1)
        lp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        zero = torch.zeros_like(lp)
        result = {"log_probs": torch.where(mask, lp, zero)}
        if with_entropy:
            finite = torch.isfinite(logp_all)  # filtered tokens: p = 0, and no NaN gradient through -inf
            safe = torch.where(finite, logp_all, torch.zeros_like(logp_all))
            ent = -(safe.exp() * safe * finite).sum(-1)
            result["entropy"] = torch.where(mask, ent, zero)
        if with_values:
            if self.value_head is None:
                raise ValueError("with_values=True needs a value head: set policy.value_head: true")
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
            result["values"] = torch.where(mask, values, zero)
        return result

    def _forward_parts(
        self, model: nn.Module, rollout: Rollout, with_values: bool, mask_model: nn.Module | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """One pass over prompt + completion: the logits ``[B, T, V]`` that predict the completion
        tokens, the masking policy's logits (with NLPO's mask), the last hidden states ``[B, T, H]``
        (``with_values``) and the completion tokens ``[B, T]``."""
        device = self.device
        input_ids = rollout.data["input_ids"].to(device)  # [B, P+T]
        attention_mask = rollout.data["attention_mask"].to(device)  # [B, P+T]
        T = rollout.mask.shape[1]
        L = input_ids.shape[1]
        P = L - T
        if P < 1:
            raise ValueError(f"rollout has {L} tokens for {T} completion steps: the prompt is empty")
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False)
        if self._keep_logits:
            kwargs["logits_to_keep"] = T + 1  # only the logits that predict completion tokens
        out = model(**kwargs, output_hidden_states=with_values)
        logits = out.logits[:, -(T + 1) : -1]  # [B, T, V]: logits at position P-1+t predict token P+t
        mask_logits = None
        if action_mask_meta(rollout.meta) is not None:
            if mask_model is None:
                raise ValueError("the rollout was sampled under an NLPO action mask but no mask model is set")
            with torch.no_grad():
                mask_logits = mask_model(**kwargs).logits[:, -(T + 1) : -1]
        hidden = out.hidden_states[-1][:, -(T + 1) : -1] if with_values else None  # [B, T, H]
        return logits, mask_logits, hidden, input_ids[:, P:]

    def _log_probs(self, model: nn.Module, rollout: Rollout, steps: torch.Tensor | None) -> torch.Tensor:
        return self._evaluate(model, rollout, steps, mask_model=self.mask_model)["log_probs"]

    def forward(
        self,
        rollout: Rollout,
        steps: torch.Tensor | None = None,
        with_values: bool = False,
        with_entropy: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Log-probs of the rollout's completion tokens, with gradients.

        Args:
            rollout: a text rollout (``data["input_ids"]``, ``data["attention_mask"]``, ``mask``).
            steps: ``None`` for every completion token, or a LongTensor ``[B, K]`` of token indices.
            with_values: also return the value head's estimate of each state (the prefix before
                the token).
            with_entropy: also return the entropy of each step's (processed) distribution.

        Returns:
            ``[B, T]`` (or ``[B, K]``) float32 log-probs, 0 where ``rollout.mask`` is False; with
            ``with_values`` or ``with_entropy`` a dict with ``log_probs``, ``values``, ``entropy``.
        """
        out = self._evaluate(self.model, rollout, steps, with_values, with_entropy, mask_model=self.mask_model)
        return out if (with_values or with_entropy) else out["log_probs"]

    # ------------------------------------------------------------------ NLPO's masking policy
    @property
    def mask_model(self) -> nn.Module | None:
        """NLPO's masking policy ``pi_psi`` (a frozen copy of the model), or None."""
        return self._mask_holder[0] if self._mask_holder else None

    def set_action_mask(self, state: dict[str, torch.Tensor] | None, top_p: float = 0.9, min_tokens: int = 100) -> None:
        """Sample and score under NLPO's action mask: the top-``top_p`` tokens (at least
        ``min_tokens``, EOS always) of a masking policy whose trained weights are ``state`` (a
        :meth:`trainable_state_dict`; the current weights when empty). ``None`` removes the mask.
        """
        if state is None:
            self._mask_holder.clear()
            self.action_mask = None
            return
        import copy

        mask_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        state = state if state else self.trainable_state_dict()
        weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        mask_model.load_state_dict(weights, strict=False)
        self._mask_holder[:] = [mask_model.to(self.device)]
        self.action_mask = {"top_p": float(top_p), "min_tokens": int(min_tokens)}

    @torch.no_grad()
    def reference_log_probs(self, rollout: Rollout, steps: torch.Tensor | None = None) -> torch.Tensor:
        """The same log-probs under the reference policy (the pretrained model), without gradients.

        With LoRA the adapter is disabled for the pass (no extra memory). With full fine-tuning a
        frozen copy of the pretrained weights is loaded from ``pretrained`` the first time this is
        called (so that it is the initial model even after a resume) and kept on the policy's device.
        """
        with self.unsharded(), self._reference_model() as ref:
            return self._log_probs(ref, rollout, steps)

    # ------------------------------------------------------------------ sharded training (FSDP2)
    @contextlib.contextmanager
    def unsharded(self) -> Iterator[None]:
        """Around passes that call ``self.model`` directly (the reference policy, sampling) when the
        policy is sharded with FSDP2 (``fully_shard``, as accelerate's FSDP2 profile does): the
        root's own parameters (embeddings, final norm) are gathered for the pass, and sharded
        again after it. Every process must enter it together. Nothing happens when not sharded."""
        unshard = getattr(self, "unshard", None)
        if not callable(unshard) or not hasattr(self, "reshard"):
            yield
            return
        state = getattr(self, "_get_fsdp_state", lambda: None)()
        if state is not None and callable(getattr(state, "_lazy_init", None)):
            state._lazy_init()  # FSDP2 picks its root at the first forward: make it this policy, not a block
        unshard()
        try:
            yield
        finally:
            self.reshard()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights as full CPU tensors. Parameters sharded with FSDP2 (DTensors) are
        gathered: every process must call it together, and every process gets the full state."""
        return {k: _full_tensor(v) for k, v in super().trainable_state_dict().items()}

    def load_trainable_state_dict(self, state) -> None:
        """Load full tensors (from :meth:`trainable_state_dict` or a checkpoint); into FSDP2-sharded
        parameters each process keeps its own shard (no communication)."""
        params = dict(self.named_parameters())
        local = {}
        for k, v in state.items():
            p = params.get(k)
            if p is not None and hasattr(p, "device_mesh") and hasattr(p, "placements"):
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            local[k] = v
        super().load_trainable_state_dict(local)

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
        A value head is saved beside them as ``value_head.safetensors`` (``weight``, ``bias``).
        """
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.value_head is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                      str(Path(path) / "value_head.safetensors"))


def _full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value on CPU (a collective); any other tensor as it is."""
    full = getattr(value, "full_tensor", None)
    return full().detach().cpu().contiguous() if callable(full) else value


def _zero_dropout(config: Any, depth: int = 0) -> None:
    """Set every dropout probability of a transformers config (and its sub-configs) to 0."""
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
        elif depth < 3 and hasattr(value, "to_dict") and hasattr(value, "model_type"):
            _zero_dropout(value, depth + 1)


def _hidden_size(config: Any) -> int:
    """The width of a transformers model's last hidden state."""
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"policy.value_head: cannot tell the hidden size of a {type(config).__name__}")
