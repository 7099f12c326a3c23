"""Unpaired (KTO) examples through the precompute: prompt, completion, label; each example's KL
completion is another example's, fixed at precompute time, so the reference pass is done once and does
not depend on batch size or workers (TRL pairs them inside each training batch)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import HH_SAMPLE, read_jsonl_gz
from oracle import exact_logps

from schemas import UNPAIRED_SHARD_SCHEMA
from stages import precompute
from stages.core.config.engine import ConfigError
from stages.core.config.options import PrecomputeConfig
from stages.core.refs.plan import kl_partners
from stages.precompute import OutputMismatch


def examples(n: int) -> list[dict]:
    """HH conversations cut into prompt (up to the last assistant turn) and completion; a third undesirable."""
    out = []
    for i, r in enumerate(r for r in read_jsonl_gz(HH_SAMPLE, 200) if len(r["chosen"]) < 600):
        cut = r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        out.append({"prompt": r["chosen"][:cut], "completion": r["chosen"][cut:], "label": i % 3 != 0})
    return out[:n]


def run(tmp_path, rows, name, **kw):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PrecomputeConfig(data=str(data), model=kw.pop("model"), output=str(tmp_path / kw.pop("out", name)),
                           rows_per_shard=5, max_length=256, progress=False, **kw)
    return precompute.run(cfg), cfg.output


def shard_rows(out, manifest):
    rows = []
    for s in manifest["shards"]:
        table = pq.read_table(f"{out}/{s['path']}")
        assert table.schema.equals(UNPAIRED_SHARD_SCHEMA, check_metadata=False)
        rows += [(s["path"], r) for r in table.to_pylist()]
    return rows


@pytest.mark.slow
def test_unpaired_shards_hold_the_oracles_values_and_a_fixed_kl_pairing(tmp_path, tiny_model_dir, ray_session):
    import torch
    from transformers import AutoModelForCausalLM

    rows = examples(12)
    rows[7]["label"] = "maybe"  # a bad label: a reject with its reason
    manifest, out = run(tmp_path, rows, "a", model=tiny_model_dir)
    assert manifest["kind"] == "unpaired" and manifest["kl_pairing"]["seed"] == 0
    assert manifest["rows_written"] == 11 and manifest["rejects_by_reason"] == {"bad_label": 1}
    got = shard_rows(out, manifest)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    by_shard: dict[str, list[dict]] = {}
    for path, r in got:
        by_shard.setdefault(path, []).append(r)
        assert r["label"] is (rows[r["source_index"]]["label"] is True)
        seq = r["prompt_ids"] + r["completion_ids"]
        assert r["ref_logps"] == pytest.approx(exact_logps(model, seq, len(r["prompt_ids"])), abs=1e-4)
        assert r["ref_kl_logps"] == pytest.approx(
            exact_logps(model, r["prompt_ids"] + r["kl_completion_ids"], len(r["prompt_ids"])), abs=1e-4)
    for members in by_shard.values():  # the KL completion is another example's completion, of the same shard
        completions = [m["completion_ids"] for m in members]
        for m in members:
            assert m["kl_completion_ids"] in completions and m["kl_completion_ids"] != m["completion_ids"]

    # The same values and pairing whatever the batch size and the number of scorers.
    again, out2 = run(tmp_path, rows, "a", out="b", model=tiny_model_dir, batch_size=3, num_workers=2)
    other = shard_rows(out2, again)
    assert len(other) == len(got) and all(_close(x, y) for (_, x), (_, y) in zip(other, got))

    # Grown input: only the new examples are scored, into new shards; finished shards stay as they were.
    grown, _ = run(tmp_path, rows + examples(16)[12:], "a", out="a", model=tiny_model_dir)
    assert grown["last_run"]["pairs_written"] == 4 and grown["last_run"]["rows_already_done"] == 12
    assert [s["sha256"] for s in grown["shards"][:3]] == [s["sha256"] for s in manifest["shards"]]

    from stages.core.refs.stream import load_refs

    assert load_refs(out).kind == "unpaired"

    # One output holds one kind: pairs into it are refused, naming both.
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "No."} for r in rows[:3]]
    with pytest.raises(OutputMismatch, match="holds unpaired data and .* is paired"):
        run(tmp_path, pairs, "p", out="a", model=tiny_model_dir, append=True)


def _close(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(
        x[k] == pytest.approx(y[k], abs=1e-6) if isinstance(x[k], float) else x[k] == y[k] for k in x)


def test_kl_partners_never_the_example_or_its_completion():
    completions = ["a", "b", "a", "c", "d", "e"]
    partners = kl_partners(completions, seed=0, shard=3)
    assert partners == kl_partners(completions, seed=0, shard=3)  # deterministic
    assert partners != kl_partners(completions, seed=1, shard=3)
    for i, p in enumerate(partners):
        assert p is not None and p != i and completions[p] != completions[i]
    assert kl_partners(["x"], 0, 0) == [None] and kl_partners(["x", "x"], 0, 0) == [None, None]
    assert sorted(kl_partners(list("abcdefg"), 5, 1)) == list(range(7))  # each completion used once


@pytest.mark.slow
def test_unpair_turns_each_pair_into_two_examples(tmp_path, tiny_model_dir, ray_session):
    from stages.core.inputs.formats import Columns, normalise
    from stages.core.inputs.unpaired import tokenize_unpaired_row, unpair
    from stages.core.runtime.models import load_tokenizer

    pairs = [r for r in read_jsonl_gz(HH_SAMPLE, 60) if r["chosen"] != r["rejected"] and len(r["chosen"]) < 600][:5]
    same = "\n\nHuman: Hi\n\nAssistant: Hello"
    pairs.append({"chosen": same, "rejected": same})  # not a usable pair: one reject
    manifest, out = run(tmp_path, pairs, "pairs", model=tiny_model_dir, unpair=True, format="hh")
    assert manifest["kind"] == "unpaired" and manifest["rows_read"] == 11 and manifest["rows_written"] == 10
    assert manifest["rejects_by_reason"] == {"identical_pair": 1}
    # rows_read counts examples and rows rejected whole (= written + rejected); the input had 6 rows
    assert manifest["input_rows_read"] == 6
    text = precompute.summary(manifest, out)
    assert "rows read 6 (--unpair: 10 examples, 1 row rejected whole), written 10, rejected 1" in text
    assert "10 examples written" in text and "pairs written" not in text and "pairs/s" not in text
    got = [r for _, r in shard_rows(out, manifest)]
    assert [(r["source_index"], r["label"]) for r in got] == [(i, i % 2 == 0) for i in range(10)]
    tok = load_tokenizer(tiny_model_dir)
    for i, pair in enumerate(pairs[:5]):
        for half, example in enumerate(unpair(normalise(pair, "hh", Columns()))):
            ids = tokenize_unpaired_row(tok, example)
            assert got[2 * i + half]["completion_ids"] == ids["completion_ids"]
    again, _ = run(tmp_path, pairs, "pairs", model=tiny_model_dir, unpair=True, format="hh")
    assert again["last_run"]["pairs_written"] == 0 and again["last_run"]["rows_already_done"] == 11
    assert again["input_rows_read"] == 6  # the output's count, not the run's

    with pytest.raises(ConfigError, match="--unpair turns pairs into unpaired examples, and .* is already unpaired"):
        run(tmp_path, examples(3), "u", model=tiny_model_dir, unpair=True)
