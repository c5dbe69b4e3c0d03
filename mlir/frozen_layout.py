"""How an adapter training module takes its frozen base weights: some of them transposed.

The base is frozen, so the backward pass needs only the input gradient of each base matmul, dy · W for
y = x · Wᵀ (W out x in). Without data tiling (adapter modules compile without it, mlir/compile.py
ADAPTER_TRAINING_CPU_FLAGS) IREE's llvm-cpu code runs that product, a reduction down W's columns, slowly when
the output is long: on an Intel AVX-512 host, 46 GFLOP/s for Qwen2.5-0.5B's gate/up projections
(4864 x 896) and 12 for the tied lm_head (151936 x 896), against ~180 for the forward. With the weight
stored transposed (in x out, contiguous) the same products ran at 139 and 111, and the forward x · Wᵀ at
174 and 101 (bench/NOTES.md, "An Intel AVX-512 + AMX host").

So a weight whose output is at least twice its input is a frozen input named NAME.T holding Wᵀ. The
embedding stays as it is (the token lookup reads its rows); a tied model's lm_head, which is the embedding,
gets an extra input model.embed_tokens.weight.T (its transpose, one more copy of the embedding). The flat
weight file and the base model's order are unchanged: `base_of` maps a module's frozen inputs back to them,
`frozen_arrays` makes the inputs from the base weights once, at load.
"""

from __future__ import annotations

from pcpc.mlir.signature import TensorSpec

TRANSPOSED = ".T"
EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def _long_output(shape) -> bool:
    return len(shape) == 2 and shape[0] >= 2 * shape[1]


def frozen_specs(base: list[TensorSpec]) -> list[TensorSpec]:
    """The frozen inputs for the base weights `base` (in their order; a tied head's extra input last)."""
    names = {p.name for p in base}
    out = []
    for p in base:
        if _long_output(p.shape) and p.name != EMBEDDING:
            out.append(TensorSpec(p.name + TRANSPOSED, "frozen", tuple(p.shape[::-1]), p.dtype))
        else:
            out.append(TensorSpec(p.name, "frozen", tuple(p.shape), p.dtype))
    embed = next((p for p in base if p.name == EMBEDDING), None)
    if embed is not None and HEAD not in names and _long_output(embed.shape):
        out.append(TensorSpec(EMBEDDING + TRANSPOSED, "frozen", tuple(embed.shape[::-1]), embed.dtype))
    return out


def source(spec_name: str) -> tuple[str, bool]:
    """(the base weight a frozen input holds, whether transposed)."""
    if spec_name.endswith(TRANSPOSED):
        return spec_name[: -len(TRANSPOSED)], True
    return spec_name, False


def index_of(frozen: list[TensorSpec]) -> dict[str, int]:
    """{base weight name: position of the frozen input that holds it} (a tied head's extra copy is not it)."""
    out: dict[str, int] = {}
    for i, s in enumerate(frozen):
        out.setdefault(source(s.name)[0], i)
    return out


def base_of(frozen: list[TensorSpec]) -> list[TensorSpec]:
    """The base weights' specs (the flat weight file's layout) from a module's frozen inputs."""
    present = {s.name for s in frozen}
    out = []
    for s in frozen:
        name, t = source(s.name)
        if t and name in present:
            continue  # an extra transposed copy (a tied head)
        out.append(TensorSpec(name, s.role, tuple(s.shape[::-1]) if t else tuple(s.shape), s.dtype))
    return out


def frozen_arrays(frozen: list[TensorSpec], base: dict, transpose=None) -> list:
    """The frozen inputs' host arrays from {base name: array} (numpy or torch): transposed copies where the
    layout says (`transpose(a.T)` makes the copy; default a contiguous one), the others as they are."""
    import numpy as np

    transpose = transpose or np.ascontiguousarray
    out = []
    for s in frozen:
        name, t = source(s.name)
        a = np.asarray(base[name])
        out.append(transpose(a.T) if t else a)
    return out


def as_weights(weights: dict, tied_head: bool = True) -> dict:
    """The traced function's view of its inputs: NAME.T becomes NAME (a transposed view, so x · Wᵀ reads
    the stored Wᵀ as it lies); with `tied_head`, the tied head's copy becomes lm_head.weight, which qwen2's
    head prefers (else the head reads the embedding: a function without a backward, whose forward is faster
    so: 142 against 101 GFLOP/s in the measurement above)."""
    out = {}
    for k, v in weights.items():
        name, t = source(k)
        if not t:
            out[k] = v
        elif name == EMBEDDING:
            if tied_head:
                out[HEAD] = v.t()
        else:
            out[name] = v.t()
    return out
