"""Reward functions: the reference default's table, arithmetic exact match, user functions, weights, errors."""

from __future__ import annotations

import pytest

from pcpc.errors import UserError
from pcpc.runtime.rl.rewards import (
    RewardSet, arithmetic_answer, arithmetic_exact_match, default_reward, length_score, load_reward_function,
)

EOS = 0


@pytest.mark.parametrize("n,want", [(0, -2.0), (4, -2.0), (5, 0.6), (50, 1.5), (51, 1.0), (128, 1.0), (129, 0.5)])
def test_length_table(n, want):
    assert length_score(n) == pytest.approx(want)


def test_default_reward_adds_length_eos_and_diversity():
    with_eos = [5, 6, 5, 7, 8, 9, EOS]  # 6 tokens before EOS, 5 distinct
    no_eos = list(range(1, 61))  # 60 tokens, all distinct, no EOS
    short = [3, EOS, 4, 4]  # 1 token before EOS; what follows EOS does not count
    got = default_reward(completion_ids=[with_eos, no_eos, short], eos_token_ids=[EOS])
    assert got[0] == pytest.approx((0.5 + 0.02 * 6) + 1.0 + 0.5 * 5 / 6)
    assert got[1] == pytest.approx(1.0 - 0.5 + 0.5)
    assert got[2] == pytest.approx(-2.0 + 1.0 + 0.5)
    assert default_reward(completion_ids=[[EOS]], eos_token_ids=[EOS]) == [pytest.approx(-1.0)]


@pytest.mark.parametrize("prompt,want", [
    ("2+2=", 4.0), ("Solve 3 * 4 + 2.", 14.0), ("What is (1+2)*3?", 9.0), ("7/2 =", 3.5),
    ("The capital of France is", None), ("Is fire hot? Answer yes or no.", None),
])
def test_arithmetic_answer(prompt, want):
    assert arithmetic_answer(prompt) == want


def test_arithmetic_exact_match():
    prompts = ["2+2=", "Solve 3 * 4 + 2.", "2+2=", "The capital of France is"]
    completions = [" 4", "The answer is 14.", "5", "Paris"]
    assert arithmetic_exact_match(prompts, completions) == [1.0, 1.0, 0.0, 0.0]


def test_user_function_from_file_with_weights(tmp_path):
    (tmp_path / "mine.py").write_text(
        "def count_sevens(completion_ids, **kw):\n"
        "    return [sum(t == 7 for t in c) for c in completion_ids]\n"
        "def echo_prompt_len(prompts, completions):\n"
        "    return [len(p) for p in prompts]\n"
    )
    rs = RewardSet.from_config(["mine.py:count_sevens", "mine.py:echo_prompt_len", "default"], [2.0, 0.5, 1.0],
                               base_dir=tmp_path)
    total, per_fn = rs.score(["ab", "abcd"], ["x", "y"], [[7, 7, 1, 2, 3, EOS], [1]], [[1], [2]], [EOS])
    assert per_fn["mine.py:count_sevens"] == [2.0, 0.0]
    assert per_fn["mine.py:echo_prompt_len"] == [2.0, 4.0]
    default = default_reward(completion_ids=[[7, 7, 1, 2, 3, EOS], [1]], eos_token_ids=[EOS])
    assert total == [pytest.approx(2 * 2 + 0.5 * 2 + default[0]), pytest.approx(0.5 * 4 + default[1])]


def test_module_function_spec():
    assert load_reward_function("pcpc.runtime.rl.rewards:arithmetic_exact_match") is arithmetic_exact_match


@pytest.mark.parametrize("spec,match", [
    ("no_colon", "expected a built-in"),
    ("missing_module_xyz:f", "cannot import module 'missing_module_xyz'"),
    ("pcpc.runtime.rl.rewards:nope", "has no function 'nope'"),
    ("absent.py:f", "absent.py not found"),
])
def test_bad_specs_name_the_function(spec, match, tmp_path):
    with pytest.raises(UserError, match=match):
        load_reward_function(spec, tmp_path)


def test_bad_results_are_errors(tmp_path):
    (tmp_path / "bad.py").write_text("def short(completions, **kw):\n    return [1.0]\n"
                                     "def words(completions, **kw):\n    return ['a'] * len(completions)\n")
    for fn, match in (("short", "returned 1 values for 2 completions"), ("words", "non-numbers")):
        rs = RewardSet.from_config([f"bad.py:{fn}"], None, tmp_path)
        with pytest.raises(UserError, match=match):
            rs.score(["p", "q"], ["a", "b"], [[1], [2]], [[1], [1]], [EOS])
    with pytest.raises(UserError, match="reward_weights: 1 weights for 2 reward_funcs"):
        RewardSet.from_config(["default", "arithmetic_exact_match"], [1.0])
