"""``polyrl prefetch``: everything remote that a run config needs, downloaded in one go.

A config names its models by Hub id (``policy.pretrained: CompVis/stable-diffusion-v1-4``), by
open_clip name and pretrained tag (``ViT-L-14`` / ``openai``), by Hub file
(``hf-hub:org/repo/file.pt``), by URL (the LAION aesthetic head) or by Hub dataset id
(``prompts.dataset: owner/name``). :func:`needs` lists them, each with the config key that names
it and the place the run will read it from: the Hugging Face cache (``HF_HUB_CACHE``), open_clip's
cache, or polyrl's own (``POLYRL_CACHE``). :func:`prefetch` downloads what is missing into exactly
those places, so that the same machine, or one that gets a copy of those folders, can then train
with ``HF_HUB_OFFLINE=1``. Without network access it says, for each file, where to put it.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig
from .paths import hub_cache_dir, in_hub_cache, resolve_path

__all__ = ["Need", "needs", "prefetch", "format_needs"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILE = re.compile(r"^hf-hub:([A-Za-z0-9][\w.-]*/[\w.-]+)/(.+)$")
#: Policy names whose ``pretrained`` is a diffusers pipeline (downloaded with diffusers' own file selection).
PIPELINE_POLICIES = {"diffusion": "StableDiffusionPipeline", "lcm": "LatentConsistencyModelPipeline"}
#: Rewards whose ``model`` / ``pretrained`` are open_clip references.
OPEN_CLIP_REWARDS = ("clip_score", "aesthetic")
#: Fields that hold a model reference (a local folder or a Hub id).
MODEL_FIELDS = ("pretrained", "model", "tokenizer", "processor", "sentence_encoder")


@dataclass
class Need:
    """One remote thing a run reads."""

    key: str
    """The config key that names it (``policy.pretrained``, ``rewards.aesthetic.head``)."""
    what: str
    """What it is, in words (``Hub model CompVis/stable-diffusion-v1-4``)."""
    where: str
    """Where the run reads it from once downloaded."""
    manual: str
    """How to provide it by hand on a machine without network access."""
    present: Callable[[], bool]
    """Whether it is already there."""
    fetch: Callable[[], Any]
    """Downloads it to ``where`` (raises on failure)."""


def _hub_model(key: str, repo: str, revision: str | None, pipeline: str | None, trust_remote_code: bool) -> Need:
    cache = hub_cache_dir()

    def fetch() -> Any:
        if pipeline:
            import diffusers

            return diffusers.DiffusionPipeline.download(repo, revision=revision)
        from huggingface_hub import HfApi, snapshot_download

        files = HfApi().list_repo_files(repo, revision=revision)
        skip = ["*.h5", "*.msgpack", "*.onnx", "*.ckpt", "*.ot", "*.tflite", "onnx/*", "flax_model*", "tf_model*"]
        if any(f.endswith(".safetensors") for f in files):  # weights are only ever read from safetensors then
            skip += ["*.bin", "*.pt", "*.pth"]
        if not trust_remote_code:
            skip += ["*.py"]
        return snapshot_download(repo, revision=revision, ignore_patterns=skip)

    rev = f" --revision {revision}" if revision else ""
    return Need(key, f"Hub {'pipeline' if pipeline else 'model'} {repo}" + (f" ({revision})" if revision else ""),
                cache, f"`hf download {repo}{rev}` on a machine with network access, then copy {cache}; or download "
                f"it into a folder (`hf download {repo}{rev} --local-dir FOLDER`) and set {key}: FOLDER",
                lambda: in_hub_cache(repo), fetch)


def _hub_file(key: str, repo: str, filename: str, cache_dir: str | None) -> Need:
    cache = cache_dir or hub_cache_dir()

    def present() -> bool:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, filename, cache_dir=cache_dir), str)

    def fetch() -> Any:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, filename, cache_dir=cache_dir)

    return Need(key, f"Hub file {repo}/{filename}", cache,
                f"`hf download {repo} {filename}` (add --cache-dir {cache} if that is not your Hugging Face cache); "
                f"or download the file and set {key} to its path", present, fetch)


def _open_clip(key: str, model: str, pretrained: str, cache_dir: str | None) -> Need | None:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model.replace("/", "-"), pretrained)
    if not cfg:
        return None
    hub = (cfg.get("hf_hub") or "").strip("/")
    if hub:
        filename = "open_clip_pytorch_model.bin"
        if "/" in hub and hub.count("/") > 1:
            hub, filename = hub.rsplit("/", 1)
        need = _hub_file(key, hub, filename, cache_dir)
        need.what = f"open_clip weights {model} ({pretrained}): Hub file {hub}/{filename}"
        need.fetch = lambda: open_clip.download_pretrained(cfg, cache_dir=cache_dir)
        return need
    url = cfg.get("url")
    if not url:  # pragma: no cover - every built-in tag has one of the two
        return None
    target = Path(cache_dir or Path("~/.cache/clip").expanduser()) / Path(urllib.parse.urlparse(url).path).name
    return Need(key, f"open_clip weights {model} ({pretrained}): {url}", str(target.parent),
                f"download {url} and put it at {target}, or set {key.rsplit('.', 1)[0]}.pretrained to the file",
                target.is_file, lambda: open_clip.download_pretrained(cfg, cache_dir=cache_dir))


def _url(key: str, url: str, target: Path, fetch: Callable[[], Any]) -> Need:
    return Need(key, f"file {url}", str(target.parent), f"download {url} and put it at {target}, or set {key} to the "
                "downloaded file", target.is_file, fetch)


def _is_local(ref: str) -> bool:
    return Path(resolve_path(ref)).exists()


def needs(cfg: RunConfig) -> list[Need]:
    """Every remote model, file and dataset the run ``cfg`` reads (local paths are left out)."""
    out: list[Need] = []
    # the policy
    params = cfg.policy.params
    pretrained = getattr(params, "pretrained", None)
    if isinstance(pretrained, str) and _HUB_ID.match(pretrained) and not _is_local(pretrained):
        out.append(_hub_model("policy.pretrained", pretrained, getattr(params, "revision", None),
                              PIPELINE_POLICIES.get(cfg.policy.name), bool(getattr(params, "trust_remote_code", False))))
    # the rewards
    for r in cfg.rewards:
        p, base = r.params, f"rewards.{r.key}"
        if p is None:
            continue
        cache_dir = getattr(p, "cache_dir", None)
        cache_dir = cache_dir and str(Path(cache_dir).expanduser())
        done: set[str] = set()
        if r.name in OPEN_CLIP_REWARDS:
            done |= {"model", "pretrained"}
            model, tag = str(p.model), getattr(p, "pretrained", None)
            if model.startswith("hf-hub:"):
                out.append(_hub_model(f"{base}.model", model[len("hf-hub:"):], None, None, False))
            elif not _is_local(model) and tag and not _is_local(tag):
                need = _open_clip(f"{base}.pretrained", model, tag, cache_dir)
                if need is not None:
                    out.append(need)
        if r.name == "aesthetic":
            from polyrl.rewards.aesthetic import _is_url, default_cache_dir, fetch_head

            done.add("head")
            if _is_url(p.head):
                folder = Path(cache_dir) / "aesthetic" if cache_dir else default_cache_dir() / "aesthetic"
                target = folder / Path(urllib.parse.unquote(urllib.parse.urlparse(p.head).path)).name
                out.append(_url(f"{base}.head", p.head, target, lambda h=p.head, f=folder: fetch_head(h, f)))
        for name, value in vars(p).items():
            if name in done or not isinstance(value, str):
                continue
            hub = _HUB_FILE.match(value)
            if hub:
                out.append(_hub_file(f"{base}.{name}", hub.group(1), hub.group(2), cache_dir))
            elif name in MODEL_FIELDS and _HUB_ID.match(value) and not _is_local(value):
                need = _hub_model(f"{base}.{name}", value, None, None, bool(getattr(p, "trust_remote_code", False)))
                if cache_dir:
                    need.present = lambda v=value, c=cache_dir: _in_cache(v, c)
                    need.fetch = lambda v=value, c=cache_dir: __import__("huggingface_hub").snapshot_download(v, cache_dir=c)
                    need.where = cache_dir
                out.append(need)
    # the prompts
    if cfg.prompts.dataset is not None:
        from .prompts import hub_dataset_id, prefetch_hub_dataset

        repo = hub_dataset_id(cfg.prompts.dataset)
        if repo is not None:
            cache = hub_cache_dir()
            subset = f", configuration {cfg.prompts.dataset_config}" if cfg.prompts.dataset_config else ""
            out.append(Need("prompts.dataset", f"Hub dataset {repo}{subset}, split {cfg.prompts.split}", cache,
                            f"`hf download {repo} --repo-type dataset` on a machine with network access, then copy "
                            f"{Path(cache).parent}; or save the split as a .jsonl file and set prompts.dataset to it",
                            lambda: in_hub_cache(repo, "dataset"), lambda: prefetch_hub_dataset(cfg.prompts)))
    return out


def _in_cache(repo: str, cache_dir: str, repo_type: str = "model") -> bool:
    folder = Path(cache_dir) / f"{repo_type}s--{repo.replace('/', '--')}" / "snapshots"
    return folder.is_dir() and any(folder.iterdir())


def format_needs(items: list[Need]) -> list[str]:
    """One line per need: ``[present|missing] key: what -> where``."""
    return [f"  [{'present' if n.present() else 'missing'}] {n.key}: {n.what} -> {n.where}" for n in items]


def prefetch(cfg: RunConfig, download: bool = True, echo: Callable[[str], None] = print) -> int:
    """List what ``cfg`` needs and, with ``download``, fetch what is missing. Returns the number of
    needs still missing; for each, how to provide it by hand is echoed."""
    from .paths import describe_load_failure, hub_offline

    items = needs(cfg)
    if not items:
        echo("polyrl: this config reads only local files; nothing to download")
        return 0
    echo(f"polyrl: this config reads {len(items)} remote item{'s' if len(items) != 1 else ''}:")
    for line in format_needs(items):
        echo(line)
    missing = [n for n in items if not n.present()]
    if not download or not missing:
        if missing:
            echo("polyrl: to provide them by hand:")
            for n in missing:
                echo(f"  {n.key}: {n.manual}")
        return len(missing)
    if hub_offline():
        echo("polyrl: HF_HUB_OFFLINE is set: Hub downloads will be refused")
    failed = []
    for n in missing:
        echo(f"polyrl: downloading {n.what} ...")
        try:
            n.fetch()
        except (OSError, RuntimeError, ValueError) as e:
            reason = describe_load_failure(n.key, n.what, "a local copy", e)
            if reason is None:
                raise
            why = " ".join(str(e).split())
            echo(f"polyrl: could not download {n.what}: {why[:200] + '...' if len(why) > 200 else why}")
            failed.append(n)
    if failed:
        echo("polyrl: these could not be downloaded; to provide them by hand:")
        for n in failed:
            echo(f"  {n.key}: {n.manual}")
    else:
        echo("polyrl: everything this config reads is here; it can now train offline (HF_HUB_OFFLINE=1)")
    return len(failed)
