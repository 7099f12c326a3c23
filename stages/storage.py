"""fsspec I/O shared by the stages: local paths and URLs (s3://, gs://, ...) alike.

Writes are atomic: on a local disk a file is written under a temporary name in the same folder
and renamed (POSIX rename is atomic); on object stores a single PUT is already all-or-nothing.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import IO

import fsspec
from fsspec.core import url_to_fs


def filesystem(url: str, storage_options: dict | None = None):
    """(fs, path) for a local path or fsspec URL."""
    return url_to_fs(url, **(storage_options or {}))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def unstrip(original: str, fs, path: str) -> str:
    """Give a path listed by `fs` back its protocol, so it can be opened like the original URL."""
    if is_local(original):
        return path
    return fs.unstrip_protocol(path)


def open_text(url: str, storage_options: dict | None = None, **kwargs) -> IO[str]:
    return fsspec.open(url, "rt", compression="infer", encoding="utf-8", **kwargs, **(storage_options or {})).open()


def open_binary(url: str, storage_options: dict | None = None) -> IO[bytes]:
    return fsspec.open(url, "rb", compression="infer", **(storage_options or {})).open()


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path)


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
        fs.pipe_file(path, data)


def remove_partials(url: str) -> None:
    """Delete temporary files a killed writer left in a local folder."""
    if is_local(url) and os.path.isdir(url):
        for name in os.listdir(url):
            if name.startswith(".") and name.endswith(".partial"):
                os.remove(os.path.join(url, name))


def remove(url: str, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    fs.rm_file(path)


def remove_tree(url: str, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_names(url: str, storage_options: dict | None = None) -> list[str]:
    """File names directly under a folder (empty when it does not exist)."""
    fs, path = filesystem(url, storage_options)
    try:
        return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
