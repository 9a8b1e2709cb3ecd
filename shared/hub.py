"""Hugging Face hub ids as models: downloaded with huggingface_hub into a local cache.

`jetserve worker --model Qwen/Qwen2.5-0.5B-Instruct` (not a local folder, not a model
pushed to NATS) downloads the repository's model files with huggingface_hub's own client:
its progress bars, its cache layout under `<model cache>/hub` (a second start downloads
nothing), `--model-revision` pinning (branch, tag or commit), the token from HF_TOKEN and
the endpoint from HF_ENDPOINT (a mirror, or the local fake hub the tests run).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# The files a model folder needs; the rest of a repository (README, images, other
# formats' weights) is not downloaded.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class HubError(Exception):
    """The hub id cannot be downloaded (unknown repo or revision, no access, no network)."""


def is_hub_id(model: str) -> bool:
    return bool(_HUB_ID.fullmatch(model)) and ".." not in model


def download(repo_id: str, revision: str | None, cache_dir: Path) -> Path:
    """The repository's model files at `revision`, as a local folder (blocking)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:
        raise HubError("huggingface_hub is not installed (pip install huggingface_hub)") from e
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision or None,
            cache_dir=str(cache_dir),
            allow_patterns=MODEL_FILE_PATTERNS,
            # Read now, not when huggingface_hub was first imported.
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"could not download {repo_id}@{revision or 'main'}: {first}") from e
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise HubError(f"{repo_id}@{revision or 'main'} has no config.json: not a model repo")
    return path


def model_files(repo_id: str, revision: str | None) -> list[tuple[str, int]]:
    """(path, size) of the files `download` fetches: the total a progress report needs."""
    from fnmatch import fnmatch

    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.hf_api import RepoFile
    except ImportError as e:
        raise HubError("huggingface_hub is not installed (pip install huggingface_hub)") from e
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=os.environ.get("HF_TOKEN"))
    try:
        tree = api.list_repo_tree(repo_id, revision=revision or None, recursive=True)
        files = [(f.path, f.size) for f in tree if isinstance(f, RepoFile)]
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"could not list {repo_id}@{revision or 'main'}: {first}") from e
    return [(p, n) for p, n in files if any(fnmatch(p, pat) for pat in MODEL_FILE_PATTERNS)]


def bytes_under(folder: Path) -> int:
    """Bytes written so far below `folder` (a download in progress)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
