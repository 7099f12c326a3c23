"""pipeline.py as a user meets it: commands, usage errors, --help, Ctrl-C and plain `inspect`. In process
(`pipeline.main`), with no model and no Ray."""

from __future__ import annotations

import json
import re

import pytest

import pipeline

GROUPS_SEEN = {"precompute": ("input", "model", "output", "workers and devices", "storage", "progress"),
               "train": ("input", "model", "output", "training", "loss", "checkpoints", "evaluation",
                         "workers and devices"),
               "generate": ("input", "sampling"), "judge": ("judge",), "iterate": ("rounds", "stage options"),
               "run": ("stage options",)}


def exit_code(argv: list[str]) -> int:
    """pipeline.main's code; argparse's usage errors and --help leave through SystemExit, as it always does."""
    try:
        return pipeline.main(argv)
    except SystemExit as e:
        return e.code


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


# --- commands -------------------------------------------------------------------------------------


@pytest.mark.parametrize("word,hint", [("nightly", "did you mean 'run'"), ("trian", "did you mean 'train'"),
                                       ("frobnicate", None)])
def test_an_unknown_command_is_named_with_the_real_ones(word, hint, capsys):
    assert pipeline.main([word, "--data", "x"]) == 2
    err = one_error_line(capsys)
    assert f"unknown command '{word}'" in err and "commands: precompute, train, eval" in err
    assert (hint in err) if hint else "did you mean" not in err


def test_a_flag_before_the_command_says_the_command_comes_first(capsys):
    assert pipeline.main(["--data", "x", "precompute"]) == 2
    assert "the command comes first" in one_error_line(capsys)


def test_no_command_prints_the_usage_and_exits_0(capsys):
    assert pipeline.main([]) == 0
    assert "commands: precompute, train" in capsys.readouterr().out


# --- usage errors are one line, with a did-you-mean -------------------------------------------------


@pytest.mark.parametrize("argv,expected", [
    (["precompute", "--max-lenght", "5"], "did you mean --max-length?"),
    (["train", "--learning_rate", "1e-5"], "did you mean --learning-rate?"),
    (["inspect", "refs", "--exampels", "3"], "did you mean --examples?"),
    (["submit", "jobs/train.yaml", "--adress", "http://h:8265"], "did you mean --address?"),
    (["train", "--lr", "1e-5"], "unrecognized arguments: --lr 1e-5"),  # no prefix binds to --lr-scheduler
    (["train", "--max", "5"], "unrecognized arguments: --max 5"),
])
def test_a_misspelt_flag_is_one_line_with_the_flag_it_resembles(argv, expected, capsys):
    assert exit_code(argv) == 2
    err = one_error_line(capsys)
    assert f"pipeline.py {argv[0]}: " in err and expected in err
    assert f"pipeline.py {argv[0]} --help" in err


@pytest.mark.parametrize("argv,expected", [
    (["inspect"], "the following arguments are required: refs"),
    (["inspect", "refs", "--examples", "many"], "argument --examples: invalid int value: 'many'"),
    (["inspect", "refs", "--examples", "-1"], "--examples: must be 0 or more, got -1"),
    (["submit"], "the following arguments are required: spec"),
    (["train", "--max-steps"], "argument --max-steps: expected one argument"),
    (["inspect", "refs", "--output", "s3://b/plots"], "--output s3://b/plots: ref_margins.png is drawn here"),
    (["inspect", "refs", "--storage-options", "{no"], "config key 'storage_options': not valid JSON"),
])
def test_other_usage_errors_are_one_line(argv, expected, capsys):
    assert exit_code(argv) == 2
    assert expected in one_error_line(capsys)


# --- --help ----------------------------------------------------------------------------------------


def help_of(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        pipeline.main([command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> dict[str, str]:
    """`--flag` -> its whole help entry (the lines up to the next option or group heading)."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"  (-\S+)", line)
        if m:
            current = m.group(1).rstrip(",")
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", list(pipeline.COMMANDS))
def test_every_help_shows_each_default_exactly_once(command, capsys):
    text = help_of(command, capsys)
    entries = option_entries(text)
    assert len(entries) > 3
    for flag, entry in entries.items():
        if flag in ("-h", "--help"):
            continue
        assert len(re.findall(r"\(default", entry)) == 1, entry
    assert not re.search(r"\[[A-Z_]+\]", text), "a boolean flag shows its dest instead of true|false"


@pytest.mark.parametrize("command", sorted(GROUPS_SEEN))
def test_stage_help_is_grouped(command, capsys):
    text = help_of(command, capsys)
    headings = re.findall(r"^(\S[^:\n]*):$", text, re.MULTILINE)
    for group in GROUPS_SEEN[command]:
        assert group in headings, (group, headings)
    assert len(text.splitlines()[0]) < 100, "the usage line lists every flag"


def test_help_shows_choices_and_boolean_values(capsys):
    entries = option_entries(help_of("train", capsys))
    assert entries["--dtype"].startswith("  --dtype {float32,bfloat16}")
    assert entries["--device"].startswith("  --device {auto,cuda,cpu}")
    assert entries["--strategy"].startswith("  --strategy {ddp,fsdp}")
    assert entries["--resume"].startswith("  --resume [{false,true,auto}]")
    assert entries["--pack-prompts"].startswith("  --pack-prompts [true|false]")
    assert "(default: true)" in entries["--pack-prompts"]
    assert "(default: all 1)" in entries["--loss-weights"]
    entries = option_entries(help_of("precompute", capsys))
    assert entries["--truncation-mode"].startswith("  --truncation-mode {keep_start,keep_end}")
    assert entries["--unpair"].startswith("  --unpair [true|false]")
    assert "(default: 2)" in option_entries(help_of("inspect", capsys))["--examples"]


# --- Ctrl-C ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command,says", [
    ("precompute", "finished shards are kept"),
    ("train", "--resume auto"),
    ("generate", "samples again"),
    ("judge", "judges again"),
    ("iterate", "finished stages are kept"),
    ("run", "same --date"),
    ("eval", "evaluates again"),
    ("sweep", "every beta"),
    ("inspect", "nothing was written"),
    ("submit", "keeps running on the cluster"),
])
def test_ctrl_c_says_what_a_rerun_of_that_command_does(command, says, monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline.COMMANDS, command, interrupted)
    assert pipeline.main([command]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().count("\n") == 0 and says in err
    assert f"pipeline.py {command}" in err
    assert not [c for c in pipeline.COMMANDS if c != command and f"pipeline.py {c}" in err], err
    if command == "precompute":
        assert not re.search(r"\btrain|checkpoint|--resume", err), err
    if command == "train":
        assert "precompute" not in err and "shard" not in err, err


# --- plain inspect checks the files' sizes --------------------------------------------------------


def fake_refs(root) -> str:
    """A precompute output of 3 pairs in one shard, written by the shard writer (no model, no Ray)."""
    from stages.core.refs.writer import fingerprint, write_shard

    rows = [{"source_index": i, "row_key": f"k{i}", "pair_id": f"{i:064x}", "prompt_ids": [1, 2], "chosen_ids": [3],
             "rejected_ids": [4, 5], "ref_chosen_logps": -1.0 - i, "ref_rejected_logps": -2.0,
             "chosen_scored_tokens": 1, "rejected_scored_tokens": 2, "reject_reason": None, "reject_detail": None,
             "row_json": None} for i in range(3)]
    entry = write_shard(str(root), 0, rows, 3, "in.jsonl", "in.jsonl")
    manifest = {"format_version": 1, "created_at": "2026-01-01T00:00:00+00:00",
                "reference_model": {"name": "tiny", "path": str(root / "no-model"), "weights_hash": "0" * 64},
                "tokenizer_hash": "t", "chat_template_hash": "c", "data_source": "in.jsonl",
                "pair_ids_fingerprint": fingerprint([int(entry["pair_ids_sum"], 16)]), "max_length": 64,
                "max_prompt_length": None, "truncation_mode": "keep_start", "dtype": "float32", "rows_read": 3,
                "rows_written": 3, "rows_rejected": 0, "rejects_by_reason": {}, "shards": [entry], "config": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return entry


def test_plain_inspect_of_a_sound_output_exits_0(tmp_path, capsys):
    fake_refs(tmp_path)
    assert pipeline.main(["inspect", str(tmp_path), "--examples", "0"]) == 0
    out = capsys.readouterr()
    assert "rows read 3, written 3" in out.out and "warning" not in out.err


@pytest.mark.parametrize("damage", ["truncated", "grown", "missing", "rejects missing", "rejects truncated"])
def test_plain_inspect_warns_of_a_damaged_file_and_exits_2(damage, tmp_path, capsys):
    entry = fake_refs(tmp_path)
    target = tmp_path / (entry["rejects_path"] if damage.startswith("rejects") else entry["path"])
    data = target.read_bytes()
    if damage.endswith("truncated"):
        target.write_bytes(data[: len(data) // 2])
    elif damage == "grown":
        target.write_bytes(data + b"\0" * 10)
    else:
        target.unlink()
    assert pipeline.main(["inspect", str(tmp_path), "--examples", "0"]) == 2
    captured = capsys.readouterr()
    name = entry["rejects_path"] if damage.startswith("rejects") else entry["path"]
    warning = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and name in warning[0], captured.err
    assert f"pipeline.py inspect {tmp_path} --verify" in captured.err and "Traceback" not in captured.err
    assert "ref_margin" not in captured.out  # no statistics from damaged shards
