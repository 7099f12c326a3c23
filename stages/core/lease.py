"""A lease on an output: one run at a time writes it, on local disk or any fsspec URL.

`OUTPUT/_lease.json` holds the run id, who holds it (host and process), the job it runs for, when it
started and when it expires. A run takes the lease before it writes anything else and renews it from
a heartbeat thread every `ttl / 3` seconds; it removes the lease when it ends, however it ends (a kill
-9 leaves it to expire). A second run into the same output finds a live lease and stops with one line
naming the holder and when the lease expires (LeaseHeld, exit 2); a lease past its expiry, or held by
a process of this machine that no longer exists, belongs to a run that died, and the next run takes
it over. So does a retry of the same job (`DPO_JOB_ID`, which the jobs/ manifests set to the RayJob's
name): the run that died under a lost head pod need not be waited for by the retry that replaces it.

Every change is a compare-and-swap where the store has one (`conditional`: S3's conditional writes,
a hard link and flock on local disk): create only if absent, renew, take over and release only the
version read. Two runs can never both hold the lease, however slow a request is; a retried request
that meets its own earlier attempt is told apart by reading back the run id. On other fsspec stores
the fallback writes, waits SETTLE seconds and reads back: there a request slower than SETTLE can
still let two runs in (docs/cloud.md says so).

A holder whose lease was taken over, or that could not renew it before it expired (storage down),
has lost it: `lost` is set, the heartbeat stops, and `check()` raises LeaseHeld; every stage that
writes calls it at its natural steps (a shard, an optimizer step, a batch).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from stages.core import conditional, storage
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


_ACTIVE: list["Lease"] = []  # the leases this process holds now (a chain holds its own and a stage's)


def check_held() -> None:
    """Raise LeaseHeld if this process lost any lease it holds: what a stage calls at its natural steps
    (a scored batch, a sampled batch), without being handed the lease."""
    for lease in list(_ACTIVE):
        lease.check()


def job_id() -> str | None:
    """The job this process runs for, as a retry of it would name it: DPO_JOB_ID (the jobs/ manifests set
    it to the RayJob's name); None outside one."""
    return os.environ.get("DPO_JOB_ID") or None


def _parse(data: bytes | None) -> dict:
    try:
        lease = json.loads(data) if data else {}
    except ValueError:  # written whole: only a hand breaks it; treat it as expired
        return {}
    return lease if isinstance(lease, dict) else {}


class Lease:
    """Context manager: holds `output`'s lease for the block; raises LeaseHeld when another run has it."""

    ATTEMPTS = 5  # create / take-over rounds lost to other runs' changes before giving up

    def __init__(self, output: str, command: str, ttl: float | None = None):
        self.url = storage.join(output, LEASE_FILE)
        self.output, self.command, self.ttl = output, command, ttl or TTL_SECONDS
        self.run_id = uuid.uuid4().hex
        self.job_id = job_id()
        self.holder = f"{socket.gethostname()} pid {os.getpid()}"
        self.cas = conditional.supported(self.url)
        self.lost = threading.Event()
        self.expires_at = 0.0
        self._pending = 0.0  # the expiry of the lease document being written
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._why = ""

    def check(self, read: bool = False) -> None:
        """Raise LeaseHeld if this run no longer holds the lease: another run took it over, or it expired
        before this run could renew it. read: look at the lease file now too, not only at what the
        heartbeat last saw."""
        if read and not self.lost.is_set():
            current = self._read()
            if current is None or current.get("run_id") != self.run_id:
                self._lose("another run took it over" if current else "its lease file was removed")
        if self.is_lost():
            current = self._read() or {}
            if current.get("run_id") not in (None, self.run_id):
                self._refuse(current)
            raise LeaseHeld(f"{self.output}: this run lost its lease ({self._why}); it stops so that no two runs "
                            "write the output at once. Re-run the command to continue")

    def is_lost(self) -> bool:
        """Whether this run no longer holds the lease (taken over, or expired unrenewed); never raises."""
        if not self.lost.is_set() and self.expires_at and time.time() >= self.expires_at:
            self._lose(f"could not renew it before it expired at {_iso(self.expires_at)}")
        return self.lost.is_set()

    def _lose(self, why: str) -> None:
        self._why = self._why or why
        self.lost.set()

    def _read(self) -> dict | None:
        try:
            return storage.read_json(self.url)
        except FileNotFoundError:
            return None
        except ValueError:  # written atomically: only a hand breaks it; treat it as expired
            return None

    def _doc(self) -> bytes:
        now = time.time()
        self._pending = now + self.ttl
        return json.dumps({"run_id": self.run_id, "holder": self.holder, "host": socket.gethostname(),
                           "pid": os.getpid(), "command": self.command, "job_id": self.job_id,
                           "started_at": _iso(self.started), "renewed_at": _iso(now),
                           "expires_at": self._pending, "expires": _iso(self._pending)}, indent=1).encode()

    def _refuse(self, lease: dict) -> None:
        raise LeaseHeld(f"{self.output} is being written by another run ({lease.get('command', '?')} on "
                        f"{lease.get('holder', '?')}, run {lease.get('run_id', '?')[:12]}, started "
                        f"{lease.get('started_at', '?')}); its lease expires {lease.get('expires', '?')} unless "
                        f"renewed. Wait for it to finish, or remove {self.url} if that run is gone")

    def _may_take(self, lease: dict) -> bool:
        """An expired or dead holder's lease, or this job's earlier attempt's, may be taken over."""
        return not _live(lease) or (self.job_id is not None and lease.get("job_id") == self.job_id)

    def _held(self, tag: str) -> None:
        self._tag, self.expires_at = tag, self._pending

    def _take(self) -> None:
        """Create the lease, or take over a dead one, by compare-and-swap."""
        lease: dict = {}
        for _ in range(self.ATTEMPTS):
            tag = conditional.create(self.url, self._doc())
            if tag is not None:
                return self._held(tag)
            current = conditional.read(self.url)
            if current is None:  # released since: create again
                continue
            lease = _parse(current.data)
            if lease.get("run_id") == self.run_id:  # our own create landed before a retry of it
                self._pending = lease.get("expires_at", 0.0)
                return self._held(current.tag)
            if not self._may_take(lease):
                self._refuse(lease)
            tag = conditional.replace(self.url, self._doc(), current.tag)
            if tag is not None:
                return self._held(tag)
            # another run changed it between our read and our write: look again
        self._refuse(lease)

    def _take_settled(self) -> None:
        """Stores without conditional writes: write, wait SETTLE seconds, read back."""
        current = self._read()
        if current and current.get("run_id") != self.run_id and not self._may_take(current):
            self._refuse(current)
        storage.write_bytes_atomic(self.url, self._doc())
        self._held("")
        time.sleep(SETTLE)
        current = self._read()
        if not current or current.get("run_id") != self.run_id:
            self._refuse(current or {})

    def __enter__(self) -> "Lease":
        self.started = time.time()
        self._take() if self.cas else self._take_settled()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        _ACTIVE.append(self)
        return self

    def _renew(self) -> None:
        if not self.cas:
            current = self._read()
            if current and current.get("run_id") != self.run_id:
                return self._lose("another run took it over")
            storage.write_bytes_atomic(self.url, self._doc())
            return self._held("")
        tag = conditional.replace(self.url, self._doc(), self._tag)
        if tag is not None:
            return self._held(tag)
        current = conditional.read(self.url)
        lease = _parse(current.data) if current else {}
        if current is not None and lease.get("run_id") == self.run_id:  # a retried renewal that had landed
            self._pending = lease.get("expires_at", 0.0)
            return self._held(current.tag)
        self._lose("another run took it over" if lease else "its lease file was removed")

    def _beat(self) -> None:
        wait = self.ttl / 3
        while not self._stop.wait(wait):
            if time.time() >= self.expires_at:
                return self._lose(f"could not renew it before it expired at {_iso(self.expires_at)}")
            try:
                self._renew()
                wait = self.ttl / 3
            except Exception:  # noqa: BLE001 - retried soon, until the lease would expire
                wait = min(self.ttl / 3, max(1.0, (self.expires_at - time.time()) / 4))
            if self.lost.is_set():
                return

    def __exit__(self, *exc) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost.is_set():
            return  # not ours any more: leave it to its holder
        try:
            if self.cas:
                conditional.delete(self.url, self._tag)  # only the version this run wrote
            else:
                current = self._read()
                if current and current.get("run_id") == self.run_id:
                    storage.remove(self.url)
        except Exception:  # noqa: BLE001 - a lease left behind expires by itself
            pass


class LeaseWatch:
    """The lease as a process other than its holder's sees it (a Ray Train worker of the holding driver):
    `lost()` reads the lease file at most every `every` seconds and answers whether run `run_id` has
    lost it (another run's lease, none, or one past its expiry). A failed read answers "not lost": the
    holder's own heartbeat decides expiry."""

    def __init__(self, url: str, run_id: str, ttl: float):
        self.url, self.run_id, self.every = url, run_id, min(5.0, ttl / 6)
        self._last, self._lost = 0.0, False

    def lost(self) -> bool:
        if self._lost or time.time() - self._last < self.every:
            return self._lost
        self._last = time.time()
        try:
            lease = storage.read_json(self.url)
        except FileNotFoundError:
            lease = {}
        except Exception:  # noqa: BLE001 - unreadable now: ask again next step
            return False
        self._lost = lease.get("run_id") != self.run_id or lease.get("expires_at", 0) <= time.time()
        return self._lost
