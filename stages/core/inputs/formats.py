"""Preference layouts -> TRL's rows: {"prompt", "chosen", "rejected"} as strings or message lists.

Each adapter maps one raw row to a normalised row or raises RowRejected with a reason. What comes
out is what trl 1.16's DPOTrainer accepts, so its prompt rules (`extract_prompt`) and tokenization
apply unchanged afterwards.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from stages.core import console


class RowRejected(Exception):
    """A row that cannot be used; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Columns:
    """Which input columns hold the prompt, the answers and the label (the `*_column` settings)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"  # unpaired rows (KTO)
    label: str = "label"

    @classmethod
    def of(cls, cfg: Any) -> Columns:
        """From a stage config's prompt_column, chosen_column, ... (a setting it lacks keeps its default)."""
        return cls(**{f: getattr(cfg, f"{f}_column", d) for f, d in vars(cls()).items()})


DEFAULT_COLUMNS = Columns()


def is_messages(value: Any) -> bool:
    """TRL's test for conversational data: a list whose first item is a dict with 'role'."""
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def _check_messages(name: str, value: Any) -> None:
    # What passes here goes through the chat template inside a Ray task, where an odd value would stop
    # the whole run rather than reject one row.
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowRejected("bad_type", f"{name}[{i}] is not a message with 'role' and 'content'")
        if not isinstance(m["role"], str):
            raise RowRejected("bad_type", f"{name}[{i}].role is {type(m['role']).__name__}")
        content = m["content"]
        if content is not None and not isinstance(content, (str, list)):
            raise RowRejected("bad_type", f"{name}[{i}].content is {type(content).__name__}")
        if isinstance(content, list) and not all(isinstance(part, dict) for part in content):
            raise RowRejected("bad_type", f"{name}[{i}].content is a list but not of content parts (objects)")


# apply_chat_template arguments the tokenizer sets itself: repeating them in a row is a TypeError.
_TEMPLATE_ARGS = {"conversation", "tools", "tokenize", "return_dict", "add_generation_prompt"}


def check_template_inputs(out: dict) -> None:
    """`tools` (a list of tool objects, or JSON text of one) and `chat_template_kwargs` (an object)."""
    tools = out.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError):
            raise RowRejected("bad_type", "tools is a string but not JSON") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RowRejected("bad_type", "tools is not a list of tool definitions (objects)")
    kwargs = out.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise RowRejected("bad_type", f"chat_template_kwargs is {type(kwargs).__name__}, expected an object")
    if kwargs and _TEMPLATE_ARGS & set(kwargs):
        raise RowRejected("bad_type", f"chat_template_kwargs sets {sorted(_TEMPLATE_ARGS & set(kwargs))}, "
                                      "which the tokenizer sets itself")


def is_blank(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip() == ""
    if isinstance(value, list):
        return all(not isinstance(m.get("content"), str) or m["content"].strip() == "" for m in value)
    return True


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """trl.data_utils.extract_prompt, rule for rule.

    The prompt is the longest common prefix of chosen and rejected (characters for strings, whole
    messages for conversations); a space just before the divergence goes to the completions. As in
    TRL, when one side is a prefix of the other the loop ends on its last index.
    """
    n = min(len(chosen), len(rejected))
    if n == 0:
        raise RowRejected("empty_prompt", "chosen or rejected is empty, no prompt to extract")
    idx = 0
    for idx in range(n):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def standard(row: dict, columns: Columns) -> dict:
    """TRL's own rows: explicit or implicit prompt, strings or messages (UltraFeedback included)."""
    out = {}
    for key, col in (("prompt", columns.prompt), ("chosen", columns.chosen), ("rejected", columns.rejected)):
        if col in row and row[col] is not None:
            out[key] = row[col]
    for key in ("chosen", "rejected"):
        if key not in out:
            col = getattr(columns, key)
            raise RowRejected("missing_field", f"no '{col}' value")
    for key in ("tools", "chat_template_kwargs"):
        if row.get(key) is not None:
            out[key] = row[key]
    chosen_conv = is_messages(out["chosen"])
    # trl.maybe_extract_prompt: keep an explicit prompt only when it has the completions' kind.
    if "prompt" in out and is_messages(out["prompt"]) != chosen_conv:
        del out["prompt"]
    return out


def ultrafeedback(row: dict, columns: Columns) -> dict:
    """UltraFeedback-binarized: `prompt` (str) + full conversations in `chosen` / `rejected`.

    The string prompt is dropped and the shared turns of the two conversations become the prompt,
    exactly what TRL does with this layout.
    """
    out = standard(row, columns)
    out.pop("prompt", None)
    return out


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "observation": "tool", "function_call": "assistant", "tool": "tool"}


def _sharegpt_message(name: str, turn: Any) -> dict:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise RowRejected("bad_type", f"{name} is not a {{'from', 'value'}} turn")
    role = _SHAREGPT_ROLES.get(str(turn["from"]).lower())
    if role is None:
        raise RowRejected("bad_type", f"{name} has unknown speaker {turn['from']!r}")
    return {"role": role, "content": turn["value"]}


def sharegpt(row: dict, columns: Columns) -> dict:
    """ShareGPT / LLaMA-Factory: `conversations` [{from, value}], `chosen` / `rejected` turns, optional `system`."""
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise RowRejected("missing_field", "no 'conversations' list")
    prompt = [_sharegpt_message(f"conversations[{i}]", t) for i, t in enumerate(conv)]
    if isinstance(row.get("system"), str) and row["system"].strip() and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": row["system"]})
    out = {"prompt": prompt}
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise RowRejected("missing_field", f"no '{key}' turn")
        turns = row[key] if isinstance(row[key], list) else [row[key]]
        out[key] = [_sharegpt_message(f"{key}[{i}]", t) for i, t in enumerate(turns)]
    if row.get("tools"):
        out["tools"] = row["tools"]
    return out


def openai(row: dict, columns: Columns) -> dict:
    """OpenAI preference fine-tuning: `input.messages`, `preferred_output`, `non_preferred_output`."""
    inp = row.get("input")
    if not isinstance(inp, dict) or "messages" not in inp:
        raise RowRejected("missing_field", "no 'input.messages'")
    out = {"prompt": inp["messages"]}
    for key, col in (("chosen", "preferred_output"), ("rejected", "non_preferred_output")):
        if row.get(col) is None:
            raise RowRejected("missing_field", f"no '{col}'")
        out[key] = row[col]
    if inp.get("tools"):
        out["tools"] = inp["tools"]
    return out


def helpsteer3(row: dict, columns: Columns) -> dict:
    """HelpSteer3 preference: `context` messages, `response1`, `response2`, `overall_preference`.

    overall_preference < 0 prefers response1, > 0 response2; 0 is a tie and is rejected.
    """
    for col in ("context", "response1", "response2", "overall_preference"):
        if row.get(col) is None:
            raise RowRejected("missing_field", f"no '{col}'")
    pref = row["overall_preference"]
    if isinstance(pref, bool) or not isinstance(pref, (int, float)) or (isinstance(pref, float) and math.isnan(pref)):
        raise RowRejected("bad_type", f"overall_preference is {pref!r}, expected a number")
    if pref == 0:
        raise RowRejected("tie", "overall_preference is 0")
    better, worse = (row["response1"], row["response2"]) if pref < 0 else (row["response2"], row["response1"])
    context = row["context"]
    if isinstance(context, str):
        context = [{"role": "user", "content": context}]
    return {"prompt": context,
            "chosen": [{"role": "assistant", "content": better}],
            "rejected": [{"role": "assistant", "content": worse}]}


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(name: str, text: Any) -> list[dict]:
    if not isinstance(text, str):
        raise RowRejected("bad_type", f"{name} is {type(text).__name__}, expected HH-RLHF text")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowRejected("bad_format", f"{name} does not start with '\\n\\nHuman:'")
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        turns.append({"role": role, "content": content[1:] if content.startswith(" ") else content})
    if not turns or turns[-1]["role"] != "assistant":
        raise RowRejected("bad_format", f"{name} does not end with an Assistant turn")
    return turns


def hh(row: dict, columns: Columns) -> dict:
    """Raw HH-RLHF text ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> conversations for the chat template.

    The prompt is every turn before the last Assistant turn; chosen and rejected must share it.
    """
    for key in ("chosen", "rejected"):
        if row.get(getattr(columns, key)) is None:
            raise RowRejected("missing_field", f"no '{getattr(columns, key)}'")
    chosen = _hh_turns("chosen", row[columns.chosen])
    rejected = _hh_turns("rejected", row[columns.rejected])
    if chosen[:-1] != rejected[:-1]:
        raise RowRejected("prompt_mismatch", "chosen and rejected dialogues differ before the last Assistant turn")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


ADAPTERS: dict[str, Callable[[dict, Columns], dict]] = {
    "standard": standard, "ultrafeedback": ultrafeedback, "sharegpt": sharegpt,
    "openai": openai, "helpsteer3": helpsteer3, "hh": hh,
}


HH_NOTICE = ("the rows look like raw HH-RLHF transcripts (\"\\n\\nHuman: ...\\n\\nAssistant: ...\"); "
             "--format auto reads them as TRL does: plain text with an implicit prompt (the common start of "
             "chosen and rejected), no chat template. --format hh parses them into turns for the chat template, "
             "as the bundled HH data is read.")


def looks_like_hh(row: Any) -> bool:
    """Raw HH-RLHF text in the default chosen / rejected columns: both start with a Human turn and hold an
    Assistant turn."""
    if not isinstance(row, dict):
        return False
    texts = [row.get("chosen"), row.get("rejected")]
    return all(isinstance(t, str) and t.lstrip(" ").startswith("\n\nHuman:") and "\n\nAssistant:" in t
               for t in texts)


def detect(row: dict) -> str:
    """The layout of a raw row (format=auto). Raw HH text stays 'standard', as TRL reads it; since that
    differs from how the bundled HH data is read (turns), a note on the console channel (stderr) says
    so. The stages call this once per run, on the first row, so the note comes once."""
    if not isinstance(row, dict):  # a first line that is a list or a string: normalise rejects it
        return "standard"
    if "preferred_output" in row and "input" in row:
        return "openai"
    if "conversations" in row and isinstance(row.get("chosen"), (dict, list)) and not is_messages(row.get("chosen")):
        return "sharegpt"
    if "response1" in row and "response2" in row and "context" in row:
        return "helpsteer3"
    if looks_like_hh(row):
        console.note(HH_NOTICE)
    return "standard"


def check_text(key: str, value: Any) -> None:
    """A prompt or completion is a string or a non-empty list of well-formed messages."""
    if isinstance(value, list):
        if not value:
            raise RowRejected(f"empty_{key}", f"{key} is an empty list")
        if not is_messages(value):
            raise RowRejected("bad_type", f"{key} is a list but not of messages with 'role'")
        _check_messages(key, value)
    elif not isinstance(value, str):
        raise RowRejected("bad_type", f"{key} is {type(value).__name__}, expected a string or messages")


def normalise(row: dict, layout: str, columns: Columns) -> dict:
    """Raw row -> TRL row with an explicit prompt, validated; raises RowRejected."""
    if not isinstance(row, dict):
        raise RowRejected("bad_type", f"row is {type(row).__name__}, expected an object")
    out = ADAPTERS[layout](row, columns)
    for key in ("prompt", "chosen", "rejected"):
        if key in out:
            check_text(key, out[key])
    check_template_inputs(out)
    if is_messages(out["chosen"]) != is_messages(out["rejected"]):
        raise RowRejected("bad_type", "chosen and rejected mix strings and messages")
    if "prompt" in out and is_messages(out["prompt"]) != is_messages(out["chosen"]):
        raise RowRejected("bad_type", "prompt and completions mix strings and messages")
    for key in ("chosen", "rejected"):
        if is_blank(out[key]):
            raise RowRejected(f"empty_{key}", f"{key} is empty or whitespace only")
    if out["chosen"] == out["rejected"]:
        raise RowRejected("identical_pair", "chosen and rejected are identical")
    if "prompt" not in out:
        out["prompt"], out["chosen"], out["rejected"] = extract_prompt(out["chosen"], out["rejected"])
        for key in ("chosen", "rejected"):
            if is_blank(out[key]):
                raise RowRejected(f"empty_{key}", f"{key} has nothing after the shared prompt")
    if len(out["prompt"]) == 0:
        raise RowRejected("empty_prompt", "the prompt is empty: the first completion token has no context")
    return out
