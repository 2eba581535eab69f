"""Text rewards beyond sentiment: embedding similarity, classifiers, answer checking, length
penalties, base-model perplexity, and any Python callable with TRL's batched reward signature.

Every reward here reads the rollout's ``texts`` (and ``completion_ids``) and returns ``[B]``. The
answer-checking rewards are written as TRL-style functions::

    fn(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **columns) -> list[float | None]

where ``columns`` are the prompt source's extra columns (one value per sample). A plugin turns any
such function into a reward component with :func:`callable_reward_spec`::

    from polyrl import hookimpl
    from polyrl.rewards.text import callable_reward_spec

    def brevity(prompts, completions, completion_ids, **columns):
        return [1.0 / (1 + len(ids)) for ids in completion_ids]

    @hookimpl
    def polyrl_rewards():
        return [callable_reward_spec("brevity", brevity)]

and the built-in ``python`` reward calls one named in the config (``function: my_module:brevity``).
``None`` in the returned list means "does not apply" and counts as 0.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from polyrl import ComponentSpec, ConfigError, Reward, Rollout, hookimpl
from polyrl.paths import model_load_errors, resolve_path

__all__ = [
    "CallableReward",
    "callable_reward_spec",
    "exact_match",
    "numeric_match",
    "EmbeddingSimilarity",
    "ClassifierReward",
    "LengthPenalty",
    "BasePerplexity",
]

TRLRewardFn = Callable[..., list]


# ------------------------------------------------------------------------------ callables
def _columns(rollout: Rollout) -> dict[str, list[Any]]:
    """The contexts' extra columns as lists (one value per sample; None where a sample lacks one)."""
    keys = sorted({k for c in rollout.contexts for k in c.extra})
    return {k: [c.extra.get(k) for c in rollout.contexts] for k in keys}


def call_trl_reward(fn: TRLRewardFn, rollout: Rollout) -> torch.Tensor:
    """Call ``fn`` with TRL's batched signature on a text rollout; ``[B]`` float32 (None -> 0)."""
    texts = list(rollout.outputs["texts"])
    ids = rollout.outputs.get("completion_ids") or [[] for _ in texts]
    values = fn(prompts=list(rollout.prompts), completions=texts, completion_ids=[list(x) for x in ids],
                **_columns(rollout))
    values = list(values)
    if len(values) != len(texts):
        raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} returned {len(values)} values for {len(texts)} samples")
    out = [0.0 if v is None else float(v) for v in values]
    return torch.tensor(out, dtype=torch.float32, device=rollout.log_probs.device)


class CallableReward(Reward):
    """A reward from a function with TRL's batched signature (see the module doc)."""

    reads = "texts"

    def __init__(self, fn: TRLRewardFn, **kwargs: Any) -> None:
        self.fn = fn
        self.kwargs = kwargs

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        fn = self.fn if not self.kwargs else (lambda **kw: self.fn(**kw, **self.kwargs))
        return call_trl_reward(fn, rollout)


@dataclass
class CallableConfig:
    """A reward function registered by a plugin (no settings)."""


def callable_reward_spec(name: str, fn: TRLRewardFn, description: str = "") -> ComponentSpec:
    """A reward component ``name`` that calls ``fn`` with TRL's batched signature."""
    return ComponentSpec(
        name,
        lambda cfg, policy=None: CallableReward(fn),
        CallableConfig,
        modality="text",
        reads=("texts",),
        description=description or (fn.__doc__ or "").strip().split("\n")[0] or f"the Python function {name}",
    )


@dataclass
class PythonRewardConfig:
    """Any importable Python function with TRL's batched reward signature."""

    function: str = ""
    """``module.path:function`` (or ``module.path.function``) to import and call."""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra keyword arguments passed to the function on every call."""

    def check(self) -> None:
        if not self.function:
            raise ConfigError("rewards.<name>.function: required, e.g. 'my_package.rewards:brevity'")


def import_function(path: str) -> TRLRewardFn:
    """The callable at ``module:attr`` or ``module.attr``."""
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"rewards.function: cannot import {path!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"rewards.function: {path!r} is not callable")
    return fn


# ------------------------------------------------------------------------------ answer checking
def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, articles or extra white space (SQuAD's normalisation)."""
    text = text.lower()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prompts: list[str], completions: list[str], completion_ids: list[list[int]] | None = None,
                answer: list[Any] | None = None, mode: str = "normalized", **columns: Any) -> list[float | None]:
    """1.0 where the completion matches the ``answer`` column, else 0.0 (None without an answer).

    ``mode``: ``normalized`` (SQuAD normalisation of both), ``exact`` (after stripping white
    space), ``contains`` (the normalised answer occurs as whole words in the normalised completion) or
    ``first_line`` (the completion's first line, normalised).
    """
    if answer is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for text, ans in zip(completions, answer):
        if ans is None:
            out.append(None)
            continue
        answers = ans if isinstance(ans, (list, tuple)) else [ans]
        if mode == "exact":
            hit = any(text.strip() == str(a).strip() for a in answers)
        elif mode == "contains":
            padded = f" {normalize_answer(text)} "
            hit = any(f" {normalize_answer(str(a))} " in padded for a in answers)  # whole words
        elif mode == "first_line":
            first = text.strip().split("\n")[0] if text.strip() else ""
            hit = any(normalize_answer(first) == normalize_answer(str(a)) for a in answers)
        else:
            hit = any(normalize_answer(text) == normalize_answer(str(a)) for a in answers)
        out.append(1.0 if hit else 0.0)
    return out


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def extract_number(text: str, which: str = "last") -> float | None:
    """The last (or first) number written in ``text`` (``1,234.5`` and ``-3e2`` included), or None.
    A GSM8K-style ``#### 42`` answer line wins when present."""
    marked = re.search(r"####\s*(" + _NUMBER.pattern + ")", text)
    if marked:
        found = [marked.group(1)]
    else:
        found = _NUMBER.findall(text)
    if not found:
        return None
    raw = (found[-1] if which == "last" else found[0]).replace(",", "")
    try:
        return float(raw)
    except ValueError:
        return None


def numeric_match(prompts: list[str], completions: list[str], completion_ids: list[list[int]] | None = None,
                  answer: list[Any] | None = None, tolerance: float = 1e-6, which: str = "last",
                  **columns: Any) -> list[float | None]:
    """1.0 where the completion's last (``which: first``: first) number equals the numeric
    ``answer`` column within ``tolerance`` (relative to max(1, |answer|)), else 0.0."""
    if answer is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for text, ans in zip(completions, answer):
        if ans is None:
            out.append(None)
            continue
        target = extract_number(str(ans)) if not isinstance(ans, (int, float)) else float(ans)
        got = extract_number(text, which)
        if target is None:
            out.append(None)
        else:
            out.append(1.0 if got is not None and abs(got - target) <= tolerance * max(1.0, abs(target)) else 0.0)
    return out


@dataclass
class ExactMatchConfig:
    """Checks completions against a reference answer column of the prompt source."""

    answer_column: str = "answer"
    """The prompt column (JSONL / dataset) holding the reference answer (or a list of accepted ones)."""
    mode: Literal["normalized", "exact", "contains", "first_line"] = "normalized"
    """normalized: equal after SQuAD normalisation; exact: equal after stripping white space;
    contains: the normalised answer occurs in the completion; first_line: the first line equals it."""


@dataclass
class NumericMatchConfig:
    """Checks the number a completion ends with against a numeric answer column."""

    answer_column: str = "answer"
    """The prompt column holding the answer (a number, or text whose last number is the answer,
    e.g. GSM8K's ``... #### 42``)."""
    tolerance: float = 1e-6
    """Accepted difference, relative to max(1, |answer|)."""
    which: Literal["last", "first"] = "last"
    """Which number of the completion is its answer (a ``#### n`` line always wins)."""


class AnswerReward(Reward):
    """``exact_match`` / ``numeric_match`` on a rollout, reading the answer column."""

    reads = "texts"

    def __init__(self, fn: TRLRewardFn, column: str, **kwargs: Any) -> None:
        self.fn, self.column, self.kwargs = fn, column, kwargs

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        missing = [c.prompt for c in rollout.contexts if self.column not in c.extra]
        if missing:
            raise ValueError(
                f"answer_column {self.column!r}: prompt {missing[0]!r} has no such column "
                f"(give prompts as JSONL or a dataset with that column)"
            )
        answers = [c.extra[self.column] for c in rollout.contexts]
        return call_trl_reward(lambda **kw: self.fn(**{**kw, "answer": answers}, **self.kwargs), rollout)


# ------------------------------------------------------------------------------ length
@dataclass
class LengthPenaltyConfig:
    """A penalty on the completion length in tokens."""

    target: int = 0
    """Length in tokens that is not penalised."""
    coef: float = 0.01
    """Penalty per token beyond (or, with ``two_sided``, also short of) the target."""
    two_sided: bool = False
    """Also penalise completions shorter than ``target``."""
    normalize: bool = False
    """Divide the excess by ``target`` (a relative penalty)."""

    def check(self) -> None:
        if self.target < 0:
            raise ConfigError(f"rewards.<name>.target must be >= 0, got {self.target}")
        if self.normalize and self.target == 0:
            raise ConfigError("rewards.<name>.normalize needs target > 0")


class LengthPenalty(Reward):
    """``-coef * max(0, n - target)`` (or ``-coef * |n - target|``) for ``n`` completion tokens
    (the policy's actions, ``rollout.mask``: forced dataset tokens do not count)."""

    reads = "texts"

    def __init__(self, config: LengthPenaltyConfig) -> None:
        self.config = config

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        cfg = self.config
        n = rollout.mask.float().sum(1)
        excess = (n - cfg.target).abs() if cfg.two_sided else (n - cfg.target).clamp(min=0)
        if cfg.normalize:
            excess = excess / cfg.target
        return -cfg.coef * excess


# ------------------------------------------------------------------------------ models
def _device(policy: Any) -> torch.device:
    return getattr(policy, "device", None) or torch.device("cpu")


def _texts(rollout: Rollout, include_prompt: bool) -> list[str]:
    texts = list(rollout.outputs["texts"])
    return [p + t for p, t in zip(rollout.prompts, texts)] if include_prompt else texts


@dataclass
class EmbeddingSimilarityConfig:
    """Cosine similarity of sentence embeddings (any sentence-transformers model folder)."""

    model: str = ""
    """A sentence-transformers model folder (or Hub id) to embed with."""
    reference_column: str | None = None
    """The prompt column holding each sample's reference text; null uses ``references``."""
    references: list[str] | None = None
    """Fixed target texts: the reward is the similarity to the closest one (when no column is given)."""
    include_prompt: bool = False
    """Embed prompt + completion instead of the completion alone."""
    batch_size: int = 64
    """Texts embedded together."""
    trust_remote_code: bool = False
    """Allow model code from the Hub repository to run (only passed when true)."""

    def check(self) -> None:
        if not self.model:
            raise ConfigError("rewards.<name>.model: required (a sentence-transformers model folder)")
        if (self.reference_column is None) == (not self.references):
            raise ConfigError("rewards.<name>: give exactly one of reference_column and references")


class EmbeddingSimilarity(Reward):
    """``cos(embed(completion), embed(reference))`` in ``[-1, 1]``."""

    reads = "texts"

    def __init__(self, config: EmbeddingSimilarityConfig, device: torch.device | str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self.config = config
        kwargs = {"trust_remote_code": True} if config.trust_remote_code else {}
        with model_load_errors("rewards.embedding_similarity.model", config.model, "a local sentence-transformers folder"):
            self.model = SentenceTransformer(resolve_path(config.model), device=str(device), **kwargs)
        self.model.eval()
        self._fixed = self._embed(list(config.references)) if config.references else None

    def _embed(self, texts: list[str]) -> torch.Tensor:
        emb = self.model.encode(texts, batch_size=self.config.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return emb.float().cpu()

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        emb = self._embed(_texts(rollout, self.config.include_prompt))
        if self._fixed is not None:
            score = (emb @ self._fixed.T).max(1).values
        else:
            col = self.config.reference_column
            missing = [c.prompt for c in rollout.contexts if col not in c.extra]
            if missing:
                raise ValueError(f"reference_column {col!r}: prompt {missing[0]!r} has no such column")
            ref = self._embed([str(c.extra[col]) for c in rollout.contexts])
            score = (emb * ref).sum(1)
        return score.to(rollout.log_probs.device)


@dataclass
class ClassifierConfig:
    """The probability of a label under a transformers sequence classifier (RL4LMs' IMDB reward:
    P(positive) from a DistilBERT sentiment classifier)."""

    model: str = ""
    """A transformers sequence-classification model folder (or Hub id)."""
    label: str = "1"
    """The label whose probability is the reward: an index (``"1"``) or a name from the model's
    ``id2label`` (``POSITIVE``)."""
    output: Literal["probability", "logit", "log_probability"] = "probability"
    """Reward the label's probability, its raw logit, or its log-probability."""
    include_prompt: bool = False
    """Classify prompt + completion (RL4LMs' ``include_prompt_for_eval``) instead of the completion."""
    max_length: int = 512
    """Longer texts are truncated to this many classifier tokens."""
    batch_size: int = 64
    """Texts classified together."""
    trust_remote_code: bool = False
    """Allow model code from the Hub repository to run (only passed when true)."""

    def check(self) -> None:
        if not self.model:
            raise ConfigError("rewards.<name>.model: required (a transformers sequence-classification model folder)")


class ClassifierReward(Reward):
    """P(label | text) (or its logit) under ``AutoModelForSequenceClassification``.

    The classifier has its own tokenizer, so it reads the decoded texts (the policy's token ids are
    not re-encoded anywhere in training).
    """

    reads = "texts"

    def __init__(self, config: ClassifierConfig, device: torch.device | str = "cpu") -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.config = config
        source = resolve_path(config.model)
        kwargs = {"trust_remote_code": True} if config.trust_remote_code else {}
        with model_load_errors("rewards.classifier.model", config.model, "a local transformers sequence-classification folder"):
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            self.model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs).to(device).eval()
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        self.index = self._label_index(config.label)

    def _label_index(self, label: str) -> int:
        id2label = {int(k): str(v) for k, v in (self.model.config.id2label or {}).items()}
        n = self.model.config.num_labels
        if label.lstrip("-").isdigit():
            i = int(label)
            if not 0 <= i < n:
                raise ConfigError(f"rewards.<name>.label={label!r}: the classifier has {n} labels; accepted: 0..{n - 1}")
            return i
        for i, name in id2label.items():
            if name.lower() == label.lower():
                return i
        raise ConfigError(f"rewards.<name>.label={label!r}: not a label of the classifier; accepted: {sorted(id2label.values())} or an index")

    @torch.no_grad()
    def scores(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.config.batch_size):
            enc = self.tokenizer(texts[i : i + self.config.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.config.max_length).to(self.device)
            logits = self.model(**enc).logits.float()
            if self.config.output == "logit":
                out.append(logits[:, self.index])
            elif self.config.output == "log_probability":
                out.append(logits.log_softmax(-1)[:, self.index])
            else:
                out.append(logits.softmax(-1)[:, self.index])
        return torch.cat(out).cpu() if out else torch.zeros(0)

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        return self.scores(_texts(rollout, self.config.include_prompt)).to(rollout.log_probs.device)


@dataclass
class PerplexityConfig:
    """Perplexity of the completions under the base model (RL4LMs reports it next to the task
    score); usually given weight 0 so that it is only logged."""

    model: str | None = None
    """A causal LM folder sharing the policy's tokenizer; null: the policy's own pretrained model
    (without its adapter or value head)."""
    output: Literal["perplexity", "nll"] = "perplexity"
    """Per sample: ``exp(mean token NLL)`` or the mean token NLL itself."""


class BasePerplexity(Reward):
    """Per-sample perplexity of the policy's tokens under the base model, with the plain softmax
    (temperature 1, no top-k/top-p), given the prompt (and any forced dataset prefix).

    The base model is a separate frozen copy built like the policy (same class and tokenizer), so
    it scores the recorded token ids directly and is safe to call while the policy samples.
    """

    reads = "texts"

    def __init__(self, config: PerplexityConfig, policy: Any) -> None:
        if policy is None or not dataclasses.is_dataclass(getattr(policy, "config", None)):
            raise ConfigError("rewards.<name>: perplexity needs a transformers text policy (causal_lm, seq2seq_lm)")
        self.config = config
        base_cfg = policy.config
        changes: dict[str, Any] = {}
        for name, value in (("lora_rank", 0), ("value_head", False)):
            if hasattr(base_cfg, name):
                changes[name] = value
        if config.model is not None:
            changes["pretrained"] = config.model
        self.base = type(policy)(dataclasses.replace(base_cfg, **changes)).to(_device(policy))
        self.base.requires_grad_(False).eval()
        if len(self.base.tokenizer) != len(policy.tokenizer):
            raise ConfigError(
                f"rewards.<name>.model={config.model!r}: its tokenizer ({len(self.base.tokenizer)} tokens) differs from "
                f"the policy's ({len(policy.tokenizer)}); accepted: a model sharing the policy's tokenizer, or null"
            )

    @torch.no_grad()
    def token_log_probs(self, rollout: Rollout) -> torch.Tensor:
        """``[B, T]`` log-probs of the policy's tokens under the base model (0 off the mask)."""
        plain = rollout.select(torch.arange(rollout.batch_size))
        plain.meta = {k: v for k, v in rollout.meta.items()
                      if k not in ("temperature", "top_k", "top_p") and not k.startswith("nlpo_")}
        return self.base(plain)

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        lp = self.token_log_probs(rollout).float()
        n = rollout.mask.float().sum(1).clamp(min=1).to(lp.device)
        nll = -lp.sum(1) / n
        out = nll if self.config.output == "nll" else nll.exp()
        return out.to(rollout.log_probs.device)


# ------------------------------------------------------------------------------ registration
@hookimpl
def polyrl_rewards() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            "embedding_similarity",
            lambda cfg, policy=None: EmbeddingSimilarity(cfg, device=_device(policy)),
            EmbeddingSimilarityConfig,
            modality="text",
            reads=("texts",),
            description="cosine similarity of sentence-transformers embeddings to a reference text",
        ),
        ComponentSpec(
            "classifier",
            lambda cfg, policy=None: ClassifierReward(cfg, device=_device(policy)),
            ClassifierConfig,
            modality="text",
            reads=("texts",),
            description="probability of a label under a transformers sequence classifier (e.g. P(positive))",
        ),
        ComponentSpec(
            "exact_match",
            lambda cfg, policy=None: AnswerReward(exact_match, cfg.answer_column, mode=cfg.mode),
            ExactMatchConfig,
            modality="text",
            reads=("texts",),
            description="1 if the completion matches the answer column (normalised, exact, contains, first line)",
        ),
        ComponentSpec(
            "numeric_match",
            lambda cfg, policy=None: AnswerReward(numeric_match, cfg.answer_column, tolerance=cfg.tolerance, which=cfg.which),
            NumericMatchConfig,
            modality="text",
            reads=("texts",),
            description="1 if the completion's final number equals the numeric answer column",
        ),
        ComponentSpec(
            "length_penalty",
            lambda cfg, policy=None: LengthPenalty(cfg),
            LengthPenaltyConfig,
            modality="text",
            reads=("texts",),
            description="minus a penalty per completion token beyond a target length",
        ),
        ComponentSpec(
            "perplexity",
            lambda cfg, policy=None: BasePerplexity(cfg, policy),
            PerplexityConfig,
            modality="text",
            reads=("texts",),
            description="perplexity of the completions under the base model (log it with weight 0)",
        ),
        ComponentSpec(
            "python",
            lambda cfg, policy=None: CallableReward(import_function(cfg.function), **cfg.kwargs),
            PythonRewardConfig,
            modality="text",
            reads=("texts",),
            description="any Python function with TRL's batched signature (function: module:name)",
        ),
    ]
