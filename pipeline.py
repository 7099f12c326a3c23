#!/usr/bin/env python
"""dpo-refstream: offline reference log-probs + streaming DPO.

    python pipeline.py precompute [--config FILE.yaml] [--flags ...]
    python pipeline.py train      [--config FILE.yaml] [--flags ...]
    python pipeline.py eval       --refs HELDOUT_REFS --model RUN/final [--samples N]
    python pipeline.py sweep      --refs REFS --eval-refs HELDOUT_REFS --beta 0.01,0.05,0.1,0.5
    python pipeline.py inspect    REFS
    python pipeline.py run        --data DATA --refs REFS --runs RUNS [--eval-refs HELDOUT_REFS] [--flags ...]
    python pipeline.py generate   --prompts PROMPTS --model MODEL --output CANDIDATES [--num-samples N]
    python pipeline.py judge      --candidates CANDIDATES --output PAIRS --reward-fn mod:fn
                                  (or --reward-model M, --labels SHEET, --implicit POLICY --refs REFS)
    python pipeline.py iterate    --prompts PROMPTS --model SFT --output ONLINE --rounds K [--eval-refs HELDOUT_REFS]
    python pipeline.py submit     jobs/precompute.yaml --address http://HEAD:8265 [--wait] [-- extra flags]

Thin on purpose: parse the config, call a stage, print its summary.
"""

from __future__ import annotations

import os
import sys

# Before any tokenizer is loaded: the fast tokenizers' thread pool cannot survive the forks of Ray
# workers and data loaders (tokenizers then warns on every fork and turns its threads off anyway).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _precompute(argv: list[str]) -> int:
    from stages import precompute
    from stages.core.config.engine import parse_args
    from stages.core.config.options import PrecomputeConfig

    cfg = parse_args(PrecomputeConfig, argv, prog="pipeline.py precompute",
                     description="Score every preference pair with the frozen reference model; write Parquet shards.")
    manifest = precompute.run(cfg)
    print(precompute.summary(manifest, cfg.output))
    return 0


def _train(argv: list[str]) -> int:
    from stages import train
    from stages.core.config.engine import parse_args
    from stages.core.config.options import TrainConfig

    cfg = parse_args(TrainConfig, argv, prog="pipeline.py train",
                     description="Train the policy with DPO (or a variant) from precomputed reference shards.")
    print(train.summary_text(train.run(cfg)))
    return 0


def _eval(argv: list[str]) -> int:
    from stages import evaluate
    from stages.core.config.engine import parse_args
    from stages.core.config.options import EvalConfig

    cfg = parse_args(EvalConfig, argv, prog="pipeline.py eval",
                     description="Score held-out pairs with a policy: accuracy, margins, rewards, KL to the reference.")
    print(evaluate.summary_text(evaluate.run(cfg)))
    return 0


def _sweep(argv: list[str]) -> int:
    from stages import sweep
    from stages.core.config.engine import parse_args
    from stages.core.config.options import SweepConfig

    cfg = parse_args(SweepConfig, argv, prog="pipeline.py sweep",
                     description="Short training runs over several betas on shared shards; accuracy/margin vs KL.")
    rows = sweep.run(cfg)
    print(sweep.table(rows) + f"-> {cfg.output}/sweep.png, sweep.md, sweep.json")
    return 0


def _run(argv: list[str]) -> int:
    from stages import nightly
    from stages.core.config.chain import RunConfig
    from stages.core.config.engine import parse_args

    cfg = parse_args(RunConfig, argv, prog="pipeline.py run",
                     description="The nightly chain in one process (one Ray job): precompute the rows not yet scored, "
                                 "train into RUNS/nightly-DATE, evaluate on held-out refs.")
    print(nightly.summary_text(nightly.run(cfg)))
    return 0


def _generate(argv: list[str]) -> int:
    from stages import generate
    from stages.core.config.engine import parse_args
    from stages.core.config.online import GenerateConfig

    cfg = parse_args(GenerateConfig, argv, prog="pipeline.py generate",
                     description="Sample N responses per prompt from a model (Ray actors); Parquet + manifest.")
    print(generate.summary(generate.run(cfg), cfg.output))
    return 0


def _judge(argv: list[str]) -> int:
    from stages import judge
    from stages.core.config.engine import parse_args
    from stages.core.config.online import JudgeConfig

    cfg = parse_args(JudgeConfig, argv, prog="pipeline.py judge",
                     description="Score candidates (reward model, function, human labels or implicit reward) and "
                                 "write preference pairs that precompute reads.")
    print(judge.summary(judge.run(cfg), cfg))
    return 0


def _iterate(argv: list[str]) -> int:
    from stages import iterate
    from stages.core.config.chain import IterateConfig
    from stages.core.config.engine import parse_args

    cfg = parse_args(IterateConfig, argv, prog="pipeline.py iterate",
                     description="On-policy DPO rounds: generate -> judge -> precompute -> train (-> eval), "
                                 "round k+1 sampling from round k's policy; resumable.")
    print(iterate.summary_text(iterate.run(cfg)))
    return 0


def _inspect(argv: list[str]) -> int:
    from stages import inspect_refs

    return inspect_refs.main(argv)


def _submit(argv: list[str]) -> int:
    from stages import submit

    return submit.main(argv)


COMMANDS = {"precompute": _precompute, "train": _train, "eval": _eval, "inspect": _inspect, "sweep": _sweep,
            "run": _run, "generate": _generate, "judge": _judge, "iterate": _iterate, "submit": _submit}


# Words a user may try for a command, from the files and docs that name it so (jobs/nightly.yaml).
ALIASES = {"nightly": "run", "evaluate": "eval", "verify": "inspect"}

# What Ctrl-C leaves and what running the same command again does, per command (see each stage's docstring).
INTERRUPTED = {
    "precompute": "finished shards are kept: run the same `pipeline.py precompute` again and it skips them",
    "train": "continue from the last checkpoint with `pipeline.py train ... --resume auto` (checkpoints are "
             "written every --save-every steps, and on SIGTERM (`kill PID`) before it stops; with none it starts "
             "over)",
    "eval": "nothing is kept: the same `pipeline.py eval` evaluates again from the start",
    "sweep": "the same `pipeline.py sweep` trains every beta again (each beta's run starts over: --overwrite "
             "is on by default)",
    "run": "re-run `pipeline.py run` with the same --date: rows already scored are not scored again and "
           "training resumes from its latest checkpoint, if it wrote one",
    "generate": "the same `pipeline.py generate` samples again from the start, replacing the files written so "
                "far (the same seed gives the same samples)",
    "judge": "the same `pipeline.py judge` judges again from the start",
    "iterate": "finished stages are kept: the same `pipeline.py iterate` goes on with the stage that was cut off",
    "inspect": "nothing was written by `pipeline.py inspect`; run it again",
    "submit": "a job already submitted keeps running on the cluster (`ray job list`); `pipeline.py submit` "
              "again submits another unless the spec sets submission_id",
}


def unknown_command(word: str) -> str:
    """The one line for a first word that is no command, naming the real ones."""
    import difflib

    if word.startswith("-"):
        return f"the command comes first (`pipeline.py COMMAND {word} ...`); commands: {', '.join(COMMANDS)}"
    guess = ALIASES.get(word.lower()) or next(iter(difflib.get_close_matches(word, COMMANDS, n=1)), None)
    hint = f" (did you mean '{guess}'?)" if guess else ""
    return f"unknown command '{word}'{hint}; commands: {', '.join(COMMANDS)} (`pipeline.py --help` shows them)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(COMMANDS)}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: {unknown_command(argv[0])}", file=sys.stderr)
        return 2
    from stages.core.errors import PipelineError, unwrap
    from stages.core.runtime.preemption import Preempted

    try:
        return COMMANDS[argv[0]](argv[1:])
    except Preempted as e:  # SIGTERM: the checkpoint is written; 143 = 128 + SIGTERM, as a killed process
        print(str(e), file=sys.stderr)
        return 143
    except PipelineError as e:  # every user-facing error; anything else is a bug and keeps its traceback
        print(f"error: {unwrap(e) or e}", file=sys.stderr)  # raised in a Ray worker: its own line, not Ray's
        return 2
    except Exception as e:  # a write refused (no space, no permission, read-only), wherever a stage made it
        from stages.core.storage import write_refused

        refused = write_refused(e)
        if refused is None:
            raise
        print(f"error: {refused}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line saying what was kept and what the same command does next
        print(f"\ninterrupted: {INTERRUPTED[argv[0]]}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
