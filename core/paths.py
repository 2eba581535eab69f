"""Resolving the relative paths that configs use (``assets/tiny-gpt2``, prompt files)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .types import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The polyrl checkout (for an editable install), where ``assets/`` and ``configs/`` live."""


def resolve_path(name: str) -> str:
    """``name`` if it exists as given; else, for a relative path, the same path under the polyrl
    checkout if it exists there (so ``assets/tiny-sd`` works from any directory); else ``name``
    unchanged (for a model, a Hub id)."""
    p = Path(name).expanduser()
    if p.exists() or p.is_absolute():
        return str(p)
    q = REPO_ROOT / p
    return str(q) if q.exists() else name


# ------------------------------------------------------------------------------ model sources
def looks_local(name: str) -> bool:
    """Whether ``name`` cannot be a Hub id (``owner/name``): absolute, ``./``-relative, ``~``, a
    Windows separator, or more than one ``/``."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def looked_in(name: str) -> list[str]:
    """Where :func:`resolve_path` looks for a relative ``name``: the current directory, then the
    polyrl checkout."""
    p = Path(name).expanduser()
    out = [str(p.resolve())]
    if not p.is_absolute() and str(REPO_ROOT / p) not in out:
        out.append(str(REPO_ROOT / p))
    return out


def did_you_mean(name: str) -> str:
    """`` (did you mean 'assets/tiny-gpt2'?)`` when the folder that should hold ``name`` exists and
    holds an entry with a close name; else an empty string."""
    import difflib

    p = Path(name.rstrip("/\\")).expanduser()
    if str(p.parent) in ("", "."):
        return ""
    for base in ([p.parent] if p.is_absolute() else [p.parent, REPO_ROOT / p.parent]):
        if base.is_dir():
            close = difflib.get_close_matches(p.name, [c.name for c in base.iterdir()], n=1, cutoff=0.6)
            if close:
                return f" (did you mean {str(p.parent / close[0])!r}?)"
    return ""


def hub_cache_dir() -> str:
    """The Hugging Face cache the models of a run are read from (``HF_HUB_CACHE``, ``HF_HOME/hub``
    or ``~/.cache/huggingface/hub``)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers and diffusers
        return str(Path("~/.cache/huggingface/hub").expanduser())
    return str(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """Whether downloads from the Hub are switched off (``HF_HUB_OFFLINE=1``)."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(constants.HF_HUB_OFFLINE)


def in_hub_cache(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the Hugging Face cache holds a snapshot of ``repo_id``."""
    folder = Path(hub_cache_dir()) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots"
    return folder.is_dir() and any(folder.iterdir())


def check_model_source(name: str, key: str, what: str) -> None:
    """Reject, before anything loads, a model reference that can only be a missing local folder:
    empty; a path that cannot be a Hub id (``./x``, ``/x``, ``a/b/c``); or ``folder/name`` whose
    ``folder`` exists here while ``name`` does not (a mistyped local path such as
    ``assets/tiny-gpt`` would otherwise be sent to the Hub as an id), unless the Hugging Face
    cache holds a model of that id. ``key`` is the config key, ``what`` the accepted kind of folder."""
    if not name or not name.strip():
        raise ConfigError(f"{key} is empty: give a Hub id (owner/name) or {what}")
    if Path(resolve_path(name)).exists():
        return
    if looks_local(name):
        raise ConfigError(
            f"{key}: no such folder {name!r}{did_you_mean(name)} (looked in {looked_in(name)}); "
            f"a Hub id (owner/name) or {what} is accepted"
        )
    parent = Path(name).parent
    if str(parent) not in ("", ".") and any(Path(p).parent.is_dir() for p in looked_in(name)) and not in_hub_cache(name):
        raise ConfigError(
            f"{key}: no folder {name!r}{did_you_mean(name)}; {str(parent)!r} is a local folder, so this is a "
            f"mistyped path rather than a Hub id (looked in {looked_in(name)}). Give the folder's exact name; for a "
            f"Hub repository of that id, download it first (`hf download {name}`)"
        )


def _hub_errors() -> tuple[type, ...]:
    try:
        from huggingface_hub import errors
    except ImportError:  # pragma: no cover
        return ()
    return tuple(
        getattr(errors, n)
        for n in ("HfHubHTTPError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "HFValidationError",
                  "EntryNotFoundError", "RevisionNotFoundError", "RepositoryNotFoundError", "GatedRepoError")
        if hasattr(errors, n)
    )


def _network_errors() -> tuple[type, ...]:
    out: list[type] = [ConnectionError, TimeoutError]
    try:
        import httpx

        out += [httpx.TransportError]
    except ImportError:  # pragma: no cover
        pass
    try:
        import requests

        out += [requests.ConnectionError, requests.Timeout]
    except ImportError:  # pragma: no cover
        pass
    return tuple(out)


def _chain(e: BaseException):
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        yield x
        x = x.__cause__ or x.__context__


def describe_load_failure(key: str, name: str, what: str, e: BaseException, repo_type: str = "model") -> str | None:
    """One paragraph for a model that could not be loaded from ``name`` (the value of config key
    ``key``), naming the fix; ``None`` when ``e`` is not a Hub, network or missing-file failure
    (then it is a bug, and is shown as one)."""
    from huggingface_hub import errors as hub

    if name.startswith(("http://", "https://", "ftp://")):  # a plain download, not the Hub
        return f"{key}: {_first_line(e)}" if isinstance(e, OSError) else None
    chain = list(_chain(e))
    find = lambda *types: next((x for x in chain if isinstance(x, types)), None)  # noqa: E731
    cache = hub_cache_dir()
    import re

    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    alt = f" (or `hf download {name}{kind}`)" if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else ""
    fetch = (f"On a machine with network access run `polyrl prefetch <config>`{alt} and copy "
             f"its Hugging Face cache to {cache} here (or point HF_HUB_CACHE at it), or set {key} to {what}")
    if find(hub.GatedRepoError):
        return (f"{key}: the Hub model {name!r} is gated: accept its terms on its Hub page, then log in "
                f"(`hf auth login`, or set HF_TOKEN); or set {key} to {what}")
    if find(hub.RepositoryNotFoundError):
        return (f"{key}: {name!r} is not a local folder{did_you_mean(name)} (looked in {looked_in(name)}) and the "
                f"Hub has no model of that id (a private one needs `hf auth login`); give {what} or a Hub id (owner/name)")
    if find(hub.RevisionNotFoundError):
        return f"{key}: the Hub model {name!r} has no such revision; check the revision setting of that section"
    if find(hub.HFValidationError):
        return (f"{key}: {name!r} is neither a local folder{did_you_mean(name)} (looked in {looked_in(name)}) nor a "
                f"Hub id of the form owner/name; give {what} or a Hub id")
    if find(hub.OfflineModeIsEnabled, hub.LocalEntryNotFoundError, *_network_errors()):
        why = ("HF_HUB_OFFLINE=1 forbids downloads" if hub_offline() else "the Hub cannot be reached")
        return f"{key}: cannot load {name!r}: it is not a local folder and not in the Hugging Face cache, and {why}. {fetch}"
    if find(hub.EntryNotFoundError):
        return f"{key}: the Hub repository {name!r} lacks a file that {what} needs ({_first_line(e)}); is it {what}?"
    if find(hub.HfHubHTTPError):
        return f"{key}: the Hub refused {name!r} ({_first_line(find(hub.HfHubHTTPError))}). {fetch}"
    if isinstance(e, FileNotFoundError):
        return f"{key}: {_first_line(e)}"
    return None


def _first_line(e: BaseException | None) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 600 else text[:580] + "..."


@contextmanager
def model_load_errors(key: str, name: str, what: str, repo_type: str = "model") -> Iterator[None]:
    """Turn a failure to load the model ``name`` (config key ``key``) from the Hub or a missing file
    into a :class:`ConfigError` that says what to do (:func:`describe_load_failure`); anything
    else propagates unchanged."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        message = describe_load_failure(key, name, what, e, repo_type)
        if message is None:
            raise
        raise ConfigError(message) from e
