"""S3 throttling: a proxy on 127.0.0.1 in front of moto answers some requests with 503 SlowDown.

Both stages must finish with the same shards and metrics as without throttling, and the attempts
made in all (ours, s3fs's and botocore's) must stay within the bound the top of storage.py gives.
No traffic leaves loopback: AWS_ENDPOINT_URL points at the proxy.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import ray_in_this_env
from test_train import untimed

from stages import precompute, train
from stages.core import storage
from stages.core.config.options import PrecomputeConfig, TrainConfig
from stages.core.storage import StorageError
from stages.core.training.metrics import read

moto_server = pytest.importorskip("moto.server")
pytestmark = pytest.mark.slow  # an S3 server, a proxy, both stages
SECRET = "s3cr3t-Value-Never-Logged"
SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Reduce your request rate.</Message></Error>")
# Not forwarded: they describe one connection, not the request (the body is re-sent whole).
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
              "expect", "content-length"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Throttle:
    """Which requests the proxy answers with 503 SlowDown, and what it saw."""

    def __init__(self):
        self.lock = threading.Lock()
        self.every = 0              # every n-th request overall is throttled (0: none)
        self.always = ""            # ... and every request whose "METHOD /path" contains this
        self.requests = self.throttled = 0
        self.by_path: dict[str, int] = {}

    def reset(self, every: int = 0, always: str = "") -> None:
        with self.lock:
            self.every, self.always, self.requests, self.throttled, self.by_path = every, always, 0, 0, {}

    def decide(self, path: str, method: str) -> bool:
        with self.lock:
            self.requests += 1
            key = path.split("?")[0]
            self.by_path[key] = self.by_path.get(key, 0) + 1
            slow = bool(self.always and self.always in f"{method} {path}") or \
                bool(self.every and self.requests % self.every == 0)
            self.throttled += slow
            return slow


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.server.throttle.decide(self.path, self.command):
            self._answer(503, "Slow Down", [("Content-Type", "application/xml")], SLOWDOWN)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}  # Host kept: signed
            upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
            self._answer(resp.status, resp.reason, [(k, v) for k, v in resp.getheaders()
                                                    if k.lower() not in HOP_BY_HOP], data,
                         length=resp.getheader("Content-Length") if self.command == "HEAD" else None)
        finally:
            upstream.close()

    def _answer(self, status: int, reason: str, headers: list, data: bytes, length: str | None = None) -> None:
        self.send_response(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", length if length is not None else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def slow_s3():
    """moto on 127.0.0.1 behind a throttling proxy; AWS_* variables point at the proxy."""
    import boto3
    import s3fs

    moto_port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    server.start()
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    proxy.daemon_threads = True
    proxy.upstream_port, proxy.throttle = moto_port, Throttle()
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    env = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_address[1]}"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            s3fs.S3FileSystem.clear_instance_cache()  # no client made for another endpoint is reused
            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}").create_bucket(Bucket="dpo")
            yield proxy.throttle
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        proxy.shutdown()
        server.stop()


@pytest.fixture
def ray_in_s3_env(slow_s3):
    """Ray restarted inside slow_s3's environment (see conftest.ray_in_this_env; Ray runs again without the
    AWS_* variables afterwards, so this starts it where the session has not yet)."""
    with ray_in_this_env():
        yield


@pytest.fixture
def no_backoff_here(monkeypatch):
    """No backoff waits in this process, botocore's (up to 15 s a request) and s3fs's (0.1 s x 1.7^i
    between its tries): what the throttling tests check is which requests are made, not the waits
    between them. Ray's workers are other processes: they still wait theirs."""
    import asyncio
    import types

    import aiobotocore.endpoint
    import s3fs.core

    async def no_wait(self, seconds):
        return None

    async def no_sleep(delay, result=None):
        return await asyncio.sleep(0, result)  # still yields to the event loop

    monkeypatch.setattr(aiobotocore.endpoint.AioEndpoint, "_sleep", no_wait)
    # s3fs.core's own name for asyncio only: the event loop and every other caller keep the real sleep
    names = {k: getattr(asyncio, k) for k in dir(asyncio) if not k.startswith("__")}
    monkeypatch.setattr(s3fs.core, "asyncio", types.SimpleNamespace(**{**names, "sleep": no_sleep}))


@pytest.fixture
def retry_log(caplog):
    caplog.set_level(logging.WARNING, logger="stages.core.storage")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "stages.core.storage"]


def test_one_call_under_constant_throttling_is_bounded(slow_s3, monkeypatch, retry_log, no_backoff_here):
    """Every request to one key answered 503: one storage call makes at most (1 + RETRIES) x 5 (s3fs)
    x 5 (botocore, legacy retry mode) requests, each of our retries is logged, then a StorageError."""
    monkeypatch.setattr(storage, "RETRIES", 2)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # our own backoff too: the count is what matters
    storage.write_bytes_atomic("s3://dpo/hot/key.json", b"{}")
    counts = {}
    for name, always, call in (
            ("read", "/dpo/hot/key.json", lambda: storage.read_bytes("s3://dpo/hot/key.json")),
            ("read, GET only", "GET /dpo/hot/key.json", lambda: storage.read_bytes("s3://dpo/hot/key.json")),
            ("write", "/dpo/hot/key.json", lambda: storage.write_bytes_atomic("s3://dpo/hot/key.json", b"[]"))):
        slow_s3.reset(always=always)
        with pytest.raises(StorageError, match="^storage unavailable for s3://dpo/hot/key.json after 3 attempts"):
            call()
        counts[name] = (slow_s3.requests, slow_s3.throttled)
    print(f"constant throttling, (requests, 503s) per call with RETRIES=2: {counts}")
    ours, s3fs_tries, botocore_tries = storage.RETRIES + 1, 5, 5
    assert counts == {
        "read": (ours * botocore_tries,) * 2,  # the HEAD is throttled: its 503 has no body, s3fs does not retry it
        "read, GET only": (ours * (1 + s3fs_tries * botocore_tries), ours * s3fs_tries * botocore_tries),
        "write": (ours * s3fs_tries * botocore_tries,) * 2}
    lines = retry_log()
    assert len(lines) == 6 and all("storage: s3://dpo/hot/key.json failed (" in line for line in lines)
    assert [line.split("), ")[1].split(";")[0] for line in lines] == ["attempt 1 of 3", "attempt 2 of 3"] * 3
    assert all(SECRET not in line for line in lines)
    slow_s3.reset()
    assert storage.read_bytes("s3://dpo/hot/key.json") == b"{}"  # the throttling stopped: it reads again


def test_both_stages_through_throttling_match_an_unthrottled_run(slow_s3, refs, tmp_path, ray_in_s3_env, retry_log,
                                                                 no_backoff_here):
    """Every 3rd request answered 503 SlowDown: precompute and training on s3:// finish with the
    shards and metrics of the same runs on local disk (conftest's refs: the same rows and settings),
    within the documented bound of attempts. (Training, single-worker, runs in this process: its
    retries skip the backoff waits, no_backoff_here.)"""
    # Own prefixes: moto keeps one store per process, shared with test_cloud.py's buckets.
    made = yaml.safe_load((refs / "config.yaml").read_text())  # what made refs: the same settings here
    storage.write_bytes_atomic("s3://dpo/throttled/in/in.jsonl", Path(made["data"]).read_bytes())
    common = dict(model=made["model"], format=made["format"], rows_per_shard=made["rows_per_shard"],
                  max_length=made["max_length"], progress=False)
    local_manifest = json.loads((refs / "manifest.json").read_text())
    run = dict(batch_size=4, micro_batch_size=2, learning_rate=1e-3, shuffle_buffer=6, progress=False, seed=3,
               max_steps=2, save_every=2)
    train.run(TrainConfig(refs=str(refs), output=str(tmp_path / "run"), **run))

    slow_s3.reset(every=3)
    manifest = precompute.run(PrecomputeConfig(data="s3://dpo/throttled/in/", output="s3://dpo/throttled/refs",
                                               **common))
    after_precompute = (slow_s3.requests, slow_s3.throttled)
    summary = train.run(TrainConfig(refs="s3://dpo/throttled/refs", output="s3://dpo/throttled/run", **run))
    print(f"every 3rd request throttled: precompute {after_precompute[0]} requests ({after_precompute[1]} 503s); "
          f"precompute + train {slow_s3.requests} requests ({slow_s3.throttled} 503s); "
          f"our retries logged: {len(retry_log())}; busiest path: {max(slow_s3.by_path.values())} requests")

    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in local_manifest["shards"]]
    assert manifest["pair_ids_fingerprint"] == local_manifest["pair_ids_fingerprint"]
    assert summary["outcome"] == "finished" and summary["steps"] == 2
    local_metrics = untimed(read(str(tmp_path / "run" / "metrics.jsonl")))
    assert untimed(read("s3://dpo/throttled/run/metrics.jsonl")) == local_metrics
    assert storage.exists("s3://dpo/throttled/run/checkpoints/step-2/state.json")
    # Throttled for real, and bounded: a 503 is answered by the next request, so no call needs more
    # than a few of the (1 + RETRIES) x 5 x 5 attempts it may make.
    assert slow_s3.throttled == slow_s3.requests // 3 > 10
    assert len(retry_log()) <= slow_s3.throttled and all(SECRET not in line for line in retry_log())
