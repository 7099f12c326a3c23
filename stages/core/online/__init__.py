"""online: new preference data from a policy (floor 5, the top of the library: imports anything below).

    sampling        the sampler actor of generate (seeded per prompt and sample; transformers or vLLM)
    judges          reward model, reward function and implicit-reward judges; scores -> pairs
    candidate_rows  judge's candidates: one row per usable response, grouped by prompt; the per-prompt seed
    sheet           judge's human labelling sheet: export it, read the marked labels back as pairs
    outputs         generate's and judge's output folders: finished with these settings?
    rounds          iterate's record of its rounds, as types
"""
