"""Lower flat functions to one MLIR module with iree-turbine.

An `ExportFunction` is a flat callable plus the spec of each argument; the
result specs are read off the traced graph. Several functions go into one
module (they share the weight arguments' layout, not storage: every weight
is a function input). Tracing uses fake tensors, so a 0.5B model lowers
without allocating its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from pcpc.autodiff.derive import DECOMPOSITIONS
from pcpc.mlir.signature import FunctionSignature, TensorSpec

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass
class ExportFunction:
    """A function to export: flat positional tensors in, a tuple of tensors out."""

    name: str
    fn: Callable
    args: Sequence[TensorSpec]
    results: Sequence[tuple[str, str]]
    """(name, role) of each result, in order; shapes and dtypes come from tracing."""
    globals: int = 0
    """The first `globals` args become module globals backed by named parameters (scope
    PARAMETER_SCOPE, key = the spec's name, loaded once when the module is loaded, e.g. from
    the flat weight file) instead of call arguments; the signature lists only the rest."""
    inplace: bool = False
    """fn writes into some of its arguments (their specs' role "inplace") and the module updates those
    buffers in place, O(what it writes) instead of a copy of each: fn is exported as it is (torch.export
    records the mutations; IREE aliases the results onto the argument buffers)."""


PARAMETER_SCOPE = "model"


def _example(spec: TensorSpec) -> torch.Tensor:
    return torch.empty(spec.shape, dtype=TORCH_DTYPES[spec.dtype])


def _result_specs(gm: torch.fx.GraphModule, names: Sequence[tuple[str, str]], fname: str) -> tuple[TensorSpec, ...]:
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = out_node.args[0]
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    assert len(outs) == len(names), f"{fname}: traced {len(outs)} results, declared {len(names)}"
    specs = []
    for node, (name, role) in zip(outs, names):
        val = node.meta["val"]
        specs.append(TensorSpec(name, role, tuple(int(d) for d in val.shape), DTYPE_NAMES[val.dtype]))
    return tuple(specs)


def _trace(fn: Callable, example_args: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """make_fx with iree-turbine's AOT decompositions applied while tracing.

    The graph reaches torch.export already decomposed, so `lower` can skip
    turbine's `run_decompositions` re-trace (about half the export time of a
    0.5B model); pcpc's own DECOMPOSITIONS (autodiff/derive.py) win on overlap.
    """
    from iree.turbine.aot.decompositions import current_aot_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    table = {**current_aot_decompositions(), **DECOMPOSITIONS}
    # functionalize: some of those decompositions and autograd formulas (minimum's and silu's backward)
    # emit in-place ops (masked_fill_, fill_) that torch-mlir cannot verify without the skipped re-trace.
    fn = torch.func.functionalize(fn, remove="mutations")
    return make_fx(fn, decomposition_table=table, tracing_mode="fake")(*example_args)


class _Graphs(torch.nn.Module):
    """Holds the traced graphs as submodules so one FxProgramsBuilder exports them all."""


def _add_global(root: torch.nn.Module, index: int, name: str, example: torch.Tensor) -> str:
    """Register `example` (uninitialised, never read) as an externalised parameter called `name`."""
    from iree.turbine.aot import ExternalTensorTrait

    attr = f"global_{index}"
    param = torch.nn.Parameter(example, requires_grad=False)
    ExternalTensorTrait(external_scope=PARAMETER_SCOPE, external_name=name).set(param)
    root.register_parameter(attr, param)
    return attr


def lower(functions: Sequence[ExportFunction]) -> tuple[str, dict[str, FunctionSignature]]:
    """MLIR text of a module holding every function, and each function's signature."""
    import iree.turbine.aot as aot

    root = _Graphs()
    signatures = {}
    examples = {}
    global_attrs: dict[str, str] = {}  # parameter name -> attribute of root holding it
    for f in functions:
        ex = [_example(s) for s in f.args]
        gm = _trace(f.fn, ex)  # an in-place function: the functionalised graph, for its result specs
        if not f.inplace:
            root.add_module(f.name, gm)
        for spec, t in zip(f.args[: f.globals], ex):
            if spec.name not in global_attrs:
                global_attrs[spec.name] = _add_global(root, len(global_attrs), spec.name, t)
        signatures[f.name] = FunctionSignature(args=tuple(f.args[f.globals :]),
                                               results=_result_specs(gm, f.results, f.name))
        examples[f.name] = ex[f.globals :]

    from iree.turbine.aot.decompositions import extend_aot_decompositions

    import contextlib

    fxb = aot.FxProgramsBuilder(root)
    # already decomposed by _trace; a module with in-place functions runs turbine's decompositions, which
    # functionalise them with their mutations recorded (its functions are small)
    skip = not any(f.inplace for f in functions)
    with extend_aot_decompositions(from_current=False) if skip else contextlib.nullcontext():
        for f in functions:
            if f.inplace:
                def call(module, *args, _fn=f.fn):
                    return _fn(*args)
            else:
                def call(module, *args, _name=f.name, _g=tuple(global_attrs[a.name] for a in f.args[: f.globals])):
                    return getattr(module, _name)(*(getattr(module, g) for g in _g), *args)

            fxb.export_program(name=f.name, args=tuple(examples[f.name]), strict=False)(call)
    exported = aot.export(fxb)
    return str(exported.mlir_module), signatures
