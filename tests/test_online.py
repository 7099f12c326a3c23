"""On-policy rounds: generate (seeded samples), judge (reward model, function, people, implicit reward)
and their building blocks, with tiny random models. The rounds themselves: tests/test_iterate.py."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT

from stages import generate, judge
from stages.core.config.engine import ConfigError
from stages.core.config.online import GenerateConfig, JudgeConfig
from stages.core.inputs.candidates import read_candidates
from stages.core.inputs.files import DataError
from stages.core.inputs.prompts import read_prompts
from stages.core.inputs.tokenization import prompt_token_ids, tokenize_row
from stages.core.online.judges import RewardModelJudge, reward_model_ids, select_pairs
from stages.core.online.sampling import Sampler, finish, sample_seed, top_p_filter

REWARDS = ROOT / "tests" / "online_rewards.py"
PROMPTS = [
    "Write one sentence about rivers.",
    [{"role": "user", "content": "Name a colour."}],
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]},
    {"prompt": "Count to three:"},
    {"chosen": "\n\nHuman: hi there\n\nAssistant: hello!", "rejected": "\n\nHuman: hi there\n\nAssistant: go away"},
    {"completion": "x", "label": True},  # unpaired without a prompt: no prompt to sample from
    "   ",
]


# --- building blocks --------------------------------------------------------------------------------

def test_select_pairs_best_worst_all_random_and_ties():
    rng = random.Random(0)
    pairs, left = select_pairs({0: 0.5, 1: 2.0, 2: -1.0, 3: 2.0}, "best-worst", 0.0, rng)
    assert pairs == [(1, 2)] and set(left) == {0, 3} and {r for r, _ in left.values()} == {"not_selected"}
    pairs, left = select_pairs({0: 1.0, 1: 1.2}, "best-worst", 0.5, rng)
    assert pairs == [] and {r for r, _ in left.values()} == {"tie"} and set(left) == {0, 1}
    pairs, left = select_pairs({0: 1.0, 1: 1.0}, "best-worst", 0.0, rng)  # equal scores: a tie even at margin 0
    assert pairs == [] and "score the same" in left[0][1]
    pairs, left = select_pairs({0: 0.0, 1: 1.0, 2: 3.0, 3: 3.05}, "all", 0.5, rng)
    assert sorted(pairs) == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1)] and left == {}
    pairs, left = select_pairs({0: 0.0, 1: 0.1, 2: 5.0}, "all", 1.0, rng)
    assert sorted(pairs) == [(2, 0), (2, 1)] and left == {}
    pairs, left = select_pairs({0: 3.0}, "best-worst", 0.0, rng)
    assert pairs == [] and left[0][0] == "single_response"
    for seed in range(20):
        pairs, left = select_pairs({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, "random", 0.0, random.Random(seed))
        (a, b), = pairs
        assert a != b and {0: 1, 1: 2, 2: 3, 3: 4}[a] > {0: 1, 1: 2, 2: 3, 3: 4}[b] and len(left) == 2


def test_top_p_and_sample_seeds():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(top_p_filter(probs, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(top_p_filter(probs, 0.1), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # the top token stays
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    assert sample_seed(0, "p", 1) == sample_seed(0, "p", 1) != sample_seed(0, "p", 2) != sample_seed(1, "p", 1)


def test_prompts_from_any_input_and_their_rejects(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS) + "{not json\n")
    got = list(read_prompts(str(path), "auto", "prompt", "train", None, None))
    assert [g[0] for g in got] == list(range(8))
    prompts = [g[1] for g in got]
    assert prompts[0] == PROMPTS[0] and prompts[1] == PROMPTS[1] and prompts[2] == PROMPTS[2]["prompt"]
    assert prompts[4] == "\n\nHuman: hi there\n\nAssistant:"  # TRL's implicit prompt of a raw HH pair
    assert [g[3].reason if g[3] else None for g in got] == [None] * 5 + ["missing_field", "empty_prompt",
                                                                         "malformed_json"]
    # --format hh reads the same pair's prompt as turns for the chat template, as precompute does
    hh = list(read_prompts(str(path), "hh", "prompt", "train", 5, None))
    assert hh[4][1] == [{"role": "user", "content": "hi there"}]
    # a .txt file: one prompt per line
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert [g[1] for g in read_prompts(str(tmp_path / "p.txt"), "auto", "prompt", "train", None, None)] == [
        "first prompt", "second prompt"]
    assert [g[1] for g in read_prompts(str(tmp_path / "p.txt"), "auto", "prompt", "train", 1, None)] == [
        "first prompt"]
    with pytest.raises(DataError, match=r"input not found: .*nope\.txt.*p\.txt"):
        list(read_prompts(str(tmp_path / "nope.txt"), "auto", "prompt", "train", None, None))
    # the prompt's tokens are the ones the trainer scores the pair's completions after
    row = {"prompt": PROMPTS[1], "chosen": [{"role": "assistant", "content": "Red."}],
           "rejected": [{"role": "assistant", "content": "Blue."}]}
    assert prompt_token_ids(tokenizer, PROMPTS[1]) == tokenize_row(tokenizer, row)["prompt_ids"]
    row = {"prompt": PROMPTS[0], "chosen": " Rivers flow.", "rejected": " No."}
    assert prompt_token_ids(tokenizer, PROMPTS[0]) == tokenize_row(tokenizer, row)["prompt_ids"]


def _sampler(model_dir, **over):
    sampling = {"num_samples": 3, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 7, "seed": 5, **over}
    return Sampler(model_dir, "float32", sampling, device="cpu")


def _batch(prompts):
    import pyarrow as pa

    from stages.core.inputs.prompts import prompt_id

    return pa.Table.from_pylist([{"prompt_index": i, "prompt_id": prompt_id(p),
                                  "prompt": json.dumps(p) if isinstance(p, list) else p,
                                  "conversational": isinstance(p, list), "template_json": None}
                                 for i, p in enumerate(prompts)])


def test_a_sample_depends_on_its_seed_not_on_its_batch(tiny_model_dir):
    sampler = _sampler(tiny_model_dir)
    prompts = [PROMPTS[0], PROMPTS[1], "A much longer prompt, so that the others are left-padded in its batch."]
    together = sampler(_batch(prompts)).to_pylist()
    again = sampler(_batch(prompts)).to_pylist()
    alone = sampler(_batch(prompts[:1])).to_pylist()
    assert [r["responses"] for r in together] == [r["responses"] for r in again]
    assert alone[0]["responses"] == together[0]["responses"]  # padded beside a longer prompt, or not
    for r in together:
        assert len(r["responses"]) == 3 and len(set(r["responses"])) == 3
        assert all(1 <= n <= 7 for n in r["response_tokens"])
        assert all(f == "length" for f, n in zip(r["finish_reasons"], r["response_tokens"]) if n == 7 and f != "stop")
    other_seed = _sampler(tiny_model_dir, seed=6)(_batch(prompts[:1])).to_pylist()
    assert other_seed[0]["responses"] != alone[0]["responses"]
    greedy = _sampler(tiny_model_dir, temperature=0.0)(_batch(prompts[:1])).to_pylist()
    assert len(set(greedy[0]["responses"])) == 1


def test_a_response_ends_at_its_first_stop_token():
    eos, pad = 2, 2
    assert finish([5, 7, eos, pad, pad], [eos], pad) == ([5, 7], "stop", 3)  # EOS counted, not in the text
    assert finish([5, 7, 8], [eos], pad) == ([5, 7, 8], "length", 3)
    assert finish([eos, pad], [eos, 9], pad) == ([], "stop", 1)
    assert finish([4, 9, 3], [eos, 9], pad) == ([4], "stop", 2)  # any of the model's stop tokens


# --- generate (Ray) ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_generate_is_reproducible_and_counts_match(tmp_path, tiny_model_dir, ray_session):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    base = dict(prompts=str(tmp_path / "p.jsonl"), model=tiny_model_dir, num_samples=3, max_new_tokens=6,
                temperature=1.0, seed=3, batch_size=2, rows_per_file=3, progress=False)
    a = generate.run(GenerateConfig(output=str(tmp_path / "a"), **base))
    _, rows_a = read_candidates(str(tmp_path / "a"))
    # The same samples again: the sampler in this process (not a second Ray run), over the same batches of 2
    # prompts with the same CPU threads as the Ray actor had.
    import pyarrow as pa

    from stages.core.runtime.devices import threads_per_worker

    threads = torch.get_num_threads()
    try:
        cfg = GenerateConfig(output=str(tmp_path / "a"), **base)
        sampling = {k: getattr(cfg, k) for k in ("num_samples", "temperature", "top_p", "max_new_tokens", "seed")}
        sampler = Sampler(tiny_model_dir, cfg.dtype, sampling, device="cpu", threads=threads_per_worker(1))
        columns = ("prompt_index", "prompt_id", "prompt", "conversational", "template_json")
        again = [r for i in range(0, len(rows_a), 2)
                 for r in sampler(pa.Table.from_pylist([{k: r[k] for k in columns} for r in rows_a[i:i + 2]]))
                 .to_pylist()]
    finally:
        torch.set_num_threads(threads)
    assert [r["responses"] for r in rows_a] == [r["responses"] for r in again]
    b = generate.settings_of(cfg, tiny_model_dir)  # the settings a second run compares with
    assert [f["name"] for f in a["files"]] == ["candidates-00000.parquet", "candidates-00001.parquet"]
    c = a["counts"]
    assert c["rows_read"] == 7 and c["prompts"] == 5 == len(rows_a) and c["prompts_rejected"] == 2
    assert a["rejects_by_reason"] == {"empty_prompt": 1, "missing_field": 1}
    assert c["samples"] == 15 == sum(len(r["responses"]) for r in rows_a)
    assert c["finish_reasons"]["stop"] + c["finish_reasons"]["length"] == 15
    assert c["response_tokens"] == sum(sum(r["response_tokens"]) for r in rows_a)
    assert all(1 <= n <= 6 for r in rows_a for n in r["response_tokens"])
    assert [r["prompt_index"] for r in rows_a] == [0, 1, 2, 3, 4]
    assert a["settings"]["seed"] == 3 and a["settings"]["weights_hash"] == b["weights_hash"]
    rejects = [json.loads(x) for x in (tmp_path / "a" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source_index"], r["reason"]) for r in rejects] == [(5, "missing_field"), (6, "empty_prompt")]
    # plain Parquet
    assert pq.read_table(tmp_path / "a" / "candidates-00000.parquet").num_rows == 3
    # the same command again keeps the output; other settings are refused unless --overwrite
    assert generate.run(GenerateConfig(output=str(tmp_path / "a"), **base))["skipped"]
    with pytest.raises(ConfigError, match="seed"):
        generate.run(GenerateConfig(output=str(tmp_path / "a"), **{**base, "seed": 4}))


# --- judge ------------------------------------------------------------------------------------------

def write_candidates(folder: Path, rows: list[dict]) -> None:
    """A generate output made by hand: prompts with given responses."""
    full = []
    for i, r in enumerate(rows):
        conversational = isinstance(r["prompt"], list)
        n = len(r["responses"])
        full.append({"prompt_index": i, "prompt_id": f"p{i}",
                     "prompt": json.dumps(r["prompt"]) if conversational else r["prompt"],
                     "conversational": conversational, "template_json": None, "prompt_tokens": 5,
                     "responses": r["responses"], "finish_reasons": r.get("finish", ["stop"] * n),
                     "response_tokens": [3] * n, "reject_reason": None, "reject_detail": None})
    folder.mkdir(parents=True, exist_ok=True)
    entry = generate._write(str(folder), 0, full)
    (folder / "manifest.json").write_text(json.dumps({"files": [entry], "model": {"name": "hand"},
                                                      "counts": {"prompts": len(rows)}}))


CANDIDATES = [
    {"prompt": [{"role": "user", "content": "Hi?"}], "responses": ["a", "abc", "ab", "abc", ""]},
    {"prompt": "Say something:", "responses": [" one", " four", " three"], "finish": ["stop", "length", "stop"]},
    {"prompt": "Tie:", "responses": ["xx", "yy"]},
    {"prompt": "Alone:", "responses": ["only", ""]},
]


def _read(folder: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (folder / name).read_text().splitlines()]


def test_judge_with_a_reward_function_accounts_for_every_candidate(tmp_path):
    write_candidates(tmp_path / "cands", CANDIDATES)
    cfg = JudgeConfig(candidates=str(tmp_path / "cands"), output=str(tmp_path / "pairs"),
                      reward_fn=f"{REWARDS}:chars", progress=False)
    m = judge.run(cfg)
    pairs = _read(tmp_path / "pairs", "pairs.jsonl")
    assert [(p["prompt_index"], p["chosen_index"], p["rejected_index"]) for p in pairs] == [(0, 1, 0), (1, 2, 0)]
    assert pairs[0]["prompt"] == CANDIDATES[0]["prompt"] and pairs[0]["chosen"] == [
        {"role": "assistant", "content": "abc"}]  # conversational prompts give conversational pairs
    assert pairs[1]["chosen"] == " three" and pairs[1]["margin"] == 2.0
    reasons = {(r["prompt_index"], r["response_index"]): r["reason"]
               for r in _read(tmp_path / "pairs", "rejects.jsonl")}
    assert reasons == {(0, 2): "not_selected", (0, 3): "duplicate_response", (0, 4): "empty_response",
                       (1, 1): "not_selected", (2, 0): "tie", (2, 1): "tie", (3, 0): "single_response",
                       (3, 1): "empty_response"}
    c = m["counts"]
    assert (c["candidates"], c["candidates_paired"], c["candidates_rejected"]) == (12, 4, 8)
    assert c["pairs"] == 2 and c["prompts_with_pairs"] == 2
    assert len(_read(tmp_path / "pairs", "scores.jsonl")) == 12
    # TRL's missing_eos_penalty: " four" was cut at max_new_tokens
    m2 = judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), output=str(tmp_path / "pairs2"),
                               reward_fn=f"{REWARDS}:chars", missing_eos_penalty=10.0, pairs="all", progress=False))
    pairs2 = _read(tmp_path / "pairs2", "pairs.jsonl")
    assert (1, 0, 1) in [(p["prompt_index"], p["chosen_index"], p["rejected_index"]) for p in pairs2]
    assert m2["counts"]["candidates"] == m2["counts"]["candidates_paired"] + m2["counts"]["candidates_rejected"]
    # min-margin: both pairs are 2 apart, a tie under a margin of 2.01, every response of theirs rejected
    m3 = judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), output=str(tmp_path / "pairs3"),
                               reward_fn=f"{REWARDS}:chars", min_margin=2.01, progress=False))
    assert m3["counts"]["pairs"] == 0 and m3["rejects_by_reason"]["tie"] == 2 + 3 + 3
    # a function that raises or returns no number rejects that response only
    write_candidates(tmp_path / "c2", [{"prompt": "P", "responses": ["abc", "eee", "zz", "zzzz"]}])
    judge.run(JudgeConfig(candidates=str(tmp_path / "c2"), output=str(tmp_path / "p4"),
                          reward_fn=f"{REWARDS}:picky", progress=False))
    rej = {r["response_index"]: r for r in _read(tmp_path / "p4", "rejects.jsonl")}
    assert rej[0]["reason"] == rej[1]["reason"] == "judge_error" and "ValueError" in rej[0]["detail"]
    assert "'high'" in rej[1]["detail"]
    # precompute reads the pairs as they are
    from stages.core.inputs.formats import Columns, detect, normalise

    for p in pairs:
        row = normalise(p, detect(p), Columns())  # the default column names
        assert row["chosen"] == p["chosen"]


def test_judge_settings_and_errors(tmp_path):
    write_candidates(tmp_path / "cands", CANDIDATES)
    with pytest.raises(ConfigError, match="exactly one"):
        JudgeConfig(reward_fn="a:b", labels="x.csv")
    with pytest.raises(ConfigError, match="give one of"):
        judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), output=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="no function"):
        judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), output=str(tmp_path / "o"),
                              reward_fn=f"{REWARDS}:nope"))
    with pytest.raises(ConfigError, match="needs --refs"):
        JudgeConfig(implicit="policy")
    with pytest.raises(DataError, match="not a finished generate output"):
        judge.run(JudgeConfig(candidates=str(tmp_path / "none"), output=str(tmp_path / "o"), reward_fn="x:y"))


BOOM = "def boom(prompt, response):\n    raise ValueError('boom')\n"


def test_a_judge_that_fails_on_every_answer_is_an_error_naming_the_first_failure(tmp_path, capsys):
    import pipeline

    write_candidates(tmp_path / "cands", [{"prompt": f"P{i}", "responses": ["a", "bb", "ccc", "dddd"]}
                                          for i in range(2)])
    (tmp_path / "boom.py").write_text(BOOM)
    out = tmp_path / "pairs"
    rc = pipeline.main(["judge", "--candidates", str(tmp_path / "cands"), "--output", str(out),
                        "--reward-fn", f"{tmp_path / 'boom.py'}:boom", "--progress", "false"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "every one of 8 answers failed: judge_error x8" in err and "ValueError('boom')" in err
    assert "prompt 0, response 0" in err
    # nothing is lost: every candidate's reason is written; no manifest, so a re-run judges again
    assert [r["reason"] for r in _read(out, "rejects.jsonl")] == ["judge_error"] * 8
    assert not (out / "manifest.json").exists()
    m = judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), output=str(out), reward_fn=f"{REWARDS}:chars",
                              progress=False))
    assert m["counts"]["pairs"] == 2 and not m.get("skipped")
    # that finished output judged again by the failing function (--overwrite): its old pairs and manifest go
    with pytest.raises(judge.JudgeFailed):
        judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), output=str(out), overwrite=True,
                              reward_fn=f"{tmp_path / 'boom.py'}:boom", progress=False))
    assert not (out / "manifest.json").exists() and not (out / "pairs.jsonl").exists()


def test_some_answers_failing_is_no_error_but_the_summary_names_the_first_failure(tmp_path):
    write_candidates(tmp_path / "cands", [{"prompt": "P", "responses": ["abc", "eee", "zz", "zzzz"]}])
    cfg = JudgeConfig(candidates=str(tmp_path / "cands"), output=str(tmp_path / "p"), reward_fn=f"{REWARDS}:picky",
                      progress=False)
    m = judge.run(cfg)
    assert m["counts"]["pairs"] == 1 and m["rejects_by_reason"]["judge_error"] == 2
    assert m["judge_errors"] == {"count": 2, "first": {"prompt_index": 0, "response_index": 0, "detail": (
        "the reward function raised ValueError(\"no a's up front\")")}}
    assert "first judge error: the reward function raised ValueError" in judge.summary(m, cfg)


def test_judge_given_what_is_not_a_finished_generate_output_says_what_it_is(tmp_path):
    write_candidates(tmp_path / "cands", CANDIDATES)
    run = lambda cands: judge.run(JudgeConfig(candidates=str(cands), output=str(tmp_path / "o"),  # noqa: E731
                                              reward_fn=f"{REWARDS}:chars", progress=False))
    run(tmp_path / "cands")
    with pytest.raises(DataError, match=r"judge's output \(preference pairs\).*--data"):
        run(tmp_path / "o")  # the pairs folder instead of the candidates
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="not generate's manifest"):
        run(tmp_path / "odd")
    (tmp_path / "cands" / "candidates-00000.parquet").unlink()
    with pytest.raises(DataError, match="candidates-00000.parquet, listed in its manifest, is missing"):
        run(tmp_path / "cands")


def test_a_judge_that_cannot_start_says_why_in_one_line(tmp_path, tiny_model_dir):
    from stages.core.runtime.models import ModelError

    write_candidates(tmp_path / "cands", CANDIDATES)
    run = lambda **judge_key: judge.run(JudgeConfig(candidates=str(tmp_path / "cands"),  # noqa: E731
                                                    output=str(tmp_path / "o"), progress=False, **judge_key))
    # checked here, before any Ray actor loads it (an actor's failure would be a Ray traceback)
    with pytest.raises(ModelError, match="not a model folder"):
        run(reward_model=str(tmp_path / "cands"))
    with pytest.raises(ConfigError, match="has 2 outputs; a reward model has one"):
        run(reward_model=tiny_model_dir)  # a causal LM, not a sequence classifier with one output
    with pytest.raises(DataError, match=r"input not found: .*sheet\.csv"):
        run(labels=str(tmp_path / "sheet.csv"))
    with pytest.raises(ModelError, match="model not found"):  # the policy, before its refs are read
        run(implicit=str(tmp_path / "run" / "final"), refs=str(tmp_path / "refs"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_the_human_sheet_round_trip(tmp_path, suffix):
    many = [{"prompt": f"Prompt {i}?", "responses": [f"r{i}-0", f"r{i}-1", f"r{i}-2"]} for i in range(12)]
    write_candidates(tmp_path / "cands", many)
    sheet = tmp_path / f"sheet{suffix}"
    out = judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), export_sheet=str(sheet), seed=1))
    assert out["rows"] == 12
    if suffix == ".csv":
        rows = list(csv.DictReader(sheet.open()))
    else:
        rows = [json.loads(x) for x in sheet.read_text().splitlines()]
    assert {int(r["a_index"]) < int(r["b_index"]) for r in rows} == {True, False}  # the order is randomised
    # people prefer the response with the higher number, whichever side it is on; two rows are ties / blank
    for k, r in enumerate(rows):
        a, b = int(r["a_index"]), int(r["b_index"])
        r["label"] = "tie" if k == 0 else "" if k == 1 else "maybe" if k == 2 else ("A" if a > b else "b")
    if suffix == ".csv":
        with sheet.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=rows[0].keys())
            w.writeheader()
            w.writerows(rows)
    else:
        sheet.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), output=str(tmp_path / "pairs"), labels=str(sheet)))
    pairs = _read(tmp_path / "pairs", "pairs.jsonl")
    assert len(pairs) == 9 and all(p["chosen_index"] > p["rejected_index"] for p in pairs)
    for p in pairs:
        assert p["chosen"] == f"r{p['prompt_index']}-{p['chosen_index']}"
    assert m["rejects_by_reason"] == {"bad_label": 2, "not_selected": 12, "tie": 2, "unlabelled": 2}
    assert m["counts"]["candidates"] == 36 == m["counts"]["candidates_paired"] + m["counts"]["candidates_rejected"]
    # a sheet read back before anyone marked it: an error, not a run with no pairs
    unmarked = tmp_path / f"unmarked{suffix}"
    judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), export_sheet=str(unmarked), seed=1))
    with pytest.raises(DataError, match=f"none of the 12 rows of {unmarked} is labelled"):
        judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), output=str(tmp_path / "p0"), labels=str(unmarked)))
    # a sheet that does not match the candidates names its line
    rows[3]["response_a"] = "edited"
    sheet.write_text("".join(json.dumps(r) + "\n" for r in rows)) if suffix == ".jsonl" else None
    if suffix == ".csv":
        with sheet.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=rows[0].keys())
            w.writeheader()
            w.writerows(rows)
    line = 5 if suffix == ".csv" else 4
    with pytest.raises(DataError, match=f"line {line}: the responses differ"):
        judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), output=str(tmp_path / "p2"), labels=str(sheet)))


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer) -> str:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("reward-model")
    LlamaForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_judge_with_a_reward_model_pairs_best_and_worst_by_its_scores(tmp_path, reward_model_dir, ray_session):
    from transformers import AutoModelForSequenceClassification

    cands = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
              "responses": [f"Answer {i} {'x' * j}" for j in range(4)]} for i in range(5)]
    cands.append({"prompt": "A plain prompt:", "responses": [" short", " a longer answer here", " mid one"]})
    write_candidates(tmp_path / "cands", cands)
    # the model called directly, one unpadded sequence at a time
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    scorer_tok = RewardModelJudge(reward_model_dir, "float32", 2048, device="cpu").tokenizer
    direct = []
    for c in cands:
        direct.append([])
        for resp in c["responses"]:
            ids = reward_model_ids(scorer_tok, c["prompt"], resp, None, 2048)
            with torch.no_grad():
                direct[-1].append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    spreads = sorted(max(d) - min(d) for d in direct)
    margin = (spreads[2] + spreads[3]) / 2  # half the prompts are ties under it
    m = judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), output=str(tmp_path / "pairs"), batch_size=5,
                              reward_model=reward_model_dir, min_margin=margin, num_workers=1, progress=False))
    scores = {(s["prompt_index"], s["response_index"]): s["score"] for s in _read(tmp_path / "pairs", "scores.jsonl")}
    pairs = {p["prompt_index"]: p for p in _read(tmp_path / "pairs", "pairs.jsonl")}
    rejects = {(r["prompt_index"], r["response_index"]): r["reason"]
               for r in _read(tmp_path / "pairs", "rejects.jsonl")}
    for i, d in enumerate(direct):
        for j, value in enumerate(d):
            assert abs(scores[(i, j)] - value) < 1e-5  # batched and padded in a Ray actor = direct
        best, worst = max(range(len(d)), key=d.__getitem__), min(range(len(d)), key=d.__getitem__)
        if max(d) - min(d) >= margin:
            assert (pairs[i]["chosen_index"], pairs[i]["rejected_index"]) == (best, worst)
            assert {rejects[(i, j)] for j in range(len(d)) if j not in (best, worst)} == {"not_selected"}
        else:
            assert i not in pairs and {rejects[(i, j)] for j in range(len(d))} == {"tie"}
    c = m["counts"]
    assert c["pairs"] == 3 and c["candidates"] == 23 == c["candidates_paired"] + c["candidates_rejected"]


@pytest.mark.slow
def test_the_implicit_judge_prefers_what_the_policy_was_trained_toward(tmp_path, tmp_path_factory, refs,
                                                                     ray_session):
    from test_train import trained_run

    from stages.core.inputs.formats import Columns, hh

    policy = str(trained_run(refs, tmp_path_factory) / "final")  # 4 epochs on these pairs, beta 0.1
    rows = [json.loads(x) for x in (refs.parent / "in.jsonl").read_text().splitlines()]
    cands = []
    for r in rows:  # the training pairs, as candidates: response 0 chosen, 1 rejected (and the other way round)
        t = hh(r, Columns())
        cands.append({"prompt": t["prompt"], "responses": [t["chosen"][0]["content"], t["rejected"][0]["content"]]})
    write_candidates(tmp_path / "cands", cands)
    m = judge.run(JudgeConfig(candidates=str(tmp_path / "cands"), output=str(tmp_path / "pairs"), implicit=policy,
                              refs=str(refs), progress=False))
    pairs = _read(tmp_path / "pairs", "pairs.jsonl")
    toward = sum(p["chosen_index"] == 0 for p in pairs)
    assert m["counts"]["pairs"] == len(pairs) >= 18 and toward / len(pairs) >= 0.9, (toward, len(pairs))
    # the score is beta * (log pi - log pi_ref) of the tokens precompute scored: the pair's reward margin
    import pyarrow as pa

    shard = pa.concat_tables([pq.read_table(p) for p in sorted((refs / "shards").glob("*.parquet"))]).to_pylist()
    assert len(shard) == 20
    scores = {(s["prompt_index"], s["response_index"]): s["score"] for s in _read(tmp_path / "pairs", "scores.jsonl")}
    from stages.core.runtime.models import load_model
    from stages.core.scoring.logprobs import sequence_logps
    from stages.core.scoring.packing import pad_batch
    from stages.core.scoring.truncation import Truncation

    row = next(r for r in shard if r["source_index"] == 0)
    model = load_model(policy, "float32", "cpu").eval()
    seq, start = Truncation(256).scored_sequence(row["prompt_ids"], row["chosen_ids"])
    ids, mask, comp = pad_batch([seq], [start], 0, "cpu")
    with torch.no_grad():
        logp = float(sequence_logps(model, ids, mask, comp)[0])
    assert abs(scores[(0, 0)] - 0.1 * (logp - row["ref_chosen_logps"])) < 1e-4
