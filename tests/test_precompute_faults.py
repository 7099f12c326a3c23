"""Precompute under faults: runs that write nothing, a second data set, damaged outputs, a killed
scorer process, and the noise a successful run must not print.

A stage run costs seconds of start-up whatever its size: one real CLI run (`cli_run`) is what several
tests read (its output, stdout and stderr) or copy and damage, and the clean run others compare with."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from conftest import HH_SAMPLE, ROOT, read_jsonl_gz

from stages import inspect_refs, precompute
from stages.core.config.options import PrecomputeConfig
from stages.core.errors import PipelineError
from stages.core.refs.manifest import Manifest
from stages.core.refs.writer import shard_name


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


def _precompute_cli(data: Path, model: str, out: Path, *more: str) -> list[str]:
    return cli("precompute", "--data", str(data), "--model", model, "--output", str(out), "--format", "hh",
               "--rows-per-shard", "3", "--batch-size", "1", "--max-length", "160", *more)


CLI_ROWS = 31


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_model_dir):
    """A real `pipeline.py precompute` with its progress bar (its own Ray: RAY_ADDRESS=""), over 30 HH
    rows and a copy of one (a duplicate, in shard 1): 11 shards of 3 rows, one pair per scorer call, at
    max_length 160 (some prompts are too long: token-level rejects, which pass through the scorer).
    Tests read it or copy it; none writes into it."""
    tmp = tmp_path_factory.mktemp("cli-run")
    rows = hh_rows(30)
    rows.insert(5, rows[1])
    data = write_rows(tmp / "in.jsonl", rows)
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_AUTH_MODE", None)
    res = subprocess.run(_precompute_cli(data, tiny_model_dir, tmp / "out"), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return SimpleNamespace(data=data, out=tmp / "out", res=res,
                           manifest=json.loads((tmp / "out" / "manifest.json").read_text()))


def cli_config(tmp_path: Path, model: str, data: Path, name: str = "out", **kw) -> PrecomputeConfig:
    """`cli_run`'s settings, as a config."""
    return config(tmp_path, model, data, name, rows_per_shard=3, max_length=160, **kw)


def copy_of(cli_run, tmp_path: Path) -> Path:
    shutil.copytree(cli_run.out, tmp_path / "out")
    return tmp_path / "out"


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
def test_summary_counts_pairs_written_not_rows_through_the_scorer(cli_run):
    # At max_length 160 some HH prompts are too long: token-level rejects pass through the scorer.
    m = cli_run.manifest
    written, rejected = m["rows_written"], m["rows_rejected"]
    assert m["rejects_by_reason"].get("prompt_too_long", 0) > 0
    assert written > 0 and rejected > 0 and written + rejected == CLI_ROWS
    assert (m["last_run"]["pairs_written"], m["last_run"]["rows_rejected"]) == (written, rejected)
    said = f"{written} pairs written, {rejected} rejected this run"
    assert said in precompute.summary(Manifest.from_json(m), "out") and said in cli_run.res.stdout


@pytest.mark.slow
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
def test_other_data_is_refused_unless_append(cli_run, tmp_path, tiny_model_dir, ray_session, monkeypatch):
    a, first = cli_run.data, cli_run.manifest
    copy_of(cli_run, tmp_path)
    # three pairs short enough for max_length 160, none of them in a
    b = write_rows(tmp_path / "b.jsonl", [r for r in hh_rows(200, skip=30) if len(r["chosen"]) < 400][:3])
    with pytest.raises(precompute.OutputMismatch, match=r"in\.jsonl.*b\.jsonl.*--append"):
        precompute.run(cli_config(tmp_path, tiny_model_dir, b))
    # the same source named another way (a relative path) is the same source
    monkeypatch.chdir(a.parent)
    again = precompute.run(cli_config(tmp_path, tiny_model_dir, Path(a.name)))
    assert again["last_run"]["rows_already_done"] == CLI_ROWS and again["rows_written"] == first["rows_written"]
    both = precompute.run(cli_config(tmp_path, tiny_model_dir, b, append=True))
    assert both["rows_written"] == first["rows_written"] + 3 and both["last_run"]["pairs_written"] == 3
    assert both["data_sources"] == sorted([str(a), str(b)])


# --- 6: damaged outputs are repaired, and inspect --verify finds them ------------------------------

@pytest.mark.slow
def test_missing_and_damaged_shards_are_rescored_into_the_same_shards(cli_run, tmp_path, tiny_model_dir, ray_session,
                                                                       capsys):
    """A copy of `cli_run`'s 11 shards with five of them damaged, all repaired by one re-run: a missing
    shard file (1), a damaged one (2), a damaged rejects file (3), and two shards of older outputs that
    lost their shard files: 0 with its row keys in its marker (as an output of 18e113a has them), 9 with
    a marker without row keys and no keys file (written before markers held them)."""
    cfg = cli_config(tmp_path, tiny_model_dir, cli_run.data)
    out = copy_of(cli_run, tmp_path)
    first = cli_run.manifest
    n = len(first["shards"])
    assert n == 11 and first["rejects_by_reason"]["duplicate"] == 1  # in shard 1
    before = pairs_by_shard(out, first)
    keys_before = sorted(reject_keys(out, first))

    (out / "shards" / "shard-00001.parquet").unlink()
    damaged = out / "shards" / "shard-00002.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-40] + b"\0" * 40)
    rejects = out / "rejects" / "shard-00003.parquet"
    rejects.write_bytes(rejects.read_bytes()[:100])
    # Shard 0's keys in its marker: they move to a keys file before its marker goes, and its rows go back
    # into it.
    marker = out / "_progress" / "shard-00000.json"
    keys_file = out / "_progress" / "shard-00000.keys.parquet"
    old_keys = pq.read_table(keys_file).column("row_key").to_pylist()
    keys_file.unlink()
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "row_keys": old_keys}))
    (out / "shards" / "shard-00000.parquet").unlink()
    # Shard 9 leaves no keys behind: its rows are new work and go into a new shard after the last (11);
    # still every row once.
    lost = shard_name(9)
    (out / "_progress" / f"{lost}.keys.parquet").unlink()
    lost_marker = out / "_progress" / f"{lost}.json"
    lost_marker.write_text(json.dumps({k: v for k, v in json.loads(lost_marker.read_text()).items()
                                       if k != "row_keys"}))
    (out / "shards" / f"{lost}.parquet").unlink()
    capsys.readouterr()

    listing = sorted(p for p in out.rglob("*"))
    assert inspect_refs.main([str(out), "--verify"]) != 0
    text = capsys.readouterr().out
    for bad in ("shards/shard-00000.parquet", "shards/shard-00001.parquet", "shards/shard-00002.parquet",
                "rejects/shard-00003.parquet", f"shards/{lost}.parquet"):
        assert bad in text
    for k in (*range(4, 9), 10):
        assert shard_name(k) not in text
    assert sorted(p for p in out.rglob("*")) == listing  # --verify writes nothing

    again = precompute.run(cfg)
    err = capsys.readouterr().err
    repaired = [line for line in err.splitlines() if "repair" in line]
    assert len(repaired) == 5 and all(shard_name(k) in line for k, line in zip((0, 1, 2, 3, 9), repaired))
    assert pq.read_table(keys_file).column("row_key").to_pylist() == old_keys
    moved = pairs_by_shard(out, again)
    assert list(moved) == [f"shards/{shard_name(k)}.parquet" for k in (*range(9), 10, 11)]
    assert moved["shards/shard-00011.parquet"] == before[f"shards/{lost}.parquet"]
    # every other shard the same, with the same pairs (shards 0-3 scored again into themselves)
    assert {p: ids for p, ids in moved.items() if p != "shards/shard-00011.parquet"} == \
        {p: ids for p, ids in before.items() if p != f"shards/{lost}.parquet"}
    assert sorted(reject_keys(out, again)) == keys_before
    assert again["last_run"]["pairs_written"] == sum(len(before[f"shards/{shard_name(k)}.parquet"])
                                                     for k in (0, 1, 2, 3, 9))
    assert again["last_run"]["rows_already_done"] == sum(s["rows_read"] for k, s in enumerate(first["shards"])
                                                         if k not in (0, 1, 2, 3, 9))
    assert again["rows_read"] == again["rows_written"] + again["rows_rejected"] == CLI_ROWS
    assert again["pair_ids_fingerprint"] == first["pair_ids_fingerprint"]
    assert inspect_refs.main([str(out), "--verify"]) == 0
    assert "OK" in capsys.readouterr().out


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
def test_successful_cli_run_prints_only_the_bar(cli_run):
    res = cli_run.res
    # Cut out the bar's own frames only: a log line may follow one on the same line (no newline between).
    rest = re.sub(r"reference log-probs:[^\]\r\n]*\]", "", res.stderr)
    # and the console channel's one `device:` line (which device scores, and why): nothing else is said
    lines = [line for line in re.split(r"[\r\n]", rest) if line.strip() and not line.startswith("device: ")]
    assert not lines, "\n".join(lines)
    frames = re.findall(rf"\| (\d+)/{CLI_ROWS} \[", res.stderr)
    assert str(CLI_ROWS) in frames and "0" in frames
    assert "pairs written" in res.stdout


# --- the fault to inject: a scorer actor killed mid-run --------------------------------------------

def _scorer_pids() -> set[int]:
    """Ray workers running the ReferenceScorer actor among the descendants of this process (the
    session's Ray: its raylet is a child of this process, its workers are the raylet's)."""
    import psutil

    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "ReferenceScorer" in " ".join(p.cmdline()):
                found.add(p.pid)
        except psutil.Error:
            pass
    return found


def _manifest_pairs(out: Path) -> tuple[dict, list[str]]:
    m = json.loads((out / "manifest.json").read_text())
    return m, [p for ids in pairs_by_shard(out, m).values() for p in ids]


@pytest.mark.slow
def test_killed_scorer_actor_loses_and_repeats_nothing(cli_run, tmp_path, tiny_model_dir, ray_session, capsys):
    """`cli_run`'s command again, without its bar, in this process (pipeline.main, on the session's Ray);
    its scorer process killed with SIGKILL once a shard is finished."""
    import pipeline

    _, clean_ids = _manifest_pairs(cli_run.out)
    out = tmp_path / "killed"
    args = _precompute_cli(cli_run.data, tiny_model_dir, out, "--progress", "false")[2:]
    others = _scorer_pids()  # an earlier run's scorer, still going down: not this run's
    ended, killed = threading.Event(), {}

    def kill_the_scorer():
        deadline = time.time() + 300
        while not ended.is_set() and time.time() < deadline:
            pids = _scorer_pids() - others
            if pids and len(list((out / "_progress").glob("shard-*.json"))) >= 1:
                killed["mid_run"] = not (out / "manifest.json").exists()
                os.kill(min(pids), signal.SIGKILL)
                killed["pid"] = min(pids)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_scorer, daemon=True)
    killer.start()
    capsys.readouterr()
    try:
        code = pipeline.main(args)
    finally:
        ended.set()
        killer.join()
    err = capsys.readouterr().err
    assert killed.get("pid"), "no scorer process found before the run ended"
    assert killed["mid_run"]  # it died mid-run
    if code == 0:  # the run noticed, and scored the unfinished shards with a new scorer
        assert "a scorer process died" in err, err[-3000:]
    else:  # allowed: a clean one-line failure, after which a re-run completes
        assert code == 2 and err.strip().splitlines()[-1].startswith("error: "), err[-3000:]
        assert pipeline.main(args) == 0
    m, ids = _manifest_pairs(out)
    assert len(ids) == len(set(ids))
    assert m["rows_read"] == m["rows_written"] + m["rows_rejected"] == CLI_ROWS
    assert set(ids) == set(clean_ids)
    assert {p.stem for p in (out / "shards").iterdir()} == {p.stem for p in (out / "_progress").glob("shard-*.json")}


# --- 8: a full disk during precompute: one line, nothing half-written, the re-run completes ----------

@pytest.mark.slow
def test_full_disk_during_precompute_then_rerun(cli_run, tiny_model_dir, ray_session, small_disk, capsys):
    """A 40 KiB tmpfs holds the run's identity and the first shards (a few KiB each, a page per
    file), not all eleven: one `error:` line naming the path, no partial file under a final name; the
    disk grows and the same command finishes with a clean run's (`cli_run`'s) pairs."""
    import pipeline

    disk = small_disk(40 * 1024)
    args = ["precompute", "--data", str(cli_run.data), "--model", tiny_model_dir, "--output", str(disk / "out"),
            "--rows-per-shard", "3", "--max-length", "160", "--format", "hh", "--progress", "false"]
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
    assert manifest["rows_read"] == CLI_ROWS == manifest["rows_written"] + manifest["rows_rejected"]
    assert manifest["pair_ids_fingerprint"] == cli_run.manifest["pair_ids_fingerprint"]
