"""generate's output read back: the candidate rows (prompts and their sampled responses) that judge
scores and that generate itself can take again as prompts. Written with `stages.core.online.sampling`'s
CANDIDATE_SCHEMA; read here, below the samplers, so the prompt readers can use it too."""

from __future__ import annotations

from stages.core import storage
from stages.core.inputs.files import DataError
from stages.core.inputs.folders import output_kind

# What other outputs of this project are, when given where generate's output belongs (folders.output_kind).
_NOT_CANDIDATES = {
    "pairs": "{url} is judge's output (preference pairs), not generate's: give it to precompute as --data",
    "refs": "{url} is precompute's output (reference log-probs), not generate's",
    "rounds": "{url} holds iterate's rounds: each round's candidates are in {url}/round-K/candidates",
}


def read_candidates(output: str, storage_options: dict | None = None) -> tuple[dict, list[dict]]:
    """A finished generate output: (manifest, candidate rows in prompt order). Anything else (another
    stage's output, a run cut off before its manifest, a file gone) is a DataError saying which."""
    import pyarrow.parquet as pq

    kind = output_kind(output, storage_options) if storage.exists(output, storage_options) else None
    if kind in _NOT_CANDIDATES:
        raise DataError(_NOT_CANDIDATES[kind].format(url=output))
    url = storage.join(output, "manifest.json")
    if not storage.exists(url, storage_options):
        raise DataError(f"{output}: no manifest.json: not a finished generate output (run pipeline.py generate)")
    try:
        manifest = storage.read_json(url)
        entries = [(e["name"], storage.join(output, e["name"])) for e in manifest["files"]]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{url}: not generate's manifest (no readable list of candidate files)") from None
    rows: list[dict] = []
    for name, file_url in entries:
        if not storage.exists(file_url, storage_options):
            raise DataError(f"{output}: {name}, listed in its manifest, is missing; run generate again (--overwrite)")
        with storage.open_binary(file_url, storage_options) as fh:
            rows += pq.read_table(fh).to_pylist()
    return manifest, rows
