"""The Ray Data steps of precompute: tokenize rows (tasks) and score pairs (an actor pool).

Both take and return pyarrow tables, so they run the same under `map_batches` and in a plain test.
Rows rejected while tokenizing pass through the scorer untouched, carrying their reason.

A scorer call takes minutes on a real model (`batch_size` pairs, cut into several forwards), so the
scorer also reports its progress after every forward to a `PairProgress` actor that the driver's
progress bar reads; the grouping of pairs into calls and forwards, and so the results, stay as they are.
"""

from __future__ import annotations

import functools
import json

import pyarrow as pa
import torch

from stages.core.inputs.formats import RowRejected
from stages.core.inputs.tokenization import tokenize_row
from stages.core.inputs.unpaired import tokenize_unpaired_row
from stages.core.runtime.devices import pick_device
from stages.core.runtime.models import gpu_memory, load_model, load_tokenizer, resolve_model
from stages.core.scoring import attention as attention_setting
from stages.core.scoring.logprobs import scored_logps, sequence_logps
from stages.core.scoring.packing import (
    FORWARD_OVERHEAD_TOKENS,
    MASK_ELEMENTS,
    pack_rows,
    pad_batch,
    pair_rows,
    plan_flat,
    plan_forwards,
    row_width,
    tokens_per_forward_for,
)
from stages.core.scoring.truncation import Truncation

TOKENIZED_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("row_key", pa.string()), ("source_index", pa.int64()), ("shard", pa.int64()),
    ("prompt_ids", pa.list_(pa.int32())), ("chosen_ids", pa.list_(pa.int32())), ("rejected_ids", pa.list_(pa.int32())),
    ("reject_reason", pa.string()), ("reject_detail", pa.string()), ("row_json", pa.string()),
    # unpaired examples (KTO): the label, and whether the KL completion (as rejected_ids) is another example's
    ("label", pa.bool_()), ("kl", pa.bool_()),
])


@functools.lru_cache(maxsize=4)
def _tokenizer(model_path: str):
    return load_tokenizer(resolve_model(model_path))  # an s3:// policy: fetched into this node's cache


def tokenize_batch(batch: pa.Table, model_path: str, truncation: Truncation) -> pa.Table:
    """Normalised rows (JSON) -> token ids as TRL makes them, truncated; or a reject reason. A row that
    comes with a reject reason (rejected before tokenizing) passes through, its `row_json` kept."""
    tokenizer = _tokenizer(model_path)
    out = {name: [] for name in TOKENIZED_SCHEMA.names}
    empty = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for rec in batch.to_pylist():
        ids, reason, detail, row_json = empty, rec.get("reject_reason"), rec.get("reject_detail"), rec["row_json"]
        label = kl = None
        if reason is None:
            try:
                row = json.loads(row_json)
                if "completion" in row:
                    label, (ids, kl) = row["label"], _unpaired_ids(tokenizer, row)
                else:
                    ids = tokenize_row(tokenizer, row)
                ids = truncation.cut(ids)
                row_json = None
            except RowRejected as e:
                reason, detail = e.reason, e.detail
        for key in ("pair_id", "row_key", "source_index", "shard"):
            out[key].append(rec[key])
        for key, value in ids.items():
            out[key].append(value)
        out["reject_reason"].append(reason)
        out["reject_detail"].append(detail)
        out["row_json"].append(row_json)
        out["label"].append(label if reason is None else None)
        out["kl"].append(kl if reason is None else None)
    return pa.Table.from_pydict(out, schema=TOKENIZED_SCHEMA)


def _unpaired_ids(tokenizer, row: dict) -> tuple[dict[str, list[int]], bool]:
    """An unpaired example as the scorer's pair: its completion as chosen, and as rejected the KL
    completion, which is its partner's completion_ids as the partner tokenizes them, after this prompt
    (TRL's KL_completion_ids). Without a partner (or one that cannot be tokenized) the example's own
    completion stands in, and `kl` is False: the writer keeps no KL value for it."""
    own = tokenize_unpaired_row(tokenizer, row)
    kl_ids = None
    if row.get("kl_completion") is not None:
        try:
            kl_ids = tokenize_unpaired_row(tokenizer, {**row, "prompt": row["kl_prompt"],
                                                       "completion": row["kl_completion"]})["completion_ids"]
        except RowRejected:
            kl_ids = None
    kl = bool(kl_ids)
    return {"prompt_ids": own["prompt_ids"], "chosen_ids": own["completion_ids"],
            "rejected_ids": kl_ids if kl else own["completion_ids"]}, kl


class PairProgress:
    """Pairs done so far, per scorer call (run as a Ray actor; the driver's bar polls `total`).

    Counts are kept per call, keyed by the call's first row key, and only ever raised: a call Ray runs
    again reports under the same key, so no pair is counted twice."""

    def __init__(self):
        self._done: dict[str, int] = {}

    def report(self, batch_key: str, pairs_done: int) -> None:
        self._done[batch_key] = max(pairs_done, self._done.get(batch_key, 0))

    def total(self) -> int:
        return sum(self._done.values())


class ReferenceScorer:
    """Loads the frozen reference model once; each call scores one batch of tokenized pairs.

    `progress`: a `PairProgress` actor handle (or anything with `report.remote(key, pairs_done)`),
    told after every forward how many of the call's pairs are done; None reports nothing.
    `gpus` above 1: the model is spread over that many of the GPUs this process sees (`gpu_memory`);
    batches then go to the GPU of its input embeddings. `model`: score with this model instead of
    loading one from `model_path` (whose tokenizer still gives the padding id)."""

    def __init__(self, model_path: str, dtype: str, truncation: Truncation, threads: int | None = None,
                 tokens_per_forward: int | None = None, pack_prompts: bool = True, progress=None,
                 gpus: int = 1, tokenize: bool = False, device: str = "auto", model=None, attention: str = "auto"):
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)  # "cuda" or "cpu": also what the forward planning is tuned for
        model_path = resolve_model(model_path)  # on this node: an s3:// policy is fetched into its cache
        if model is not None:  # a model loaded by the caller (a trained policy: judge --implicit)
            self.model, self.input_device = model.to(self.device).eval(), self.device
        elif gpus > 1:
            self.model = load_model(model_path, dtype, max_memory=gpu_memory(gpus)).eval()
            self.input_device = str(self.model.get_input_embeddings().weight.device)
        else:
            self.model = load_model(model_path, dtype, self.device).eval()
            self.input_device = self.device
        self.model.requires_grad_(False)
        self.pad_id = _tokenizer(model_path).pad_token_id or 0
        self.truncation = truncation
        # None: sized for the device (CPU: TOKENS_PER_FORWARD; CUDA: the model and the GPU's free memory)
        self.tokens_per_forward = tokens_per_forward or tokens_per_forward_for(self.model, self.device)
        # flex / varlen: pairs end to end in one sequence; dense: a 4D mask per row, which flash-attention
        # models cannot take: on dense they score the two sequences separately.
        self.attention = attention_setting.resolve(attention, self.device, self.model) if pack_prompts else "dense"
        self.pack = attention_setting.packs(self.attention, self.model, pack_prompts)
        self.progress = progress
        # tokenize: this scorer takes untokenized rows and runs tokenize_batch itself (see refs.scoring_run._dataset)
        self.tokenize = tokenize
        self.model_path = model_path

    def _groups(self, widths: list[int], square: bool) -> list[list[int]]:
        """Indices sorted by width, cut into forwards (see `plan_forwards`)."""
        return plan_forwards(widths, self.tokens_per_forward, MASK_ELEMENTS if square else None,
                             FORWARD_OVERHEAD_TOKENS[self.device])

    def score_sequences(self, sequences: list[tuple[list[int], int]], on_forward=None) -> list[float]:
        """Exact summed log-probs of each (input_ids, completion_start), right-padded, grouped by length.
        on_forward(n): called after each forward with the number of sequences it scored."""
        result = [0.0] * len(sequences)
        for group in self._groups([len(s) for s, _ in sequences], square=False):
            ids, mask, comp = pad_batch([sequences[i][0] for i in group], [sequences[i][1] for i in group],
                                        self.pad_id, self.input_device)
            with torch.inference_mode():
                sums = sequence_logps(self.model, ids, mask, comp).tolist()
            for i, s in zip(group, sums):
                result[i] = s
            if on_forward:
                on_forward(len(group))
        return result

    def score_packed(self, rows: list[tuple], n_seqs: int, on_forward=None) -> list[float]:
        """Summed log-probs of sequences 0..n_seqs-1 laid out as `pair_rows` rows, prefixes run once.
        on_forward(n): called after each forward with the number of sequences it scored."""
        if self.attention in attention_setting.FLAT:
            return self._score_flat(rows, n_seqs, on_forward)
        total = torch.zeros(n_seqs, dtype=torch.float64)
        for group in self._groups([row_width(r) for r in rows], square=True):
            inputs, r, c, labels, seq_ids = pack_rows([rows[i] for i in group], self.pad_id, self.model.dtype,
                                                      self.input_device)
            with torch.inference_mode():
                total += scored_logps(self.model, inputs, r, c, labels, seq_ids, n_seqs).cpu()
            if on_forward:  # a row holds one sequence, or two that share the prompt
                on_forward(sum(1 if rows[i][3] == rows[i][4] else 2 for i in group))
        return total.tolist()

    def _score_flat(self, rows: list[tuple], n_seqs: int, on_forward=None) -> list[float]:
        """score_packed on the flex or varlen path: rows end to end, up to tokens_per_forward tokens a forward."""
        total = torch.zeros(n_seqs, dtype=torch.float64)
        for group in plan_flat([row_width(r) for r in rows], self.tokens_per_forward):
            inputs, r, c, labels, seq_ids = attention_setting.pack(self.attention, [rows[i] for i in group],
                                                                   self.pad_id, self.input_device)
            with torch.inference_mode(), attention_setting.attention_in(self.model, self.attention):
                total += scored_logps(self.model, inputs, r, c, labels, seq_ids, n_seqs).cpu()
            if on_forward:
                on_forward(sum(1 if rows[i][3] == rows[i][4] else 2 for i in group))
        return total.tolist()

    def _reporter(self, recs: list[dict], n_rejected: int):
        """on_forward for one call: pairs done = rows rejected while tokenizing + half the sequences
        scored (rounded down: a pair counts once both its answers are)."""
        if self.progress is None or not recs:
            return None
        key, seqs = recs[0]["row_key"], [0]

        def on_forward(n: int) -> None:
            seqs[0] += n
            self.progress.report.remote(key, n_rejected + seqs[0] // 2)
        return on_forward

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.tokenize:
            batch = tokenize_batch(batch, self.model_path, self.truncation)
        recs = batch.to_pylist()
        nan = float("nan")
        chosen, rejected = [nan] * len(recs), [nan] * len(recs)
        n_chosen, n_rejected = [0] * len(recs), [0] * len(recs)
        scored, rows, seqs = [], [], []
        for i, r in enumerate(recs):
            if r["reject_reason"] is not None:
                continue
            c_seq, c_start = self.truncation.scored_sequence(r["prompt_ids"], r["chosen_ids"])
            r_seq, r_start = self.truncation.scored_sequence(r["prompt_ids"], r["rejected_ids"])
            n_chosen[i], n_rejected[i] = len(c_seq) - max(c_start, 1), len(r_seq) - max(r_start, 1)
            if self.pack:
                rows += pair_rows(len(scored), r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], self.truncation)
            else:
                seqs += [(c_seq, c_start), (r_seq, r_start)]
            scored.append(i)
        on_forward = self._reporter(recs, len(recs) - len(scored))
        if on_forward and not scored:  # nothing to score: the whole call is done
            on_forward(0)
        sums = (self.score_packed(rows, 2 * len(scored), on_forward) if self.pack
                else self.score_sequences(seqs, on_forward))
        for j, i in enumerate(scored):
            chosen[i], rejected[i] = sums[2 * j], sums[2 * j + 1]
        return (batch.append_column("ref_chosen_logps", pa.array(chosen, pa.float64()))
                .append_column("ref_rejected_logps", pa.array(rejected, pa.float64()))
                .append_column("chosen_scored_tokens", pa.array(n_chosen, pa.int32()))
                .append_column("rejected_scored_tokens", pa.array(n_rejected, pa.int32())))
