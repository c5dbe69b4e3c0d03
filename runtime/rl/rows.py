"""Training rows of the RL learners: [prompt][completion][padding], and the mask of completion targets."""

from __future__ import annotations

import numpy as np


def pack_rows(prompts: list[list[int]], completions: list[list[int]], seq_len: int, pad: int):
    """Training rows (N, T) int64 and the completion-target mask (N, T-1) f32.

    mask[b, t] = 1 where token t+1 of row b is a completion token (EOS included).
    """
    n = len(prompts)
    ids = np.full((n, seq_len), pad, np.int64)
    mask = np.zeros((n, seq_len - 1), np.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        row = (list(p) + list(c))[:seq_len]
        ids[b, :len(row)] = row
        mask[b, len(p) - 1:len(row) - 1] = 1.0
    return ids, mask
