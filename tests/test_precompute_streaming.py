"""The streaming precompute (issue 16) against what the driver-side implementation wrote, and its parts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))

from make_precompute_golden import run_scenarios  # noqa: E402

from stages.core import row_plan  # noqa: E402
from stages.core.shard_writer import fingerprint, pair_ids_sum  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "precompute.json"


def _rejects(snapshot: dict) -> list[tuple]:
    # a malformed line's detail names its file: the golden run's temporary folder is cut off
    return sorted((r["source_index"], r["shard"], r["row_key"], r["reason"], r["detail"].rsplit("/", 1)[-1], r["row"])
                  for r in snapshot["rejects"])


@pytest.mark.slow
def test_same_pairs_values_rejects_and_shards_as_the_driver_side_stage(tiny_model_dir, ray_session):
    want = json.loads(GOLDEN.read_text())
    got = run_scenarios(tiny_model_dir)
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
