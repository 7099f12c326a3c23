"""Storage retries: only transient failures are retried; bugs and permanent errors fail at once."""

from __future__ import annotations

import errno
import io
import os

import pytest

from stages.core import storage
from stages.core.storage import StorageError, is_transient, retrying

URL = "s3://bucket/key"


@pytest.fixture
def calls(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    return []


def _failing(calls, error):
    def fn():
        calls.append(1)
        raise error
    return fn


@pytest.mark.parametrize("error", [AttributeError("'NoneType' object has no attribute 'x'"), RuntimeError("bug"),
                                   KeyError("k"), TypeError("bad argument")])
def test_programming_errors_are_not_retried(calls, error):
    with pytest.raises(type(error)):
        retrying(URL, _failing(calls, error))
    assert len(calls) == 1


@pytest.mark.parametrize("error", [ConnectionResetError("reset"), TimeoutError("slow"),
                                   OSError(errno.EBUSY, "SlowDown"), OSError(errno.EREMOTEIO, "InternalError")])
def test_transient_errors_are_retried_then_named(calls, error):
    with pytest.raises(StorageError, match=f"storage unavailable for {URL} after {storage.RETRIES + 1} attempts"):
        retrying(URL, _failing(calls, error))
    assert len(calls) == storage.RETRIES + 1


def test_a_transient_error_then_success(calls):
    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("refused")
        return "ok"
    assert retrying(URL, flaky) == "ok" and len(calls) == 3


def test_permanent_storage_errors_fail_at_once_naming_the_url(calls):
    with pytest.raises(StorageError, match=f"access denied: {URL}"):
        retrying(URL, _failing(calls, PermissionError("no")))
    with pytest.raises(StorageError, match=f"storage error for {URL}"):
        retrying(URL, _failing(calls, OSError(errno.EINVAL, "bad request")))
    with pytest.raises(FileNotFoundError):
        retrying(URL, _failing(calls, FileNotFoundError(URL)))
    assert len(calls) == 3


def test_botocore_errors_are_classified():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(client_error("SlowDown", 503)) and is_transient(client_error("InternalError", 500))
    assert not is_transient(client_error("AccessDenied", 403)) and not is_transient(client_error("NoSuchKey", 404))
    wrapped = OSError("translated by s3fs")
    wrapped.__cause__ = client_error("ServiceUnavailable", 503)
    assert is_transient(wrapped)


def test_local_paths_are_never_retried(calls):
    with pytest.raises(ConnectionResetError):
        retrying("/tmp/x", _failing(calls, ConnectionResetError("local")))
    assert len(calls) == 1


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_is_named_and_leaves_no_file(tmp_path, monkeypatch, code, where):
    """ENOSPC / EDQUOT from the write or the fsync: one StorageError naming the path; the final name
    keeps what it held before (nothing, or the previous version), and no temporary file stays."""
    def full(*args):
        raise OSError(code, os.strerror(code))

    class HalfWritten(io.FileIO):
        def write(self, data):
            super().write(data[:len(data) // 2])
            full()

    if where == "fsync":
        monkeypatch.setattr(storage.os, "fsync", full)
    else:
        monkeypatch.setattr(storage, "open", HalfWritten, raising=False)
    new, old = tmp_path / "new.parquet", tmp_path / "old.json"
    old.write_bytes(b"previous")
    for path in (new, old):
        with pytest.raises(StorageError, match=f"^cannot write {path}: no space left on device"):
            storage.write_bytes_atomic(str(path), b"data")
    assert not new.exists() and old.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]


def test_missing_cloud_credentials_are_one_line():
    """botocore's NoCredentialsError (no AWS_* variables, profile or role) is a StorageError naming the URL."""
    from botocore.exceptions import NoCredentialsError

    from stages.core.storage import StorageError, retrying

    def no_credentials():
        raise NoCredentialsError()

    with pytest.raises(StorageError, match=r"^no credentials for s3://bucket/refs: set AWS_ACCESS_KEY_ID"):
        retrying("s3://bucket/refs", no_credentials)
