"""Contracts between the stages. Imports only pyarrow (and the standard library)."""

from schemas.shards import SHARD_SCHEMA, REJECT_SCHEMA, SchemaError, validate_table
from schemas.manifest import FORMAT_VERSION, MANIFEST_KEYS, validate_manifest

__all__ = ["SHARD_SCHEMA", "REJECT_SCHEMA", "SchemaError", "validate_table", "FORMAT_VERSION", "MANIFEST_KEYS",
           "validate_manifest"]
