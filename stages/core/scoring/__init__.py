"""scoring: exact log-probs of the tokens TRL would score (floor 2: imports inputs, runtime and floor 0).

    truncation      `Truncation` (max_length, max_prompt_length, mode) and its rules: what is cut, what is scored
    logprobs        THE log-prob function: summed log-probs of completion tokens, padded or packed rows
    packing         rows and masks (prompt once, chosen and rejected beside it) and cutting a call into forwards
    attention       the `attention` setting: which path packed rows take (dense, flex, varlen), held over backward
    flat            pairs end to end in one sequence: the layout flex and varlen share
    flex            that layout under a FlexAttention BlockMask
    varlen          that layout as variable-length documents for flash attention's varlen kernels
    scorer          precompute's Ray Data steps: tokenize tasks and the reference scorer actor
"""
