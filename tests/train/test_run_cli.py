"""`pcpc run` and `pcpc data fetch` on user mistakes: one line, exit status 2, no traceback, nothing built."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from corpus import play_text, write_play
from pcpc.cli import cli
from pcpc.cmd_run import apply_overrides
from pcpc.errors import UserError
from pcpc.runtime.run import checkpoint
from pcpc.runtime.run.status import read_status
from pcpc.runtime.train.config import parse_experiment
CONFIG = {"model_path": "models/nanogpt_small.mlir", "data_path": "data/tiny_shakespeare.txt", "tau": 5,
          "outer_loop_steps": 3, "batch_size": 4, "wandb_project": None}


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_play(tmp_path / "data" / "tiny_shakespeare.txt", 200_000)
    (tmp_path / "exp.json").write_text(json.dumps(CONFIG))
    return tmp_path


def pcpc(*args):
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_missing_or_malformed_config(ws):
    assert_user_error(pcpc("run", "nope.json"), "nope.json: no such file")
    (ws / "bad.json").write_text('{"tau": 5,,}')
    assert_user_error(pcpc("run", "bad.json"), "bad.json: invalid JSON at line 1")
    (ws / "list.json").write_text("[1, 2]")
    assert_user_error(pcpc("run", "list.json"), "expected a JSON object at the top level")


@pytest.mark.parametrize("change, fragment", [
    ({"outer_loop_step": 3}, "exp.json: unknown key 'outer_loop_step'"),
    ({"tau": 2.5}, "exp.json.tau: expected an integer, got float 2.5"),
    ({"num_workers": 0}, "exp.json: num_workers must be >= 1, got 0"),
    ({"wandb_project": 7}, "exp.json.wandb_project: expected str"),
])
def test_config_mistakes_name_the_field(ws, change, fragment):
    (ws / "exp.json").write_text(json.dumps({**CONFIG, **change}))
    assert_user_error(pcpc("run", "exp.json"), fragment)


def test_missing_data_says_how_to_get_it(ws):
    (ws / "data" / "tiny_shakespeare.txt").unlink()
    assert_user_error(pcpc("run", "exp.json"), "data_path: data/tiny_shakespeare.txt not found",
                      "run `pcpc data fetch tiny_shakespeare`")
    (ws / "exp.json").write_text(json.dumps({**CONFIG, "data_path": "data/mine.txt"}))
    assert_user_error(pcpc("run", "exp.json"), "data_path: data/mine.txt not found", "place the text file at")


def _fake_checkpoint(run_dir: Path, round_: int, **config):
    exp = parse_experiment({**CONFIG, **config})
    p = [np.zeros(3, np.float32)]
    state = {"params": p, "momentum": p, "workers": [{"m": p, "v": p, "adam_step": 5, "next_step": 5}] * 2,
             "rng_state": {}, "tokens": 10}
    checkpoint.save(checkpoint.path_in(run_dir), checkpoint.Checkpoint(
        "diloco", round_, state, exp.trajectory({"workers": exp.num_workers}), {"elapsed_s": 1.0}))


def test_run_directory_guards(ws):
    assert_user_error(pcpc("run", "exp.json", "--resume"), "--resume: no checkpoint at runs/exp/checkpoints/latest.pt")
    _fake_checkpoint(ws / "runs" / "exp", 2)
    assert_user_error(pcpc("run", "exp.json"), "runs/exp already holds a run (checkpoint after round 2)",
                      "--resume", "--overwrite")
    assert_user_error(pcpc("run", "exp.json", "--resume", "--set", "tau=7"),
                      "--resume: tau is 7 but the checkpoint", "was written with 5")
    assert_user_error(pcpc("run", "exp.json", "--resume", "--set", "num_workers=3"),
                      "has 2 workers' state but this run has 3 workers")
    (ws / "runs" / "exp" / "checkpoints" / "latest.pt").write_bytes(b"\x00garbage")
    assert_user_error(pcpc("run", "exp.json", "--resume"), "not a readable pcpc checkpoint")


@pytest.mark.parametrize("change, fragments", [
    ({"data_chars": 300}, ("data_path: each of the 2 workers' shards has 135 tokens", "one batch of 4 x 33")),
    ({"data_chars": 3000}, ("data_path: the validation split has 300 tokens", "smaller eval_batch_size")),
    ({"max_epochs": 1, "tau": 50, "eval_batch_size": 8, "data_chars": 12_000},
     ("max_epochs: 1 epochs of 41 steps is less than one round of tau=50 steps",)),
])
def test_data_mistakes_are_found_before_any_worker_starts_and_never_retried(ws, monkeypatch, change, fragments):
    import pcpc.runtime.run.skeleton as skeleton

    monkeypatch.setattr(skeleton, "launch_local", lambda *a, **k: pytest.fail("a worker was started"))
    change = dict(change)
    (ws / "data" / "tiny_shakespeare.txt").write_text(play_text(change.pop("data_chars")))
    (ws / "exp.json").write_text(json.dumps({**CONFIG, **change}))
    assert_user_error(pcpc("run", "exp.json", "--max-restarts", "3"), *fragments)
    assert not (ws / "runs").exists() and not (ws / "models").exists()  # nothing claimed, nothing built


def test_unwritable_run_and_model_folders_are_one_line_errors(ws):
    (ws / "blocker").write_text("a file where a folder would go")
    assert_user_error(pcpc("run", "exp.json", "--out", "blocker/run"), "run directory blocker/run: Not a directory")
    (ws / "exp.json").write_text(json.dumps({**CONFIG, "model_path": "blocker/nanogpt_small.mlir"}))
    assert_user_error(pcpc("run", "exp.json"), "model_path: cannot create the folder of blocker/nanogpt_small.mlir")
    status = read_status(ws / "runs" / "exp")  # the run had claimed its directory: it says why it failed
    assert status["state"] == "failed" and status["error"]["kind"] == "user_error"
    assert "model_path: cannot create the folder" in status["error"]["message"]


def test_foreign_mlir_via_the_cli(ws):
    (ws / "models").mkdir()
    (ws / "models" / "nanogpt_small.mlir").write_text("module {}\n")
    assert_user_error(pcpc("run", "exp.json"), "was not produced by pcpc", "does not differentiate MLIR")


def test_set_overrides(ws):
    assert apply_overrides({"a": 1, "b": {"c": 2}}, ("a=3", "b.c=\"x\"", "d=null", "e=word")) == \
        {"a": 3, "b": {"c": "x"}, "d": None, "e": "word"}
    with pytest.raises(UserError, match="--set: expected KEY=VALUE, got 'tau'"):
        apply_overrides({}, ("tau",))
    assert_user_error(pcpc("run", "exp.json", "--set", "tau"), "--set: expected KEY=VALUE")
    assert_user_error(pcpc("run", "exp.json", "--set", "tau=-1"), "tau must be >= 1, got -1")


def test_data_fetch_unknown_name_is_a_usage_error():
    result = pcpc("data", "fetch", "imagenet")
    assert result.exit_code == 2 and "Invalid value" in result.output and "enwik8" in result.output


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    exe = Path(sys.executable).parent / "pcpc"
    proc = subprocess.run([str(exe), "run", "missing.json"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: missing.json: no such file" and proc.stdout == ""
