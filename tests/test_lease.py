"""stages/core/lease.py and stages/core/conditional.py: the output lease by compare-and-swap, on local
disk and on S3 (moto on 127.0.0.1, which honours If-None-Match / If-Match): exactly one winner when runs
race, however slow one's write is; a retried request that meets its own first attempt; take-over of a
dead run's lease and of this job's predecessor's; a holder that cannot renew stops; release only of
its own version."""

from __future__ import annotations

import json
import threading
import time

import pytest

from stages.core import conditional, storage
from stages.core import lease as lease_mod
from stages.core.lease import Lease, LeaseHeld, LeaseWatch

moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3_env():
    import socket

    import boto3
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="leases")
        s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps clients by options, not by endpoint: none of
        yield env                                 # another module's (stopped) server is reused here
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """An output URL on local disk or on S3 (a prefix of its own per test)."""
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_env")
    return f"s3://leases/{request.node.name.replace('[', '-').rstrip(']')}/out"


def test_conditional_operations_answer_who_got_there_first(where):
    url = storage.join(where, "_lease.json")
    assert conditional.read(url) is None
    tag = conditional.create(url, b"one")
    assert tag and conditional.create(url, b"two") is None  # something is there: not overwritten
    got = conditional.read(url)
    assert (got.data, got.tag) == (b"one", tag)
    new = conditional.replace(url, b"three", tag)
    assert new and new != tag
    assert conditional.replace(url, b"four", tag) is None  # a stale version: refused
    assert conditional.delete(url, tag) is False and conditional.read(url).data == b"three"
    assert conditional.delete(url, new) is True and conditional.read(url) is None
    assert conditional.delete(url, new) is False  # nothing there


def test_a_live_lease_refuses_and_is_released_by_its_holder(where):
    with Lease(where, "precompute", ttl=30) as first:
        held = storage.read_json(f"{where}/_lease.json")
        assert held["run_id"] == first.run_id and held["expires_at"] > time.time()
        with pytest.raises(LeaseHeld, match=rf"being written by another run \(precompute on .*{first.run_id[:12]}"):
            Lease(where, "train").__enter__()
        first.check()
    assert not storage.exists(f"{where}/_lease.json")


TRIALS = 24


def test_racing_runs_with_a_slow_write_have_one_winner_every_time(where, monkeypatch):
    """Each trial: two runs start together and one's create request is delayed (0.02 to 0.3 s: it read "no
    lease" long before its write lands): exactly one holds the lease, the other is refused naming it. The
    trials run at once, each on an output of its own, so the store also sees many racing pairs together."""
    real = conditional.create
    delay = threading.local()

    def create(url, data):
        time.sleep(getattr(delay, "s", 0.0))
        return real(url, data)

    monkeypatch.setattr(conditional, "create", create)
    outcomes: dict[int, list] = {t: [] for t in range(TRIALS)}

    def race(trial: int, delayed: bool, barrier: threading.Barrier) -> None:
        delay.s = 0.02 + 0.28 * trial / TRIALS if delayed else 0.0
        lease = Lease(f"{where}/trial-{trial}", "precompute", ttl=30)
        barrier.wait()
        try:
            outcomes[trial].append(lease.__enter__())
        except LeaseHeld as e:
            outcomes[trial].append(str(e))

    threads = []
    for trial in range(TRIALS):
        barrier = threading.Barrier(2)
        threads += [threading.Thread(target=race, args=(trial, d, barrier)) for d in (trial % 2 == 0, trial % 2 == 1)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    for trial, outcome in outcomes.items():
        winners = [x for x in outcome if isinstance(x, Lease)]
        assert len(outcome) == 2 and len(winners) == 1, (trial, outcome)
        assert winners[0].run_id[:12] in next(x for x in outcome if isinstance(x, str))
        assert storage.read_json(f"{where}/trial-{trial}/_lease.json")["run_id"] == winners[0].run_id
        winners[0].__exit__(None, None, None)


def test_a_create_retried_after_it_landed_is_recognised_as_ours(where, monkeypatch):
    """The first create lands but its answer is lost (a timeout): the retry meets the lease; reading it
    back, the run finds its own run id and holds the lease."""
    real = conditional.create
    calls = []

    def create(url, data):
        calls.append(url)
        real(url, data)
        if len(calls) == 1:
            return None  # as a retried conditional PUT answers (412) when its first attempt had landed
        return real(url, data)

    monkeypatch.setattr(conditional, "create", create)
    with Lease(where, "train", ttl=30) as lease:
        assert storage.read_json(f"{where}/_lease.json")["run_id"] == lease.run_id
        lease.check()
    assert not storage.exists(f"{where}/_lease.json")


def test_take_over_a_dead_runs_lease_and_this_jobs_predecessors(where, monkeypatch):
    url = f"{where}/_lease.json"
    storage.write_json(url, {"run_id": "dead" * 8, "holder": "gone pid 1", "expires_at": time.time() - 1})
    with Lease(where, "precompute", ttl=30) as taker:  # expired: taken over
        assert storage.read_json(url)["run_id"] == taker.run_id
    live = {"run_id": "a" * 32, "holder": "other pid 7", "host": "elsewhere", "job_id": "nightly-2026-12-05",
            "command": "precompute", "expires_at": time.time() + 300}
    storage.write_json(url, live)
    monkeypatch.setenv("DPO_JOB_ID", "nightly-2026-12-04")
    with pytest.raises(LeaseHeld, match="other pid 7"):  # another job's live lease: refused
        Lease(where, "precompute").__enter__()
    monkeypatch.setenv("DPO_JOB_ID", "nightly-2026-12-05")
    with Lease(where, "precompute", ttl=30) as retry:  # a retry of the same job: its predecessor's lease is its own
        held = storage.read_json(url)
        assert held["run_id"] == retry.run_id and held["job_id"] == "nightly-2026-12-05"


def test_a_holder_that_cannot_renew_or_was_taken_over_stops(where, monkeypatch):
    """Renewals fail (storage down): the lease is lost once it expires, check() says why, and the run
    leaves the lease alone. A holder whose lease another run took over knows it at its next beat."""
    def down(*a, **kw):
        raise storage.StorageError("storage unavailable")

    lease = Lease(where, "train", ttl=0.6).__enter__()
    watch = LeaseWatch(lease.url, lease.run_id, 0.6)
    assert not watch.lost()
    monkeypatch.setattr(conditional, "replace", down)
    monkeypatch.setattr(storage, "write_bytes_atomic", down)
    deadline = time.time() + 10
    while not lease.is_lost() and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(LeaseHeld, match="lost its lease .*could not renew it before it expired"):
        lease.check()
    with pytest.raises(LeaseHeld):
        lease_mod.check_held()  # what stages call at their natural steps
    lease.__exit__(None, None, None)
    assert storage.read_json(f"{where}/_lease.json")["run_id"] == lease.run_id  # expired, left to expire
    time.sleep(0.2)
    assert watch.lost()  # a worker of the holder sees it expired
    monkeypatch.undo()

    other = Lease(f"{where}/2", "train", ttl=0.6).__enter__()
    stale = json.loads(storage.read_bytes(other.url))
    storage.write_json(other.url, {**stale, "run_id": "b" * 32, "holder": "thief pid 9",
                                   "expires_at": time.time() + 60})
    deadline = time.time() + 10
    while not other.is_lost() and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(LeaseHeld, match="thief pid 9"):
        other.check()
    other.__exit__(None, None, None)
    assert storage.read_json(other.url)["run_id"] == "b" * 32  # not ours: not removed


def test_a_lost_lease_stops_training_within_one_step(refs, tmp_path, monkeypatch):
    """Another run takes the output's lease over during step 2: the trainer stops after that step with
    one LeaseHeld line naming the other run, logs no record of it and writes no checkpoint or final weights."""
    from stages import train
    from stages.core.config.options import TrainConfig
    from stages.core.training import trainer

    monkeypatch.setattr(lease_mod, "TTL_SECONDS", 1.2)  # LeaseWatch reads the file at most every ttl/6 s
    real = trainer.train_step
    out = tmp_path / "run"

    def step(run, *a):
        record = real(run, *a)
        if run.step == 2:
            time.sleep(0.25)  # past the watch's interval
            held = storage.read_json(f"{out}/_lease.json")
            storage.write_json(f"{out}/_lease.json", {**held, "run_id": "c" * 32, "holder": "usurper pid 3",
                                                      "expires_at": time.time() + 60})
        return record

    monkeypatch.setattr(trainer, "train_step", step)
    cfg = TrainConfig(refs=str(refs), output=str(out), max_steps=6, batch_size=2, micro_batch_size=2, save_every=1,
                      progress=False)
    with pytest.raises(LeaseHeld, match="usurper pid 3"):
        train.run(cfg)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"] and not (out / "final").exists()


def test_a_trainer_pins_its_refs(refs, tmp_path, monkeypatch):
    """Refs rewritten under a training run (a shard replaced, its checksum recorded in the manifest as a
    precompute would) stop it before its next checkpoint, with one line; a resume on changed refs is
    refused; the same refs resume."""
    import shutil

    from stages import train
    from stages.core.config.options import TrainConfig
    from stages.core.training import trainer
    from stages.core.training.run_folder import TrainingError

    own = tmp_path / "refs"
    shutil.copytree(refs, own)
    out = tmp_path / "run"
    cfg = TrainConfig(refs=str(own), output=str(out), max_steps=4, batch_size=2, micro_batch_size=2, save_every=1,
                      progress=False)
    real = trainer.train_step
    manifest = json.loads((own / "manifest.json").read_text())

    def step(run, *a):
        record = real(run, *a)
        if run.step == 2:  # shard 0 rewritten (a repair with other content): its new checksum in the manifest
            shards = [{**manifest["shards"][0], "sha256": "0" * 64}] + manifest["shards"][1:]
            (own / "manifest.json").write_text(json.dumps({**manifest, "shards": shards}))
        return record

    monkeypatch.setattr(trainer, "train_step", step)
    with pytest.raises(TrainingError, match=r"changed while this run trained .*step 2\): stopped before its"):
        train.run(cfg)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    resume = TrainConfig(**{**cfg.__dict__, "resume": "auto"})
    with pytest.raises(TrainingError, match="changed since this run started"):
        train.run(resume)
    (own / "manifest.json").write_text(json.dumps(manifest))  # the refs it started from: it resumes
    assert train.run(resume)["steps"] == 4


@pytest.mark.slow  # a training or evaluation run
def test_a_shard_file_replaced_after_its_first_epoch_stops_training(refs, tmp_path, monkeypatch):
    """A shard's file replaced (by another shard's bytes: valid rows, manifest untouched) once the first epoch
    has read it: the second epoch's visit checks the bytes it reads against the manifest and stops the run with
    one line naming the file, instead of training on pairs the run did not start from."""
    import shutil

    from stages import train
    from stages.core.config.options import TrainConfig
    from stages.core.refs.stream import ShardError
    from stages.core.training import trainer

    own = tmp_path / "refs"
    shutil.copytree(refs, own)
    shards = json.loads((own / "manifest.json").read_text())["shards"]
    real = trainer.train_step

    def step(run, *a):
        record = real(run, *a)
        if run.step == 10:  # 20 pairs, 2 a step: the first epoch is over, every shard read once
            (own / shards[0]["path"]).write_bytes((own / shards[1]["path"]).read_bytes())
        return record

    monkeypatch.setattr(trainer, "train_step", step)
    cfg = TrainConfig(refs=str(own), output=str(tmp_path / "run"), max_steps=20, batch_size=2, micro_batch_size=2,
                      progress=False)
    with pytest.raises(ShardError, match=rf"{shards[0]['path']}: checksum .* does not match the manifest"):
        train.run(cfg)


@pytest.mark.slow  # a training or evaluation run
def usurp(out, letter: str, holder: str) -> None:
    """Another run takes OUT's lease over (as one that found it expired would), then the holder's next heartbeat
    (every ttl/3 s: 0.4 s at the tests' TTL of 1.2 s) passes."""
    held = storage.read_json(f"{out}/_lease.json")
    storage.write_json(f"{out}/_lease.json", {**held, "run_id": letter * 32, "holder": holder,
                                              "expires_at": time.time() + 60})
    time.sleep(0.8)


def test_a_lost_lease_stops_eval_before_it_writes(refs, tmp_path, monkeypatch):
    """`pipeline.py eval` holds its output folder's lease: another run takes it over after the first micro-batch,
    and the evaluation stops at the next one with the LeaseHeld line naming that run, writing no eval.json; a
    second evaluation into a folder whose lease is live is refused before it scores anything."""
    from stages import evaluate
    from stages.core.config.options import EvalConfig
    from stages.core.training import policy_pass

    monkeypatch.setattr(lease_mod, "TTL_SECONDS", 1.2)  # the heartbeat reads the file every ttl/3 s
    out = tmp_path / "eval"
    real, calls = policy_pass.run_pairs, []

    def run_pairs(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            usurp(out, "d", "usurper pid 4")
        return real(*a, **kw)

    monkeypatch.setattr(policy_pass, "run_pairs", run_pairs)
    cfg = EvalConfig(refs=str(refs), output=str(out), micro_batch_size=4, progress=False)
    with pytest.raises(LeaseHeld, match="usurper pid 4"):
        evaluate.run(cfg)
    assert len(calls) == 1 and not (out / "eval.json").exists()
    monkeypatch.setattr(policy_pass, "run_pairs", real)
    calls.clear()
    with pytest.raises(LeaseHeld, match="usurper pid 4"):  # its lease is live: refused at the start
        evaluate.run(cfg)
    assert not calls and not (out / "eval.json").exists()


def test_a_lost_lease_stops_precompute_before_its_manifest(refs, tiny_model_dir, tmp_path, monkeypatch):
    """Another run takes the refs folder's lease over while the first batch is scored: precompute stops at
    that batch with the LeaseHeld line naming the other run, and writes no manifest (the shards it wrote stay
    unlisted: the holder's own run decides what the refs are)."""
    from stages import precompute
    from stages.core.config.options import PrecomputeConfig
    from stages.core.refs import scoring_run

    monkeypatch.setattr(lease_mod, "TTL_SECONDS", 1.2)  # the heartbeat reads the file every ttl/3 s
    out = tmp_path / "refs"
    real, calls = scoring_run.ScoringRun.on_batch, []

    def on_batch(self, *a, **kw):
        calls.append(1)
        if len(calls) == 1:
            usurp(out, "e", "usurper pid 5")
        return real(self, *a, **kw)

    monkeypatch.setattr(scoring_run.ScoringRun, "on_batch", on_batch)
    data = tmp_path / "in.jsonl"
    data.write_text("".join((refs.parent / "in.jsonl").read_text().splitlines(keepends=True)[:10]))
    cfg = PrecomputeConfig(data=str(data), model=tiny_model_dir, output=str(out), format="hh",
                           rows_per_shard=5, batch_size=5, max_length=256, progress=False)  # 2 scored batches
    with pytest.raises(LeaseHeld, match="usurper pid 5"):
        precompute.run(cfg)
    assert len(calls) == 1 and not (out / "manifest.json").exists()
    # The stream was closed mid-way: Ray Data's fetch threads end within seconds, but one still running when
    # the session shuts Ray down (this test last in a run) would end the whole process with code 1.
    deadline = time.time() + 20
    while time.time() < deadline and any(t.name == "iter_threaded" for t in threading.enumerate()):
        time.sleep(0.1)
