"""stages/core/refs/manifest.py (the typed manifest.json), refs/identity.py (the same-settings check)
and refs/output.py (the damage check)."""

from __future__ import annotations

import copy
import json
import re

import pytest
from conftest import ROOT

from schemas import SchemaError, validate_manifest
from stages.core.refs.identity import OutputMismatch, check_same
from stages.core.refs.manifest import LastRun, Manifest, ShardEntry
from stages.core.scoring.truncation import Truncation

REAL = json.loads((ROOT / "tests" / "data" / "refs_manifest.json").read_text())  # written by precompute

# Keys an output written before they existed lacks: a manifest, its shard entries and its last run.
OLD_MISSING = ("data_sources", "data_path", "kind", "tokens", "input_rows_read")
OLD_SHARD_MISSING = ("bytes", "source", "rejects_sha256", "rejects_bytes", "pair_ids_sum", "keys_path")


def old_manifest() -> dict:
    old = copy.deepcopy(REAL)
    for key in OLD_MISSING:
        del old[key]
    for shard in old["shards"]:
        for key in OLD_SHARD_MISSING:
            del shard[key]
    del old["last_run"]["rows_already_done"]
    return old


def test_a_real_manifest_round_trips_keys_and_order():
    m = Manifest.from_json(REAL)
    assert m.to_json() == REAL
    assert list(m.to_json()) == list(REAL) and list(m.to_json()["shards"][0]) == list(REAL["shards"][0])
    assert m.truncation == Truncation(256, None, "keep_start") and m.kind == "paired"
    assert isinstance(m.shards[0], ShardEntry) and isinstance(m.last_run, LastRun)
    assert m.reference_model.weights_hash == REAL["reference_model"]["weights_hash"]
    assert m.last_run.pairs_written == REAL["last_run"]["pairs_written"]


def test_an_old_manifest_reads_with_defaults_and_writes_back_what_it_had():
    old = old_manifest()
    m = Manifest.from_json(old)
    assert m.to_json() == old
    assert m.kind == "paired" and m.sources == [REAL["data_source"]] and m.input_rows == REAL["rows_read"]
    assert m.tokens is None and m.shards[0].bytes is None and m.shards[0].pair_ids_sum is None
    assert m.last_run.rows_already_done == 0


def test_unknown_keys_survive_a_round_trip(tmp_path):
    values = {**copy.deepcopy(REAL), "added_later": {"x": 1}}
    values["shards"][0]["checksum_kind"] = "sha256"
    values["reference_model"]["revision"] = "main"
    values["last_run"]["host"] = "node-3"
    url = str(tmp_path / "manifest.json")
    Manifest.from_json(values).write(url)
    assert json.loads((tmp_path / "manifest.json").read_text()) == values
    assert Manifest.read(url).to_json() == values


def test_the_json_view_is_the_file():
    """precompute.run returns the typed manifest; scripts that read it as manifest.json's dict still can."""
    m = Manifest.from_json(REAL)
    assert dict(m) == REAL and m["rows_written"] == REAL["rows_written"] and "kind" in m
    validate_manifest(m)


@pytest.mark.parametrize("change,message", [
    (lambda v: v.pop("tokenizer_hash"), "missing key 'tokenizer_hash'"),
    (lambda v: v.update(rows_written="20"), "key 'rows_written' has type str"),
    (lambda v: v.update(rows_rejected=v["rows_rejected"] + 1), "rows_read 20 != rows_written 20 + rows_rejected 1"),
    (lambda v: v["shards"][1].pop("sha256"), "shards[1] key 'sha256' missing"),
    (lambda v: v.update(format_version=99), "format_version 99 is newer"),
    (lambda v: v.update(truncation_mode="middle"), "key 'truncation_mode'"),
])
def test_validation_names_the_key(change, message):
    values = copy.deepcopy(REAL)
    change(values)
    with pytest.raises(SchemaError, match=re.escape(message)):
        Manifest.from_json(values, "refs/manifest.json")


def test_a_manifest_with_broken_accounting_is_not_written(tmp_path):
    m = Manifest.from_json(REAL).replace(rows_written=REAL["rows_written"] + 1)
    with pytest.raises(SchemaError, match="rows_read"):
        m.write(str(tmp_path / "manifest.json"))
    assert not (tmp_path / "manifest.json").exists()


def test_identity_mismatch_names_each_setting_old_and_new():
    old = {"max_length": 512, "dtype": "float32", "model": "m"}
    check_same("out", "reference log-probs", old, dict(old), "pass --overwrite")
    with pytest.raises(OutputMismatch) as e:
        check_same("out", "reference log-probs", old, {**old, "max_length": 128, "dtype": "bfloat16"},
                   "pass --overwrite")
    assert str(e.value) == ("out holds reference log-probs made with other settings (max_length: 512 -> 128; "
                            "dtype: 'float32' -> 'bfloat16'); pass --overwrite")


def test_identity_checks_only_the_keys_asked():
    check_same("out", "pairs", {"a": 1, "b": 2}, {"a": 1, "b": 3}, "", keys=["a"])
    with pytest.raises(OutputMismatch, match="b: 2 -> 3"):
        check_same("out", "pairs", {"a": 1, "b": 2}, {"a": 1, "b": 3}, "", keys=["b"])


def test_generate_and_judge_outputs_share_the_check(tmp_path):
    from stages.core.online.outputs import finished

    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "candidates", "settings": {"seed": 3, "n": 2}}))
    assert finished(str(tmp_path), {"seed": 3, "n": 2}, False)["settings"]["seed"] == 3
    assert finished(str(tmp_path), {"seed": 4, "n": 2}, True) is None
    with pytest.raises(OutputMismatch, match=r"holds candidates made with other settings \(seed: 3 -> 4\); use"):
        finished(str(tmp_path), {"seed": 4, "n": 2}, False)


def test_damaged_files_names_each_file(tmp_path):
    from stages.core.refs.output import damaged_files

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-00000.parquet").write_bytes(b"abc")
    entry = ShardEntry(path="shards/shard-00000.parquet", rows=1, bytes=4, sha256="0" * 64,
                       rejects_path="rejects/shard-00000.parquet")
    assert damaged_files(str(tmp_path), entry) == ["shards/shard-00000.parquet: 3 bytes, expected 4",
                                                   "rejects/shard-00000.parquet: missing"]


@pytest.mark.slow
def test_a_fresh_precompute_output_round_trips(refs):
    from stages.core.refs.stream import load_refs

    values = json.loads((refs / "manifest.json").read_text())
    loaded = load_refs(str(refs))
    assert loaded.manifest.to_json() == values and loaded.manifest == Manifest.from_json(values)
    assert loaded.num_pairs == 20 and len(loaded.shard_urls()) == len(values["shards"])
