"""runtime: where the work runs (floor 1: imports only errors, storage, config, console and the rest of
runtime; never the data readers).

    devices         the device (cuda / cpu) and thread count of a process; GPUs for Ray workers
    cluster         starting Ray (local or a cluster), Ray Data actor pools, launching Ray Train workers
    models          loading models and tokenizers (local, hub, object storage: cached), their identity hashes
    preemption      SIGTERM: finish the step, checkpoint, exit; `--resume auto` continues
"""
