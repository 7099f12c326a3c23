"""The human labelling sheet of `judge`: `export_sheet` writes per prompt two responses, A and B, in a
seeded random order recorded on the sheet (CSV or JSON Lines); `read_labels` reads it back, marked A, B
or tie, as pairs, rejects and scores.
"""

from __future__ import annotations

import csv
import io
import json

from stages.core import storage
from stages.core.config.engine import ConfigError
from stages.core.config.online import JudgeConfig
from stages.core.inputs.files import DataError
from stages.core.online.candidate_rows import flatten, group_by_prompt, prompt_rng
from stages.core.online.judges import CandidateKey

SHEET_COLUMNS = ("sheet_id", "prompt_index", "prompt_id", "prompt", "response_a", "response_b", "a_index", "b_index",
                 "label")


def export_sheet(cfg: JudgeConfig, rows: list[dict]) -> dict:
    """Per prompt, two distinct responses (a seeded random two when there are more) as A and B, in a seeded
    random order; the order is on the sheet (a_index, b_index), so reading it back needs nothing else."""
    cands, _ = flatten(rows)
    by_prompt = group_by_prompt(cands)
    sheet = []
    for rec in rows:
        usable = [c["response_index"] for c in by_prompt.get(rec["prompt_index"], [])]
        if len(usable) < 2:
            continue
        rng = prompt_rng(cfg.seed, rec)
        a, b = rng.sample(usable, 2)
        sheet.append({"sheet_id": f"{rec['prompt_index']}-{a}-{b}", "prompt_index": rec["prompt_index"],
                      "prompt_id": rec["prompt_id"], "prompt": rec["prompt"], "response_a": rec["responses"][a],
                      "response_b": rec["responses"][b], "a_index": a, "b_index": b, "label": ""})
    if cfg.export_sheet.endswith(".csv"):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SHEET_COLUMNS)
        writer.writeheader()
        writer.writerows(sheet)
        data = buf.getvalue()
    elif cfg.export_sheet.endswith(".jsonl"):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sheet)
    else:
        raise ConfigError(f"config key 'export_sheet': {cfg.export_sheet} must end in .csv or .jsonl")
    storage.write_bytes_atomic(cfg.export_sheet, data.encode())
    return {"sheet": cfg.export_sheet, "rows": len(sheet), "prompts": len(rows)}


def _sheet_rows(path: str) -> list[tuple[int, dict]]:
    text = storage.read_bytes(path).decode("utf-8-sig")
    if path.endswith(".csv"):
        return list(enumerate(csv.DictReader(io.StringIO(text)), start=2))  # line 1 is the header
    if path.endswith(".jsonl"):
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append((n, json.loads(line)))
                except ValueError as e:
                    raise DataError(f"{path} line {n}: not JSON ({e})") from None
        return out
    raise DataError(f"--labels {path}: expected a .csv or .jsonl sheet")


def read_labels(path: str, rows: list[dict], usable: set[CandidateKey]):
    """A marked sheet -> ({prompt_index: [(chosen, rejected)]}, rejects, scores: 1 chosen, 0 rejected).
    A sheet row that does not match the candidates (another generate run, edited responses) is an error
    naming its line; a row marked neither A, B nor tie is a reject (unlabelled, bad_label)."""
    by_index = {rec["prompt_index"]: rec for rec in rows}
    pairs: dict[int, list[tuple[int, int]]] = {}
    rejects: dict[CandidateKey, tuple[str, str]] = {}
    scores: dict[CandidateKey, float] = {}
    seen: set[str] = set()
    for line, r in _sheet_rows(path):
        missing = [c for c in ("sheet_id", "prompt_index", "response_a", "response_b", "a_index", "b_index", "label")
                   if c not in r]
        if missing:
            raise DataError(f"{path} line {line}: no column(s) {', '.join(missing)}")
        try:
            i, a, b = int(r["prompt_index"]), int(r["a_index"]), int(r["b_index"])
        except (TypeError, ValueError):
            raise DataError(f"{path} line {line}: prompt_index / a_index / b_index are not integers") from None
        rec = by_index.get(i)
        if rec is None or not (0 <= a < len(rec["responses"]) and 0 <= b < len(rec["responses"])) or a == b:
            raise DataError(f"{path} line {line}: prompt {i}, responses {a} / {b} are not in these candidates")
        if rec["responses"][a] != r["response_a"] or rec["responses"][b] != r["response_b"]:
            raise DataError(f"{path} line {line}: the responses differ from the candidates' (prompt {i}); the "
                            "sheet belongs to other candidates or was edited")
        if r["sheet_id"] in seen:
            raise DataError(f"{path} line {line}: sheet_id {r['sheet_id']} appears twice")
        seen.add(r["sheet_id"])
        ka, kb = (i, a), (i, b)
        label = str(r["label"] if r["label"] is not None else "").strip().lower()
        if label in ("a", "b"):
            chosen, rejected = (a, b) if label == "a" else (b, a)
            pairs.setdefault(i, []).append((chosen, rejected))
            scores[(i, chosen)], scores[(i, rejected)] = 1.0, 0.0
        else:
            reason = {"tie": "tie", "": "unlabelled"}.get(label, "bad_label")
            detail = {"tie": f"marked tie on {path} line {line}", "unlabelled": f"no label on {path} line {line}"
                      }.get(reason, f"label {r['label']!r} on {path} line {line} is not A, B or tie")
            rejects[ka] = rejects[kb] = (reason, detail)
    if seen and not scores and all(reason == "unlabelled" for reason, _ in rejects.values()):
        raise DataError(f"none of the {len(seen)} rows of {path} is labelled: mark each row's label A, B or tie, "
                        "then read it back")
    for key in usable:
        if key not in scores and key not in rejects:
            rejects[key] = ("not_selected", "not on the sheet")
    return pairs, rejects, scores
