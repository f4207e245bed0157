"""Turn `model.name` (hub id, local folder, or s3:// / file:// folder) into something from_pretrained loads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vlm_ray.storage import is_s3, open_store


def model_cache_dir() -> Path:
    """Where models copied from object storage are kept on a node (VLM_RAY_CACHE, default ~/.cache/vlm-ray)."""
    return Path(os.environ.get("VLM_RAY_CACHE", Path.home() / ".cache" / "vlm-ray")) / "models"


def resolve_model_path(name: str, endpoint_url: str | None = None) -> str:
    """A local folder for object-storage models (downloaded once per node); hub ids and paths pass through."""
    if name.startswith("file://"):
        return name[len("file://") :]
    if not is_s3(name):
        return name  # a local folder or a hub id: from_pretrained handles both
    dest = model_cache_dir() / hashlib.sha256(name.encode()).hexdigest()[:16]
    done = dest / ".complete"
    if not done.exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        open_store(name, endpoint_url).download_dir("", tmp)
        if dest.exists():  # another process on this node finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(dest)
        done.touch()
    return str(dest)
