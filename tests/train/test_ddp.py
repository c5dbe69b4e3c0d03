"""Data-parallel pretraining (`"sync": "ddp"`): real `pcpc run`s (gloo workers) of a tiny nanoGPT on shards the
test prepares. Checked: 2 workers equal 1 worker on the concatenated batch and 1 worker accumulating 2
micro-batches (fp32 tolerance, several steps); a resumed run ends bit-identical; the traffic columns; text
samples from a prompt; config errors; and the shipped CPU-sized GPT-2/MoE recipe trains on test-made shards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corpus import write_bpe, write_documents
from pcpc.errors import UserError
from pcpc.kinds import load_config
from pcpc.runtime.run import checkpoint
from pcpc.runtime.train import shards as shard_io
from pcpc.runtime.train.tokenizer import named_tokenizer

REPO = Path(__file__).resolve().parents[2]
PCPC = str(Path(sys.executable).parent / "pcpc")
MODEL = {"preset": "nanogpt-small", "n_layer": 1, "n_head": 2, "n_embd": 32}
BASE = {"model_path": "models/tiny.mlir", "sync": "ddp", "data": {"path": "shards", "block_size": 32},
        "model": MODEL, "max_steps": 4, "batch_size": 4, "eval_batch_size": 8, "eval_batches": 2,
        "eval_interval": 2, "sample_tokens": 0, "learning_rate": 3e-3, "wandb_project": None}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """shards/ (a BPE's tokens of 400 speeches, prepared) in a scratch directory."""
    ws = tmp_path_factory.mktemp("ddp")
    docs = write_documents(ws / "docs.jsonl", 400, seed=4)
    write_bpe(ws / "tok", [json.loads(x)["text"] for x in docs.read_text().splitlines()])
    shard_io.prepare(docs, ws / "shards", named_tokenizer(str(ws / "tok")), shard_size=8000, val_tokens=3000,
                     progress=False)
    return ws


def run(ws: Path, name: str, out: str, *args, check: bool = True, **fields) -> subprocess.CompletedProcess:
    (ws / name).write_text(json.dumps({**BASE, **fields}))
    proc = subprocess.run([PCPC, "run", name, "--out", out, *args], cwd=ws, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc


def params(ws: Path, out: str) -> list[np.ndarray]:
    return checkpoint.load(checkpoint.path_in(ws / out), "ddp").state["params"]


def rows(ws: Path, out: str) -> list[dict]:
    return [json.loads(x) for x in (ws / out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two(ws):
    """runs/two: the 2-worker run the others are compared with."""
    run(ws, "two.json", "runs/two", num_workers=2)
    return ws / "runs/two"


def test_two_workers_equal_one_on_the_concatenated_batch_and_one_accumulating(ws, two):
    run(ws, "one.json", "runs/one", num_workers=1, batch_size=8)  # its own build: batch 8
    run(ws, "acc.json", "runs/acc", num_workers=1, tokens_per_step=2 * 4 * 32)  # 2 micro-batches of 4
    two, one, acc = params(ws, "runs/two"), params(ws, "runs/one"), params(ws, "runs/acc")
    first = checkpoint.load(checkpoint.path_in(ws / "runs/two"), "ddp")
    assert first.step == 4
    for a, b, c in zip(two, one, acc):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(a, c, rtol=2e-5, atol=2e-6)
    r2, r1 = rows(ws, "runs/two"), rows(ws, "runs/one")
    np.testing.assert_allclose([r["train_loss"] for r in r2], [r["train_loss"] for r in r1], rtol=1e-5)
    assert r2[-1]["train_loss"] < r2[0]["train_loss"]
    n = sum(p.size for p in two)
    assert r2[0]["allreduce_bytes_per_worker"] == 4 * (n + 2)  # the gradient, the loss and the stop flag
    assert r2[0]["diloco_bytes_per_worker"] == pytest.approx(4 * (n + 2) / 50, abs=0.1)
    assert [r["val_loss"] is not None for r in r2] == [False, True, False, True]  # eval_interval 2
    assert r2[-1]["tokens"] == 4 * 2 * 4 * 32
    summary = json.loads((ws / "runs/acc/summary.json").read_text())
    assert summary["accumulation"] == 2 and summary["tokens_per_step"] == 256


def test_under_torchrun_it_is_the_same_run(ws, two):
    """torchrun starts the processes (its env: RANK, WORLD_SIZE, MASTER_ADDR, ...): the same weights, bit for
    bit, as the workers `pcpc run` launches itself."""
    (ws / "tr.json").write_text(json.dumps({**BASE, "num_workers": 2}))
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                           "--no-python", PCPC, "run", "tr.json", "--out", "runs/tr"], cwd=ws, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    for a, b in zip(params(ws, "runs/tr"), params(ws, "runs/two")):
        np.testing.assert_array_equal(a, b)
    assert json.loads((ws / "runs/tr/summary.json").read_text())["workers"] == 2


def test_bf16_compute_trains_close_to_fp32(ws, two):
    run(ws, "bf16.json", "runs/bf16", num_workers=2, model={**MODEL, "compute_dtype": "bfloat16"})
    got, want = rows(ws, "runs/bf16"), rows(ws, "runs/two")
    np.testing.assert_allclose([r["train_loss"] for r in got], [r["train_loss"] for r in want], rtol=2e-2)
    assert got[0]["train_loss"] != want[0]["train_loss"]  # the matmuls did run in bf16


def test_a_resumed_run_ends_bit_identical_and_samples_from_its_prompt(ws):
    fields = dict(num_workers=2, sample_interval=2, sample_tokens=8, sample_prompt="THE PLAY")
    run(ws, "full.json", "runs/full", **fields)
    run(ws, "half.json", "runs/half", **{**fields, "max_steps": 2})
    run(ws, "half.json", "runs/half", "--resume", "--set", "max_steps=4", **{**fields, "max_steps": 2})
    for a, b in zip(params(ws, "runs/full"), params(ws, "runs/half")):
        np.testing.assert_array_equal(a, b)
    samples = [json.loads(x) for x in (ws / "runs/full/samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 4] and all(s["text"].startswith("THE PLAY") for s in samples)
    resumed = [json.loads(x) for x in (ws / "runs/half/samples.jsonl").read_text().splitlines()]
    assert resumed == samples  # the sampling rng is checkpointed too


def test_ddp_config_errors_name_the_field(ws):
    proc = run(ws, "bad.json", "runs/bad", check=False, num_workers=2, tokens_per_step=1000)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "tokens_per_step: 1,000 is not a multiple of 2 workers x batch_size 4 x block_size 32" in proc.stderr
    with pytest.raises(UserError, match="unknown key 'tau'"):  # DiLoCo's fields are not DDP's
        load_config({**BASE, "tau": 5})
    with pytest.raises(UserError, match="config: sync must be one of diloco, ddp; got .fsdp."):
        load_config({**BASE, "sync": "fsdp"})
    loop, cfg = load_config(BASE)
    assert loop.kind == "ddp" and cfg.max_steps == 4
    loop, _ = load_config({k: v for k, v in BASE.items() if k not in ("sync", "max_steps")})
    assert loop.kind == "diloco"


def test_the_cpu_sized_gpt2_moe_recipe_trains_on_test_made_shards(ws):
    recipe = json.loads((REPO / "experiments" / "gpt2_moe_cpu.json").read_text())
    assert recipe["sync"] == "ddp" and recipe["model"]["preset"] == "gpt2-124m-moe"
    (ws / "data").mkdir(exist_ok=True)
    shard_io.prepare(ws / "docs.jsonl", ws / "data" / "shards_cpu", named_tokenizer(str(ws / "tok")),
                     shard_size=20_000, val_tokens=4000, progress=False)
    (ws / "moe.json").write_text(json.dumps({**recipe, "data": {**recipe["data"], "path": "data/shards_cpu"}}))
    proc = subprocess.run([PCPC, "run", "moe.json", "--out", "runs/moe", "--set", "max_steps=3", "--set",
                           "tokens_per_step=" + str(2 * recipe["batch_size"] * recipe["data"]["block_size"])],
                          cwd=ws, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    r = rows(ws, "runs/moe")
    assert len(r) == 3 and "aux_loss" in r[0] and "expert_load/0" in r[0] and r[-1]["val_loss"] is not None
