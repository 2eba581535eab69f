"""A corpus of hostile and broken inputs: configs, overrides, prompt files, demonstrations and lilGym
programs. Each must end in one line naming the problem, with no traceback, in bounded time and
memory, before any model loads."""

from __future__ import annotations

import io
import resource
import time
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pytest

from polyrl.cli import main
from polyrl.host import Host
from polyrl.types import ConfigError

ROOT = Path(__file__).parent.parent
SECONDS = 10.0
MEMORY_MB = 400

GOOD = """\
run: {iterations: 2, prompts_per_iteration: 2, samples_per_prompt: 2, progress: false, report: false, output_dir: OUT}
prompts: {file: assets/tiny-gpt2/prompts.txt}
policy: {name: causal_lm, pretrained: assets/tiny-gpt2, lora_rank: 4}
sampler: {name: generate, max_new_tokens: 4}
rewards: {sentiment: {weight: 1.0}}
update: {name: grpo, train_batch_size: 4}
"""


def bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


# name -> (file content as bytes or str, fragment the one error line must contain)
CONFIGS: dict[str, tuple[bytes | str, str]] = {
    "alias_bomb": (bomb(), "expands to more than"),
    "many_aliases": ("a: &x 1\nb: [" + ", ".join(["*x"] * 400) + "]\n", "more than 256 YAML aliases"),
    "deep_nesting": ("a: " + "[" * 3000 + "]" * 3000 + "\n", "nesting deeper than"),
    "deep_mapping": ("".join("  " * i + f"k{i}:\n" for i in range(60)) + "  " * 60 + "v: 1\n", "nesting deeper than"),
    "syntax_error": ("run: {iterations: 2\npolicy: x\n", "YAML syntax error"),
    "tab_indent": ("run:\n\titerations: 2\n", "YAML syntax error"),
    "duplicate_key": (GOOD + "run: {iterations: 3}\n", "duplicate key 'run'"),
    "unhashable_key": ("? [a, b]\n: 1\n", "mapping key must be a plain value"),
    "binary": (b"\x00\x01\x02PK\x03\x04" * 50, "binary file"),
    "latin1": ("run: {output_dir: caf\xe9}\n".encode("latin-1"), "not UTF-8"),
    "python_tag": ("run: !!python/object/apply:os.system [echo pwned]\n", "could not determine a constructor"),
    "top_level_list": ("- run\n- policy\n", "top level must be a mapping"),
    "scalar": ("just a string\n", "top level must be a mapping"),
    "unknown_top_key": (GOOD + "rewardz: {}\n", "unknown top-level key"),
    "unknown_policy": (GOOD.replace("causal_lm", "causal_llm"), "unknown policy 'causal_llm'"),
    "long_value_echo": (GOOD.replace("iterations: 2", "iterations: '" + "9" * 50000 + "'"), "characters)"),
    "empty_output_dir": (GOOD.replace("output_dir: OUT", "output_dir: ''"), "run.output_dir is empty"),
    "lr_inf": (GOOD + "optimizer: {lr: .inf}\n", "optimizer.lr"),
    "lr_nan": (GOOD + "optimizer: {lr: .nan}\n", "optimizer.lr"),
    "weight_nan": (GOOD.replace("weight: 1.0", "weight: .nan"), "rewards.sentiment.weight"),
    "beta_nan": (GOOD.replace("train_batch_size: 4", "train_batch_size: 4, beta: .nan"), "update.beta"),
    "max_grad_norm_nan": (GOOD + "optimizer: {max_grad_norm: .nan}\n", "optimizer.max_grad_norm"),
    "temperature_nan": (GOOD.replace("max_new_tokens: 4", "max_new_tokens: 4, temperature: .nan"), "sampler.temperature"),
    "adam_beta1": (GOOD + "optimizer: {beta1: 1.0}\n", "optimizer.beta1"),
    "adam_eps": (GOOD + "optimizer: {eps: -1.0e-8}\n", "optimizer.eps"),
    "weight_decay": (GOOD + "optimizer: {weight_decay: -0.1}\n", "optimizer.weight_decay"),
    "seed_huge": (GOOD.replace("iterations: 2", "iterations: 2, seed: 99999999999999999999"), "run.seed"),
    "seed_negative": (GOOD.replace("iterations: 2", "iterations: 2, seed: -1"), "run.seed"),
    "too_many_prompts": (GOOD.replace("prompts_per_iteration: 2", "prompts_per_iteration: 100000000"), "run.prompts_per_iteration"),
    "too_many_samples": (GOOD.replace("samples_per_prompt: 2", "samples_per_prompt: 100000"), "run.samples_per_prompt"),
    "too_many_in_total": (GOOD.replace("prompts_per_iteration: 2", "prompts_per_iteration: 100000")
                          .replace("samples_per_prompt: 2", "samples_per_prompt: 1000"), "samples per iteration"),
    "missing_rewards": (GOOD.replace("rewards: {sentiment: {weight: 1.0}}\n", ""), "rewards: required"),
    "bad_mixed_precision": (GOOD.replace("progress: false", "progress: false, mixed_precision: fp8"), "run.mixed_precision"),
    "prompts_missing_file": (GOOD.replace("assets/tiny-gpt2/prompts.txt", "no/such/prompts.txt"), "no such file"),
    "prompts_binary": (GOOD.replace("assets/tiny-gpt2/prompts.txt", "PROMPTS_BINARY"), "binary file"),
    "prompts_latin1": (GOOD.replace("assets/tiny-gpt2/prompts.txt", "PROMPTS_LATIN1"), "not UTF-8"),
    "prompts_torn_jsonl": (GOOD.replace("assets/tiny-gpt2/prompts.txt", "PROMPTS_JSONL"), "line 2: not JSON"),
    "output_dir_is_file": (GOOD.replace("output_dir: OUT", "output_dir: A_FILE"), "a file is in the way"),
    "oversized": ("a: '" + "x" * (1 << 20) + "'\n", "at most 1048576"),
}

OVERRIDES: dict[str, tuple[str, str]] = {
    "override_inf": ("optimizer.lr=.inf", "optimizer.lr"),
    "override_nan_beta": ("update.beta=.nan", "update.beta"),
    "override_no_equals": ("run.iterations", "not of the form dotted.key=value"),
    "override_empty_key": ("=3", "empty key"),
    "override_empty_part": ("run..iterations=3", "empty key"),
    "override_deep": ("run.iterations=" + "[" * 2000 + "]" * 2000, "nesting deeper than"),
    "override_huge_int": ("optimizer.lr=" + "9" * 5000, "too long"),
    "override_big_float": ("optimizer.lr=1e999", "optimizer.lr"),
    "override_bomb": ("run.iterations=" + bomb().replace("\n", ", ").join("{}"), "expands to more than"),
    "override_not_a_section": ("run.iterations.x=1", "not a section"),
    "override_clip_negative": ("update.clip_range=-0.2", "update.clip_range"),
}


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one_line(argv: list[str], fragment: str, monkeypatch) -> None:
    monkeypatch.setattr(Host, "build_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    err = io.StringIO()
    before, start = _peak_mb(), time.perf_counter()
    with redirect_stderr(err):
        code = main(argv)
    took, grew = time.perf_counter() - start, _peak_mb() - before
    text = err.getvalue()
    lines = [l for l in text.splitlines() if l.strip()]
    assert code == 2, text[-2000:]
    assert len(lines) == 1 and lines[0].startswith("polyrl: error: ") and "Traceback" not in text, text[-2000:]
    assert fragment in lines[0], lines[0]
    assert len(lines[0]) < 1000, len(lines[0])
    assert took < SECONDS and grew < MEMORY_MB, (took, grew)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bad_config_files(tmp_path, monkeypatch, name):
    content, fragment = CONFIGS[name]
    (tmp_path / "binary.txt").write_bytes(b"\x00\xff\xfe" * 20)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "torn.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b\n')
    (tmp_path / "a_file").write_text("")
    if isinstance(content, str):
        content = (content.replace("OUT", str(tmp_path / "run")).replace("PROMPTS_BINARY", str(tmp_path / "binary.txt"))
                   .replace("PROMPTS_LATIN1", str(tmp_path / "latin1.txt")).replace("PROMPTS_JSONL", str(tmp_path / "torn.jsonl"))
                   .replace("A_FILE", str(tmp_path / "a_file")))
        content = content.encode("utf-8")
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    _one_line(["train", str(path)], fragment, monkeypatch)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_bad_overrides(tmp_path, monkeypatch, name):
    override, fragment = OVERRIDES[name]
    path = tmp_path / "good.yaml"
    path.write_text(GOOD.replace("OUT", str(tmp_path / "run")))
    _one_line(["train", str(path), override], fragment, monkeypatch)


def test_a_config_folder_and_a_missing_config(tmp_path, monkeypatch):
    _one_line(["train", str(tmp_path)], "is a folder", monkeypatch)
    _one_line(["train", str(tmp_path / "nope.yaml")], "config file not found", monkeypatch)
    _one_line(["train", "--resume", str(tmp_path / "nope")], "no such folder", monkeypatch)


# ---------------------------------------------------------------------------------- demonstrations
def _npz(path: Path, **arrays) -> Path:
    np.savez_compressed(path, **arrays)
    return path


def _demo_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    obs, act, lengths = np.zeros((4, 3), np.float32), np.zeros((4, 1), np.float32), np.array([4])
    huge = tmp / "huge.npz"
    # a header that declares 80 GB of observations: refused from the header, nothing is read
    with __import__("zipfile").ZipFile(huge, "w") as zf:
        with zf.open("observations.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**9, 10)})
        for k, v in (("actions", act), ("episode_lengths", lengths)):
            with zf.open(f"{k}.npy", "w") as f:
                np.lib.format.write_array(f, v)
    (tmp / "not_zip.npz").write_bytes(b"this is not a zip file")
    return {
        "bomb_unknown_key": (_npz(tmp / "bomb.npz", observations=obs, actions=act, episode_lengths=lengths,
                                  junk=np.zeros(50_000_000, np.float64)), "unknown keys ['junk']"),
        "object_array": (_npz(tmp / "obj.npz", observations=np.array([{"a": 1}], dtype=object), actions=act,
                              episode_lengths=lengths), "object array"),
        "declared_huge": (huge, "GiB once read"),
        "not_a_zip": (tmp / "not_zip.npz", "not a readable .npz"),
        "missing_keys": (_npz(tmp / "missing.npz", observations=obs), "missing keys"),
        "nan_values": (_npz(tmp / "nan.npz", observations=obs + np.nan, actions=act, episode_lengths=lengths), "NaN"),
    }


def test_bad_demonstrations(tmp_path):
    from polyrl.plugins.control.demonstrations import load_demos

    for name, (path, fragment) in _demo_cases(tmp_path).items():
        before, start = _peak_mb(), time.perf_counter()
        with pytest.raises(ConfigError) as info:
            load_demos(str(path))
        message = str(info.value)
        assert "\n" not in message and fragment in message, (name, message)
        assert time.perf_counter() - start < SECONDS and _peak_mb() - before < MEMORY_MB, name


# ---------------------------------------------------------------------------------- lilGym programs
def _wide(v: str, n: int = 24) -> str:
    return "(" + ", ".join([v] * n) + ")"


PROGRAMS = {
    "import": ("__import__('os').system('ls')", "ProgramRejected"),
    "dunder": ("().__class__.__bases__", "ProgramRejected"),
    "too_long": ("exist(all_items) and " * 400 + "True", "ProgramRejected"),
    "deep_parens": ("(" * 500 + "True" + ")" * 500, "ProgramRejected"),
    "size_bomb": (f"exist(filter_obj([1], lambda a: exist(filter_obj([{_wide('a')}], lambda b: exist(filter_obj("
                  f"[{_wide('b')}], lambda c: exist(filter_obj([{_wide('c')}], lambda d: {{{_wide('d')}}} == "
                  f"{{{_wide('d')}}}))))))))", "ProgramBudgetExceeded"),
    "concat_chain": ("count(" + "+".join(["all_items"] * 40) + ") >= 0", "ok"),
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_hostile_lilgym_programs_are_bounded(name):
    from polyrl.plugins.lilgym.executor import ProgramError, ProgramRejected, compile_program
    from polyrl.plugins.lilgym.world import World

    source, outcome = PROGRAMS[name]
    start = time.perf_counter()
    try:
        compile_program(source).run(World([[], [], []]))
        got = "ok"
    except (ProgramRejected, ProgramError) as e:
        got = type(e).__name__
        assert "\n" not in str(e)
    assert got == outcome
    assert time.perf_counter() - start < 3.0


def test_the_corpus_is_large_enough():
    assert len(CONFIGS) + len(OVERRIDES) + 6 + len(PROGRAMS) >= 40
