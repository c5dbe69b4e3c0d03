"""Mixed-precision products, one rule for every exporter's `compute_dtype` (nanoGPT's and the RL learners')."""

from __future__ import annotations

import torch
import torch.nn.functional as F

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The `compute_dtype` values a module's matmuls may take (nanoGPT's and the RL learners')."""


def mixed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x @ weight.T (+ bias) with the product in `dtype`: both operands rounded to it, accumulated in fp32 and
    the product rounded to it (torch's CPU autocast for F.linear), returned in x's dtype, the bias added after
    in that dtype."""
    y = F.linear(x.to(dtype), weight.to(dtype)).to(x.dtype)
    return y if bias is None else y + bias
