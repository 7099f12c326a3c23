"""Token ids equal what trl 1.16.0's DPOTrainer produces for the same rows, adapter by adapter.

The oracle is TRL itself: a DPOTrainer is built on the rows and its tokenized train_dataset is
compared, id for id, with ours. Truncation is compared with TRL's DataCollatorForPreference.
"""

from __future__ import annotations

import copy

import pytest
from conftest import DATA, HH_SAMPLE, make_tiny_model, read_jsonl_gz

from stages.core.inputs.files import read_file
from stages.core.inputs.formats import Columns, RowRejected, normalise
from stages.core.inputs.tokenization import tokenize_row
from stages.core.scoring.truncation import Truncation

trl = pytest.importorskip("trl")
CFG = Columns()


def trl_dataset(rows: list[dict], tokenizer, max_length=None, truncation_mode="keep_start"):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model = make_tiny_model(tokenizer, layers=1)
    args = DPOConfig(output_dir="/tmp/trl-parity", report_to=[], max_length=max_length, use_cpu=True,
                     truncation_mode=truncation_mode, dataset_num_proc=None)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return trainer.train_dataset


def assert_same_ids(trl_rows, ours):
    assert len(trl_rows) == len(ours)
    for i, (t, o) in enumerate(zip(trl_rows, ours)):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert list(t[key]) == o[key], f"row {i}: {key} differs from TRL"


def adapted(raw_rows, layout, tokenizer):
    """Our adapter's output (what TRL is fed) and our token ids for it."""
    norm = [normalise(r, layout, CFG) for r in raw_rows]
    return norm, [tokenize_row(tokenizer, r) for r in norm]


def _trl_input(norm_rows):
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in norm_rows]


def test_standard_implicit_hh_text(tokenizer):
    raw = [r for r in read_jsonl_gz(HH_SAMPLE, 60) if r["chosen"] != r["rejected"]]
    ours = [tokenize_row(tokenizer, normalise(r, "standard", CFG)) for r in raw]
    assert_same_ids(trl_dataset(raw, tokenizer), ours)  # TRL extracts the prompt itself


def test_hh_adapter_conversational(tokenizer):
    raw = read_jsonl_gz(HH_SAMPLE, 60)
    kept = []
    for r in raw:
        try:
            normalise(r, "hh", CFG)
            kept.append(r)
        except RowRejected:
            pass
    norm, ours = adapted(kept, "hh", tokenizer)
    assert norm[0]["prompt"][0]["role"] == "user" and norm[0]["chosen"][0]["role"] == "assistant"
    assert_same_ids(trl_dataset(_trl_input(norm), tokenizer), ours)


def test_openai_adapter_conversational_explicit(tokenizer):
    raw = list(read_file(str(DATA / "orca_dpo_pairs_openai_30.jsonl")))
    norm, ours = adapted(raw, "openai", tokenizer)
    assert any(m["role"] == "system" for m in norm[0]["prompt"])
    assert_same_ids(trl_dataset(_trl_input(norm), tokenizer), ours)


def test_sharegpt_adapter(tokenizer):
    raw = list(read_file(str(DATA / "llamafactory_sharegpt_30.json")))
    norm, ours = adapted(raw, "sharegpt", tokenizer)
    assert sum(r["prompt"][0]["role"] == "system" for r in norm) == 8
    assert_same_ids(trl_dataset(_trl_input(norm), tokenizer), ours)


def test_ultrafeedback_adapter(tokenizer):
    raw = []
    for r in read_file(str(DATA / "orca_dpo_pairs_openai_30.jsonl")):
        msgs = r["input"]["messages"]
        raw.append({"prompt": msgs[-1]["content"], "prompt_id": "x", "score_chosen": 8.0, "score_rejected": 3.0,
                    "chosen": msgs + r["preferred_output"], "rejected": msgs + r["non_preferred_output"],
                    "messages": msgs + r["preferred_output"]})
    norm, ours = adapted(raw, "ultrafeedback", tokenizer)
    # TRL reads the binarized layout without the string prompt (trl-lib/ultrafeedback_binarized).
    trl_rows = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in raw]
    assert_same_ids(trl_dataset(trl_rows, tokenizer), ours)


def test_helpsteer3_adapter(tokenizer):
    raw = [
        {"domain": "general", "language": "english", "context": [{"role": "user", "content": "Name a prime number."}],
         "response1": "7 is prime.", "response2": "Nine.", "overall_preference": -2},
        {"domain": "code", "language": "english",
         "context": [{"role": "user", "content": "Say hi in Python."}, {"role": "assistant", "content": "print('hi')"},
                     {"role": "user", "content": "Now in C."}],
         "response1": "puts(\"hi\")", "response2": "#include <stdio.h>\nint main(){puts(\"hi\");}",
         "overall_preference": 3},
    ]
    norm, ours = adapted(raw, "helpsteer3", tokenizer)
    assert norm[0]["chosen"][0]["content"] == "7 is prime." and norm[1]["chosen"][0]["content"].startswith("#include")
    assert_same_ids(trl_dataset(_trl_input(norm), tokenizer), ours)
    with pytest.raises(RowRejected, match="tie"):
        normalise({**raw[0], "overall_preference": 0}, "helpsteer3", CFG)


def test_standard_explicit_strings(tokenizer):
    raw = [{"prompt": r["input"]["messages"][-1]["content"], "chosen": r["preferred_output"][0]["content"],
            "rejected": r["non_preferred_output"][0]["content"]}
           for r in read_file(str(DATA / "orca_dpo_pairs_openai_30.jsonl"))]
    norm, ours = adapted(raw, "standard", tokenizer)
    assert ours[0]["chosen_ids"][-1] == tokenizer.eos_token_id  # EOS on standard completions
    assert_same_ids(trl_dataset(raw, tokenizer), ours)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_matches_trl_collator(tokenizer, mode):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    max_length = 96
    raw = [r for r in read_jsonl_gz(HH_SAMPLE, 80) if r["chosen"] != r["rejected"]]
    trl_rows = trl_dataset(raw, tokenizer, max_length=max_length, truncation_mode=mode)
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length,
                                         truncation_mode=mode)
    kept, rejected = [], 0
    for r in raw:
        try:
            kept.append(Truncation(max_length, mode=mode).cut(tokenize_row(tokenizer, normalise(r, "standard", CFG))))
        except RowRejected as e:
            assert e.reason == "prompt_too_long"
            rejected += 1
    assert len(kept) == len(trl_rows)  # we reject exactly the rows TRL drops
    if mode == "keep_start":
        assert rejected > 0
    for i, (t, o) in enumerate(zip(trl_rows, kept)):
        batch = collator([{k: t[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        for j, key in enumerate(("chosen_ids", "rejected_ids")):
            n = int(batch["attention_mask"][j].sum())
            trl_ids = batch["input_ids"][j, :n].tolist()
            trl_start = int(batch["completion_mask"][j, :n].argmax())
            seq, start = Truncation(max_length, mode=mode).scored_sequence(o["prompt_ids"], o[key])
            assert seq == trl_ids, f"row {i} {key}: sequence differs"
            assert start == trl_start, f"row {i} {key}: completion start differs"
            assert sum(batch["completion_mask"][j, max(start, 1):n]) == n - max(start, 1)
