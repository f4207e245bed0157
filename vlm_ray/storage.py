"""Object storage by URI: a local folder (plain path or file://) or s3://bucket/prefix via boto3.

Every stage reads and writes through a `Store` rooted at a URI, with keys
relative to that root ("prepared/train/shard-00000.parquet"). Writes are
atomic: a local write goes to a temporary file that is renamed into place; an
S3 PUT of a whole object is already atomic. `create_exclusive` is the
create-only commit marker (O_EXCL locally, `IfNoneMatch="*"` on S3) that lets
two workers race on one shard without both committing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


def is_s3(uri: str) -> bool:
    """True for s3:// URIs."""
    return uri.startswith("s3://")


def join_uri(base: str, *parts: str) -> str:
    """Join URI parts with '/', whatever the scheme."""
    out = base.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out


class Store:
    """A folder of objects addressed by relative keys. Subclasses: LocalStore, S3Store."""

    uri: str

    def read_bytes(self, key: str) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def create_exclusive(self, key: str, data: bytes) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def exists(self, key: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def list_folders(self, prefix: str = "") -> list[str]:  # pragma: no cover - interface
        """The names of the folders right under prefix (not their contents), sorted."""
        raise NotImplementedError

    def delete(self, key: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def child(self, prefix: str) -> Store:  # pragma: no cover - interface
        raise NotImplementedError

    # -- conveniences shared by both backends ---------------------------------

    def uri_of(self, key: str = "") -> str:
        """The full URI of a key (for logs and manifests)."""
        return join_uri(self.uri, key)

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under prefix; returns how many."""
        keys = list(self.list(prefix))
        for k in keys:
            self.delete(k)
        return len(keys)

    def upload_dir(self, local_dir: str | os.PathLike[str], prefix: str) -> int:
        """Copy a local folder's files under prefix (each file written atomically)."""
        root = Path(local_dir)
        n = 0
        for path in sorted(root.rglob("*")):
            if path.is_file():
                self.write_bytes(
                    join_uri(prefix, path.relative_to(root).as_posix()), path.read_bytes()
                )
                n += 1
        return n

    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> Path:
        """Copy every key under prefix into a local folder; returns that folder."""
        dest = Path(local_dir)
        dest.mkdir(parents=True, exist_ok=True)
        found = False
        for key in self.list(prefix):
            rel = key[len(prefix.rstrip("/")) + 1 :] if prefix else key
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(key))
            found = True
        if not found:
            raise FileNotFoundError(f"nothing under {self.uri_of(prefix)}")
        return dest


class LocalStore(Store):
    """A local folder. Atomic writes by temp file + os.replace in the same folder."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve() if key else self.root
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"key {key!r} escapes the store root {self.root}")
        return path

    def local_path(self, key: str = "") -> Path:
        """The file system path of a key (local stores only)."""
        return self._path(key)

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise FileNotFoundError(f"no object at {self.uri_of(key)}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def create_exclusive(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write the content aside first, then link it into place: link() fails if
        # the name exists, so the marker appears whole or not at all.
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix)
        if base.is_file():
            yield prefix
            return
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # an in-flight atomic write, not an object
                yield (Path(dirpath) / name).relative_to(self.root).as_posix()

    def list_folders(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list(prefix))
        path = self._path(prefix)
        if path.is_dir() and path != self.root:
            shutil.rmtree(path, ignore_errors=True)  # one call, and no empty folders left behind
        else:
            for key in keys:
                self.delete(key)
        return len(keys)

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self._path(prefix))


@dataclass
class _S3Location:
    bucket: str
    prefix: str


class S3Store(Store):
    """An s3://bucket/prefix through boto3 (standard credential chain; optional endpoint)."""

    def __init__(self, uri: str, endpoint_url: str | None = None, client: Any = None):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"{uri!r} has no bucket: expected s3://bucket/prefix")
        self.loc = _S3Location(parsed.netloc, parsed.path.strip("/"))
        self.uri = join_uri(f"s3://{self.loc.bucket}", self.loc.prefix)
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # botocore's own retry modes, not a hand-written loop.
            cfg = Config(retries={"max_attempts": 8, "mode": "adaptive"})
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, config=cfg
            )
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        # boto3 clients do not pickle; Ray ships stores to workers, which reconnect.
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    def _key(self, key: str) -> str:
        return join_uri(self.loc.prefix, key).lstrip("/")

    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.loc.bucket, Key=self._key(key))["Body"].read()
        except ClientError as err:
            if err.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"no object at {self.uri_of(key)}") from None
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.loc.bucket, Key=self._key(key), Body=data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(
                Bucket=self.loc.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"
            )
            return True
        except ClientError as err:
            if err.response["Error"]["Code"] in (
                "PreconditionFailed",
                "412",
                "ConditionalRequestConflict",
            ):
                return False
            raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.loc.bucket, Key=self._key(key))
            return True
        except ClientError as err:
            if err.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix: str = "") -> Iterator[str]:
        full = self._key(prefix)
        if full and not full.endswith("/"):
            # exact object, or a "folder"
            if self.exists(prefix):
                yield prefix
                return
            full += "/"
        strip = len(self.loc.prefix) + 1 if self.loc.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.loc.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:]

    def list_folders(self, prefix: str = "") -> list[str]:
        # One "folder" level by S3's delimiter: the keys below it are never listed.
        full = self._key(prefix).rstrip("/")
        full = f"{full}/" if full else ""
        paginator = self.client.get_paginator("list_objects_v2")
        names = set()
        for page in paginator.paginate(Bucket=self.loc.bucket, Prefix=full, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                names.add(common["Prefix"][len(full) :].rstrip("/"))
        return sorted(names)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.loc.bucket, Key=self._key(key))

    def child(self, prefix: str) -> S3Store:
        return S3Store(join_uri(self.uri, prefix), self.endpoint_url, self._client)


def open_store(uri: str, endpoint_url: str | None = None) -> Store:
    """A Store for a URI: s3://... through boto3, anything else a local folder."""
    if is_s3(uri):
        return S3Store(uri, endpoint_url)
    if uri.startswith("file://"):
        return LocalStore(urlparse(uri).path)
    return LocalStore(uri)


def split_uri(uri: str, endpoint_url: str | None = None) -> tuple[Store, str]:
    """A store for the parent of uri, and the last name in it (to read one object by URI)."""
    base, _, name = uri.rstrip("/").rpartition("/")
    if is_s3(uri) and base == "s3:/":
        raise ValueError(f"{uri!r} names a bucket, not an object")
    return open_store(base or ".", endpoint_url), name
