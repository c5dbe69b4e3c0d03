"""Reward functions for GRPO: the reference default, arithmetic and math exact match, Countdown, user functions.

A reward function is called once per batch with keyword arguments

    prompts: list[str]              the prompt text of each completion (repeated per group)
    completions: list[str]          the decoded completions (EOS and what follows removed)
    completion_ids: list[list[int]] the generated token ids, up to and including the first EOS

and returns one float per completion (TRL's convention). Functions that also
accept `prompt_ids` or `eos_token_ids` (or **kwargs) receive those too, and
when the prompts come from a dataset (runtime/rl/datasets.py) every column of
each completion's row, by name, as TRL passes them: `answer` (the mapped
answer column), Countdown's `nums` and `target`, ... A function whose
required arguments the run cannot supply is refused before the run starts
(`RewardSet.check_arguments`). The
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


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)


def tagged_answer(text: str) -> str | None:
    """The content of the last <answer>...</answer> in text, or None."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


_COUNTDOWN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval_countdown(node) -> tuple[float, list[int]]:
    """(value, the numbers it uses) of + - * / over non-negative integers and parentheses; else ValueError."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return float(node.value), [node.value]
    if isinstance(node, ast.BinOp) and type(node.op) in _COUNTDOWN_OPS:
        (a, used_a), (b, used_b) = _eval_countdown(node.left), _eval_countdown(node.right)
        return _COUNTDOWN_OPS[type(node.op)](a, b), used_a + used_b
    raise ValueError("not a Countdown equation")


def countdown_equation_ok(text: str, nums: Sequence[int], target: float) -> bool:
    """Whether the completion's <answer> equation uses each of nums exactly once (+ - * /, parentheses) and
    equals target. "(25 - 5) * 4" and "(25 - 5) * 4 = 80" both count; the right side of = is ignored."""
    equation = tagged_answer(text)
    if equation is None:
        return False
    equation = equation.split("=")[0].strip()
    if not equation or len(equation) > 200 or not re.fullmatch(r"[\d+\-*/()\s]+", equation):
        return False
    try:
        value, used = _eval_countdown(ast.parse(equation, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return False
    return sorted(used) == sorted(int(n) for n in nums) and abs(value - float(target)) < 1e-5


def countdown(completions, nums, target, **_) -> list[float]:
    """Countdown (Jiayi-Pan/Countdown-Tasks-3to4, columns nums and target): 1.0 when the completion's
    <answer>...</answer> is an equation using each number exactly once that equals target, else 0.0."""
    return [1.0 if countdown_equation_ok(c, n, t) else 0.0 for c, n, t in zip(completions, nums, target)]


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced, or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None


def final_answer(text: str) -> str | None:
    """A completion's final answer: the last <answer>...</answer> or \\boxed{...}, whichever comes later
    (a \\boxed inside the answer tags is unwrapped); None when it has neither."""
    tag_end = text.rfind("</answer>")
    box_at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if tag_end >= 0 and tag_end > box_at:
        found = tagged_answer(text)
        return last_boxed(found) or found if found is not None else None
    return last_boxed(text)


_LATEX_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "$", "^\\circ", "^{\\circ}",
               "\\%", "%")
_FRAC = re.compile(r"^(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")


def normalize_answer(text) -> str:
    """A math answer in a comparable form: no $ or spacing commands, \\dfrac / \\tfrac as \\frac, \\text{...}
    unwrapped, no spaces, no trailing period; "\\boxed{...}" reduced to its content."""
    s = str(text).strip()
    s = last_boxed(s) or s
    for cmd in ("\\dfrac", "\\tfrac"):
        s = s.replace(cmd, "\\frac")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    for junk in _LATEX_DROP:
        s = s.replace(junk, "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,000 -> 1000 (but not "1,2" lists)
        s = s.replace(",", "")
    return s


def _number(s: str) -> float | None:
    """The value of "12", "-0.5", "3/4" or "\\frac{3}{4}", or None."""
    m = _FRAC.match(s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    try:
        if re.fullmatch(r"-?[\d.]+/-?[\d.]+", s):
            num, den = s.split("/")
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(got: str, want) -> bool:
    """Normalised string equality, or equal values where both are numbers (fractions included)."""
    a, b = normalize_answer(got), normalize_answer(want)
    if a == b:
        return bool(a)
    x, y = _number(a), _number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


def math_exact_match(completions, answer, **_) -> list[float]:
    """1.0 when the completion's final answer (last \\boxed{...} or <answer>...</answer>) equals the answer
    column after normalisation (normalize_answer; numbers compared by value), else 0.0. An answer cell may be
    a list of acceptable answers."""
    out = []
    for text, want in zip(completions, answer):
        got = final_answer(text)
        wants = want if isinstance(want, (list, tuple)) else [want]
        out.append(1.0 if got is not None and any(answers_match(got, w) for w in wants if w is not None) else 0.0)
    return out


BUILTINS: dict[str, Callable] = {
    "default": default_reward,
    "arithmetic_exact_match": arithmetic_exact_match,
    "math_exact_match": math_exact_match,
    "countdown": countdown,
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


LOOP_ARGUMENTS = ("prompts", "completions", "completion_ids", "prompt_ids", "eos_token_ids")
"""What every call passes; a dataset's columns come on top."""


def required_arguments(fn: Callable) -> list[str]:
    """The parameters of fn that have no default (and are not *args / **kwargs)."""
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


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

    def check_arguments(self, columns: Sequence[str] = (), where: str = "") -> None:
        """Refuse, before anything runs, a function that requires an argument the run does not supply: the
        loop's own (LOOP_ARGUMENTS) plus `columns`, the names a dataset's rows give (runtime/rl/datasets.py)."""
        have = set(LOOP_ARGUMENTS) | set(columns)
        for name, fn in zip(self.names, self.functions):
            missing = [a for a in required_arguments(fn) if a not in have]
            if missing:
                source = (f"the dataset gives {', '.join(sorted(columns))}" if columns else
                          "a prompt file gives no columns")
                raise UserError(f"reward function {name!r} needs {', '.join(missing)}, which this run does not "
                                f"supply ({source}{where}): load the prompts from a dataset with that column, or "
                                f"map one to it in dataset.columns (e.g. {{\"{missing[0]}\": \"COLUMN\"}})")

    def score(self, prompts, completions, completion_ids, prompt_ids, eos_token_ids, columns=None):
        """(total (N,) list, {name: (N,) list}) for N completions; `columns` holds extra per-completion
        arguments ({"answer": [...], "nums": [...]}, N entries each), a dataset row's columns."""
        n = len(completions)
        available = {
            **(columns or {}),
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
