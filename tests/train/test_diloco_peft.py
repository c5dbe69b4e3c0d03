"""Adapters in DiLoCo runs: a LoRA / PiSSA adapter trained on the frozen weights of an earlier run.

Every run is a real `pcpc run` (2 gloo workers) on a small nanoGPT (2 layers, 64 wide). The base run is
trained once for the module; the adapter runs start from its checkpoint (`init_from`). Checked: only the
adapter's pseudo-gradient is all-reduced (its bytes against full DiLoCo's), the base is never changed, the
adapter lowers the validation loss, resumes exactly, and is saved in HF peft's format: `peft` loads it onto
the nanoGPT module tree and gives the logits of pcpc's compiled `logits` function.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus import write_play
from pcpc.exporters import nanogpt
from pcpc.exporters import peft as pcpc_peft
from pcpc.runtime.module import CompiledModule, to_host
from pcpc.runtime.run import checkpoint

PCPC = str(Path(sys.executable).parent / "pcpc")
MODEL = {"preset": "nanogpt-small", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32}
BASE = {"model_path": "models/tiny.mlir", "data_path": "data/tiny_shakespeare.txt", "tau": 10,
        "outer_loop_steps": 6, "batch_size": 8, "eval_batch_size": 16, "eval_batches": 4, "sample_tokens": 0,
        "wandb_project": None, "model": MODEL}
LORA = {"init_from": "runs/base", "learning_rate": 3e-3, "outer_loop_steps": 4,
        "peft": {"type": "lora", "r": 4, "lora_alpha": 8}}


def write_config(ws: Path, name: str, **fields) -> str:
    (ws / name).write_text(json.dumps({**BASE, **fields}))
    return name


def run(ws: Path, config: str, out: str, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([PCPC, "run", config, "--out", out, *args], cwd=ws, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"pcpc run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def summary(ws: Path, out: str) -> dict:
    return json.loads((ws / out / "summary.json").read_text())


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A scratch directory with a corpus and a trained base run (runs/base)."""
    ws = tmp_path_factory.mktemp("diloco_peft")
    write_play(ws / "data" / "tiny_shakespeare.txt", 300_000, seed=1)
    run(ws, write_config(ws, "base.json"), "runs/base")
    return ws


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class NanoGPTModules(torch.nn.Module):
    """nanoGPT as a module tree with exporters/nanogpt.py's names: its block Linears are torch Linears (what peft
    wraps), the rest of its weights plain tensors, and the forward is the exporter's own."""

    def __init__(self, cfg, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg, self.weights = cfg, weights
        for name, _, o, i in nanogpt.linear_layers(cfg):
            lin = torch.nn.Linear(i, o, bias=f"{name}.bias" in weights)
            with torch.no_grad():
                lin.weight.copy_(weights[f"{name}.weight"])
                if lin.bias is not None:
                    lin.bias.copy_(weights[f"{name}.bias"])
            parent = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, lin)

    def forward(self, idx):
        return nanogpt.forward(self.weights, idx, self.cfg,
                               linear=lambda p, name, x, bias=True: self.get_submodule(name)(x))


def base_weights(ws: Path, mod: CompiledModule) -> dict[str, torch.Tensor]:
    from pcpc.runtime.module import base_specs

    params = checkpoint.load(checkpoint.path_in(ws / "runs/base"), "diloco").state["params"]
    return {s.name: torch.from_numpy(np.array(p)) for s, p in zip(base_specs(mod.meta), params)}


def compiled(ws: Path, out: str) -> CompiledModule:
    """The run's training module (config.json names it, relative to the run's working directory)."""
    return CompiledModule(ws / json.loads((ws / out / "config.json").read_text())["vmfb"])


def model_config(mod: CompiledModule):
    cfg = mod.meta.provenance.config
    return nanogpt.make_config(cfg["model"], **cfg["model_overrides"])


def test_lora_trains_only_the_adapter_and_all_reduces_only_it(ws):
    before = digest(checkpoint.path_in(ws / "runs/base"))
    proc = run(ws, write_config(ws, "lora.json", **LORA), "runs/lora")
    assert "full DiLoCo of this model would all-reduce" in proc.stdout
    s, base = summary(ws, "runs/lora"), summary(ws, "runs/base")
    mod = compiled(ws, "runs/lora")
    n_adapter = mod.meta.parameter_bytes // 4
    n_base = sum(int(np.prod(p.shape)) for p in base_weights(ws, mod).values())
    # 2 layers x (c_attn 64->192, attn c_proj 64->64, c_fc 64->256, mlp c_proj 256->64), r 4: A (4, in), B (out, 4)
    assert n_adapter == 4 * 2 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert s["allreduce_bytes_per_worker_per_round"] == 4 * (n_adapter + 2)
    assert s["full_diloco_bytes_per_worker_per_round"] == 4 * (n_base + 2)
    assert s["full_diloco_bytes_per_worker_per_round"] / s["allreduce_bytes_per_worker_per_round"] > 10
    rows = [json.loads(line) for line in (ws / "runs/lora/metrics.jsonl").read_text().splitlines()]
    assert all(r["allreduce_bytes_per_worker"] == 4 * (n_adapter + 2) for r in rows)
    assert s["final_val_loss"] < base["final_val_loss"] - 0.01  # it learns on top of the base
    assert digest(checkpoint.path_in(ws / "runs/base")) == before  # the base is read, never written
    state = checkpoint.load(checkpoint.path_in(ws / "runs/lora"), "diloco").state
    assert [tuple(p.shape) for p in state["params"]] == [tuple(p.shape) for p in mod.meta.parameters]


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_the_saved_adapter_loads_in_peft_with_pcpcs_logits(ws, method):
    peft = pytest.importorskip("peft")
    out = "runs/lora" if method == "lora" else "runs/pissa"
    if method == "pissa":
        run(ws, write_config(ws, "pissa.json", **{**LORA, "peft": {"type": "pissa", "r": 4, "lora_alpha": 8}}), out)
    elif not (ws / out / "adapter").is_dir():
        run(ws, write_config(ws, "lora.json", **LORA), out)
    mod = compiled(ws, out)
    cfg, weights = model_config(mod), base_weights(ws, mod)
    adapter_dir = ws / out / "adapter"
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert saved["r"] == (4 if method == "lora" else 8)  # PiSSA: the LoRA of rank 2r on the untouched base
    model = peft.PeftModel.from_pretrained(NanoGPTModules(cfg, dict(weights)), str(adapter_dir)).eval()
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, cfg.block_size)).astype(np.int64)
    with torch.no_grad():
        theirs = model(torch.from_numpy(idx)).numpy()
        plain = NanoGPTModules(cfg, dict(weights))(torch.from_numpy(idx)).numpy()
    # pcpc's compiled logits with the trained adapter on the frozen inputs the run used
    state = checkpoint.load(checkpoint.path_in(ws / out), "diloco").state
    tensors = {s.name: torch.from_numpy(np.array(p)) for s, p in zip(mod.meta.parameters, state["params"])}
    initial = {s.name: torch.from_numpy(np.array(p)) for s, p in zip(mod.meta.parameters, state["initial"])}
    pcfg = pcpc_peft.from_config(json.loads((ws / out / "config.json").read_text())["experiment"]["peft"])
    residual = pcpc_peft.residual_weights(weights, initial, cfg, pcfg)
    frozen = [residual.get(k, w).numpy() for k, w in weights.items()]
    ours = to_host(mod("logits", *[t.numpy() for t in tensors.values()], *frozen, idx)[0])
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4
    assert np.abs(plain - theirs).max() > 1e-3  # the adapter changes the model


def test_an_adapter_run_resumes_exactly(ws):
    run(ws, write_config(ws, "full4.json", **LORA), "runs/full4")
    run(ws, write_config(ws, "half.json", **{**LORA, "outer_loop_steps": 2}), "runs/half")
    run(ws, write_config(ws, "half.json", **LORA), "runs/half", "--resume")
    a = checkpoint.load(checkpoint.path_in(ws / "runs/full4"), "diloco").state
    b = checkpoint.load(checkpoint.path_in(ws / "runs/half"), "diloco").state
    for x, y in zip(a["params"] + a["momentum"], b["params"] + b["momentum"]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("fields, message", [
    ({"peft": {"type": "lora"}}, "peft needs init_from"),
    ({**LORA, "peft": {"type": "adalora"}}, "adalora is for GRPO / DPO runs"),
    ({**LORA, "peft": {"type": "lora", "target_modules": ["q_proj"]}}, "peft.target_modules: ['q_proj'] are not"),
    ({**LORA, "init_from": "runs/nothing"}, "init_from: no checkpoint at runs/nothing"),
    ({**LORA, "model": {**MODEL, "n_embd": 32}}, "init_from: runs/base/checkpoints/latest.pt holds another architecture"),
])
def test_bad_adapter_configs_are_named(ws, fields, message):
    proc = run(ws, write_config(ws, "bad.json", **fields), "runs/bad", check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
