"""The registry of experiment kinds: which loop a config file is for, loaded by the one strict loader."""

import json
from pathlib import Path

import pytest

from pcpc.errors import UserError
from pcpc.kinds import KINDS, kind_of, load_config
from pcpc.runtime.run.config import RunConfig
from pcpc.runtime.run.skeleton import Loop

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.mark.parametrize("name, kind", [
    ("nanogpt_small.json", "diloco"), ("nanogpt_medium.json", "diloco"), ("qwen_rl_test.json", "grpo"),
    ("qwen_rl_tiny.json", "grpo"), ("dpo_tiny.json", "dpo"), ("qwen_grpo_countdown.json", "grpo"),
])
def test_every_shipped_experiment_loads_through_its_kind(name, kind):
    raw = json.loads((EXPERIMENTS / name).read_text())
    assert kind_of(raw).name == kind
    loop, cfg = load_config(raw, where=name)
    assert issubclass(loop, Loop) and loop.kind == kind and isinstance(cfg, RunConfig)
    assert isinstance(cfg, loop.Config)


def test_every_kind_names_a_loop_with_a_config_on_the_shared_base():
    for kind in KINDS.values():
        loop = kind.load_loop()
        assert loop.kind == kind.name and issubclass(loop.Config, RunConfig)


def test_one_kind_per_file_and_errors_name_the_file_and_field():
    with pytest.raises(UserError, match="both 'grpo_config' and 'dpo_config'"):
        kind_of({"grpo_config": {}, "dpo_config": {}})
    with pytest.raises(UserError, match=r"x\.json: unknown key 'grpo_cfg'"):
        load_config({"model_path": "m/x.mlir", "data_path": "d", "grpo_cfg": {}}, where="x.json")
    with pytest.raises(UserError, match=r"x\.json\.grpo_config\.group_size: expected an integer"):
        load_config({"model_path": "g.mlir", "training_model_path": "t.vmfb", "weights_path": "w.bin",
                     "grpo_config": {"group_size": "4"}}, where="x.json")
