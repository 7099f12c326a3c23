"""The library the commands share; no module here is a command (those live in `stages/`).

Dependency order, lowest first (a module imports only from lines above it):

    errors                                   the one user-facing error base
    config                                   typed stage configs, YAML + flags
    storage                                  fsspec I/O, atomic writes, retries, the cache folder
    lease                                    one run at a time writes an output (a lease with a heartbeat)
    devices, models                          device and thread choice; loading models and tokenizers
    formats, data, tokenization              input layouts, readers, TRL's tokenization and truncation
    logprobs, layout                         THE log-prob function; batch layout and forward planning
    row_plan                                 precompute's Ray steps up to the shards: read, copies, duplicates
    scorer                                   Ray Data steps of precompute (tokenize tasks, scorer actors)
    shard_writer                             precompute's last steps: writer actors, shard files, markers
    losses, policy_pass                      the loss family; one policy pass (train, eval)
    shard_stream, checkpoint, metrics, plots the trainer's reading, saving and logging
    distributed, early_stopping, trainer     the training loop and its parts
    ray_runtime                              starting Ray; launching Ray Train workers
"""
