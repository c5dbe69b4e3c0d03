"""DPO end to end on a toy preference set (arithmetic: right answer chosen, wrong rejected), and its errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pcpc.errors import UserError
from pcpc.kinds import run_experiment

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_toy")
    raw = json.loads((EXPERIMENTS / "dpo_tiny.json").read_text())
    raw.update(training_model_path=str(root / "models" / "dpo_toy.vmfb"), weights_path=str(root / "dpo_flat.bin"))
    raw["dpo_config"]["data_path"] = str(EXPERIMENTS / "dpo_tiny_prefs.jsonl")
    return root, raw


def run(root: Path, raw: dict, name: str, **kw) -> dict:
    path = root / f"{name}.json"
    path.write_text(json.dumps(raw))
    return run_experiment(str(path), raw, out_dir=str(root / name), quiet=True, **kw)


def test_dpo_learns_the_preferences(toy):
    root, raw = toy
    summary = run(root, raw, "sigmoid")
    recs = [json.loads(x) for x in (root / "sigmoid" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == summary["steps"] == 30
    assert recs[0]["rewards/accuracies"] == 0.0 and recs[0]["rewards/margins"] == 0.0  # policy = reference
    assert summary["dataset_rewards_accuracies"] > 0.9  # all 24 pairs, final weights
    assert sum(r["rewards/accuracies"] for r in recs[-5:]) / 5 > 0.9
    assert recs[-1]["loss"] < recs[0]["loss"] and summary["dataset_rewards_margins"] > 0
    assert (root / "sigmoid" / "metrics.png").is_file()


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_other_losses_learn_too(toy, loss_type):
    root, raw = toy
    raw = copy.deepcopy(raw)
    raw["dpo_config"]["loss_type"] = loss_type
    assert run(root, raw, loss_type)["dataset_rewards_accuracies"] > 0.9


def test_resume_continues_exactly(toy):
    root, raw = toy
    a = copy.deepcopy(raw)
    a["dpo_config"]["max_steps"] = 6
    run(root, a, "resume")
    a["dpo_config"]["max_steps"] = 12
    run(root, a, "resume", resume=True)
    got = [json.loads(x) for x in (root / "resume" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (root / "sigmoid" / "metrics.jsonl").read_text().splitlines()][:12]
    assert [(r["step"], r["loss"]) for r in got] == [(r["step"], r["loss"]) for r in want]


@pytest.mark.parametrize("patch,match", [
    ({"beta": 0}, r"dpo_config: beta must be > 0"),
    ({"loss_type": "kto"}, r"dpo_config: loss_type must be one of sigmoid, ipo, hinge"),
    ({"batch_size": 0}, r"dpo_config: batch_size must be >= 1"),
    ({"data_path": "nowhere.jsonl"}, r"dpo_config.data_path: .*nowhere.jsonl not found"),
])
def test_config_errors_name_the_field(toy, patch, match):
    root, raw = toy
    raw = copy.deepcopy(raw)
    raw["dpo_config"].update(patch)
    with pytest.raises(UserError, match=match):
        run(root, raw, "bad")


def test_bad_data_names_the_line(toy, tmp_path):
    root, raw = toy
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "2+2=", "chosen": "4"}\n')
    raw = copy.deepcopy(raw)
    raw["dpo_config"]["data_path"] = str(data)
    with pytest.raises(UserError, match=r"prefs.jsonl:2: needs string fields prompt, chosen, rejected"):
        run(root, raw, "bad_data")
