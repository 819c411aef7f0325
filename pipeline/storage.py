"""Where outputs live: a local folder (exactly as before) or an object store bucket (``s3://``, ``gs://``).

``location(x)`` is the one entry point: a local path comes back as a ``pathlib.Path`` and every local code path is
unchanged; a URL comes back as an ``ObjectPath``, the small part of pathlib's interface the pipeline uses (``/``,
``name``, ``parent``, ``exists``, ``is_file``, ``is_dir``, ``iterdir``, ``glob``, ``read_bytes``/``read_text``,
``write_bytes``/``write_text``, ``unlink``, ``stat``) over ``pyarrow.fs`` (S3 and GCS are built into pyarrow).

What changes on a bucket, and why it is still exactly-once:

* **Writes are whole-object PUTs.** An object appears complete or not at all, so there is no temporary name and no
  rename (which object stores do not have): ``atomic.atomic_open`` buffers the bytes and PUTs them once.
* **The marker goes last.** A shard is its data object, then its ``.done.json`` marker: a run killed between the two
  leaves data without a marker, which readers ignore and the next run overwrites. The data's name is fixed by its
  input shard, so however many attempts write it, it holds that shard's records once.
* **Listing is by prefix.** ``is_dir`` is true when some object has the prefix; ``mkdir`` does nothing.
* **Connection settings ride in the URL**, so every Ray worker that is handed a folder can open it:
  ``s3://bucket/out?endpoint_override=minio:9000&scheme=http&region=us-east-1`` (pyarrow's URI options). Credentials
  never do: pyarrow reads them from the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, an instance
  or pod role; ``GOOGLE_APPLICATION_CREDENTIALS`` or the metadata server for GCS), which every node must have.
* **Exclusive create** (``create_exclusive``: S3's ``If-None-Match: *``, GCS's ``ifGenerationMatch=0``) is what the
  output folder's lock is built on (``output_lock``); pyarrow has no conditional write, so it uses boto3 or
  google-cloud-storage.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlencode

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")

__all__ = ["ObjectPath", "REMOTE_SCHEMES", "arrow_source", "create_exclusive", "is_remote", "location"]


def is_remote(loc: Any) -> bool:
    """True for an object-store location (``s3://``, ``gs://``), as an ``ObjectPath`` or a URL string."""
    return isinstance(loc, ObjectPath) or (isinstance(loc, str) and loc.startswith(REMOTE_SCHEMES))


def location(loc: "str | os.PathLike[str] | ObjectPath") -> "Path | ObjectPath":
    """A ``Path`` for a local location (unchanged behaviour), an ``ObjectPath`` for a bucket URL."""
    if isinstance(loc, ObjectPath):
        return loc
    if isinstance(loc, str) and loc.startswith(REMOTE_SCHEMES):
        return ObjectPath.parse(loc)
    return Path(loc)


def arrow_source(path: "str | os.PathLike[str] | ObjectPath") -> tuple[str, Any]:
    """``(path, filesystem)`` for pyarrow's readers and writers: ``(str(path), None)`` for a local file."""
    if is_remote(path):
        obj = location(path)
        return obj.key, obj.fs  # type: ignore[union-attr]
    return os.fspath(path), None  # type: ignore[arg-type]


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, bucket: str, query: str) -> Any:
    """One pyarrow filesystem per bucket and settings, per process (creating an S3 client costs milliseconds)."""
    from pyarrow import fs as pafs

    if scheme == "s3" and "allow_delayed_open" not in query:
        # a small object (a marker, a shard) as ONE PutObject instead of a three-request multipart upload
        query = "&".join(q for q in (query, "allow_delayed_open=true") if q)
    filesystem, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))
    return filesystem


@dataclass(frozen=True)
class _Stat:
    """What ``os.stat`` callers here read: size and modification time (an object has no inode: 0)."""

    st_size: int
    st_mtime: float
    st_mtime_ns: int
    st_ino: int = 0


@dataclass(frozen=True, order=True)
class ObjectPath:
    """An object-store location: ``scheme://bucket/key`` plus the connection settings of its URL's query."""

    scheme: str
    key: str  # bucket/prefix/name, no leading or trailing slash
    query: str = ""

    @classmethod
    def parse(cls, url: str) -> "ObjectPath":
        scheme, _, rest = url.partition("://")
        rest, _, query = rest.partition("?")
        key = "/".join(p for p in rest.split("/") if p)
        if not key:
            raise ValueError(f"{url!r} names no bucket")
        return cls("gs" if scheme == "gcs" else scheme, key, urlencode(sorted(parse_qsl(query)), safe=":/"))

    # --- pure path arithmetic ------------------------------------------------------------------------------------

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}" + (f"?{self.query}" if self.query else "")

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __truediv__(self, part: "str | os.PathLike[str]") -> "ObjectPath":
        tail = "/".join(p for p in os.fspath(part).split("/") if p)
        return ObjectPath(self.scheme, f"{self.key}/{tail}" if tail else self.key, self.query)

    def joinpath(self, *parts: str) -> "ObjectPath":
        out = self
        for part in parts:
            out = out / part
        return out

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind("."):] if "." in name[1:] else ""

    @property
    def parent(self) -> "ObjectPath":
        head = self.key.rsplit("/", 1)[0] if "/" in self.key else self.key
        return ObjectPath(self.scheme, head, self.query)

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def object_key(self) -> str:
        """The key inside the bucket."""
        return self.key.split("/", 1)[1] if "/" in self.key else ""

    def with_name(self, name: str) -> "ObjectPath":
        return self.parent / name

    def expanduser(self) -> "ObjectPath":
        return self

    def resolve(self) -> "ObjectPath":
        return self

    def option(self, name: str) -> str | None:
        return dict(parse_qsl(self.query)).get(name)

    # --- the store -----------------------------------------------------------------------------------------------

    @property
    def fs(self) -> Any:
        return _filesystem(self.scheme, self.bucket, self.query)

    def _info(self) -> Any:
        return self.fs.get_file_info(self.key)

    def exists(self) -> bool:
        from pyarrow import fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        from pyarrow import fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        from pyarrow import fs as pafs

        return self._info().type == pafs.FileType.Directory

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a bucket's "folders" are key prefixes, there once an object has them."""

    def stat(self) -> _Stat:
        from pyarrow import fs as pafs

        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(self))
        mtime_ns = info.mtime_ns or 0
        return _Stat(int(info.size or 0), mtime_ns / 1e9, mtime_ns)

    def iterdir(self) -> Iterator["ObjectPath"]:
        """The objects and prefixes directly under this one (one LIST request per 1,000)."""
        from pyarrow import fs as pafs

        for info in self.fs.get_file_info(pafs.FileSelector(self.key, allow_not_found=True)):
            if info.path.rstrip("/") != self.key:
                yield ObjectPath(self.scheme, info.path.rstrip("/"), self.query)

    def glob(self, pattern: str) -> Iterator["ObjectPath"]:
        """Names directly under this prefix that match ``pattern`` (fnmatch; one level, like the pipeline's globs)."""
        if "/" in pattern:
            head, _, rest = pattern.partition("/")
            for sub in self.glob(head):
                yield from sub.glob(rest)
            return
        for child in self.iterdir():
            if fnmatch.fnmatchcase(child.name, pattern):
                yield child

    def rglob_files(self) -> Iterator["ObjectPath"]:
        """Every object below this prefix."""
        from pyarrow import fs as pafs

        selector = pafs.FileSelector(self.key, allow_not_found=True, recursive=True)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                yield ObjectPath(self.scheme, info.path, self.query)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.key) as fh:
            return fh.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """One PUT: the object appears whole when it returns, or not at all."""
        with self.fs.open_output_stream(self.key) as fh:
            fh.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def touch(self, exist_ok: bool = True) -> None:
        """A new modification time: the object written again, empty (a worker's beat, ``worker.Beat``)."""
        self.write_bytes(b"")

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove_tree(self) -> None:
        self.fs.delete_dir_contents(self.key, missing_dir_ok=True)


# --- exclusive create: what a lock needs ---------------------------------------------------------------------------


class ExclusiveCreateUnavailable(RuntimeError):
    """This store cannot create an object only if it is absent (the client library is missing)."""


def create_exclusive(path: ObjectPath, data: bytes) -> bool:
    """PUT ``data`` at ``path`` only if nothing is there: True when this call created it, False when it existed."""
    if path.scheme == "s3":
        return _s3_create_exclusive(path, data)
    if path.scheme == "gs":
        return _gcs_create_exclusive(path, data)
    raise ExclusiveCreateUnavailable(f"no exclusive create for {path.scheme}://")


def exclusive_create_problem(path: ObjectPath) -> str | None:
    """Why ``create_exclusive`` cannot work for ``path`` here (its client library is missing), or None."""
    try:
        if path.scheme == "s3":
            import boto3  # noqa: F401
        elif path.scheme == "gs":
            from google.cloud import storage  # noqa: F401
        else:
            return f"no exclusive create for {path.scheme}://"
    except ImportError:
        extra = "s3" if path.scheme == "s3" else "gcs"
        return (f"locking a {path.scheme}:// output folder needs "
                f"{'boto3' if extra == 's3' else 'google-cloud-storage'} (pip install 'gmner-pipeline[{extra}]')")
    return None


_CLIENTS: dict[tuple[str, str], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _s3_client(path: ObjectPath) -> Any:
    try:
        import boto3
    except ImportError:
        raise ExclusiveCreateUnavailable(
            "locking an s3:// output folder needs boto3 (pip install 'gmner-pipeline[s3]')") from None
    key = ("s3", path.query)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            endpoint = path.option("endpoint_override")
            if endpoint and "://" not in endpoint:
                endpoint = f"{path.option('scheme') or 'https'}://{endpoint}"
            _CLIENTS[key] = boto3.client("s3", endpoint_url=endpoint or os.environ.get("AWS_ENDPOINT_URL") or None,
                                         region_name=path.option("region") or None)
        return _CLIENTS[key]


def _s3_create_exclusive(path: ObjectPath, data: bytes) -> bool:
    from botocore.exceptions import ClientError

    try:
        _s3_client(path).put_object(Bucket=path.bucket, Key=path.object_key, Body=data, IfNoneMatch="*")
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or \
                exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
            return False
        raise
    return True


def _gcs_create_exclusive(path: ObjectPath, data: bytes) -> bool:  # pragma: no cover - no GCS emulator here
    try:
        from google.api_core.exceptions import PreconditionFailed
        from google.cloud import storage as gcs
    except ImportError:
        raise ExclusiveCreateUnavailable(
            "locking a gs:// output folder needs google-cloud-storage (pip install 'gmner-pipeline[gcs]')") from None
    blob = gcs.Client().bucket(path.bucket).blob(path.object_key)
    try:
        blob.upload_from_string(data, if_generation_match=0)
    except PreconditionFailed:
        return False
    return True


def age_s(path: ObjectPath) -> float | None:
    """Seconds since ``path`` was last written, by the store's clock as seen from here (None: it is gone)."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return None
