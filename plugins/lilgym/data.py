"""lilGym's data: statements, programs and NLVR start worlds, in lilGym's JSON format.

Each file ``{tower,scatter}_{scratch,flipit}_{train,dev,test}.json`` maps an example id to
``{"sentence", "lf"}`` (Scratch) or ``{"sentence", "lf", "label", "structured_rep", ...}``
(FlipIt). The files are looked up, in this order, in:

1. the folder given explicitly (``data_dir``);
2. ``$POLYRL_LILGYM_DATA``;
3. ``shared/data/lilgym`` beside the polyrl checkout (a shared data folder);
4. the download cache, ``$XDG_CACHE_HOME/polyrl/lilgym`` (default ``~/.cache/polyrl/lilgym``).

With a network, ``python -m polyrl.plugins.lilgym.data download`` fetches the files from the
lilGym repository into the cache and checks their SHA-256: against the pinned digests below for
the files they are known for, otherwise against the digest recorded in the cache's
``SHA256SUMS`` at first download. The data is not shipped with polyrl (lilGym: MIT; NLVR
sentences and worlds: CC-BY-4.0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .world import validate_structured_rep

__all__ = [
    "Example",
    "LilGymDataError",
    "TASKS",
    "SPLITS",
    "data_file_name",
    "search_dirs",
    "find_data_file",
    "load_examples",
    "download",
]

TASKS = {
    "TowerScratch": ("tower", "scratch"),
    "TowerFlipIt": ("tower", "flipit"),
    "ScatterScratch": ("scatter", "scratch"),
    "ScatterFlipIt": ("scatter", "flipit"),
}
"""Task name -> (appearance, starting condition)."""
SPLITS = ("train", "dev", "test")

BASE_URL = "https://raw.githubusercontent.com/lil-lab/lilgym/main/lilgym/data/"
"""Where ``download`` fetches the files from."""

PINNED_SHA256 = {
    "tower_scratch_train.json": "522223210b6b854e288645344ae19d9ee80e611736f40c268c59419c78b57cb2",
    "tower_scratch_dev.json": "d86e84fdc6ec0bcfb4ce400d656d350dda499cf52588cdf526c032d239de25cb",
    "tower_flipit_dev.json": "7bac6bc936ccc154a920f1e27fedbd73587f1b9599b2c68435eeb5b3c6c7e066",
    "scatter_scratch_train.json": "c059bede06553f576c25620c1e62f337d4870bf063759f00e1d5ed73b37f114f",
    "scatter_scratch_dev.json": "41d2f5d8a0efc4eb46db23c0868eeca264e5a0bf48042414811895c7bd59ab3c",
    "scatter_flipit_dev.json": "a85e9ba7df59c2bc9293e91a882c685d41a7317ec63ddd9f43925cd871001a68",
}
"""SHA-256 of the released files whose digest is known; other files are pinned at first download."""


class LilGymDataError(FileNotFoundError):
    """A lilGym data file is missing or malformed; the message says where to put it."""


@dataclass(frozen=True)
class Example:
    """One episode start: a statement, its program and a start world.

    ``world`` is the structured representation to start from (three empty boxes for Scratch);
    ``target`` is the truth value the agent must make the statement have (``True`` for Scratch,
    the negation of the NLVR label for FlipIt); ``label`` is the NLVR label (FlipIt only).
    """

    id: str
    sentence: str
    program: str
    world: tuple
    target: bool
    label: bool | None = None

    def world_copy(self) -> list[list[dict[str, Any]]]:
        return [[dict(item) for item in box] for box in self.world]


def data_file_name(appearance: str, start: str, split: str) -> str:
    if appearance not in ("tower", "scatter"):
        raise ValueError(f"appearance {appearance!r} is not accepted; choose one of ['tower', 'scatter']")
    if start not in ("scratch", "flipit"):
        raise ValueError(f"starting condition {start!r} is not accepted; choose one of ['scratch', 'flipit']")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not accepted; choose one of {list(SPLITS)}")
    return f"{appearance}_{start}_{split}.json"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "polyrl" / "lilgym"


def shared_dir() -> Path:
    """``shared/data/lilgym`` beside the polyrl checkout."""
    import polyrl

    return Path(polyrl.__file__).resolve().parents[2] / "shared" / "data" / "lilgym"


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for data files, in order."""
    dirs: list[Path] = []
    if data_dir:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get("POLYRL_LILGYM_DATA")
    if env:
        dirs.append(Path(env).expanduser())
    dirs += [shared_dir(), cache_dir()]
    return dirs


def find_data_file(appearance: str, start: str, split: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The path of a data file, or :class:`LilGymDataError` saying where to put it."""
    name = data_file_name(appearance, start, split)
    dirs = search_dirs(data_dir)
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise LilGymDataError(f"lilGym data_dir {str(data_dir)!r} is not a folder")
    for d in dirs:
        if (d / name).is_file():
            return d / name
    raise LilGymDataError(
        f"lilGym data file {name!r} not found; searched: {[str(d) for d in dirs]}. Put lilGym's JSON files "
        f"(github.com/lil-lab/lilgym, folder lilgym/data/) in one of these folders (or set POLYRL_LILGYM_DATA, "
        f"or pass data_dir), or, with a network, run `python -m polyrl.plugins.lilgym.data download` "
        f"to fetch them into {str(cache_dir())!r}"
    )


def _parse_label(value: Any, where: str) -> bool:
    if value in ("true", "false"):
        return value == "true"
    raise LilGymDataError(f"{where}.label: expected 'true' or 'false', got {value!r}")


def load_examples(appearance: str, start: str, split: str, data_dir: str | os.PathLike | None = None,
                  path: str | os.PathLike | None = None) -> list[Example]:
    """The examples of a split, in file order (``path`` reads that file instead of searching)."""
    file = Path(path) if path is not None else find_data_file(appearance, start, split, data_dir)
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LilGymDataError(f"{str(file)!r}: cannot read lilGym JSON: {e}") from None
    return examples_from_mapping(raw, start, str(file))


def examples_from_mapping(raw: Any, start: str, where: str = "data") -> list[Example]:
    """Examples from a mapping in lilGym's format (id -> {sentence, lf, [label, structured_rep]})."""
    if not isinstance(raw, dict) or not raw:
        raise LilGymDataError(f"{where}: expected a non-empty mapping of example id to example")
    out = []
    for key, ex in raw.items():
        at = f"{where}[{key!r}]"
        need = ("sentence", "lf") + (("label", "structured_rep") if start == "flipit" else ())
        if not isinstance(ex, dict) or any(k not in ex for k in need):
            raise LilGymDataError(f"{at}: expected a mapping with keys {list(need)}, got {str(ex)[:80]!r}")
        if not isinstance(ex["sentence"], str) or not isinstance(ex["lf"], str):
            raise LilGymDataError(f"{at}: 'sentence' and 'lf' must be strings")
        if start == "flipit":
            label = _parse_label(ex["label"], at)
            try:
                world = validate_structured_rep(ex["structured_rep"], f"{at}.structured_rep")
            except ValueError as e:
                raise LilGymDataError(str(e)) from None
            target = not label
        else:
            label, world, target = None, [[], [], []], True
        frozen = tuple(tuple(dict(item) for item in box) for box in world)
        out.append(Example(str(key), ex["sentence"], ex["lf"].strip(), frozen, target, label))
    return out


# ---------------------------------------------------------------------------------- download
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_sums(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[1]] = parts[0]
    return out


def download(files: Sequence[str] | None = None, dest: str | os.PathLike | None = None, force: bool = False,
             base_url: str = BASE_URL, timeout: float = 60.0) -> list[Path]:
    """Fetch lilGym data files into ``dest`` (default: the cache) and verify their SHA-256.

    ``files`` defaults to every task x split. A file already in the cache with the expected digest
    is not fetched again (unless ``force``). A file that cannot be fetched, or whose digest does not
    match, is not saved; after trying every file, :class:`LilGymDataError` lists them. Returns the
    paths of the verified files.
    """
    dest = Path(dest).expanduser() if dest else cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    names = list(files) if files else [
        data_file_name(a, s, sp) for a, s in TASKS.values() for sp in SPLITS
    ]
    sums_path = dest / "SHA256SUMS"
    sums = _read_sums(sums_path)
    done, failed = [], []
    for name in names:
        if "/" in name or "\\" in name or not name.endswith(".json"):
            raise LilGymDataError(f"{name!r} is not a lilGym data file name (e.g. 'tower_scratch_train.json')")
        expected = PINNED_SHA256.get(name) or sums.get(name)
        target = dest / name
        if target.is_file() and not force and expected and _sha256(target) == expected:
            done.append(target)
            continue
        url = base_url + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - fixed https host
                payload = response.read()
        except OSError as e:
            failed.append(f"{url}: {e}")
            continue
        digest = hashlib.sha256(payload).hexdigest()
        if expected and digest != expected:
            failed.append(f"{name}: SHA-256 {digest} does not match the expected {expected}; file not saved")
            continue
        with tempfile.NamedTemporaryFile(dir=dest, delete=False) as tmp:
            tmp.write(payload)
        os.replace(tmp.name, target)
        sums[name] = digest
        done.append(target)
        print(f"lilgym: {name} ({len(payload)} bytes, sha256 {digest[:12]}...) -> {target}", file=sys.stderr)
    sums_path.write_text("".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))
    if failed:
        raise LilGymDataError(
            f"{len(failed)} of {len(names)} lilGym files could not be fetched and verified ({len(done)} were): "
            + "; ".join(failed)
            + f". Without a network, put lilGym's JSON files in {str(dest)!r} (or a folder named by POLYRL_LILGYM_DATA)"
        )
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polyrl.plugins.lilgym.data",
                                     description="lilGym data: download (with a cache and checksums) and locate files")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch the data files into the cache and verify their SHA-256")
    d.add_argument("files", nargs="*", help="file names (default: all tasks and splits)")
    d.add_argument("--dest", help="folder to download into (default: the cache)")
    d.add_argument("--force", action="store_true", help="download again even when cached")
    w = sub.add_parser("where", help="print the folders searched for data files")
    w.add_argument("--data-dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            for p in download(args.files or None, args.dest, args.force):
                print(p)
        else:
            for p in search_dirs(args.data_dir):
                print(p)
    except LilGymDataError as e:
        print(f"lilgym: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
