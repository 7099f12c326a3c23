"""Precompute under faults: runs that write nothing, a second data set, damaged outputs, a killed
scorer process, and the noise a successful run must not print."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import HH_SAMPLE, ROOT, read_jsonl_gz

from stages import inspect_refs, precompute
from stages.core.config.options import PrecomputeConfig
from stages.core.errors import PipelineError


def hh_rows(n: int, skip: int = 0) -> list[dict]:
    rows = [r for r in read_jsonl_gz(HH_SAMPLE, 400) if r["chosen"] != r["rejected"] and len(r["chosen"]) < 1500]
    return rows[skip:skip + n]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path: Path, model: str, data: Path, name: str = "out", **kw) -> PrecomputeConfig:
    kw = {"rows_per_shard": 4, "max_length": 512, "format": "hh", "progress": False, **kw}
    return PrecomputeConfig(data=str(data), model=model, output=str(tmp_path / name), **kw)


def pairs_by_shard(out: Path, manifest: dict) -> dict[str, list[str]]:
    return {s["path"]: pq.read_table(out / s["path"], columns=["pair_id"]).column("pair_id").to_pylist()
            for s in manifest["shards"]}


def reject_keys(out: Path, manifest: dict) -> list[str]:
    return [k for s in manifest["shards"]
            for k in pq.read_table(out / s["rejects_path"], columns=["row_key"]).column("row_key").to_pylist()]


def cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "pipeline.py"), *args]


# --- 4: a run that leaves no usable pair fails, after writing what it has --------------------------

@pytest.mark.slow
def test_all_rows_rejected_fails_after_writing_manifest_and_rejects(tmp_path, tiny_model_dir, ray_session, capsys):
    data = write_rows(tmp_path / "in.jsonl", hh_rows(6))
    cfg = config(tmp_path, tiny_model_dir, data, max_length=8)
    with pytest.raises(PipelineError, match=r"no pairs.*6 .*rejected.*prompt_too_long: 6"):
        precompute.run(cfg)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (m["rows_read"], m["rows_written"], m["rows_rejected"]) == (6, 0, 6)
    assert m["last_run"]["pairs_written"] == 0 and m["last_run"]["rows_rejected"] == 6
    assert len(reject_keys(tmp_path / "out", m)) == 6
    assert inspect_refs.main([cfg.output, "--examples", "0"]) == 0  # inspect still reads it
    assert "rejected prompt_too_long: 6" in capsys.readouterr().out
    with pytest.raises(PipelineError, match="no pairs"):  # a re-run that adds nothing: still no pairs
        precompute.run(cfg)


@pytest.mark.slow
def test_summary_counts_pairs_written_not_rows_through_the_scorer(tmp_path, tiny_model_dir, ray_session):
    # At max_length 160 some HH prompts are too long: token-level rejects pass through the scorer.
    data = write_rows(tmp_path / "in.jsonl", hh_rows(12))
    m = precompute.run(config(tmp_path, tiny_model_dir, data, max_length=160))
    written, rejected = m["rows_written"], m["rows_rejected"]
    assert written > 0 and rejected > 0 and written + rejected == 12
    assert (m["last_run"]["pairs_written"], m["last_run"]["rows_rejected"]) == (written, rejected)
    assert f"{written} pairs written, {rejected} rejected this run" in precompute.summary(m, "out")


def test_empty_input_exits_non_zero_with_one_line(tmp_path, tiny_model_dir):
    (tmp_path / "in.jsonl").write_text("")
    out = tmp_path / "out"
    res = subprocess.run(cli("precompute", "--data", str(tmp_path / "in.jsonl"), "--model", tiny_model_dir,
                             "--output", str(out), "--format", "hh"), capture_output=True, text=True)
    assert res.returncode == 2, res.stderr[-2000:]
    # the progress lines (`device: cpu for ...`) share stderr with the error: the error is one line, after them
    said = [line for line in res.stderr.splitlines() if not line.startswith("device: ")]
    assert len(said) == 1 and said[0].startswith("error: "), res.stderr
    assert "no pairs" in res.stderr and "no input rows" in res.stderr
    assert json.loads((out / "manifest.json").read_text())["rows_read"] == 0


# --- 5: another data set is refused unless --append -----------------------------------------------

@pytest.mark.slow
def test_other_data_is_refused_unless_append(tmp_path, tiny_model_dir, ray_session, monkeypatch):
    a = write_rows(tmp_path / "a.jsonl", hh_rows(3))
    b = write_rows(tmp_path / "b.jsonl", hh_rows(3, skip=3))
    first = precompute.run(config(tmp_path, tiny_model_dir, a))
    with pytest.raises(precompute.OutputMismatch, match=r"a\.jsonl.*b\.jsonl.*--append"):
        precompute.run(config(tmp_path, tiny_model_dir, b))
    # the same source named another way (a relative path) is the same source
    monkeypatch.chdir(tmp_path)
    again = precompute.run(config(tmp_path, tiny_model_dir, Path("a.jsonl")))
    assert again["last_run"]["rows_already_done"] == 3 and again["rows_written"] == first["rows_written"]
    both = precompute.run(config(tmp_path, tiny_model_dir, b, append=True))
    assert both["rows_written"] == 6 and both["last_run"]["pairs_written"] == 3
    assert both["data_sources"] == sorted([str(a), str(b)])


# --- 6: damaged outputs are repaired, and inspect --verify finds them ------------------------------

@pytest.mark.slow
def test_missing_and_damaged_shards_are_rescored_into_the_same_shards(tmp_path, tiny_model_dir, ray_session, capsys):
    rows = hh_rows(14)
    rows.insert(5, rows[1])  # a duplicate: a reject in shard 1
    data = write_rows(tmp_path / "in.jsonl", rows)
    cfg = config(tmp_path, tiny_model_dir, data)
    out = Path(cfg.output)
    first = precompute.run(cfg)
    assert len(first["shards"]) == 4 and first["rejects_by_reason"] == {"duplicate": 1}
    before = pairs_by_shard(out, first)
    keys_before = sorted(reject_keys(out, first))

    (out / "shards" / "shard-00001.parquet").unlink()
    damaged = out / "shards" / "shard-00002.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-40] + b"\0" * 40)
    rejects = out / "rejects" / "shard-00003.parquet"
    rejects.write_bytes(rejects.read_bytes()[:100])
    capsys.readouterr()

    listing = sorted(p for p in out.rglob("*"))
    assert inspect_refs.main([str(out), "--verify"]) != 0
    text = capsys.readouterr().out
    for bad in ("shards/shard-00001.parquet", "shards/shard-00002.parquet", "rejects/shard-00003.parquet"):
        assert bad in text
    assert "shard-00000" not in text
    assert sorted(p for p in out.rglob("*")) == listing  # --verify writes nothing

    again = precompute.run(cfg)
    err = capsys.readouterr().err
    repaired = [line for line in err.splitlines() if "repair" in line]
    assert len(repaired) == 3 and all(f"shard-0000{k}" in line for k, line in zip((1, 2, 3), repaired))
    assert pairs_by_shard(out, again) == before  # same shards, same pairs in each
    assert sorted(reject_keys(out, again)) == keys_before
    assert again["last_run"]["pairs_written"] == sum(len(before[f"shards/shard-0000{k}.parquet"]) for k in (1, 2, 3))
    assert again["last_run"]["rows_already_done"] == first["shards"][0]["rows_read"]
    assert again["rows_read"] == again["rows_written"] + again["rows_rejected"] == 15
    assert again["pair_ids_fingerprint"] == first["pair_ids_fingerprint"]
    assert inspect_refs.main([str(out), "--verify"]) == 0
    assert "OK" in capsys.readouterr().out

    # A shard of an older output, whose keys were in its marker, as an output of 18e113a has them: its
    # keys move to a keys file before its marker goes, and its rows go back into it.
    marker = out / "_progress" / "shard-00000.json"
    keys_file = out / "_progress" / "shard-00000.keys.parquet"
    old_keys = pq.read_table(keys_file).column("row_key").to_pylist()
    keys_file.unlink()
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "row_keys": old_keys}))
    (out / "shards" / "shard-00000.parquet").unlink()
    assert pairs_by_shard(out, precompute.run(cfg)) == before
    assert pq.read_table(keys_file).column("row_key").to_pylist() == old_keys

    # A marker without row keys and no keys file (written before markers held them): its rows, once its
    # shard is lost, are new work and go into a new shard after the last; still every row once.
    keys_file.unlink()
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "row_keys"}))
    (out / "shards" / "shard-00000.parquet").unlink()
    third = precompute.run(cfg)
    moved = pairs_by_shard(out, third)
    assert list(moved) == [f"shards/shard-0000{k}.parquet" for k in (1, 2, 3, 4)]
    assert moved["shards/shard-00004.parquet"] == before["shards/shard-00000.parquet"]
    assert third["rows_read"] == third["rows_written"] + third["rows_rejected"] == 15
    assert third["pair_ids_fingerprint"] == first["pair_ids_fingerprint"]


# --- 12: progress per forward, and a quiet successful run ------------------------------------------

class Reports:
    """Stands in for the progress actor: records what the scorer reports."""

    def __init__(self):
        self.calls = []
        self.report = self  # so `sink.report.remote(...)` works as on an actor handle

    def remote(self, batch_key, done):
        self.calls.append((batch_key, done))


def test_scorer_reports_progress_per_forward_with_unchanged_results(tiny_model_dir, tokenizer):
    import pyarrow as pa

    from stages.core.scoring.scorer import TOKENIZED_SCHEMA, ReferenceScorer, tokenize_batch
    from stages.core.scoring.truncation import Truncation

    recs = [{"pair_id": f"p{i}", "row_key": f"k{i}", "source_index": i, "shard": 0,
             "row_json": json.dumps({"prompt": [{"role": "user", "content": r["chosen"][:200]}],
                                     "chosen": [{"role": "assistant", "content": "yes " * (i + 1)}],
                                     "rejected": [{"role": "assistant", "content": "no " * (2 * i + 1)}]})}
            for i, r in enumerate(hh_rows(6))]
    batch = tokenize_batch(pa.Table.from_pylist(recs), tiny_model_dir, Truncation(512))
    assert batch.schema.equals(TOKENIZED_SCHEMA)
    for pack in (True, False):
        plain = ReferenceScorer(tiny_model_dir, "float32", Truncation(512), tokens_per_forward=64,
                                pack_prompts=pack)(batch)
        sink = Reports()
        scorer = ReferenceScorer(tiny_model_dir, "float32", Truncation(512), tokens_per_forward=64,
                                 pack_prompts=pack, progress=sink)
        assert scorer(batch).equals(plain)  # reporting changes no result
        done = [n for _, n in sink.calls]
        assert len(done) >= 3 and done == sorted(done) and done[-1] == 6 and any(0 < n < 6 for n in done)
        assert len({k for k, _ in sink.calls}) == 1


@pytest.mark.slow
def test_successful_cli_run_prints_only_the_bar(tmp_path, tiny_model_dir):
    write_rows(tmp_path / "in.jsonl", hh_rows(12))
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_AUTH_MODE", None)
    res = subprocess.run(cli("precompute", "--data", str(tmp_path / "in.jsonl"), "--model", tiny_model_dir,
                             "--output", str(tmp_path / "out"), "--format", "hh", "--max-length", "256"),
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    # Cut out the bar's own frames only: a log line may follow one on the same line (no newline between).
    rest = re.sub(r"reference log-probs:[^\]\r\n]*\]", "", res.stderr)
    # and the console channel's one `device:` line (which device scores, and why): nothing else is said
    lines = [line for line in re.split(r"[\r\n]", rest) if line.strip() and not line.startswith("device: ")]
    assert not lines, "\n".join(lines)
    frames = re.findall(r"\| (\d+)/12 \[", res.stderr)
    assert "12" in frames and "0" in frames
    assert "pairs written" in res.stdout


# --- the fault to inject: a scorer actor killed mid-run --------------------------------------------

def _scorer_pids(root: int) -> list[int]:
    """Ray workers running the ReferenceScorer actor among the descendants of the CLI process."""
    import psutil

    try:
        procs = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in procs:
        try:
            if "ReferenceScorer" in " ".join(p.cmdline()):
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def _precompute_cli(tmp_path: Path, model: str, out: Path) -> list[str]:
    return cli("precompute", "--data", str(tmp_path / "in.jsonl"), "--model", model, "--output", str(out),
               "--format", "hh", "--rows-per-shard", "3", "--batch-size", "1", "--max-length", "256",
               "--progress", "false")


def _manifest_pairs(out: Path) -> tuple[dict, list[str]]:
    m = json.loads((out / "manifest.json").read_text())
    return m, [p for ids in pairs_by_shard(out, m).values() for p in ids]


@pytest.mark.slow
def test_killed_scorer_actor_loses_and_repeats_nothing(tmp_path, tiny_model_dir):
    write_rows(tmp_path / "in.jsonl", hh_rows(30))
    env = {**os.environ, "RAY_ADDRESS": ""}
    clean = subprocess.run(_precompute_cli(tmp_path, tiny_model_dir, tmp_path / "clean"), env=env,
                           capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-3000:]
    _, clean_ids = _manifest_pairs(tmp_path / "clean")

    out = tmp_path / "killed"
    proc = subprocess.Popen(_precompute_cli(tmp_path, tiny_model_dir, out), env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.time() + 300
    try:
        while killed is None and time.time() < deadline:
            assert proc.poll() is None, "the run ended before the scorer could be killed"
            pids = _scorer_pids(proc.pid)
            if pids and len(list((out / "_progress").glob("shard-*.json"))) >= 1:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
            time.sleep(0.05)
        assert killed, "no scorer process found"
        assert not (out / "manifest.json").exists()  # it died mid-run
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:  # allowed: a clean one-line failure, after which a re-run completes
        assert proc.returncode == 2 and stderr.strip().splitlines()[-1].startswith("error: "), stderr[-3000:]
        again = subprocess.run(_precompute_cli(tmp_path, tiny_model_dir, out), env=env, capture_output=True,
                               text=True)
        assert again.returncode == 0, again.stderr[-3000:]
    m, ids = _manifest_pairs(out)
    assert len(ids) == len(set(ids))
    assert m["rows_read"] == m["rows_written"] + m["rows_rejected"] == 30
    assert set(ids) == set(clean_ids)
    assert {p.stem for p in (out / "shards").iterdir()} == {p.stem for p in (out / "_progress").glob("shard-*.json")}


# --- 8: a full disk during precompute: one line, nothing half-written, the re-run completes ----------

@pytest.mark.slow
def test_full_disk_during_precompute_then_rerun(tmp_path, tiny_model_dir, ray_session, small_disk, capsys):
    """A 40 KiB tmpfs holds the run's identity and the first shards (a few KiB each, a page per
    file), not all five: one `error:` line naming the path, no partial file under a final name; the
    disk grows and the same command finishes with a clean run's pairs."""
    import pipeline

    data = write_rows(tmp_path / "in.jsonl", hh_rows(20))
    disk = small_disk(40 * 1024)
    args = ["precompute", "--data", str(data), "--model", tiny_model_dir, "--output", str(disk / "out"),
            "--rows-per-shard", "4", "--max-length", "512", "--format", "hh", "--progress", "false"]
    capsys.readouterr()
    assert pipeline.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("device: ")]
    assert len(err) == 1 and err[0].startswith("error: cannot write") and "no space left on device" in err[0], err
    for folder in ("shards", "rejects"):  # whatever is there under a final name is whole Parquet
        for f in (disk / "out" / folder).glob("*.parquet"):
            pq.read_table(f)
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    assert pipeline.main(args) == 0
    manifest = json.loads((disk / "out" / "manifest.json").read_text())
    clean = precompute.run(config(tmp_path, tiny_model_dir, data, name="clean", max_length=512))
    assert manifest["rows_read"] == 20 == manifest["rows_written"] + manifest["rows_rejected"]
    assert manifest["pair_ids_fingerprint"] == clean["pair_ids_fingerprint"]
