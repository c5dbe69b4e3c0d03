"""DPO end to end on a toy preference set (arithmetic: right answer chosen, wrong rejected), and its errors."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pcpc.errors import UserError
from pcpc.kinds import run_experiment
from pcpc.runtime.run import checkpoint
from pcpc.runtime.run.status import read_status
from runs import wait_for_lines, workers_of

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
    status = read_status(root / "sigmoid")
    assert status["state"] == "completed" and status["kind"] == "dpo" and status["step"] == 30


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_other_losses_learn_too(toy, loss_type):
    root, raw = toy
    raw = copy.deepcopy(raw)
    raw["dpo_config"]["loss_type"] = loss_type
    assert run(root, raw, loss_type)["dataset_rewards_accuracies"] > 0.9


def test_a_bf16_learner_learns_the_preferences_too(toy):
    """compute_dtype bfloat16 (its own training module): the reference log-probs and the steps in bf16."""
    root, raw = toy
    raw = copy.deepcopy(raw)
    raw.update(compute_dtype="bfloat16", training_model_path=str(root / "models" / "dpo_toy_bf16.vmfb"))
    summary = run(root, raw, "bf16")
    assert summary["dataset_rewards_accuracies"] > 0.9
    meta = json.loads((root / "models" / "dpo_toy_bf16.meta.json").read_text())
    assert meta["provenance"]["config"]["compute_dtype"] == "bfloat16"


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


def cli(root: Path, raw: dict, name: str, *args) -> subprocess.Popen:
    path = root / f"{name}.json"
    path.write_text(json.dumps(raw))
    return subprocess.Popen([sys.executable, "-m", "pcpc.cli", "run", str(path), "--out", str(root / name), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_max_restarts_relaunches_a_killed_dpo_process_and_finishes_exactly(toy):
    """DPO runs in one worker process like every loop: a dead one is relaunched from the checkpoint."""
    root, raw = toy
    raw = copy.deepcopy(raw)
    raw.update(checkpoint_interval=4)
    raw["dpo_config"]["num_epochs"] = 40  # 240 steps: the run cannot end before the kill lands
    run(root, raw, "sigmoid_ckpt4")  # the uninterrupted reference with the same schedule
    proc = cli(root, raw, "restart", "--max-restarts", "1")
    wait_for_lines(root / "restart" / "metrics.jsonl", 6, proc)
    os.kill(workers_of(proc.pid)[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # the kill lands a few fast steps after the 6th line: at the checkpoint after step 4 or a later one
    m = re.search(r"was killed by SIGKILL; restarting \(1 of 1\) from the checkpoint after step (\d+)", out)
    assert m and int(m.group(1)) % 4 == 0, out
    got = [json.loads(x) for x in (root / "restart" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (root / "sigmoid_ckpt4" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in got] == [(r["step"], r["loss"]) for r in want]
    assert read_status(root / "restart")["restarts"] == 1


def test_a_killed_dpo_process_fails_the_run_like_any_dead_worker(toy):
    root, raw = toy
    raw = copy.deepcopy(raw)
    raw["dpo_config"]["num_epochs"] = 1000
    proc = cli(root, raw, "dead", "--quiet")
    wait_for_lines(root / "dead" / "metrics.jsonl", 2, proc)
    pid = workers_of(proc.pid)[0]
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert f"DPO run failed: worker 0 (pid {pid}) was killed by SIGKILL" in err
    status = read_status(root / "dead")
    assert status["state"] == "failed" and status["error"]["kind"] == "died"


def test_ctrl_c_stops_dpo_after_the_step_with_a_checkpoint(toy):
    root, raw = toy
    raw = copy.deepcopy(raw)
    raw["dpo_config"]["num_epochs"] = 1000
    raw["checkpoint_interval"] = 0
    proc = cli(root, raw, "interrupted")
    wait_for_lines(root / "interrupted" / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    done = checkpoint.peek_step(root / "interrupted", "dpo")
    assert f"stopped after step {done} (checkpoint saved)" in out
    status = read_status(root / "interrupted")
    assert status["state"] == "stopped" and status["step"] == done >= 2
