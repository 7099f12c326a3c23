"""fsspec I/O shared by the stages: local paths and URLs (s3://, gs://, ...) alike.

Writes are atomic: on a local disk a file is written under a temporary name in the same folder
and renamed (POSIX rename is atomic); on object stores a single PUT is already all-or-nothing.

Retries, in one place. A remote call is tried up to 1 + RETRIES times here (RETRIES = 5, or
$DPO_STORAGE_RETRIES), with backoff 0.5, 1, 2, 4, 8 s, and only for transient failures
(`is_transient`: connection errors, timeouts, throttling, 5xx); each retry is logged at WARNING
(URL, error, attempt k of N). Below this layer, for s3://, botocore retries throttling and 5xx
answers (legacy mode: 5 attempts per request) and s3fs retries timeouts, broken reads and answers
whose error code is SlowDown (5 attempts per call). Measured against a server that answers every
request 503 SlowDown (tests/test_s3_faults.py): a GET or PUT sees (1 + RETRIES) x 5 x 5 = 150
attempts before a StorageError, about 4 minutes of backoff (botocore waits rand x 1, 2, 4, 8 s
between its attempts); a HEAD (exists, size, the first step of a read) sees (1 + RETRIES) x 5 =
30, about a minute, as its 503 has no body for s3fs to recognise. Anything else (a missing
object, access denied, a bad argument, a bug) fails at once.

A full local disk (ENOSPC, EDQUOT), a folder the user may not write (EACCES, EPERM) or a read-only
file system (EROFS), however a writer reports it, becomes one StorageError naming the file or folder
(`write_refused`, applied by `local_write` and to whatever escapes a stage in pipeline.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Iterator

import fsspec
from fsspec.core import url_to_fs

from stages.core.errors import PipelineError

log = logging.getLogger(__name__)

# Options for every filesystem this process opens (`--storage-options` JSON). Credentials
# normally come the standard way (AWS_* variables, profiles) and need none of this.
_OPTIONS: dict = {}
RETRIES = int(os.environ.get("DPO_STORAGE_RETRIES", "5"))
# errno values s3fs gives throttling and 5xx answers (EBUSY: SlowDown / 503, EREMOTEIO: 500), and
# those of a dropped or refused connection.
_TRANSIENT_ERRNO = {errno.EBUSY, errno.EREMOTEIO, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                    errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN, errno.ENETUNREACH, errno.EHOSTUNREACH}
_THROTTLING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                     "RequestTimeout", "ServiceUnavailable", "InternalError"}


# A full disk or quota, and how writers that do not raise OSError word it (safetensors gives
# Rust's io::Error text, "No space left on device (os error 28)").
_DISK_FULL_ERRNO = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXT = tuple(f"{os.strerror(code)} (os error {code})" for code in _DISK_FULL_ERRNO)


class StorageError(PipelineError):
    """A storage operation that failed for good; the message names the URL, never a secret."""


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """The error and what it was raised from: a short cause chain (never looping on a cycle), into
    Ray's wrappers (`RayTaskError.cause`) and torch.distributed.checkpoint's per-worker failures."""
    for _ in range(8):
        if error is None:
            return
        yield error
        failures = getattr(error, "failures", None)
        if isinstance(failures, dict):
            for f in failures.values():
                yield from _causes(f[0] if isinstance(f, tuple) else f)
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException) and cause is not error:
            yield from _causes(cause)
        error = error.__cause__ if error.__cause__ is not None or error.__suppress_context__ else error.__context__


def is_disk_full(error: BaseException | None) -> bool:
    """Whether a write failed for want of space or quota, however the writer reported it (the error
    or anything it was raised from)."""
    return any((isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNO) or any(t in str(e) for t in _DISK_FULL_TEXT)
               for e in _causes(error))


# A folder the user may not write, or a read-only file system (a mounted snapshot, a read-only volume).
_REFUSED_ERRNO = {errno.EACCES, errno.EPERM, errno.EROFS}
# What a write goes through before its rename: write_bytes_atomic's ".NAME.HEX.partial", a checkpoint's
# ".step-N.partial" folder; Python's tempfile ("tmpXXXXXXXX") and Rust's, which safetensors uses (".tmpXXXXXX").
_PARTIAL = re.compile(r"^\.(?P<name>.+?)(?:\.[0-9a-f]{32})?\.partial$")
_TEMPFILE = re.compile(r"^\.?tmp[-_A-Za-z0-9]{6,}$")


def write_refused(error: BaseException | None, path: str | None = None) -> StorageError | None:
    """The one-line StorageError for a write that failed for good on a local disk (no space, no
    permission, a read-only file system), naming the file or folder; None for any other failure.
    `local_write` raises it where the path is known; pipeline.py applies it to whatever escapes a
    stage (from a Ray worker, a library's own write), so no stage prints a traceback for these."""
    for e in _causes(error):
        if isinstance(e, StorageError) and not _ray_wrapper(e):
            return e  # already named (an inner, more precise path); Ray's copy of it prints a traceback
    if is_disk_full(error):
        quota = " (disk quota exceeded)" if "quota" in str(error).lower() else ""
        return StorageError(f"cannot write {path or _filename(error) or 'the output'}: no space left on device{quota}")
    for e in _causes(error):
        if isinstance(e, OSError) and e.errno in _REFUSED_ERRNO:
            # The file the system refused is the most precise name, but a temporary one means nothing to the
            # user: the name it stands for instead.
            where = real_name(os.fsdecode(e.filename)) if e.filename else path or "the output"
            # Permission is also refused to a read: a write only on the way to `path`, what the caller writes
            # (pipeline.py passes none: an input that may not be read is not a write).
            writing = e.errno == errno.EROFS or (path is not None and _on_the_way(where, path))
            return StorageError(f"cannot {'write' if writing else 'access'} {where}: {os.strerror(e.errno).lower()}")
    return None


def _on_the_way(name: str, path: str) -> bool:
    """Whether `name` is `path`, a file under it, or a folder above it (one a write to `path` creates)."""
    a, b = os.path.abspath(name), os.path.abspath(path)
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def real_name(path: str) -> str:
    """The name a temporary file or folder is written for: `DIR/.NAME.HEX.partial` -> `DIR/NAME`, a file in
    `.step-N.partial/` -> the same in `step-N/`, a library's `DIR/tmpXXXX` -> `DIR`; others as they are."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if _TEMPFILE.match(part):
            return "/".join(parts[:i]) or path
        partial = _PARTIAL.match(part)
        if partial:
            parts[i] = partial["name"]
    return "/".join(parts)


def _ray_wrapper(error: BaseException) -> bool:
    """Ray's RayTaskError, also the copy that subclasses the task's own error (its str is a traceback)."""
    exceptions = sys.modules.get("ray.exceptions")  # never imported here: only an error from Ray can be one
    return exceptions is not None and isinstance(error, exceptions.RayError)


def _filename(error: BaseException | None) -> str | None:
    name = next((e.filename for e in _causes(error) if isinstance(e, OSError) and e.filename), None)
    return real_name(os.fsdecode(name)) if name else None


@contextlib.contextmanager
def local_write(path: str) -> Iterator[None]:
    """Writes to a local `path` (file or folder) inside this block that fail for want of space,
    permission or a writable file system end in one StorageError naming it; any other failure
    passes through as it is."""
    try:
        yield
    except BaseException as e:  # also torch.distributed.checkpoint's CheckpointException, a BaseException
        refused = write_refused(e, path)
        if refused is None:
            raise
        if refused is e:
            raise
        raise refused from None


def configure(options: dict | None) -> None:
    """Set the fsspec options for this process (a stage config's `storage_options_dict`)."""
    _OPTIONS.clear()
    _OPTIONS.update(options or {})


def cache_dir() -> Path:
    """This user's cache folder: the embedded model's safetensors copy, staging for remote outputs."""
    base = os.environ.get("DPO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dpo-refstream")
    return Path(base)


def filesystem(url: str, storage_options: dict | None = None):
    """(fs, path) for a local path or fsspec URL. No listing cache on object stores: Ray tasks and
    actors in other processes write the files this process reads next (a cached listing of shards/
    from before they wrote would call a new shard missing)."""
    options = dict(storage_options if storage_options is not None else _OPTIONS)
    if not is_local(url):
        options.setdefault("use_listings_cache", False)
    return url_to_fs(url, **options)


def is_transient(error: BaseException) -> bool:
    """Worth another try: a connection or timeout failure, throttling, or a 5xx answer."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNO:
        return True
    response = getattr(error, "response", None) or getattr(error.__cause__, "response", None)
    if isinstance(response, dict):  # a botocore ClientError, raw or as the cause of s3fs's OSError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or response.get("Error", {}).get("Code") in _THROTTLING_CODES
    # botocore's and aiohttp's connection errors are not builtin ConnectionErrors: match by name.
    names = {klass.__name__ for klass in type(error).__mro__}
    return bool(names & {"HTTPClientError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                         "ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError"})


def _is_missing_credentials(error: BaseException) -> bool:
    """botocore's NoCredentialsError / PartialCredentialsError (matched by name: storage imports no cloud SDK)."""
    return any(k.__name__ in ("NoCredentialsError", "PartialCredentialsError") for k in type(error).__mro__)


def retrying(url: str, fn, *args, **kwargs):
    """Run a remote operation, retrying transient failures with exponential backoff (see the top).

    FileNotFoundError passes through (callers test for existence); access denied and other storage
    failures become StorageError naming the URL; anything that is not a storage failure (a bad
    argument, a bug) is raised as it is.
    """
    if is_local(url):
        return fn(*args, **kwargs)
    for attempt in range(RETRIES + 1):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except PermissionError:
            raise StorageError(f"access denied: {url}") from None
        except Exception as e:
            if not is_transient(e):
                if _is_missing_credentials(e):
                    raise StorageError(f"no credentials for {_public(url)}: set AWS_ACCESS_KEY_ID and "
                                       "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a role, or --storage-options") from None
                if isinstance(e, OSError):
                    raise StorageError(f"storage error for {url}: {e}") from None
                raise
            if attempt == RETRIES:
                raise StorageError(f"storage unavailable for {url} after {RETRIES + 1} attempts: "
                                   f"{type(e).__name__}") from None
            delay = min(0.5 * 2 ** attempt, 8.0)
            # Each retry is logged, so a slow run shows why; the error's own text carries no credentials.
            log.warning("storage: %s failed (%s: %s), attempt %d of %d; retrying in %.1f s", _public(url),
                        type(e).__name__, str(e)[:200], attempt + 1, RETRIES + 1, delay)
            time.sleep(delay)


def _public(url: str) -> str:
    """The URL without any user:password@ part, for logs."""
    return re.sub(r"://[^/@]*@", "://", url)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def absolute(url: str | None) -> str | None:
    """A local path made absolute (a URL as it is): Ray workers and tasks do not share the driver's working
    directory, so a chain hands its stages absolute paths."""
    return os.path.abspath(url) if url and is_local(url) else url


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def unstrip(original: str, fs, path: str) -> str:
    """Give a path listed by `fs` back its protocol, so it can be opened like the original URL."""
    if is_local(original):
        return path
    return fs.unstrip_protocol(path)


def _options(storage_options: dict | None) -> dict:
    return storage_options if storage_options is not None else _OPTIONS


def open_text(url: str, storage_options: dict | None = None, **kwargs) -> IO[str]:
    opts = _options(storage_options)
    return retrying(url, lambda: fsspec.open(url, "rt", compression="infer", encoding="utf-8", **kwargs,
                                             **opts).open())


def open_binary(url: str, storage_options: dict | None = None) -> IO[bytes]:
    opts = _options(storage_options)
    return retrying(url, lambda: fsspec.open(url, "rb", compression="infer", **opts).open())


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return retrying(url, fs.exists, path)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return retrying(url, fs.cat_file, path)


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """The file appears complete under its final name, or not at all."""
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0]
    if is_local(url):
        with local_write(path):
            os.makedirs(parent, exist_ok=True)
            # A dot name with its own suffix: no reader globbing *.parquet ever sees a half-written file.
            tmp = f"{parent}/.{os.path.basename(path)}.{uuid.uuid4().hex}.partial"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())  # a full disk may only show here: before the rename, not after
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    else:
        try:
            retrying(url, fs.pipe_file, path, data)
        except FileNotFoundError:
            raise StorageError(f"cannot write {url}: the bucket or container does not exist") from None


def remove_partials(url: str) -> None:
    """Delete temporary files a killed writer left in a local folder."""
    if is_local(url) and os.path.isdir(url):
        with local_write(url):
            for name in os.listdir(url):
                if name.startswith(".") and name.endswith(".partial"):
                    os.remove(os.path.join(url, name))


def _writing(url: str):
    """`local_write(url)` for a local path; an object store's refusals are `retrying`'s to name."""
    return local_write(url) if is_local(url) else contextlib.nullcontext()


def remove(url: str, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    with _writing(url):
        retrying(url, fs.rm_file, path)


def remove_tree(url: str, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    with _writing(url):
        if retrying(url, fs.exists, path):
            retrying(url, fs.rm, path, recursive=True)


def list_names(url: str, storage_options: dict | None = None) -> list[str]:
    """File names directly under a folder (empty when it does not exist)."""
    fs, path = filesystem(url, storage_options)
    try:
        names = retrying(url, fs.ls, path, detail=False, refresh=True)  # refresh: see objects just written
        return sorted(os.path.basename(p.rstrip("/")) for p in names)
    except FileNotFoundError:
        return []


def staging_dir(url: str) -> str:
    """Where a run writes before uploading: the folder itself when local, a cache folder otherwise."""
    if is_local(url):
        return url
    return str(cache_dir() / "staging" / hashlib.sha256(url.encode()).hexdigest()[:16])


def upload(local: str, url: str, last: tuple[str, ...] = ()) -> None:
    """Copy a local file or folder to `url`; files named in `last` go after the rest (completion markers)."""
    if is_local(url) and os.path.abspath(local) == os.path.abspath(url):
        return
    fs, path = filesystem(url)
    with _writing(url):
        if os.path.isdir(local):
            files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs_ in os.walk(local) for f in fs_)
            files.sort(key=lambda f: os.path.basename(f) in last)
            for rel in files:
                retrying(url, fs.put_file, os.path.join(local, rel), f"{path}/{rel}")
        else:
            retrying(url, fs.put_file, local, path)


def download(url: str, local: str) -> None:
    """Copy a file or folder at `url` to a local path (no-op when it is that path)."""
    if is_local(url) and os.path.abspath(local) == os.path.abspath(url):
        return
    fs, path = filesystem(url)
    is_dir = retrying(url, fs.isdir, path)
    with local_write(local):
        if is_dir:
            os.makedirs(local, exist_ok=True)
            retrying(url, fs.get, path.rstrip("/") + "/", local.rstrip("/") + "/", recursive=True)
        else:
            os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
            retrying(url, fs.get_file, path, local)


def plain_modes(path: str) -> None:
    """Give a local file, or every file under a folder, the mode a plain open() gives (0666 less the
    umask). A library that writes through a temporary file and renames it (safetensors: Rust's
    tempfile, mode 0600) leaves a file only its owner can read: on a shared cluster, a trained model
    nobody else, no other service, can load."""
    mode = 0o666 & ~_umask()
    files = [path] if not os.path.isdir(path) else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    with local_write(path):
        for f in files:
            st = os.lstat(f)
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
                os.chmod(f, mode)


def _umask() -> int:
    """This process's umask, read without setting it (os.umask sets it: a file another thread creates
    meanwhile would get the wrong mode)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):  # not Linux, or a kernel before 4.7
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_stream(fh: IO[bytes], h=None):
    """Feed an open binary file to a hashlib object (new sha256 by default) in 4 MB blocks."""
    h = h if h is not None else hashlib.sha256()
    for block in iter(lambda: fh.read(1 << 22), b""):
        h.update(block)
    return h


def write_json(url: str, obj, indent: int | None = 1) -> None:
    """Write `obj` as JSON, atomically."""
    write_bytes_atomic(url, json.dumps(obj, indent=indent, ensure_ascii=False).encode())


def read_json(url: str):
    return json.loads(read_bytes(url))
