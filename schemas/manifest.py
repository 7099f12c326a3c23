"""manifest.json at the output root: what was scored, by which model, with which settings."""

from schemas.shards import SchemaError

FORMAT_VERSION = 1

# Required keys -> expected JSON type(s). The precompute also writes data_sources (every --data an
# output was grown from), data_path (the resolved input), input_rows_read (input rows: rows_read counts
# examples under --unpair, two per row), tokens and last_run (what the last
# invocation did: seconds, data, pairs_written, rows_rejected, pairs_scored (= pairs_written),
# tokens_scored, new_shards, shards_repaired, rows_already_done).
MANIFEST_KEYS = {
    "format_version": int,
    "created_at": str,
    "reference_model": dict,      # {"name", "path", "weights_hash"}
    "tokenizer_hash": str,
    "chat_template_hash": str,
    "data_source": str,
    "pair_ids_fingerprint": str,  # sum mod 2**256 of sha256(pair_id) over all pairs, 64 hex digits
    "max_length": (int, type(None)),
    "max_prompt_length": (int, type(None)),
    "truncation_mode": str,
    "dtype": str,
    "rows_read": int,
    "rows_written": int,
    "rows_rejected": int,
    "rejects_by_reason": dict,
    "shards": list,               # one entry per shard: SHARD_ENTRY_KEYS below, and more (see below)
    "config": dict,
}

# Required in every shard entry. The precompute also writes, per shard: bytes (the shard file's size),
# source_indices ([first, last] input row, or null), data (the --data it came from), source (that
# --data as an absolute path where local), rows_read, rejects_path, rejects, rejects_sha256,
# rejects_bytes (its size), rejects_by_reason, tokens (prompt counted once per answer), pair_ids_sum
# (sum mod 2**256 of sha256(pair_id) over its pairs, hex), keys_path (its row keys) and finished_at (UTC,
# ISO 8601). Outputs written before bytes, source, rejects_sha256 and rejects_bytes existed lack them;
# readers must not need them.
SHARD_ENTRY_KEYS = {"path": str, "rows": int, "sha256": str}


def output_of_manifest(manifest) -> str | None:
    """Which output a manifest.json's content belongs to: "pairs" (judge), "candidates" (generate),
    "refs" (precompute: kind paired / unpaired, or none in older ones, always its reference model), or None."""
    if not isinstance(manifest, dict):
        return None
    if manifest.get("kind") in ("pairs", "candidates"):
        return manifest["kind"]
    return "refs" if manifest.get("kind") in ("paired", "unpaired") or "reference_model" in manifest else None


def validate_manifest(manifest: dict, name: str = "manifest.json") -> None:
    """Raise SchemaError naming the first missing or mistyped key, or broken row accounting."""
    for key, kind in MANIFEST_KEYS.items():
        if key not in manifest:
            raise SchemaError(f"{name}: missing key '{key}'")
        if not isinstance(manifest[key], kind) or (kind is int and isinstance(manifest[key], bool)):
            raise SchemaError(f"{name}: key '{key}' has type {type(manifest[key]).__name__}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise SchemaError(f"{name}: format_version {manifest['format_version']} is newer than this code "
                          f"({FORMAT_VERSION})")
    for i, shard in enumerate(manifest["shards"]):
        for key, kind in SHARD_ENTRY_KEYS.items():
            if not isinstance(shard.get(key), kind):
                raise SchemaError(f"{name}: shards[{i}] key '{key}' missing or not {kind.__name__}")
    if manifest["rows_read"] != manifest["rows_written"] + manifest["rows_rejected"]:
        raise SchemaError(f"{name}: rows_read {manifest['rows_read']} != rows_written {manifest['rows_written']} "
                          f"+ rows_rejected {manifest['rows_rejected']}")
    if sum(s["rows"] for s in manifest["shards"]) != manifest["rows_written"]:
        raise SchemaError(f"{name}: shard row counts do not add up to rows_written")
