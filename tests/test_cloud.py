"""Both stages on s3:// against a real S3-protocol server (moto) on 127.0.0.1, and Ray job submission.

No traffic leaves loopback: AWS_ENDPOINT_URL points s3fs at the local server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import HH_SAMPLE, ROOT, ray_in_this_env, read_jsonl_gz

from stages.core import storage

moto_server = pytest.importorskip("moto.server")
pytestmark = pytest.mark.slow  # an S3 server, subprocesses and a Ray head
SECRET = "s3cr3t-Value-Never-Logged"
OPTS = json.dumps({"secret": SECRET, "key": "testing-key-id"})  # storage options: the secret passed explicitly too


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with bucket 'dpo', and the AWS_* variables pointing at it."""
    import boto3

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the variables are restored when the module ends
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="dpo")
        yield {"server": server, "port": port, "env": env}
        server.stop()


def s3_client(s3):
    import boto3

    return boto3.client("s3", endpoint_url=s3["env"]["AWS_ENDPOINT_URL"])


def keys(s3, prefix):
    pages = s3_client(s3).get_paginator("list_objects_v2").paginate(Bucket="dpo", Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def put_rows(s3, key, rows):
    s3_client(s3).put_object(Bucket="dpo", Key=key, Body="".join(json.dumps(r) + "\n" for r in rows).encode())


def cli_start(*args, env=None) -> subprocess.Popen:
    """`pipeline.py ARGS` started in a subprocess (its own local Ray), with our AWS_* variables."""
    return subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), *args, "--progress", "false"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": "", **(env or {})}, start_new_session=True)


def cli_end(proc: subprocess.Popen, check=True, timeout=600) -> subprocess.CompletedProcess:
    """Wait for a started CLI (killed with its process group if it runs past `timeout`)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        assert done.returncode == 0, err[-4000:]
    return done


def cli(*args, env=None, check=True) -> subprocess.CompletedProcess:
    return cli_end(cli_start(*args, env=env), check=check)


@pytest.fixture(scope="module")
def ray_s3(s3):
    """Ray in this process, restarted once for the module inside s3's environment: the stages' tasks,
    actors and Ray Train workers read and write S3 themselves, and Ray's workers take the environment
    Ray was started in (conftest.ray_in_this_env; at the module's end Ray runs again without AWS_*)."""
    with ray_in_this_env():
        yield


# One training setting for the runs compared here: on S3 (the CLI; fsdp on two workers, stopped and
# resumed) and on local disk (s3_refs' local_run).
STEPS = dict(max_steps=4, batch_size=4, micro_batch_size=2, learning_rate=1e-3, save_every=2, warmup_ratio=0, seed=3)


def steps_flags() -> list[str]:
    return [x for k, v in STEPS.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def s3_refs(s3, refs, tmp_path_factory) -> dict:
    """refs' rows, in two files under a prefix on S3, precomputed to s3://dpo/refs by the CLI with refs'
    settings and the secret also passed explicitly (storage options); and, at the same time (a process
    each, so the two cores share the work), the training the S3 runs are compared with: from `refs` on
    local disk, by the CLI as the S3 run whose metrics must equal its own exactly."""
    import yaml

    made = yaml.safe_load((refs / "config.yaml").read_text())  # what made refs: the same settings here
    text = Path(made["data"]).read_text().splitlines(keepends=True)
    for key, part in (("in/a.jsonl", text[:7]), ("in/b.jsonl", text[7:])):
        s3_client(s3).put_object(Bucket="dpo", Key=key, Body="".join(part).encode())
    local_run = tmp_path_factory.mktemp("local-run") / "run"
    started = [cli_start("precompute", "--data", "s3://dpo/in/", "--output", "s3://dpo/refs", "--storage-options",
                         OPTS, "--model", made["model"], "--format", made["format"], "--rows-per-shard",
                         str(made["rows_per_shard"]), "--max-length", str(made["max_length"])),
               cli_start("train", "--refs", str(refs), "--output", str(local_run), *steps_flags())]
    try:
        precompute_cli = cli_end(started[0])
    finally:
        cli_end(started[1])
    return {"rows": len(text), "precompute_cli": precompute_cli, "local_run": local_run}


def short_rows(n, start=0):
    rows = [r for r in read_jsonl_gz(HH_SAMPLE, 400) if r["chosen"] != r["rejected"] and len(r["chosen"]) < 900]
    return rows[start:start + n]


def read_shard_rows(s3, prefix):
    import pyarrow.parquet as pq
    import s3fs

    fs = s3fs.S3FileSystem()
    manifest = json.loads(fs.cat_file(f"dpo/{prefix}/manifest.json"))
    rows = []
    for s in manifest["shards"]:
        with fs.open(f"dpo/{prefix}/{s['path']}") as fh:
            rows.extend(pq.read_table(fh).to_pylist())
    return manifest, rows


@pytest.fixture()
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 (token auth on, as shipped), stopped by its process group at the end."""
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    # Job entrypoints run `python ...`: this interpreter, as in a cluster image with the project installed.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    ray_bin = str(Path(sys.executable).parent / "ray")
    command = [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "3",
               # Ray's fixed default (52365) is taken by any other Ray session on this machine; the head's
               # job agent listens there, and without it no job can be submitted.
               "--dashboard-agent-listen-port", str(free_port()),
               "--temp-dir", tempfile.mkdtemp(prefix="ray", dir="/tmp")]  # sockets need a short path
    head = subprocess.Popen(command, env=env, start_new_session=True, stdout=open(tmp_path / "head.log", "w"),
                            stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    import urllib.error
    import urllib.request

    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answering (401 without a token): it is up
            break
        except OSError:
            assert head.poll() is None and time.time() < deadline, "ray head did not start"
            time.sleep(1)
    yield {"address": address, "env": env}
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):  # a throwaway head: no need to wait long
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    Path("/tmp/ray/ray_current_cluster").unlink(missing_ok=True)


def test_the_nightly_chain_as_one_ray_job_two_nights(s3, ray_head, tiny_model_dir):
    """jobs/nightly.yaml submitted to a Ray head (token auth) against S3, two nights: the second scores
    only the rows added in between and trains into a new dated folder. The stage options come from a
    config file on S3; the spec's example values are replaced by flags after `--`. First in this file,
    before the module's own Ray in this process (ray_s3) starts."""
    put_rows(s3, "nightly-in/a.jsonl", short_rows(8, start=60))
    s3_client(s3).put_object(Bucket="dpo", Key="nightly/config.yaml", Body=(
        b"precompute_options: {max_length: 256, rows_per_shard: 4}\n"
        b"train_options: {max_steps: 2, batch_size: 4}\n"))
    flags = ["--config", "s3://dpo/nightly/config.yaml", "--data", "s3://dpo/nightly-in/", "--model", tiny_model_dir,
             "--refs", "s3://dpo/nightly/refs", "--runs", "s3://dpo/nightly/runs"]
    for date, rows_added in (("2026-11-25", 8), ("2026-11-26", 4)):
        if date == "2026-11-26":
            put_rows(s3, "nightly-in/b.jsonl", short_rows(4, start=80))
        p = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "submit", str(ROOT / "jobs" / "nightly.yaml"),
                            "--address", ray_head["address"], "--wait", "--timeout", "300", "--", *flags,
                            "--date", date], capture_output=True, text=True, env=ray_head["env"])
        assert p.returncode == 0 and "SUCCEEDED" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]
        assert SECRET not in p.stdout + p.stderr
        record = storage.read_json(f"s3://dpo/nightly/runs/nightly-{date}/run.json")
        assert record["stages"]["precompute"]["last_run"]["pairs_written"] == rows_added
        assert record["stages"]["train"]["outcome"] == "finished"
        assert f"nightly/runs/nightly-{date}/final/model.safetensors" in keys(s3, f"nightly/runs/nightly-{date}/")
    manifest, rows = read_shard_rows(s3, "nightly/refs")
    assert manifest["rows_written"] == len(rows) == 12 and manifest["dtype"] == "bfloat16"
    assert storage.read_json("s3://dpo/nightly/runs/latest.json")["run"] == "s3://dpo/nightly/runs/nightly-2026-11-26"


def test_both_stages_on_s3_match_local_disk(s3, refs, s3_refs):
    """The CLI's precompute and train on s3:// (the input: two files under a prefix; s3_refs) make the
    shards of `refs` (the same rows and settings precomputed on local disk) and the metrics of the same
    training from `refs` on local disk. The secret, also passed explicitly, is neither written nor
    printed."""
    import s3fs

    p1, local_run = s3_refs["precompute_cli"], s3_refs["local_run"]
    manifest, remote = read_shard_rows(s3, "refs")
    local_manifest = json.loads((refs / "manifest.json").read_text())
    assert manifest["pair_ids_fingerprint"] == local_manifest["pair_ids_fingerprint"]
    assert manifest["rows_written"] == s3_refs["rows"] == len(remote) and [s["sha256"] for s in manifest["shards"]] == \
        [s["sha256"] for s in local_manifest["shards"]]
    assert {"refs/manifest.json", "refs/config.yaml", "refs/rejects/shard-00000.parquet"} <= set(keys(s3, "refs/"))

    # Train from s3 to s3 (checkpoints on s3; resuming from them is the sharded-checkpoint test below);
    # local_run is the same training from refs on local disk.
    p2 = cli("train", "--refs", "s3://dpo/refs", "--output", "s3://dpo/run", "--storage-options", OPTS,
             *steps_flags())
    got = keys(s3, "run/")
    for k in ("run/final/model.safetensors", "run/final/config.json", "run/metrics.jsonl", "run/curves.png",
              "run/train_config.yaml", "run/checkpoints/step-4/state.json"):
        assert k in got, k
    fs = s3fs.S3FileSystem()
    remote_metrics = [json.loads(x) for x in fs.cat_file("dpo/run/metrics.jsonl").decode().splitlines()]
    local_metrics = [json.loads(x) for x in (local_run / "metrics.jsonl").read_text().splitlines()]
    drop = lambda r: {k: v for k, v in r.items() if k != "tokens/s"}  # noqa: E731
    assert len(remote_metrics) == 4 and [drop(r) for r in remote_metrics] == [drop(r) for r in local_metrics]

    # No secret in any written file or in what the commands printed.
    for k in got + keys(s3, "refs/"):
        if k.endswith((".json", ".yaml", ".jsonl")):
            assert SECRET not in fs.cat_file(f"dpo/{k}").decode(), k
    for p in (p1, p2):
        assert SECRET not in p.stdout + p.stderr
    # A grown input on S3 (only the new rows scored) is the nightly chain's second night, above.


def test_s3_outage_mid_precompute_then_a_rerun_that_refuses_an_overlapping_run(s3, tiny_model_dir, ray_s3, capsys,
                                                                               monkeypatch):
    """A real precompute process loses its storage mid-run and fails. Its re-run (in this process: what
    it proves is the output's repair and its lease, not the CLI) takes the output's lease and, held at a
    gate once it has it, is still running when a second precompute into the same output starts: the
    second stops with one line naming the holder, before writing anything. The re-run then completes
    the output without overlap and lets go of its lease."""
    import threading

    import pipeline
    from stages import precompute
    from stages.core.config.options import PrecomputeConfig
    from stages.core.refs.scoring_run import ScoringRun

    rows = short_rows(30, start=40)  # 10 shards: 3 finished before the outage, 7 not
    put_rows(s3, "outage/in.jsonl", rows)
    settings = dict(data="s3://dpo/outage/", output="s3://dpo/outage-refs", model=tiny_model_dir, rows_per_shard=3,
                    batch_size=1, max_length=256)
    args = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]

    # 1. The outage: a real process, its storage gone after 3 finished shards.
    proc = cli_start("precompute", *args, env={"DPO_STORAGE_RETRIES": "1",
                                               "AWS_MAX_ATTEMPTS": "2"})  # fail fast once the server is gone
    deadline = time.time() + 240
    while time.time() < deadline and len([k for k in keys(s3, "outage-refs/_progress/") if "shard-" in k]) < 3:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    s3["server"].stop()  # storage goes away mid-run
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    finally:
        s3["server"].start()  # ... and comes back (moto keeps its state in this process)
    assert proc.returncode != 0, "the run should fail when storage is gone"
    assert SECRET not in out + err

    # 2. The re-run, held at a gate inside its lease; a second run into the same output meanwhile.
    holding, gate, result = threading.Event(), threading.Event(), {}
    real_run = ScoringRun.run

    def gated_run(self):  # the re-run, inside its lease
        holding.set()
        assert gate.wait(120)
        return real_run(self)

    monkeypatch.setattr(ScoringRun, "run", gated_run)
    rerun = threading.Thread(target=lambda: result.update(manifest=precompute.run(PrecomputeConfig(
        progress=False, **settings))))
    rerun.start()  # its tasks read S3 themselves: the module's Ray runs in s3's environment (ray_s3)
    try:
        assert holding.wait(120)
        holder = storage.read_json("s3://dpo/outage-refs/_lease.json")
        before = keys(s3, "outage-refs/")
        capsys.readouterr()
        assert pipeline.main(["precompute", *args, "--progress", "false"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines()
               if line.strip() and not line.startswith("device: ")]
        assert len(err) == 1 and "being written by another run (precompute on" in err[0], err
        assert holder["run_id"][:12] in err[0]
        assert keys(s3, "outage-refs/") == before  # the second run wrote nothing
    finally:
        gate.set()
        rerun.join(300)

    # 3. The re-run's output: complete, no overlap; the holder was not disturbed, and let go of its lease.
    manifest, got = read_shard_rows(s3, "outage-refs")
    assert result["manifest"]["rows_written"] == manifest["rows_written"]
    assert not storage.exists("s3://dpo/outage-refs/_lease.json")
    ids = [r["pair_id"] for r in got]
    assert len(ids) == len(set(ids)) == manifest["rows_written"]
    assert manifest["rows_read"] == 30 == manifest["rows_written"] + manifest["rows_rejected"]
    import pyarrow.parquet as pq
    import s3fs

    fs = s3fs.S3FileSystem()
    rejected = []
    for s in manifest["shards"]:
        with fs.open(f"dpo/outage-refs/{s['rejects_path']}") as fh:
            rejected.extend(pq.read_table(fh).column("source_index").to_pylist())
    assert sorted([r["source_index"] for r in got] + rejected) == list(range(30))  # complete, no overlap
    shard_files = {k.rsplit("/", 1)[1].split(".")[0] for k in keys(s3, "outage-refs/shards/")}
    markers = {k.rsplit("/", 1)[1].split(".")[0] for k in keys(s3, "outage-refs/_progress/") if "shard-" in k}
    assert shard_files == markers


def test_permanent_errors_name_the_url(s3, tmp_path, tiny_model_dir, ray_s3, capsys):
    """A bucket that does not exist (the CLI, in a process of its own), an input that does not exist
    (pipeline.main in this process: the same command, exit status and lines)."""
    import pipeline

    put_rows(s3, "err/a.jsonl", short_rows(2))
    p = cli("precompute", "--data", "s3://dpo/err/", "--output", "s3://no-such-bucket/refs", "--model", tiny_model_dir,
            check=False)
    assert p.returncode != 0 and "s3://no-such-bucket/refs" in p.stderr and SECRET not in p.stderr
    capsys.readouterr()
    assert pipeline.main(["precompute", "--data", "s3://dpo/missing/", "--output", str(tmp_path / "o"), "--model",
                          tiny_model_dir, "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert "input not found: s3://dpo/missing/" in err and SECRET not in err


def test_an_output_lease_on_s3_has_one_holder(s3, monkeypatch):
    """A live lease refuses a second run, naming the holder; two runs starting together: one wins; an
    expired lease is taken over; a holder whose lease was taken over knows it."""
    import threading
    import time

    from stages.core import lease as lease_mod
    from stages.core.lease import Lease, LeaseHeld

    url = "s3://dpo/lease/out"
    with Lease(url, "precompute", ttl=30) as first:
        assert storage.read_json(f"{url}/_lease.json")["run_id"] == first.run_id
        with pytest.raises(LeaseHeld, match=rf"being written by another run \(precompute on .*{first.run_id[:12]}"):
            Lease(url, "train").__enter__()
    assert not storage.exists(f"{url}/_lease.json")  # released

    monkeypatch.setattr(lease_mod, "SETTLE", 1.0)
    barrier, outcome = threading.Barrier(2), []

    def race() -> None:
        lease = Lease(url, "precompute", ttl=30)
        barrier.wait()
        try:
            lease.__enter__()
            outcome.append(lease)
        except LeaseHeld:
            outcome.append(None)

    threads = [threading.Thread(target=race) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [x for x in outcome if x is not None]
    assert len(outcome) == 2 and len(winners) == 1
    winners[0].__exit__(None, None, None)

    monkeypatch.setattr(lease_mod, "SETTLE", 0.1)
    stale = {"run_id": "dead" * 8, "holder": "gone pid 1", "expires_at": time.time() - 1}
    storage.write_json(f"{url}/_lease.json", stale)
    with Lease(url, "precompute", ttl=0.6) as taker:  # expired: taken over
        storage.write_json(f"{url}/_lease.json", {**stale, "expires_at": time.time() + 60})  # and taken from it
        deadline = time.time() + 10
        while not taker.lost.is_set() and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseHeld, match="gone pid 1"):
            taker.check()
    assert storage.read_json(f"{url}/_lease.json")["run_id"] == stale["run_id"]  # not ours: left alone


def test_sharded_checkpoint_on_s3_written_by_each_worker_resumed_by_one(s3, refs, s3_refs, ray_s3):
    """fsdp on 2 Ray Train workers to s3://: each worker uploads its own part of the checkpoint; one
    worker resumes from it (read through fsspec) and ends where an uninterrupted local run (s3_refs'
    local_run) ends. Both S3 runs in this process (Ray Train's workers are processes of the module's Ray either way)."""
    from stages import train
    from stages.core.config.options import TrainConfig

    common = dict(refs=str(refs), progress=False, **STEPS)
    first = train.run(TrainConfig(output="s3://dpo/fsdp-run", num_workers=2, strategy="fsdp", stop_at_step=2,
                                  **common))
    assert first["outcome"] == "stopped" and first["steps"] == 2
    got = keys(s3, "fsdp-run/checkpoints/step-2/")
    for name in ("state/.metadata", "state/__0_0.distcp", "state/__1_0.distcp", "rng-0.pt", "rng-1.pt",
                 "policy.json", "state.json"):
        assert f"fsdp-run/checkpoints/step-2/{name}" in got, (name, got)
    assert train.run(TrainConfig(output="s3://dpo/fsdp-run", resume="true", **common))["steps"] == 4
    import s3fs
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import load_file

    remote = load_safetensors(s3fs.S3FileSystem().cat_file("dpo/fsdp-run/final/model.safetensors"))
    local = load_file(s3_refs["local_run"] / "final" / "model.safetensors")
    assert remote.keys() == local.keys()
    assert max(float((remote[k] - local[k]).abs().max()) for k in local) < 5e-4  # see test_parallel.assert_same_run


def test_on_policy_rounds_on_s3_with_the_previous_policy_as_reference(s3, tiny_model_dir, ray_s3):
    from stages import iterate
    from stages.core.config.chain import IterateConfig

    put_rows(s3, "prompts/p.jsonl", [{"prompt": p} for p in ("Tell me about rivers.", "Name a colour.",
                                                               "Why is the sky blue?", "Count to three.")])
    cfg = IterateConfig(prompts="s3://dpo/prompts/p.jsonl", model=tiny_model_dir, output="s3://dpo/online", rounds=2,
                        reference="previous", num_samples=3, max_new_tokens=8, temperature=1.0, progress=False,
                        score_final=False, reward_fn=f"{ROOT / 'tests' / 'online_rewards.py'}:chars",
                        precompute_options={"max_length": 128},
                        train_options={"batch_size": 2, "learning_rate": 1e-3})
    state = iterate.run(cfg)  # precompute's tasks read the pairs from S3 themselves (ray_s3)
    got = set(keys(s3, "online/"))
    for k in ("online/iterate.json", "online/summary.md", "online/rounds.png",
              "online/round-1/candidates/manifest.json", "online/round-1/pairs/pairs.jsonl",
              "online/round-1/refs/manifest.json", "online/round-2/refs/manifest.json",
              "online/round-2/policy/final/model.safetensors"):
        assert k in got, k
    import s3fs

    fs = s3fs.S3FileSystem()
    r2_refs = json.loads(fs.cat_file("dpo/online/round-2/refs/manifest.json"))
    r1_policy = state["rounds"]["1"]["train"]["weights"]
    # --reference previous: round 2's pairs were scored by round 1's policy, fetched from S3
    assert r1_policy == "s3://dpo/online/round-1/policy/final" and r2_refs["reference_model"]["name"] == r1_policy
    assert r2_refs["rows_written"] == state["rounds"]["2"]["judge"]["pairs"] > 0
    gen2 = json.loads(fs.cat_file("dpo/online/round-2/candidates/manifest.json"))
    assert gen2["settings"]["model"] == r1_policy
