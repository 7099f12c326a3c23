"""Parquet schema of a reference shard: one row per preference pair.

Token ids follow TRL's names and conventions. With keep_start truncation (the default),
prompt_ids + chosen_ids is exactly the scored sequence; with keep_end the collator rule in the
manifest (max_length, truncation_mode) cuts the prompt's start per completion.
"""

import pyarrow as pa


class SchemaError(ValueError):
    """A table or manifest that does not match the contract; the message names the column or key."""


SHARD_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),          # sha256 of the normalised prompt/chosen/rejected
    pa.field("source_index", pa.int64(), nullable=False),      # row number in the input (files in name order)
    pa.field("row_key", pa.string(), nullable=False),          # raw-content hash + copy number: re-runs skip it
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("chosen_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("rejected_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("ref_chosen_logps", pa.float64(), nullable=False),   # sum of log pi_ref over scored chosen tokens
    pa.field("ref_rejected_logps", pa.float64(), nullable=False),
    pa.field("chosen_scored_tokens", pa.int32(), nullable=False),   # how many tokens each sum covers
    pa.field("rejected_scored_tokens", pa.int32(), nullable=False),
])

# An unpaired shard (`kind: "unpaired"` in the manifest; KTO): one row per example, a completion with a
# desirable / undesirable label, and for the KL term the completion of another example of the same shard
# (`kl_completion_ids`) scored after this prompt (`ref_kl_logps`). An example without such a partner (a
# shard of one example, or of identical completions) has empty kl_completion_ids and a null ref_kl_logps.
UNPAIRED_SHARD_SCHEMA = pa.schema([
    pa.field("example_id", pa.string(), nullable=False),      # sha256 of the normalised prompt/completion/label
    pa.field("source_index", pa.int64(), nullable=False),
    pa.field("row_key", pa.string(), nullable=False),
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("completion_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("label", pa.bool_(), nullable=False),               # true: desirable
    pa.field("ref_logps", pa.float64(), nullable=False),         # sum of log pi_ref over scored completion tokens
    pa.field("completion_scored_tokens", pa.int32(), nullable=False),
    pa.field("kl_completion_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("ref_kl_logps", pa.float64()),                      # null: no KL partner
    pa.field("kl_scored_tokens", pa.int32(), nullable=False),
])

# One row per rejected input row: why it was not scored, and the row itself as JSON.
REJECT_SCHEMA = pa.schema([
    pa.field("source_index", pa.int64(), nullable=False),
    pa.field("row_key", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
    pa.field("row", pa.string()),
])


def validate_table(table: pa.Table, schema: pa.Schema = SHARD_SCHEMA, name: str = "shard") -> None:
    """Raise SchemaError naming the first missing or mistyped column."""
    for field in schema:
        if field.name not in table.column_names:
            raise SchemaError(f"{name}: missing column '{field.name}' (has: {', '.join(table.column_names)})")
        actual = table.schema.field(field.name).type
        if not actual.equals(field.type):
            raise SchemaError(f"{name}: column '{field.name}' is {actual}, expected {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"{name}: column '{field.name}' has {table.column(field.name).null_count} nulls")
