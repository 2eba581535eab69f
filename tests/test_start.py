"""Fast start: loading the host and reading the registry import none of the heavy libraries that
only building a component needs (timings are in benchmarks/start_time.py, not here)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("diffusers", "transformers", "peft", "open_clip", "gymnasium", "mujoco", "sentence_transformers",
         "torch._dynamo")


def imported_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nimport json; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_host_and_a_rejected_config_import_no_heavy_library():
    assert imported_after("from polyrl.host import Host; Host()") == []
    code = (
        "from polyrl.host import Host\n"
        "from polyrl.types import ConfigError\n"
        "data = {'run': {'iterations': 1}, 'prompts': {'items': ['a']}, 'policy': {'name': 'diffusion'},\n"
        "        'sampler': {'name': 'ddim'}, 'rewards': {'jpeg_compressibility': {}}, 'update': {'name': 'ppo'}}\n"
        "try:\n    Host().build_config(data)\nexcept ConfigError as e:\n    assert \"update 'ppo'\" in str(e), e\n"
        "else:\n    raise AssertionError('accepted')\n"
    )
    assert imported_after(code) == []
