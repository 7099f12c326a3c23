"""fsspec I/O shared by the stages: local paths and URLs (s3://, gs://, ...) alike.

Writes are atomic: on a local disk a file is written under a temporary name in the same folder
and renamed (POSIX rename is atomic); on object stores a single PUT is already all-or-nothing.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import IO

import json
import time

import fsspec
from fsspec.core import url_to_fs

# Options for every filesystem this process opens (`--storage-options` JSON). Credentials
# normally come the standard way (AWS_* variables, profiles) and need none of this.
_OPTIONS: dict = {}
RETRIES = int(os.environ.get("DPO_STORAGE_RETRIES", "5"))
_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")


class StorageError(RuntimeError):
    """A storage operation that failed for good; the message names the URL, never a secret."""


def configure(options_json: str | None) -> None:
    """Set the fsspec options for this process from the `--storage-options` JSON."""
    _OPTIONS.clear()
    if options_json:
        try:
            options = json.loads(options_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"config key 'storage_options': not valid JSON ({e.msg})") from None
        if not isinstance(options, dict):
            raise ValueError("config key 'storage_options': expected a JSON object")
        _OPTIONS.update(options)


def redact(value):
    """A copy with every value under a secret-looking key replaced, for logs and written configs."""
    if isinstance(value, dict):
        return {k: "<redacted>" if any(w in str(k).lower() for w in _SECRET_WORDS) else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def redact_json(options_json: str | None) -> str | None:
    if not options_json:
        return options_json
    try:
        return json.dumps(redact(json.loads(options_json)))
    except json.JSONDecodeError:
        return "<redacted>"


def filesystem(url: str, storage_options: dict | None = None):
    """(fs, path) for a local path or fsspec URL."""
    return url_to_fs(url, **(storage_options if storage_options is not None else _OPTIONS))


def retrying(url: str, fn, *args, **kwargs):
    """Run a remote operation, retrying transient failures with exponential backoff.

    Missing objects and access errors are permanent: they become StorageError naming the URL
    (FileNotFoundError passes through for callers that test for existence).
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
        except (ValueError, TypeError, KeyError):
            raise
        except Exception as e:  # network, throttling, 5xx: worth another try
            if attempt == RETRIES:
                raise StorageError(f"storage unavailable for {url} after {RETRIES + 1} attempts: "
                                   f"{type(e).__name__}") from None
            time.sleep(min(0.5 * 2 ** attempt, 8.0))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


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
        os.makedirs(parent, exist_ok=True)
        # A dot name with its own suffix: no reader globbing *.parquet ever sees a half-written file.
        tmp = f"{parent}/.{os.path.basename(path)}.{uuid.uuid4().hex}.partial"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
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
        for name in os.listdir(url):
            if name.startswith(".") and name.endswith(".partial"):
                os.remove(os.path.join(url, name))


def remove(url: str, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    retrying(url, fs.rm_file, path)


def remove_tree(url: str, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
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
    from stages.models import cache_dir

    return str(cache_dir() / "staging" / hashlib.sha256(url.encode()).hexdigest()[:16])


def upload(local: str, url: str, last: tuple[str, ...] = ()) -> None:
    """Copy a local file or folder to `url`; files named in `last` go after the rest (completion markers)."""
    if is_local(url) and os.path.abspath(local) == os.path.abspath(url):
        return
    fs, path = filesystem(url)
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
    if retrying(url, fs.isdir, path):
        os.makedirs(local, exist_ok=True)
        retrying(url, fs.get, path.rstrip("/") + "/", local.rstrip("/") + "/", recursive=True)
    else:
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        retrying(url, fs.get_file, path, local)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
