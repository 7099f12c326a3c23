"""scoring: exact log-probs of the tokens TRL would score (floor 2: imports inputs, runtime and floor 0).

    truncation      `Truncation` (max_length, max_prompt_length, mode) and its rules: what is cut, what is scored
    logprobs        THE log-prob function: summed log-probs of completion tokens, padded or packed rows
    packing         rows and masks (prompt once, chosen and rejected beside it) and cutting a call into forwards
    scorer          precompute's Ray Data steps: tokenize tasks and the reference scorer actor
"""
