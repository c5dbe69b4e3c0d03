"""pcpc batch: batch files (expansion, validation), the runner (parallel, logs, status, skip-completed, a killed
runner, two runners, Ctrl+C) and the reports, on tiny DiLoCo runs that share one build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from corpus import write_play
from pcpc.errors import UserError
from pcpc.runtime.batch import reports
from pcpc.runtime.batch.spec import load_batch, validate
from pcpc.runtime.run.status import read_status

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A working directory with data and a models folder every batch here shares (one build per shape)."""
    ws = tmp_path_factory.mktemp("batch")
    write_play(ws / "data" / "tiny_shakespeare.txt", 200_000)
    return ws


def base(ws, **over):
    return {"model_path": str(ws / "models" / "tiny.mlir"), "data_path": "data/tiny_shakespeare.txt",
            "model": {"preset": "nanogpt-small"}, "num_workers": 1, "tau": 2, "outer_loop_steps": 2,
            "batch_size": 4, "eval_batch_size": 8, "eval_batches": 2, "sample_tokens": 0, "checkpoint_interval": 1,
            "wandb_project": None, **over}


def write_batch(ws, name, **doc) -> Path:
    path = ws / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def pcpc(ws, *args, **kw):
    return subprocess.run([sys.executable, "-m", "pcpc.cli", *map(str, args)], cwd=ws, capture_output=True,
                          text=True, timeout=600, **kw)


def spawn(ws, *args):
    return subprocess.Popen([sys.executable, "-m", "pcpc.cli", *map(str, args)], cwd=ws, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(predicate, proc, limit_s=300):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("timed out")


def attempts(ws, out, name) -> list[str]:
    return [line for line in (ws / out / "logs" / f"{name}.log").read_text().splitlines() if line.startswith("=== ")]


# --- batch files


def test_matrix_names_groups_and_deep_merge(ws, monkeypatch):
    monkeypatch.chdir(ws)  # data_path is relative to the current directory, as for `pcpc run`
    path = write_batch(ws, "m", base=base(ws, model={"preset": "nanogpt-small", "n_layer": 2}),
                       experiments=[{"name": "plain"}, {"name": "rms", "model": {"norm": "rmsnorm"}}],
                       matrix=[{"key": "seed", "values": [1, 2], "label": "s"}])
    b = load_batch(path)
    assert [e.name for e in b.experiments] == ["plain_s1", "plain_s2", "rms_s1", "rms_s2"]
    assert [e.group for e in b.experiments] == ["plain", "plain", "rms", "rms"]
    rms = b.experiments[3].raw
    assert rms["model"] == {"preset": "nanogpt-small", "n_layer": 2, "norm": "rmsnorm"} and rms["seed"] == 2
    assert validate(b) == []
    assert [e.name for e in b.select(only="rms_s1,plain_s2")] == ["plain_s2", "rms_s1"]
    assert [e.name for e in b.select(exclude="rms_s1")] == ["plain_s1", "plain_s2", "rms_s2"]
    with pytest.raises(UserError, match=r"--only: no experiment named 'nope'"):
        b.select(only="nope")
    grid = write_batch(ws, "grid", base=base(ws), matrix=[
        {"lora": {"tau": 3}, "dora": {"tau": 4}}, {"key": "batch_size", "values": [4, 8], "label": "b"},
        {"key": "seed", "values": [42], "label": "s"}])
    assert [e.name for e in load_batch(grid).experiments] == ["lora_b4_s42", "lora_b8_s42", "dora_b4_s42",
                                                              "dora_b8_s42"]


def test_validation_names_every_bad_experiment_and_field(ws, monkeypatch):
    monkeypatch.chdir(ws)
    path = write_batch(ws, "bad", base=base(ws), experiments=[
        {"name": "ok"}, {"name": "typo", "tua": 3}, {"name": "nodata", "data_path": "data/none.txt"},
        {"name": "ok"}, {"name": "badmodel", "model": {"mlp": "swish"}}])
    errors = validate(load_batch(path))
    assert len(errors) == 4, errors
    assert any("bad.yaml: typo: unknown key 'tua'" in e for e in errors)
    assert any("bad.yaml: nodata: data_path: data/none.txt not found" in e for e in errors)
    assert any("bad.yaml: ok: the name is used twice" in e for e in errors)
    assert any("bad.yaml: badmodel: model: mlp must be one of relu, gelu, swiglu" in e for e in errors)
    proc = pcpc(ws, "batch", "run", path, "--out", "runs/bad")  # nothing runs: it fails validation first
    assert proc.returncode == 2 and "nothing was run" in proc.stderr and "typo: unknown key 'tua'" in proc.stderr
    assert not (ws / "runs" / "bad").exists()
    for doc, message in [({"base": 3}, "base: expected an experiment config"),
                         ({"base": {}, "matrix": [{"key": "seed"}]}, r"matrix\[0\]: a sweep is"),
                         ({"base": {}}, "no experiments"), ({"base": {}, "experimentz": []}, "unknown key 'experimentz'")]:
        with pytest.raises(UserError, match=message):
            load_batch(write_batch(ws, "doc", **doc))


@pytest.mark.parametrize("name,runs,groups", [("ablations.yaml", 24, 8), ("peft_tiny.yaml", 16, 8)])
def test_the_shipped_batch_files_validate_list_and_dry_run(tmp_path, name, runs, groups):
    from pcpc.kinds import load_config

    b = load_batch(EXPERIMENTS / name)
    assert len(b.experiments) == runs and len({e.group for e in b.experiments}) == groups
    for e in b.experiments:
        load_config(e.raw, where=e.name)
    listed = pcpc(tmp_path, "batch", "run", EXPERIMENTS / name, "--list")
    assert listed.returncode == 0 and f"{runs} of {runs} experiments" in listed.stdout
    if name == "peft_tiny.yaml":  # its inputs are made by the runs themselves: it validates anywhere
        dry = pcpc(tmp_path, "batch", "run", EXPERIMENTS / name, "--dry-run", "--out", "runs/p")
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.count(": start") == runs and "--out runs/p/vera_s2" in dry.stdout


# --- the runner and the reports


def test_a_batch_runs_reports_and_retries_its_failures(ws):
    path = write_batch(ws, "small", base=base(ws), experiments=[
        {"name": "a"}, {"name": "b", "seed": 2}, {"name": "toosmall", "batch_size": 100000}])
    proc = pcpc(ws, "batch", "run", path, "--parallel", "2", "--out", "runs/small")
    assert proc.returncode == 1, proc.stderr
    assert "batch small: 2 completed, 1 failed" in proc.stdout
    assert f"pcpc batch run {path} --out runs/small --skip-completed --only toosmall" in proc.stdout
    record = json.loads((ws / "runs/small/batch_status.json").read_text())
    assert {n: r["state"] for n, r in record["runs"].items()} == {"a": "completed", "b": "completed",
                                                                 "toosmall": "failed"}
    assert read_status(ws / "runs/small/a")["state"] == "completed"
    assert "too few for one batch" in (ws / "runs/small/logs/toosmall.log").read_text()
    rep = reports.status_report(ws / "runs/small")
    assert rep["counts"]["completed"] == 2 and rep["counts"]["failed"] == 1
    found = reports.diagnose(ws / "runs/small")
    assert [(f["name"], f["kind"]) for f in found] == [("toosmall", "config error")]
    assert "pcpc batch validate" in found[0]["fix"]
    text = reports.summary(ws / "runs/small")
    assert "| a | completed |" in text and "toosmall" in text and (ws / "runs/small/curves.png").is_file()
    # a second run of the batch without --skip-completed would clobber the results: refused
    again = pcpc(ws, "batch", "run", path, "--out", "runs/small")
    assert again.returncode == 2 and "already holds runs of this batch" in again.stderr
    dry = pcpc(ws, "batch", "run", path, "--out", "runs/small", "--skip-completed", "--dry-run")
    assert dry.returncode == 0 and "a: skip" in dry.stdout and "toosmall: start" in dry.stdout
    assert "run runs/small/configs/toosmall.json --out runs/small/toosmall" in dry.stdout


def test_a_killed_runner_resumes_exactly_the_runs_that_did_not_complete(ws):
    """SIGKILL the runner while its second run trains: that run dies with it; --skip-completed leaves the
    completed run alone and resumes the other from its checkpoint."""
    path = write_batch(ws, "kill", base=base(ws), experiments=[{"name": "first"},
                                                               {"name": "second", "outer_loop_steps": 400}])
    runner = spawn(ws, "batch", "run", path, "--out", "runs/kill", "--no-progress")
    second = ws / "runs/kill/second/metrics.jsonl"
    wait_for(lambda: second.is_file() and len(second.read_text().splitlines()) >= 3, runner)
    os.killpg(runner.pid, signal.SIGKILL)
    runner.communicate()
    time.sleep(1)  # the run's processes follow their runner (PR_SET_PDEATHSIG)
    assert read_status(ws / "runs/kill/first")["state"] == "completed"
    status = read_status(ws / "runs/kill/second")
    assert status["recorded_state"] == "running" and status["state"] == "failed"
    proc = pcpc(ws, "batch", "run", path, "--out", "runs/kill", "--skip-completed", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert len(attempts(ws, "runs/kill", "first")) == 1  # not run again
    second_attempts = attempts(ws, "runs/kill", "second")
    assert len(second_attempts) == 2 and second_attempts[1].split()[2] == "resume:"
    assert read_status(ws / "runs/kill/second")["state"] == "completed"


def test_two_runners_and_ctrl_c(ws):
    path = write_batch(ws, "long", base=base(ws, outer_loop_steps=400), experiments=[{"name": "long"}])
    runner = spawn(ws, "batch", "run", path, "--out", "runs/long", "--no-progress")
    metrics = ws / "runs/long/long/metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, runner)
    other = pcpc(ws, "batch", "run", path, "--out", "runs/long", "--skip-completed")
    assert other.returncode == 2 and "another `pcpc batch run`" in other.stderr and str(runner.pid) in other.stderr
    os.killpg(runner.pid, signal.SIGINT)  # Ctrl+C at the terminal reaches the runner's whole group
    out, err = runner.communicate(timeout=120)
    assert runner.returncode == 130, err
    assert read_status(ws / "runs/long/long")["state"] == "stopped"
    assert json.loads((ws / "runs/long/batch_status.json").read_text())["runs"]["long"]["state"] == "stopped"
    assert "--skip-completed --only long" in out
    found = reports.diagnose(ws / "runs/long")
    assert found[0]["kind"] == "stopped" and "--skip-completed resumes it" in found[0]["fix"]


def test_the_slurm_executor_through_submitits_local_cluster(ws):
    """`--executor submitit-local` is the Slurm code path (submitit jobs, their results, their logs) on this
    machine: runs complete or fail as their own status says, and Ctrl+C stops a job's run at a checkpoint."""
    path = write_batch(ws, "sub", base=base(ws), experiments=[{"name": "ok"}, {"name": "toosmall",
                                                                               "batch_size": 100000}])
    proc = pcpc(ws, "batch", "run", path, "--out", "runs/sub", "--executor", "submitit-local", "--parallel", "2",
                "--no-progress")
    assert proc.returncode == 1, proc.stderr
    record = json.loads((ws / "runs/sub/batch_status.json").read_text())["runs"]
    assert {n: r["state"] for n, r in record.items()} == {"ok": "completed", "toosmall": "failed"}
    assert all(r["executor"] == "submitit-local" and r["job_id"] for r in record.values())
    assert read_status(ws / "runs/sub/ok")["state"] == "completed"
    assert "too few for one batch" in (ws / "runs/sub/logs/toosmall.log").read_text()
    assert (ws / "runs/sub/submitit").is_dir()

    path = write_batch(ws, "sublong", base=base(ws, outer_loop_steps=400), experiments=[{"name": "long"}])
    runner = spawn(ws, "batch", "run", path, "--out", "runs/sublong", "--executor", "submitit-local",
                   "--no-progress")
    metrics = ws / "runs/sublong/long/metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, runner)
    # Ctrl+C at the terminal: it reaches the runner and submitit's controller, which kills its job a second
    # later; the run still stops after its step, and the runner waits for that
    os.killpg(runner.pid, signal.SIGINT)
    out, err = runner.communicate(timeout=120)
    log = (ws / "runs/sublong/logs/long.log").read_text()
    assert runner.returncode == 130, (out, err, log, (ws / "runs/sublong/batch_status.json").read_text())
    status = read_status(ws / "runs/sublong/long")
    assert status["state"] == "stopped", status
    assert json.loads((ws / "runs/sublong/batch_status.json").read_text())["runs"]["long"]["state"] == "stopped"
    resumed = pcpc(ws, "batch", "run", path, "--out", "runs/sublong", "--skip-completed", "--dry-run")
    assert "long: resume" in resumed.stdout

    bad = pcpc(ws, "batch", "run", path, "--out", "runs/x", "--partition", "gpu")
    assert bad.returncode == 2 and "--partition, --gpus-per-run and --cpus-per-run are for --executor slurm" \
        in bad.stderr


def test_wandb_offline_runs_get_the_batchs_tags_and_group(ws):
    """WANDB_MODE=offline: no login needed; each run keeps its W&B run in <run dir>/wandb with the automatic
    tags and the {size}_{group} group."""
    pytest.importorskip("wandb")
    path = write_batch(ws, "wb", base=base(ws, wandb_project="pcpc-test"),
                       experiments=[{"name": "swi", "model": {"mlp": "swiglu"}}],
                       matrix=[{"key": "seed", "values": [1], "label": "s"}])
    proc = pcpc(ws, "batch", "run", path, "--out", "runs/wb", "--no-progress",
                env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr
    log = (ws / "runs/wb/logs/swi_s1.log").read_text()
    assert "W&B: offline" in log
    cfg = json.loads((ws / "runs/wb/configs/swi_s1.json").read_text())
    assert cfg["wandb_group"] == "nanogpt-small_swi" and cfg["wandb_tags"] == ["nanogpt-small", "swi", "s1"]
    records = list((ws / "runs/wb/swi_s1/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()  # the run record (protobuf) holds its strings as they are
    for s in ("nanogpt-small_swi", "swi_s1", "pcpc-test", "train_loss"):
        assert s.encode() in data, s
