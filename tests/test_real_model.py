"""The real SmolLM2-135M-Instruct on real HH-RLHF pairs: the embedded default run and exact log-probs.

One run of the command's defaults (`cli_default`) serves both tests: a run of the real model costs
its scorers' start-up and model load, whatever the number of rows."""

from __future__ import annotations

import contextlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, read_jsonl_gz
from oracle import exact_logps

from stages import precompute
from stages.core.config.options import PrecomputeConfig
from stages.core.runtime.models import load_model
from stages.core.scoring.truncation import Truncation

pytestmark = pytest.mark.slow


def _rows(out, manifest):
    return pa.concat_tables([pq.read_table(f"{out}/{s['path']}") for s in manifest["shards"]]).to_pylist()


@pytest.fixture(scope="module")
def cli_default(tmp_path_factory, ray_session):
    """`pipeline.py precompute --limit 3` with every other setting its default (the embedded model and
    data, 64 pairs per scorer call: the three rows in one padded call, one scorer), from the repository
    root, run in this process (pipeline.main: its arguments, exit code and stdout)."""
    import pipeline

    out = tmp_path_factory.mktemp("real") / "demo"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.chdir(ROOT)
        code = pipeline.main(["precompute", "--limit", "3", "--output", str(out), "--progress", "false"])
    return code, stdout.getvalue(), out


def test_embedded_default_cli(cli_default, tokenizer):
    code, stdout, out = cli_default
    assert code == 0
    assert "rows read 3" in stdout
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


def test_smollm_logps_exact_and_batch_invariant(cli_default, tmp_path, smollm_path, ray_session):
    """`cli_default`'s pairs (3 in one padded call, one scorer) against the same rows one pair per call
    with two scorers, and each log-prob against the oracle (one unpadded forward)."""
    _, _, out = cli_default
    m1 = json.loads((out / "manifest.json").read_text())
    m2 = precompute.run(PrecomputeConfig(output=str(tmp_path / "b"), limit=3, batch_size=1, num_workers=2,
                                         progress=False))
    a, b = _rows(out, m1), {r["pair_id"]: r for r in _rows(tmp_path / "b", m2)}
    assert len(a) == len(b) == 3
    model = load_model(smollm_path)
    truncation = Truncation(m1["max_length"], m1["max_prompt_length"], m1["truncation_mode"])
    worst_exact = worst_batch = 0.0
    for r in a:
        for ids, ref in (("chosen_ids", "ref_chosen_logps"), ("rejected_ids", "ref_rejected_logps")):
            seq, start = truncation.scored_sequence(r["prompt_ids"], r[ids])
            worst_exact = max(worst_exact, abs(exact_logps(model, seq, start) - r[ref]))
            worst_batch = max(worst_batch, abs(b[r["pair_id"]][ref] - r[ref]))
    assert worst_exact < 1e-3, worst_exact
    assert worst_batch < 1e-3, worst_batch
