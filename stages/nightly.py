"""`pipeline.py run`: the nightly chain as one program, so a scheduled job is one command.

precompute (incremental: only rows REFS has not seen are scored) -> train into RUNS/nightly-DATE
(the date computed here, in UTC, not by a shell) -> eval on held-out refs when given. A KubeRay
submitter pod pastes an entrypoint into `bash -c`: a chain written with `&&` and `$(date)` would
run its second half in that pod. As one process it is one Ray job, and each stage takes its
output's lease, so an overlapping night fails naming the run that holds it.

A re-run of the same date (a retried job) goes on where the last stopped: precompute finds nothing
new, train resumes from its latest checkpoint, and a training run already finished on the same
refs is not repeated. RUN/run.json records what each stage did; RUNS/latest.json names the last
finished run.

Schedules cannot pile up: the chain holds a lease on RUNS for its whole run, so a second chain (a
duplicated tick, a night started by hand) is refused while one runs, before it scores anything; and
a night whose run finished is refused (one line, exit 2) unless --rerun, so a duplicate that comes
after it scores and trains nothing either.
"""

from __future__ import annotations

import dataclasses

from stages import evaluate, precompute, train
from stages.core import console, storage
from stages.core.config.chain import RUN_OWNS, Chain, RunConfig, utc_now
from stages.core.config.options import EvalConfig, PrecomputeConfig, TrainConfig
from stages.core.errors import PipelineError
from stages.core.lease import Lease


def run_dir(cfg: RunConfig) -> str:
    date = cfg.date or utc_now()[:10]  # YYYY-MM-DD of the UTC timestamp
    return storage.join(cfg.runs, cfg.run_name.format(date=date))


def stage_configs(cfg: RunConfig, out: str) -> tuple[PrecomputeConfig, TrainConfig, EvalConfig | None]:
    """Each stage's config (`Chain.build`), all built before any stage runs: a bad option fails first."""
    chain = Chain(cfg, RUN_OWNS, "the chain", hint="use the run's own keys: data, model, refs, runs, eval_refs")
    workers = {"num_workers": cfg.num_workers}
    pre = chain.build(PrecomputeConfig, "precompute", workers, {"data": cfg.data, "model": cfg.model,
                                                                "output": cfg.refs})
    tr = chain.build(TrainConfig, "train", workers, {"refs": cfg.refs, "output": out, "resume": "auto"})
    ev = None
    if cfg.eval_refs:
        ev = chain.build(EvalConfig, "eval", {}, {"refs": cfg.eval_refs, "model": storage.join(out, "final"),
                                                  "output": storage.join(out, "eval")})
    return pre, tr, ev


class NightDone(PipelineError):
    """This night's run finished already (a duplicated or late schedule): refused unless --rerun."""


def run(cfg: RunConfig) -> dict:
    """Run the chain; returns RUN/run.json's content."""
    storage.configure(cfg.storage_options_dict)
    with Lease(storage.absolute(cfg.runs), "run"):  # one chain at a time over these runs
        return _run(cfg)


def _run(cfg: RunConfig) -> dict:
    out = storage.absolute(run_dir(cfg))
    cfg = dataclasses.replace(cfg, refs=storage.absolute(cfg.refs), eval_refs=storage.absolute(cfg.eval_refs))
    pre_cfg, train_cfg, eval_cfg = stage_configs(cfg, out)
    record_path = storage.join(out, "run.json")
    record = storage.read_json(record_path) if storage.exists(record_path) else {}
    if record.get("finished_at") and not cfg.rerun:
        raise NightDone(f"{out} finished at {record['finished_at']} (its run.json): this night is not run again, "
                        "so a duplicated schedule scores and trains nothing; pass --rerun to run it again")
    record.pop("finished_at", None)
    record.update(run=out, data=cfg.data, refs=cfg.refs, started_at=utc_now())
    stages = record.setdefault("stages", {})

    console.say("run", f"precompute {cfg.data} -> {cfg.refs}")
    manifest = precompute.run(pre_cfg)
    print(precompute.summary(manifest, cfg.refs), flush=True)
    refs_id = {"pair_ids_fingerprint": manifest.pair_ids_fingerprint, "rows_written": manifest.rows_written}
    stages["precompute"] = {**refs_id, "kind": manifest.kind, "last_run": manifest.last_run.to_json(),
                            "finished_at": utc_now()}
    storage.write_json(record_path, record)

    done = stages.get("train", {})
    if done.get("outcome") in ("finished", "early_stopped") and done.get("refs") == refs_id:
        console.say("run", f"train already finished on these refs -> {done['weights']} (not repeated)")
    else:
        console.say("run", f"train {cfg.refs} -> {out}")
        result = train.run(train_cfg)
        print(train.summary_text(result), flush=True)
        stages["train"] = {"outcome": result["outcome"], "steps": result["steps"], "weights": result["weights"],
                           "refs": refs_id, "last": result["last"], "finished_at": utc_now()}
        stages.pop("eval", None)  # new weights: an older evaluation no longer describes them
        storage.write_json(record_path, record)

    if eval_cfg is not None and "eval" not in stages:
        eval_cfg = dataclasses.replace(eval_cfg, model=stages["train"]["weights"])
        console.say("run", f"eval {cfg.eval_refs} with {eval_cfg.model}")
        results = evaluate.run_on_its_device(eval_cfg)
        print(evaluate.summary_text(results), flush=True)
        stages["eval"] = {k: v for k, v in results.items() if k.startswith("eval/") or k in ("pairs", "kind")}
        stages["eval"]["finished_at"] = utc_now()
    record["finished_at"] = utc_now()
    storage.write_json(record_path, record)
    storage.write_json(storage.join(cfg.runs, "latest.json"),
                       {"run": out, "weights": stages["train"]["weights"], "date": record["finished_at"]})
    return record


# The eval figures in the summary, those the run's loss reports: pairs have an accuracy, KTO a KL estimate.
EVAL_KEYS = ("eval/rewards/accuracies", "eval/rewards/margins", "eval/kl", "eval/loss")


def summary_text(record: dict) -> str:
    lines = [f"run: {record['run']}"]
    for name, stage in record["stages"].items():
        lines.append(f"  {name:<10} {_STAGE_LINES[name](stage)}")
    return "\n".join(lines)


def _precompute_line(stage: dict) -> str:
    unit = "examples" if stage.get("kind") == "unpaired" else "pairs"  # records before `kind`: pairs
    return f"{stage['last_run']['pairs_written']} new {unit}, {stage['rows_written']} in all"


_STAGE_LINES = {
    "precompute": _precompute_line,
    "train": lambda s: f"{s['outcome']} at step {s['steps']} -> {s['weights']}",
    "eval": lambda s: ", ".join(f"{k} {s[k]:.4f}" for k in EVAL_KEYS if k in s),
}
