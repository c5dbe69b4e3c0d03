"""Sparse fine-tuning end to end on the toy DPO set: a dense run logs its deltas, a mask is found from them,
and a sparse run trains only the masked weights through the compiled in-place AdamW step.

Also the compiled sparse step itself: it equals dense AdamW (the torch reference's arithmetic) restricted to the
mask, bit for bit, and never writes outside the mask.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from pcpc.errors import UserError
from pcpc.kinds import run_experiment
from pcpc.runtime import masks
from pcpc.runtime.run import checkpoint, deltas

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse_toy")
    raw = json.loads((EXPERIMENTS / "dpo_tiny.json").read_text())
    raw.update(training_model_path=str(root / "models" / "dpo_toy.vmfb"), weights_path=str(root / "dpo_flat.bin"))
    raw["dpo_config"]["data_path"] = str(EXPERIMENTS / "dpo_tiny_prefs.jsonl")
    dense = copy.deepcopy(raw)
    dense["delta_log"] = {"steps": [1, 5, 10, 20, 30], "fisher_batches": 2}
    run(root, dense, "dense")
    return root, raw


def run(root: Path, raw: dict, name: str, **kw) -> dict:
    path = root / f"{name}.json"
    path.write_text(json.dumps(raw))
    return run_experiment(str(path), raw, out_dir=str(root / name), quiet=True, **kw)


def mask_file(root: Path, sparsity: float, step: int) -> Path:
    found, record = masks.find(root / "dense", "magnitude", sparsity, step)
    return masks.save(root / "masks" / masks.mask_name("magnitude", sparsity, step), found, record)


def initial_weights(root: Path) -> list[np.ndarray]:
    return deltas.weights_at(root / "dense", 0)


def test_a_sparse_run_trains_only_the_mask_and_learns(toy):
    root, raw = toy
    path = mask_file(root, 90.0, 10)
    sparse = copy.deepcopy(raw)
    sparse["mask"] = str(path)
    summary = run(root, sparse, "sparse90")
    state = checkpoint.load(checkpoint.path_in(root / "sparse90"), "dpo").state
    mask = masks.load(path)
    index = deltas.read_index(root / "dense")
    changed = 0
    for name, w0, w in zip(index["names"], initial_weights(root), state["params"]):
        m = mask[name]
        assert np.array_equal(np.asarray(w)[~m].view(np.uint32), w0[~m].view(np.uint32)), name  # untouched
        changed += int(np.count_nonzero(np.asarray(w)[m] != w0[m]))
    assert 0 < changed <= sum(int(v.sum()) for v in mask.values())
    # compact moments: nnz entries (padded by at most 25%), not the weights' size
    nnz = sum(int(v.sum()) for v in mask.values())
    moments = sum(np.size(a) for a in state["m"])
    assert nnz <= moments <= 1.25 * nnz + 4 * len(mask)
    dense = json.loads((root / "dense" / "summary.json").read_text())
    assert summary["dataset_rewards_accuracies"] > 0.9 and dense["dataset_rewards_accuracies"] > 0.9


def test_the_fisher_sum_is_the_compiled_gradients_of_the_first_batches_squared(toy):
    """delta_log.fisher_batches 2: deltas/fisher.safetensors is g_1² + g_2², the gradients the compiled
    dpo_value_and_grad returns at θ_0 and θ_1 on steps 1 and 2's batches; a fisher mask ranks by it."""
    from safetensors.numpy import load_file

    from pcpc.autodiff.dpo import loss_type_weights
    from pcpc.runtime.module import CompiledModule, to_host
    from pcpc.runtime.rl import dpo, setup
    from pcpc.runtime.rl.dpo_config import parse_dpo

    root, raw = toy
    cfg = parse_dpo(raw)
    T = json.loads((root / "dense" / "config.json").read_text())["seq_len"]
    mod = CompiledModule(raw["training_model_path"])
    tok = setup.load_tokenizer(cfg.tokenizer, cfg.model, cfg.eos_token_ids)
    eos = tok.eos_token_ids[0]
    pairs = dpo.pairs_for(cfg, tok, eos, setup.vocab_size(mod.meta), EXPERIMENTS)
    d, n = cfg.dpo_config, len(pairs.prompts)
    w0 = initial_weights(root)
    want = [np.zeros(w.shape, np.float32) for w in w0]
    for k, weights in enumerate((w0, deltas.weights_at(root / "dense", 1))):
        idx = dpo.order_for(k, n, d.batch_size, cfg.seed)
        ids, mask = dpo.batch_rows(pairs, idx, T, eos)
        ref = to_host(mod("sequence_logps", *w0, ids, mask)[0])  # the reference: θ_0's log-probs
        out = mod("dpo_value_and_grad", *weights, ids, mask, ref.astype(np.float32),
                  np.asarray(loss_type_weights(d.loss_type), np.float32), np.float32(d.beta))
        for acc, g in zip(want, out[3:]):
            acc += np.square(to_host(g))
    index = deltas.read_index(root / "dense")
    assert index["fisher"]["batches"] == 2 and index["fisher"]["steps"] == [1, 2]
    summed = load_file(str(root / "dense" / "deltas" / "fisher.safetensors"))
    for name, w in zip(index["names"], want):
        np.testing.assert_allclose(summed[name], w, rtol=1e-5, atol=1e-12 + 1e-6 * float(w.max()), err_msg=name)
    assert all(float(w.max()) > 0 for w in want[:-1])  # real gradients, not zeros
    found, record = masks.find(root / "dense", "fisher", 95.0, None)
    assert record["target_step"] == 2 and 0.05 <= record["density"] < 0.07


def test_a_sparse_run_resumes_exactly(toy):
    root, raw = toy
    path = mask_file(root, 95.0, 20)
    a = copy.deepcopy(raw)
    a["mask"] = str(path)
    a["dpo_config"]["max_steps"] = 12
    run(root, a, "full12")
    a["dpo_config"]["max_steps"] = 6
    run(root, a, "half")
    a["dpo_config"]["max_steps"] = 12
    run(root, a, "half", resume=True)
    x = checkpoint.load(checkpoint.path_in(root / "full12"), "dpo").state
    y = checkpoint.load(checkpoint.path_in(root / "half"), "dpo").state
    for k in ("params", "m", "v"):
        for p, q in zip(x[k], y[k]):
            assert np.array_equal(p, q), k


def test_a_mask_of_another_model_is_refused(toy, tmp_path):
    root, raw = toy
    bad = {"model.embed_tokens.weight": np.ones((3, 3), np.uint8)}
    path = masks.save(tmp_path / "other", bad, {})
    sparse = copy.deepcopy(raw)
    sparse["mask"] = str(path)
    with pytest.raises(UserError, match="the mask does not fit the training module's weights"):
        run(root, sparse, "bad")
    sparse["mask"] = str(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="mask: .*missing.safetensors not found"):
        run(root, sparse, "bad2")
    sparse["peft"] = {"type": "lora"}
    with pytest.raises(UserError, match="mask and peft"):
        run(root, sparse, "bad3")


@pytest.mark.parametrize("hyper", [
    {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1},  # nanoGPT-style, with decay
    {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},  # the RL default
], ids=["decay", "rl-default"])
def test_the_compiled_sparse_step_is_dense_adamw_restricted_to_the_mask(tmp_path, hyper):
    """20 steps of the compiled sparse step against dense AdamW (kernels/sparse.py's arithmetic, eager, over every
    entry, given the masked gradient) kept only on the mask: bit for bit, weights and moments. Dense AdamW would
    decay and move frozen weights; the sparse step never writes them. Exact because the step's bias corrections
    are runtime values computed as the reference computes them and its module is compiled without FMA
    (mlir/compile.exact_fp_flags); with FMA contraction, 255 of 308 updated weights differed after 20 steps.
    Halfway the step is handed new weight buffers, whose masked entries it gathers again."""
    import torch

    from pcpc.kernels.sparse import sparse_adamw_reference
    from pcpc.mlir.build import build
    from pcpc.mlir.compile import exact_fp_flags
    from pcpc.mlir.signature import TensorSpec
    from pcpc.mlir.targets import sparse_target
    from pcpc.runtime.module import CompiledModule, to_host
    from pcpc.runtime.rl.sparse import SparseOptimizer, layout

    if not exact_fp_flags():
        pytest.skip("no FMA-free llvm-cpu target on this architecture: the step contracts a * b + c")
    rng = np.random.default_rng(0)
    specs = [TensorSpec("a.weight", "param", (64, 48), "float32"), TensorSpec("a.bias", "param", (64,), "float32"),
             TensorSpec("b.weight", "param", (64, 48), "float32"), TensorSpec("c.weight", "param", (64, 48), "float32")]
    mask = {s.name: rng.random(s.shape) < 0.1 for s in specs}
    mask["b.weight"][:] = False  # a tensor the mask leaves out entirely
    mask["c.weight"] = mask["a.weight"].copy()
    mask["c.weight"][0, :5] = ~mask["c.weight"][0, :5]  # another count, the same padded length: one group
    tensors, groups = layout(mask, specs, "test")
    assert [g.members for g in groups] == [[0, 3], [1]]  # b.weight: nothing to train, no group
    assert [t.decay for t in tensors] == [True, False, True, True]
    mod = CompiledModule(build(sparse_target("sparse-test", [g.key for g in groups], {**hyper, "grad_clip": 0.0}),
                               tmp_path).vmfb)
    opt = SparseOptimizer(mod, tensors, groups)

    P0 = [rng.standard_normal(s.shape).astype(np.float32) for s in specs]
    P, M, V = mod.upload_all(P0), opt.upload_state(opt.zeros()), opt.upload_state(opt.zeros())
    DP = [torch.from_numpy(p.reshape(-1).copy()) for p in P0]
    DM, DV = ([torch.zeros(p.size) for p in P0] for _ in range(2))
    for step in range(1, 21):
        if step == 11:  # other weight buffers (a resumed policy): the step must read them, not what it wrote last
            host = [to_host(p) for p in P]
            host[0] = host[0] + np.float32(0.5)
            P = mod.upload_all(host)
            DP[0] = torch.from_numpy(host[0].reshape(-1).copy())
        G = [rng.standard_normal(s.shape).astype(np.float32) for s in specs]
        opt.step(P, M, V, mod.upload_all(G), step, 1e-2)
        for i, (s, t) in enumerate(zip(specs, tensors)):
            new_p = DP[i].clone()
            masked_g = torch.from_numpy((G[i] * mask[s.name]).reshape(-1))
            sparse_adamw_reference(new_p, masked_g, torch.arange(new_p.numel()), DM[i], DV[i], step, 1e-2, **hyper,
                                   decay=t.decay)  # dense: every entry
            DP[i] = torch.where(torch.from_numpy(mask[s.name].reshape(-1)), new_p, DP[i])  # kept only on the mask
    for i, t in enumerate(tensors):
        got = to_host(P[i]).reshape(-1)
        assert np.array_equal(got.view(np.uint32), DP[i].numpy().view(np.uint32)), t.name  # in and out of the mask
        if t.n:
            sel = t.idx[:t.n]
            assert np.array_equal(to_host(M[t.group])[t.row, :t.n], DM[i].numpy()[sel]), t.name
            assert np.array_equal(to_host(V[t.group])[t.row, :t.n], DV[i].numpy()[sel]), t.name
    assert np.array_equal(to_host(P[2]), P0[2])


def test_the_sparse_steps_norm_is_the_masked_gradients(tmp_path):
    """grad returns each group's masked gradient, gathered, and its part of the clip norm: against numpy in float64,
    for a group summed in rows of 1024 (K a multiple of 1024) and one summed whole, padded entries left out."""
    from pcpc.mlir.build import build
    from pcpc.mlir.signature import TensorSpec
    from pcpc.mlir.targets import sparse_target
    from pcpc.runtime.module import CompiledModule, to_host
    from pcpc.runtime.rl.sparse import SparseOptimizer, layout

    rng = np.random.default_rng(1)
    specs = [TensorSpec("a.weight", "param", (64, 256), "float32"),
             TensorSpec("b.weight", "param", (40, 30), "float32")]
    mask = {"a.weight": np.zeros((64, 256), bool), "b.weight": rng.random((40, 30)) < 0.1}
    mask["a.weight"].reshape(-1)[rng.choice(64 * 256, 4096, replace=False)] = True  # K = 4096, no padding
    tensors, groups = layout(mask, specs, "test")
    assert groups[0].K == 4096 and groups[1].K % 1024 and groups[1].K > tensors[1].n  # padded
    mod = CompiledModule(build(sparse_target("sparse-norm", [g.key for g in groups], {}), tmp_path).vmfb)
    opt = SparseOptimizer(mod, tensors, groups)
    G = [rng.standard_normal(s.shape).astype(np.float32) * 3 for s in specs]
    *gathered, sumsq = mod("grad", *mod.upload_all(G), *opt.idx, *opt.n)
    for j, (t, g) in enumerate(zip(tensors, G)):
        assert np.array_equal(to_host(gathered[j])[0], g.reshape(-1)[t.idx])
        want = float(np.sum(g.reshape(-1)[t.idx[:t.n]].astype(np.float64) ** 2))
        assert abs(float(to_host(sumsq)[j]) - want) <= 1e-6 * want, t.name


def test_groups_fit_each_targets_binding_limit():
    """A group's grad dispatch binds 2 buffers a member + 1 in one dispatch: 8 members on llvm-cpu (IREE allows 32
    bindings there), 6 on GPU targets (16 on cuda; 8 failed to load on an H200)."""
    from pcpc.mlir.signature import TensorSpec
    from pcpc.runtime.rl.sparse import layout

    specs = [TensorSpec(f"w{i}", "param", (16, 16), "float32") for i in range(20)]
    mask = {s.name: np.eye(16, dtype=bool) for s in specs}  # one shape, one nnz: all may share a group
    for target, size in (("llvm-cpu", 8), ("cuda", 6), ("rocm", 6), ("vulkan", 6)):
        tensors, groups = layout(mask, specs, "test", target)
        assert [len(g.members) for g in groups] == [size] * (20 // size) + [20 % size]
        assert sorted(i for g in groups for i in g.members) == list(range(20))


def test_the_sparse_module_compiles_for_cuda_within_its_binding_limit(tmp_path):
    """Each group stays its own dispatches inside the functions over every group: compiled for cuda (no GPU
    needed), no dispatch binds more than the 16 buffers IREE's cuda HAL allows. Vectors with one masked entry
    each are what IREE fuses whole (a group of 6 into one 13-buffer dispatch; 14 in one group made 29)."""
    import re
    import subprocess

    from pcpc.mlir.build import build
    from pcpc.mlir.compile import compile_flags, iree_compile_exe
    from pcpc.mlir.signature import TensorSpec
    from pcpc.mlir.targets import sparse_target
    from pcpc.runtime.rl.sparse import layout

    rng = np.random.default_rng(0)
    specs = [TensorSpec(f"b{i}", "param", (128,), "float32") for i in range(14)]
    specs.append(TensorSpec("w", "param", (32, 16), "float32"))
    mask = {s.name: np.eye(1, s.shape[0], i, dtype=bool)[0] for i, s in enumerate(specs[:14])}
    mask["w"] = rng.random((32, 16)) < 0.2
    _, groups = layout(mask, specs, "test", "cuda")
    assert [len(g.members) for g in groups] == [6, 6, 2, 1]
    result = build(sparse_target("sparse-cuda", [g.key for g in groups], {}), tmp_path, compile_target="cuda",
                   arch="sm_80")
    assert result.vmfb.stat().st_size > 0
    dump = tmp_path / "executables"
    subprocess.run([iree_compile_exe(), str(tmp_path / "sparse-cuda.mlir"), *compile_flags("cuda", "sm_80"),
                    "--compile-to=executable-sources", f"--iree-hal-dump-executable-sources-to={dump}",
                    "-o", str(tmp_path / "sources.mlir")], check=True, capture_output=True)
    counts = [len(re.findall(r"hal\.interface\.binding\.subspan", f.read_text())) for f in dump.glob("*.mlir")]
    assert 13 <= max(counts) <= 16, sorted(counts)[-3:]
