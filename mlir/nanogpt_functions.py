"""The functions a nanoGPT module exports, built from a recipe config.

Config keys (all JSON): model (preset name), model_overrides (dict),
batch_size, eval_batch_size, optimizer (AdamWConfig fields), functions (subset
of FUNCTIONS). Every function takes all weights first, in
`nanogpt.param_shapes` order; then optimizer state; then scalars; then data.

    forward_loss   (*params, x, y) -> loss
    value_and_grad (*params, x, y) -> loss, *grads
    train_step     (*params, *m, *v, step, lr, x, y) -> loss, *params', *m', *v'
    adamw_step     (*params, *m, *v, *grads, step, lr) -> grad_norm, *params', *m', *v'   (all-reduced grads)
    eval_loss      (*params, x, y) -> loss                 (eval_batch_size rows)
    outer_step     (*params, *momentum, *delta, lr, mu) -> *params', *momentum'
    logits         (*params, idx) -> logits                (1 row of block_size, for sampling)
x, y, idx are int64 (B, block_size); step, lr, mu are f32 scalars.

With a `peft` section (exporters/peft.py's module section; every method but adalora) the parameters are
the adapter's trainable tensors, and the base model's weights (then VeRA's shared projections) are frozen
inputs after the scalars, before the data: no gradient, no optimizer state, never returned. outer_step then
steps the adapter alone, so DiLoCo all-reduces only the adapter's pseudo-gradient:

    train_step     (*adapter, *m, *v, step, lr, *frozen, x, y) -> loss, *adapter', *m', *v'
    eval_loss      (*adapter, *frozen, x, y) -> loss
    logits         (*adapter, *frozen, idx) -> logits

A model with Mixture-of-Experts blocks trains on loss = ce + aux_loss_coef * aux
+ z_loss_coef * z (exporters/nanogpt.py), and value_and_grad / train_step
return the parts right after the loss, in the same forward:

    value_and_grad (*params, x, y) -> loss, ce, aux, z, expert_load (MoE blocks, E), *grads
    train_step     (...)           -> loss, ce, aux, z, expert_load, *params', *m', *v'
forward_loss and eval_loss stay the language-model cross-entropy (comparable
across models).
"""

from __future__ import annotations

from pcpc.autodiff import derive
from pcpc.autodiff.losses import cross_entropy
from pcpc.autodiff.optim import AdamWConfig
from pcpc.config import from_dict
from pcpc.exporters import nanogpt, peft
from pcpc.mlir.lower import Composite, ExportFunction
from pcpc.mlir.signature import TensorSpec


FUNCTIONS = ("forward_loss", "value_and_grad", "train_step", "adamw_step", "eval_loss", "outer_step", "logits")

def model_config(config: dict) -> nanogpt.NanoGPTConfig:
    return nanogpt.make_config(config["model"], **config.get("model_overrides", {}))


def adapted_linear(weights: dict, cfg: nanogpt.NanoGPTConfig, pcfg):
    """The blocks' Linear with the adapter of `weights` added (None: the plain one)."""
    if pcfg is None:
        return None
    return peft.linear_fn(weights, pcfg, base=lambda p, name, x, bias=True: nanogpt._linear(p, name, x, cfg))


def make_loss(cfg: nanogpt.NanoGPTConfig, pcfg=None):
    """loss_fn(params, x, y) -> cross-entropy."""
    def loss_fn(params, x, y):
        return cross_entropy(nanogpt.forward(params, x, cfg, adapted_linear(params, cfg, pcfg)), y)

    return loss_fn


MOE_STATS = ("ce", "aux", "z", "expert_load")
"""What a MoE model's value_and_grad and train_step return right after the loss."""


def make_moe_loss(cfg: nanogpt.NanoGPTConfig, pcfg=None):
    """loss_fn(params, x, y) -> (loss, ce, aux, z, expert_load): the training loss of a model with experts."""
    m = cfg.moe

    def loss_fn(params, x, y):
        logits, aux, z, load = nanogpt.forward_with_aux(params, x, cfg, adapted_linear(params, cfg, pcfg))
        ce = cross_entropy(logits, y)
        return ce + m.aux_loss_coef * aux + m.z_loss_coef * z, ce.detach(), aux.detach(), z.detach(), load.detach()

    return loss_fn


def _specs(prefix: str, role: str, shapes: dict) -> list[TensorSpec]:
    return [TensorSpec(prefix + n, role, tuple(s), "float32") for n, s in shapes.items()]


def build(config: dict) -> tuple[list[ExportFunction], list[TensorSpec]]:
    """ExportFunctions for the requested functions, and the parameter specs in order."""
    cfg = model_config(config)
    opt = from_dict(AdamWConfig, config.get("optimizer", {}), where="optimizer")
    wanted = config.get("functions", list(FUNCTIONS))
    bad = [f for f in wanted if f not in FUNCTIONS]
    if bad:
        raise ValueError(f"unknown nanogpt functions {bad}; valid: {', '.join(FUNCTIONS)}")
    pcfg = peft.from_config(config.get("peft"), where="peft")
    if pcfg is not None and pcfg.type == "adalora":
        raise ValueError("peft.type adalora: its rank allocator needs every step's gradients, which a fused "
                         "nanoGPT train_step does not return; use another method")
    base_shapes = nanogpt.param_shapes(cfg)
    frozen = []
    if pcfg is None:
        shapes = base_shapes
    else:
        shapes, shared = peft.shapes(cfg, pcfg)
        frozen = _specs("", "frozen", base_shapes) + _specs("", "frozen", shared)
    names, nf = list(shapes), len(frozen)
    # nanoGPT's rule: decay the matrices and embeddings, not biases and norms; a stack of experts'
    # biases (E, out) is still biases
    decay = [len(s) >= 2 and not n.endswith(".bias") for n, s in shapes.items()]
    lr_scale = peft.lr_scales(names, pcfg) if pcfg is not None else None

    def with_frozen(loss_fn):
        """loss(trained, *frozen, *data): the frozen weights are inputs that get no gradient."""
        if not frozen:
            return loss_fn
        return lambda params, *rest: loss_fn({**params, **dict(zip((f.name for f in frozen), rest[:nf]))},
                                             *rest[nf:])

    loss_fn = with_frozen(make_loss(cfg, pcfg))
    moe = bool(cfg.moe_layers)
    train_loss = with_frozen(make_moe_loss(cfg, pcfg)) if moe else loss_fn
    stats = [("ce", "loss"), ("aux", "loss"), ("z", "loss"), ("expert_load", "output")] if moe else []
    P = _specs("", "param", shapes)
    M, V = _specs("m.", "optimizer_state", shapes), _specs("v.", "optimizer_state", shapes)
    T = cfg.block_size

    def batch(rows):
        return frozen + [TensorSpec("x", "data", (rows, T), "int64"), TensorSpec("y", "data", (rows, T), "int64")]

    def scalar(name):
        return TensorSpec(name, "scalar", (), "float32")

    def out(specs, role=None):
        return [(s.name, role or s.role) for s in specs]

    def logits_of(weights, idx):
        return nanogpt.forward(weights, idx, cfg, adapted_linear(weights, cfg, pcfg))

    B, EB = config["batch_size"], config.get("eval_batch_size", config["batch_size"])
    n = len(names)
    forward_loss = derive.forward_loss_fn(loss_fn, names)  # one function: eval_loss at batch B is its graph
    vg = ExportFunction(
        "value_and_grad",
        derive.value_and_grad_fn(train_loss, names, has_aux=moe),
        P + batch(B),
        [("loss", "loss")] + stats + [("grad." + name, "grad") for name in names],
    )
    update = ExportFunction(
        "adamw_step",
        derive.adamw_step_fn(n, decay, opt, lr_scale),
        P + M + V + _specs("grad.", "data", shapes) + [scalar("step"), scalar("lr")],
        [("grad_norm", "output")] + out(P) + out(M) + out(V),
    )
    # train_step = value_and_grad, then adamw_step on its gradients: lower() splices the two graphs
    # (each traced once) instead of tracing forward and backward a second time
    def arg(*indices):  # train_step's arguments: P, M, V (3n), step, lr, frozen (nf), x, y
        return tuple((-1, i) for i in indices)

    k = 1 + len(stats)  # value_and_grad's results: loss, stats, then the gradients
    train_step = Composite(
        calls=((vg, arg(*range(n), *range(3 * n + 2, 3 * n + 4 + nf))),
               (update, arg(*range(3 * n)) + tuple((0, k + i) for i in range(n)) + arg(3 * n, 3 * n + 1))),
        returns=tuple((0, i) for i in range(k)) + tuple((1, 1 + i) for i in range(3 * n)),  # adamw_step's less the norm
    )
    momentum = _specs("momentum.", "optimizer_state", shapes)
    fns = [
        ExportFunction("forward_loss", forward_loss, P + batch(B), [("loss", "loss")]),
        vg,
        ExportFunction("train_step", train_step, P + M + V + [scalar("step"), scalar("lr")] + batch(B),
                       [("loss", "loss")] + stats + out(P) + out(M) + out(V)),
        update,
        ExportFunction("eval_loss", forward_loss, P + batch(EB), [("loss", "loss")]),
        ExportFunction("outer_step", derive.outer_step_fn(n),
                       P + momentum + _specs("delta.", "data", shapes) + [scalar("lr"), scalar("mu")],
                       out(P) + out(momentum)),
        ExportFunction("logits",
                       lambda *flat: logits_of(dict(zip(names + [f.name for f in frozen], flat[:-1])), flat[-1]),
                       P + frozen + [TensorSpec("idx", "data", (1, T), "int64")], [("logits", "output")]),
    ]
    by_name = {f.name: f for f in fns}
    return [by_name[f] for f in wanted], P
