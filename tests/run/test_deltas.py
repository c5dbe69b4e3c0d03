"""Delta logs (runtime/run/deltas.py) and `pcpc deltas`: exact encoding, a real run's log, reconstruction bit
for bit, resume, and the errors a user meets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corpus import write_play
from pcpc.runtime.run import checkpoint, deltas

PCPC = str(Path(sys.executable).parent / "pcpc")
BASE = {"model_path": "models/tiny.mlir", "data_path": "data/tiny_shakespeare.txt", "tau": 5,
        "outer_loop_steps": 6, "batch_size": 8, "eval_batch_size": 16, "eval_batches": 2, "sample_tokens": 0,
        "wandb_project": None, "checkpoint_interval": 2,
        "model": {"preset": "nanogpt-small", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16}}


def pcpc(ws: Path, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([PCPC, *map(str, args)], cwd=ws, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"pcpc {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_config(ws: Path, name: str, **fields) -> str:
    (ws / name).write_text(json.dumps({**BASE, **fields}))
    return name


def params_of(run_dir: Path) -> list[np.ndarray]:
    return checkpoint.load(checkpoint.path_in(run_dir), "diloco").state["params"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("deltas")
    write_play(ws / "data" / "tiny_shakespeare.txt", 200_000, seed=2)
    return ws


def test_the_encoding_is_exact_where_subtraction_is_not():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(1000).astype(np.float32)
    now = base.copy()
    changed = rng.choice(1000, 37, replace=False)
    now[changed] += rng.standard_normal(37).astype(np.float32) * 1e-3
    base[changed[0]], now[changed[0]] = np.float32(3.0), np.float32(1e-8)  # a weight that moved to near zero
    assert base[changed[0]] + (now[changed[0]] - base[changed[0]]) != now[changed[0]]  # θ_0 + fl(Δ) is not θ_t
    stored, n = deltas.encode(base, now, "w")
    assert n == 37 and set(stored) == {"w:indices", "w:values"} and stored["w:indices"].dtype == np.int32
    assert np.array_equal(deltas.decode(base, stored, "w").view(np.uint32), now.view(np.uint32))
    dense_now = base + np.float32(1.0)  # everything changed: stored dense, still exact
    stored, n = deltas.encode(base, dense_now, "w")
    assert n == 1000 and set(stored) == {"w"}
    assert np.array_equal(deltas.decode(base, stored, "w"), dense_now)


def test_a_schedule_is_steps_or_an_interval():
    assert deltas.DeltaLogConfig().due(10) and not deltas.DeltaLogConfig().due(11)  # the reference's schedule
    assert deltas.DeltaLogConfig(interval=3).due(6) and not deltas.DeltaLogConfig(interval=3).due(7)
    assert deltas.DeltaLogConfig(steps=(5, 2, 5)).steps == (2, 5)
    with pytest.raises(ValueError, match="not both"):
        deltas.DeltaLogConfig(steps=(1,), interval=2)


def test_a_run_logs_its_weights_and_reconstruct_gives_them_back_bit_for_bit(ws):
    pcpc(ws, "run", write_config(ws, "six.json", delta_log={"steps": [2, 6]}), "--out", "runs/six", "--quiet")
    pcpc(ws, "run", write_config(ws, "two.json", outer_loop_steps=2), "--out", "runs/two", "--quiet")
    listing = pcpc(ws, "deltas", "list", "runs/six").stdout
    assert "       2 " in listing and "       6 " in listing
    for step, reference in ((6, "runs/six"), (2, "runs/two")):
        pcpc(ws, "deltas", "reconstruct", "runs/six", "--step", step, "--out", f"rec{step}", "--flat", f"rec{step}.bin")
        from safetensors.numpy import load_file

        got = load_file(str(ws / f"rec{step}" / "model.safetensors"))
        index = deltas.read_index(ws / "runs/six")
        want = params_of(ws / reference)
        for name, w in zip(index["names"], want):
            assert np.array_equal(got[name].view(np.uint32), np.asarray(w, np.float32).view(np.uint32)), name
        flat = np.fromfile(ws / f"rec{step}.bin", np.float32)
        assert np.array_equal(flat, np.concatenate([np.asarray(w, np.float32).reshape(-1) for w in want]))
    stats = json.loads(pcpc(ws, "deltas", "stats", "runs/six", "--json").stdout)
    assert stats["step"] == 6 and 0.0 <= stats["unchanged_fraction"] < 0.1  # pretraining moves nearly everything
    assert set(stats["layers"]) >= {"transformer.h.0", "transformer.wte.weight"}


def test_a_resumed_run_appends_to_its_delta_log(ws):
    pcpc(ws, "run", write_config(ws, "half.json", delta_log={"steps": [2, 6]}, outer_loop_steps=2),
         "--out", "runs/half", "--quiet")
    assert deltas.logged_steps(deltas.read_index(ws / "runs/half")) == [2]
    pcpc(ws, "run", write_config(ws, "half.json", delta_log={"steps": [2, 6]}), "--out", "runs/half", "--resume",
         "--quiet")
    assert deltas.logged_steps(deltas.read_index(ws / "runs/half")) == [2, 6]
    a = deltas.weights_at(ws / "runs/half", 6)
    b = deltas.weights_at(ws / "runs/six", 6) if (ws / "runs/six").is_dir() else params_of(ws / "runs/half")
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_the_errors_name_what_is_wrong(ws):
    if not (ws / "runs/two").is_dir():
        pcpc(ws, "run", write_config(ws, "two.json", outer_loop_steps=2), "--out", "runs/two", "--quiet")
    if not (ws / "runs/half").is_dir():
        pcpc(ws, "run", write_config(ws, "half.json", delta_log={"steps": [2]}, outer_loop_steps=2),
             "--out", "runs/half", "--quiet")
    cases = [
        (("deltas", "list", "runs/two"), "no delta log"),
        (("deltas", "reconstruct", "runs/half", "--step", "3", "--out", "x"), "--step 3: not logged"),
        (("deltas", "list", "runs/none"), "RUN runs/none: no such run directory"),
        (("run", write_config(ws, "bad.json", delta_log={"steps": [2], "interval": 2}), "--out", "runs/bad"),
         "delta_log: give steps or interval, not both"),
        (("run", write_config(ws, "fish.json", delta_log={"fisher_batches": 4}), "--out", "runs/fish"),
         "delta_log.fisher_batches: DiLoCo runs do not compute separate gradients"),
        (("run", write_config(ws, "fish0.json", delta_log={"fisher_batches": 0}), "--out", "runs/fish0"),
         "delta_log.fisher_batches must be an integer >= 1"),
        (("masks", "find", "--deltas", "runs/half", "--method", "fisher", "--sparsity-percent", "90"),
         "no Fisher sum (give the run's delta_log a \"fisher_batches\""),
    ]
    (ws / "full").mkdir(exist_ok=True)
    (ws / "full" / "keep.txt").write_text("mine")
    cases.append((("deltas", "reconstruct", "runs/half", "--step", "2", "--out", "full"), "--out full exists"))
    for args, message in cases:
        proc = pcpc(ws, *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert (ws / "full" / "keep.txt").read_text() == "mine"
