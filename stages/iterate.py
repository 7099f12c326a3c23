"""`pipeline.py iterate`: on-policy ("online", iterative) DPO in rounds, one command.

    round k:  policy k-1 --generate--> candidates --judge--> pairs --precompute--> refs --train--> policy k
                                                                                               (--eval--> held-out)

Policy 0 is --model (the SFT model). Every round lives in OUTPUT/round-k/ (candidates/, pairs/, policy/,
eval/, and refs/ with --reference previous; samples/: the last policy's own samples, judged, for the
report); OUTPUT/iterate.json records what each finished stage did. --new-rounds N stops after N rounds
not yet finished: a nightly job that runs one round a night.

--reference initial: every round's pairs are scored by the initial model into one OUTPUT/refs, which only
scores what is new (precompute is incremental; `append`: each round is another data source), and round k
trains policy k-1 further on all pairs so far. --reference previous: round k's pairs are scored by policy
k-1 into round-k/refs, and round k trains policy k-1 on them alone (the usual iterative DPO).

Resumable at stage granularity: a stage recorded as finished (and its output still there) is not run
again, so a re-run after a crash or a kill goes on with the stage that was cut off; asking for more
--rounds adds rounds. Each stage also takes its own output's lease, and is itself safe to re-run.
summary.md and rounds.png show, per round, held-out accuracy and margin, KL to the initial model (sampled
on held-out prompts) and the mean judge score of the policy's own samples.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

from stages import evaluate, generate, judge, precompute, train
from stages.core import console, storage
from stages.core.config.chain import ITERATE_OWNS, Chain, IterateConfig, utc_now
from stages.core.config.engine import ConfigError
from stages.core.config.online import GenerateConfig, JudgeConfig
from stages.core.config.options import EvalConfig, PrecomputeConfig, TrainConfig
from stages.core.errors import PipelineError
from stages.core.inputs.files import DataError
from stages.core.lease import Lease
from stages.core.online.rounds import IterateState, RoundState

DEFAULT_REWARD_FN = "stages.rewards:concise"


class IterateError(PipelineError):
    """A round that cannot go on (its judge made no pairs); the message says what to change."""


class Rounds:
    """The stage configs of each round, from the iterate config and its per-stage options (`Chain`)."""

    def __init__(self, cfg: IterateConfig):
        self.cfg = cfg
        self.out = cfg.output
        self._build = Chain(cfg, ITERATE_OWNS, "iterate").build

    def check(self) -> None:
        """Every stage's config of round 1 built once before anything runs: a bad key in any stage's options
        (a typo in --train-options) fails now, not after a round of sampling, judging and scoring."""
        first = self.dir(1)
        self.generate(first, self.cfg.model, self.cfg.seed)
        self.judge(first)
        self.precompute(1, self.cfg.model)
        self.train(1, self.cfg.model)
        if self.cfg.eval_refs:
            self.eval(1, self.cfg.model)

    def dir(self, k: int | str) -> str:
        return storage.join(self.out, f"round-{k}" if isinstance(k, int) else k)

    def generate(self, where: str, model: str, seed: int) -> GenerateConfig:
        c = self.cfg
        sampling = {k: getattr(c, k) for k in ("num_samples", "temperature", "top_p", "max_new_tokens")}
        return self._build(GenerateConfig, "generate", {**sampling, "seed": seed, "num_workers": c.num_workers},
                           {"prompts": c.prompts, "model": model, "output": storage.join(where, "candidates")})

    def judge(self, where: str) -> JudgeConfig:
        c = self.cfg
        judge_key = ({"reward_model": c.reward_model} if c.reward_model
                     else {"reward_fn": c.reward_fn or DEFAULT_REWARD_FN})
        return self._build(JudgeConfig, "judge", {"num_workers": c.num_workers, "pairs": c.pairs,
                                                  "min_margin": c.min_margin, **judge_key},
                           {"candidates": storage.join(where, "candidates"), "output": storage.join(where, "pairs")})

    def refs(self, k: int) -> str:
        return storage.join(self.out, "refs") if self.cfg.reference == "initial" else storage.join(self.dir(k), "refs")

    def precompute(self, k: int, reference: str) -> PrecomputeConfig:
        return self._build(PrecomputeConfig, "precompute", {"num_workers": self.cfg.num_workers},
                           {"data": storage.join(self.dir(k), "pairs", "pairs.jsonl"), "model": reference,
                            "output": self.refs(k), "append": True})

    def train(self, k: int, start: str) -> TrainConfig:
        return self._build(TrainConfig, "train", {"num_workers": self.cfg.num_workers},
                           {"refs": self.refs(k), "model": start, "output": storage.join(self.dir(k), "policy"),
                            "resume": "auto"})

    def eval(self, k: int, model: str) -> EvalConfig:
        return self._build(EvalConfig, "eval", {"samples": 8, "max_new_tokens": self.cfg.max_new_tokens},
                           {"refs": self.cfg.eval_refs, "model": model, "output": storage.join(self.dir(k), "eval")})


def _done(entry: dict | None, *urls: str) -> bool:
    """A stage recorded as finished whose outputs are still there."""
    return bool(entry and entry.get("finished_at")) and all(storage.exists(u) for u in urls)


class Book:
    """The rounds' record as it grows: each change is a new `IterateState`, written to iterate.json at once,
    so a kill loses at most the stage that was running."""

    def __init__(self, url: str, state: IterateState):
        self.url, self.state = url, state

    def part(self, k: int, samples: bool) -> RoundState:
        """Round k's record, or (samples) that of its policy's own samples."""
        r = self.state.round(k)
        return (r.samples or RoundState()) if samples else r

    def record(self, k: int, samples: bool, name: str, entry: dict) -> None:
        r = self.state.round(k)
        r = dataclasses.replace(r, samples=self.part(k, True).with_stage(name, entry)) if samples \
            else r.with_stage(name, entry)
        self.state = self.state.with_round(k, r)
        self.save()

    def save(self) -> None:
        storage.write_json(self.url, self.state.to_json())


def _open_book(cfg: IterateConfig) -> Book:
    """iterate.json as it is (an older output's too: the layout is the same), refused when it was made with
    another --reference or --model."""
    url = storage.join(cfg.output, "iterate.json")
    old = IterateState.from_json(storage.read_json(url)) if storage.exists(url) else None
    if old and old.reference != cfg.reference:
        raise ConfigError(f"{cfg.output} holds rounds made with --reference {old.reference}; "
                          f"this run asks for {cfg.reference}: use another --output")
    if old and old.model != cfg.model:
        raise ConfigError(f"{cfg.output} holds rounds that started from --model {old.model}; this run "
                          f"asks for {cfg.model}: use another --output")
    return Book(url, dataclasses.replace(old or IterateState(), model=cfg.model, reference=cfg.reference,
                                         prompts=cfg.prompts))


def run(cfg: IterateConfig) -> dict:
    """Run (or go on with) the rounds; returns iterate.json's content."""
    storage.configure(cfg.storage_options_dict)
    cfg = dataclasses.replace(cfg, output=storage.absolute(cfg.output), eval_refs=storage.absolute(cfg.eval_refs),
                              prompts=storage.absolute(cfg.prompts) if os.path.exists(cfg.prompts) else cfg.prompts,
                              model=storage.absolute(cfg.model) if os.path.isdir(cfg.model) else cfg.model)
    rounds = Rounds(cfg)
    rounds.check()  # every stage's options, before anything is written
    _check_judge_and_refs(cfg, rounds.judge(rounds.dir(1)))
    book = _open_book(cfg)
    if not (cfg.reward_model or cfg.reward_fn):
        console.say("iterate", f"judge: --reward-fn {DEFAULT_REWARD_FN} (no judge given; see stages/rewards.py)")

    with Lease(cfg.output, "iterate"):
        policy, last = _rounds(cfg, rounds, book)
        if cfg.score_final and last and last + 1 not in book.state.rounds:
            # the last policy's own samples, for its judge score (round k+1 judges policy k's samples otherwise)
            _sample_and_judge(rounds, book, (last, True), storage.join(rounds.dir(last), "samples"), policy,
                              cfg.seed + last, f"round {last} policy")
        book.state = dataclasses.replace(book.state, finished_at=utc_now())
        book.save()
        write_summary(cfg, book.state.to_json())
    return book.state.to_json()


def _rounds(cfg: IterateConfig, rounds: Rounds, book: Book) -> tuple[str, int]:
    """Rounds 1..--rounds, those finished kept, at most --new-rounds unfinished run; (last policy, its round)."""
    policy, ran, last = cfg.model, 0, 0
    for k in range(1, cfg.rounds + 1):
        if not _finished(cfg, book.state.round(k)):
            if cfg.new_rounds and ran >= cfg.new_rounds:
                console.say("iterate", f"stopping before round {k} (--new-rounds {cfg.new_rounds}); the same "
                            "command runs it next time")
                break
            ran += 1
        policy, last = _round(cfg, rounds, book, k, policy), k
    return policy, last


def _check_judge_and_refs(cfg: IterateConfig, judge_cfg: JudgeConfig) -> None:
    """What the rounds use only after sampling (the judge) or training (the held-out refs), checked first:
    a typo found there would cost a round."""
    from stages.core.online.judges import check_reward_model, load_reward_fn
    from stages.core.runtime.models import resolve_model

    if judge_cfg.judge == "reward_model":
        check_reward_model(resolve_model(judge_cfg.reward_model))
    elif judge_cfg.judge == "reward_fn":
        load_reward_fn(judge_cfg.reward_fn)
    if cfg.eval_refs and not storage.exists(storage.join(cfg.eval_refs, "manifest.json")):
        raise DataError(f"--eval-refs {cfg.eval_refs}: no manifest.json: not a finished precompute output (make "
                        "held-out refs with pipeline.py precompute --data HELDOUT --output REFS)")


def _finished(cfg: IterateConfig, record: RoundState) -> bool:
    """Whether a round's last stage is recorded as done."""
    return record.finished("eval" if cfg.eval_refs else "train")


def _step(book: Book, at: tuple[int, bool], name: str, done_url: str, who: str, what: str, action) -> None:
    """Run one stage of a round (`at`: round k, and whether of its samples) unless it is recorded as finished
    and its output is there; a stage run again makes the later stages of its round stale (they run again
    too)."""
    if _done(book.part(*at).get(name), done_url):
        console.say("iterate", f"{who}: {name} done before, kept")
        return
    console.say("iterate", f"{who}: {name} {what}")
    book.record(*at, name, {**action(), "finished_at": utc_now()})


def _sample_and_judge(rounds: Rounds, book: Book, at: tuple[int, bool], where: str, model: str, seed: int,
                      who: str) -> None:
    gen_cfg, judge_cfg = rounds.generate(where, model, seed), rounds.judge(where)

    def sample() -> dict:
        m = generate.run(gen_cfg)
        print(generate.summary(m, gen_cfg.output), flush=True)
        return {"model": model, "seed": seed, **m["counts"]}

    def judged() -> dict:
        m = judge.run(judge_cfg)
        print(judge.summary(m, judge_cfg), flush=True)
        return {**m["counts"], "mean_score": m["mean_score"], "mean_margin": m["mean_margin"],
                "rejects_by_reason": m["rejects_by_reason"], "judge_errors": m.get("judge_errors")}

    _step(book, at, "generate", storage.join(gen_cfg.output, "manifest.json"), who, f"-> {gen_cfg.output}", sample)
    _step(book, at, "judge", storage.join(judge_cfg.output, "manifest.json"), who, f"-> {judge_cfg.output}", judged)


def no_pairs(k: int, judged: dict) -> str:
    """Why round k cannot train: the judge's reject reasons, and its first failure when it had any."""
    reasons = ", ".join(f"{reason} {n}" for reason, n in judged["rejects_by_reason"].items())
    errors = judged.get("judge_errors")
    failed = f"; first judge error: {judge.first_error_text(errors)}" if errors else ""
    advice = ("Fix the judge, or sample more (--num-samples, --temperature)" if errors else
              "Sample more (--num-samples, --temperature), lower --min-margin, or use another judge")
    return (f"round {k}: the judge made no pairs from {judged['candidates']} candidates ({reasons}{failed}): "
            f"nothing to train on. {advice}")


def _round(cfg: IterateConfig, rounds: Rounds, book: Book, k: int, previous: str) -> str:
    """Round k from policy k-1 (`previous`); returns policy k."""
    who = f"round {k}"
    at = (k, False)
    _sample_and_judge(rounds, book, at, rounds.dir(k), previous, cfg.seed + k - 1, who)
    judged = book.state.round(k).get("judge")
    if judged["pairs"] == 0:
        raise IterateError(no_pairs(k, judged))

    reference = cfg.model if cfg.reference == "initial" else previous
    pre_cfg = rounds.precompute(k, reference)

    def scored() -> dict:
        m = precompute.run(pre_cfg)
        print(precompute.summary(m, pre_cfg.output), flush=True)
        return {"reference": reference, "new_pairs": m.last_run.pairs_written, "pairs_in_refs": m.rows_written}

    _step(book, at, "precompute", storage.join(pre_cfg.output, "manifest.json"), who,
          f"(reference {reference}) -> {pre_cfg.output}", scored)

    train_cfg = rounds.train(k, previous)

    def trained() -> dict:
        started = time.time()
        result = train.run(train_cfg)
        print(train.summary_text(result), flush=True)
        return {"start": previous, "outcome": result["outcome"], "steps": result["steps"],
                "weights": result["weights"], "last": result.get("last"), "seconds": round(time.time() - started, 1)}

    weights = book.state.round(k).get("train").get("weights")
    _step(book, at, "train", storage.join(weights, "config.json") if weights else train_cfg.output, who,
          f"{previous} on {train_cfg.refs} -> {train_cfg.output}", trained)
    policy = book.state.round(k).get("train")["weights"]

    if cfg.eval_refs:
        eval_cfg = rounds.eval(k, policy)

        def evaluated() -> dict:
            results = evaluate.run_on_its_device(eval_cfg)
            print(evaluate.summary_text(results), flush=True)
            return {key: v for key, v in results.items() if key.startswith("eval/") or key == "pairs"}

        _step(book, at, "eval", storage.join(eval_cfg.output, "eval.json"), who, f"{cfg.eval_refs} with {policy}",
              evaluated)
    return policy


# --- the report ---------------------------------------------------------------------------------------

def table_rows(state: dict) -> list[dict]:
    """One row per policy: 0 (the initial model) .. K. A policy's judge score is that of its own samples:
    round k+1's candidates (the last policy: its round's samples/, with --score-final). `state`: iterate.json's
    content."""
    rounds = IterateState.from_json(state).rounds
    ks = sorted(rounds)
    rows = []
    for k in [0] + ks:
        r = rounds.get(k, RoundState())
        sampled_by_it = rounds[k + 1] if k + 1 in ks else (r.samples or RoundState())
        ev = r.get("eval")
        if k == 0 and any("eval" in rounds[j].stages for j in ks):
            # the initial model against itself as reference: no margin, no KL, by definition (its "accuracy"
            # would be 0, every reward 0: a tie, not a preference, so it is left out)
            ev = {"eval/rewards/margins": 0.0, "eval/kl_sampled": 0.0}
        rows.append({"round": k, "policy": "initial" if k == 0 else r.get("train").get("weights"),
                     "new_pairs": r.get("precompute").get("new_pairs"),
                     "steps": r.get("train").get("steps"),
                     "accuracy": ev.get("eval/rewards/accuracies"), "margin": ev.get("eval/rewards/margins"),
                     "kl": ev.get("eval/kl_sampled"), "judge_score": sampled_by_it.get("judge").get("mean_score")})
    return rows


def write_summary(cfg: IterateConfig, state: dict) -> None:
    rows = table_rows(state)
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["# On-policy rounds\n",
             f"initial model `{cfg.model}`, prompts `{cfg.prompts}`, reference: {cfg.reference}, judge: "
             f"{cfg.reward_model or cfg.reward_fn or DEFAULT_REWARD_FN}, {cfg.num_samples} samples per prompt "
             f"(temperature {cfg.temperature}, top_p {cfg.top_p}, max {cfg.max_new_tokens} new tokens).\n",
             "Round 0 is the initial model. Held-out figures are against the initial model as reference "
             f"({cfg.eval_refs or 'no --eval-refs: none'}); the judge score is the mean over the policy's own "
             "samples (those the next round judged).\n",
             "| round | new pairs | steps | held-out accuracy | held-out margin | KL to initial (sampled, nats/seq) "
             "| mean judge score of its samples |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['round']} | {fmt(r['new_pairs'])} | {fmt(r['steps'])} | {fmt(r['accuracy'])} | "
                     f"{fmt(r['margin'])} | {fmt(r['kl'])} | {fmt(r['judge_score'])} |")
    lines.append("\n![rounds](rounds.png)\n")
    storage.write_bytes_atomic(storage.join(cfg.output, "summary.md"), "\n".join(lines).encode())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rounds.png")
        rounds_plot(rows, path)
        with open(path, "rb") as fh:
            storage.write_bytes_atomic(storage.join(cfg.output, "rounds.png"), fh.read())


def rounds_plot(rows: list[dict], path: str) -> str:
    from stages.core.plots import figure

    panels = [("held-out accuracy", "accuracy"), ("held-out margin", "margin"), ("KL to initial (sampled)", "kl"),
              ("mean judge score of its samples", "judge_score")]
    with figure(path, len(panels), (3.6, 3.0), "on-policy rounds (round 0: the initial model)") as axes:
        for ax, (name, key) in zip(axes, panels):
            points = [(r["round"], r[key]) for r in rows if r[key] is not None]
            if points:
                ax.plot(*zip(*points), "o-", color="#4c72b0")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("round")
            ax.set_xticks([r["round"] for r in rows])
            ax.grid(alpha=0.3)
    return path


def summary_text(state: dict) -> str:
    lines = [f"iterate: {len(state.get('rounds', {}))} rounds -> summary.md, rounds.png"]
    for r in table_rows(state):
        parts = [f"round {r['round']}"]
        for key, name in (("new_pairs", "new pairs"), ("accuracy", "accuracy"), ("margin", "margin"),
                          ("kl", "KL"), ("judge_score", "judge score")):
            if r[key] is not None:
                parts.append(f"{name} {r[key]:.4f}" if isinstance(r[key], float) else f"{name} {r[key]}")
        lines.append("  " + ", ".join(parts))
    return "\n".join(lines)
