"""Never lose a run: signals, kills at every write boundary, a full disk, non-finite values, resume
changes and tampered checkpoints, on the tiny text model."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polyrl import hookimpl
from polyrl.atomic import read_jsonl
from polyrl.checkpoint import checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from polyrl.cli import main
from polyrl.errors import CheckpointError, NonFiniteError, ResumeError, RunStopped
from polyrl.host import Host
from polyrl.loop import train
from polyrl.types import ConfigError

ROOT = Path(__file__).parent.parent
PLUGINS = Path(__file__).parent / "local_plugins"
BASE = {
    "run": {"iterations": 4, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 7,
            "save_every": 1, "progress": False, "report": False},
    "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
    "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "lora_rank": 8},
    "sampler": {"name": "generate", "max_new_tokens": 8, "temperature": 1.0},
    "rewards": {"sentiment": {"weight": 1.0}},
    "update": {"name": "grpo", "train_batch_size": 4, "inner_epochs": 2, "beta": 0.05},
    "optimizer": {"lr": 5e-3},
}


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def config(run_dir: Path, **run) -> dict:
    data = copy.deepcopy(BASE)
    data["run"].update(output_dir=str(run_dir), **run)
    return data


def metrics(run_dir: Path) -> list[dict]:
    rows, warnings = read_jsonl(Path(run_dir) / "metrics.jsonl")
    assert not warnings, warnings
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir) / "trainable.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def run_cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue()


def one_error_line(err: str) -> str:
    """The single ``polyrl: error:`` line of a failed command (progress bars of model loading may
    also be on stderr); no traceback."""
    lines = [l for l in err.splitlines() if l.startswith("polyrl: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    host = Host()
    train(host.build_config(config(run)), host)
    return run


# ---------------------------------------------------------------------------------- signals
class SignalAt:
    """Sends ``signum`` to this process during ``phase`` of ``iteration`` (``times`` signals)."""

    def __init__(self, phase: str, iteration: int, signum: int = signal.SIGTERM, times: int = 1) -> None:
        self.phase, self.iteration, self.signum, self.times = phase, iteration, signum, times

    def _fire(self, trainer) -> None:
        if trainer.iteration == self.iteration:
            for _ in range(self.times):
                signal.raise_signal(self.signum)

    @hookimpl(wrapper=True)
    def polyrl_sample(self, trainer, contexts):
        if self.phase == "sample":
            self._fire(trainer)
        return (yield)

    @hookimpl(wrapper=True)
    def polyrl_update(self, trainer, rollout, rewards):
        result = yield
        if self.phase == "update":
            self._fire(trainer)
        return result

    @hookimpl
    def polyrl_run_start(self, trainer):
        if self.phase != "save":
            return
        save = trainer.save

        def signalling_save(iteration, state=None):
            # the signals arrive while the checkpoint is being written
            import polyrl.checkpoint as ck

            original = ck.save_file

            def save_file(*args, **kwargs):
                if iteration == self.iteration:
                    for _ in range(self.times):
                        signal.raise_signal(self.signum)
                return original(*args, **kwargs)

            ck.save_file = save_file
            try:
                save(iteration, state)
            finally:
                ck.save_file = original

        trainer.save = signalling_save


@pytest.mark.parametrize("phase", ["sample", "update", "save"])
def test_sigterm_stops_after_the_iteration_and_resumes_exactly(tmp_path, uninterrupted, phase):
    run = tmp_path / "run"
    host = Host()
    host.register(SignalAt(phase, iteration=2, times=2 if phase == "save" else 1), "signal")
    every = 1 if phase == "save" else 100  # the signals of "save" arrive while iteration 2 is saved
    with pytest.raises(RunStopped) as stopped:
        train(host.build_config(config(run, save_every=every)), host)
    assert stopped.value.signum == signal.SIGTERM
    assert latest_checkpoint(run).name == "iter_000002"  # iteration 2 finished and was saved
    assert [r["iteration"] for r in metrics(run)] == [1, 2]
    host = Host()
    train(host.build_config(config(run, save_every=every)), host, resume=True)
    assert metrics(run) == metrics(uninterrupted)
    assert same_weights(run, uninterrupted)


@pytest.mark.slow
def test_sigterm_from_outside_saves_and_exits_143(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "polyrl.cli", "train", "run.iterations=200", "run.report=false",
           f"run.output_dir={run}", "run.save_every=1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    done = len(metrics(run))
    assert 1 <= done < 200 and latest_checkpoint(run).name == f"iter_{done:06d}"
    assert "SIGTERM received" in err and f"polyrl train --resume {run}" in err


# ---------------------------------------------------------------------------------- kills at write boundaries
def _killed_run(run: Path, fault: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, POLYRL_FAULT=fault, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")]))
    data = config(run, iterations=4)
    cfg = run.parent / f"{run.name}.yaml"
    cfg.write_text(json.dumps(data))  # JSON is YAML
    cmd = [sys.executable, "-m", "polyrl.cli", "-p", "polyrl_faults", "train", *(extra or (str(cfg),))]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _continue(run: Path) -> None:
    """What a user does after a crash: resume if there is a checkpoint, else start again."""
    host = Host()
    data = config(run, iterations=4)
    train(host.build_config(data), host, resume=latest_checkpoint(run) is not None)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["metrics:1", "metrics:3", "config:1", "rename:1", "rename:2", "checkpoint:2"])
def test_a_kill_at_any_write_boundary_leaves_a_resumable_run(tmp_path, uninterrupted, fault):
    run = tmp_path / "run"
    result = _killed_run(run, fault)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    if fault.startswith("config"):  # killed before the first iteration: config.yaml never half-written
        assert not (run / "config.yaml").exists() or (run / "config.yaml").read_text().strip()
    _continue(run)
    assert metrics(run) == metrics(uninterrupted)  # each iteration logged once, as in the uninterrupted run
    assert same_weights(run, uninterrupted)
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_a_leftover_tmp_checkpoint_is_ignored_everywhere(tmp_path, uninterrupted):
    run = tmp_path / "run"
    host = Host()
    train(host.build_config(config(run, iterations=2)), host)
    stale = run / "checkpoints" / "iter_000007.tmp"
    shutil.copytree(latest_checkpoint(run), stale)  # holds a trainer.json, as a kill before the rename leaves it
    assert latest_checkpoint(run).name == "iter_000002"
    code, err = run_cli("eval", str(run), "--samples", "2", "--batch", "2", "--no-baseline")
    assert code == 0, err
    _continue(run)
    assert metrics(run) == metrics(uninterrupted) and not stale.exists()


def test_torn_metrics_line_is_skipped_and_reported(tmp_path, uninterrupted):
    run = tmp_path / "run"
    host = Host()
    train(host.build_config(config(run, iterations=2)), host)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "reward_me')  # a full disk or a kill mid-append
    err = io.StringIO()
    with redirect_stderr(err):
        _continue(run)
    assert "line 3 is torn" in err.getvalue()
    assert metrics(run) == metrics(uninterrupted)


def test_fresh_retry_after_a_kill_before_the_first_checkpoint_logs_each_iteration_once(tmp_path, uninterrupted):
    run = tmp_path / "run"
    host = Host()
    with pytest.raises(RunStopped):
        host.register(SignalAt("sample", iteration=1, signum=signal.SIGINT, times=2), "signal")
        train(host.build_config(config(run, save_every=100)), host)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # as if killed before any checkpoint
    (run / "metrics.jsonl").write_text('{"iteration": 1, "reward_mean": 0.0}\n')
    _continue(run)
    assert metrics(run) == metrics(uninterrupted)


# ---------------------------------------------------------------------------------- full disk
@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a size-limited tmpfs needs root and mount(8); not available here")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.parametrize("room", ["metrics line", "weights"])
def test_full_disk_gives_one_line_and_keeps_the_run_resumable(small_disk, uninterrupted, room):
    run = small_disk / "run"
    host = Host()
    train(host.build_config(config(run, iterations=2)), host)
    weights_size = (latest_checkpoint(run) / "trainable.safetensors").stat().st_size
    # room for a metrics line but not for a checkpoint (refused before writing), or for the weights
    # but not the optimizer state (the write fails half-way and is cleaned up)
    filler = _fill(small_disk, leave=16 * 1024 + (weights_size if room == "weights" else 0))
    code, err = run_cli("train", "--resume", str(run), "run.iterations=4")
    assert code == 2
    line = one_error_line(err)
    assert "no space left on device" in line and "free" in line, line
    assert latest_checkpoint(run).name == "iter_000002" and not list((run / "checkpoints").glob("*.tmp"))
    load_checkpoint(latest_checkpoint(run))  # still loads
    filler.unlink()
    code, err = run_cli("train", "--resume", str(run), "run.iterations=4")
    assert code == 0, err[-3000:]
    assert metrics(run) == metrics(uninterrupted) and same_weights(run, uninterrupted)


# ---------------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("override, fragment", [
    ("optimizer.lr=.inf", "optimizer.lr"),
    ("rewards.sentiment.weight=.nan", "rewards.sentiment.weight"),
    ("update.beta=.nan", "update.beta"),
    ("optimizer.max_grad_norm=.nan", "optimizer.max_grad_norm"),
    ("sampler.temperature=.nan", "sampler.temperature"),
    ("sampler.temperature=-1", "sampler.temperature"),
    ("update.clip_range=-0.2", "update.clip_range"),
    ("optimizer.beta1=1.5", "optimizer.beta1"),
    ("optimizer.eps=0", "optimizer.eps"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
    ("run.seed=18446744073709551616", "run.seed"),
    ("run.prompts_per_iteration=100000000", "run.prompts_per_iteration"),
])
def test_non_finite_and_out_of_range_values_are_refused_before_loading(tmp_path, override, fragment):
    from polyrl.config import apply_overrides

    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        Host().build_config(apply_overrides(config(tmp_path / "run"), [override]))


class PoisonWeights:
    """Sets one trainable tensor to NaN at the start of ``iteration``'s update."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    @hookimpl(wrapper=True)
    def polyrl_update(self, trainer, rollout, rewards):
        if trainer.iteration == self.iteration:
            with torch.no_grad():
                trainer.policy.trainable_parameters()[0].fill_(float("nan"))
        return (yield)


def test_a_non_finite_loss_stops_at_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    host = Host()
    host.register(PoisonWeights(iteration=3), "poison")
    with pytest.raises(NonFiniteError, match="gradient norm"):
        train(host.build_config(config(run, save_every=100)), host)
    assert latest_checkpoint(run).name == "iter_000002"
    for _, path in checkpoints(run):
        assert all(torch.isfinite(v).all() for v in load_file(str(path / "trainable.safetensors")).values())


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path):
    with pytest.raises(NonFiniteError, match="NaN or infinity"):
        save_checkpoint(tmp_path, 1, {"w": torch.tensor([1.0, float("inf")])}, {}, {"seed": 0})
    assert latest_checkpoint(tmp_path) is None and not list((tmp_path / "checkpoints").glob("*"))


# ---------------------------------------------------------------------------------- resume
@pytest.fixture
def two_done(tmp_path):
    run = tmp_path / "run"
    host = Host()
    train(host.build_config(config(run, iterations=2)), host)
    return run


@pytest.mark.parametrize("override, fragment", [
    ("policy.lora_rank=4", "policy.lora_rank"),
    ("policy.pretrained=assets/tiny-sd", "policy.pretrained"),
    ("run.seed=8", "run.seed"),
    ("run.samples_per_prompt=2", "run.samples_per_prompt"),
    ("run.iterations=2", "already completed 2 iterations"),
])
def test_resume_refuses_changes_that_break_the_run(two_done, override, fragment):
    before = (two_done / "config.yaml").read_bytes()
    code, err = run_cli("train", "--resume", str(two_done), "run.iterations=4", override)
    assert code == 2 and fragment in one_error_line(err)
    assert (two_done / "config.yaml").read_bytes() == before  # nothing rewritten


def test_resume_applies_a_new_learning_rate_and_says_so(two_done):
    host = Host()
    data = config(two_done, iterations=3)
    data["optimizer"]["lr"] = 1e-3
    err = io.StringIO()
    with redirect_stderr(err):
        trainer = train(host.build_config(data), host, resume=True)
    assert "optimizer.lr: 0.005 -> 0.001" in err.getvalue()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert json.loads((two_done / "metrics.jsonl").read_text().splitlines()[-1])["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("iteration", [1_000_000, -3, "2"])
def test_tampered_checkpoint_metadata_is_refused(two_done, iteration):
    meta_path = latest_checkpoint(two_done) / "trainer.json"
    meta = json.loads(meta_path.read_text())
    meta["iteration"] = iteration
    meta_path.write_text(json.dumps(meta))
    code, err = run_cli("train", "--resume", str(two_done), "run.iterations=4")
    assert code == 2 and "trainer.json says iteration" in one_error_line(err)


def test_only_the_files_a_checkpoint_lists_are_loaded(two_done):
    ckpt = latest_checkpoint(two_done)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"x": Evil()}, ckpt / "evil.pt")  # a stray file is never read
    assert "evil" not in load_checkpoint(ckpt)
    # a pickled object in place of a listed file: refused in one line, nothing executed
    meta = json.loads((ckpt / "trainer.json").read_text())
    torch.save({"x": Evil()}, ckpt / "update.pt")
    meta["files"]["update.pt"] = (ckpt / "update.pt").stat().st_size
    (ckpt / "trainer.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="update.pt was refused"):
        load_checkpoint(ckpt)
    code, err = run_cli("train", "--resume", str(two_done), "run.iterations=3")
    assert code == 2 and "update.pt was refused" in one_error_line(err)
    assert not Path("pwned").exists()


def test_resume_refusal_happens_before_any_model_loads(two_done, monkeypatch):
    host = Host()
    data = config(two_done, iterations=4)
    data["run"]["seed"] = 1
    monkeypatch.setattr(Host, "build_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ResumeError, match="run.seed"):
        train(host.build_config(data), host, resume=True)


@pytest.mark.slow
def test_rlcm_resume_is_exact_with_the_report_on(tmp_path):
    from polyrl.cli import default_config
    from polyrl.config import apply_overrides

    def cfg(run, iterations):
        return apply_overrides(default_config(), [f"run.output_dir={run}", f"run.iterations={iterations}",
                                                  "run.save_every=2", "run.progress=false", "run.report=true",
                                                  "run.report_every=2"])

    host = Host()
    train(host.build_config(cfg(tmp_path / "full", 4)), host)
    host = Host()
    train(host.build_config(cfg(tmp_path / "split", 2)), host)
    host = Host()
    train(host.build_config(cfg(tmp_path / "split", 4)), host, resume=True)
    assert metrics(tmp_path / "split") == metrics(tmp_path / "full")
    assert same_weights(tmp_path / "split", tmp_path / "full")


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_a_two_process_launch_saves_and_resumes(tmp_path):
    """The launcher forwards SIGTERM to both ranks: both finish the iteration, one checkpoint is
    written, and the run resumes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    data = config(run, iterations=500, save_every=1000)
    data["run"].update(cpu=True, prompts_per_iteration=1)
    data["update"]["train_batch_size"] = 4
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps(data))
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "polyrl.cli", "train", str(cfg)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    done = len(metrics(run))
    assert 1 <= done < 500, err[-3000:]
    assert latest_checkpoint(run) is not None and latest_checkpoint(run).name == f"iter_{done:06d}", err[-3000:]
    assert err.count("SIGTERM received") == 2, err[-3000:]  # both ranks asked to stop
    load_checkpoint(latest_checkpoint(run))


# ---------------------------------------------------------------------------------- update snapshots
class CrashInUpdateAt:
    """Raises in ``iteration``'s update, before it begins or after its optimizer steps."""

    def __init__(self, iteration: int, after_step: bool) -> None:
        self.iteration, self.after_step = iteration, after_step

    @hookimpl(wrapper=True)
    def polyrl_update(self, trainer, rollout, rewards):
        if trainer.iteration == self.iteration and not self.after_step:
            raise RuntimeError("simulated failure before the first optimizer step")
        result = yield
        if trainer.iteration == self.iteration:
            raise RuntimeError("simulated failure after the optimizer steps")
        return result


@pytest.mark.parametrize("snapshot, after_step, expected", [
    ("memory", True, "iter_000002"),   # the copy before the update is saved
    ("none", False, "iter_000002"),    # no step taken yet: memory still holds the state before the update
    ("none", True, None),              # stepped, no copy: only periodic checkpoints (none with save_every 100)
])
def test_update_snapshot_policies(tmp_path, uninterrupted, snapshot, after_step, expected):
    run = tmp_path / "run"
    host = Host()
    host.register(CrashInUpdateAt(3, after_step), "crash")
    data = config(run, save_every=100, update_snapshot=snapshot)
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(RuntimeError, match="simulated failure"):
        train(host.build_config(data), host)
    newest = latest_checkpoint(run)
    assert (newest.name if newest else None) == expected
    if expected is None:
        assert "kept no copy of the state before it" in err.getvalue()
    else:
        host = Host()
        train(host.build_config(data), host, resume=True)
        assert metrics(run) == metrics(uninterrupted) and same_weights(run, uninterrupted)


def test_auto_snapshot_copies_adapters_only(tmp_path):
    from polyrl.loop import SNAPSHOT_AUTO_MAX, Trainer

    host = Host()
    trainer = Trainer(host.build_config(config(tmp_path / "run")), host)
    assert trainer.snapshot_updates  # a LoRA adapter: far below the limit
    assert SNAPSHOT_AUTO_MAX == 50_000_000
