"""refs: the precompute output folder's one owner (floor 3: imports scoring and below).

    manifest        manifest.json as types (Manifest, ShardEntry, LastRun): read, write, validate
    identity        "same settings?": one check and one error shape (precompute, generate, judge)
    output          the folder's bookkeeping between runs: markers, keys files, verify and repair
    plan            precompute's Ray steps up to the shards: count, read, the driver's side, KL pairing
    duplicates      the plan's rows (PLAN_SCHEMA); steps 3 and 4 per block: copies numbered, duplicates
    sharding        step 5: each new row's shard, chunks for the tokenize tasks; `Plan`
    scoring_run     precompute's scorer pools over the plan: a new pool when a scorer dies, the bar
    writer          writer actors: shard and rejects files, markers
    stream          reading shards back for training and eval (one micro-batch at a time)
"""
