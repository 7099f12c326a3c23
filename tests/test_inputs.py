"""Reading every input format, detecting layouts, and every reject reason."""

from __future__ import annotations

import gzip
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA

from stages.core.config.options import PrecomputeConfig
from stages.core.inputs.files import DataError, MalformedRow
from stages.core.inputs.formats import Columns, RowRejected, detect, extract_prompt, normalise
from stages.core.inputs.readers import check_columns, read_rows

CFG = Columns()
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
    # prompts without answers (generate's input, such as the embedded prompts): how to make pairs of them
    with pytest.raises(DataError, match=r"the input has: 'prompt'\. It holds prompts only: .*generate.*judge"):
        check_columns({"prompt": "q"}, "standard", CFG)
    cfg = Columns(prompt="question", chosen="better", rejected="worse")
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
    from stages.core.scoring.truncation import Truncation

    ok = {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 6], "rejected_ids": [7]}
    assert Truncation(5).cut(ok) == {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [7]}
    assert Truncation(2, mode="keep_end").cut(ok)["chosen_ids"] == [5, 6]
    assert Truncation(10, 2, "keep_end").cut(ok)["prompt_ids"] == [2, 3]  # max_prompt_length keeps the prompt's end
    for ids, max_length, reason in (({**ok, "chosen_ids": []}, 10, "empty_completion"),
                                    ({**ok, "prompt_ids": []}, 10, "empty_prompt"),
                                    (ok, 3, "prompt_too_long")):
        with pytest.raises(RowRejected) as e:
            Truncation(max_length).cut(ids)
        assert e.value.reason == reason


def test_the_embedded_data_sets_are_found():
    """The bundled samples (data/ at the repository root) resolve by name, whatever the module layout."""
    from stages.core.inputs.folders import EMBEDDED_DATA

    for name in EMBEDDED_DATA:
        rows = list(read_rows(name, limit=2))
        key = "prompt" if name.endswith("-prompts") else "chosen"  # the prompts for generate have no answers
        assert [i for i, _ in rows] == [0, 1] and all(key in r for _, r in rows), name


def test_a_row_the_chat_template_cannot_render_is_rejected(tokenizer):
    """Content None passes TRL's shape rules but SmolLM2's template cannot render it: a reject, not a crash."""
    from stages.core.inputs.tokenization import tokenize_row

    row = {"prompt": [{"role": "user", "content": None}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(RowRejected, match="chat template cannot render"):
        tokenize_row(tokenizer, row)


# --- the project's own output folders as input --------------------------------------------------

def _pairs_folder(tmp_path):
    """What `judge` writes: pairs.jsonl beside scores.jsonl, rejects.jsonl and manifest.json."""
    from test_online import REWARDS, write_candidates

    from stages import judge
    from stages.core.config.online import JudgeConfig

    write_candidates(tmp_path / "cands", [{"prompt": f"Q{i}:", "responses": [" a", " abc", " ab"]} for i in range(3)]
                     + [{"prompt": [{"role": "user", "content": "Hi?"}], "responses": ["yo", "hello"]}])
    judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), output=str(tmp_path / "pairs"),
                          reward_fn=f"{REWARDS}:chars", progress=False))
    return tmp_path / "pairs"


def test_a_judge_output_folder_reads_as_its_pairs(tmp_path):
    from stages.core.refs.plan import Source
    from stages.precompute import _layout

    pairs = _pairs_folder(tmp_path)
    assert _rows(pairs) == _rows(pairs / "pairs.jsonl") and len(_rows(pairs)) == 4
    assert Source.of(str(pairs), "train", None).files == (str(pairs / "pairs.jsonl"),)
    assert _layout(PrecomputeConfig(data=str(pairs))) == "standard"  # not the manifest's keys as columns


def test_a_generate_output_folder_is_prompts_not_pairs(tmp_path):
    from stages.core.inputs.prompts import read_prompts

    _pairs_folder(tmp_path)
    cands = tmp_path / "cands"
    # generate --prompts: the candidates' prompts, as they were given (messages stay messages)
    got = [(i, p, reject) for i, p, _, reject, _ in read_prompts(str(cands), "auto", "prompt", "train", None, None)]
    assert got == [(0, "Q0:", None), (1, "Q1:", None), (2, "Q2:", None),
                   (3, [{"role": "user", "content": "Hi?"}], None)]
    # precompute --data: no pairs in it yet; the error says how to make them
    with pytest.raises(DataError, match=r"generate's output.*pipeline.py judge --candidates"):
        _rows(cands)


def test_a_precompute_output_folder_is_not_input_data(tmp_path):
    refs = tmp_path / "refs"
    for name in ("shards/shard-00000.parquet", "rejects/shard-00000.parquet"):
        (refs / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(ROWS[:1]), refs / name)
    (refs / "manifest.json").write_text(json.dumps({"kind": "paired", "shards": [], "data_source": "in.jsonl"}))
    with pytest.raises(DataError, match=r"precompute's output.*--refs"):
        _rows(refs)
    (refs / "manifest.json").unlink()  # a run cut off before its manifest: still not data
    (refs / "_progress").mkdir()
    (refs / "_progress" / "run.json").write_text("{}")
    with pytest.raises(DataError, match=r"precompute's output"):
        _rows(refs)


def test_a_data_folder_never_reads_manifests_rejects_or_scores_as_data(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    (tmp_path / "manifest.json").write_text(json.dumps({"note": "about the data"}))
    (tmp_path / "rejects.jsonl").write_text(json.dumps({"reason": "x"}) + "\n")
    (tmp_path / "scores.jsonl").write_text(json.dumps({"score": 1}) + "\n")
    assert _rows(tmp_path) == ROWS[:2]
    # outputs further down: a judge's gives its pairs only; generate's is no data, and the error says so
    pairs = _pairs_folder(tmp_path / "runs")
    with pytest.raises(DataError, match=r"runs/cands is generate's output"):
        _rows(tmp_path)
    shutil.rmtree(tmp_path / "runs" / "cands")
    assert _rows(tmp_path) == ROWS[:2] + _rows(pairs / "pairs.jsonl")
    # only such files: the error says why they were left out
    only = tmp_path / "only"
    only.mkdir()
    (only / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match=r"manifest\.json.*not data"):
        _rows(only)


def test_a_missing_local_path_is_not_taken_for_a_hub_name(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "pairs").mkdir(parents=True)
    # owner/name in form, but runs/ is a folder here: a typo of a local path, not a hub data set
    with pytest.raises(DataError, match=r"input not found: runs/pairz \(in \S*runs: pairs\)"):
        _rows("runs/pairz")
    # a hub name that cannot be fetched: one line naming it
    with pytest.raises(DataError, match=r"someorg/somedata: not a file or folder here, and the Hugging Face hub "
                                        r"did not give it: ConnectionError"):
        _rows("someorg/somedata")
