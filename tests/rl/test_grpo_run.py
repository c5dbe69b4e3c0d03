"""GRPO end to end on a toy Qwen2 (vocab 16, 1 layer): learning, workers, resume, a dead worker, errors.

Every run shares one models/ folder, so the generation and training modules
are built once (by the first run) and found up to date afterwards. The toy
reward pays for emitting token 7; a random policy emits it 1/16 of the time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcpc.errors import UserError
from pcpc.kinds import run_experiment
from pcpc.runtime import masks
from pcpc.runtime.prompts import write_prompts
from pcpc.runtime.run import checkpoint, deltas
from pcpc.runtime.run.status import read_status
from runs import run_config_file, wait_for_lines

REWARD = "def target_token(completion_ids, **_):\n    return [sum(t == 7 for t in c) / max(len(c), 1) for c in completion_ids]\n"
BAD_REWARD = "def broken(completions, **_):\n    return [len(c) / 0 for c in completions]\n"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_toy")
    (root / "toy_reward.py").write_text(REWARD)
    (root / "bad_reward.py").write_text(BAD_REWARD)
    write_prompts(root / "prompts.bin", [[1, 2, 3], [4, 5], [6, 8, 9, 10], [11, 12]])

    def config(name: str, **top) -> Path:
        grpo_over = top.pop("grpo_config", {})
        raw = {
            "model_path": str(root / "models" / "toy_gen.mlir"),
            "training_model_path": str(root / "models" / "toy_train.vmfb"),
            "weights_path": str(root / "models" / "toy_flat.bin"),
            "tokenizer": "bytes",
            "grpo_config": {"num_iterations": 30, "group_size": 8, "learning_rate": 0.003, "beta": 0.04,
                            "prompt_file": str(root / "prompts.bin"), "num_prompts": 2,
                            "reward_funcs": ["toy_reward.py:target_token"], **grpo_over},
            "rollout_config": {"max_tokens": 8, "temperature": 1.0, "top_p": 1.0, "batch_size": 8},
            "model": "qwen2-tiny",
            "model_overrides": {"vocab_size": 16, "num_hidden_layers": 1},
            "init_weights": "random",
            "checkpoint_interval": 2,
            **top,
        }
        path = root / f"{name}.json"
        path.write_text(json.dumps(raw))
        return path

    return root, config


run = run_config_file


def records(cfg: Path) -> list[dict]:
    return [json.loads(line) for line in (cfg.with_suffix("") / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def learned(toy):
    root, config = toy
    cfg = config("learn")
    return cfg, run(cfg)


def test_policy_learns_the_toy_reward(learned):
    cfg, summary = learned
    recs = records(cfg)
    assert summary["iterations"] == 30 and len(recs) == 30
    first = sum(r["reward_mean"] for r in recs[:5]) / 5
    last = sum(r["reward_mean"] for r in recs[-5:]) / 5
    assert first < 0.2 and last > 0.6, (first, last)
    assert all(r["kl"] is not None and r["kl"] >= 0 for r in recs)
    assert recs[-1]["kl"] > 0  # the policy moved away from the reference
    # the reference has a module of its own, the weight file packed once for it (runtime/rl/policy.py)
    models = cfg.parent / "models"
    assert (models / "toy_train-ref.vmfb").is_file() and len(list(models.glob("toy_flat.bin.*.packed"))) == 1
    for key in ("reward/toy_reward.py:target_token", "frac_reward_zero_std", "clip_ratio", "completion_length_mean",
                "completion_length_min", "completion_length_max", "rollout_tokens_per_s", "learner_step_s"):
        assert recs[-1][key] is not None, key
    run_dir = cfg.with_suffix("")
    for name in ("metrics.csv", "metrics.png", "summary.json", "samples.jsonl", "config.json", "workers.json"):
        assert (run_dir / name).is_file(), name
    status = read_status(run_dir)
    assert status["state"] == "completed" and status["kind"] == "grpo" and status["unit"] == "iteration"
    assert status["step"] == status["steps_planned"] == 30 and status["last_metrics"]["step"] == 30
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["step", "reward_mean", "reward_std"]


def test_a_bf16_learner_learns_the_toy_reward_too(toy):
    """compute_dtype bfloat16: the training and reference modules compute their matmuls in bf16 (the in-place
    AdamW module is the fp32 run's: it has no matmuls); the run learns as the fp32 one does."""
    root, config = toy
    models = root / "models"
    cfg = config("learn_bf16", compute_dtype="bfloat16", training_model_path=str(models / "toy_train_bf16.vmfb"),
                 weights_path=str(models / "toy_flat_bf16.bin"))
    summary = run(cfg)
    recs = records(cfg)
    assert summary["iterations"] == 30
    first = sum(r["reward_mean"] for r in recs[:5]) / 5
    last = sum(r["reward_mean"] for r in recs[-5:]) / 5
    assert first < 0.2 and last > 0.6, (first, last)
    assert all(r["kl"] is not None and r["kl"] >= 0 for r in recs)
    for name in ("toy_train_bf16", "toy_train_bf16-ref"):
        recipe = json.loads((models / f"{name}.meta.json").read_text())["provenance"]["config"]
        assert recipe["compute_dtype"] == "bfloat16", name
    adamw = json.loads((models / "toy_train_bf16-adamw.meta.json").read_text())["provenance"]["config"]
    assert "compute_dtype" not in adamw


def test_two_workers_give_the_same_run(toy, learned):
    """Each rollout batch is seeded by (seed, iteration, batch), so the worker count changes nothing."""
    root, config = toy
    cfg = config("two_workers", num_workers=2, grpo_config={"num_iterations": 3})
    run(cfg)
    got, want = records(cfg), records(learned[0])[:3]
    for a, b in zip(got, want):
        assert (a["reward_mean"], a["kl"], a["loss"]) == (b["reward_mean"], b["kl"], b["loss"])
    assert len(json.loads((cfg.with_suffix("") / "workers.json").read_text())) == 3


def test_resume_continues_exactly(toy, learned):
    root, config = toy
    cfg = config("resume", grpo_config={"num_iterations": 2})
    run(cfg)
    with pytest.raises(UserError, match="already holds a run"):
        run(cfg)
    cfg = config("resume", grpo_config={"num_iterations": 4})
    run(cfg, resume=True)
    got, want = records(cfg), records(learned[0])[:4]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [(r["reward_mean"], r["kl"], r["loss"]) for r in got] == [(r["reward_mean"], r["kl"], r["loss"]) for r in want]
    bad = config("resume", grpo_config={"num_iterations": 4, "beta": 0.5})
    with pytest.raises(UserError, match=r"--resume: grpo_config.beta is 0.5 but the checkpoint"):
        run(bad, resume=True)


def test_dead_worker_stops_the_run(toy, learned):
    """SIGKILL a rollout worker mid-run: the run ends (not hangs) with an error naming the killed process."""
    root, config = toy
    cfg = config("dead", grpo_config={"num_iterations": 100000})
    run_dir = cfg.with_suffix("")
    proc = subprocess.Popen([sys.executable, "-m", "pcpc.cli", "run", str(cfg), "--out", str(run_dir), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = run_dir / "workers.json"
        for _ in range(600):
            if workers.is_file() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert workers.is_file(), proc.communicate()[1]
        pid = json.loads(workers.read_text())["rank 1"]
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # bounded: a hang fails here
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1  # a dead worker exits 1 in every loop (2 is for mistakes in the input)
    assert f"(pid {pid}) was killed by SIGKILL" in err and "GRPO run failed" in err


def test_missing_hf_weights_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    path = Path(__file__).resolve().parents[2] / "experiments" / "qwen_rl_test.json"
    with pytest.raises(UserError, match=r"weights_path: checkpoints/initial_weights/qwen_flat.bin does not exist.*"
                                         r"Download Qwen/Qwen2.5-0.5B-Instruct .*huggingface-cli download"):
        run_experiment(str(path), json.loads(path.read_text()), quiet=True)
    assert not (tmp_path / "models").exists()  # failed before building anything


def test_foreign_artifact_is_refused(toy, tmp_path):
    root, config = toy
    foreign = tmp_path / "qwen_rl_generation.mlir"
    foreign.write_text("module {}\n")
    cfg = config("foreign", model_path=str(foreign))
    with pytest.raises(UserError, match="model_path: .* was not produced by pcpc"):
        run(cfg)
    assert foreign.read_text() == "module {}\n"


@pytest.mark.parametrize("updates", [1, 2])
def test_outer_step_at_rate_1_is_plain_grpo(toy, learned, updates):
    """The outer Nesterov step with learning_rate 1 and (almost) no momentum moves the global weights onto the
    learner's: the same weights as plain GRPO, whether it runs behind each AdamW chunk (one update per
    iteration) or after several updates."""
    import numpy as np

    from pcpc.runtime.rl import setup

    root, config = toy
    grpo_config = {"num_iterations": 2, "updates_per_iteration": updates}
    plain = config(f"plain{updates}", grpo_config=dict(grpo_config), delta_log={"steps": [2], "fisher_batches": 3})
    outer = config(f"outer{updates}", learning_rate=1.0, nesterov_momentum=1e-7, grpo_config=dict(grpo_config))
    run(plain), run(outer)
    a = checkpoint.load(checkpoint.path_in(plain.with_suffix("")), "grpo").state
    b = checkpoint.load(checkpoint.path_in(outer.with_suffix("")), "grpo").state
    assert a["momentum"] is None and b["momentum"] is not None
    moved = max(np.abs(p - q).max() for p, q in zip(b["params"], setup.read_weights(
        root / "models" / "toy_flat.bin", _meta(root))))
    assert moved > 1e-4  # the run did train
    for p, q in zip(a["params"], b["params"]):
        np.testing.assert_allclose(p, q, rtol=0, atol=1e-6)
    # the Fisher sum of the learner's gradients: 3 batches, or the run's 2 when it has only those
    fisher = deltas.read_index(plain.with_suffix(""))["fisher"]
    assert (fisher["batches"], fisher["steps"]) == ((3, [1, 2]) if updates == 2 else (2, [1, 2]))
    assert masks.find(plain.with_suffix(""), "fisher", 90.0, None)[1]["kept"] > 0


def test_a_sparse_grpo_run_trains_only_its_fisher_mask(toy, learned):
    """A dense run sums the learner's squared gradients (delta_log.fisher_batches), a fisher mask keeps the top
    10%, and a GRPO run with that mask changes only masked weights: every other one stays bit-identical."""
    import numpy as np

    from pcpc.runtime.rl import setup

    root, config = toy
    dense = config("fisher_dense", grpo_config={"num_iterations": 3}, delta_log={"steps": [3], "fisher_batches": 3})
    run(dense)
    found, record = masks.find(dense.with_suffix(""), "fisher", 90.0, None)
    assert record["target_step"] == 3 and record["fisher"]["batches"] == 3
    path = masks.save(root / "masks" / "fisher90", found, record)
    sparse = config("fisher_sparse", grpo_config={"num_iterations": 4}, mask=str(path))
    run(sparse)
    meta = _meta(root)
    initial = setup.read_weights(root / "models" / "toy_flat.bin", meta)
    changed = 0
    for spec, w0, w in zip(meta.parameters, initial, final_arrays(sparse)["params"]):
        m = found[spec.name].astype(bool)
        w, w0 = np.asarray(w, np.float32), np.asarray(w0, np.float32)
        assert np.array_equal(w[~m].view(np.uint32), w0[~m].view(np.uint32)), spec.name
        changed += int(np.count_nonzero(w[m] != w0[m]))
    assert 0 < changed <= record["kept"]


def _meta(root: Path):
    from pcpc.mlir.signature import load_meta

    return load_meta(root / "models" / "toy_train.meta.json")


def cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pcpc.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def final_arrays(cfg: Path) -> dict:
    return checkpoint.load(checkpoint.path_in(cfg.with_suffix("")), "grpo").state


def test_resume_after_sigkill_ends_bit_identical(toy, learned):
    """SIGKILL the whole run (launcher and workers) between checkpoints; --resume ends where an uninterrupted
    run ends: the same records and the same weights, bit for bit."""
    import numpy as np

    root, config = toy
    cfg = config("killed")
    run_dir = cfg.with_suffix("")
    proc = cli("run", cfg, "--out", run_dir, "--quiet", start_new_session=True)
    wait_for_lines(run_dir / "metrics.jsonl", 5, proc)  # checkpoints after 2 and 4 (checkpoint_interval 2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    status = read_status(run_dir)
    assert status["recorded_state"] == "running" and status["state"] == "failed" and status["error"]["kind"] == "died"
    killed_at = checkpoint.peek_step(run_dir, "grpo")
    assert killed_at % 2 == 0 and 2 <= killed_at < 30
    run(cfg, resume=True)
    got, want = records(cfg), records(learned[0])
    assert [(r["step"], r["reward_mean"], r["kl"], r["loss"]) for r in got] == \
        [(r["step"], r["reward_mean"], r["kl"], r["loss"]) for r in want]
    samples = [json.loads(x)["step"] for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples == list(range(1, 31))  # cut back to the checkpoint on resume, like the metrics
    a, b = final_arrays(cfg), final_arrays(learned[0])
    for key in ("params", "m", "v"):
        for x, y in zip(a[key], b[key]):
            np.testing.assert_array_equal(x, y)
    assert read_status(run_dir)["state"] == "completed"


def test_max_restarts_relaunches_after_a_dead_worker_and_finishes_exactly(toy, learned):
    root, config = toy
    cfg = config("restart", grpo_config={"num_iterations": 8})
    run_dir = cfg.with_suffix("")
    proc = cli("run", cfg, "--out", run_dir, "--max-restarts", 1)
    wait_for_lines(run_dir / "metrics.jsonl", 3, proc)
    os.kill(json.loads((run_dir / "workers.json").read_text())["rank 1"], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # The kill lands after 3 iterations; the learner may checkpoint iteration 4 before it sees the death.
    restarted = re.search(r"restarting \(1 of 1\) from the checkpoint after iteration (\d+)", out)
    assert restarted, out
    assert int(restarted[1]) in (2, 4, 6), out  # checkpoint_interval 2
    got, want = records(cfg), records(learned[0])[:8]
    assert [(r["reward_mean"], r["kl"], r["loss"]) for r in got] == [(r["reward_mean"], r["kl"], r["loss"]) for r in want]
    status = read_status(run_dir)
    assert status["state"] == "completed" and status["restarts"] == 1


def test_ctrl_c_stops_after_the_iteration_with_a_checkpoint(toy, learned):
    root, config = toy
    cfg = config("interrupted", grpo_config={"num_iterations": 100000}, checkpoint_interval=0)
    run_dir = cfg.with_suffix("")
    proc = cli("run", cfg, "--out", run_dir)
    wait_for_lines(run_dir / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    done = checkpoint.peek_step(run_dir, "grpo")
    assert f"stopped after iteration {done} (checkpoint saved)" in out and "--resume" in out
    status = read_status(run_dir)
    assert status["state"] == "stopped" and status["step"] == done >= 2
    assert json.loads((run_dir / "summary.json").read_text())["stopped"]


def test_a_failing_reward_function_names_the_worker_and_debug_shows_the_traceback(toy, learned):
    root, config = toy
    cfg = config("bad_reward", grpo_config={"reward_funcs": ["bad_reward.py:broken"]})
    run_dir = cfg.with_suffix("")
    proc = cli("run", cfg, "--out", run_dir, "--quiet")
    _, err = proc.communicate(timeout=300)
    # the user's code is at fault: a user error (exit 2, never relaunched), naming the worker and the cause
    assert proc.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "GRPO run failed" in err and "worker 0 (pid " in err
    assert "reward function 'bad_reward.py:broken' raised ZeroDivisionError: division by zero" in err
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["error"]["kind"] == "user_error"
    assert "ZeroDivisionError" in status["error"]["message"]
    proc = cli("--debug", "run", cfg, "--out", run_dir, "--quiet", "--overwrite", "--max-restarts", 2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "restarting" not in err
    assert "Traceback" in err and "bad_reward.py\", line 2, in broken" in err and "ZeroDivisionError" in err


def test_the_reference_configs_outer_rate_barely_moves_the_policy_and_the_run_says_so(tmp_path, monkeypatch):
    """experiments/qwen_rl_test.json as shipped (only the model shrunk to qwen2-tiny with random weights): its
    top-level learning_rate 1e-5 is the outer rate on the iteration's pseudo-gradient, so one iteration moves the
    policy by ~1.9e-5 of the AdamW step, which rounds away in fp32 for most weights. Plain GRPO (1.0 / 0.0)
    moves every weight by about the AdamW rate."""
    import numpy as np

    from pcpc.mlir.signature import load_meta
    from pcpc.runtime.rl import setup

    monkeypatch.chdir(tmp_path)
    shipped = json.loads((Path(__file__).resolve().parents[2] / "experiments" / "qwen_rl_test.json").read_text())
    shipped.update(model="qwen2-tiny", tokenizer="bytes", init_weights="random", wandb_project=None)
    moved, notes = {}, {}
    for name, lr, mu in (("shipped", shipped["learning_rate"], shipped["nesterov_momentum"]), ("plain", 1.0, 0.0)):
        said = []
        run_experiment(f"{name}.json", {**shipped, "learning_rate": lr, "nesterov_momentum": mu},
                       out_dir=f"runs/{name}", say=said.append)
        notes[name] = [m for m in said if "is the outer rate" in m]
        before = setup.read_weights(shipped["weights_path"], load_meta(Path("models/qwen_grpo_training.meta.json")))
        after = checkpoint.load(checkpoint.path_in(f"runs/{name}"), "grpo").state["params"]
        moved[name] = np.concatenate([(a - b).ravel() for a, b in zip(after, before)])
    assert len(notes["shipped"]) == 1 and not notes["plain"]
    assert "learning_rate 1e-05 is the outer rate" in notes["shipped"][0]
    assert "for plain GRPO set learning_rate 1.0 and nesterov_momentum 0.0" in notes["shipped"][0]
    shipped_d, plain_d = moved["shipped"], moved["plain"]
    assert np.mean(plain_d != 0) > 0.99 and 0.5e-6 < np.abs(plain_d).max() < 2e-6  # ~ the AdamW rate, 1e-6
    assert np.mean(shipped_d != 0) < 0.1 and np.abs(shipped_d).max() < 1e-9
