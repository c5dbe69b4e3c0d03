"""The functions a Qwen2 RL training module (GRPO / DPO) exports, built from a recipe config.

Config keys (all JSON):
    model, hf_config, model_overrides   the model, as in mlir/qwen_functions.py
    batch_size             B, rows per call (GRPO: num_prompts * group_size; DPO: 2 * pairs)
    seq_len                T, tokens per row (prompt + completion, right-padded)
    completion_len         C, the most completion tokens a row holds (default T - 1): every function that scores
                           rows runs the head and log-softmax on the C positions from each row's first
                           completion target only (autodiff/grpo.py completion_window), not on all T - 1
    shared_prefix          [G, P]: rows that hold one prompt agree on their first P tokens (P <= the prompt's
                           length), and the functions compute those positions once per prompt (qwen2.forward):
                           token_logprobs and grpo_value_and_grad for groups of G consecutive rows (a GRPO
                           group); sequence_logps and dpo_value_and_grad, with G = 2, for a pair's chosen and
                           rejected rows (i and B/2 + i)
    optimizer              AdamWConfig fields (defaults: TRL's betas 0.9/0.999, no weight decay, clip 1.0)
    functions              subset of FUNCTIONS (default: all)
    peft                   an adapter (exporters/peft.py PeftConfig fields): train it, not the weights
    resident               true: the weights are parameter-backed module globals (a GRPO run's frozen reference,
                           packed once per weight file instead of on every call; mlir/targets.py
                           reference_target); only token_logprobs and sequence_logps, without an adapter
    compute_dtype          "float32" (default) or "bfloat16": the projections' and the LM head's products in
                           bf16 over the fp32 weights (mixed precision, as torch's CPU autocast; qwen2._matmul),
                           for CPUs with avx512_bf16; without an adapter

Every function takes all weights first (qwen2.param_shapes order), then
optimizer state, then scalars, then data. Rows are laid out
[prompt][completion][padding] from position 0; L = T - 1 token positions
(log p of token t+1 given tokens 0..t).

    token_logprobs      (*P, ids (B,T) i64, mask (B,L) f32, temperature) -> logp (B,L), 0 outside the
                        rows' completion windows (mask: 1 on completion targets, as grpo's)
    sequence_logps      (*P, ids, mask (B,L) f32) -> (B,) sum of masked token log-probs (mask within C)
    grpo_value_and_grad (*P, <grpo data>) -> loss, kl, clip_ratio, low_clip, high_clip, *grads
    dpo_value_and_grad  (*P, <dpo data>) -> loss, chosen_rewards (B/2,), rejected_rewards (B/2,), *grads
    grad_clip_coef      (*grads) -> coef: min(1, max_grad_norm / (global norm + 1e-6)); 1 without clipping
    adamw_K             (*p, *g, *m, *v, step, lr, coef) -> *p', *m', *v'  AdamW on one chunk of kind K
    adamw_inplace_K     (*p, *g, *m, *v, step, lr, coef) -> coef   the same AdamW, p, m and v written in place
                        (not in FUNCTIONS: the optimizer module of optimizer_target, see mlir/targets.py)
    outer_K             (*p, *b, *local, lr, mu) -> *p', *b'  Nesterov on one chunk of kind K, on the
                        pseudo-gradient delta = p - local (the learner's update of the iteration):
                        b <- mu b + delta; p <- p - lr (delta + mu b)

The optimizer works chunk by chunk (autodiff/optim.update_groups: one
transformer block, or one other parameter, per call; chunks of a kind K share
a function), so at 0.5B its transients are one block (~60 MB), not a second
and third copy of the weights and moments; runtime/rl/update.py drives it.
The recipe's "adamw" and "outer" name all the adamw_K / outer_K functions.

<grpo data> = ids (B,T) i64, mask (B,L) f32 (1 on completion targets),
    advantages (B,), old_logp (B,L), ref_logp (B,L), loss_type (3,) f32
    (one-hot over grpo, dapo, dr_grpo), beta, eps_low, eps_high, temperature,
    max_completion_length (the dr_grpo normaliser), use_old (0/1: 0 takes the
    current log-probs, detached, as the old policy's — TRL's single-update
    case — and saves a forward pass), bias_correction_kl (0/1: 1 multiplies
    the per-token KL by the importance ratio exp(logp - old_logp), TRL's
    default use_bias_correction_kl=True; the ratio is differentiable, so this
    changes the gradient even with use_old 0; kl is then the corrected one).
<dpo data> = ids (B,T) i64 (chosen rows, then rejected rows), mask (B,L) f32,
    ref_logps (B,) (the reference's sequence_logps: per-row SUMS of masked
    token log-probs, for every loss type; ipo divides the log-ratios by the
    row's mask count inside), loss_type (3,) f32 (one-hot over sigmoid, ipo,
    hinge), beta. chosen_rewards / rejected_rewards = beta * (policy sum -
    ref sum), as TRL logs them, for every loss type.
Loss types and hyperparameters are inputs, so one module per shape serves
every GRPO / DPO configuration.

With `peft`, *P is the adapter's trainable tensors (the module's parameters:
gradients, AdamW and outer chunks are theirs) followed by the frozen inputs:
the base model's weights (role "frozen", param_specs order) and the adapter's
shared tensors (VeRA's projections). The gradient functions of an adapter module
trace with autodiff/derive.py ADAPTER_DECOMPOSITIONS: a frozen weight's input
gradient with a long output (the tied lm_head, gate/up) as a sum of block products. Also exported:
    merge_K             (*adapter chunk, *its modules' base weights, *shared) -> the merged weights of those
                        modules (the rollouts' weights), one function per chunk kind
Gradients are derived by pcpc.autodiff.derive (torch.func), never written by hand.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from pcpc.autodiff import derive
from pcpc.autodiff.dpo import LOSS_TYPES as DPO_LOSS_TYPES, dpo_loss, sequence_logps
from pcpc.autodiff.grpo import LOSS_TYPES as GRPO_LOSS_TYPES, completion_window, grpo_loss, token_logprobs, \
    window_logprobs
from pcpc.autodiff.optim import AdamWConfig, adamw, clip_coef, generic_name, nesterov_outer, update_groups
from pcpc.config import from_dict
from pcpc.exporters import peft, qwen2
from pcpc.exporters.precision import COMPUTE_DTYPES
from pcpc.mlir.lower import ExportFunction
from pcpc.mlir.qwen_functions import model_config, param_specs
from pcpc.mlir.signature import TensorSpec

FUNCTIONS = ("token_logprobs", "sequence_logps", "grpo_value_and_grad", "dpo_value_and_grad", "grad_clip_coef",
             "adamw", "outer", "merge")
KEYS = ("model", "hf_config", "model_overrides", "batch_size", "seq_len", "completion_len", "shared_prefix",
        "optimizer", "functions", "peft", "resident", "compute_dtype")
RL_OPTIMIZER = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0}
"""AdamW defaults for RL fine-tuning (TRL / transformers TrainingArguments defaults)."""


def full_logits(cfg: qwen2.Qwen2Config):
    """logits_of(params, ids, head_rows=None) of the whole model (full fine-tuning: every weight is trained)."""
    return lambda params, ids, head_rows=None: qwen2.forward(params, ids, None, cfg, head_rows=head_rows)


def completion_logprobs(logits_of, params, ids, mask, temperature, width: int | None):
    """(B, L) token log-probs of the completions: with `width` (< L) the head runs on each row's completion
    window only and the rest is 0; without, on every position."""
    if width is None or width >= ids.shape[1] - 1:
        return token_logprobs(logits_of(params, ids), ids, temperature)
    sel = completion_window(mask, width)  # (B, width, L)
    return window_logprobs(logits_of(params, ids, sel), ids, sel, temperature)


def make_grpo_loss(cfg: qwen2.Qwen2Config, logits_of=None, completion_len: int | None = None):
    """loss_fn(params, <grpo data>) -> (loss, kl, clip_ratio, low_clip, high_clip)."""
    logits_of = logits_of or full_logits(cfg)

    def loss_fn(params, ids, mask, advantages, old_logp, ref_logp, loss_type, beta, eps_low, eps_high,
                temperature, max_completion_length, use_old, bias_correction_kl):
        logp = completion_logprobs(logits_of, params, ids, mask, temperature, completion_len)  # (B, L)
        old = torch.where(use_old > 0, old_logp, logp.detach())
        ref = torch.where(beta > 0, ref_logp, logp.detach())  # beta 0: no reference model, kl 0, no NaN
        return grpo_loss(logp, old, ref, advantages, mask, beta, eps_low, eps_high, loss_type,
                         max_completion_length, bias_correction_kl)

    return loss_fn


def make_dpo_loss(cfg: qwen2.Qwen2Config, logits_of=None, completion_len: int | None = None):
    """loss_fn(params, <dpo data>) -> (loss, chosen_rewards, rejected_rewards)."""
    logits_of = logits_of or full_logits(cfg)

    def loss_fn(params, ids, mask, ref_logps, loss_type, beta):
        seq = sequence_logps(completion_logprobs(logits_of, params, ids, mask, 1.0, completion_len), mask)  # (2P,)
        tokens = mask.sum(-1)  # (2P,) ipo's per-token means divide by these
        n = seq.shape[0] // 2
        return dpo_loss(seq[:n], seq[n:], ref_logps[:n], ref_logps[n:], beta, loss_type, tokens[:n], tokens[n:])

    return loss_fn


def weight_specs(cfg: qwen2.Qwen2Config, pcfg) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(trained, frozen) weight specs: every weight trained, none frozen; or, with an adapter, its trainable
    tensors trained and the base model's weights (then VeRA's projections) frozen."""
    base = param_specs(cfg)
    if pcfg is None:
        return base, []
    train, x = peft.shapes(cfg, pcfg)
    return ([TensorSpec(k, "param", s, "float32") for k, s in train.items()],
            [replace(p, role="frozen") for p in base] + [TensorSpec(k, "frozen", s, "float32") for k, s in x.items()])


def check_config(config: dict) -> None:
    unknown = sorted(set(config) - set(KEYS))
    if unknown:
        raise ValueError(f"rl recipe: unknown keys {unknown}; valid: {', '.join(KEYS)}")
    for key in ("batch_size", "seq_len"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise ValueError(f"rl recipe: {key} must be a positive integer, got {config.get(key)!r}")
    if config["seq_len"] < 2:
        raise ValueError("rl recipe: seq_len must be >= 2")
    width = config.get("completion_len")
    if width is not None and (not isinstance(width, int) or not 1 <= width <= config["seq_len"] - 1):
        raise ValueError(f"rl recipe: completion_len must be an integer in 1..seq_len - 1 "
                         f"({config['seq_len'] - 1}), got {width!r}")
    shared = config.get("shared_prefix")
    if shared is not None and not (isinstance(shared, (list, tuple)) and len(shared) == 2
                                   and all(isinstance(x, int) for x in shared) and shared[0] >= 1
                                   and config["batch_size"] % shared[0] == 0 and 1 <= shared[1] < config["seq_len"]):
        raise ValueError(f"rl recipe: shared_prefix must be [G, P] with G dividing batch_size "
                         f"({config['batch_size']}) and P in 1..seq_len - 1 ({config['seq_len'] - 1}), got {shared!r}")
    if shared is not None and shared[0] != 2 and any(f.startswith(("dpo", "sequence")) for f in
                                                     config.get("functions", FUNCTIONS)):
        raise ValueError(f"rl recipe: shared_prefix with DPO functions must be [2, P] (a pair's two rows), "
                         f"got {shared!r}")
    bad = [f for f in config.get("functions", ()) if f not in FUNCTIONS + ("adamw_inplace",)]
    if bad:
        raise ValueError(f"rl recipe: unknown functions {bad}; valid: {', '.join(FUNCTIONS)}")
    wanted = config.get("functions", FUNCTIONS)
    if config.get("resident") and (config.get("peft") or not set(wanted) <= {"token_logprobs", "sequence_logps"}):
        raise ValueError(f"rl recipe: resident (weights as module parameters) is for token_logprobs and "
                         f"sequence_logps without peft, got functions {list(wanted)}"
                         f"{' and peft' if config.get('peft') else ''}")
    dtype = config.get("compute_dtype", "float32")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"rl recipe: compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    if dtype != "float32" and config.get("peft"):
        raise ValueError(f"rl recipe: compute_dtype {dtype} is for full fine-tuning; an adapter's module "
                         f"computes in float32")
    if any(f.startswith("dpo") for f in wanted) and config["batch_size"] % 2:
        raise ValueError("rl recipe: DPO functions need an even batch_size (chosen rows, then rejected rows)")


def build(config: dict) -> tuple[list[ExportFunction], list[TensorSpec]]:
    """ExportFunctions for the requested functions, and the parameter specs in order."""
    check_config(config)
    cfg = model_config(config)
    B, T = config["batch_size"], config["seq_len"]
    L = T - 1
    width = config.get("completion_len")
    opt = from_dict(AdamWConfig, {**RL_OPTIMIZER, **config.get("optimizer", {})}, where="optimizer")
    pcfg = peft.from_config(config.get("peft"), where="peft")
    P, frozen = weight_specs(cfg, pcfg)  # P: the trained weights (the module's parameters); frozen: inputs only
    names, all_names = [p.name for p in P], [p.name for p in P + frozen]
    n, nw, nf = len(names), len(P) + len(frozen), len(frozen)
    W = P + frozen

    shared = tuple(config["shared_prefix"]) if config.get("shared_prefix") else None

    dtype = config.get("compute_dtype", "float32")
    compute = None if dtype == "float32" else COMPUTE_DTYPES[dtype]  # None: each product in its weight's dtype

    def logits_of(weights: dict, ids, head_rows=None, shared_prefix=None):
        linear = partial(qwen2._linear, compute_dtype=compute) if pcfg is None else peft.linear_fn(weights, pcfg)
        return qwen2.forward(weights, ids, None, cfg, linear=linear, head_rows=head_rows, shared_prefix=shared_prefix,
                             compute_dtype=compute)

    def grpo_logits_of(weights: dict, ids, head_rows=None):  # GRPO rows: a group's completions share its prompt
        return logits_of(weights, ids, head_rows, shared)

    def dpo_logits_of(weights: dict, ids, head_rows=None):
        """DPO rows: the chosen rows, then the rejected; pair i (rows i and n + i) holds one prompt. The
        forward takes each pair's rows side by side (groups of 2), the logits go back in the callers' order."""
        if shared is None:
            return logits_of(weights, ids, head_rows)
        n = ids.shape[0] // 2

        def pairs(t):  # (2n, ...) -> (2n, ...): rows i, n + i next to each other
            return t.view(2, n, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

        out = logits_of(weights, pairs(ids), None if head_rows is None else pairs(head_rows), shared)
        return out.view(n, 2, *out.shape[1:]).transpose(0, 1).reshape(out.shape)

    def with_frozen(loss_fn):
        """loss(trained, *frozen, *data): the frozen weights are inputs that get no gradient; AdaLoRA adds its
        orthogonality penalty on the trained A and B to the loss."""
        def loss(params, *rest):
            out = loss_fn({**params, **dict(zip(all_names[n:], rest[:nf]))}, *rest[nf:])
            if pcfg is not None and pcfg.type == "adalora" and pcfg.orth_reg_weight > 0:
                out = (out[0] + peft.orth_penalty(params, pcfg), *out[1:])
            return out
        return loss

    def scalar(name):
        return TensorSpec(name, "scalar", (), "float32")

    def f32(name, shape):
        return TensorSpec(name, "data", shape, "float32")

    ids = TensorSpec("ids", "data", (B, T), "int64")
    mask = f32("mask", (B, L))
    grpo_data = [ids, mask, f32("advantages", (B,)), f32("old_logp", (B, L)), f32("ref_logp", (B, L)),
                 f32("loss_type", (len(GRPO_LOSS_TYPES),)), scalar("beta"), scalar("eps_low"), scalar("eps_high"),
                 scalar("temperature"), scalar("max_completion_length"), scalar("use_old"),
                 scalar("bias_correction_kl")]
    grpo_stats = [("loss", "loss"), ("kl", "output"), ("clip_ratio", "output"), ("low_clip", "output"),
                  ("high_clip", "output")]
    dpo_data = [ids, mask, f32("ref_logps", (B,)), f32("loss_type", (len(DPO_LOSS_TYPES),)), scalar("beta")]
    dpo_stats = [("loss", "loss"), ("chosen_rewards", "output"), ("rejected_rewards", "output")]
    grads = [("grad." + nm, "grad") for nm in names]
    grad_specs = [TensorSpec("grad." + p.name, "data", p.shape, "float32") for p in P]

    def logprobs(*flat):
        ids_, mask_, temperature = flat[nw:]
        return completion_logprobs(grpo_logits_of, dict(zip(all_names, flat[:nw])), ids_, mask_, temperature, width)

    def seq_logps(*flat):
        x, m = flat[nw], flat[nw + 1]
        return sequence_logps(completion_logprobs(dpo_logits_of, dict(zip(all_names, flat[:nw])), x, m, 1.0, width),
                              m)

    def coef(*flat):
        return clip_coef(list(flat), opt.grad_clip) if opt.grad_clip > 0 else torch.ones((), dtype=torch.float32)

    def chunk_functions(kind: int, idx: list[int]) -> list[ExportFunction]:
        """adamw_K and outer_K over the parameters idx (the first chunk of kind K)."""
        k = len(idx)
        specs = [TensorSpec(generic_name(P[i].name), "param", P[i].shape, "float32") for i in idx]

        def state(prefix, role):
            return [TensorSpec(prefix + s.name, role, s.shape, "float32") for s in specs]

        decay = [len(s.shape) >= 2 for s in specs]
        scale = peft.lr_scales([P[i].name for i in idx], pcfg) if pcfg else None

        def adamw_chunk(*flat):
            p, g, m, v = (list(flat[j * k:(j + 1) * k]) for j in range(4))
            step, lr, c = flat[4 * k:]
            new_p, new_m, new_v = adamw(p, g, m, v, step, lr, opt, decay, coef=c, lr_scale=scale)
            return (*new_p, *new_m, *new_v)

        def adamw_inplace_chunk(*flat):
            p, g, m, v = (list(flat[j * k:(j + 1) * k]) for j in range(4))
            step, lr, c = flat[4 * k:]
            new_p, new_m, new_v = adamw(p, g, m, v, step, lr, opt, decay, coef=c, lr_scale=scale)
            for old, new in zip(p + m + v, new_p + new_m + new_v):
                old.copy_(new)
            return c * 1.0

        def outer_chunk(*flat):
            p, b, local = (list(flat[j * k:(j + 1) * k]) for j in range(3))
            new_p, new_b = nesterov_outer(p, b, [x - y for x, y in zip(p, local)], flat[3 * k], flat[3 * k + 1])
            return (*new_p, *new_b)

        m, v, g = state("m.", "optimizer_state"), state("v.", "optimizer_state"), state("grad.", "data")
        mom, local = state("momentum.", "optimizer_state"), state("local.", "data")
        return [
            ExportFunction(f"adamw_{kind}", adamw_chunk, specs + g + m + v + [scalar("step"), scalar("lr"),
                                                                                scalar("coef")],
                           [(s.name, s.role) for s in specs + m + v]),
            ExportFunction(f"outer_{kind}", outer_chunk, specs + mom + local + [scalar("lr"), scalar("mu")],
                           [(s.name, s.role) for s in specs + mom]),
            ExportFunction(f"adamw_inplace_{kind}", adamw_inplace_chunk,
                           [replace(s, role="inplace") for s in specs] + g
                           + [replace(s, role="inplace") for s in m + v] + [scalar("step"), scalar("lr"), scalar("coef")],
                           [("coef", "output")], inplace=True),
        ]

    def merge_function(kind: int, idx: list[int]) -> ExportFunction:
        """merge_K (*adapter chunk, *its modules' base weights, *vera projections) -> the merged weights."""
        modules = list(dict.fromkeys(peft.module_of(P[i].name) for i in idx))
        at = {s.name: i for i, s in enumerate(frozen)}
        targets = [frozen[at[f"{m}.weight"]] for m in modules]
        xs = frozen[len(frozen) - len(peft.shapes(cfg, pcfg)[1]):]
        chunk = [TensorSpec(generic_name(P[i].name), "param", P[i].shape, "float32") for i in idx]
        target_specs = [TensorSpec(generic_name(t.name), "frozen", t.shape, t.dtype) for t in targets]

        def merge(*flat):
            k, t = len(idx), len(targets)
            tensors = {**dict(zip([P[i].name for i in idx], flat[:k])), **dict(zip([x.name for x in xs], flat[k + t:]))}
            return tuple(peft.merged(w, m, tensors, pcfg).contiguous() for w, m in zip(flat[k:k + t], modules))

        return ExportFunction(f"merge_{kind}", merge, chunk + target_specs + xs,
                              [(s.name, "output") for s in target_specs])

    grad_decompositions = derive.ADAPTER_DECOMPOSITIONS if pcfg else None
    firsts = {}
    for kind, idx in update_groups(names, [p.shape for p in P]):
        firsts.setdefault(kind, idx)
    chunked = [f for kind, idx in firsts.items() for f in chunk_functions(kind, idx)]

    n_globals = nw if config.get("resident") else 0  # the weights as module parameters, not call arguments
    fns = {
        "token_logprobs": lambda: [ExportFunction(
            "token_logprobs", logprobs, W + [ids, mask, scalar("temperature")], [("logp", "output")], n_globals)],
        "sequence_logps": lambda: [ExportFunction(
            "sequence_logps", seq_logps, W + [ids, mask], [("logps", "output")], n_globals)],
        "grpo_value_and_grad": lambda: [ExportFunction(
            "grpo_value_and_grad",
            derive.value_and_grad_fn(with_frozen(make_grpo_loss(cfg, grpo_logits_of, width)), names, has_aux=True),
            W + grpo_data, grpo_stats + grads, decompositions=grad_decompositions)],
        "dpo_value_and_grad": lambda: [ExportFunction(
            "dpo_value_and_grad",
            derive.value_and_grad_fn(with_frozen(make_dpo_loss(cfg, dpo_logits_of, width)), names, has_aux=True),
            W + dpo_data, dpo_stats + grads, decompositions=grad_decompositions)],
        "grad_clip_coef": lambda: [ExportFunction("grad_clip_coef", coef, grad_specs, [("coef", "output")])],
        "adamw": lambda: [f for f in chunked if f.name.startswith("adamw_") and "inplace" not in f.name],
        "outer": lambda: [f for f in chunked if f.name.startswith("outer_")],
        "adamw_inplace": lambda: [f for f in chunked if f.name.startswith("adamw_inplace_")],
        "merge": lambda: [merge_function(kind, idx) for kind, idx in firsts.items()] if pcfg else [],
    }
    return [f for name in config.get("functions", FUNCTIONS) for f in fns[name]()], P
