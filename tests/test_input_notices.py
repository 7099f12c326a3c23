"""What the input readers tell the user besides errors: the one notice for raw HH-RLHF transcripts read
under --format auto, and the words used when prompts cannot be found."""

from __future__ import annotations

import json

import pytest

from stages.core.config import PrecomputeConfig
from stages.core.prompts import read_prompts
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
