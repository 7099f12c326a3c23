"""The pipeline's commands, one module each; the library they share is `stages.core`.

    precompute.py    pipeline.py precompute   reference log-probs -> Parquet shards + manifest.json
    train.py         pipeline.py train        the policy from the shards (one process or Ray Train)
    evaluate.py      pipeline.py eval         held-out accuracy, margins, KL; side-by-side samples
    sweep.py         pipeline.py sweep        one training run per beta on shared shards
    nightly.py       pipeline.py run          precompute -> train -> eval as one command (a scheduled job)
    inspect_refs.py  pipeline.py inspect      what a precompute output holds
    submit.py        pipeline.py submit       a jobs/*.yaml spec to a Ray cluster
    generate.py      pipeline.py generate     candidate answers per prompt from a model (Ray actors)
    judge.py         pipeline.py judge        candidates -> preference pairs (reward function or model, labels,
                                              a policy's implicit reward)
    iterate.py       pipeline.py iterate      on-policy rounds: generate -> judge -> precompute -> train -> eval
    rewards.py       (judge --reward-fn)      example reward functions, not a command

Chain commands (nightly, iterate, sweep) call the others' public `run` only; every other command is a
leaf and imports no other command (tests/test_house.py).

A command parses nothing (pipeline.py does), runs its stage and returns what it did.
"""
