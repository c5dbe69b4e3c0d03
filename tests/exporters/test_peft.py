"""exporters/peft.py against the HF peft library, eagerly: for every method the adapted forward gives peft's
logits, the gradients of a loss w.r.t. the adapter equal peft + torch autograd's, the merged weights give the
same logits, and adapters cross both ways through peft's files (pcpc's load in `PeftModel.from_pretrained`,
peft's load in pcpc)."""

from __future__ import annotations

import pytest
import torch

from pcpc.exporters import peft as pcpc_peft, qwen2
from peft_helpers import into_peft_model, peft_config, peft_name
from qwen_helpers import hf_model

peft = pytest.importorskip("peft")

CASE = "mha-untied"
METHODS = {
    "lora": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "lora_plus": dict(r=4, lora_alpha=16),
    "dora": dict(r=4, lora_alpha=8),
    "pissa": dict(r=4, lora_alpha=8),
    "milora": dict(r=4, lora_alpha=8),
    "vera": dict(r=16),
    "adalora": dict(init_r=6, target_r=3, lora_alpha=8, total_step=10),
    "miss": dict(r=8),
}


def pcpc_cfg(method: str, **extra) -> pcpc_peft.PeftConfig:
    kw = dict(METHODS[method])
    kind = "lora" if method == "rslora" else method
    return pcpc_peft.PeftConfig(type=kind, **kw, **extra)


def base_params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def perturbed(adapter: dict, seed: int) -> dict:
    """The adapter after some training: every trainable tensor moved, so nothing is zero by construction."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) * (v.abs().mean() + 0.1) for k, v in adapter.items()}


def rel_err(a, b) -> float:
    """|a - b| / |b| over the whole tensor (the issue's relative error)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ids_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 320, (2, 12), generator=g)


def pcpc_logits(base, tensors, cfg, qcfg, ids):
    return qwen2.forward(base, ids, None, qcfg, linear=pcpc_peft.linear_fn(tensors, cfg))


PREFIX = pcpc_peft.PREFIX


@pytest.fixture(scope="module")
def qcfg():
    import json

    return qwen2.config_from_hf(json.loads(hf_model(CASE).config.to_json_string()))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "milora"])
def test_forward_and_gradients_equal_peft(method, qcfg):
    """Logits of the adapted model, and the gradients of a loss w.r.t. every adapter tensor, equal peft's."""
    cfg = pcpc_cfg(method)
    model = hf_model(CASE)
    base = base_params(model)
    adapter, frozen, residual = pcpc_peft.init(base, qcfg, cfg, seed=0)
    pm = peft.get_peft_model(hf_model(CASE), peft_config(cfg, init="pissa" if cfg.type == "pissa" else True))
    if cfg.type == "pissa":  # peft's own SVD init: the same adapter and residual (up to the signs of U, V)
        ours = qwen2.forward({**base, **residual}, ids_batch(), None, qcfg,
                             linear=pcpc_peft.linear_fn({**adapter, **frozen}, cfg))
        torch.testing.assert_close(ours, pm(ids_batch()).logits, rtol=1e-4, atol=1e-4)
        for k, v in residual.items():
            torch.testing.assert_close(v, dict(pm.named_parameters())[PREFIX + k.replace(".weight",
                                                                                        ".base_layer.weight")],
                                       rtol=1e-4, atol=1e-5)
    if cfg.type == "vera":  # the shared projections are drawn as peft draws them
        buffers = dict(pm.named_buffers())
        for k, v in frozen.items():
            theirs = buffers[f"{PREFIX}model.layers.0.self_attn.q_proj.{k}.default"]
            torch.testing.assert_close(v, theirs, rtol=0, atol=0)
    trained = perturbed(adapter, 1)
    into_peft_model(pm, trained, frozen)
    if cfg.type == "pissa":
        for k, v in residual.items():
            dict(pm.named_parameters())[PREFIX + k.replace(".weight", ".base_layer.weight")].data.copy_(v)
    ids = ids_batch()
    weights = torch.linspace(0.5, 1.5, 320)

    def loss_of(logits):
        return (torch.log_softmax(logits, -1) * weights).sum(-1).mean()

    t = {k: v.clone().requires_grad_(True) for k, v in trained.items()}
    mine = pcpc_logits({**base, **residual}, {**t, **frozen}, cfg, qcfg, ids)
    theirs = pm(ids).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    loss_of(mine).backward()
    loss_of(theirs).backward()
    named = dict(pm.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert len(trainable) == len(t)  # peft trains exactly the tensors pcpc does
    for k, v in t.items():
        assert rel_err(v.grad, named[peft_name(k)].grad) < 1e-5, k
    for n, p in named.items():  # the base is frozen in both
        if n not in trainable:
            assert p.grad is None


@pytest.mark.parametrize("method", list(METHODS))
def test_saved_adapters_load_in_peft_with_pcpcs_logits(method, qcfg, tmp_path):
    """pcpc's files load with PeftModel.from_pretrained on the untouched base and give pcpc's logits; milora
    and pissa load as the LoRA they convert to. merged() gives the same logits as a plain model."""
    cfg = pcpc_cfg(method)
    base = base_params(hf_model(CASE))
    adapter, frozen, residual = pcpc_peft.init(base, qcfg, cfg, seed=0)
    trained = perturbed(adapter, 2)
    ids = ids_batch()
    mine = pcpc_logits({**base, **residual}, {**trained, **frozen}, cfg, qcfg, ids)
    pcpc_peft.save(tmp_path / "adapter", trained, frozen, cfg, "tiny", initial=adapter)
    loaded = peft.PeftModel.from_pretrained(hf_model(CASE), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(loaded(ids).logits, mine, rtol=1e-4, atol=1e-4)
    merged = dict(base)
    tensors = {**trained, **frozen}
    for name, _, _ in pcpc_peft.targets(qcfg, cfg):
        merged[f"{name}.weight"] = pcpc_peft.merged({**base, **residual}[f"{name}.weight"], name, tensors, cfg)
    torch.testing.assert_close(qwen2.forward(merged, ids, None, qcfg), mine, rtol=1e-4, atol=1e-4)
    # and back: pcpc loads its own files (pissa / milora as their LoRA) with the same logits
    cfg2, adapter2, frozen2 = pcpc_peft.load(tmp_path / "adapter")
    pcpc_peft.check_against(cfg2, adapter2, frozen2, qcfg, "adapter")
    torch.testing.assert_close(pcpc_logits(base, {**adapter2, **frozen2}, cfg2, qcfg, ids), mine,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "miss"])
def test_adapters_saved_by_peft_load_in_pcpc(method, qcfg, tmp_path):
    cfg = pcpc_cfg(method)
    model = hf_model(CASE)
    base = base_params(model)
    pm = peft.get_peft_model(model, peft_config(cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "theirs")
    cfg2, adapter, frozen = pcpc_peft.load(tmp_path / "theirs")
    assert cfg2.type == cfg.type and cfg2.r == cfg.r
    pcpc_peft.check_against(cfg2, adapter, frozen, qcfg, "adapter")
    ids = ids_batch()
    torch.testing.assert_close(pcpc_logits(base, {**adapter, **frozen}, cfg2, qcfg, ids), pm(ids).logits,
                               rtol=1e-4, atol=1e-4)


def test_bad_configs_and_files_name_the_field(qcfg, tmp_path):
    from pcpc.errors import UserError

    with pytest.raises(UserError, match="peft.type must be one of"):
        pcpc_peft.PeftConfig(type="prefix")
    with pytest.raises(UserError, match="peft.target_modules"):
        pcpc_peft.PeftConfig(target_modules=["qproj"])
    with pytest.raises(UserError, match="lora_dropout"):
        pcpc_peft.PeftConfig(lora_dropout=0.1)
    with pytest.raises(UserError, match="adapter_config.json is missing"):
        pcpc_peft.load(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3", "target_modules": ["k_proj"]}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"adapter_config.json: peft_type 'IA3' is not supported "
                                        r"\(LORA, VERA, ADALORA or MISS\)"):
        pcpc_peft.load(tmp_path)
    cfg = pcpc_cfg("lora")
    base = base_params(hf_model(CASE))
    adapter, frozen, _ = pcpc_peft.init(base, qcfg, cfg)
    with pytest.raises(UserError, match="does not fit this model"):
        pcpc_peft.check_against(cfg, {k: v for k, v in list(adapter.items())[1:]}, frozen, qcfg, "adapter")


def test_adalora_rank_allocation_matches_peft(qcfg):
    """The host rank allocator (runtime/rl/adalora.py) prunes exactly the triplets peft's RankAllocator does,
    over a schedule with warm-up, cubic budget and a final phase, on the same weights and gradients."""
    import numpy as np

    from pcpc.runtime.rl.adalora import RankAllocator

    cfg = pcpc_peft.PeftConfig(type="adalora", init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12)
    base = base_params(hf_model(CASE))
    adapter, _, _ = pcpc_peft.init(base, qcfg, cfg)
    names = list(adapter)
    pm = peft.get_peft_model(hf_model(CASE), peft_config(cfg))
    ours = RankAllocator(names, cfg)
    params = {k: v.numpy().copy() for k, v in perturbed(adapter, 4).items()}
    g = torch.Generator().manual_seed(8)
    named = dict(pm.named_parameters())
    for step in range(1, cfg.total_step + 1):
        grads = {k: torch.randn(v.shape, generator=g).numpy() for k, v in params.items()}
        params = {k: v - 0.01 * grads[k] for k, v in params.items()}  # "the optimizer step"
        for k in names:
            named[peft_name(k)].data.copy_(torch.from_numpy(params[k]))
            named[peft_name(k)].grad = torch.from_numpy(grads[k]).clone()
        pm.base_model.update_and_allocate(step)
        flat = [params[k] for k in names]
        if ours.step(step, flat, [grads[k] for k in names]):
            ours.apply(flat)
        params = dict(zip(names, flat))
        for k in names:
            if k.endswith(".lora_E"):
                np.testing.assert_array_equal(params[k], named[peft_name(k)].detach().numpy(), err_msg=f"{step} {k}")
    kept = [sum(k) for k in ours.pattern.values()]
    assert ours.final and sum(kept) == cfg.target_r * len(kept) and len(set(kept)) > 1  # ranks moved between layers


def test_a_pruned_adalora_adapter_saves_as_peft_does(qcfg, tmp_path):
    """Saved with its rank pattern, the adapter is cut to the kept triplets (peft's format); peft and pcpc
    load it with the same logits as the masked full-rank adapter."""
    cfg = pcpc_peft.PeftConfig(type="adalora", init_r=6, target_r=3, total_step=10)
    base = base_params(hf_model(CASE))
    adapter, _, _ = pcpc_peft.init(base, qcfg, cfg)
    trained = perturbed(adapter, 5)
    g = torch.Generator().manual_seed(2)
    pattern = {}
    for name, _, _ in pcpc_peft.targets(qcfg, cfg):
        keep = (torch.rand(6, generator=g) > 0.5).tolist()
        keep[0] = True
        pattern[name] = keep
        trained[f"{name}.lora_E"] = trained[f"{name}.lora_E"] * torch.tensor(keep, dtype=torch.float32)[:, None]
    ids = ids_batch()
    mine = pcpc_logits(base, trained, cfg, qcfg, ids)
    pcpc_peft.save(tmp_path / "a", trained, {}, cfg, "tiny", rank_pattern=pattern)
    loaded = peft.PeftModel.from_pretrained(hf_model(CASE), str(tmp_path / "a")).eval()
    torch.testing.assert_close(loaded(ids).logits, mine, rtol=1e-4, atol=1e-4)
    cfg2, adapter2, _ = pcpc_peft.load(tmp_path / "a")
    torch.testing.assert_close(pcpc_logits(base, adapter2, cfg2, qcfg, ids), mine, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_shared_prefix_gives_the_same_gradients(method, qcfg):
    """A GRPO group's rows share their prompt; computing its positions once (forward's shared_prefix) gives the
    adapter the logits and gradients of computing every row's."""
    cfg = pcpc_cfg(method)
    base = base_params(hf_model(CASE))
    adapter, frozen, residual = pcpc_peft.init(base, qcfg, cfg, seed=0)
    trained = perturbed(adapter, 1)
    ids = torch.randint(0, 320, (4, 12), generator=torch.Generator().manual_seed(5))
    ids[1, :4], ids[3, :4] = ids[0, :4], ids[2, :4]  # two groups of two rows, four prompt tokens each
    weights = torch.linspace(0.5, 1.5, 320)
    results = []
    for shared in (None, (2, 4)):
        t = {k: v.clone().requires_grad_(True) for k, v in trained.items()}
        logits = qwen2.forward({**base, **residual}, ids, None, qcfg, linear=pcpc_peft.linear_fn({**t, **frozen}, cfg),
                               shared_prefix=shared)
        (torch.log_softmax(logits, -1) * weights).sum(-1).mean().backward()
        results.append((logits.detach(), {k: v.grad for k, v in t.items()}))
    (want, want_g), (got, got_g) = results
    assert rel_err(got, want) < 1e-6
    for k in want_g:
        assert want_g[k].norm() > 0 and rel_err(got_g[k], want_g[k]) < 1e-5, k
