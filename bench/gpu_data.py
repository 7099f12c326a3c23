#!/usr/bin/env python
"""Token-id files for bench/gpu.py, made on a machine with the project installed (the GPU machine has no
datasets, Ray or hub access, so the bench reads ids, not text):

    .venv/bin/python bench/gpu_data.py   # -> bench/data/gpu/{hh,orca,sharegpt}.jsonl.gz + tokenizer/

Rows are tokenized exactly as precompute tokenizes them (the format adapters, then `tokenize_row`:
TRL's chat template and prompt/completion split) with SmolLM2's tokenizer, untruncated; rows the
adapters reject are left out. Sources and licences: ../shared/data/SOURCES.md, copied beside the files.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "data" / "gpu"
# name -> (file under ../shared/data, format, rows kept): HH short pairs; Orca and ShareGPT the long ones.
SETS = {"hh": ("hh_rlhf_helpful_base_test.jsonl.gz", "hh", 1100),
        "orca": ("orca_dpo_pairs_validation284.jsonl", "openai", 284),
        "sharegpt": ("llamafactory_dpo_en_demo300.json", "sharegpt", 300)}


def main() -> None:
    from stages.core.inputs.formats import Columns, RowRejected, normalise
    from stages.core.inputs.readers import read_rows
    from stages.core.inputs.tokenization import tokenize_row
    from stages.core.runtime.models import embedded_model_path, load_tokenizer

    tokenizer = load_tokenizer(str(embedded_model_path()))
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(OUT / "tokenizer")
    for name, (file, layout, keep) in SETS.items():
        lines, skipped = [], 0
        for _, raw in read_rows(str(SHARED / file)):
            try:
                ids = tokenize_row(tokenizer, normalise(raw, layout, Columns()))
            except RowRejected:
                skipped += 1
                continue
            lines.append(json.dumps({k: ids[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}))
            if len(lines) == keep:
                break
        with gzip.open(OUT / f"{name}.jsonl.gz", "wt") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"{name}: {len(lines)} pairs ({skipped} rejected by the adapter) from {file}")
    for extra in ("SOURCES.md", "LICENSE-hh-rlhf", "LICENSE-orca-dpo-pairs.md", "LICENSE-llamafactory"):
        shutil.copy(SHARED / extra, OUT / extra)


if __name__ == "__main__":
    main()
