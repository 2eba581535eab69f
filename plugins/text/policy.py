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
    """Dtype of the frozen weights: the base model under LoRA, the reference copy of a full
    fine-tune and NLPO's masking policy (bfloat16 halves their memory). The trained weights (a full
    fine-tune's, LoRA's adapters, the value head) are float32 whatever this says, so that AdamW's
    small updates are not rounded away; bf16 compute comes from ``run.mixed_precision: bf16``
    (autocast). Log-probs are always computed in float32."""
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
    gradient_checkpointing: bool = False
    """Recompute each decoder block's activations in the backward pass instead of keeping them
    (transformers' non-reentrant gradient checkpointing, with LoRA too): the training passes keep
    each block's input instead of all its activations, at the cost of a second forward pass of the
    blocks during the backward pass. Sampling (eval mode, KV cache) is not affected. Log-probs and
    gradients are unchanged."""
    log_prob_chunk_tokens: int = 512
    """Tokens per chunk when the log-probs of the sampled tokens (and, for the actor-critic updates,
    the entropies) are computed: the processed log-softmax is taken chunk by chunk and only the
    sampled tokens' values (and each token's entropy) are kept; the backward pass recomputes it
    chunk by chunk from the logits. No float32 ``[batch, tokens, vocab]`` tensor (log-softmax, its
    gradient, the upcast of bf16 logits) is ever held, only a few ``[chunk, vocab]`` ones: at a
    vocabulary of 152k, 311 MB each at 512 tokens, where one float32 ``[16, 512, vocab]`` tensor
    takes 5 GB. Per row the operations are those of the unchunked path, so log-probs, entropies
    and gradients are the same. 0 computes the whole log-softmax at once."""
    chunk_lm_head: bool = False
    """Apply the vocabulary projection (the LM head) inside those chunks too, so that the
    ``[batch, tokens, vocab]`` logits and their gradient never exist either: the model runs up to
    its last hidden state, and each chunk of ``log_prob_chunk_tokens`` tokens goes through the head,
    the sampler's logit processing and the log-softmax, and is recomputed in the backward pass (one
    more head matmul per chunk). Log-probs, entropies and gradients equal the unchunked ones up to
    float rounding of the matmul. Needs ``log_prob_chunk_tokens > 0``, a causal LM (``causal_lm``)
    whose forward takes ``logits_to_keep``, and logits that are the head applied to the last
    hidden state: models whose configuration soft-caps or scales their logits are refused before
    loading, and every model's own logit of its last position is compared on its first pass."""

    def check(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"policy.lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if self.lora_rank > 0 and self.lora_alpha <= 0:
            raise ConfigError(f"policy.lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"policy.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target_modules is not None and len(self.lora_target_modules) == 0:
            raise ConfigError("policy.lora_target_modules is empty; give module names or null for peft's default")
        if self.log_prob_chunk_tokens < 0:
            raise ConfigError(f"policy.log_prob_chunk_tokens must be >= 0 (0 = no chunking), got {self.log_prob_chunk_tokens}")
        if self.chunk_lm_head and self.log_prob_chunk_tokens == 0:
            raise ConfigError("policy.chunk_lm_head: true needs policy.log_prob_chunk_tokens > 0 (the chunk size); "
                              "got log_prob_chunk_tokens: 0")
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

        if config.chunk_lm_head:
            self._check_chunk_lm_head()
        with self._load_errors():
            tokenizer = AutoTokenizer.from_pretrained(self.source, **self._load_kwargs)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(f"policy.pretrained: the tokenizer of {self.source!r} has neither a pad nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer

        model = self._load_base_model()
        self.frozen_dtype: torch.dtype = next(model.parameters()).dtype  # torch_dtype as loaded ("auto" resolved)
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
            for p in model.parameters():  # float32 adapters on a bf16/fp16 base (peft's default too)
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
        else:  # a full fine-tune trains float32 master weights whatever torch_dtype says
            model.to(torch.float32).requires_grad_(True)
        if config.gradient_checkpointing:
            base = model.get_base_model() if config.lora_rank > 0 else model
            if not getattr(base, "supports_gradient_checkpointing", False):
                raise ConfigError(f"policy.gradient_checkpointing: {type(base).__name__} does not support gradient "
                                  "checkpointing in transformers; set it to false")
            # non-reentrant: no inputs that require grad needed (LoRA's embeddings are frozen)
            kwargs = {"use_reentrant": False}
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
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
        self._head_checked: set[int] = set()  # ids of the models whose logits were checked to be head(hidden)
        if config.chunk_lm_head and (not self._keep_logits or self._base_model().get_output_embeddings() is None):
            raise ConfigError(f"policy.chunk_lm_head: {type(self._base_model()).__name__} has no "
                              "`logits_to_keep` argument or no output embeddings; set it to false")

    supports_chunk_lm_head = True
    """Whether ``chunk_lm_head`` applies to this policy class (the last hidden state is what the
    head reads)."""

    # ------------------------------------------------------------------ loading
    def _check_chunk_lm_head(self) -> None:
        """``chunk_lm_head`` on a policy class or a model configuration that cannot take it: an
        error before any weights load."""
        import transformers

        if not self.supports_chunk_lm_head:
            raise ConfigError(f"policy.chunk_lm_head: not available for {type(self).__name__} "
                              "(only for causal_lm); set it to false")
        with self._load_errors():
            cfg = transformers.AutoConfig.from_pretrained(self.source, **self._load_kwargs)
        post = {k: getattr(cfg, k) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
                if getattr(cfg, k, None) not in (None, 1, 1.0)}
        if post:
            raise ConfigError(f"policy.chunk_lm_head: {cfg.model_type} models post-process their logits "
                              f"({post}), which the chunked head does not; set it to false")

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
        head_chunks = self.config.chunk_lm_head
        logits, mask_logits, hidden, tokens = self._forward_parts(model, rollout, with_values, mask_model,
                                                                  head_chunks=head_chunks)
        mask = rollout.mask.to(device)  # [B, T]
        settings = SamplingSettings.from_meta(rollout.meta)
        top = action_mask_meta(rollout.meta)
        if steps is not None:
            steps = steps.to(device)
            pick = lambda x: x.gather(1, steps.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
            logits = pick(logits) if logits is not None else None
            mask_logits = pick(mask_logits) if mask_logits is not None else None
            hidden = pick(hidden) if hidden is not None else None
            tokens = tokens.gather(1, steps)
            mask = mask.gather(1, steps)
        chunk = self.config.log_prob_chunk_tokens
        ent = None
        if chunk == 0:  # the whole processed distribution at once
            processed = process_logits(logits, settings)
            if mask_logits is not None:
                processed = apply_action_mask(processed, mask_logits, top[0], int(top[1]), self.eos_token_id)
            logp_all = processed.log_softmax(dim=-1)
            lp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            if with_entropy:
                ent = _entropy(logp_all)
        elif head_chunks:  # no [B, T, V] tensor at all: the head runs chunk by chunk, recomputed in backward
            action = None if mask_logits is None else (top[0], int(top[1]), self.eos_token_id)
            lp, ent = _head_chunked_log_probs(_output_head(model), hidden, tokens, mask_logits, settings, action,
                                              chunk, with_entropy)
        else:  # no float32 [B, T, V] tensor: chunks of `chunk` tokens, forward and backward
            action = None if mask_logits is None else (top[0], int(top[1]), self.eos_token_id)
            out = _SampledTokenLogProbs.apply(logits, tokens, mask_logits, settings, action, chunk, with_entropy)
            lp, ent = out if with_entropy else (out, None)
        zero = torch.zeros_like(lp)
        result = {"log_probs": torch.where(mask, lp, zero)}
        if with_entropy:
            result["entropy"] = torch.where(mask, ent, zero)
        if with_values:
            if self.value_head is None:
                raise ValueError("with_values=True needs a value head: set policy.value_head: true")
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
            result["values"] = torch.where(mask, values, zero)
        return result

    def _forward_parts(
        self, model: nn.Module, rollout: Rollout, with_values: bool, mask_model: nn.Module | None,
        head_chunks: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """One pass over prompt + completion: the logits ``[B, T, V]`` that predict the completion
        tokens (``None`` with ``head_chunks``: the caller applies the head), the masking policy's
        logits (with NLPO's mask), the last hidden states ``[B, T, H]`` (``with_values`` or
        ``head_chunks``) and the completion tokens ``[B, T]``."""
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
        if head_chunks:
            # the model stops at the last hidden state (its one kept logit checks that the head is all that follows)
            out = model(**{**kwargs, "logits_to_keep": 1}, output_hidden_states=True)
            self._check_head(model, out.hidden_states[-1][:, -1], out.logits[:, -1])
            logits = None
        else:
            out = model(**kwargs, output_hidden_states=with_values)
            logits = out.logits[:, -(T + 1) : -1]  # [B, T, V]: logits at position P-1+t predict token P+t
        mask_logits = None
        if action_mask_meta(rollout.meta) is not None:
            if mask_model is None:
                raise ValueError("the rollout was sampled under an NLPO action mask but no mask model is set")
            with torch.no_grad():
                mask_logits = mask_model(**kwargs).logits[:, -(T + 1) : -1]
        hidden = out.hidden_states[-1][:, -(T + 1) : -1] if with_values or head_chunks else None  # [B, T, H]
        return logits, mask_logits, hidden, input_ids[:, P:]

    def _check_head(self, model: nn.Module, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Once per model: its logits must be its output embeddings applied to the last hidden
        state, which is what ``chunk_lm_head`` computes (not so for logit soft-capping or scaling)."""
        if id(model) in self._head_checked:
            return
        with torch.no_grad():
            ours = _output_head(model)(hidden).float()
        theirs = logits.detach().float()
        if not torch.allclose(ours, theirs, atol=1e-3 * max(1.0, float(theirs.abs().max())), rtol=1e-3):
            raise ConfigError(
                f"policy.chunk_lm_head: {type(_unwrap(model)).__name__}'s logits are not its output embeddings "
                f"applied to its last hidden state (largest difference {float((ours - theirs).abs().max()):.3g}; "
                "the model post-processes them, e.g. soft-capping); set chunk_lm_head: false")
        self._head_checked.add(id(model))

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
        if not self.is_lora:  # frozen: in torch_dtype, like the reference copy (LoRA's base already is)
            mask_model.to(self.frozen_dtype)
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
    @property
    def is_sharded(self) -> bool:
        """True when the policy's parameters are FSDP2 shards (DTensors)."""
        return any(_is_dtensor(p) for p in self.parameters())

    @contextlib.contextmanager
    def unsharded(self, recurse: bool = False) -> Iterator[None]:
        """Around passes that call ``self.model`` directly (the reference policy, sampling) when the
        policy is sharded with FSDP2 (``fully_shard``, as accelerate's FSDP2 profile does). Every
        process must enter it together. Nothing happens when not sharded.

        ``recurse=False``: the root's own parameters (embeddings, final norm) are gathered for the
        pass and the blocks gather theirs as they run, as in training; enough for one forward that
        every process makes (the reference pass). ``recurse=True``: every parameter is gathered on
        entry and stays gathered until the outermost exit, so that the processes may then call the
        model a different number of times (generation stops at EOS at a different step on each
        process) or only one of them may (the report's samples); it holds the full model in memory
        for the duration. Inside a ``recurse=True`` block, entering again does nothing."""
        unshard = getattr(self, "unshard", None)
        if not callable(unshard) or not hasattr(self, "reshard") or getattr(self, "_all_gathered", False):
            yield
            return
        state = getattr(self, "_get_fsdp_state", lambda: None)()
        if state is not None and callable(getattr(state, "_lazy_init", None)):
            state._lazy_init()  # FSDP2 picks its root at the first forward: make it this policy, not a block
        if not recurse:
            unshard()
            try:
                yield
            finally:
                self.reshard()
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.modules() if isinstance(m, FSDPModule)]
        # no resharding after each forward while gathered (restored on exit): a block's forward then
        # finds its parameters gathered and communicates nothing
        saved = [(g, g.post_forward_mesh_info) for m in units for g in m._get_fsdp_state()._fsdp_param_groups]
        for m in units:
            m.unshard()
        for g, _ in saved:
            g.post_forward_mesh_info = None
        self._all_gathered = True
        try:
            yield
        finally:
            self._all_gathered = False
            for g, info in saved:
                g.post_forward_mesh_info = info
            for m in units:
                m.reshard()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights as full CPU tensors. Parameters sharded with FSDP2 (DTensors) are
        gathered: every process must call it together, and every process gets the full state."""
        if not self.is_sharded:
            return super().trainable_state_dict()
        # gathered where the shards live (a CPU copy of a GPU shard could not be gathered by NCCL)
        return {n: _full_tensor(p.detach()) for n, p in self.named_parameters() if p.requires_grad}

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
        Under FSDP2 every process must call it: the tensors to save are gathered into full ones
        (a collective) and the process of rank 0 writes the same folder as without sharding.
        """
        if self.is_sharded:
            self._save_sharded(path)
            return
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.value_head is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                      str(Path(path) / "value_head.safetensors"))

    def _save_sharded(self, path: str) -> None:
        """:meth:`save_pretrained` of an FSDP2-sharded policy: with LoRA only the adapter's tensors
        are gathered, with full fine-tuning the whole model; one tensor at a time, kept by rank 0."""
        import torch.distributed as dist

        writer = dist.get_rank() == 0
        local = self.model.state_dict()
        if self.is_lora:
            from peft import get_peft_model_state_dict

            # the names peft saves: the adapter (and modules_to_save), never the frozen base model
            adapter = self.model.active_adapter
            names = set(get_peft_model_state_dict(self.model, state_dict=dict(local), adapter_name=adapter,
                                                  save_embedding_layers=False))
            wanted = [k for k in local if k.replace(f".{adapter}", "") in names]  # peft's own renaming
        else:
            wanted = list(local)
        full = {}
        for k in wanted:
            v = _full_tensor(local[k])
            if writer:
                full[k] = v.detach().cpu()
        head = None
        if self.value_head is not None:
            head = {k: _full_tensor(v).detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        if not writer:
            return
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, state_dict=full)
        self.tokenizer.save_pretrained(path)
        if head is not None:
            from safetensors.torch import save_file

            save_file(head, str(Path(path) / "value_head.safetensors"))


def _is_dtensor(value: Any) -> bool:
    return hasattr(value, "device_mesh") and hasattr(value, "placements")


def _full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value, copied to the CPU (a collective); any other tensor as it is."""
    full = getattr(value, "full_tensor", None)
    return full().detach().to("cpu", copy=True).contiguous() if callable(full) else value


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


def _token_chunks(batch: int, steps: int, chunk: int) -> Iterator[tuple[slice, slice]]:
    """``(rows, columns)`` of a ``[batch, steps]`` grid in pieces of at most ``chunk`` tokens
    (whole rows when a row is shorter than a chunk), each a view of a ``[batch, steps, V]`` tensor
    without copying it."""
    if steps >= chunk:
        for b in range(batch):
            for t in range(0, steps, chunk):
                yield slice(b, b + 1), slice(t, t + chunk)
    else:
        rows = max(1, chunk // max(steps, 1))
        for b in range(0, batch, rows):
            yield slice(b, b + rows), slice(None)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _output_head(model: nn.Module) -> nn.Module:
    """The module that maps the last hidden state to logits (LoRA layers on it included)."""
    head = _unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(_unwrap(model)).__name__} has no output embeddings")
    return head


def _assemble(pieces: list[torch.Tensor], batch: int, steps: int, chunk: int) -> torch.Tensor:
    """The ``[batch, steps]`` tensor whose pieces, in :func:`_token_chunks` order, are given."""
    if steps >= chunk:
        per_row = -(-steps // chunk)
        return torch.cat([torch.cat(pieces[b * per_row : (b + 1) * per_row], dim=1) for b in range(batch)], dim=0)
    return torch.cat(pieces, dim=0)


def _head_chunked_log_probs(head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor,
                            mask_logits: torch.Tensor | None, settings: SamplingSettings, action: tuple | None,
                            chunk: int, entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) ``[B, T]`` of ``tokens`` under ``head(hidden [B, T, H])`` processed
    as the sampler did, chunk by chunk (:func:`_token_chunks`): each chunk's logits exist only
    while that chunk is computed, and again while its gradient is (non-reentrant activation
    checkpointing keeps only the chunk's hidden states, a view of ``hidden``)."""
    from torch.utils.checkpoint import checkpoint

    B, T = tokens.shape

    def piece(h: torch.Tensor, tok: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        return _SampledTokenLogProbs._parts(head(h), tok, mask, settings, action, entropy)

    lps, ents = [], []
    track = torch.is_grad_enabled()
    for sl in _token_chunks(B, T, chunk):
        args = (hidden[sl], tokens[sl], None if action is None else mask_logits[sl])
        parts = checkpoint(piece, *args, use_reentrant=False) if track else piece(*args)
        lps.append(parts[0])
        if entropy:
            ents.append(parts[1])
    return _assemble(lps, B, T, chunk), (_assemble(ents, B, T, chunk) if entropy else None)


def _entropy(logp_all: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dimension of log-probabilities; tokens filtered out (``-inf``) count
    as p = 0 and give no NaN gradient."""
    finite = torch.isfinite(logp_all)
    safe = torch.where(finite, logp_all, torch.zeros_like(logp_all))
    return -(safe.exp() * safe * finite).sum(-1)


class _SampledTokenLogProbs(torch.autograd.Function):
    """Log-probs ``[B, T]`` of ``tokens`` under the processed distribution of ``logits [B, T, V]``
    (temperature, top-k, top-p, NLPO's action mask: the sampler's), and with ``entropy`` that
    distribution's entropy ``[B, T]`` too, computed chunk by chunk (:func:`_token_chunks`) with the
    same operations as the unchunked path, so that no float32 ``[B, T, V]`` tensor is ever held: the
    forward keeps only the results; the backward recomputes each chunk's processed distribution from
    the saved logits (kept in their own dtype, bf16 under autocast) and takes that chunk's gradient,
    so that at any time the float32 temporaries are those of one chunk. Per row the arithmetic is
    that of ``process_logits(...).log_softmax(-1)`` followed by the gather (and :func:`_entropy`),
    hence the same log-probs, entropies and gradients."""

    @staticmethod
    def _parts(logits, tokens, mask_logits, settings, action, entropy) -> tuple[torch.Tensor, ...]:
        z = process_logits(logits, settings)
        if action is not None:
            z = apply_action_mask(z, mask_logits, action[0], action[1], action[2])
        logp_all = z.log_softmax(dim=-1)
        lp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return (lp, _entropy(logp_all)) if entropy else (lp,)

    @staticmethod
    def forward(ctx, logits, tokens, mask_logits, settings, action, chunk, entropy=False):
        B, T = tokens.shape
        outs = [torch.empty((B, T), dtype=torch.float32, device=logits.device) for _ in range(2 if entropy else 1)]
        for sl in _token_chunks(B, T, chunk):
            parts = _SampledTokenLogProbs._parts(
                logits[sl], tokens[sl], None if action is None else mask_logits[sl], settings, action, entropy)
            for out, part in zip(outs, parts):
                out[sl] = part
        ctx.settings, ctx.action, ctx.chunk, ctx.entropy = settings, action, chunk, entropy
        ctx.save_for_backward(logits, tokens, *([mask_logits] if action is not None else []))
        return tuple(outs) if entropy else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        logits, tokens, *rest = ctx.saved_tensors
        mask_logits = rest[0] if rest else None
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        B, T = tokens.shape
        for sl in _token_chunks(B, T, ctx.chunk):
            with torch.enable_grad():
                part = logits[sl].detach().requires_grad_(True)
                outs = _SampledTokenLogProbs._parts(
                    part, tokens[sl], None if ctx.action is None else mask_logits[sl], ctx.settings, ctx.action,
                    ctx.entropy)
                (grad_logits[sl],) = torch.autograd.grad(outs, part, [g[sl] for g in grads])
        return grad_logits, None, None, None, None, None, None
