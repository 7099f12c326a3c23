"""inputs: the data as the user gives it, read and turned into TRL's rows and tokens (floor 1: imports
only errors, storage, config and the rest of inputs; never a device, a model or Ray).

    readers         an input (files, folders, Hub names, saved datasets) -> raw rows in input order;
                    the columns a layout needs
    files           one file -> its rows by format (JSONL, JSON, CSV, Parquet, .gz / .xz / .zst);
                    `DataError`, `MalformedRow`
    folders         which files a path names; embedded sample sets; this project's output folders as input
    formats         input layouts (standard, ultrafeedback, hh, sharegpt, openai, helpsteer3) -> TRL rows;
                    `Columns`, the column names; `RowRejected`, a row's reject reason
    unpaired        unpaired rows (KTO: prompt, completion, label); unpairing pairs; TRL's KL partners
    prompts         prompts for generate: plain lists, prompt-only rows, or the prompts of pairs and candidates
    candidates      generate's output read back (judge's input; prompts sampled again)
    tokenization    TRL's DPOTrainer tokenization, untruncated (truncation: scoring.truncation)
"""
