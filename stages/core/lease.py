"""A lease on an output: one run at a time writes it, on local disk or any fsspec URL.

`OUTPUT/_lease.json` holds the run id, who holds it (host and process), when it started and when
it expires. A run takes the lease before it writes anything else and renews it from a heartbeat
thread every `ttl / 3` seconds; it removes the lease when it ends, however it ends (a kill -9 leaves
it to expire). A second run into the same output finds a live lease and stops with one line naming
the holder and when the lease expires (LeaseHeld, exit 2); a lease past its expiry, or held by a
process of this machine that no longer exists, belongs to a run that died, and the next run takes
it over.

Object stores have no compare-and-swap that fsspec exposes, so two runs starting in the same second
could both see no lease: each writes its own (an atomic write), waits SETTLE seconds and reads it
back; the run whose lease is not there has lost and stops. The heartbeat also reads before it writes:
a run that finds another run's lease in its place (it stalled past its expiry and was taken over)
stops renewing and `lost` tells the stage, which stops at its next check.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from stages.core import storage
from stages.core.errors import PipelineError

LEASE_FILE = "_lease.json"
TTL_SECONDS = float(os.environ.get("DPO_LEASE_SECONDS", 300))  # how long a lease lives without a heartbeat
SETTLE = float(os.environ.get("DPO_LEASE_SETTLE_SECONDS", 2))  # wait before reading a new lease back


class LeaseHeld(PipelineError):
    """Another run holds the output's lease (or took it over)."""


def _live(lease: dict) -> bool:
    """Not expired, and not held by a process of this machine that is gone (a run that could not
    remove its lease, say because the storage was down when it failed, need not be waited for)."""
    if lease.get("expires_at", 0) <= time.time():
        return False
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        try:
            os.kill(lease["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: alive
            pass
    return True


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class Lease:
    """Context manager: holds `output`'s lease for the block; raises LeaseHeld when another run has it."""

    def __init__(self, output: str, command: str, ttl: float | None = None):
        self.url = storage.join(output, LEASE_FILE)
        self.output, self.command, self.ttl = output, command, ttl or TTL_SECONDS
        self.run_id = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()} pid {os.getpid()}"
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        """Raise LeaseHeld if another run took the lease over while this one held it."""
        if self.lost.is_set():
            self._refuse(self._read() or {})

    def _read(self) -> dict | None:
        try:
            return storage.read_json(self.url)
        except FileNotFoundError:
            return None
        except ValueError:  # written atomically: only a hand breaks it; treat it as expired
            return None

    def _write(self, started: float) -> None:
        now = time.time()
        storage.write_json(self.url, {"run_id": self.run_id, "holder": self.holder, "host": socket.gethostname(),
                                      "pid": os.getpid(), "command": self.command,
                                      "started_at": _iso(started), "renewed_at": _iso(now),
                                      "expires_at": now + self.ttl, "expires": _iso(now + self.ttl)})

    def _refuse(self, lease: dict) -> None:
        raise LeaseHeld(f"{self.output} is being written by another run ({lease.get('command', '?')} on "
                        f"{lease.get('holder', '?')}, run {lease.get('run_id', '?')[:12]}, started "
                        f"{lease.get('started_at', '?')}); its lease expires {lease.get('expires', '?')} unless "
                        f"renewed. Wait for it to finish, or remove {self.url} if that run is gone")

    def __enter__(self) -> "Lease":
        current = self._read()
        if current and current.get("run_id") != self.run_id and _live(current):
            self._refuse(current)
        self.started = time.time()
        self._write(self.started)
        time.sleep(SETTLE)
        current = self._read()
        if not current or current.get("run_id") != self.run_id:
            self._refuse(current or {})
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                current = self._read()
                if current and current.get("run_id") != self.run_id:
                    self.lost.set()
                    return
                self._write(self.started)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the lease lives ttl seconds
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            current = self._read()
            if current and current.get("run_id") == self.run_id:
                storage.remove(self.url)
        except Exception:  # noqa: BLE001 - a lease left behind expires by itself
            pass
