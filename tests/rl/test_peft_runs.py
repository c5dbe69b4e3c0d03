"""GRPO and DPO runs that train an adapter (`peft` section) on the toy tasks: LoRA and another method learn,
the base weights are untouched, the run's adapter files load in HF peft with the compiled policy's log-probs,
and a resumed adapter run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pcpc.kinds import run_experiment
from pcpc.runtime.prompts import write_prompts
from pcpc.runtime.run import checkpoint
from runs import run_config_file

peft = pytest.importorskip("peft")

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
REWARD = "def target_token(completion_ids, **_):\n    return [sum(t == 7 for t in c) / max(len(c), 1) for c in completion_ids]\n"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_base(path: Path, model: str, overrides: dict, seed: int = 0) -> None:
    """A toy base whose frozen (tied) embeddings are large enough for its logits to express the task: at HF's
    init (std 0.02) the final norm caps any token's probability near 0.22, whatever an adapter does, while full
    fine-tuning simply grows the embedding."""
    from pcpc.exporters import hf_weights, qwen2

    cfg = qwen2.make_config(model, **overrides)
    params = qwen2.init_params(cfg, seed)
    params["model.embed_tokens.weight"] = params["model.embed_tokens.weight"] * 4
    path.parent.mkdir(parents=True, exist_ok=True)
    hf_weights.write_flat(path, [(k, v.numpy()) for k, v in params.items()], "float32",
                          4 * qwen2.num_params(cfg))


@pytest.fixture(scope="module")
def grpo(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_grpo")
    (root / "toy_reward.py").write_text(REWARD)
    write_prompts(root / "prompts.bin", [[1, 2, 3], [4, 5], [6, 8, 9, 10], [11, 12]])
    write_base(root / "models" / "toy_flat.bin", "qwen2-tiny", {"vocab_size": 16, "num_hidden_layers": 1})

    def config(name: str, peft_cfg: dict, lr: float, iterations: int = 30) -> Path:
        raw = {
            "model_path": str(root / "models" / "toy_gen.mlir"),
            "training_model_path": str(root / "models" / f"toy_train_{peft_cfg['type']}.vmfb"),
            "weights_path": str(root / "models" / "toy_flat.bin"),
            "tokenizer": "bytes",
            "grpo_config": {"num_iterations": iterations, "group_size": 8, "learning_rate": lr, "beta": 0.04,
                            "prompt_file": str(root / "prompts.bin"), "num_prompts": 2,
                            "reward_funcs": ["toy_reward.py:target_token"]},
            "rollout_config": {"max_tokens": 8, "temperature": 1.0, "top_p": 1.0, "batch_size": 8},
            "model": "qwen2-tiny", "model_overrides": {"vocab_size": 16, "num_hidden_layers": 1},
            "init_weights": "random", "checkpoint_interval": 5, "peft": peft_cfg,
        }
        path = root / f"{name}.json"
        path.write_text(json.dumps(raw))
        return path

    return root, config


run = run_config_file


def rewards(cfg: Path) -> list[float]:
    return [json.loads(x)["reward_mean"] for x in (cfg.with_suffix("") / "metrics.jsonl").read_text().splitlines()]


def compiled_policy_logps(cfg: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """token_logprobs of the run's final adapter through its own compiled module (on the completion window
    that starts at mask's first 1)."""
    from pcpc.runtime.module import CompiledModule
    from pcpc.runtime.rl.policy import make_policy
    from pcpc.kinds import load_config

    raw = json.loads(cfg.read_text())
    _, rc = load_config(raw, where=str(cfg))
    run_dir = cfg.with_suffix("")
    state = checkpoint.load(checkpoint.path_in(run_dir), "grpo").state
    mod = CompiledModule(raw["training_model_path"])
    pol = make_policy(mod, raw["weights_path"], rc, state, keep_reference=False)
    out = mod("token_logprobs", *pol.args(), mod.upload(ids), mod.upload(mask), np.float32(1.0))[0]
    return np.asarray(out.to_host())


def hf_base(raw: dict):
    """The toy base as a transformers model, from the run's flat weight file."""
    import torch

    from pcpc.exporters import qwen2
    from pcpc.exporters.hf_weights import read_flat
    from pcpc.mlir.qwen_functions import param_specs
    from rl_reference import hf_model

    qcfg = qwen2.make_config(raw["model"], **raw["model_overrides"])
    specs = param_specs(qcfg)
    arrays = read_flat(Path(raw["weights_path"]), specs, sum(s.nbytes for s in specs))
    return hf_model(qcfg, {s.name: torch.from_numpy(np.array(a)) for s, a in zip(specs, arrays)})


def check_loads_in_peft(cfg: Path, summary: dict) -> None:
    """The run's saved adapter, loaded by peft on the untouched base, gives the compiled policy's log-probs."""
    import torch

    adapter = Path(summary["adapter"])
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    raw = json.loads(cfg.read_text())
    model = peft.PeftModel.from_pretrained(hf_base(raw), str(adapter)).eval()
    ids = np.array([[1, 2, 3, 7, 7, 5, 7, 0, 7, 7, 3, 7, 1, 7, 2, 7]] * 16, np.int64)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids)).logits[:, :-1]
        want = torch.gather(torch.log_softmax(logits, -1), 2, torch.from_numpy(ids)[:, 1:, None]).squeeze(-1)
    mask = np.zeros((len(ids), ids.shape[1] - 1), np.float32)
    mask[:, 7:] = 1.0  # an 8-token prompt: the run's rows hold 8 completion tokens, the module's window
    got = compiled_policy_logps(cfg, ids, mask)[:, 7:]
    want = want.numpy()[:, 7:]
    assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) < 1e-4


@pytest.mark.parametrize("method,lr", [("lora", 0.01), ("vera", 0.1)])
def test_an_adapter_learns_the_toy_reward_and_loads_in_peft(grpo, method, lr):
    root, config = grpo
    peft_cfg = {"type": method, "r": 4, "lora_alpha": 8} if method == "lora" else {"type": method, "r": 16}
    cfg = config(method, peft_cfg, lr)
    weights = root / "models" / "toy_flat.bin"
    before = sha(weights)
    summary = run(cfg)
    r = rewards(cfg)
    first, last = np.mean(r[:5]), np.mean(r[-5:])
    assert first < 0.2 and last > 0.5, (method, first, last)
    assert sha(weights) == before  # the base weights file is untouched
    check_loads_in_peft(cfg, summary)


@pytest.mark.parametrize("peft_cfg", [
    {"type": "lora_plus", "r": 4, "lora_alpha": 8}, {"type": "dora", "r": 4, "lora_alpha": 8},
    {"type": "pissa", "r": 4, "lora_alpha": 8}, {"type": "milora", "r": 4, "lora_alpha": 8},
    {"type": "adalora", "init_r": 4, "target_r": 2, "lora_alpha": 8, "tfinal": 2}, {"type": "miss", "r": 16}],
    ids=lambda c: c["type"])
def test_every_method_trains_in_grpo_and_its_adapter_loads_in_peft(grpo, peft_cfg):
    """PiSSA / MiLoRA (a residual base in the run) load in peft as the LoRA they convert to, on the untouched
    base; AdaLoRA cut to its rank pattern."""
    root, config = grpo
    cfg = config(f"all_{peft_cfg['type']}", peft_cfg, 0.01, iterations=6)
    summary = run(cfg)
    assert summary["iterations"] == 6
    check_loads_in_peft(cfg, summary)


def test_a_resumed_adapter_run_ends_bit_identical(grpo):
    root, config = grpo
    whole = config("lora_whole", {"type": "lora", "r": 4, "lora_alpha": 8}, 0.01, iterations=10)
    run(whole)
    part = config("lora_part", {"type": "lora", "r": 4, "lora_alpha": 8}, 0.01, iterations=10)
    raw = json.loads(part.read_text())
    raw["grpo_config"]["num_iterations"] = 5
    part.write_text(json.dumps(raw))
    run(part)
    raw["grpo_config"]["num_iterations"] = 10
    part.write_text(json.dumps(raw))
    run(part, resume=True)
    a = (whole.with_suffix("") / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (part.with_suffix("") / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dpo_adapters_learn_the_preferences(tmp_path, method):
    raw = json.loads((EXPERIMENTS / "dpo_tiny.json").read_text())
    raw = copy.deepcopy(raw)
    raw.update(training_model_path=str(tmp_path / "models" / f"dpo_{method}.vmfb"),
               weights_path=str(tmp_path / "dpo_flat.bin"), peft={"type": method, "r": 8, "lora_alpha": 16})
    raw["dpo_config"].update(data_path=str(EXPERIMENTS / "dpo_tiny_prefs.jsonl"), learning_rate=0.003, num_epochs=20)
    write_base(tmp_path / "dpo_flat.bin", raw["model"], {})
    path = tmp_path / f"{method}.json"
    path.write_text(json.dumps(raw))
    summary = run_experiment(str(path), raw, out_dir=str(tmp_path / method), quiet=True)
    assert summary["dataset_rewards_accuracies"] > 0.9, summary
    assert (tmp_path / method / "adapter" / "adapter_config.json").is_file()


def test_an_adalora_dpo_run_prunes_its_ranks_and_saves_them_as_peft_does(tmp_path):
    """AdaLoRA in a run: the rank allocator prunes to target_r per layer on average by total_step - tfinal,
    pruned triplets stay zero, and the saved adapter (cut to its rank pattern) loads in peft with the run's
    logits."""
    import torch

    from pcpc.exporters import peft as pcpc_peft, qwen2
    from pcpc.runtime.run import checkpoint as ckpt

    raw = json.loads((EXPERIMENTS / "dpo_tiny.json").read_text())
    raw.update(training_model_path=str(tmp_path / "models" / "dpo_adalora.vmfb"),
               weights_path=str(tmp_path / "dpo_flat.bin"),
               peft={"type": "adalora", "init_r": 8, "target_r": 4, "lora_alpha": 16, "tinit": 4, "tfinal": 6,
                     "deltaT": 2})
    raw["dpo_config"].update(data_path=str(EXPERIMENTS / "dpo_tiny_prefs.jsonl"), learning_rate=0.003)
    write_base(tmp_path / "dpo_flat.bin", raw["model"], {})
    path = tmp_path / "adalora.json"
    path.write_text(json.dumps(raw))
    summary = run_experiment(str(path), raw, out_dir=str(tmp_path / "run"), quiet=True)
    adapter_dir = Path(summary["adapter"])
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == summary["steps"] == 30
    kept = [sum(v) for v in saved["rank_pattern"].values()]
    assert sum(kept) == 4 * len(kept)
    state = ckpt.load(ckpt.path_in(tmp_path / "run"), "dpo").state
    qcfg = qwen2.make_config(raw["model"])
    names = list(pcpc_peft.shapes(qcfg, pcpc_peft.from_config(raw["peft"]))[0])
    adapter = {n: torch.from_numpy(np.array(a)) for n, a in zip(names, state["params"])}
    for key, keep in saved["rank_pattern"].items():  # pruned triplets are zero in the run's own weights
        assert all(float(e) == 0.0 for e, k in zip(adapter[key].reshape(-1), keep) if not k)
    model = peft.PeftModel.from_pretrained(hf_base({**raw, "model_overrides": {}}), str(adapter_dir)).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    cfg = pcpc_peft.PeftConfig(type="adalora", init_r=8, target_r=4, lora_alpha=16)
    from pcpc.exporters.hf_weights import read_flat
    from pcpc.mlir.qwen_functions import param_specs

    specs = param_specs(qcfg)
    base = {s.name: torch.from_numpy(np.array(a)) for s, a in
            zip(specs, read_flat(Path(raw["weights_path"]), specs, sum(s.nbytes for s in specs)))}
    mine = qwen2.forward(base, ids, None, qcfg, linear=pcpc_peft.linear_fn(adapter, cfg))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, mine, rtol=1e-4, atol=1e-4)
