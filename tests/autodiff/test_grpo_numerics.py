"""Compiled GRPO loss, gradients and train step against plain PyTorch (HF Qwen2 + TRL's formulas) and TRL itself.

The tiny module (1 layer, vocab 256; rl_reference.rl_module) holds every RL
function; each loss type, the clipped-ratio path (old log-probs given), the
bias-corrected and the plain KL, and one AdamW train step are compared with
relative error < 1e-5 in fp32 against the hand-written reference
(rl_reference.py). Beside it, TRL 1.16.0's own GRPOTrainer._compute_loss
(trl_reference.py: the real method, a stand-in `self`) is the reference for
pcpc's eager loss (relative < TORCH_TOL: the same fp32 maths in a different
order) and for the compiled module (< TOL): losses, gradients and the logged
kl / clip ratios, and TRL's _generate_and_score_completions for the
advantages and frac_reward_zero_std.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import trl

from rl_reference import (B, L, OVERRIDES, T, TOL, WINDOW, grpo_loss, hf_model, np_params as _np, prefix_module,
                          prefix_target, rel_err, rl_module, setup, token_logps, window_module)
from trl_reference import TRL_VERSION, grpo_per_token_logps, grpo_self, trl_advantages, trl_grpo, trl_model
from pcpc.autodiff import derive
from pcpc.autodiff.grpo import LOSS_TYPES as GRPO_TYPES, SCALE_REWARDS, compute_advantages
from pcpc.autodiff.grpo import grpo_loss as pcpc_grpo_loss
from pcpc.mlir.rl_functions import make_grpo_loss

BF16_TOL = 3e-2
"""Compiled bf16 products against eager bf16: both round the same operands, but a product's fp32 sum, summed in
another order, can round to the neighbouring bf16 value (2^-8 relative), and that carries through the layers
(measured: log-probs 1.5e-3, gradients up to 7e-3; the bf16 module against the fp32 one: 2.3e-3)."""
TORCH_TOL = 2e-6
"""pcpc's eager torch loss / gradients against TRL's, both fp32 on CPU (measured up to ~9e-7)."""


def test_token_logprobs_match_hf(rl_module, setup):
    cfg, params, _, ids, mask = setup
    want = token_logps(hf_model(cfg, params), ids, temperature=0.7).detach()
    got = rl_module.call_host("token_logprobs", *_np(params), ids.numpy(), mask.numpy(), np.float32(0.7))[0]
    assert rel_err(got, want) < TOL
    seq = rl_module.call_host("sequence_logps", *_np(params), ids.numpy(), mask.numpy())[0]
    assert rel_err(seq, (token_logps(hf_model(cfg, params), ids) * mask).sum(-1).detach()) < TOL


def _grpo_reference(cfg, params, ref_params, ids, mask, adv, old, beta, eps, temperature, loss_type, use_old, bias):
    model = hf_model(cfg, params)
    with torch.no_grad():
        ref = token_logps(hf_model(cfg, ref_params), ids, temperature)
    logp = token_logps(model, ids, temperature)
    old_logp = old if use_old else logp.detach()
    loss = grpo_loss(logp, old_logp, ref, adv, mask, beta, eps[0], eps[1], loss_type, max_len=L,
                     bias_correction_kl=bias)
    loss.backward()
    names = list(params)
    grads = dict(model.named_parameters())
    return loss.detach(), ref, [grads[n].grad for n in names]


@pytest.mark.parametrize("loss_type,use_old,bias", [("grpo", False, True), ("dapo", False, True), ("dr_grpo", False, True),
                                                    ("grpo", True, True), ("grpo", False, False), ("grpo", True, False)])
def test_grpo_value_and_grad_matches_torch(rl_module, setup, loss_type, use_old, bias):
    cfg, params, ref_params, ids, mask = setup
    # Not group-normalised: those sum to zero per group and the loss value would be pure rounding.
    adv = torch.tensor([1.0, -0.4, 0.8, 0.3])
    beta, eps, temperature = 0.1, (0.2, 0.28), 0.9
    # "old" policy log-probs far enough from the current ones that both clip sides trigger
    with torch.no_grad():
        cur = token_logps(hf_model(cfg, params), ids, temperature)
    old = cur + 0.3 * torch.randn(cur.shape, generator=torch.Generator().manual_seed(1))
    loss, ref, grads = _grpo_reference(cfg, params, ref_params, ids, mask, adv, old, beta, eps, temperature,
                                       loss_type, use_old, bias)
    sel = np.array([t == loss_type for t in GRPO_TYPES], np.float32)
    out = rl_module.call_host(
        "grpo_value_and_grad", *_np(params), ids.numpy(), mask.numpy(), adv.numpy(), old.numpy(), ref.numpy(),
        sel, np.float32(beta), np.float32(eps[0]), np.float32(eps[1]), np.float32(temperature), np.float32(L),
        np.float32(use_old), np.float32(bias))
    assert rel_err(out[0], loss) < TOL
    for name, got, want in zip(params, out[5:], grads):
        assert rel_err(got, want) < TOL, name
    if use_old:
        assert out[2] > 0  # the clip ratio sees clipped tokens on this input
    else:
        assert out[2] == 0  # ratio 1 everywhere: nothing is clipped


@pytest.mark.parametrize("loss_type,use_old", [("grpo", False), ("dr_grpo", True)])
def test_completion_window_gives_the_full_heads_results(rl_module, window_module, setup, loss_type, use_old):
    """The head on the completion window (C = 12 of L = 15 positions; rows 0-1 start their targets at 2, rows
    2-3 at 4, so their windows are moved back to end at L) gives what the head on every position gives: the
    log-probs on the mask, 0 outside the window, and the same loss, statistics and gradients."""
    cfg, params, ref_params, ids, mask = setup
    assert int(mask.sum(-1).max()) <= WINDOW < L
    temperature = 0.9
    full = rl_module.call_host("token_logprobs", *_np(params), ids.numpy(), mask.numpy(), np.float32(temperature))[0]
    got = window_module.call_host("token_logprobs", *_np(params), ids.numpy(), mask.numpy(),
                                  np.float32(temperature))[0]
    on = mask.numpy() > 0
    assert rel_err(got[on], full[on]) < 1e-6
    assert (got[:, :2] == 0).all() and (got[2:, :3] == 0).all()  # before each row's window
    assert (got[:2, 14:] == 0).all()  # after the windows of the rows that start at 2
    ref = window_module.call_host("token_logprobs", *_np(ref_params), ids.numpy(), mask.numpy(),
                                  np.float32(temperature))[0]
    old = got + 0.3 * np.random.default_rng(1).standard_normal(got.shape).astype(np.float32)
    sel = np.array([t == loss_type for t in GRPO_TYPES], np.float32)
    data = (ids.numpy(), mask.numpy(), np.array([1.0, -0.4, 0.8, 0.3], np.float32), old, ref, sel, np.float32(0.1),
            np.float32(0.2), np.float32(0.28), np.float32(temperature), np.float32(L), np.float32(use_old),
            np.float32(1))
    want = rl_module.call_host("grpo_value_and_grad", *_np(params), *data)
    out = window_module.call_host("grpo_value_and_grad", *_np(params), *data)
    for name, a, b in zip(["loss", "kl", "clip_ratio", "low_clip", "high_clip", *params], out, want):
        assert rel_err(a, b) < 1e-6 if np.abs(b).max() > 0 else (a == 0).all(), name


def test_shared_prefix_gives_the_same_results(window_module, prefix_module, setup):
    """Rows 0-1 and 2-3 as GRPO groups (one prompt each: 3 and 5 tokens); the module that computes each group's
    first 3 positions once gives the log-probs, loss, statistics and gradients of the one that computes every
    row's (including the reference's log-probs at other weights, and the completion targets that start at 2,
    inside the shared prefix's last position)."""
    cfg, params, ref_params, ids, mask = setup
    ids = ids.clone()
    ids[1, :3], ids[3, :5] = ids[0, :3], ids[2, :5]
    temperature = np.float32(0.9)
    logps = [[m.call_host("token_logprobs", *_np(w), ids.numpy(), mask.numpy(), temperature)[0]
              for m in (window_module, prefix_module)] for w in (params, ref_params)]
    for want, got in logps:
        assert rel_err(got, want) < 1e-6
        assert np.abs(got[mask.numpy() > 0]).min() > 0
    old = logps[0][0] + 0.3 * np.random.default_rng(1).standard_normal(logps[0][0].shape).astype(np.float32)
    data = (ids.numpy(), mask.numpy(), np.array([1.0, -0.4, 0.8, 0.3], np.float32), old, logps[1][0],
            np.array([1, 0, 0], np.float32), np.float32(0.1), np.float32(0.2), np.float32(0.28), temperature,
            np.float32(L), np.float32(1), np.float32(1))
    want = window_module.call_host("grpo_value_and_grad", *_np(params), *data)
    out = prefix_module.call_host("grpo_value_and_grad", *_np(params), *data)
    for name, a, b in zip(["loss", "kl", "clip_ratio", "low_clip", "high_clip", *params], out, want):
        assert rel_err(a, b) < 1e-5 if np.abs(b).max() > 0 else (a == 0).all(), name


def test_shared_prefix_is_checked():
    from pcpc.mlir.rl_functions import check_config

    for bad in ([3, 2], [2, 0], [2, T], [2], "2,3"):
        with pytest.raises(ValueError, match="shared_prefix must be"):
            check_config({"model": "qwen2-tiny", "batch_size": B, "seq_len": T, "shared_prefix": bad})
    with pytest.raises(ValueError, match=r"shared_prefix with DPO functions must be \[2, P\]"):
        check_config({"model": "qwen2-tiny", "batch_size": B, "seq_len": T, "shared_prefix": [4, 3],
                      "functions": ["sequence_logps", "dpo_value_and_grad"]})


@pytest.fixture(scope="module")
def reference_vmfb(tmp_path_factory):
    """prefix_target's reference module (mlir/targets.py reference_target), built once for this file."""
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import reference_target

    return build(reference_target(prefix_target()), tmp_path_factory.mktemp("rl_reference")).vmfb


def test_the_reference_module_reads_packed_weights_and_gives_the_same_log_probs(prefix_module, reference_vmfb, setup,
                                                                                 tmp_path):
    """mlir/targets.reference_target: the scoring functions with the weights as module parameters, read from a
    flat weight file and packed once (pcpc.runtime.pack, as a GRPO run's launcher does), against the training
    module's functions on the same weights as arguments: bit for bit."""
    from pcpc.exporters.hf_weights import write_flat
    from pcpc.mlir.signature import load_meta, meta_path_for
    from pcpc.mlir.targets import reference_target
    from pcpc.runtime.module import CompiledModule
    from pcpc.runtime.pack import packed_entries
    from pcpc.runtime.rl.policy import pack_reference

    cfg, _, ref_params, ids, mask = setup
    ids = ids.clone()
    ids[1:, :3] = ids[0, :3]  # one 3-token prompt: GRPO's groups (rows 0-1, 2-3) and DPO's pairs (0-2, 1-3) agree
    target = reference_target(prefix_target())
    assert target.config["resident"] and target.config["functions"] == ["token_logprobs", "sequence_logps"]
    weights = tmp_path / "ref_flat.bin"
    write_flat(weights, list(ref_params.items()), "float32", sum(v.numel() * 4 for v in ref_params.values()))
    said = []
    pack_reference(reference_vmfb, weights, said.append)
    assert said and packed_entries(weights, load_meta(meta_path_for(reference_vmfb))) is not None
    pack_reference(reference_vmfb, weights, said.append)  # packed once: up to date now
    assert len(said) == 1
    ref = CompiledModule(reference_vmfb, parameters=weights)
    assert ref.resident and [a.name for a in ref.signature("token_logprobs").args] == ["ids", "mask", "temperature"]
    temperature = np.float32(0.9)
    want = prefix_module.call_host("token_logprobs", *_np(ref_params), ids.numpy(), mask.numpy(), temperature)[0]
    got = ref.call_host("token_logprobs", ids.numpy(), mask.numpy(), temperature)[0]
    assert np.abs(want[mask.numpy() > 0]).min() > 0
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    want = prefix_module.call_host("sequence_logps", *_np(ref_params), ids.numpy(), mask.numpy())[0]
    got = ref.call_host("sequence_logps", ids.numpy(), mask.numpy())[0]
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_a_reference_that_cannot_be_packed_stays_on_the_training_module(reference_vmfb, tmp_path, monkeypatch):
    """pack_reference says why and returns False (the GRPO launcher then keeps the reference on the training
    module) where the packed file cannot be written, e.g. beside a weight file in a read-only folder."""
    from pcpc.errors import UserError
    from pcpc.runtime import pack
    from pcpc.runtime.rl.policy import pack_reference

    def refuse(vmfb, meta, weights):
        raise UserError(f"{weights}: packing the weights for {vmfb.name} failed:\nPermissionError: read-only")

    monkeypatch.setattr(pack, "ensure_packed", refuse)
    said = []
    assert pack_reference(reference_vmfb, tmp_path / "flat.bin", said.append) is False
    assert "runs on the training module instead" in said[-1] and "read-only" in said[-1]


def test_resident_is_only_for_the_scoring_functions():
    from pcpc.mlir.rl_functions import check_config

    base = {"model": "qwen2-tiny", "batch_size": B, "seq_len": T, "resident": True}
    check_config({**base, "functions": ["token_logprobs", "sequence_logps"]})
    with pytest.raises(ValueError, match="resident .* is for token_logprobs and sequence_logps"):
        check_config({**base, "functions": ["token_logprobs", "grpo_value_and_grad"]})
    with pytest.raises(ValueError, match="and peft"):
        check_config({**base, "functions": ["token_logprobs"], "peft": {"type": "lora", "r": 4}})


def test_completion_len_is_checked():
    from pcpc.mlir.rl_functions import check_config

    for bad in (0, T, 2.5):
        with pytest.raises(ValueError, match="completion_len must be an integer in 1..seq_len - 1"):
            check_config({"model": "qwen2-tiny", "batch_size": B, "seq_len": T, "completion_len": bad})


def test_compute_dtype_is_checked():
    from pcpc.mlir.rl_functions import check_config

    base = {"model": "qwen2-tiny", "batch_size": B, "seq_len": T}
    check_config({**base, "compute_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="compute_dtype must be one of float32, bfloat16, got 'float16'"):
        check_config({**base, "compute_dtype": "float16"})
    with pytest.raises(ValueError, match="compute_dtype bfloat16 is for full fine-tuning"):
        check_config({**base, "compute_dtype": "bfloat16", "peft": {"type": "lora", "r": 4}})


def _grpo_args(setup, temperature=0.9):
    cfg, params, ref_params, ids, mask = setup
    adv = torch.tensor([1.0, -0.4, 0.8, 0.3])
    with torch.no_grad():
        ref = token_logps(hf_model(cfg, ref_params), ids, temperature)
    sel = torch.tensor([t == "grpo" for t in GRPO_TYPES], dtype=torch.float32)
    scalars = [torch.tensor(v, dtype=torch.float32) for v in (0.1, 0.2, 0.28, temperature, L, 0.0, 1.0)]
    return [*params.values(), ids, mask, adv, torch.zeros(B, L), ref, sel, *scalars]


def test_bf16_compute_matches_its_eager_formula_and_differs_from_fp32(rl_module, setup, tmp_path_factory):
    """compute_dtype bfloat16: the compiled GRPO log-probs, loss and gradients against the same recipe's
    functions run eagerly in torch (bf16 products, fp32 elsewhere), within bf16's rounding; and measurably
    apart from the fp32 module's, so the products really ran in bf16."""
    from pcpc.mlir import rl_functions
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import rl_target
    from pcpc.runtime.module import CompiledModule

    target = rl_target("test-rl-bf16", "qwen2-tiny", model_overrides=OVERRIDES, batch_size=B, seq_len=T,
                       compute_dtype="bfloat16", functions=["token_logprobs", "grpo_value_and_grad"])
    mod = CompiledModule(build(target, tmp_path_factory.getbasetemp() / "rl_bf16").vmfb)
    eager = {f.name: f.fn for f in rl_functions.build(target.config)[0]}
    cfg, params, _, ids, mask = setup
    args = _grpo_args(setup)
    logp_args = [*params.values(), ids, mask, torch.tensor(0.9)]

    want_logp = eager["token_logprobs"](*logp_args)
    got_logp = mod.call_host("token_logprobs", *[a.numpy() for a in logp_args])[0]
    fp32_logp = rl_module.call_host("token_logprobs", *[a.numpy() for a in logp_args])[0]
    assert rel_err(got_logp, want_logp) < BF16_TOL
    assert rel_err(fp32_logp, want_logp) > 10 * TOL  # bf16's rounding shows: not the fp32 module's numbers

    want = eager["grpo_value_and_grad"](*args)
    got = mod.call_host("grpo_value_and_grad", *[a.numpy() for a in args])
    fp32 = rl_module.call_host("grpo_value_and_grad", *[a.numpy() for a in args])
    assert rel_err(got[0], want[0]) < BF16_TOL
    for name, g, w in zip(params, got[5:], want[5:]):
        assert rel_err(g, w) < BF16_TOL, name
    assert rel_err(got[0], fp32[0]) < 5e-2  # bf16 products, the fp32 loss to within bf16's few digits
    assert max(rel_err(g, f) for g, f in zip(got[5:], fp32[5:])) > 10 * TOL


def test_bf16_compute_is_torch_autocasts(setup):
    """The recipe's bf16 log-probs (eager) against HF's model under torch.autocast (what TRL's bf16 runs on a
    CPU), its logits log-softmaxed in fp32 as pcpc does: within bf16's rounding (autocast also runs the
    attention's products in bf16 and adds the biases in bf16; pcpc keeps both in fp32), and not fp32's."""
    from pcpc.mlir import rl_functions
    from pcpc.mlir.targets import rl_target

    cfg, params, _, ids, mask = setup
    target = rl_target("test-rl-bf16", "qwen2-tiny", model_overrides=OVERRIDES, batch_size=B, seq_len=T,
                       compute_dtype="bfloat16", functions=["token_logprobs"])
    (fn,) = [f.fn for f in rl_functions.build(target.config)[0]]
    got = fn(*params.values(), ids, mask, torch.tensor(1.0)) * mask  # (the function's window is wider than the mask)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hf_model(cfg, params)(input_ids=ids).logits[:, :-1]
    want = torch.gather(torch.log_softmax(logits.float(), -1), 2, ids[:, 1:, None]).squeeze(-1) * mask
    fp32 = token_logps(hf_model(cfg, params), ids).detach() * mask
    assert rel_err(got, want) < BF16_TOL
    assert rel_err(got, fp32) > 10 * TOL


def test_grpo_update_matches_torch_adamw(rl_module, setup):
    """Gradients, then the chunked AdamW update (runtime/rl/update.py), from a mid-run optimizer state (step 10;
    second moments well above eps, so the update is a well-conditioned function of the gradient) against
    torch.optim.AdamW + clip_grad_norm_."""
    from pcpc.runtime.rl.update import ChunkedOptimizer

    cfg, params, ref_params, ids, mask = setup
    adv = torch.tensor([1.0, -0.5, 0.7, 0.2])
    beta, eps, temperature, lr, step = 0.05, (0.2, 0.2), 1.0, 1e-3, 10
    names = list(params)
    gen = torch.Generator().manual_seed(5)
    m0 = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in params.items()}
    v0 = {k: 1e-5 + 1e-4 * torch.rand(v.shape, generator=gen) for k, v in params.items()}
    model = hf_model(cfg, params)
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW([named[n] for n in names], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for n in names:
        opt.state[named[n]] = {"step": torch.tensor(float(step - 1)), "exp_avg": m0[n].clone(),
                               "exp_avg_sq": v0[n].clone()}
    with torch.no_grad():
        ref = token_logps(hf_model(cfg, ref_params), ids, temperature)
    logp = token_logps(model, ids, temperature)
    loss = grpo_loss(logp, logp.detach(), ref, adv, mask, beta, eps[0], eps[1], "grpo", L, bias_correction_kl=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([named[n] for n in names], 1.0)
    assert norm > 1.0  # the clip acts on this input
    opt.step()

    sel = np.array([1, 0, 0], np.float32)
    out = rl_module("grpo_value_and_grad", *_np(params), ids.numpy(), mask.numpy(), adv.numpy(),
                    np.zeros((B, L), np.float32), ref.numpy(), sel, np.float32(beta), np.float32(eps[0]),
                    np.float32(eps[1]), np.float32(temperature), np.float32(L), np.float32(0), np.float32(1))
    assert rel_err(out[0].to_host(), loss.detach()) < TOL
    P = rl_module.upload_all(_np(params))
    M = rl_module.upload_all([m0[n].numpy() for n in names])
    V = rl_module.upload_all([v0[n].numpy() for n in names])
    grads = list(out[5:])
    ChunkedOptimizer(rl_module).step(P, M, V, grads, step, lr)
    assert grads == [None] * len(names)  # consumed as the chunks went
    f32 = float(np.finfo(np.float32).eps)
    for i, name in enumerate(names):
        # The moments carry the clipped gradient: 1e-5. The weights: 1e-4 of one update (the compiled step
        # forms 1 - 0.999^step in fp32, torch in float64: ~6e-6 relative at step 10), plus the fp32 rounding
        # of weights ~1000x larger than one update.
        assert rel_err(M[i].to_host(), opt.state[named[name]]["exp_avg"]) < TOL, name
        assert rel_err(V[i].to_host(), opt.state[named[name]]["exp_avg_sq"]) < TOL, name
        want = named[name].detach().numpy()
        update = np.abs(want - params[name].numpy()).max()
        assert np.abs(P[i].to_host() - want).max() <= 1e-4 * update + 2 * f32 * np.abs(want).max(), name


def test_the_in_place_adamw_module_is_the_training_modules_adamw(rl_module, setup, tmp_path):
    """The optimizer module (mlir/targets.optimizer_target: adamw_inplace_K, aggressive fusion) against the
    training module's adamw_K on the same inputs, 3 steps with weight decay and clipping: bit for bit, written
    into the arrays it was given (the same device arrays after the step)."""
    from dataclasses import replace

    from pcpc.mlir.build import build
    from pcpc.mlir.targets import optimizer_target, rl_target
    from pcpc.runtime.module import CompiledModule
    from pcpc.runtime.rl.update import ChunkedOptimizer

    _, params, _, _, _ = setup
    opt = {"beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1, "grad_clip": 0.5}
    train = rl_target("test-inplace", "qwen2-tiny", model_overrides=OVERRIDES, batch_size=B, seq_len=T,
                      functions=["grad_clip_coef", "adamw"], optimizer=opt)
    mod = CompiledModule(build(train, tmp_path).vmfb)
    inplace = CompiledModule(build(optimizer_target(train), tmp_path).vmfb)
    assert sorted(inplace.meta.functions) == sorted(f.replace("adamw_", "adamw_inplace_") for f in mod.meta.functions
                                                   if f.startswith("adamw_"))
    gen = torch.Generator().manual_seed(11)
    zeros = [np.zeros(p.shape, np.float32) for p in params.values()]
    dense, fused = ChunkedOptimizer(mod), ChunkedOptimizer(mod, inplace)
    P, M, V = mod.upload_all(_np(params)), mod.upload_all(zeros), mod.upload_all(zeros)
    P2, M2, V2 = mod.upload_all(_np(params)), mod.upload_all(zeros), mod.upload_all(zeros)
    same = [*P2, *M2, *V2]
    for step in range(1, 4):
        grads = [(torch.randn(p.shape, generator=gen) * 0.1).numpy() for p in params.values()]
        dense.step(P, M, V, mod.upload_all(grads), step, 1e-2)
        fused.step(P2, M2, V2, mod.upload_all(grads), step, 1e-2)
    assert all(a is b for a, b in zip([*P2, *M2, *V2], same))  # written in place
    for a, b in zip([*P, *M, *V], [*P2, *M2, *V2]):
        x, y = a.to_host(), b.to_host()
        assert np.array_equal(x.view(np.uint32), y.view(np.uint32))
    assert not np.array_equal(P2[0].to_host(), _np(params)[0])  # it trained


def test_outer_step_per_chunk_matches_sgd_nesterov(rl_module, setup):
    """The outer Nesterov step, fused behind each chunk's AdamW and on its own, against torch SGD(nesterov)
    with the pseudo-gradient (weights before - after) as the gradient."""
    from pcpc.runtime.rl.update import ChunkedOptimizer

    _, params, _, _, _ = setup
    names = list(params)
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in params.values()]
    b0 = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params.values()]
    up = rl_module.upload_all
    chunked = ChunkedOptimizer(rl_module)
    zeros = [np.zeros(p.shape, np.float32) for p in params.values()]
    # fused: AdamW then the outer step, chunk by chunk
    P, M, V, Bm = up(_np(params)), up(zeros), up(zeros), up([b.numpy() for b in b0])
    chunked.step(P, M, V, up([g.numpy() for g in grads]), 1, 1e-2, outer=(Bm, 0.7, 0.9))
    # separately: AdamW on all chunks, then the outer step over all of them
    P2, M2, V2, B2 = up(_np(params)), up(zeros), up(zeros), up([b.numpy() for b in b0])
    chunked.step(P2, M2, V2, up([g.numpy() for g in grads]), 1, 1e-2)
    after = [a.to_host().copy() for a in P2]
    before = up(_np(params))
    chunked.outer(before, B2, P2, 0.7, 0.9)
    assert before == [None] * len(names)
    # torch: SGD with nesterov on delta = before - after
    ws = [torch.nn.Parameter(p.clone()) for p in params.values()]
    sgd = torch.optim.SGD(ws, lr=0.7, momentum=0.9, nesterov=True)
    for w, b in zip(ws, b0):
        sgd.state[w] = {"momentum_buffer": b.clone()}
    for w, p, a in zip(ws, params.values(), after):
        w.grad = p - torch.from_numpy(a)
    sgd.step()
    for i, name in enumerate(names):
        want_b = sgd.state[ws[i]]["momentum_buffer"]
        for got_p, got_b in ((P[i], Bm[i]), (P2[i], B2[i])):
            assert rel_err(got_b.to_host(), want_b) < TOL, name
            assert np.allclose(got_p.to_host(), ws[i].detach().numpy(), rtol=0, atol=1e-6), name


# ------------------------------------------------------------------------------------------ against TRL itself

PROMPT = 4
"""TRL's layout: prompts of one length (left padding would shift positions), completions right-padded after."""
COMPLETION_LENS = [12, 7, 10, 1]


@pytest.fixture(scope="module")
def trl_batch(setup):
    """setup's weights and ids split TRL's way: prompt_ids (B, P), completion_ids (B, C), completion_mask (B, C),
    and pcpc's (B, L) mask of the same completion tokens (position t predicts token t + 1)."""
    cfg, params, ref_params, ids, _ = setup
    C = T - PROMPT
    completion_mask = (torch.arange(C) < torch.tensor(COMPLETION_LENS)[:, None]).long()
    mask = torch.cat([torch.zeros(B, PROMPT - 1), completion_mask.float()], 1)
    return cfg, params, ref_params, ids, completion_mask, mask


def _full(x: torch.Tensor) -> torch.Tensor:
    """TRL's (B, C) completion log-probs as pcpc's (B, L) (zeros on the prompt, which the mask drops)."""
    return torch.cat([torch.zeros(x.shape[0], PROMPT - 1), x], 1)


def test_trl_pinned_and_bias_correction_default():
    """The TRL these tests run is the pinned one, and pcpc's default KL is TRL's default (bias-corrected)."""
    assert trl.__version__ == TRL_VERSION
    default = next(f.default for f in trl.GRPOConfig.__dataclass_fields__.values()
                   if f.name == "use_bias_correction_kl")
    assert inspect.signature(pcpc_grpo_loss).parameters["bias_correction_kl"].default is default is True


def test_token_logprobs_match_trl(rl_module, trl_batch):
    """The compiled token_logprobs against TRL's _get_per_token_logps_and_entropies (fused LM head, temperature)."""
    cfg, params, _, ids, completion_mask, mask = trl_batch
    temperature = 0.7
    trainer = grpo_self(None, temperature=temperature)
    with torch.no_grad():
        want = grpo_per_token_logps(trainer, trl_model(cfg, params, temperature), ids[:, :PROMPT], ids[:, PROMPT:],
                                    completion_mask)
    got = rl_module.call_host("token_logprobs", *_np(params), ids.numpy(), mask.numpy(), np.float32(temperature))[0]
    assert rel_err(torch.from_numpy(got[:, PROMPT - 1:]) * completion_mask, want) < TOL


def _old_logps(cfg, params, ids, temperature):
    """An old policy's completion log-probs (B, C), far enough from the current ones that both clip sides trigger."""
    with torch.no_grad():
        cur = token_logps(hf_model(cfg, params), ids, temperature)[:, PROMPT - 1:]
    return cur + 0.3 * torch.randn(cur.shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("use_old", [False, True], ids=["on_policy", "off_policy"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias_kl", "plain_kl"])
@pytest.mark.parametrize("loss_type", GRPO_TYPES)
def test_grpo_matches_trl(rl_module, trl_batch, loss_type, bias, use_old):
    """TRL's GRPOTrainer._compute_loss against pcpc's eager loss (make_grpo_loss + torch.func, the function the
    module compiles) and the compiled grpo_value_and_grad: loss, gradients, kl and clip ratios."""
    cfg, params, ref_params, ids, completion_mask, mask = trl_batch
    adv = torch.tensor([1.0, -0.4, 0.8, 0.3])  # not group-normalised: the loss would be pure rounding
    beta, eps_low, eps_high, temperature = 0.1, 0.2, 0.28, 0.9
    old = _old_logps(cfg, params, ids, temperature) if use_old else None
    loss, grads, metrics, ref = trl_grpo(
        cfg, params, ref_params, ids[:, :PROMPT], ids[:, PROMPT:], completion_mask, adv, old, beta=beta,
        loss_type=loss_type, epsilon=eps_low, epsilon_high=eps_high, temperature=temperature,
        use_bias_correction_kl=bias, max_completion_length=L)
    names = list(params)
    old_full = _full(old) if use_old else torch.zeros(B, L)
    sel = [float(t == loss_type) for t in GRPO_TYPES]
    scalars = [beta, eps_low, eps_high, temperature, L, float(use_old), float(bias)]
    eager = derive.value_and_grad_fn(make_grpo_loss(cfg), names, has_aux=True)(
        *params.values(), ids, mask, adv, old_full, _full(ref), torch.tensor(sel), *map(torch.tensor, scalars))
    compiled = rl_module.call_host(
        "grpo_value_and_grad", *_np(params), ids.numpy(), mask.numpy(), adv.numpy(), old_full.numpy(),
        _full(ref).numpy(), np.array(sel, np.float32), *map(np.float32, scalars))
    logged = [metrics["kl"], metrics["clip_ratio/region_mean"], metrics["clip_ratio/low_mean"],
              metrics["clip_ratio/high_mean"]]
    for out, tol in ((eager, TORCH_TOL), (compiled, TOL)):
        assert rel_err(out[0], loss) < tol
        for i, name in enumerate(names):
            assert rel_err(out[5 + i], grads[name]) < tol, name
        assert rel_err(out[1], logged[0]) < tol  # kl, bias-corrected when bias is
        # clip ratios: fractions of the same tokens, so equal unless a ratio sits on a clip boundary
        assert np.allclose([float(x) for x in out[2:5]], logged[1:], rtol=0, atol=1e-6)
    assert (metrics["clip_ratio/region_mean"] > 0) == use_old  # on-policy: ratio 1, nothing clipped


def test_bias_correction_changes_the_on_policy_gradient_not_the_loss(trl_batch):
    """On-policy the ratio is 1, so the corrected KL has the plain one's value, but d ratio = d logp: the
    gradients differ (in TRL and in pcpc alike; test_grpo_matches_trl checks they agree)."""
    cfg, params, ref_params, ids, _, mask = trl_batch
    with torch.no_grad():
        ref = token_logps(hf_model(cfg, ref_params), ids)
    adv = torch.tensor([1.0, -0.4, 0.8, 0.3])
    vg = derive.value_and_grad_fn(make_grpo_loss(cfg), list(params), has_aux=True)
    out = [vg(*params.values(), ids, mask, adv, torch.zeros(B, L), ref, torch.tensor([1.0, 0, 0]),
              *map(torch.tensor, [0.1, 0.2, 0.2, 1.0, float(L), 0.0, bias])) for bias in (1.0, 0.0)]
    assert rel_err(out[0][0], out[1][0]) < 1e-7 and rel_err(out[0][1], out[1][1]) < 1e-7  # loss, kl
    assert max(rel_err(a, b) for a, b in zip(out[0][5:], out[1][5:])) > 1e-3


REWARDS = {
    "mixed": [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 0.0, 1.0, 0.0, 1.0],  # one group with equal rewards
    "flat_groups": [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0],  # every group equal, batch not
    "all_equal": [0.5] * 12,
}


@pytest.mark.parametrize("rewards", REWARDS)
@pytest.mark.parametrize("scale", SCALE_REWARDS)
def test_advantages_match_trl(scale, rewards):
    """compute_advantages against TRL's _generate_and_score_completions: the advantages it returns and the
    frac_reward_zero_std it logs (with scale "batch": the batch std's, 0 or 1)."""
    r = torch.tensor(REWARDS[rewards])
    want_adv, want_frac = trl_advantages(r, 4, scale)
    adv, frac = compute_advantages(r, 4, scale)
    assert rel_err(adv, want_adv) < 1e-6 if want_adv.abs().max() > 0 else adv.abs().max() == 0
    assert frac == pytest.approx(want_frac, abs=1e-7)
