"""runtime/masks.py and `pcpc masks`: scores, global top-k with floors, files, comparison, on delta logs whose
deltas the test chose."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pcpc.errors import UserError
from pcpc.runtime import masks
from pcpc.runtime.run.deltas import DeltaLog

PCPC = str(Path(sys.executable).parent / "pcpc")
NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
SHAPES = [(8, 16), (32, 16), (16,)]


def write_log(run: Path, steps: dict[int, list[np.ndarray]], base: list[np.ndarray]) -> None:
    log = DeltaLog(run, NAMES, base, start=0)
    for step, weights in sorted(steps.items()):
        log.log(step, weights)


@pytest.fixture()
def run(tmp_path):
    """Deltas Δ_t = t · D (steady drift) plus noise that grows with t on the q_proj tensor."""
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    drift = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    steps = {t: [b + np.float32(t * 1e-2) * d for b, d in zip(base, drift)] for t in (10, 20, 30, 40)}
    write_log(tmp_path / "run", steps, base)
    return tmp_path / "run", base, steps


def test_magnitude_keeps_the_global_top_k_of_the_delta(run):
    run_dir, base, steps = run
    found, record = masks.find(run_dir, "magnitude", 90.0, 40, min_keep_percent=0.0)
    total = sum(math.prod(s) for s in SHAPES)
    k = math.ceil(total * 0.10)
    delta = np.concatenate([np.abs(w.astype(np.float64) - b).ravel() for w, b in zip(steps[40], base)])
    want = np.zeros(total, bool)
    want[np.argsort(-delta, kind="stable")[:k]] = True
    got = np.concatenate([found[n].ravel() for n in NAMES]).astype(bool)
    assert got.sum() == k == record["kept"] and np.array_equal(got, want)
    assert record["method"] == "magnitude" and record["tensors"][NAMES[2]]["shape"] == [16]


def test_every_tensor_keeps_its_floor_and_mlp_only_freezes_the_rest(run):
    run_dir, _, _ = run
    found, _ = masks.find(run_dir, "magnitude", 99.0, 40, min_keep_percent=25.0)
    for n, s in zip(NAMES, SHAPES):
        assert found[n].sum() >= math.ceil(math.prod(s) * 0.25), n
    mlp, _ = masks.find(run_dir, "magnitude", 90.0, 40, mlp_only=True)
    assert mlp[NAMES[0]].sum() == 0 and mlp[NAMES[2]].sum() == 0
    assert mlp[NAMES[1]].sum() == math.ceil(32 * 16 * 0.10)


def test_momentum_and_delta_variance_follow_their_formulas(run):
    run_dir, base, steps = run
    got = dict(masks.scores(run_dir, "momentum", 40, window=2))
    d = np.stack([steps[t][0].astype(np.float64) - base[0] for t in (20, 30, 40)])  # the last 2 velocities
    v = np.diff(d, axis=0)
    mean, std = np.abs(v.mean(0)), v.std(0)
    np.testing.assert_allclose(got[NAMES[0]], mean * (1 + mean / (std + 1e-12)), rtol=1e-12)
    got = dict(masks.scores(run_dir, "delta-variance", 30))
    d = np.stack([steps[t][1].astype(np.float64) - base[1] for t in (10, 20, 30)])
    np.testing.assert_allclose(got[NAMES[1]], d.var(0) + np.abs(d.mean(0)), rtol=1e-12)


def test_inverted_and_random_baselines_and_compare(run, tmp_path):
    run_dir, _, _ = run
    top, _ = masks.find(run_dir, "magnitude", 50.0, 40, min_keep_percent=0.0)
    bottom, _ = masks.find(run_dir, "magnitude", 50.0, 40, min_keep_percent=0.0, invert=True)
    report = masks.compare({k: v.astype(bool) for k, v in top.items()},
                           {k: v.astype(bool) for k, v in bottom.items()}, ("a", "b"))
    assert report["jaccard"] == 0.0  # complements
    same = masks.compare({k: v.astype(bool) for k, v in top.items()}, {k: v.astype(bool) for k, v in top.items()},
                         ("a", "a"))
    assert same["jaccard"] == 1.0 and same["a_in_b"] == 1.0
    assert same["chance_jaccard"] == pytest.approx(0.25 / 0.75)  # pA pB / (pA + pB - pA pB) at 1/2 and 1/2
    r1, _ = masks.find(run_dir, "random", 90.0, 40, seed=1)
    r2, _ = masks.find(run_dir, "random", 90.0, 40, seed=1)
    assert all(np.array_equal(r1[n], r2[n]) for n in NAMES)
    path = masks.save(tmp_path / "m", top, {"method": "magnitude"})
    assert path.name == "m.safetensors" and masks.record_path(path).is_file()
    loaded = masks.load(path)
    assert all(np.array_equal(loaded[n], top[n].astype(bool)) for n in NAMES)


def test_the_cli_finds_names_and_compares(run, tmp_path):
    run_dir, _, _ = run
    out = subprocess.run([PCPC, "masks", "find", "--deltas", str(run_dir), "--method", "momentum",
                          "--sparsity-percent", "97.5", "--target-step", "40", "--momentum-window", "3"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    made = tmp_path / "masks" / "sparsity_97.5pct_momentum_w3_step40.safetensors"
    assert made.is_file() and json.loads(masks.record_path(made).read_text())["momentum_window"] == 3
    cmp = subprocess.run([PCPC, "masks", "compare", str(made), str(made), "--json"], capture_output=True, text=True)
    assert json.loads(cmp.stdout)["jaccard"] == 1.0
    stats = subprocess.run([PCPC, "masks", "stats", str(made)], capture_output=True, text=True)
    assert "model.layers.0" in stats.stdout and "model.norm.weight" in stats.stdout
    bad = subprocess.run([PCPC, "masks", "find", "--deltas", str(run_dir), "--method", "magnitude",
                          "--sparsity-percent", "90", "--target-step", "15"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--target-step 15: not logged" in bad.stderr and "10, 20, 30, 40" in bad.stderr


def test_bad_requests_are_named(run):
    run_dir, _, _ = run
    with pytest.raises(UserError, match="--sparsity-percent must be in"):
        masks.find(run_dir, "magnitude", 100.0, 40)
    with pytest.raises(UserError, match="needs at least 2 logged steps"):
        masks.find(run_dir, "momentum", 90.0, 10, window=1)
    with pytest.raises(UserError, match="masks of different models"):
        masks.compare({"a": np.zeros(3, bool)}, {"b": np.zeros(3, bool)}, ("x", "y"))


def fisher_log(run: Path, base: list[np.ndarray], grads: list[list[np.ndarray]], batches: int) -> DeltaLog:
    log = DeltaLog(run, NAMES, base, start=0, fisher_batches=batches)
    for step, g in enumerate(grads, 1):
        log.add_gradients(step, g)
        log.log(step, [b + np.float32(step) for b in base])
    return log


def test_fisher_ranks_by_the_squared_gradients_the_run_summed(tmp_path):
    rng = np.random.default_rng(1)
    base = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(3)]
    log = fisher_log(tmp_path / "run", base, grads, batches=2)
    assert not log.wants_gradients  # two batches summed; the third was not added
    from safetensors.numpy import load_file

    summed = load_file(str(tmp_path / "run" / "deltas" / "fisher.safetensors"))
    want = [g1 * g1 + g2 * g2 for g1, g2 in zip(*grads[:2])]
    for name, w in zip(NAMES, want):
        np.testing.assert_allclose(summed[name], w, rtol=1e-6)
    found, record = masks.find(tmp_path / "run", "fisher", 90.0, None, min_keep_percent=0.0)
    assert record["target_step"] == 2 and record["fisher"]["batches"] == 2 and record["fisher"]["steps"] == [1, 2]
    k = math.ceil(sum(math.prod(s) for s in SHAPES) * 0.1)
    kept = np.concatenate([w.reshape(-1)[found[n].reshape(-1).astype(bool)] for n, w in zip(NAMES, want)])
    dropped = np.concatenate([w.reshape(-1)[~found[n].reshape(-1).astype(bool)] for n, w in zip(NAMES, want)])
    assert kept.size == k and kept.min() >= dropped.max()
    with pytest.raises(UserError, match="Fisher sum covers steps 1..2"):
        masks.find(tmp_path / "run", "fisher", 90.0, 3)
    out = subprocess.run([PCPC, "masks", "find", "--deltas", str(tmp_path / "run"), "--method", "fisher",
                          "--sparsity-percent", "90"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "masks" / "sparsity_90pct_fisher_step2.safetensors").is_file()
    listing = subprocess.run([PCPC, "deltas", "list", str(tmp_path / "run")], capture_output=True, text=True)
    assert "Fisher: squared gradients of 2 batches (steps 1..2)" in listing.stdout
    # a resume from before the sum's end drops it and sums afresh from the resume point
    said = []
    log = DeltaLog(tmp_path / "run", NAMES, base, start=1, fisher_batches=2, say=said.append)
    assert log.wants_gradients and "summed afresh from step 2" in said[0]
    assert not (tmp_path / "run" / "deltas" / "fisher.safetensors").exists()


def test_fisher_without_a_sum_and_target_steps_are_named(run):
    run_dir, _, _ = run
    with pytest.raises(UserError, match="no Fisher sum .*fisher_batches"):
        masks.find(run_dir, "fisher", 90.0, None)
    with pytest.raises(UserError, match="--target-step: required for --method magnitude"):
        masks.find(run_dir, "magnitude", 90.0, None)


def test_model_names_are_sanitised_as_the_reference_does():
    assert masks.sanitize("google/gemma-3-270m-it") == "google_gemma_3_270m_it"
    assert masks.sanitize("meta-llama/Llama-3.1-8B") == "meta_llama_llama_3_1_8b"
    assert masks.sanitize("qwen2.5-0.5b") == "qwen2_5_0_5b"
