"""Reward functions for GRPO: the reference default, arithmetic exact match, and user functions.

A reward function is called once per batch with keyword arguments

    prompts: list[str]              the prompt text of each completion (repeated per group)
    completions: list[str]          the decoded completions (EOS and what follows removed)
    completion_ids: list[list[int]] the generated token ids, up to and including the first EOS

and returns one float per completion (TRL's convention). Functions that also
accept `prompt_ids` or `eos_token_ids` (or **kwargs) receive those too. The
config names functions as `module:function` (an importable module) or
`path/to/file.py:function` (relative to the config file), or one of the
built-in names in BUILTINS. `RewardSet` calls them all, checks their
results and combines them with per-function weights.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pcpc.errors import UserError


def _strip_eos(ids: Sequence[int], eos: set[int]) -> tuple[list[int], bool]:
    """(tokens before the first EOS, whether an EOS was generated)."""
    for i, t in enumerate(ids):
        if t in eos:
            return list(ids[:i]), True
    return list(ids), False


def length_score(n: int) -> float:
    """The reference length reward for a completion of n tokens."""
    if n < 5:
        return -2.0
    if n <= 50:
        return 0.5 + 0.02 * n
    if n <= 128:
        return 1.0
    return 0.5


def default_reward(completion_ids, eos_token_ids, **_) -> list[float]:
    """The reference design's default reward: length + EOS presence + token diversity.

    length (tokens before EOS) < 5 -> -2, 5..50 -> 0.5 + 0.02 * length,
    51..128 -> +1, longer -> +0.5; EOS generated +1, else -0.5;
    plus 0.5 * distinct tokens / length (0 for an empty completion).
    """
    eos = set(eos_token_ids)
    out = []
    for ids in completion_ids:
        body, has_eos = _strip_eos(ids, eos)
        n = len(body)
        diversity = 0.5 * len(set(body)) / n if n else 0.0
        out.append(length_score(n) + (1.0 if has_eos else -0.5) + diversity)
    return out


_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}
_EXPR = re.compile(r"[-+*/%().\d\s]*\d[-+*/%().\d\s]*")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _eval_arith(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval_arith(node.left), _eval_arith(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval_arith(node.operand))
    raise ValueError("not arithmetic")


def arithmetic_answer(prompt: str) -> float | None:
    """The value of the arithmetic expression in a prompt ("2+2=", "Solve 3 * 4 + 2."), or None."""
    best = None
    for m in _EXPR.finditer(prompt):
        text = m.group().strip().rstrip(".").strip()
        if not any(op in text for op in "+-*/%"):
            continue
        try:
            value = _eval_arith(ast.parse(text, mode="eval").body)
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError):
            continue
        if best is None or len(text) > best[0]:
            best = (len(text), value)
    return None if best is None else float(best[1])


def arithmetic_exact_match(prompts, completions, **_) -> list[float]:
    """1.0 when the first number in the completion equals the prompt's arithmetic value, else 0.0.

    Prompts without an arithmetic expression score 0.0.
    """
    out = []
    for prompt, text in zip(prompts, completions):
        want = arithmetic_answer(prompt)
        m = _NUMBER.search(text)
        ok = want is not None and m is not None and math.isclose(float(m.group()), want, abs_tol=1e-6)
        out.append(1.0 if ok else 0.0)
    return out


BUILTINS: dict[str, Callable] = {
    "default": default_reward,
    "arithmetic_exact_match": arithmetic_exact_match,
}
"""Reward functions available by bare name in a config's reward_funcs."""


def load_reward_function(spec: str, base_dir: Path | None = None) -> Callable:
    """Resolve a built-in name, `module:function` or `file.py:function` (relative to base_dir)."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    where = f"reward_funcs: {spec!r}"
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise UserError(f"{where}: expected a built-in ({', '.join(BUILTINS)}), 'module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise UserError(f"{where}: file {path} not found")
        mod_spec = importlib.util.spec_from_file_location(f"pcpc_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise UserError(f"{where}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"{where}: cannot import module {module_name!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"{where}: {module_name} has no function {fn_name!r}")
    return fn


def _accepted_kwargs(fn: Callable, available: dict) -> dict:
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return available
    return {k: v for k, v in available.items() if k in sig.parameters}


@dataclass
class RewardSet:
    """Named reward functions with weights; `score` returns the weighted total and each function's values."""

    names: list[str]
    functions: list[Callable]
    weights: list[float]

    @classmethod
    def from_config(cls, specs: Sequence[str], weights: Sequence[float] | None, base_dir: Path | None = None):
        if not specs:
            raise UserError("reward_funcs: name at least one reward function")
        if weights is not None and len(weights) != len(specs):
            raise UserError(f"reward_weights: {len(weights)} weights for {len(specs)} reward_funcs; give one per function")
        fns = [load_reward_function(s, base_dir) for s in specs]
        return cls(list(specs), fns, list(weights) if weights is not None else [1.0] * len(specs))

    def score(self, prompts, completions, completion_ids, prompt_ids, eos_token_ids):
        """(total (N,) list, {name: (N,) list}) for N completions."""
        n = len(completions)
        available = {
            "prompts": list(prompts), "completions": list(completions), "completion_ids": [list(c) for c in completion_ids],
            "prompt_ids": [list(p) for p in prompt_ids], "eos_token_ids": list(eos_token_ids),
        }
        per_fn = {}
        for name, fn in zip(self.names, self.functions):
            try:
                values = fn(**_accepted_kwargs(fn, available))
            except Exception as e:  # the user's code: name it; the traceback stays chained (--debug shows it)
                raise UserError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
            values = list(values) if values is not None else []
            if len(values) != n:
                raise UserError(f"reward function {name!r} returned {len(values)} values for {n} completions")
            try:
                per_fn[name] = [float(v) for v in values]
            except (TypeError, ValueError):
                raise UserError(f"reward function {name!r} returned non-numbers: {values[:4]!r}") from None
            if any(math.isnan(v) for v in per_fn[name]):
                raise UserError(f"reward function {name!r} returned NaN")
        total = [sum(w * per_fn[name][i] for name, w in zip(self.names, self.weights)) for i in range(n)]
        return total, per_fn
