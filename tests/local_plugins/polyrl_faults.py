"""A test plugin that kills its own process (SIGKILL: no handler runs) at a chosen write boundary.

``POLYRL_FAULT=<boundary>:<n>`` kills at the ``n``-th time the run reaches ``<boundary>``:

* ``metrics``: half-way through appending a line to ``metrics.jsonl`` (half the bytes written);
* ``config``: after the temporary ``config.yaml`` is written, before it replaces the old one;
* ``rename``: after a checkpoint's temporary folder is complete, before it is renamed;
* ``checkpoint``: half-way through a checkpoint's files (after the weights, before the rest).

Load it with ``-p polyrl_faults`` and ``PYTHONPATH`` pointing here.
"""

from __future__ import annotations

import os
import signal

from polyrl import atomic, checkpoint

_spec = os.environ.get("POLYRL_FAULT", "")
BOUNDARY, _, _n = _spec.partition(":")
TARGET = int(_n or 1)
_count = {"n": 0}


def _reached(boundary: str) -> bool:
    if boundary != BOUNDARY:
        return False
    _count["n"] += 1
    return _count["n"] == TARGET


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


_append = atomic.append_line


def append_line(path, line):
    if _reached("metrics"):
        data = (line + "\n").encode()
        with open(path, "ab") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        _die()
    return _append(path, line)


_replace = os.replace


def replace(src, dst, *args, **kwargs):
    name = os.path.basename(str(dst))
    if (name == "config.yaml" and _reached("config")) or (name.startswith("iter_") and _reached("rename")):
        _die()
    return _replace(src, dst, *args, **kwargs)


_save = checkpoint.torch.save


def save(obj, f, *args, **kwargs):
    if _reached("checkpoint"):
        _die()
    return _save(obj, f, *args, **kwargs)


if BOUNDARY:
    atomic.append_line = append_line
    atomic.os.replace = replace  # the module's own reference to os
    checkpoint.torch.save = save
