"""Unpaired preference rows (KTO): normalising, unpairing and token ids against trl 1.16.0's KTOTrainer.

The oracle is TRL itself: a KTOTrainer is built on the rows (tiny random model, no precompute) and its
tokenized train_dataset is compared, id for id, with ours; truncation with DataCollatorForUnpairedPreference,
the KL pairing with the trainer's KL_completion_ids.
"""

from __future__ import annotations

import copy

import pytest
from conftest import DATA, HH_SAMPLE, make_tiny_model, read_jsonl_gz

from stages.core.inputs.files import read_file
from stages.core.inputs.formats import Columns, RowRejected, normalise
from stages.core.inputs.unpaired import (
    is_unpaired,
    normalise_unpaired,
    tokenize_unpaired_row,
    trl_kl_partners,
    unpair,
    unpair_rows,
)
from stages.core.scoring.truncation import Truncation

trl = pytest.importorskip("trl")
CFG = Columns()


@pytest.fixture
def kto_dataset(tokenizer, tmp_path):
    """rows -> KTOTrainer(...).train_dataset: TRL's own extraction, unpairing, tokenization, filter and KL."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    def build(rows, max_length=None, batch_size=2):
        model = make_tiny_model(tokenizer, layers=1)
        args = KTOConfig(output_dir=str(tmp_path / "kto"), report_to=[], max_length=max_length, use_cpu=True,
                         dataset_num_proc=None, per_device_train_batch_size=batch_size,
                         precompute_ref_log_probs=False)
        trainer = KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        return trainer.train_dataset

    return build


def orca_unpaired(conversational: bool) -> list[dict]:
    """Orca pairs as unpaired rows, alternating desirable / undesirable answers."""
    rows = []
    for i, r in enumerate(read_file(str(DATA / "orca_dpo_pairs_openai_30.jsonl"))):
        good = i % 2 == 0
        answer = r["preferred_output"] if good else r["non_preferred_output"]
        if conversational:
            rows.append({"prompt": r["input"]["messages"], "completion": answer, "label": good})
        else:
            rows.append({"prompt": r["input"]["messages"][-1]["content"], "completion": answer[0]["content"],
                         "label": good})
    return rows


def ours(rows, tokenizer):
    return [tokenize_unpaired_row(tokenizer, normalise_unpaired(r, CFG)) for r in rows]


def assert_same_ids(trl_rows, our_ids):
    assert len(trl_rows) == len(our_ids)
    for i, (t, o) in enumerate(zip(trl_rows, our_ids)):
        for key in ("prompt_ids", "completion_ids"):
            assert list(t[key]) == o[key], f"row {i}: {key} differs from TRL"


def assert_kl_pairing(trl_rows, batch_size):
    partners = trl_kl_partners(len(trl_rows), batch_size)
    for i, j in enumerate(partners):
        assert trl_rows[i]["KL_completion_ids"] == trl_rows[j]["completion_ids"], f"row {i}: KL partner is not {j}"


def test_standard_unpaired_matches_kto(tokenizer, kto_dataset):
    rows = orca_unpaired(conversational=False)
    eos = tokenizer.eos_token
    rows += [  # EOS already there; a space before the boundary; tokens that may merge across it
        {"prompt": "The sky is", "completion": " blue." + eos, "label": True},
        {"prompt": "The sky is ", "completion": "green.", "label": False},
        {"prompt": "Say hel", "completion": "lo world", "label": False},
    ]
    trl_rows = kto_dataset(rows, batch_size=4)
    mine = ours(rows, tokenizer)
    assert_same_ids(trl_rows, mine)
    assert all(o["completion_ids"][-1] == tokenizer.eos_token_id for o in mine)  # EOS appended, once
    assert mine[-3]["completion_ids"].count(tokenizer.eos_token_id) == 1
    assert [r["label"] for r in trl_rows] == [r["label"] for r in rows]
    assert_kl_pairing(trl_rows, 4)  # 33 rows: the last block has one row, paired with itself


def test_conversational_unpaired_matches_kto(tokenizer, kto_dataset):
    rows = orca_unpaired(conversational=True)
    rows.append({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": "Name a colour."}],
                 "completion": [{"role": "assistant", "content": "Blue."}], "label": True})
    trl_rows = kto_dataset(rows, batch_size=3)
    mine = ours(rows, tokenizer)
    assert_same_ids(trl_rows, mine)
    first = tokenizer.decode(mine[0]["prompt_ids"])
    assert first.startswith("<|im_start|>system") and first.endswith("<|im_start|>assistant\n")
    assert_kl_pairing(trl_rows, 3)


def test_paired_rows_through_kto(tokenizer, kto_dataset):
    """HH text pairs: TRL extracts the prompt and unpairs; we normalise, unpair_rows and tokenize."""
    raw = []
    for r in read_jsonl_gz(HH_SAMPLE, 50):
        try:
            normalise(r, "standard", CFG)
            raw.append(r)
        except RowRejected:
            pass
    trl_rows = kto_dataset(raw, batch_size=4)
    unpaired = unpair_rows([normalise(r, "standard", CFG) for r in raw])
    mine = [tokenize_unpaired_row(tokenizer, r) for r in unpaired]
    assert_same_ids(trl_rows, mine)
    assert [r["label"] for r in trl_rows] == [True] * len(raw) + [False] * len(raw)
    assert_kl_pairing(trl_rows, 4)


def test_unpair_matches_trl():
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    rows = [{"prompt": f"Q{i}?", "chosen": f" good {i}", "rejected": f" bad {i}", "id": i} for i in range(7)]
    for batch_size in (1000, 3):
        trl_rows = unpair_preference_dataset(Dataset.from_list(rows), batch_size=batch_size).to_list()
        assert unpair_rows(rows, batch_size=batch_size) == trl_rows
    one = unpair_preference_dataset(Dataset.from_list(rows[:1])).to_list()
    assert unpair(rows[0]) == one
    assert one[0] == {"prompt": "Q0?", "completion": " good 0", "label": True, "id": 0}
    conv = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "Go away"}]}
    assert unpair(conv) == unpair_preference_dataset(Dataset.from_list([conv])).to_list()


def test_truncation_matches_kto_collator(tokenizer, kto_dataset):
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    max_length = 96
    raw = [r for r in read_jsonl_gz(HH_SAMPLE, 80) if r["chosen"] != r["rejected"]]
    rows = [unpair(normalise(r, "standard", CFG))[0] for r in raw]  # the chosen answers
    for i, r in enumerate(rows):
        r["label"] = i % 3 != 0
    trl_rows = kto_dataset(rows, max_length=max_length, batch_size=4)
    collator = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    kept, rejected = [], 0
    for r in rows:
        try:
            kept.append(Truncation(max_length).cut_unpaired(tokenize_unpaired_row(tokenizer, r)))
        except RowRejected as e:
            assert e.reason == "prompt_too_long" and f"under max_length {max_length}" in e.detail
            rejected += 1
    assert rejected > 0 and len(kept) == len(trl_rows)  # we reject exactly the rows TRL drops
    assert_kl_pairing(trl_rows, 4)  # positions after the drop
    for i, (t, o) in enumerate(zip(trl_rows, kept)):
        batch = collator([{k: t[k] for k in ("prompt_ids", "completion_ids", "KL_completion_ids", "label")}])
        n = int(batch["attention_mask"][0].sum())
        seq, start = Truncation(max_length).scored_sequence(o["prompt_ids"], o["completion_ids"])
        assert seq == batch["input_ids"][0, :n].tolist(), f"row {i}: sequence differs"
        assert start == int(batch["completion_mask"][0, :n].argmax()), f"row {i}: completion start differs"
        assert o["prompt_ids"] + o["completion_ids"] == seq  # keep_start: what we keep is what is scored


def test_truncate_keep_end_and_max_prompt_length():
    ids = {"prompt_ids": [1, 2, 3, 4], "completion_ids": [5, 6, 7, 8, 9]}
    assert Truncation(6).cut_unpaired(ids) == {"prompt_ids": [1, 2, 3, 4], "completion_ids": [5, 6]}
    assert Truncation(3, mode="keep_end").cut_unpaired(ids) == {"prompt_ids": [1, 2, 3, 4], "completion_ids": [7, 8, 9]}
    assert Truncation(None, 2, "keep_end").cut_unpaired(ids)["prompt_ids"] == [3, 4]
    assert Truncation(None, 2).cut_unpaired(ids)["prompt_ids"] == [1, 2]
    assert Truncation(5, mode="keep_end").scored_sequence([1, 2, 3, 4], [7, 8, 9]) == ([3, 4, 7, 8, 9], 2)
    with pytest.raises(ValueError):
        Truncation(6, mode="keep_middle").cut_unpaired(ids)


def test_kl_partners():
    assert trl_kl_partners(5, 2) == [1, 0, 3, 2, 4]
    assert trl_kl_partners(4, 4) == [3, 0, 1, 2]
    assert trl_kl_partners(0, 3) == []


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (1, True), (0, False),
                                             ("true", True), (" False ", False), ("1", True), ("0", False)])
def test_labels_accepted(value, expected):
    row = normalise_unpaired({"prompt": "Q", "completion": "A", "label": value}, CFG)
    assert row == {"prompt": "Q", "completion": "A", "label": expected}
    assert type(row["label"]) is bool


MSG_PROMPT = [{"role": "user", "content": "Hi"}]
MSG_ANSWER = [{"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize("row, reason, detail", [
    ({"prompt": "Q", "completion": "A", "label": 2}, "bad_label", "label is 2 (int)"),
    ({"prompt": "Q", "completion": "A", "label": "yes"}, "bad_label", "label is 'yes' (str)"),
    ({"prompt": "Q", "completion": "A", "label": 1.0}, "bad_label", "label is 1.0 (float)"),
    ({"prompt": "Q", "completion": "A", "label": [True]}, "bad_label", "label is [True] (list)"),
    ({"prompt": "Q", "completion": "A"}, "missing_field", "no 'label' value"),
    ({"prompt": "Q", "completion": "A", "label": None}, "missing_field", "no 'label' value"),
    ({"prompt": "Q", "label": True}, "missing_field", "no 'completion' value"),
    ({"completion": MSG_PROMPT + MSG_ANSWER, "label": True}, "missing_field", "no 'prompt' value: unpaired rows"),
    ({"prompt": "Q", "completion": "", "label": True}, "empty_completion", "completion is empty or whitespace"),
    ({"prompt": "Q", "completion": "  \n", "label": False}, "empty_completion", "completion is empty or whitespace"),
    ({"prompt": MSG_PROMPT, "completion": [], "label": True}, "empty_completion", "completion is an empty list"),
    ({"prompt": MSG_PROMPT, "completion": [{"role": "assistant", "content": " "}], "label": True},
     "empty_completion", "completion is empty or whitespace"),
    ({"prompt": "", "completion": "A", "label": True}, "empty_prompt", "the prompt is empty"),
    ({"prompt": [], "completion": MSG_ANSWER, "label": True}, "empty_prompt", "prompt is an empty list"),
    ({"prompt": "Q", "completion": MSG_ANSWER, "label": True}, "bad_type", "prompt and completion mix strings"),
    ({"prompt": MSG_PROMPT, "completion": "A", "label": True}, "bad_type", "prompt and completion mix strings"),
    ({"prompt": "Q", "completion": 5, "label": True}, "bad_type", "completion is int"),
    ({"prompt": "Q", "completion": ["a"], "label": True}, "bad_type", "completion is a list but not of messages"),
    ({"prompt": MSG_PROMPT, "completion": [{"role": "assistant"}], "label": True}, "bad_type",
     "completion[0] is not a message"),
    ({"prompt": "Q", "completion": "A", "label": True, "chat_template_kwargs": "x"}, "bad_type",
     "chat_template_kwargs is str"),
    (["Q", "A", True], "bad_type", "row is list"),
])
def test_rejects(row, reason, detail):
    with pytest.raises(RowRejected) as e:
        normalise_unpaired(row, CFG)
    assert e.value.reason == reason
    assert detail in e.value.detail, e.value.detail


def test_rejects_after_tokenization(tokenizer):
    row = normalise_unpaired({"prompt": "word " * 40, "completion": "A", "label": True}, CFG)
    ids = tokenize_unpaired_row(tokenizer, row)
    with pytest.raises(RowRejected) as e:
        Truncation(20).cut_unpaired(ids)
    assert e.value.reason == "prompt_too_long"
    assert e.value.detail == f"prompt is {len(ids['prompt_ids'])} tokens, leaving no room under max_length 20"
    assert Truncation(20, mode="keep_end").cut_unpaired(ids)["completion_ids"] == ids["completion_ids"]
    with pytest.raises(RowRejected, match="empty_completion: a completion tokenizes to no tokens"):
        Truncation(None).cut_unpaired({"prompt_ids": [1], "completion_ids": []})
    with pytest.raises(RowRejected, match="empty_prompt: the prompt tokenizes to no tokens"):
        Truncation(None).cut_unpaired({"prompt_ids": [], "completion_ids": [1]})


def test_custom_columns_and_extras():
    cfg = Columns(prompt="q", completion="a", label="good")
    row = {"q": "Q", "a": "A", "good": 0, "tools": [{"type": "function"}], "other": 1}
    assert normalise_unpaired(row, cfg) == {"prompt": "Q", "completion": "A", "label": False,
                                            "tools": [{"type": "function"}]}
    with pytest.raises(RowRejected, match="no 'good' value"):
        normalise_unpaired({"q": "Q", "a": "A", "label": True}, cfg)
    assert is_unpaired(row, cfg) and not is_unpaired(row)


def test_detection():
    assert is_unpaired({"prompt": "Q", "completion": "A", "label": True})
    assert is_unpaired({"completion": MSG_PROMPT + MSG_ANSWER, "label": False})
    assert not is_unpaired({"prompt": "Q", "chosen": "A", "rejected": "B"})
    assert not is_unpaired({"prompt": "Q", "chosen": "A", "rejected": "B", "completion": "C", "label": True})
    assert not is_unpaired({"prompt": "Q", "completion": "A"})  # SFT prompt-completion, no label
    assert not is_unpaired({"prompt": "Q", "label": True})
    assert not is_unpaired(["Q", "A", True])
    for r in unpair({"prompt": "Q", "chosen": "A", "rejected": "B"}):
        assert is_unpaired(r)


def test_a_duplicate_example_is_called_an_example_not_a_pair():
    import json

    import pyarrow as pa

    from stages.core.refs.duplicates import INPUT, PAIR, PLAN_SCHEMA, mark_duplicates
    from stages.core.refs.plan import pair_id

    def plan_row(index, row, kind=INPUT, held_in=None):
        return {"source_index": index, "pair_id": pair_id(row), "row_json": json.dumps(row), "kind": kind,
                "held_in": held_in}

    example, pair = {"prompt": "Q", "completion": "A", "label": True}, {"prompt": "Q", "chosen": "A", "rejected": "B"}
    other = {"prompt": "R", "completion": "A", "label": False}
    block = pa.Table.from_pylist([plan_row(0, example), plan_row(1, example), plan_row(2, pair), plan_row(3, pair),
                                  plan_row(4, other), plan_row(9, other, PAIR, "shards/shard-00000.parquet")],
                                 schema=PLAN_SCHEMA)
    details = {r["source_index"]: r["reject_detail"] for r in mark_duplicates(block).to_pylist()}
    assert details[1] == "same prompt/completion/label as source_index 0"
    assert details[3] == "same prompt/chosen/rejected as source_index 2"
    assert details[4] == "same prompt/completion/label as an example already in shards/shard-00000.parquet"
