"""The real SmolLM2-135M-Instruct on real HH-RLHF pairs: exact log-probs and the embedded CLI run."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import HH_SAMPLE, ROOT, read_jsonl_gz
from oracle import exact_logps

from stages import precompute
from stages.core.config.options import PrecomputeConfig
from stages.core.runtime.models import load_model
from stages.core.scoring.truncation import Truncation

pytestmark = pytest.mark.slow


def _rows(out, manifest):
    return pa.concat_tables([pq.read_table(f"{out}/{s['path']}") for s in manifest["shards"]]).to_pylist()


def test_smollm_logps_exact_and_batch_invariant(tmp_path, smollm_path, ray_session):
    rows = [r for r in read_jsonl_gz(HH_SAMPLE, 40) if max(len(r["chosen"]), len(r["rejected"])) < 1200][:5]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(data=str(tmp_path / "in.jsonl"), model=smollm_path, format="hh", max_length=512, progress=False)
    m1 = precompute.run(PrecomputeConfig(output=str(tmp_path / "a"), batch_size=1, num_workers=1, **base))
    m2 = precompute.run(PrecomputeConfig(output=str(tmp_path / "b"), batch_size=5, num_workers=2, **base))
    a, b = _rows(tmp_path / "a", m1), {r["pair_id"]: r for r in _rows(tmp_path / "b", m2)}
    assert len(a) == len(b) == 5
    model = load_model(smollm_path)
    worst_exact = worst_batch = 0.0
    for r in a:
        for ids, ref in (("chosen_ids", "ref_chosen_logps"), ("rejected_ids", "ref_rejected_logps")):
            seq, start = Truncation(512).scored_sequence(r["prompt_ids"], r[ids])
            worst_exact = max(worst_exact, abs(exact_logps(model, seq, start) - r[ref]))
            worst_batch = max(worst_batch, abs(b[r["pair_id"]][ref] - r[ref]))
    assert worst_exact < 1e-3, worst_exact
    assert worst_batch < 1e-3, worst_batch


def test_embedded_default_cli(tmp_path, tokenizer):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "precompute", "--limit", "3",
                           "--output", str(out), "--progress", "false"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rows read 3" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reference_model"]["name"] == "embedded:smollm2-135m-instruct"
    assert manifest["data_source"] == "embedded:hh-rlhf-helpful"
    assert manifest["rows_read"] == manifest["rows_written"] + manifest["rows_rejected"] == 3
    first = pq.read_table(out / manifest["shards"][0]["path"]).to_pylist()[0]
    assert first["ref_chosen_logps"] < 0
    # The HH text went through the chat template: the completion is the last Assistant turn.
    from stages.core.inputs.folders import resolve_source

    answer = read_jsonl_gz(resolve_source("embedded:hh-rlhf-helpful"), 1)[0]["chosen"].rsplit("\n\nAssistant: ", 1)[1]
    assert tokenizer.decode(first["chosen_ids"]) == answer + "<|im_end|>\n"
    assert tokenizer.decode(first["prompt_ids"]).endswith("<|im_start|>assistant\n")
