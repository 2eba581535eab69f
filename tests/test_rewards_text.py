"""Text rewards on real (tiny, built here from configs) models: classifier, sentence embeddings,
base-model perplexity; answer checking, length penalties and TRL-style callables by hand."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from polyrl import ConfigError, Context, Rollout
from polyrl.host import Host
from polyrl.rewards import text as text_rewards
from polyrl.rewards.text import (
    BasePerplexity,
    ClassifierConfig,
    ClassifierReward,
    EmbeddingSimilarity,
    EmbeddingSimilarityConfig,
    LengthPenalty,
    LengthPenaltyConfig,
    PerplexityConfig,
    callable_reward_spec,
    exact_match,
    extract_number,
    numeric_match,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny-gpt2"


def text_rollout(prompts: list[str], texts: list[str], extra: list[dict] | None = None, lengths: list[int] | None = None) -> Rollout:
    b = len(texts)
    lengths = lengths or [3] * b
    t = max(lengths)
    mask = torch.tensor([[j < n for j in range(t)] for n in lengths])
    return Rollout(
        contexts=[Context(prompt=p, group=i, extra=(extra[i] if extra else {})) for i, p in enumerate(prompts)],
        log_probs=torch.zeros(b, t), mask=mask,
        outputs={"texts": texts, "completion_ids": [[1] * n for n in lengths]},
    )


# ---------------------------------------------------------------------------- answer checking
def test_exact_match_modes():
    comps = ["The Eiffel Tower!", "  eiffel tower ", "It is the Eiffel tower.", "Paris\nbecause", "x"]
    answers = ["eiffel tower", "eiffel tower", "Eiffel Tower", "paris", None]
    assert exact_match([""] * 5, comps, answer=answers) == [1.0, 1.0, 0.0, 0.0, None]
    assert exact_match([""] * 5, comps, answer=answers, mode="contains") == [1.0, 1.0, 1.0, 1.0, None]
    assert exact_match([""], ["parisian food"], answer=["paris"], mode="contains") == [0.0]  # whole words only
    assert exact_match([""] * 5, comps, answer=answers, mode="first_line") == [1.0, 1.0, 0.0, 1.0, None]
    assert exact_match([""] * 2, ["eiffel tower", "Eiffel tower"], answer=["eiffel tower", "eiffel tower"], mode="exact") == [1.0, 0.0]
    assert exact_match([""], ["la tour"], answer=[["eiffel tower", "la tour"]]) == [1.0]  # several accepted answers
    assert exact_match([""] * 2, ["a", "b"]) == [None, None]


def test_numeric_match_and_number_extraction():
    assert extract_number("so 3 apples and 1,234.5 pears") == 1234.5
    assert extract_number("so 3 apples and 1,234.5 pears", "first") == 3.0
    assert extract_number("-2e3 is it") == -2000.0
    assert extract_number("work: 5 + 7 = 12\n#### 12 then 99") == 12.0
    assert extract_number("no digits") is None
    comps = ["the answer is 42", "it is 41.9999999", "42 or 7", "none", "72"]
    answers = [42, "#### 42", "42", 42, "Natalia sold 48/2 = 24 clips ... #### 72"]
    assert numeric_match([""] * 5, comps, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert numeric_match([""] * 5, comps, answer=answers, which="first") == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert numeric_match([""], ["1000.5"], answer=[1000], tolerance=1e-3) == [1.0]  # relative tolerance


def test_answer_rewards_read_the_prompt_column():
    host = Host()
    spec = host.registry["reward"]["numeric_match"]
    fn = spec.factory(spec.config_cls(answer_column="solution"))
    r = text_rollout(["2+2=", "3*3="], ["4", "it is 10"], extra=[{"solution": "4"}, {"solution": 9}])
    assert fn(r).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="answer_column 'solution'"):
        fn(text_rollout(["2+2="], ["4"]))


def test_length_penalty_by_hand():
    r = text_rollout(["a"] * 3, ["x", "y", "z"], lengths=[2, 5, 9])
    assert LengthPenalty(LengthPenaltyConfig(target=5, coef=0.5))(r).tolist() == [0.0, 0.0, -2.0]
    assert LengthPenalty(LengthPenaltyConfig(target=5, coef=0.5, two_sided=True))(r).tolist() == [-1.5, 0.0, -2.0]
    assert LengthPenalty(LengthPenaltyConfig(target=4, coef=1.0, normalize=True))(r).tolist() == [0.0, -0.25, -1.25]
    with pytest.raises(ConfigError):
        LengthPenaltyConfig(target=0, normalize=True).check()


# ---------------------------------------------------------------------------- callables
def test_callable_reward_spec_uses_trl_signature():
    seen = {}

    def fn(prompts, completions, completion_ids, **columns):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, columns=columns)
        return [float(len(c)) for c in completions]

    spec = callable_reward_spec("chars", fn)
    assert spec.name == "chars" and spec.reads == ("texts",) and spec.modality == "text"
    reward = spec.factory(spec.config_cls())
    r = text_rollout(["p1", "p2"], ["abc", "de"], extra=[{"answer": 1, "topic": "x"}, {"answer": 2}], lengths=[3, 2])
    assert reward(r).tolist() == [3.0, 2.0]
    assert seen["prompts"] == ["p1", "p2"] and seen["completion_ids"] == [[1, 1, 1], [1, 1]]
    assert seen["columns"] == {"answer": [1, 2], "topic": ["x", None]}


def test_python_reward_imports_a_function_and_maps_none_to_zero(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, completion_ids, scale=1.0, **columns):\n"
        "    return [None if c == 'skip' else scale / (1 + len(i)) for c, i in zip(completions, completion_ids)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = {
        "prompts": {"items": ["a"]},
        "policy": {"name": "causal_lm"},
        "sampler": {"name": "generate"},
        "rewards": {"short": {"name": "python", "function": "my_rewards:brevity", "kwargs": {"scale": 2.0}}},
        "update": {"name": "reinforce", "train_batch_size": 4},
    }
    host = Host()
    cfg = host.build_config(data)
    fn = host.registry["reward"]["python"].factory(cfg.rewards[0].params)
    r = text_rollout(["a", "b"], ["hello", "skip"], lengths=[3, 1])
    assert fn(r).tolist() == [pytest.approx(0.5), 0.0]
    bad = copy.deepcopy(data)
    bad["rewards"]["short"]["function"] = "my_rewards:nothing"
    cfg = host.build_config(bad)
    with pytest.raises(ConfigError, match="cannot import 'my_rewards:nothing'"):
        host.registry["reward"]["python"].factory(cfg.rewards[0].params)


# ---------------------------------------------------------------------------- model-based rewards
@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 sequence classifier (random weights) with the tiny world's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    out = tmp_path_factory.mktemp("clf")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=1130, n_embd=32, n_layer=1, n_head=2, n_positions=128, num_labels=2,
                     pad_token_id=0, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    GPT2ForSequenceClassification(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(out)
    return out


def test_classifier_reward_is_the_label_probability(classifier_dir: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["This movie was great fun.", "Awful.", "I bought this kettle and it is really solid and works well."]
    reward = ClassifierReward(ClassifierConfig(model=str(classifier_dir), label="POSITIVE"))
    got = reward(text_rollout(["p"] * 3, texts))
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    tok = AutoTokenizer.from_pretrained(classifier_dir)
    with torch.no_grad():  # one text at a time: no padding involved
        expected = [model(**tok(t, return_tensors="pt")).logits.softmax(-1)[0, 1].item() for t in texts]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    by_index = ClassifierReward(ClassifierConfig(model=str(classifier_dir), label="0"))(text_rollout(["p"] * 3, texts))
    assert (by_index + got).tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    with_prompt = ClassifierReward(ClassifierConfig(model=str(classifier_dir), label="1", include_prompt=True))
    assert with_prompt(text_rollout(["p"] * 3, texts)).tolist() != pytest.approx(expected, abs=1e-6)
    with pytest.raises(ConfigError, match="accepted: \\['NEGATIVE', 'POSITIVE'\\]"):
        ClassifierReward(ClassifierConfig(model=str(classifier_dir), label="neutral"))


@pytest.fixture(scope="module")
def sentence_model_dir(tmp_path_factory) -> Path:
    """A tiny sentence-transformers model: a random tiny GPT-2 encoder, mean pooling."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    base = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(1)
    GPT2Model(GPT2Config(vocab_size=1130, n_embd=32, n_layer=1, n_head=2, n_positions=128)).save_pretrained(base)
    tok = AutoTokenizer.from_pretrained(TINY)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(base)
    encoder = Transformer(str(base))
    st = SentenceTransformer(modules=[encoder, Pooling(encoder.get_embedding_dimension(), "mean")])
    out = tmp_path_factory.mktemp("st")
    st.save(str(out))
    return out


def test_embedding_similarity(sentence_model_dir: Path):
    from sentence_transformers import SentenceTransformer

    texts = ["The plot was brilliant.", "The battery is awful."]
    refs = ["The plot was brilliant.", "I loved the soundtrack."]
    reward = EmbeddingSimilarity(EmbeddingSimilarityConfig(model=str(sentence_model_dir), reference_column="ref"))
    got = reward(text_rollout(["p", "p"], texts, extra=[{"ref": refs[0]}, {"ref": refs[1]}]))
    st = SentenceTransformer(str(sentence_model_dir))
    a, b = st.encode(texts, convert_to_tensor=True), st.encode(refs, convert_to_tensor=True)
    expected = torch.nn.functional.cosine_similarity(a, b).tolist()
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert got[0].item() == pytest.approx(1.0, abs=1e-5)  # identical texts
    fixed = EmbeddingSimilarity(EmbeddingSimilarityConfig(model=str(sentence_model_dir), references=refs))
    best = torch.nn.functional.cosine_similarity(b[None, :, :], a[:, None, :], dim=-1).max(1).values
    assert fixed(text_rollout(["p", "p"], texts)).tolist() == pytest.approx(best.tolist(), abs=1e-5)
    with pytest.raises(ConfigError, match="exactly one of reference_column and references"):
        EmbeddingSimilarityConfig(model="x").check()


def test_base_perplexity_scores_recorded_tokens_under_the_base_model():
    from transformers import AutoModelForCausalLM

    from polyrl.plugins.text import CausalLMConfig, CausalLMPolicy, TextSampler, TextSamplerConfig

    policy = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), lora_rank=4))
    with torch.no_grad():  # the trained policy differs from its base
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.3)
    reward = BasePerplexity(PerplexityConfig(), policy)
    prompts = ["This movie was", "I bought this kettle and"]
    r = TextSampler(TextSamplerConfig(max_new_tokens=10, temperature=0.7, top_k=20)).sample(
        policy, [Context(prompt=p) for p in prompts], torch.Generator().manual_seed(0))
    got = reward(r)
    base = AutoModelForCausalLM.from_pretrained(TINY).eval()
    for i, prompt in enumerate(prompts):
        ids = policy.tokenizer(prompt)["input_ids"]
        comp = r.outputs["completion_ids"][i]
        with torch.no_grad():
            logp = base(input_ids=torch.tensor([ids + comp])).logits[0].log_softmax(-1)
        nll = -sum(logp[len(ids) - 1 + t, tok].item() for t, tok in enumerate(comp)) / len(comp)
        assert got[i].item() == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-4)
    assert all(p.requires_grad is False for p in reward.base.parameters())
    nll_reward = BasePerplexity(PerplexityConfig(output="nll"), policy)
    assert nll_reward(r).exp().tolist() == pytest.approx(got.tolist(), rel=1e-5)


def test_text_rewards_are_registered_with_documented_configs():
    from polyrl.config import field_docs

    specs = {s.name: s for s in text_rewards.polyrl_rewards()}
    assert set(specs) == {"embedding_similarity", "classifier", "exact_match", "numeric_match", "length_penalty",
                          "perplexity", "python"}
    for spec in specs.values():
        assert spec.reads == ("texts",) and spec.modality == "text"
        docs = field_docs(spec.config_cls)
        missing = [f for f in spec.config_cls.__dataclass_fields__ if not docs.get(f)]
        assert not missing, (spec.name, missing)
