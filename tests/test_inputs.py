"""Reading every input format, detecting layouts, and every reject reason."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA

from stages.core.config import PrecomputeConfig
from stages.core.data import DataError, MalformedRow, check_columns, read_rows
from stages.core.formats import RowRejected, detect, extract_prompt, normalise

CFG = PrecomputeConfig()
ROWS = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]


def _rows(path, **kw):
    return [r for _, r in read_rows(str(path), **kw)]


def test_jsonl_json_parquet_csv_gz_and_folder(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    (tmp_path / "b.json").write_text(json.dumps(ROWS[2:3]))
    pq.write_table(pa.Table.from_pylist(ROWS[3:4]), tmp_path / "c.parquet")
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n\"Q4?\",good 4,bad 4\n")
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "notes.txt").write_text("ignored")
    got = _rows(tmp_path)
    assert got == ROWS[:4] + [ROWS[4], ROWS[0]]  # files in name order, rows in file order
    assert [i for i, _ in read_rows(str(tmp_path), limit=3)] == [0, 1, 2]


def test_json_wrapped_in_object(tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"data": ROWS[:3]}))
    assert _rows(tmp_path / "w.json") == ROWS[:3]


def test_save_to_disk_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert _rows(tmp_path / "ds") == ROWS
    DatasetDict({"train": Dataset.from_list(ROWS[:2]), "test": Dataset.from_list(ROWS[2:])}).save_to_disk(
        str(tmp_path / "dd"))
    assert _rows(tmp_path / "dd", split="test") == ROWS[2:]
    with pytest.raises(DataError, match="no split 'dev'.*train"):
        _rows(tmp_path / "dd", split="dev")


def test_malformed_line_carries_line_number(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps(ROWS[0]) + "\n{not json\n" + json.dumps(ROWS[1]) + "\n")
    got = _rows(tmp_path / "x.jsonl")
    assert got[0] == ROWS[0] and got[2] == ROWS[1]
    assert isinstance(got[1], MalformedRow) and got[1].line == 2


def test_missing_file_lists_what_is_there(tmp_path):
    (tmp_path / "real.jsonl").write_text("")
    with pytest.raises(DataError, match=r"input not found: .*nope\.jsonl.*real\.jsonl"):
        _rows(tmp_path / "nope.jsonl")


def test_missing_column_lists_columns():
    with pytest.raises(DataError, match=r"'chosen'.*the input has: 'question', 'rejected'"):
        check_columns({"question": "q", "rejected": "r"}, "standard", CFG)
    cfg = PrecomputeConfig(chosen_column="better", rejected_column="worse", prompt_column="question")
    row = normalise({"question": "Q?", "better": "yes", "worse": "no"}, "standard", cfg)
    assert row == {"prompt": "Q?", "chosen": "yes", "rejected": "no"}


def test_detect_layouts():
    orca = json.loads((DATA / "orca_dpo_pairs_openai_30.jsonl").read_text().splitlines()[0])
    share = json.loads((DATA / "llamafactory_sharegpt_30.json").read_text())[0]
    assert detect(orca) == "openai"
    assert detect(share) == "sharegpt"
    assert detect({"context": [], "response1": "a", "response2": "b", "overall_preference": 1}) == "helpsteer3"
    assert detect({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "..."}) == "standard"


def test_trl_extract_prompt_rules():
    assert extract_prompt("Sky is blue.", "Sky is green.") == ("Sky is", " blue.", " green.")
    msgs = lambda a: [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]  # noqa: E731
    p, c, r = extract_prompt(msgs("A"), msgs("B"))
    assert p == msgs("A")[:1] and c == [{"role": "assistant", "content": "A"}]


def test_hh_adapter_parses_turns():
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye now.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: No."}
    out = normalise(row, "hh", CFG)
    assert out["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "Bye"}]
    assert out["chosen"] == [{"role": "assistant", "content": "Bye now."}]


@pytest.mark.parametrize("layout,row,reason", [
    ("standard", {"prompt": "q", "rejected": "r"}, "missing_field"),
    ("standard", {"prompt": "q", "chosen": "   ", "rejected": "r"}, "empty_chosen"),
    ("standard", {"prompt": "q", "chosen": "c", "rejected": ""}, "empty_rejected"),
    ("standard", {"prompt": "q", "chosen": 5, "rejected": "r"}, "bad_type"),
    ("standard", {"prompt": "q", "chosen": "same", "rejected": "same"}, "identical_pair"),
    ("standard", {"chosen": "abc", "rejected": "xyz"}, "empty_prompt"),
    ("standard", {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "r"}, "bad_type"),
    ("standard", {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}],
                  "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]},
     "empty_chosen"),
    ("hh", {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "prompt_mismatch"),
    ("hh", {"chosen": "no turns here", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "bad_format"),
    ("helpsteer3", {"context": "q", "response1": "a", "response2": "b", "overall_preference": 0}, "tie"),
    ("openai", {"input": {}, "preferred_output": [], "non_preferred_output": []}, "missing_field"),
    ("sharegpt", {"conversations": [{"from": "alien", "value": "x"}], "chosen": {"from": "gpt", "value": "a"},
                  "rejected": {"from": "gpt", "value": "b"}}, "bad_type"),
])
def test_reject_reasons(layout, row, reason):
    with pytest.raises(RowRejected) as e:
        normalise(row, layout, CFG)
    assert e.value.reason == reason


def test_token_level_rejects():
    from stages.core.tokenization import truncate

    ok = {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 6], "rejected_ids": [7]}
    assert truncate(ok, 5, None, "keep_start") == {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [7]}
    assert truncate(ok, 2, None, "keep_end")["chosen_ids"] == [5, 6]
    assert truncate(ok, 10, 2, "keep_end")["prompt_ids"] == [2, 3]  # max_prompt_length keeps the prompt's end
    for ids, max_length, reason in (({**ok, "chosen_ids": []}, 10, "empty_completion"),
                                    ({**ok, "prompt_ids": []}, 10, "empty_prompt"),
                                    (ok, 3, "prompt_too_long")):
        with pytest.raises(RowRejected) as e:
            truncate(ids, max_length, None, "keep_start")
        assert e.value.reason == reason


def test_the_embedded_data_sets_are_found():
    """The bundled samples (data/ at the repository root) resolve by name, whatever the module layout."""
    from stages.core.data import EMBEDDED_DATA

    for name in EMBEDDED_DATA:
        rows = list(read_rows(name, limit=2))
        key = "prompt" if name.endswith("-prompts") else "chosen"  # the prompts for generate have no answers
        assert [i for i, _ in rows] == [0, 1] and all(key in r for _, r in rows), name


def test_a_row_the_chat_template_cannot_render_is_rejected(tokenizer):
    """Content None passes TRL's shape rules but SmolLM2's template cannot render it: a reject, not a crash."""
    from stages.core.tokenization import tokenize_row

    row = {"prompt": [{"role": "user", "content": None}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(RowRejected, match="chat template cannot render"):
        tokenize_row(tokenizer, row)
