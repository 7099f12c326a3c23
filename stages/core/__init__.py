"""The library the commands share; no module here is a command (those live in `stages/`).

Rooms named for the pipeline step they serve, on floors: a module imports only from its own floor or
below, so imports point down the pipeline (tests/test_house.py holds it):

    floor 0   errors, storage, lease, plots, console, config/   the user-facing error base; fsspec I/O;
                                                                 one writer per output; pictures; the
                                                                 message channel; option classes + engine
    floor 1   inputs/    readers, files, folders, formats, unpaired, prompts, candidates, tokenization (never a model)
              runtime/   devices, cluster (Ray), models, preemption (never the data readers)
    floor 2   scoring/   truncation, logprobs, packing, scorer
    floor 3   refs/      the precompute output folder: manifest, identity, output, plan, writer, stream
    floor 4   training/  losses, policy_pass, trainer, parallel, distributed, checkpoint, metrics, ...
    floor 5   online/    sampling, judges, outputs, rounds
    then      stages/*.py, the commands; only the chain commands (iterate, nightly = `run`, sweep) import
              other commands (their public run())

Each room's `__init__` lists its modules. Shared helpers are public names: no module imports another
module's `_private` names.
"""
