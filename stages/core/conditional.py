"""Compare-and-swap on one small object (the lease file), where the store has it.

- S3 (s3://): conditional writes. Create is PutObject with `If-None-Match: *`; replace and delete are
  PutObject / DeleteObject with `If-Match: <ETag>` of the version read. The store decides, at the
  moment the request arrives, so a slow request cannot overwrite what another run wrote meanwhile.
- Local paths: create is a hard link of a complete temporary file (fails if the name exists); replace
  and delete take an exclusive `flock` on a lock file named for the object's real path (in the system's
  temp folder, so outputs stay clean), compare the content's hash with the one read, then rename or
  unlink. (flock holds between the processes of one machine, which is what a local output is shared
  by; not over NFS.)
- Any other fsspec store: `supported()` is False and the caller falls back to write, settle, read back.

A version's tag is the S3 ETag, or the content's sha256 locally. Each operation answers "done" (a new
tag, or True) or "someone else got there first" (None / False); storage failures raise as `storage`
raises them. A retried request may meet its own earlier attempt (a PUT that landed, then timed out):
the caller tells that apart by reading back what is there (the lease compares run ids).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass

from stages.core import storage

# S3's answers to a condition that did not hold: 412 (the ETag or the absence did not match) and 409
# (another conditional write to the key was in flight); both mean "another writer got there first".
_LOST_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}


@dataclass(frozen=True)
class Versioned:
    data: bytes
    tag: str


def supported(url: str) -> bool:
    return storage.is_local(url) or url.startswith("s3://")


def _lost(error: BaseException) -> bool:
    """Whether an error is S3 refusing a condition (412 / 409), raw or as the cause of s3fs's OSError."""
    for e in (error, error.__cause__, error.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _LOST_CODES or status in (409, 412):
                return True
    return isinstance(error, FileExistsError)


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _locked(path: str):
    import fcntl
    import tempfile

    folder = os.path.join(tempfile.gettempdir(), "dpo-refstream-locks")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, _sha(os.path.realpath(path).encode())[:32] + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _local_read(path: str) -> Versioned | None:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    return Versioned(data, _sha(data))


def _local_put(path: str, data: bytes, exclusive: bool) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.partial")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        if exclusive:
            os.link(tmp, path)  # FileExistsError if the name exists: create-if-absent, complete or not at all
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _s3(url: str):
    fs, path = storage.filesystem(url)
    bucket, key, _ = fs.split_path(path)
    return fs, bucket, key


def _s3_call(url: str, method: str, **kwargs):
    """One S3 call through s3fs's client, retried on transient failures; None when a condition failed."""
    fs, bucket, key = _s3(url)

    def call():
        try:
            return fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
        except Exception as e:  # noqa: BLE001 - a refused condition is an answer, not a failure to retry
            if _lost(e):
                return None
            raise

    return storage.retrying(url, call)


def create(url: str, data: bytes) -> str | None:
    """Write `data` if nothing is at `url`: its tag, or None when something already is."""
    if storage.is_local(url):
        path = _local_path(url)
        with storage.local_write(path):
            try:
                _local_put(path, data, exclusive=True)
            except FileExistsError:
                return None
        return _sha(data)
    try:
        out = _s3_call(url, "put_object", Body=data, IfNoneMatch="*")
    except FileNotFoundError:  # a PUT's 404 is the bucket's
        raise storage.StorageError(f"cannot write {url}: the bucket or container does not exist") from None
    return None if out is None else out["ETag"]


def read(url: str) -> Versioned | None:
    """What is at `url` and its tag; None when nothing is."""
    if storage.is_local(url):
        return _local_read(_local_path(url))
    fs, bucket, key = _s3(url)
    try:
        out = storage.retrying(url, fs.call_s3, "get_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    body = out["Body"]
    data = storage.retrying(url, _read_body, fs, body)
    return Versioned(data, out["ETag"])


def _read_body(fs, body) -> bytes:
    from fsspec.asyn import sync

    async def _all():
        try:
            return await body.read()
        finally:
            body.close()

    return sync(fs.loop, _all)


def _local_if(url: str, tag: str, act) -> bool:
    """Under the lock, act(path) if the local object is the version `tag`; whether it was."""
    path = _local_path(url)
    with storage.local_write(path), _locked(path):
        current = _local_read(path)
        if current is None or current.tag != tag:
            return False
        act(path)
    return True


def replace(url: str, data: bytes, tag: str) -> str | None:
    """Write `data` over the version `tag`: the new tag, or None when what is there is not that version."""
    if storage.is_local(url):
        return _sha(data) if _local_if(url, tag, lambda path: _local_put(path, data, exclusive=False)) else None
    try:
        out = _s3_call(url, "put_object", Body=data, IfMatch=tag)
    except FileNotFoundError:  # nothing there to match (removed, or the bucket is gone): not that version
        return None
    return None if out is None else out["ETag"]


def delete(url: str, tag: str) -> bool:
    """Remove the version `tag`: False when what is there is another version (or nothing)."""
    if storage.is_local(url):
        return _local_if(url, tag, os.remove)
    try:
        return _s3_call(url, "delete_object", IfMatch=tag) is not None
    except FileNotFoundError:
        return False
