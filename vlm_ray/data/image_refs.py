"""Image cells to bytes: inline bytes, {bytes, path} structs, or paths resolved inside the data root.

A path is read relative to the data file that names it, or as an explicit
s3:// / file:// URI; a path that climbs out of the data root
(`../../etc/passwd`) is rejected, never read.
"""

from __future__ import annotations

import io
import posixpath
from pathlib import Path
from typing import Any

from vlm_ray.data.images import ImageRejected
from vlm_ray.data.sources import Source
from vlm_ray.storage import LocalStore, is_s3, split_uri


def image_bytes(value: Any, src: Source, base_dir: str, column: str) -> tuple[bytes, str | None]:
    """The encoded bytes of an image cell ({bytes, path} struct, bytes, path/URI, PIL image) and its path if any."""
    if value is None:
        raise ImageRejected(
            f"row has no image: column {column!r} is missing or empty (set data.image_column)"
        )
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), value.get("path")
        if value.get("path"):
            return read_image_file(str(value["path"]), src, base_dir), str(value["path"])
        raise ImageRejected(f"column {column!r} holds an image struct with neither bytes nor path")
    if isinstance(value, str):
        return read_image_file(value, src, base_dir), value
    if hasattr(value, "save"):  # a decoded PIL image from a library that decoded it anyway
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue(), None
    raise ImageRejected(
        f"column {column!r} holds a {type(value).__name__}; expected image bytes, a {{bytes, path}} struct or a path"
    )


def read_image_file(ref: str, src: Source, base_dir: str) -> bytes:
    """Read an image path relative to the data file (or an s3:// / file:// URI); never outside the data root."""
    if is_s3(ref) or ref.startswith("file://"):
        store, name = split_uri(ref, src.endpoint_url)
    else:
        store = src.store()
        if ref.startswith("/"):
            root = store.local_path() if isinstance(store, LocalStore) else None
            if root is None or not Path(ref).resolve().is_relative_to(root):
                raise ImageRejected(
                    f"path escapes the data root: absolute path {ref!r} is outside {src.root} "
                    "(give paths relative to the data file, or an explicit file:// or s3:// URI)"
                )
            name = Path(ref).resolve().relative_to(root).as_posix()
        else:
            name = posixpath.normpath(posixpath.join(base_dir, ref.replace("\\", "/")))
            if name == ".." or name.startswith("../"):
                raise ImageRejected(
                    f"path escapes the data root: {ref!r} points outside {src.root}"
                )
    try:
        return store.read_bytes(name)
    except FileNotFoundError:
        raise ImageRejected(f"missing file: {ref!r} (looked for {store.uri_of(name)})") from None
    except (IsADirectoryError, ValueError) as err:
        raise ImageRejected(f"cannot read image {ref!r}: {err}") from None
