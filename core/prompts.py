"""Prompt sources: the contexts each iteration generates for."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import PromptsConfig
from .paths import resolve_path
from .types import ConfigError, Context


DATA_SUFFIXES = (".jsonl", ".json", ".csv")


def dataset_source(path: Path, split: str) -> tuple[str, Path]:
    """How to read ``prompts.dataset``: ``("disk", folder)`` for a ``datasets`` ``save_to_disk``
    folder, or ``(suffix, file)`` for a JSONL / JSON / CSV file (a folder's ``<split>.<suffix>``,
    or its only data file). Raises :class:`ConfigError` naming what is missing."""
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise ConfigError(f"prompts.dataset: {str(path)!r} is not a dataset file; accepted: {list(DATA_SUFFIXES)}")
        return path.suffix, path
    if not path.is_dir():
        raise ConfigError(f"prompts.dataset: no such file or folder {str(path)!r}")
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"prompts.dataset: {str(path)!r} was saved by the `datasets` library, which is not installed "
                "(pip install datasets), or give a .jsonl / .json / .csv file"
            ) from None
        return "disk", path
    for suffix in DATA_SUFFIXES:
        if (path / f"{split}{suffix}").is_file():
            return suffix, path / f"{split}{suffix}"
    files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
    if len(files) == 1:
        return files[0].suffix, files[0]
    if not files and (any(path.rglob("*.parquet")) or any(path.rglob("*.arrow"))):
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"prompts.dataset: {str(path)!r} holds parquet / arrow files, which need the datasets package "
                "(pip install 'polyrl[datasets]'), or give a .jsonl / .json / .csv file"
            ) from None
        return "load", path
    raise ConfigError(
        f"prompts.dataset: {str(path)!r} holds no {split}.jsonl / {split}.json / {split}.csv "
        f"(prompts.split={split!r}) and not exactly one data file; found {[p.name for p in files]}"
    )


_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LOCAL_DATASETS = "a .jsonl / .json / .csv file, a folder of them, or a folder the datasets library reads"


def hub_dataset_id(value: str) -> str | None:
    """``value`` as a Hub dataset id (``owner/name``), or ``None`` when it names a local file or
    folder, or cannot be an id."""
    if Path(resolve_path(value)).exists() or not _DATASET_ID.match(value) or value.endswith(DATA_SUFFIXES):
        return None
    return value


def check_dataset(cfg: PromptsConfig) -> None:
    """Reject, before any model loads, a ``prompts.dataset`` that cannot be read: a missing local
    path (a mistyped ``folder/name`` too), a Hub id without the ``datasets`` package, or a local
    folder with no data. Raises :class:`ConfigError` naming what is wrong."""
    repo = hub_dataset_id(cfg.dataset)  # type: ignore[arg-type]
    if repo is None:
        if cfg.dataset_config is not None and dataset_source(Path(resolve_path(cfg.dataset)), cfg.split)[0] != "load":
            raise ConfigError("prompts.dataset_config applies only to Hub datasets and folders read by the datasets "
                              f"library, not to {cfg.dataset!r}; remove it")
        dataset_source(Path(resolve_path(cfg.dataset)), cfg.split)  # type: ignore[arg-type]
        return
    from .paths import check_model_source

    check_model_source(repo, "prompts.dataset", LOCAL_DATASETS)  # a mistyped local path is not sent to the Hub
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"prompts.dataset {repo!r} is read as a Hub dataset id, which needs the datasets package "
            f"(pip install 'polyrl[datasets]'); or give {LOCAL_DATASETS}"
        ) from None


def load_hub_dataset(cfg: PromptsConfig, source: str) -> list[dict]:
    """The rows of split ``prompts.split`` of the dataset ``source`` (a Hub id, or a local folder
    the datasets library reads), configuration ``prompts.dataset_config``."""
    import datasets

    from .paths import model_load_errors

    try:
        with model_load_errors("prompts.dataset", cfg.dataset, LOCAL_DATASETS, "dataset"):  # type: ignore[arg-type]
            data = datasets.load_dataset(source, name=cfg.dataset_config, split=cfg.split)
    except ValueError as e:
        text = " ".join(str(e).split())
        if text.startswith("Unknown split"):
            raise ConfigError(f"prompts.split={cfg.split!r}: {text}") from None
        if "BuilderConfig" in text or "Config name is missing" in text:
            raise ConfigError(f"prompts.dataset_config={cfg.dataset_config!r}: {text}") from None
        raise
    return [dict(row) for row in data]


def prefetch_hub_dataset(cfg: PromptsConfig) -> int:
    """Download the configured split of the Hub dataset into the datasets cache (``polyrl prefetch``)."""
    return len(load_hub_dataset(cfg, cfg.dataset))  # type: ignore[arg-type]


def _read_text(path: Path, where: str) -> str:
    """A UTF-8 prompt file, or a one-line error for a binary or non-UTF-8 one."""
    from .safeyaml import read_text_file

    return read_text_file(path, where, max_bytes=1 << 31)


def _read_records(kind: str, path: Path, split: str, where: str) -> list[dict]:
    """The rows of a dataset file or ``save_to_disk`` folder, as dicts (``where`` prefixes errors)."""
    if kind == "disk":
        import datasets

        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ConfigError(f"{where}: no split {split!r}; accepted: {sorted(data)}")
            data = data[split]
        return [dict(row) for row in data]
    if kind == ".csv":
        import csv

        import io

        return [dict(row) for row in csv.DictReader(io.StringIO(_read_text(path, where), newline=""))]
    if kind == ".json":
        try:
            data = json.loads(_read_text(path, where))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e})") from None
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):  # column-oriented
            n = {len(v) for v in data.values()}
            if len(n) > 1:
                raise ConfigError(f"{where}: its columns differ in length {sorted(n)}")
            return [{k: v[i] for k, v in data.items()} for i in range(n.pop() if n else 0)]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ConfigError(f"{where}: expected a list of objects or an object of equal-length columns")
        return data
    rows = []
    for n, line in enumerate(_read_text(path, where).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} line {n}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where} line {n}: expected a JSON object")
        rows.append(row)
    return rows


def _split_prompt(records: list[dict], column: str, where: str) -> list[tuple[str, dict]]:
    rows = []
    for n, row in enumerate(records, 1):
        if not isinstance(row.get(column), str):
            raise ConfigError(
                f"{where} row {n}: needs a string {column!r} column (prompts.prompt_column); its columns: {sorted(row)}"
            )
        row = dict(row)
        rows.append((row.pop(column), row))
    return rows


def load_prompts(cfg: PromptsConfig) -> list[tuple[str, dict]]:
    """``(prompt, extra columns)`` pairs from inline items, a text or JSONL file, or a dataset."""
    if cfg.items is not None:
        return [(p, {}) for p in cfg.items]
    if cfg.dataset is not None:
        repo = hub_dataset_id(cfg.dataset)
        kind, path = ("hub", Path(repo)) if repo else dataset_source(Path(resolve_path(cfg.dataset)), cfg.split)
        where = f"prompts.dataset {repo or str(path)!r}"
        if kind in ("hub", "load"):
            records = load_hub_dataset(cfg, repo or str(path))
        else:
            records = _read_records(kind, path, cfg.split, where)
        rows = _split_prompt(records, cfg.prompt_column, where)
        if not rows:
            raise ConfigError(f"prompts.dataset {str(path)!r} holds no prompts")
        return rows
    path = Path(resolve_path(cfg.file))  # type: ignore[arg-type]
    if path.suffix == ".jsonl":
        where = f"prompts.file {str(path)!r}"
        rows = _split_prompt(_read_records(".jsonl", path, cfg.split, where), cfg.prompt_column, where)
    else:
        rows = [(line, {}) for line in _read_text(path, f"prompts.file {str(path)!r}").splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"prompts.file {str(path)!r} holds no prompts")
    return rows


class PromptSource:
    """Draws ``P`` prompts per process per iteration, each repeated ``G`` times.

    The order is a seeded permutation per epoch over the prompt list, and process ``r`` of ``N``
    takes the ``r``-th slice, so the draw for an iteration depends only on (seed, iteration):
    a resumed run draws exactly what the uninterrupted run would have.
    """

    def __init__(self, cfg: PromptsConfig, seed: int) -> None:
        self.rows = load_prompts(cfg)
        self.shuffle = cfg.shuffle
        self.seed = seed

    def _order(self, epoch: int) -> list[int]:
        n = len(self.rows)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def contexts(self, iteration: int, rank: int, world: int, per_process: int, group: int) -> list[Context]:
        """Contexts for ``iteration`` (1-based) on process ``rank``: ``per_process * group`` of them."""
        n = len(self.rows)
        start = ((iteration - 1) * world + rank) * per_process
        out: list[Context] = []
        for j in range(per_process):
            k = start + j
            idx = self._order(k // n)[k % n]
            prompt, extra = self.rows[idx]
            gid = rank * per_process + j
            out.extend(Context(prompt=prompt, group=gid, extra=dict(extra)) for _ in range(group))
        return out
