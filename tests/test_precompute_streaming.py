"""The streaming precompute (issue 16) against what the driver-side implementation wrote, and its parts."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))

from make_precompute_golden import golden_input, run_scenarios, snapshot  # noqa: E402

from stages import precompute  # noqa: E402
from stages.core.refs import duplicates, plan, sharding  # noqa: E402
from stages.core.refs.writer import fingerprint, pair_ids_sum  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "precompute.json"


def _rejects(snapshot: dict) -> list[tuple]:
    # a malformed line's detail names its file: the golden run's temporary folder is cut off
    return sorted((r["source_index"], r["shard"], r["row_key"], r["reason"], r["detail"].rsplit("/", 1)[-1], r["row"])
                  for r in snapshot["rejects"])


@pytest.fixture(scope="module")
def grown_first(tmp_path_factory, tiny_model_dir, ray_session):
    """The golden `grown` scenario (make_precompute_golden.run_scenarios) up to its second run: the first
    run (a.jsonl alone), then the folder grown to the whole golden input. Each test copies the output and
    makes the second run itself (an output records its --data folder: the folder is shared, unchanged)."""
    tmp = tmp_path_factory.mktemp("golden")
    golden_input(tmp / "grown", first_only=True)
    precompute.run(_grown_config(tmp / "grown", tiny_model_dir, tmp / "out-grown"))
    golden_input(tmp / "grown")
    return tmp


def _grown_config(data: Path, model: str, out: Path):
    from stages.core.config.options import PrecomputeConfig

    return PrecomputeConfig(data=str(data), model=model, output=str(out), rows_per_shard=7, max_length=512,
                            batch_size=4, progress=False)


def _second_grown_run(grown_first: Path, model: str, tmp_path: Path) -> dict:
    """The golden `grown` scenario's second run, into a copy of `grown_first`'s output; its snapshot."""
    out = tmp_path / "out-grown"
    shutil.copytree(grown_first / "out-grown", out)
    return snapshot(out, precompute.run(_grown_config(grown_first / "grown", model, out)))


@pytest.mark.slow
def test_same_pairs_values_rejects_and_shards_as_the_driver_side_stage(grown_first, tiny_model_dir, ray_session,
                                                                       tmp_path, monkeypatch):
    from stages.core.inputs import readers

    read, yielded = readers.read_file, []

    def counted(url, options=None):
        for row in read(url, options):
            yielded.append(url)
            yield row

    monkeypatch.setattr(readers, "read_file", counted)  # this process only: Ray's workers read the real way
    want = json.loads(GOLDEN.read_text())
    got = run_scenarios(tiny_model_dir, ("whole",))
    got["grown"] = _second_grown_run(grown_first, tiny_model_dir, tmp_path)
    assert len(yielded) == 2  # the driver read one row per run (two runs here), for the layout; tasks the rest
    for scenario in ("whole", "grown"):
        w, g = want[scenario], got[scenario]
        assert g["shards"] == w["shards"] and g["last_run"] == w["last_run"], scenario
        assert {k: v for k, v in g["manifest"].items() if k != "pair_ids_fingerprint"} == \
            {k: v for k, v in w["manifest"].items() if k != "pair_ids_fingerprint"}
        assert _rejects(g) == _rejects(w)
        pairs = {p["pair_id"]: p for p in g["pairs"]}
        assert len(pairs) == len(w["pairs"]) == 32
        for p in w["pairs"]:
            q = pairs[p["pair_id"]]
            assert {k: v for k, v in q.items() if "logps" not in k} == {k: v for k, v in p.items() if "logps" not in k}
            assert abs(q["ref_chosen_logps"] - p["ref_chosen_logps"]) < 1e-4
            assert abs(q["ref_rejected_logps"] - p["ref_rejected_logps"]) < 1e-4
        ids = [p["pair_id"] for p in w["pairs"]]
        assert g["manifest"]["pair_ids_fingerprint"] == fingerprint([pair_ids_sum(ids)])


@pytest.mark.slow
def test_tokenize_tasks_and_shuffles_give_the_same_shards(grown_first, tiny_model_dir, ray_session, tmp_path,
                                                          monkeypatch):
    """On CPU the scorers tokenize their own batches; with GPUs, tokenize tasks run apart from them. Also
    the plan through Ray Data's hash shuffles, in 2 partitions (a set this small is planned in one task).
    Both on the golden `grown` scenario's second run, the one with rows the output already holds (every
    step of the shuffles; a fresh output's plan only lacks those rows); its first run is `grown_first`."""
    from stages.core.refs import scoring_run

    monkeypatch.setattr(scoring_run, "_tokenize_apart", lambda use_gpu: True)
    monkeypatch.setattr(plan, "PARTITION_ROWS", 25)
    want = json.loads(GOLDEN.read_text())["grown"]  # a run, then one over the grown input with known keys
    got = _second_grown_run(grown_first, tiny_model_dir, tmp_path)
    assert got["shards"] == want["shards"] and _rejects(got) == _rejects(want)
    ids = {p["pair_id"]: (p["chosen_ids"], p["rejected_ids"]) for p in got["pairs"]}
    assert ids == {p["pair_id"]: (p["chosen_ids"], p["rejected_ids"]) for p in want["pairs"]}


def _plan_rows(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{f: r.get(f) for f in duplicates.PLAN_SCHEMA.names} for r in rows],
                                schema=duplicates.PLAN_SCHEMA)


def test_copies_are_numbered_in_input_order_and_known_keys_are_done():
    block = _plan_rows([
        {"source_index": 7, "h": "a", "pair_id": "p", "kind": duplicates.INPUT},
        {"source_index": 2, "h": "a", "pair_id": "p", "kind": duplicates.INPUT},
        {"source_index": 5, "h": "b", "pair_id": "q", "kind": duplicates.INPUT},
        {"source_index": 9, "h": "a", "pair_id": "p", "kind": duplicates.INPUT},
        {"h": "a", "n": 0, "kind": duplicates.KNOWN},           # the output holds a:0 (source_index 2)
        {"h": "a", "n": 2, "kind": duplicates.REDO, "shard": 4},  # a:2 belongs to shard 4, being scored again
    ])
    out = {r["source_index"]: r for r in duplicates.number_copies(block).to_pylist()}
    assert {i: out[i]["row_key"] for i in out} == {2: "a:0", 7: "a:1", 9: "a:2", 5: "b:0"}
    assert {i: out[i]["kind"] for i in out} == {2: duplicates.DONE, 7: duplicates.INPUT, 9: duplicates.INPUT,
                                                5: duplicates.INPUT}
    assert {i: out[i]["shard"] for i in out} == {2: None, 7: None, 9: 4, 5: None}


def test_duplicates_keep_the_lowest_source_index_or_the_output_copy():
    block = _plan_rows([
        {"source_index": 8, "pair_id": "p", "kind": duplicates.INPUT},
        {"source_index": 3, "pair_id": "p", "kind": duplicates.INPUT},
        {"source_index": 4, "pair_id": "q", "kind": duplicates.INPUT},
        {"source_index": 1, "pair_id": "r", "kind": duplicates.INPUT},
        {"pair_id": "r", "kind": duplicates.PAIR, "held_in": "shards/shard-00002.parquet"},
    ])
    out = {r["source_index"]: (r["reject_reason"], r["reject_detail"])
           for r in duplicates.mark_duplicates(block).to_pylist()}
    assert out == {3: (None, None), 4: (None, None),
                   8: ("duplicate", "same prompt/chosen/rejected as source_index 3"),
                   1: ("duplicate", "same prompt/chosen/rejected as a pair already in shards/shard-00002.parquet")}


def test_new_rows_fill_shards_in_order_across_blocks_and_repaired_rows_keep_theirs():
    blocks = [_plan_rows([{"source_index": i, "row_key": f"k{i}", "raw": "{}", "row_json": "{}",
                           "shard": 1 if i == 4 else None} for i in range(lo, hi)]) for lo, hi in ((0, 5), (5, 9))]
    counts = [sharding.block_counts(b) for b in blocks]
    assert counts == [(5, 4, {1: 1}), (4, 4, {})]
    first, per_shard = 10, 3
    shards = [r["shard"] for r in sharding.assign(blocks[0], 0, first, per_shard, 100).to_pylist()]
    parts = sharding.assign(blocks[1], 4, first, per_shard, 2)  # cut into chunks of 2 rows
    assert [len(p) for p in parts] == [2, 2]
    shards += [r["shard"] for p in parts for r in p.to_pylist()]
    assert shards == [10, 10, 10, 11, 1, 11, 11, 12, 12]
    assert sharding.shard_rows(8, first, per_shard, {1: 1}) == {1: 1, 10: 3, 11: 3, 12: 2}


@pytest.mark.parametrize("text", [b"", b"\n\n", b'{"a": 1}\n \n{"b": 2}', b'\xef\xbb\xbf{"a":1}\r\n{bad\n\n[1]\n'])
def test_the_count_pass_counts_what_the_reader_yields(tmp_path, text):
    import gzip

    from stages.core.inputs.files import read_file

    for name, data in (("x.jsonl", text), ("x.jsonl.gz", gzip.compress(text)), ("cut.jsonl.gz",
                                                                               gzip.compress(text * 50)[:-9])):
        path = tmp_path / name
        path.write_bytes(data)
        assert plan.count_jsonl(str(path), None) == sum(1 for _ in read_file(str(path)))


@pytest.mark.slow
def test_a_task_error_is_one_line(tmp_path, tiny_model_dir, ray_session, capsys):
    import pipeline

    # A file that fails whole (a .json array cut short) fails the run in its count task: one line naming it.
    golden_input(tmp_path / "in")
    (tmp_path / "in" / "d.json").write_text('[{"chosen": "a", "rejected": "b"}, {"cho')
    capsys.readouterr()
    args = ["precompute", "--data", str(tmp_path / "in"), "--model", tiny_model_dir, "--output",
            str(tmp_path / "out2"), "--progress", "false", "--format", "standard"]  # no note on HH-looking text
    assert pipeline.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("device: ")]
    assert len(err) == 1 and "d.json: not valid JSON" in err[0], err


@pytest.mark.slow
def test_a_save_to_disk_folder_is_read_in_row_ranges(tmp_path, tiny_model_dir, ray_session, monkeypatch):
    from datasets import Dataset, DatasetDict
    from test_precompute import read_shards, write_dirty_input

    from stages.core.config.options import PrecomputeConfig
    from stages.core.inputs.formats import Columns, RowRejected, normalise

    write_dirty_input(tmp_path / "in.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "in.jsonl").read_text().splitlines() if line.startswith('{"')]
    rows = [r for r in rows if isinstance(r.get("chosen"), str) and "prompt" not in r]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    monkeypatch.setattr(plan, "DATASET_ROWS", 7)  # several ranges: the row order must hold across them
    cfg = PrecomputeConfig(data=str(tmp_path / "dd"), model=tiny_model_dir, output=str(tmp_path / "out"),
                           rows_per_shard=5, max_length=512, progress=False, limit=len(rows) - 1)
    m = precompute.run(cfg)
    assert m["rows_read"] == len(rows) - 1
    got = sorted((r["source_index"], r["pair_id"]) for r in read_shards(tmp_path / "out", m))
    want = []
    for i, r in enumerate(rows[:-1]):
        try:
            want.append((i, plan.pair_id(normalise(r, "standard", Columns.of(cfg)))))
        except RowRejected:
            pass
    assert got == [w for w in want if w[0] in dict(got)] and len(got) >= 20
