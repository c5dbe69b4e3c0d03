"""The run skeleton's pieces on their own: status.json, the checkpoint format, the metrics log and its
progress output, the run directory's claim, the resume check, launch failures, device selection."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from pcpc.errors import UserError
from pcpc.runtime.module import device_index
from pcpc.runtime.run import checkpoint, metrics
from pcpc.runtime.run.checkpoint import Checkpoint
from pcpc.runtime.run.launch import WorkerFailure, launch_local
from pcpc.runtime.run.rundir import RunDir
from pcpc.runtime.run.status import StatusFile, read_status
from pcpc.runtime.train.config import parse_experiment

DILOCO = {"model_path": "models/nanogpt_small.mlir", "data_path": "data/x.txt"}


# --- status.json


def test_status_lifecycle_and_fields(tmp_path):
    status = StatusFile.start(tmp_path, "diloco", "exp.json", steps_planned=10, unit="round")
    status.update()
    got = read_status(tmp_path)
    assert got["state"] == got["recorded_state"] == "running" and got["pid"] == os.getpid()
    assert got["steps_planned"] == 10 and got["step"] == 0 and got["ended_at"] is None and got["error"] is None
    status.update(step=4, last_metrics={"round": 4, "train_loss": np.float32(2.5)})
    assert read_status(tmp_path)["last_metrics"] == {"round": 4, "train_loss": 2.5}
    status.failed("user_error", "data_path: too small")
    got = read_status(tmp_path)
    assert got["state"] == "failed" and got["error"] == {"kind": "user_error", "message": "data_path: too small"}
    assert got["ended_at"] is not None
    assert not [p for p in tmp_path.iterdir() if p.name != "status.json"]  # written atomically: no temp files


def test_a_running_status_whose_process_is_gone_reads_as_failed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    status = StatusFile.start(tmp_path, "grpo", "x.json", 3, "iteration")
    status.data.update(pid=proc.pid, pid_start=None)
    status.update()
    assert read_status(tmp_path)["state"] == "running"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    got = read_status(tmp_path)
    assert got["recorded_state"] == "running" and got["state"] == "failed" and got["error"]["kind"] == "died"
    # A live pid that is another process (pid reuse: its start time differs) is gone too.
    status.data.update(pid=os.getpid(), pid_start=1)
    status.update()
    assert read_status(tmp_path)["state"] == "failed"
    (tmp_path / "status.json").write_text("{cut")
    assert read_status(tmp_path)["error"]["kind"] == "unreadable"
    assert read_status(tmp_path / "nowhere") is None


# --- the checkpoint format


def test_checkpoint_round_trip_of_nested_state(tmp_path):
    path = checkpoint.path_in(tmp_path)
    state = {"params": [np.arange(6, dtype=np.float32).reshape(2, 3)], "workers": [{"m": [np.ones(2)], "step": 3}],
             "rng": np.random.default_rng(0).bit_generator.state, "momentum": None, "count": np.int64(7)}
    old = os.umask(0o022)
    try:
        checkpoint.save(path, Checkpoint("dpo", 5, state, {"seed": 1}, {"elapsed_s": 2.0}))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the umask's mode, not mkstemp's 0600
    ck = checkpoint.load(path, "dpo")
    assert (ck.kind, ck.step, ck.trajectory, ck.clock) == ("dpo", 5, {"seed": 1}, {"elapsed_s": 2.0})
    np.testing.assert_array_equal(ck.state["params"][0], state["params"][0])
    np.testing.assert_array_equal(ck.state["workers"][0]["m"][0], np.ones(2))
    assert ck.state["rng"] == state["rng"] and ck.state["momentum"] is None and ck.state["count"] == 7
    assert checkpoint.peek_step(tmp_path, "dpo") == 5 and checkpoint.peek_step(tmp_path / "x", "dpo") is None
    with pytest.raises(UserError, match="a dpo checkpoint, but this is a grpo run"):
        checkpoint.load(path, "grpo")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="not a readable pcpc checkpoint, truncated or foreign"):
        checkpoint.load(path, "dpo")


# --- the metrics log


def test_truncate_jsonl_keeps_the_checkpointed_rows_and_skips_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(1, 6)) + '{"step": 6, "lo')
    assert [r["step"] for r in metrics.truncate_jsonl(path, "step", 3)] == [1, 2, 3]
    assert path.read_text() == "".join(json.dumps({"step": i}) + "\n" for i in range(1, 4))
    assert metrics.truncate_jsonl(tmp_path / "none.jsonl", "step", 3) == []
    assert not (tmp_path / "none.jsonl").exists()


def _log(tmp_path, start, total=4, quiet=True):
    cfg = parse_experiment(DILOCO)
    return metrics.MetricsLog(tmp_path, cfg, ["step", "loss", "val"], unit="step", total=total, start=start,
                              panels=[("loss", ["loss", "val"])], png="curves.png", title="t",
                              postfix=[("loss", "loss")], quiet=quiet)


def test_metrics_log_writes_every_sink_and_resumes_to_the_checkpoint(tmp_path):
    log = _log(tmp_path, 0)
    for i in range(1, 5):
        log.record({"step": i, "loss": 1.0 / i, "val": None if i % 2 else 0.5, "extra": "dropped"})
    log.close({"done": True})
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "step,loss,val"
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    log = _log(tmp_path, 2)  # resumed after step 2: rows 3 and 4 are cut from both files
    assert [r["step"] for r in log.records] == [1, 2] and log.last("val") == 0.5
    log.record({"step": 3, "loss": 0.3, "val": None})
    log.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1:] == ["1,1.0,", "2,0.5,0.5", "3,0.3,"]


def test_progress_into_a_file_is_plain_lines_not_bar_frames(monkeypatch):
    out = io.StringIO()
    p = metrics.Progress("round", total=100, start=0, ticks_per_step=5, live=False, stream=out)
    clock = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    for r in range(100):
        for k in range(5):
            clock[0] += 0.1  # 0.5 s a round: 50 s in all
            p.tick(r, f"loss {k}")
        p.step_done(r + 1, "loss 1.0")
    p.say("a message")
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # the first round, one line each ~30 s, the last round; then the message
    assert lines[0].startswith("round 1/100") and lines[-2].startswith("round 100/100") and lines[-1] == "a message"
    assert len(lines) == 4, lines
    assert "eta" in lines[0] and "eta" not in lines[-2]
    quiet = io.StringIO()
    q = metrics.Progress("round", 3, 0, quiet=True, stream=quiet)
    q.step_done(1, "x")
    q.say("hidden")
    assert quiet.getvalue() == ""


# --- the run directory and the resume check


def test_claim_new_resume_and_overwrite(tmp_path):
    run = RunDir(tmp_path / "run")
    cfg = parse_experiment(DILOCO)
    assert run.claim("diloco", cfg.trajectory(), resume=False, overwrite=False) is None
    (run.path / "metrics.jsonl").write_text("{}\n")
    (run.path / "notes.txt").write_text("mine")
    checkpoint.save(run.checkpoint, Checkpoint("diloco", 2, {}, cfg.trajectory()))
    with pytest.raises(UserError, match=r"already holds a run \(checkpoint after round 2\); pass --resume"):
        run.claim("diloco", cfg.trajectory(), resume=False, overwrite=False, unit="round")
    assert run.claim("diloco", cfg.trajectory(), resume=True, overwrite=False).step == 2
    longer = parse_experiment({**DILOCO, "outer_loop_steps": 500, "wandb_project": "p"})  # may change on resume
    assert run.claim("diloco", longer.trajectory(), resume=True, overwrite=False).step == 2
    changed = parse_experiment({**DILOCO, "tau": 7})
    with pytest.raises(UserError, match=r"--resume: tau is 7 but the checkpoint .* was written with 50"):
        run.claim("diloco", changed.trajectory(), resume=True, overwrite=False)
    run.claim("diloco", cfg.trajectory(), resume=False, overwrite=True, loop_files=("*.png",))
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoints", "notes.txt"]  # the user's file stays


def test_resume_refuses_a_longer_cosine_run_whose_decay_follows_its_length(tmp_path):
    """outer_loop_steps may change on resume, except when a cosine schedule's decay length follows it."""
    from pcpc.runtime.train.diloco import DiLoCo

    run = RunDir(tmp_path)
    cosine = parse_experiment({**DILOCO, "lr_schedule": "cosine", "outer_loop_steps": 30, "tau": 10})
    derived = {"workers": 2, "resolved.lr_decay_steps": cosine.decay_steps(30)}
    checkpoint.save(run.checkpoint, Checkpoint("diloco", 5, {}, cosine.trajectory(derived)))
    longer = parse_experiment({**DILOCO, "lr_schedule": "cosine", "outer_loop_steps": 60, "tau": 10})
    with pytest.raises(UserError, match=r"would decay over 600 inner steps, but the checkpoint's decays over 300.*"
                                        r"\"lr_decay_steps\": 300"):
        run.claim("diloco", longer.trajectory({**derived, "resolved.lr_decay_steps": longer.decay_steps(60)}),
                  resume=True, overwrite=False, explain=DiLoCo.explain_change)
    pinned = parse_experiment({**DILOCO, "lr_schedule": "cosine", "outer_loop_steps": 60, "tau": 10,
                               "lr_decay_steps": 300})
    with pytest.raises(UserError, match=r"lr_decay_steps is 300 but the checkpoint .* was written with None"):
        run.claim("diloco", pinned.trajectory({**derived, "resolved.lr_decay_steps": 300}), resume=True,
                  overwrite=False)
    # A run that max_epochs ends early decays over its real length, not outer_loop_steps x tau.
    assert cosine.decay_steps(rounds=12) == 120 and cosine.lr_at(120, rounds=12) == pytest.approx(6e-5)


# --- launch


def _raise_user_error(rank, world, payload):
    raise UserError("data_path: too small for worker %d" % rank)


def _raise_value_error(rank, world, payload):
    if rank == 1:
        raise ValueError("boom")
    time.sleep(30)


def _die(rank, world, payload):
    if rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)


@pytest.mark.parametrize("target, kind, message", [
    (_raise_user_error, "user_error", "worker 0 (pid "),
    (_raise_value_error, "error", "worker 1 (pid "),
    (_die, "died", "was killed by SIGKILL"),
])
def test_launch_reports_how_a_worker_failed(target, kind, message):
    with pytest.raises(WorkerFailure) as e:
        launch_local(target, None, 2, grace_s=1.0, say=lambda m: None)
    assert e.value.kind == kind and message in str(e.value) and "\n" not in str(e.value)
    if kind != "died":
        assert "Traceback" in e.value.details and target.__name__ in e.value.details


# --- devices


def test_each_local_worker_gets_its_own_gpu():
    assert device_index("cuda", 4, {"LOCAL_RANK": "2"}) == 2
    assert device_index("cuda", 8, {}) == 0
    assert device_index("hip", 2, {"LOCAL_RANK": "3"}) == 1  # more local processes than devices: shared
    with pytest.raises(UserError, match="sees no device"):
        device_index("cuda", 0, {"LOCAL_RANK": "0"})
