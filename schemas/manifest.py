"""manifest.json at the output root: what was scored, by which model, with which settings."""

from schemas.shards import SchemaError

FORMAT_VERSION = 1

# key -> expected JSON type(s)
MANIFEST_KEYS = {
    "format_version": int,
    "created_at": str,
    "reference_model": dict,      # {"name", "path", "weights_hash"}
    "tokenizer_hash": str,
    "chat_template_hash": str,
    "data_source": str,
    "pair_ids_fingerprint": str,  # sha256 of the sorted pair ids
    "max_length": (int, type(None)),
    "max_prompt_length": (int, type(None)),
    "truncation_mode": str,
    "dtype": str,
    "rows_read": int,
    "rows_written": int,
    "rows_rejected": int,
    "rejects_by_reason": dict,
    "shards": list,               # [{"path", "rows", "sha256", "source_start", "source_end", "rejects"}]
    "config": dict,
}

SHARD_ENTRY_KEYS = {"path": str, "rows": int, "sha256": str}


def validate_manifest(manifest: dict, name: str = "manifest.json") -> None:
    """Raise SchemaError naming the first missing or mistyped key, or broken row accounting."""
    for key, kind in MANIFEST_KEYS.items():
        if key not in manifest:
            raise SchemaError(f"{name}: missing key '{key}'")
        if not isinstance(manifest[key], kind) or (kind is int and isinstance(manifest[key], bool)):
            raise SchemaError(f"{name}: key '{key}' has type {type(manifest[key]).__name__}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise SchemaError(f"{name}: format_version {manifest['format_version']} is newer than this code ({FORMAT_VERSION})")
    for i, shard in enumerate(manifest["shards"]):
        for key, kind in SHARD_ENTRY_KEYS.items():
            if not isinstance(shard.get(key), kind):
                raise SchemaError(f"{name}: shards[{i}] key '{key}' missing or not {kind.__name__}")
    if manifest["rows_read"] != manifest["rows_written"] + manifest["rows_rejected"]:
        raise SchemaError(f"{name}: rows_read {manifest['rows_read']} != rows_written {manifest['rows_written']} "
                          f"+ rows_rejected {manifest['rows_rejected']}")
    if sum(s["rows"] for s in manifest["shards"]) != manifest["rows_written"]:
        raise SchemaError(f"{name}: shard row counts do not add up to rows_written")
