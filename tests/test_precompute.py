"""The precompute stage through real Ray Data with a tiny model: shards, rejects, manifest, re-runs.

The end-to-end tests share one run over the dirty input (the `dirty` fixture)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from conftest import HH_SAMPLE, ROOT, read_jsonl_gz
from oracle import exact_logps

from schemas import SHARD_SCHEMA, validate_manifest, validate_table
from stages import precompute
from stages.core.config.options import PrecomputeConfig
from stages.core.runtime.models import load_model
from stages.core.scoring.truncation import Truncation
from stages.precompute import OutputMismatch


def write_dirty_input(path: Path, n_good: int = 24) -> dict:
    """HH rows plus one row for each reject reason; returns the expected reasons."""
    rows = [r for r in read_jsonl_gz(HH_SAMPLE, 200)
            if r["chosen"] != r["rejected"] and max(len(r["chosen"]), len(r["rejected"])) < 1500][:n_good]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{this is not json")
    same = "\n\nHuman: hi\n\nAssistant: same"
    lines.insert(5, json.dumps({"chosen": same, "rejected": same}))
    lines.insert(7, json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant:   ",
                                "rejected": "\n\nHuman: hi\n\nAssistant: x"}))
    lines.insert(9, json.dumps(rows[0]))  # duplicate of source row 0
    lines.insert(11, json.dumps({"chosen": 12, "rejected": "x"}))
    lines.insert(13, json.dumps({"prompt": "word " * 700, "chosen": "a", "rejected": "b"}))
    path.write_text("\n".join(lines) + "\n")
    return {"malformed_json": 1, "identical_pair": 1, "empty_chosen": 1, "duplicate": 1, "bad_type": 1,
            "prompt_too_long": 1}


def run(tmp_path, model, name="out", **kw):
    cfg = PrecomputeConfig(data=str(kw.pop("data", tmp_path / "in.jsonl")), model=model, output=str(tmp_path / name),
                           rows_per_shard=kw.pop("rows_per_shard", 8), max_length=kw.pop("max_length", 512),
                           progress=False, **kw)
    return cfg, precompute.run(cfg)


def read_shards(out: Path, manifest: dict):
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(out / s["path"]) for s in manifest["shards"]]).to_pylist()


@pytest.fixture(scope="module")
def dirty(tmp_path_factory, tiny_model_dir, ray_session):
    """The dirty input (24 pairs, one row per reject reason) as `in/a.jsonl`, precomputed once: 4 shards
    of 8 rows, batch size 4, one scorer. A stage run costs seconds of actor start-up whatever its size:
    the tests below read this run (or a copy of it) instead of making their own. None writes into its
    output; the re-run test adds a file to its folder for a while (an output records its --data)."""
    tmp = tmp_path_factory.mktemp("dirty")
    (tmp / "in").mkdir()
    expected = write_dirty_input(tmp / "in" / "a.jsonl")
    cfg, m = run(tmp, tiny_model_dir, data=tmp / "in", batch_size=4)
    return SimpleNamespace(data=tmp / "in", cfg=cfg, out=Path(cfg.output), manifest=m, expected=expected)


@pytest.mark.slow
def test_shards_rejects_and_manifest(dirty, tiny_model_dir):
    cfg, m, out, expected = dirty.cfg, dirty.manifest, dirty.out, dirty.expected
    validate_manifest(m)
    assert m["rows_read"] == 30 and m["rows_written"] == 24 and m["rows_rejected"] == 6
    assert m["input_rows_read"] == 30  # pairs: the input rows are the rows read
    assert m["rejects_by_reason"] == expected
    assert json.loads((out / "manifest.json").read_text())["pair_ids_fingerprint"] == m["pair_ids_fingerprint"]
    assert (out / "config.yaml").read_text().startswith("data:")
    assert len(m["shards"]) == 4
    for s in m["shards"]:
        data = (out / s["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"]
        validate_table(pq.read_table(out / s["path"]), SHARD_SCHEMA)
        assert pq.ParquetFile(out / s["path"]).metadata.num_rows == s["rows"]
    rejects = [r for s in m["shards"] for r in pq.read_table(out / s["rejects_path"]).to_pylist()]
    assert sorted(r["reason"] for r in rejects) == sorted(expected)
    malformed = next(r for r in rejects if r["reason"] == "malformed_json")
    assert malformed["source_index"] == 3 and "line 4" in malformed["detail"]
    assert malformed["row"] == "{this is not json"
    dup = next(r for r in rejects if r["reason"] == "duplicate")
    assert "source_index 0" in dup["detail"]

    rows = read_shards(out, m)
    assert len({r["pair_id"] for r in rows}) == 24
    reject_idx = {r["source_index"] for r in rejects}
    assert sorted({r["source_index"] for r in rows} | reject_idx) == list(range(30))  # no gaps, no overlap
    model = load_model(tiny_model_dir)
    for r in rows[:8]:
        for key, ref in (("chosen_ids", "ref_chosen_logps"), ("rejected_ids", "ref_rejected_logps")):
            seq, start = Truncation(cfg.max_length, mode=cfg.truncation_mode).scored_sequence(r["prompt_ids"], r[key])
            assert abs(exact_logps(model, seq, start) - r[ref]) < 1e-4
            assert len(r["prompt_ids"]) + len(r[key]) <= cfg.max_length


@pytest.mark.slow
def test_same_logps_for_any_batch_size_and_worker_count(dirty, killed):
    """`dirty` scored 4 pairs per call with one scorer; `killed`'s pairs were all scored one pair per call
    (no padding), those of its re-run (all but the few shards finished before the kill) by two scorers."""
    m1, m2 = dirty.manifest, killed.manifest
    a = {r["pair_id"]: r for r in read_shards(dirty.out, m1)}
    b = {r["pair_id"]: r for r in read_shards(killed.out, m2)}
    assert a.keys() == b.keys() and m1["pair_ids_fingerprint"] == m2["pair_ids_fingerprint"]
    for pid in a:
        assert a[pid]["chosen_ids"] == b[pid]["chosen_ids"]
        assert abs(a[pid]["ref_chosen_logps"] - b[pid]["ref_chosen_logps"]) < 1e-4
        assert abs(a[pid]["ref_rejected_logps"] - b[pid]["ref_rejected_logps"]) < 1e-4


@pytest.mark.slow
def test_rerun_skips_grown_input_scores_only_new_rows_and_other_settings_are_refused(dirty, tmp_path, tiny_model_dir,
                                                                                     ray_session):
    """Re-runs into a copy of `dirty`'s output, over its --data folder (an output records its data: a
    copy of the folder would be another data set)."""
    out = tmp_path / "out"
    shutil.copytree(dirty.out, out)
    first = dirty.manifest

    def again(**kw):
        return run(tmp_path, tiny_model_dir, data=dirty.data, **kw)[1]

    # The same command again: nothing scored, the same shards.
    same = again()
    assert same["last_run"]["pairs_scored"] == 0 and same["last_run"]["rows_already_done"] == 30
    assert same["pair_ids_fingerprint"] == first["pair_ids_fingerprint"]
    assert [s["sha256"] for s in same["shards"]] == [s["sha256"] for s in first["shards"]]

    # Grown input: a new file sorting *before* the old one, with 6 new rows and one copy of an old row.
    rows = [r for r in read_jsonl_gz(HH_SAMPLE, 400)
            if r["chosen"] != r["rejected"] and max(len(r["chosen"]), len(r["rejected"])) < 1500]
    new = dirty.data / "0-new.jsonl"
    new.write_text("".join(json.dumps(r) + "\n" for r in rows[24:30] + [rows[1]]))
    try:
        second = again()
        third = again()
    finally:
        new.unlink()  # the folder as `dirty` wrote it
    assert second["last_run"]["pairs_scored"] == 6 and second["last_run"]["rows_already_done"] == 30
    assert (second["rows_read"], second["rows_written"], second["rejects_by_reason"]) == \
        (37, 30, {**dirty.expected, "duplicate": 2})
    ids = [r["pair_id"] for r in read_shards(out, second)]
    assert len(ids) == len(set(ids)) == 30
    old = [(s["path"], s["sha256"]) for s in first["shards"]]
    assert [(s["path"], s["sha256"]) for s in second["shards"][:4]] == old  # old shards kept
    assert third["last_run"]["pairs_scored"] == 0 and third["pair_ids_fingerprint"] == second["pair_ids_fingerprint"]

    # Other settings are refused; --overwrite replaces the output.
    with pytest.raises(OutputMismatch, match=r"max_length: 512 -> 128"):
        again(max_length=128)
    replaced = again(max_length=128, overwrite=True)
    assert replaced["max_length"] == 128 and replaced["last_run"]["pairs_scored"] > 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(OutputMismatch, match="not a precompute output"):
        run(tmp_path, tiny_model_dir, name="other", data=dirty.data)


def _cli(tmp_path, model, out):
    return [sys.executable, str(ROOT / "pipeline.py"), "precompute", "--data", str(tmp_path / "in.jsonl"),
            "--model", model, "--output", str(out), "--rows-per-shard", "2", "--batch-size", "1",
            "--max-length", "512", "--progress", "false"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_model_dir, ray_session):
    """A real `pipeline.py precompute` (its own Ray: RAY_ADDRESS="") over the dirty input, 15 shards of 2
    rows, one pair per scorer call, killed with SIGKILL once a few shards are finished; then the same run
    again (in this process) finishes it with two scorers (--num-workers is no setting an output must
    match). All its pairs were scored one pair per call, the re-run's (most of them) by two scorers: the
    batch-size/worker test reads it too, instead of a run of its own (a run costs seconds of start-up;
    a second scorer in the killed CLI run cost as much as it saved)."""
    tmp_path = tmp_path_factory.mktemp("killed")
    write_dirty_input(tmp_path / "in.jsonl")
    env = {**os.environ, "RAY_ADDRESS": ""}

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(tmp_path, tiny_model_dir, out), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    progress = out / "_progress"
    while time.time() < deadline:
        done = [p for p in progress.glob("shard-*.json")] if progress.exists() else []
        if len(done) >= 3:
            break
        assert proc.poll() is None, "run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # A writer actor in the middle of a shard may finish it as the processes go down: count once settled.
    finished_at_kill, settled = -1, 0
    while settled < 3:
        time.sleep(1)
        count = len(list(progress.glob("shard-*.json")))
        settled, finished_at_kill = (settled + 1, count) if count == finished_at_kill else (0, count)
    manifest_at_kill = (out / "manifest.json").exists()

    # The same command again (its settings as a config; the killed run's lease is taken over), two scorers.
    _, resumed = run(tmp_path, tiny_model_dir, name="killed", rows_per_shard=2, batch_size=1, num_workers=2)
    return SimpleNamespace(out=out, manifest=resumed, finished_at_kill=finished_at_kill,
                           manifest_at_kill=manifest_at_kill)


@pytest.mark.slow
def test_sigkill_and_rerun_gives_the_same_pairs(dirty, killed):
    """`killed`: the CLI run killed with SIGKILL, then run again; it finishes with `dirty`'s pairs and
    log-probs (an uninterrupted run of the same input: other shards, the same pairs)."""
    whole, out, resumed, finished_at_kill = dirty.manifest, killed.out, killed.manifest, killed.finished_at_kill
    assert finished_at_kill < 15 and not killed.manifest_at_kill
    assert 0 < resumed["last_run"]["pairs_scored"] < whole["rows_written"]
    assert resumed["last_run"]["rows_already_done"] == sum(s["rows_read"] for s in resumed["shards"][:finished_at_kill])
    ids = [r["pair_id"] for r in read_shards(out, resumed)]
    assert len(ids) == len(set(ids)) == whole["rows_written"]
    assert resumed["pair_ids_fingerprint"] == whole["pair_ids_fingerprint"]
    a = {r["pair_id"]: r for r in read_shards(dirty.out, whole)}
    for r in read_shards(out, resumed):
        assert r["chosen_ids"] == a[r["pair_id"]]["chosen_ids"]
        assert abs(r["ref_chosen_logps"] - a[r["pair_id"]]["ref_chosen_logps"]) < 1e-4
    assert not [p for p in out.rglob("*.partial")]
    # Only finished shards remain: every shard file has its completion marker.
    assert {p.stem for p in (out / "shards").iterdir()} == {p.stem for p in (out / "_progress").glob("shard-*.json")}


def test_plan_forwards_minimises_padding_plus_overhead():
    from stages.core.scoring.packing import plan_forwards

    # one forward: 4 x 101 + 5 = 409; two by width: 2 x 11 + 2 x 101 + 10 = 234; four: 222 + 20 = 242
    assert plan_forwards([100, 10, 101, 11], 10_000, None, 5) == [[1, 3], [0, 2]]
    groups = plan_forwards([50] * 5, 100, None, 1)  # budget: at most 2 rows of 50 per forward
    assert sorted(len(g) for g in groups) == [1, 2, 2] and sorted(i for g in groups for i in g) == list(range(5))
    # the (T, T) mask budget: 3 rows of 10 need 300 mask elements
    assert [len(g) for g in plan_forwards([10, 10, 10], 10_000, 200, 1000)] in ([2, 1], [1, 2])
    assert plan_forwards([], 100, None, 1) == []
