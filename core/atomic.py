"""Writes that a crash cannot tear.

Every file a run rewrites (``config.yaml``, ``plugins.json``, the report's pages) goes through
:func:`write_text`: the bytes go to a temporary file beside the target, are flushed to disk
(``fsync``), and the temporary file is renamed over the target, so a reader sees the old file or
the new one, never half of one. ``metrics.jsonl`` is append-only (:func:`append_line`); a line torn
by a crash is the last line, and :func:`read_jsonl` skips it and says so.

A full disk (``ENOSPC``) or a quota (``EDQUOT``) raises :class:`DiskFullError`, whose message is
one line naming the path, the bytes that were being written and the space left.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["DiskFullError", "write_text", "write_bytes", "append_line", "read_jsonl", "fsync_dir", "free_bytes"]


class DiskFullError(OSError):
    """No space left where the run writes. Nothing already saved was touched."""


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


def disk_full(path: str | Path, needed: int | None, error: OSError) -> DiskFullError:
    """The one-line error for a write that ran out of space."""
    need = f"about {_human(needed)} needed, " if needed else ""
    return DiskFullError(
        error.errno,
        f"no space left on device writing {str(path)!r} ({need}{_human(free_bytes(path))} free); "
        f"free some space or point run.output_dir at a larger disk, then continue with --resume",
    )


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename is durable once its folder is synced)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path, len(data), e) from None
        raise
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_line(path: str | Path, line: str) -> None:
    """Append one line (one ``write`` call, then fsync). A crash can only tear this last line."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    path = Path(path)
    try:
        with open(path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path, len(data), e) from None
        raise


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a JSON-lines file and a list of warnings for lines that could not be read.

    A torn last line (a crash or a full disk during an append) is skipped with a warning; a bad
    line elsewhere is skipped too and named.
    """
    path = Path(path)
    if not path.is_file():
        return [], []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode("utf-8"))
            if not isinstance(value, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            last = i == len(lines) or (i == len(lines) - 1 and lines[-1] == b"")
            warnings.append(f"{path.name}: line {i} is {'torn (the run stopped while writing it)' if last else 'unreadable'}; skipped")
            continue
        records.append(value)
    return records, warnings
