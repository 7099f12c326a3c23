"""What the input readers tell the user besides errors: the one notice for raw HH-RLHF transcripts read
under --format auto, and the words used when prompts cannot be found."""

from __future__ import annotations

import json

import pytest

from stages.core.config.options import PrecomputeConfig
from stages.core.inputs.prompts import read_prompts
from stages.precompute import _layout

HH_ROWS = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: a good answer {i}",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: a bad answer {i}"} for i in range(3)]
PLAIN_ROWS = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _notices(err: str) -> list[str]:
    return [line for line in err.splitlines() if "--format hh" in line]


@pytest.mark.parametrize("fmt, rows, expected", [
    ("auto", HH_ROWS, 1),      # read as TRL reads it: said once, with the way to the turns
    ("hh", HH_ROWS, 0),        # the user chose the turns
    ("auto", PLAIN_ROWS, 0),   # nothing to say about other data
])
def test_precompute_names_format_hh_once_for_raw_hh_text_under_auto(tmp_path, capsys, fmt, rows, expected):
    data = _write(tmp_path / "in.jsonl", rows)
    layout = _layout(PrecomputeConfig(data=data, format=fmt))
    assert layout == ("standard" if fmt == "auto" else "hh")  # TRL's reading stays the default
    captured = capsys.readouterr()
    assert len(_notices(captured.err)) == expected and not _notices(captured.out)
    if expected:
        assert "implicit prompt" in captured.err


@pytest.mark.parametrize("fmt, rows, expected", [("auto", HH_ROWS, 1), ("hh", HH_ROWS, 0), ("auto", PLAIN_ROWS, 0)])
def test_generate_prompts_name_format_hh_once_for_raw_hh_text_under_auto(tmp_path, capsys, fmt, rows, expected):
    data = _write(tmp_path / "in.jsonl", rows)
    prompts = [p for _, p, _, _, _ in read_prompts(data, fmt, "prompt", "train", None, None)]
    assert len(prompts) == 3
    assert len(_notices(capsys.readouterr().err)) == expected


def test_the_embedded_hh_data_needs_no_notice(capsys):
    # read as turns under auto already (data.EMBEDDED_DATA): nothing to tell
    assert _layout(PrecomputeConfig(data="embedded:hh-rlhf-helpful", limit=2)) == "hh"
    assert not _notices(capsys.readouterr().err)


# --- generate's words when its prompts cannot be used ----------------------------------------------

def test_rows_without_the_prompt_column_name_it_and_the_columns_found(tmp_path):
    data = _write(tmp_path / "q.jsonl", [{"question": "Why?", "id": 1}])
    (_, prompt, _, reject, _), = read_prompts(data, "auto", "prompt", "train", None, None)
    assert prompt is None and reject.reason == "missing_field"
    assert reject.detail.startswith("no 'prompt' column") and "'question', 'id'" in reject.detail
    # a pair still gives its prompt (TRL's implicit prompt), and so does a --prompt-column that is there
    (_, prompt, _, reject, _), = read_prompts(data, "auto", "question", "train", None, None)
    assert prompt == "Why?" and reject is None


@pytest.fixture
def generate_cfg(tmp_path, tiny_model_dir):
    from stages.core.config.online import GenerateConfig

    def make(rows, **over):
        data = _write(tmp_path / "prompts.jsonl", rows)
        return GenerateConfig(**{"prompts": data, "model": tiny_model_dir, "output": str(tmp_path / "out"),
                                 "progress": False, **over})
    return make


def test_generate_says_what_is_wrong_with_its_prompts_before_touching_its_output(tmp_path, generate_cfg):
    from test_online import write_candidates

    from stages import generate
    from stages.core.config.engine import ConfigError

    with pytest.raises(ConfigError, match=r"none of its 2 rows holds a usable prompt.*no 'prompt' column.*'question'"):
        generate.run(generate_cfg([{"question": "Why?"}, {"question": "How?"}]))
    assert not (tmp_path / "out").exists()  # nothing made for a run that cannot start
    with pytest.raises(ConfigError, match=r"holds no rows"):
        generate.run(generate_cfg([]))
    with pytest.raises(ConfigError, match=r"--limit 0 reads no prompts"):
        generate.run(generate_cfg([{"prompt": "Hi"}], limit=0))
    # --overwrite of an earlier output with prompts that cannot be used: the earlier output is kept
    write_candidates(tmp_path / "out", [{"prompt": "P", "responses": ["a", "b"]}])
    with pytest.raises(ConfigError, match="usable prompt"):
        generate.run(generate_cfg([{"question": "Why?"}], overwrite=True))
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"candidates-00000.parquet", "manifest.json"}
