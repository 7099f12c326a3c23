"""Writes tests/golden/precompute.json: what the precompute stage of commit 18e113a (the driver-side
implementation, before issue 16) wrote for `golden_input`. Run once with that implementation:

    .venv/bin/python tests/golden/make_precompute_golden.py

tests/test_precompute_streaming.py runs today's stage on the same input and compares.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))


def golden_input(folder: Path, first_only: bool = False) -> None:
    """a.jsonl (the dirty 30-row input of test_precompute), then b.jsonl.gz and c.parquet with raw copies,
    same pairs written differently, a repeated malformed line, new rows and rows too long to keep."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import HH_SAMPLE, read_jsonl_gz
    from test_precompute import write_dirty_input

    folder.mkdir(parents=True, exist_ok=True)
    write_dirty_input(folder / "a.jsonl")
    if first_only:
        return
    a_lines = (folder / "a.jsonl").read_text().splitlines()
    more = [r for r in read_jsonl_gz(HH_SAMPLE, 300) if r["chosen"] != r["rejected"]
            and max(len(r["chosen"]), len(r["rejected"])) < 1500][40:48]
    row2 = json.loads(a_lines[2])
    b = [a_lines[1],                                       # the same raw row again: copy 1, a duplicate pair
         json.dumps({"rejected": row2["rejected"], "chosen": row2["chosen"], "note": "x"}),  # same pair, other row
         *[json.dumps(r) for r in more[:5]],
         "{this is not json",                              # the same malformed line again
         json.dumps({"chosen": "\n\nHuman: " + "long " * 600 + "\n\nAssistant: a",
                     "rejected": "\n\nHuman: " + "long " * 600 + "\n\nAssistant: b"}),
         "",                                               # a blank line: not a row
         a_lines[1]]                                       # copy 2
    with gzip.open(folder / "b.jsonl.gz", "wt") as fh:
        fh.write("\n".join(b) + "\n")
    c = [json.loads(a_lines[4]), *more[5:8], more[5]]
    pq.write_table(pa.Table.from_pylist([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in c]),
                   folder / "c.parquet")


def snapshot(out: Path, manifest: dict) -> dict:
    import pyarrow.parquet as pq

    shards, rejects = [], []
    for s in manifest["shards"]:
        for r in pq.read_table(out / s["path"]).to_pylist():
            shards.append({"shard": s["path"], **{k: r[k] for k in ("pair_id", "source_index", "row_key", "prompt_ids",
                                                                     "chosen_ids", "rejected_ids", "ref_chosen_logps",
                                                                     "ref_rejected_logps")}})
        for r in pq.read_table(out / s["rejects_path"]).to_pylist():
            rejects.append({"shard": s["rejects_path"], **r})
    keys = ("rows_read", "rows_written", "rows_rejected", "rejects_by_reason", "tokens", "pair_ids_fingerprint")
    return {"manifest": {k: manifest[k] for k in keys},
            "shards": [{k: s[k] for k in ("path", "rows", "rows_read", "rejects", "source_indices")}
                       for s in manifest["shards"]],
            "last_run": {k: manifest["last_run"][k] for k in ("pairs_written", "rows_rejected", "rows_already_done",
                                                              "new_shards")},
            "pairs": shards, "rejects": rejects}


def run_scenarios(model: str, scenarios: tuple[str, ...] = ("whole", "grown")) -> dict:
    from stages import precompute
    from stages.core.config.options import PrecomputeConfig

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "whole" in scenarios:
            golden_input(tmp / "whole")
            cfg = PrecomputeConfig(data=str(tmp / "whole"), model=model, output=str(tmp / "out-whole"),
                                   rows_per_shard=7, max_length=512, batch_size=4, progress=False)
            result["whole"] = snapshot(tmp / "out-whole", precompute.run(cfg))
        if "grown" not in scenarios:
            return result
        golden_input(tmp / "grown", first_only=True)
        cfg = PrecomputeConfig(data=str(tmp / "grown"), model=model, output=str(tmp / "out-grown"), rows_per_shard=7,
                               max_length=512, batch_size=4, progress=False)
        precompute.run(cfg)
        golden_input(tmp / "grown")
        result["grown"] = snapshot(tmp / "out-grown", precompute.run(cfg))
    return result


def tiny_model(folder: Path) -> str:
    from conftest import make_tiny_model

    from stages.core.runtime.models import embedded_model_path, load_tokenizer

    tokenizer = load_tokenizer(str(embedded_model_path()))
    make_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


if __name__ == "__main__":
    import ray

    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as model_dir:
        golden = run_scenarios(tiny_model(Path(model_dir)))
    (HERE / "precompute.json").write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print({k: v["manifest"] for k, v in golden.items()})
