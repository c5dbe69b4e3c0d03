"""Lower flat functions to one MLIR module with iree-turbine.

An `ExportFunction` is a flat callable plus the spec of each argument; the
result specs are read off the traced graph. Several functions go into one
module (they share the weight arguments' layout, not storage: every weight
is a function input). Tracing uses fake tensors, so a 0.5B model lowers
without allocating its weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from pcpc.autodiff.derive import DECOMPOSITIONS, scatter_into_sums
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
    decompositions: dict | None = None
    """Trace-time decompositions for this function on top of pcpc's DECOMPOSITIONS (autodiff/derive.py; these
    win on overlap). Not for an in-place function, which torch.export traces again without them."""


PARAMETER_SCOPE = "model"

Ref = tuple[int, int]
"""Where a Composite's value comes from: (-1, i) its argument i; (k, j) result j of its call k."""


@dataclass(frozen=True)
class Composite:
    """A function made of other functions: each call runs an ExportFunction on arguments and earlier results.

    lower() splices the calls' traced graphs into one graph instead of tracing the whole again, and traces
    each callee once even when the module exports it too: nanoGPT's train_step is value_and_grad's graph,
    then adamw_step's. Called eagerly, it runs the calls.
    """

    calls: tuple[tuple[ExportFunction, tuple[Ref, ...]], ...]
    returns: tuple[Ref, ...]

    def __call__(self, *args):
        values = {-1: args}
        for k, (f, refs) in enumerate(self.calls):
            out = f.fn(*(values[a][i] for a, i in refs))
            values[k] = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(values[a][i] for a, i in self.returns)


def _example(spec: TensorSpec) -> torch.Tensor:
    return torch.empty(spec.shape, dtype=TORCH_DTYPES[spec.dtype])


def _outputs(gm: torch.fx.GraphModule) -> tuple:
    """The nodes a graph returns, as a tuple (a function returning one tensor returns it bare)."""
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)


def _result_specs(gm: torch.fx.GraphModule, names: Sequence[tuple[str, str]], fname: str) -> tuple[TensorSpec, ...]:
    outs = _outputs(gm)
    assert len(outs) == len(names), f"{fname}: traced {len(outs)} results, declared {len(names)}"
    specs = []
    for node, (name, role) in zip(outs, names):
        val = node.meta["val"]
        specs.append(TensorSpec(name, role, tuple(int(d) for d in val.shape), DTYPE_NAMES[val.dtype]))
    return tuple(specs)


def _trace(fn: Callable, example_args: Sequence[torch.Tensor], extra: dict | None = None) -> torch.fx.GraphModule:
    """make_fx with iree-turbine's AOT decompositions applied while tracing.

    The graph is what gets imported (`_program`), so nothing traces it again;
    pcpc's own DECOMPOSITIONS (autodiff/derive.py) win on overlap, and a function's `extra` over both.
    """
    from iree.turbine.aot.decompositions import current_aot_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    table = {**current_aot_decompositions(), **DECOMPOSITIONS, **(extra or {})}
    # functionalize: some of those decompositions and autograd formulas (minimum's and silu's backward)
    # emit in-place ops (masked_fill_, fill_) that torch-mlir cannot verify without the skipped re-trace.
    fn = torch.func.functionalize(fn, remove="mutations")
    return scatter_into_sums(make_fx(fn, decomposition_table=table, tracing_mode="fake")(*example_args))


@contextlib.contextmanager
def _no_python_code():
    """GraphModules made here generate their Python code only if it is asked for.

    A GraphModule writes and compiles its graph's Python source when it is made (by make_fx, by
    scatter_into_sums, by ExportedProgram) and again on every change; pcpc only imports the graph into MLIR
    and never runs that code. Lazily (torch.fx's _LazyGraphModule, which inductor uses for the same reason),
    nanogpt-medium's seven functions lower in 2.7-3.1 s instead of 3.2-3.4 s (bench/NOTES.md), the same MLIR."""
    import torch.export.exported_program as exported_program
    from torch.fx._lazy_graph_module import _LazyGraphModule, _use_lazy_graph_module

    eager = exported_program._create_graph_module_for_export
    exported_program._create_graph_module_for_export = _LazyGraphModule
    try:
        with _use_lazy_graph_module(True):
            yield
    finally:
        exported_program._create_graph_module_for_export = eager


def _splice(calls: Sequence[tuple[torch.fx.GraphModule, Sequence[Ref]]], returns: Sequence[Ref],
            args: Sequence[TensorSpec]) -> torch.fx.GraphModule:
    """One graph that runs each traced graph of `calls` on its Refs (see Composite) and returns `returns`.

    The nodes are copied with their traced metadata (fake values), so nothing is traced again; the source
    graphs are left as they are. The graphs' tensor constants (get_attr) are numbered anew in the new root."""
    from torch.fx._lazy_graph_module import _make_graph_module

    g, root = torch.fx.Graph(), torch.nn.Module()
    inputs = [g.placeholder(f"arg{i}") for i in range(len(args))]
    values: dict[int, Sequence] = {-1: inputs}
    for k, (gm, refs) in enumerate(calls):
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        assert len(phs) == len(refs), f"call {k}: {len(refs)} arguments wired, its graph takes {len(phs)}"
        val_map = {}
        for ph, (a, i) in zip(phs, refs):
            node = values[a][i]
            if a == -1 and "val" not in node.meta:
                node.meta = dict(ph.meta)
            val_map[ph] = node
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = getattr(gm, node.target)
                if not isinstance(value, torch.Tensor):
                    raise NotImplementedError(f"splice: get_attr {node.target} holds a {type(value).__name__}")
                name = f"_tensor_constant{len(root._buffers)}"  # make_fx's names, numbered across the calls
                root.register_buffer(name, value)
                val_map[node] = g.get_attr(name)
                val_map[node].meta = dict(node.meta)
        out = g.graph_copy(gm.graph, val_map)
        values[k] = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    for i, (node, spec) in enumerate(zip(inputs, args)):
        val = node.meta.get("val")
        dtype = None if val is None else DTYPE_NAMES.get(val.dtype, str(val.dtype))
        if val is None or tuple(val.shape) != tuple(spec.shape) or dtype != spec.dtype:
            took = "no call takes it" if val is None else f"its call takes {dtype}{list(val.shape)}"
            raise ValueError(f"composite argument {i} ({spec.name}): declared {spec.dtype}{list(spec.shape)}, {took}")
    g.output(tuple(values[a][i] for a, i in returns))  # no dead-code pass: as a trace of the whole makes it
    return _make_graph_module(root, g)


def _graphs(functions: Sequence[ExportFunction]) -> list[torch.fx.GraphModule]:
    """Each function's graph, for _program (which changes it): every distinct (fn, argument shapes) traced
    once. A function traced before (eval_loss is forward_loss at the same batch) gets a copy of that graph,
    a Composite its calls' graphs spliced together."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # one fake mode for every trace, as make_fx would make each (static shapes): graphs spliced together
    # must hold fake values of one mode, and the traces share its cache of op results
    mode = FakeTensorMode(allow_fallback_kernels=True, shape_env=ShapeEnv(), static_shapes=True)
    traced: dict[tuple, tuple[ExportFunction, torch.fx.GraphModule]] = {}
    used: set[int] = set()

    def trace(f: ExportFunction) -> torch.fx.GraphModule:
        key = (id(f.fn), id(f.decompositions), tuple((s.shape, s.dtype) for s in f.args))
        if key not in traced:  # the function is kept in the value so that its id stays its own
            with mode:
                ex = [_example(s) for s in f.args]
            traced[key] = (f, _trace(f.fn, ex, f.decompositions))
        return traced[key][1]

    out = []
    for f in functions:
        if isinstance(f.fn, Composite):
            if f.inplace:
                raise ValueError(f"{f.name}: a Composite cannot be in-place")
            gm = _splice([(trace(c), refs) for c, refs in f.fn.calls], f.fn.returns, f.args)
        elif f.inplace:
            gm = _trace(f.fn, [_example(s) for s in f.args], f.decompositions)  # for its result specs
        else:
            gm = trace(f)
            if id(gm) in used:
                gm = _splice([(gm, [(-1, i) for i in range(len(f.args))])],
                             [(0, i) for i in range(len(_outputs(gm)))], f.args)
            used.add(id(gm))
        out.append(gm)
    return out


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


def _program(gm: torch.fx.GraphModule, params: dict[str, torch.nn.Parameter]) -> "torch.export.ExportedProgram":
    """Wrap a make_fx graph as an ExportedProgram without tracing it again.

    torch.export would re-trace the graph (about 80% of a nanoGPT export); the graph is already
    functional, decomposed and shape-annotated, so only the signature is built here. The first
    len(params) placeholders are the parameters (`params` maps the root attributes that hold them,
    in order); tensor constants (get_attr nodes) become lifted constant inputs, as torch.export
    makes them; the output is made a tuple, as torch.export's always is.
    """
    from torch.export import ExportedProgram
    from torch.export.exported_program import ModuleCallEntry
    from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec,
                                              TensorArgument)

    g = gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    first = next(iter(g.nodes))
    inputs, constants = [], {}
    for node in [n for n in g.nodes if n.op == "get_attr"]:
        value = getattr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            raise NotImplementedError(f"lower: get_attr {node.target} holds a {type(value).__name__}, not a tensor")
        with g.inserting_before(first):
            ph = g.placeholder(f"lifted_{node.target}")
        ph.meta = dict(node.meta)
        node.replace_all_uses_with(ph)
        g.erase_node(node)
        constants[node.target] = value
        inputs.append(InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(ph.name), node.target))
    targets = list(params)
    for i, ph in enumerate(placeholders):
        if i < len(targets):
            inputs.append(InputSpec(InputKind.PARAMETER, TensorArgument(ph.name), targets[i], persistent=None))
        else:
            inputs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(ph.name), None))
    out = next(n for n in g.nodes if n.op == "output")
    outs = _outputs(gm)
    out.args = (outs,)
    outputs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(o.name), None) for o in outs]
    return ExportedProgram(root=gm, graph=g, graph_signature=ExportGraphSignature(inputs, outputs),
                           state_dict=dict(params), range_constraints={},
                           module_call_graph=[ModuleCallEntry("", None)], constants=constants)


def _no_torch_dialect_module() -> None:
    """Make the MLIR bindings' failing search for a Python module of the torch dialect a cached miss.

    Each torch-dialect op the importer touches makes the bindings try `import iree.compiler.dialects.torch`,
    which IREE does not ship; Python caches no failed import, so every try walks sys.path again (18k tries in
    a nanoGPT export, 120k and several seconds in qwen-generation's). An empty module there is what the miss
    means: no Python op classes for the dialect, the generic OpView for its ops.
    """
    import importlib
    import sys
    import types

    name = "iree.compiler.dialects.torch"
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        sys.modules[name] = types.ModuleType(name)


def lower(functions: Sequence[ExportFunction]) -> tuple[str, dict[str, FunctionSignature]]:
    """MLIR text of a module holding every function, and each function's signature.

    Each function is traced once (make_fx, `_trace`; a function exported twice at the same shapes, once;
    a Composite's graph spliced from its calls', `_graphs`) and its graph handed to iree-turbine as a
    program (`_program`). An in-place function goes through torch.export instead, which records
    its mutations so that IREE updates those buffers in place (such functions are small).
    """
    import iree.turbine.aot as aot
    from iree.turbine.aot.compiled_module import ExportTargetDef

    _no_torch_dialect_module()
    root = _Graphs()
    fxb = aot.FxProgramsBuilder(root)
    signatures = {}
    global_attrs: dict[str, str] = {}  # parameter name -> attribute of root holding it
    for f in functions:
        if f.inplace and f.decompositions:
            raise ValueError(f"{f.name}: an in-place function takes no extra decompositions")
    with _no_python_code():
        graphs = _graphs(functions)
    for f, gm in zip(functions, graphs):
        for spec in f.args[: f.globals]:
            if spec.name not in global_attrs:
                global_attrs[spec.name] = _add_global(root, len(global_attrs), spec.name, _example(spec))
        signatures[f.name] = FunctionSignature(args=tuple(f.args[f.globals :]),
                                               results=_result_specs(gm, f.results, f.name))
        if f.inplace:
            # turbine's decompositions (on by default here) functionalise it with its mutations recorded
            def call(module, *args, _fn=f.fn):
                return _fn(*args)

            fxb.export_program(name=f.name, args=tuple(_example(s) for s in f.args[f.globals :]), strict=False)(call)
        else:
            attrs = [global_attrs[a.name] for a in f.args[: f.globals]]
            with _no_python_code():
                program = _program(gm, {a: getattr(root, a) for a in attrs})
            fxb.programs[f.name] = ExportTargetDef(program)
    exported = aot.export(fxb)
    return str(exported.mlir_module), signatures
