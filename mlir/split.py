"""Split an exported module by function, so that its parts compile side by side.

iree-compile uses about 1.2 cores on one module: its input, global-optimization and flow pipelines and the
LLVM serialization of the linked executable run on one thread. A training module's functions share little
work beyond their dispatches, so compiling them as two modules in two processes takes the wall time of the
larger part (bench/NOTES.md, "Compiled in parts"). Each part is a module of its own (a VM module named
`module`, `module_part1`, ...); pcpc.runtime.module loads them into one context.
"""

from __future__ import annotations

import re

_FUNC = re.compile(r"^  func\.func @([\w$.-]+)\(")
_MODULE = re.compile(r"^module @([\w$.-]+)( .*)? \{$")
_SSA = re.compile(r"%[\w#:$.-]+")


def functions_of(text: str) -> tuple[str, dict[str, str]] | None:
    """(module header line, {function name: its text}) of an exported module that holds only public functions,
    or None when it holds anything else at its top level (globals, initializers, private functions), which
    the parts could not share."""
    lines = text.rstrip("\n").split("\n")
    if len(lines) < 2 or not _MODULE.match(lines[0]) or lines[-1] != "}":
        return None
    funcs, i = {}, 1
    while i < len(lines) - 1:
        m = _FUNC.match(lines[i])
        if m is None:
            return None
        try:
            end = lines.index("  }", i + 1)
        except ValueError:
            return None
        funcs[m.group(1)] = "\n".join(lines[i:end + 1])
        i = end + 1
    return lines[0], funcs


def module_text(header: str, name: str, funcs: list[str]) -> str:
    """A module named `name` (its header otherwise kept) holding the function texts `funcs`."""
    m = _MODULE.match(header)
    return f"module @{name}{m.group(2) or ''} {{\n" + "\n".join(funcs) + "\n}\n"


SHARED = 0.9
"""The share of a function's compile work that a part already holding its operations does not add again: IREE
compiles the dispatches they share once, and dispatch code generation is most of a compile (~9.3 of 13.5 s
for nanogpt-medium under --mlir-timing). nanogpt-medium's train_step compiled alone in 6.2 s and with
value_and_grad (4.2 s alone, every operation of it in train_step) in 6.5 s (bench/NOTES.md)."""


def _ops(func: str) -> list[str]:
    """The function's torch operations with their value names blanked: two functions that compute the same thing
    on the same shapes share these lines (and IREE compiles their shared dispatches once). Constants and list
    constructions are left out: they are most of the lines and cost nothing to compile."""
    return [_SSA.sub("%", line.strip()) for line in func.split("\n") if "torch.aten." in line]


CORES_PER_COMPILE = 1.25
"""Cores one iree-compile keeps busy (user over wall time: 1.15-1.37 on nanogpt-medium, bench/NOTES.md)."""


def _work(group: list[str], ops: dict, distinct: dict) -> float:
    """Compile work of functions compiled together: each adds its operations' count, less SHARED of it in the
    proportion of its distinct operations that a larger function of the group already has."""
    total, seen = 0.0, set()
    for name in sorted(group, key=lambda n: -len(ops[n])):
        have = len(distinct[name] & seen) / max(1, len(distinct[name]))
        total += len(ops[name]) * (1 - SHARED * have)
        seen |= distinct[name]
    return total


def estimate(parts: list[list[str]], ops: dict, distinct: dict, cores: int) -> float:
    """Wall time, in work units, of compiling `parts` side by side on `cores` cores: the largest part's work,
    or all their work over the cores they can share, whichever is more."""
    works = [_work(g, ops, distinct) for g in parts]
    return max(max(works), sum(works) / min(len(parts), cores / CORES_PER_COMPILE))


def plan(funcs: dict[str, str], parts: int, cores: int) -> tuple[list[list[str]], float, float]:
    """(groups, estimated wall, estimated wall whole): the split of the functions into at most `parts` groups
    that `estimate` finds fastest (every split tried, up to 4096 of them), each group in the module's order; with
    more functions than that allows, placed greedily, the largest first."""
    ops = {n: _ops(f) for n, f in funcs.items()}
    distinct = {n: set(o) for n, o in ops.items()}
    names = list(funcs)
    whole = estimate([names], ops, distinct, cores)
    k = max(1, min(parts, len(names)))
    if k == 1:
        return [names], whole, whole
    if k ** (len(names) - 1) <= 4096:
        candidates = (_assign(names, code, k) for code in range(k ** (len(names) - 1)))
        best = min((c for c in candidates if all(c)), key=lambda c: estimate(c, ops, distinct, cores), default=None)
    else:
        best = [[] for _ in range(k)]
        for name in sorted(names, key=lambda n: -len(ops[n])):
            j = min(range(k), key=lambda j: estimate([g + [name] if i == j else g for i, g in enumerate(best)
                                                      if g or i == j], ops, distinct, cores))
            best[j].append(name)
        best = [g for g in best if g]
    if best is None or len(best) < 2:
        return [names], whole, whole
    return [sorted(g, key=names.index) for g in best], estimate(best, ops, distinct, cores), whole


def _assign(names: list[str], code: int, k: int) -> list[list[str]]:
    """The `code`-th assignment of names to k groups (the first name always in group 0)."""
    out = [[names[0]]] + [[] for _ in range(k - 1)]
    for name in names[1:]:
        code, j = divmod(code, k)
        out[j].append(name)
    return out


MIN_WORK = 500
"""Modules with less work than this (about 3 s of iree-compile) compile whole: a second process would cost about
what it saves."""
GAIN = 0.85
"""A module compiles in parts only when `estimate` puts the parts at this fraction of the whole or less."""


def parts_of(text: str, parts: int, cores: int) -> list[tuple[str, list[str]]] | None:
    """The module split for compiling side by side, as (module text, its function names) with the first part
    keeping the module's name; None when it compiles whole: it holds more than public functions, it is small,
    or a split would save too little on `cores` cores."""
    found = functions_of(text)
    if found is None or parts < 2:
        return None
    header, funcs = found
    groups, split, whole = plan(funcs, parts, cores)
    if len(groups) < 2 or whole < MIN_WORK or split > GAIN * whole:
        return None
    name = _MODULE.match(header).group(1)
    return [(module_text(header, name if i == 0 else f"{name}_part{i}", [funcs[n] for n in g]), g)
            for i, g in enumerate(groups)]
