"""Contracts between the stages. Imports only pyarrow (and the standard library)."""

from schemas.manifest import FORMAT_VERSION, MANIFEST_KEYS, validate_manifest
from schemas.shards import REJECT_SCHEMA, SHARD_SCHEMA, UNPAIRED_SHARD_SCHEMA, SchemaError, validate_table

__all__ = ["SHARD_SCHEMA", "UNPAIRED_SHARD_SCHEMA", "REJECT_SCHEMA", "SchemaError", "validate_table",
           "FORMAT_VERSION", "MANIFEST_KEYS", "validate_manifest"]
