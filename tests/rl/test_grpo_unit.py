"""GRPO pieces without compiled modules: advantages, the loss against TRL's formulas, row packing, tasks, config."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from rl_reference import grpo_loss as trl_grpo_loss
from pcpc.autodiff.grpo import compute_advantages, grpo_loss
from pcpc.errors import UserError
from pcpc.runtime.rl.grpo_config import parse_grpo
from pcpc.runtime.rl.rollout import make_tasks
from pcpc.runtime.rl.rows import pack_rows

REFERENCE = json.loads((Path(__file__).resolve().parents[2] / "experiments" / "qwen_rl_test.json").read_text())


def test_advantages_group_batch_none():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    adv, frac = compute_advantages(r, 4, "group")
    g = r.view(2, 4)
    want = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1)
    assert torch.allclose(adv, want) and frac == 0.5  # the second group is all 5s
    adv, _ = compute_advantages(r, 4, "batch")
    assert torch.allclose(adv, (r - g.mean(1).repeat_interleave(4)) / (r.std() + 1e-4))
    adv, _ = compute_advantages(r, 4, "none")
    assert torch.allclose(adv, r - g.mean(1).repeat_interleave(4))
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        compute_advantages(r, 3)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_eager_loss_matches_trl_formulas(loss_type):
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 6, generator=gen) * 3
    old = logp + 0.3 * torch.randn(4, 6, generator=gen)
    ref = logp + 0.2 * torch.randn(4, 6, generator=gen)
    adv = torch.tensor([1.0, -0.5, 0.3, 0.9])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).float()
    want = trl_grpo_loss(logp, old, ref, adv, mask, 0.04, 0.2, 0.28, loss_type, 6)
    got, kl, clip, low, high = grpo_loss(logp, old, ref, adv, mask, 0.04, 0.2, 0.28, loss_type, 6)
    assert torch.allclose(got, want, rtol=1e-6)
    assert 0 < float(clip) <= 1 and float(clip) == pytest.approx(float(low + high))


def test_pack_rows_masks_completion_targets():
    ids, mask = pack_rows([[5, 6, 7], [8]], [[1, 2, 0], [3]], seq_len=6, pad=0)
    assert ids.tolist() == [[5, 6, 7, 1, 2, 0], [8, 3, 0, 0, 0, 0]]
    # mask[t] = 1 where token t+1 is a completion token (EOS included)
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_groups_share_their_shortest_prompt():
    import numpy as np

    from pcpc.runtime.rl.grpo import check_groups, shared_prefix

    prompts = [[5, 6, 7], [8, 9], [4, 4, 4, 4]]
    assert shared_prefix(prompts, 4) == (4, 2) and shared_prefix(prompts, 1) is None
    rows = [p for p in prompts for _ in range(2)]
    ids, _ = pack_rows(rows, [[1, 2], [3], [1], [2, 2], [0], [9]], seq_len=7, pad=0)
    check_groups(ids, (2, 2))
    check_groups(ids, None)
    ids[3, 1] = 1
    with pytest.raises(RuntimeError, match="a group of 2 rows differs in its first 2 tokens"):
        check_groups(ids, (2, 2))
    ids = np.zeros((4, 5), np.int64)
    ids[1, 2] = 1  # beyond the prefix: fine
    check_groups(ids, (2, 2))


def test_tasks_are_padded_and_seeded_per_batch():
    rows = [[1], [1], [2], [2], [3], [3]]
    tasks, real = make_tasks(rows, 4, seed=7, iteration=3)
    assert real == 6 and [len(t.prompts) for t in tasks] == [4, 4]
    assert tasks[1].prompts == [[3], [3], [3], [3]]
    again, _ = make_tasks(rows, 4, seed=7, iteration=3)
    assert [t.seed for t in tasks] == [t.seed for t in again] and tasks[0].seed != tasks[1].seed
    assert make_tasks(rows, 4, seed=7, iteration=4)[0][0].seed != tasks[0].seed


def test_reference_config_parses_with_its_values():
    exp = parse_grpo(REFERENCE, "qwen_rl_test.json")
    assert exp.grpo_config.beta == 0.1 and exp.rollout_config.top_p == 0.9
    assert exp.learning_rate == 1e-5 and exp.grpo_config.learning_rate == 1e-6 and exp.outer_step_active
    assert exp.rollouts_per_iteration == 4


@pytest.mark.parametrize("patch,match", [
    ({"grpo_config": {"group_size": 1}}, r"grpo_config: group_size must be >= 2"),
    ({"rollout_config": {"batch_size": 6}}, r"rollout_config.batch_size \(6\) must be a multiple of "
                                            r"grpo_config.group_size \(4\)"),
    ({"grpo_config": {"loss_type": "ppo"}}, r"grpo_config: loss_type must be one of grpo, dapo, dr_grpo"),
    ({"grpo_config": {"scale_rewards": "yes"}}, r"grpo_config: scale_rewards must be one of group, batch, none"),
    ({"grpo_config": {"beta": "high"}}, r"grpo_config.beta: expected a number"),
    ({"rollout_config": {"temperature": 0}}, r"rollout_config: temperature must be > 0"),
    ({"rollout_config": {"top_p": 1.5}}, r"rollout_config: top_p must be in \(0, 1\]"),
    ({"grpo_config": {"reward_funcs": ["default"], "reward_weights": [1, 2]}}, r"reward_weights has 2 entries"),
    ({"nesterov_momentum": 1.0}, r"nesterov_momentum must be in \[0, 1\)"),
    ({"model_path": "models/x.vmfb"}, r"model_path must name a .mlir build artifact"),
    ({"training_model_path": "models/x.mlir"}, r"training_model_path must name a .vmfb"),
    ({"grpo_config": {"promptfile": "x"}}, r"grpo_config: unknown key 'promptfile'"),
    ({"compute_dtype": "float16"}, r"compute_dtype must be one of float32, bfloat16; got 'float16'"),
    ({"compute_dtype": "bfloat16", "peft": {"type": "lora", "r": 4}},
     r"compute_dtype bfloat16: an adapter's training module computes in float32"),
])
def test_config_errors_name_the_field(patch, match):
    raw = copy.deepcopy(REFERENCE)
    for key, value in patch.items():
        if isinstance(value, dict) and key in raw:
            raw[key].update(value)
        else:
            raw[key] = value
    with pytest.raises(UserError, match=match):
        parse_grpo(raw, "qwen_rl_test.json")


def test_update_groups_one_chunk_per_block():
    from pcpc.autodiff.optim import generic_name, update_groups
    from pcpc.exporters import qwen2

    for preset, untied in (("qwen2.5-0.5b", False), ("qwen2-tiny", True)):
        cfg = qwen2.make_config(preset, tie_word_embeddings=not untied)
        shapes = qwen2.param_shapes(cfg)
        names = list(shapes)
        chunks = update_groups(names, list(shapes.values()))
        # embedding, one chunk per layer, the final norm (and lm_head, each alone)
        assert len(chunks) == 1 + cfg.num_hidden_layers + 1 + untied
        assert sorted(i for _, idx in chunks for i in idx) == list(range(len(names)))  # each once, in order
        layer_kinds = {kind for kind, idx in chunks if len(idx) > 1}
        assert len(layer_kinds) == 1  # every block shares one compiled function
        for kind, idx in chunks:
            first = next(i for k, i in chunks if k == kind)
            assert [shapes[names[i]] for i in idx] == [shapes[names[i]] for i in first]
            if len(idx) > 1:  # blocks: the same parameters; single tensors of one shape share too (embed, lm_head)
                assert [generic_name(names[i]) for i in idx] == [generic_name(names[i]) for i in first]
    assert generic_name("model.layers.17.mlp.up_proj.weight") == "model.layers.*.mlp.up_proj.weight"
