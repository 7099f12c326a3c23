"""inputs: the data as the user gives it, read and turned into TRL's rows and tokens (floor 1: imports
only errors, storage, config and the rest of inputs; never a device, a model or Ray).

    readers         files, folders, globs, Hub names and saved datasets -> raw rows (JSONL, JSON, CSV,
                    Parquet, .gz / .xz / .zst); what an output folder is; embedded sample sets
    formats         input layouts (standard, ultrafeedback, hh, sharegpt, openai, helpsteer3) -> TRL rows;
                    `Columns`, the column names; `RowRejected`, a row's reject reason
    unpaired        unpaired rows (KTO: prompt, completion, label); unpairing pairs; TRL's KL partners
    prompts         prompts for generate: plain lists, prompt-only rows, or the prompts of pairs and candidates
    candidates      generate's output read back (judge's input; prompts sampled again)
    tokenization    TRL's DPOTrainer tokenization, untruncated (truncation: scoring.truncation)
"""
