"""``polyrl export`` (a policy folder from any checkpoint) and ``polyrl push`` (that folder and a
model card to a Hub repository), the push against a Hub API served on 127.0.0.1 by the test."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from polyrl.cli import main

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A two-iteration run of the tiny text model, with a checkpoint after each iteration."""
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = yaml.safe_load((ROOT / "configs/grpo_tiny_text.yaml").read_text())
    cfg["run"].update(iterations=2, save_every=1, keep_checkpoints=5, prompts_per_iteration=2, samples_per_prompt=2,
                      output_dir=str(out), report=False, progress=False, threads=1)
    cfg["sampler"]["max_new_tokens"] = 4
    cfg["update"]["train_batch_size"] = 4
    path = out.parent / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return out


def test_export_writes_the_weights_of_the_chosen_checkpoint(run_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    for it in (1, 2):
        out = tmp_path / f"it{it}"
        assert main(["export", str(run_dir), "--iteration", str(it), "--out", str(out)]) == 0
        assert f"exported the policy to {out}" in capsys.readouterr().out
        assert json.loads((out / "polyrl.json").read_text())["iteration"] == it
        model = AutoModelForCausalLM.from_pretrained(out)  # a plain transformers folder
        trained = load_file(run_dir / "checkpoints" / f"iter_{it:06d}" / "trainable.safetensors")
        ours = {k: v for k, v in model.state_dict().items()}
        matched = 0
        for name, tensor in trained.items():
            key = name.removeprefix("model.")
            if key in ours:
                torch.testing.assert_close(ours[key], tensor)
                matched += 1
        assert matched >= len(trained) - 1, (matched, len(trained))
    first = load_file(tmp_path / "it1" / "model.safetensors")
    last = load_file(tmp_path / "it2" / "model.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first), "the two checkpoints differ"
    # the default folder, and refusing to overwrite
    assert main(["export", str(run_dir)]) == 0
    assert (run_dir / "export" / "iter_000002" / "model.safetensors").is_file()
    assert main(["export", str(run_dir), "--iteration", "1", "--out", str(tmp_path / "it1")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_export_of_a_missing_checkpoint_is_one_line(run_dir, capsys):
    assert main(["export", str(run_dir), "--iteration", "7"]) == 2
    err = capsys.readouterr().err
    assert err.count("polyrl: error:") == 1 and "Traceback" not in err
    assert "no checkpoint of that iteration; it has [1, 2]" in err


class FakeHub(BaseHTTPRequestHandler):
    """Enough of the Hub API for ``create_repo`` and ``upload_folder``: repositories are created,
    every file is uploaded inline ("regular"), commits are recorded in ``server.repos``."""

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server = self.server
        server.requests.append(("POST", self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != "Bearer hf_fake_write_token":
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        if self.path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req.get('organization') or 'me'}/{req['name']}" if "/" not in req["name"] else req["name"]
            server.repos.setdefault(repo, {})
            return self._send(200, {"url": f"{server.endpoint}/{repo}", "name": repo})
        if self.path == "/api/validate-yaml":  # the model card's metadata
            meta = json.loads(body)["content"]
            ok = isinstance(yaml.safe_load(meta.split("---")[1]), dict)
            return self._send(200 if ok else 400, {"warnings": [], "errors": [] if ok else [{"message": "bad"}]})
        parts = self.path.split("/")
        if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] == "preupload":
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] == "commit":
            repo = f"{parts[3]}/{parts[4]}"
            if repo not in server.repos:
                return self._send(404, {"error": "Repository not found"})
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    server.repos[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            oid = hashlib.sha1(body).hexdigest()
            return self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{server.endpoint}/{repo}/commit/{oid}"})
        return self._send(404, {"error": f"not served by the test: POST {self.path}"})

    def do_GET(self):  # noqa: N802
        self.server.requests.append(("GET", self.path, self.headers.get("Authorization")))
        return self._send(404, {"error": f"not served by the test: GET {self.path}"})


@pytest.fixture
def hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.repos, server.requests = {}, []
    server.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.shutdown()
    server.server_close()


def test_push_uploads_the_policy_and_a_model_card(run_dir, hub, capsys):
    rc = main(["push", str(run_dir), "--repo", "me/tiny-grpo", "--iteration", "1", "--token", "hf_fake_write_token"])
    captured = capsys.readouterr()
    assert rc == 0, (captured.err[-2000:], hub.requests)
    assert f"pushed to {hub.endpoint}/me/tiny-grpo/commit/" in captured.out
    files = hub.repos["me/tiny-grpo"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "config.yaml", "polyrl.json"} <= set(files)
    local = load_file(run_dir / "export" / "iter_000001" / "model.safetensors")
    from safetensors.torch import load as load_bytes

    pushed = load_bytes(files["model.safetensors"])
    assert set(pushed) == set(local) and all(torch.equal(pushed[k], local[k]) for k in local)
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "with `grpo`" in card and "1 iteration." in card
    assert "| reward_mean |" in card and "| reward/" in card
    assert "```yaml" in card and "name: causal_lm" in card
    assert yaml.safe_load(files["config.yaml"])["policy"]["name"] == "causal_lm"


def test_push_errors_are_one_line(run_dir, hub, capsys):
    assert main(["push", str(run_dir), "--repo", "me/tiny", "--token", "hf_wrong"]) == 2
    err = capsys.readouterr().err
    assert err.count("polyrl: error:") == 1 and "Traceback" not in err
    assert "refused 'me/tiny' (401)" in err and "hf auth login" in err
    assert main(["push", str(run_dir), "--repo", "not-a-repo-id", "--token", "hf_fake_write_token"]) == 2
    assert "expected a Hub repository id of the form owner/name" in capsys.readouterr().err
