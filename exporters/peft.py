"""PEFT adapters as pure functions over tensors, with the HF `peft` library's definitions and file format.

An adapter is a dict of tensors keyed as peft saves them, less the `base_model.model.` prefix:

    model.layers.{i}.self_attn.q_proj.lora_A.weight        (r, in)     lora, lora_plus, dora, pissa, milora
    model.layers.{i}.self_attn.q_proj.lora_B.weight        (out, r)
    model.layers.{i}.self_attn.q_proj.lora_magnitude_vector (out,)     dora
    model.layers.{i}.self_attn.q_proj.vera_lambda_b        (out,)      vera (trainable)
    model.layers.{i}.self_attn.q_proj.vera_lambda_d        (r,)
    vera_A (r, max in), vera_B (max out, r)                           vera (shared, frozen, from projection_prng_key)
    model.layers.{i}.mlp.down_proj.miss_block              (r, out)    miss

and one adapted linear layer is (x rows (N, in), W (out, in), s the scaling):

    lora      y = x W^T + b + s (x A^T) B^T                 s = alpha / r, or alpha / sqrt(r) with use_rslora
    dora      y = (m / |W + s B A|_row) (x W^T + s (x A^T) B^T) + b    the norm detached (DoRA 4.3, as peft)
    pissa     lora on the top-r singular triplets: A = sqrt(S/s) Vh_r, B = U_r sqrt(S/s), base W - s B A
    milora    the same on the bottom-r triplets (Liu et al. 2024); saved, both become a plain LoRA (below)
    vera      y = x W^T + b + lambda_b * ((lambda_d * (x A[:, :in]^T)) B[:out]^T)
    miss      y = x W^T + b + (sum over the in/r groups of x) @ M
    lora_plus lora; the optimizer steps the B matrices at lr * loraplus_lr_ratio

The base weights are function inputs, never trained; only the adapter's trainable tensors get gradients.
`linear_fn(adapter, cfg)` is the linear layer the exporters' forward takes (`linear=`; Qwen2's, and nanoGPT's
with `base=`), so the same function traces into the compiled modules and runs eagerly in the tests against
peft. A nanoGPT adapter's keys are its module names, `transformer.h.{i}.attn.c_attn.lora_A.weight`, ...

Files (save / load): `adapter_model.safetensors` + `adapter_config.json` in peft's format, keys with the
`base_model.model.` prefix. PiSSA / MiLoRA adapters are saved as the plain LoRA that applies to the untouched
base, as peft's `path_initial_model_for_weight_conversion` does: A' = [A; A0], B' = [B, -B0], r 2r, alpha 2 alpha.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from pcpc.errors import UserError

METHODS = ("lora", "lora_plus", "dora", "pissa", "milora", "vera", "adalora", "miss")
QWEN2_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NANOGPT_TARGETS = ("c_attn", "c_proj", "c_fc", "w1", "w2", "w3")
"""nanoGPT's block Linears (exporters/nanogpt.py linear_layers): c_proj names both the attention's output and
the GELU MLP's, as a suffix matches both in peft; w1 / w2 / w3 are the SwiGLU MLP's."""
ALL_TARGETS = QWEN2_TARGETS + NANOGPT_TARGETS
DEFAULT_R = {"vera": 256, "miss": 64}
PREFIX = "base_model.model."
SHARED = ("vera_A", "vera_B")
"""Adapter tensors shared by every layer (frozen, saved as base_model.<name>)."""
LORA_FAMILY = ("lora", "lora_plus", "dora", "pissa", "milora")


@dataclass(frozen=True)
class PeftConfig:
    """The `peft` section of a run config (peft's field names and defaults)."""

    type: str = "lora"
    """lora, lora_plus, dora, pissa, milora, vera, adalora or miss."""
    r: int | None = None
    """Rank (None: peft's default, 8; vera 256; miss 64; adalora: init_r)."""
    lora_alpha: float = 8.0
    """LoRA scaling numerator: s = lora_alpha / r (or / sqrt(r) with use_rslora). Not used by vera / miss."""
    target_modules: tuple[str, ...] = QWEN2_TARGETS
    """Linear layers to adapt, by their last name, in every decoder layer: Qwen2's q_proj ... down_proj, or
    nanoGPT's c_attn, c_proj, c_fc (w1, w2, w3 with SwiGLU); a DiLoCo run defaults to all of its model's."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""
    lora_dropout: float = 0.0
    """Only 0 (the compiled step is deterministic)."""
    loraplus_lr_ratio: float = 16.0
    """lora_plus: the B matrices' learning rate over the A matrices'."""
    projection_prng_key: int = 0
    """vera: seed of the shared random projections."""
    d_initial: float = 0.1
    """vera: initial lambda_d."""
    init_seed: int | None = None
    """Seed of the LoRA A matrices (None: the run's seed)."""
    init_r: int = 12
    """adalora: the initial rank of every layer (its triplets before pruning)."""
    target_r: int = 8
    """adalora: the average rank kept at the end."""
    tinit: int = 0
    """adalora: steps of warm-up before ranks are pruned."""
    tfinal: int = 0
    """adalora: steps at the end with the final ranks fixed."""
    deltaT: int = 1
    """adalora: steps between two budget allocations."""
    beta1: float = 0.85
    """adalora: EMA of the sensitivity |p * grad|."""
    beta2: float = 0.85
    """adalora: EMA of its uncertainty."""
    orth_reg_weight: float = 0.5
    """adalora: weight of the orthogonality penalty on A and B in the loss (0: none)."""
    total_step: int | None = None
    """adalora: optimizer steps of the schedule (None: the run's)."""

    def __post_init__(self):
        if self.type not in METHODS:
            raise UserError(f"peft.type must be one of {', '.join(METHODS)}; got {self.type!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.type == "adalora":
            if self.r not in (None, self.init_r):
                raise UserError(f"peft.r: adalora's rank is init_r ({self.init_r}); got r {self.r}")
            object.__setattr__(self, "r", self.init_r)
            if not 0 < self.target_r <= self.init_r:
                raise UserError(f"peft.target_r must be in [1, init_r {self.init_r}]; got {self.target_r}")
            if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
                raise UserError("peft.beta1 and peft.beta2 must be in (0, 1)")
            if self.orth_reg_weight < 0 or self.deltaT < 1 or self.tinit < 0 or self.tfinal < 0:
                raise UserError("peft: orth_reg_weight, tinit and tfinal must be >= 0 and deltaT >= 1")
        if self.r is None:
            object.__setattr__(self, "r", DEFAULT_R.get(self.type, 8))
        if not isinstance(self.r, int) or self.r < 1:
            raise UserError(f"peft.r must be a positive integer; got {self.r!r}")
        bad = [t for t in self.target_modules if t not in ALL_TARGETS]
        if bad or not self.target_modules:
            raise UserError(f"peft.target_modules: expected some of {', '.join(QWEN2_TARGETS)} (Qwen2) or "
                            f"{', '.join(NANOGPT_TARGETS)} (nanoGPT); got {list(self.target_modules)}")
        if self.lora_dropout != 0.0:
            raise UserError("peft.lora_dropout: only 0.0 is supported (the compiled training step is deterministic)")
        if self.loraplus_lr_ratio <= 0:
            raise UserError("peft.loraplus_lr_ratio must be > 0")

    @property
    def scaling(self) -> float:
        if self.type == "adalora":  # peft: lora_alpha / (ranknum + 1e-5), ranknum the initial rank
            return (self.lora_alpha if self.lora_alpha > 0 else float(self.r)) / (self.r + 1e-5)
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def with_schedule(self, total_step: int) -> "PeftConfig":
        """adalora's total_step set from the run when the config leaves it open."""
        if self.type != "adalora" or self.total_step is not None:
            return self
        return replace(self, total_step=total_step)


MODULE_FIELDS = ("type", "r", "lora_alpha", "target_modules", "use_rslora", "loraplus_lr_ratio", "init_r",
                 "target_r", "orth_reg_weight")
"""The fields a compiled module depends on, and target_r, which must stay valid against init_r (the others
are initialisation and AdaLoRA's schedule)."""


def module_section(cfg: PeftConfig) -> dict:
    """The `peft` section of a training module's recipe."""
    d = asdict(cfg)
    return {k: list(d[k]) if k == "target_modules" else d[k] for k in MODULE_FIELDS}


def from_config(raw: dict | PeftConfig | None, where: str = "peft") -> PeftConfig | None:
    from pcpc.config import from_dict

    if raw is None or isinstance(raw, PeftConfig):
        return raw
    return from_dict(PeftConfig, raw, where=where)


# ---------------------------------------------------------------------------
# layout


def linear_layers(mcfg) -> list[tuple[str, str, int, int]]:
    """(module name, last name, out, in) of every Linear an adapter can target in a Qwen2 or nanoGPT model
    (its config), in parameter order."""
    from pcpc.exporters import nanogpt

    if isinstance(mcfg, nanogpt.NanoGPTConfig):
        return nanogpt.linear_layers(mcfg)
    C, I, hd = mcfg.hidden_size, mcfg.intermediate_size, mcfg.dim_head
    dims = {"q_proj": (mcfg.num_attention_heads * hd, C), "k_proj": (mcfg.num_key_value_heads * hd, C),
            "v_proj": (mcfg.num_key_value_heads * hd, C), "o_proj": (C, mcfg.num_attention_heads * hd),
            "gate_proj": (I, C), "up_proj": (I, C), "down_proj": (C, I)}
    out = []
    for i in range(mcfg.num_hidden_layers):
        for t in QWEN2_TARGETS:
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append((f"model.layers.{i}.{part}.{t}", t, *dims[t]))
    return out


def default_targets(mcfg) -> tuple[str, ...]:
    """Every Linear kind of the model (its last names, in order)."""
    return tuple(dict.fromkeys(short for _, short, _, _ in linear_layers(mcfg)))


def targets(mcfg, cfg: PeftConfig) -> list[tuple[str, int, int]]:
    """(module name, out, in) of every adapted linear layer, in parameter order."""
    layers = linear_layers(mcfg)
    out = [(name, o, i) for name, short, o, i in layers if short in cfg.target_modules]
    missing = [t for t in cfg.target_modules if t not in {short for _, short, _, _ in layers}]
    if missing:
        raise UserError(f"peft.target_modules: {missing} are not Linear layers of this model; it has "
                        f"{', '.join(default_targets(mcfg))}")
    return out


def shapes(mcfg, cfg: PeftConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """({trainable name: shape}, {frozen adapter name: shape}) in order (the frozen ones: vera's projections)."""
    train, frozen = {}, {}
    r = cfg.r
    for name, o, i in targets(mcfg, cfg):
        if cfg.type in LORA_FAMILY:
            train[f"{name}.lora_A.weight"] = (r, i)
            train[f"{name}.lora_B.weight"] = (o, r)
            if cfg.type == "dora":
                train[f"{name}.lora_magnitude_vector"] = (o,)
        elif cfg.type == "vera":
            train[f"{name}.vera_lambda_b"] = (o,)
            train[f"{name}.vera_lambda_d"] = (r,)
        elif cfg.type == "adalora":
            train[f"{name}.lora_A"] = (r, i)
            train[f"{name}.lora_B"] = (o, r)
            train[f"{name}.lora_E"] = (r, 1)
        elif cfg.type == "miss":
            if i % r:
                raise UserError(f"peft.r: miss needs r to divide every adapted layer's input width; {name} has "
                                f"{i} inputs, r is {r}")
            train[f"{name}.miss_block"] = (r, o)
    if cfg.type == "vera":
        ts = targets(mcfg, cfg)
        frozen["vera_A"] = (r, max(i for _, _, i in ts))
        frozen["vera_B"] = (max(o for _, o, _ in ts), r)
    return train, frozen


SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".vera_lambda_b", ".vera_lambda_d",
            ".miss_block", ".lora_A", ".lora_B", ".lora_E")


def module_of(name: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A.weight` -> `model.layers.0.self_attn.q_proj`."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    raise ValueError(f"{name}: not an adapter tensor")


def lr_scales(names, cfg: PeftConfig) -> list[float]:
    """Each trainable tensor's learning-rate multiplier (lora_plus: the B matrices' ratio)."""
    return [cfg.loraplus_lr_ratio if cfg.type == "lora_plus" and ".lora_B." in n else 1.0 for n in names]


# ---------------------------------------------------------------------------
# initialisation (peft's)


def _kaiming_uniform(shape, generator, a=math.sqrt(5)) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)) on a (out, in) tensor, with a generator."""
    fan_in = shape[1]
    gain = math.sqrt(2.0 / (1 + a * a))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def init(base: dict[str, torch.Tensor], mcfg, cfg: PeftConfig, seed: int = 0
         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter: the trainable tensors, frozen: vera's projections, residual: {base weight name: the weight
    the adapter applies to}, which differs from the base only for pissa / milora)."""
    train_shapes, _ = shapes(mcfg, cfg)
    g = torch.Generator().manual_seed(seed if cfg.init_seed is None else cfg.init_seed)
    adapter = {}
    s, r = cfg.scaling, cfg.r
    for name, o, i in targets(mcfg, cfg):
        W = base[f"{name}.weight"].float()
        if cfg.type in ("lora", "lora_plus", "dora"):
            adapter[f"{name}.lora_A.weight"] = _kaiming_uniform((r, i), g)
            adapter[f"{name}.lora_B.weight"] = torch.zeros(o, r)
            if cfg.type == "dora":
                adapter[f"{name}.lora_magnitude_vector"] = torch.linalg.norm(W, dim=1)
        elif cfg.type in ("pissa", "milora"):
            if r > min(o, i):
                raise UserError(f"peft.r: {cfg.type} takes r singular triplets; {name} has only {min(o, i)}")
            U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
            sel = slice(0, r) if cfg.type == "pissa" else slice(len(S) - r, len(S))
            sq = torch.sqrt(S[sel] / s)
            A = (sq[:, None] * Vh[sel]).float()
            B = (U[:, sel] * sq[None]).float()
            adapter[f"{name}.lora_A.weight"], adapter[f"{name}.lora_B.weight"] = A, B
        elif cfg.type == "vera":
            adapter[f"{name}.vera_lambda_b"] = torch.zeros(o)
            adapter[f"{name}.vera_lambda_d"] = torch.full((r,), float(cfg.d_initial))
        elif cfg.type == "adalora":  # peft: A, B ~ N(0, 0.02), E = 0
            adapter[f"{name}.lora_A"] = torch.randn((r, i), generator=g) * 0.02
            adapter[f"{name}.lora_B"] = torch.randn((o, r), generator=g) * 0.02
            adapter[f"{name}.lora_E"] = torch.zeros(r, 1)
        elif cfg.type == "miss":
            adapter[f"{name}.miss_block"] = torch.zeros(r, o)
    assert list(adapter) == list(train_shapes)
    return adapter, shared_tensors(mcfg, cfg), residual_weights(base, adapter, mcfg, cfg)


def shared_tensors(mcfg, cfg: PeftConfig) -> dict[str, torch.Tensor]:
    """The adapter's frozen tensors shared by every layer: VeRA's projections, or none."""
    if cfg.type != "vera":
        return {}
    _, frozen_shapes = shapes(mcfg, cfg)
    return vera_projections(cfg, frozen_shapes["vera_A"][1], frozen_shapes["vera_B"][0])


def residual_weights(base: dict, adapter0: dict, mcfg, cfg: PeftConfig) -> dict[str, torch.Tensor]:
    """{weight name: the base weight the adapter applies to} where that is not the base weight itself:
    PiSSA / MiLoRA take their initial adapter out of the base, W - s B0 A0."""
    if cfg.type not in ("pissa", "milora"):
        return {}
    out = {}
    for name, _, _ in targets(mcfg, cfg):
        W = base[f"{name}.weight"]
        B0, A0 = adapter0[f"{name}.lora_B.weight"], adapter0[f"{name}.lora_A.weight"]
        out[f"{name}.weight"] = (W.float() - cfg.scaling * (B0 @ A0)).to(W.dtype)
    return out


def vera_projections(cfg: PeftConfig, max_in: int, max_out: int) -> dict[str, torch.Tensor]:
    """VeRA's shared frozen A (r, max in) and B (max out, r), from projection_prng_key as peft draws them."""
    g = torch.Generator().manual_seed(cfg.projection_prng_key)
    A = _kaiming_uniform((cfg.r, max_in), g, a=0.0)  # peft's _kaiming_init: gain sqrt(2)
    return {"vera_A": A, "vera_B": _kaiming_uniform((max_out, cfg.r), g, a=0.0)}


# ---------------------------------------------------------------------------
# the adapted linear layer and the merged weight


def _delta_rows(rows, name, t, cfg: PeftConfig, W):
    """The adapter's addition to x W^T for rows (N, in); dora returns the whole (N, out) without bias."""
    s = cfg.scaling
    if cfg.type in LORA_FAMILY:
        A, B = t[f"{name}.lora_A.weight"], t[f"{name}.lora_B.weight"]
        lora = (rows @ A.t()) @ B.t() * s
        if cfg.type != "dora":
            return lora
        norm = torch.linalg.norm(W.float() + s * (B @ A), dim=1).detach()
        scale = t[f"{name}.lora_magnitude_vector"] / norm  # (out,)
        return (scale - 1.0) * (rows @ W.float().t()) + scale * lora
    if cfg.type == "vera":
        o, i = W.shape
        A, B = t["vera_A"][:, :i], t["vera_B"][:o]
        return t[f"{name}.vera_lambda_b"] * ((t[f"{name}.vera_lambda_d"] * (rows @ A.t())) @ B.t())
    if cfg.type == "adalora":
        AE = t[f"{name}.lora_A"] * t[f"{name}.lora_E"]
        return (rows @ AE.t()) @ t[f"{name}.lora_B"].t() * s
    if cfg.type == "miss":
        M = t[f"{name}.miss_block"]
        r = M.shape[0]
        return rows.view(rows.shape[0], -1, r).sum(1) @ M
    raise AssertionError(cfg.type)


def adapted_modules(tensors) -> set[str]:
    """The module names the adapter tensors among `tensors` belong to."""
    out = set()
    for k in tensors:
        if any(k.endswith(sfx) for sfx in SUFFIXES):
            out.add(module_of(k))
    return out


def linear_fn(tensors: dict[str, torch.Tensor], cfg: PeftConfig, base=None):
    """A linear layer for the exporters' forward(linear=...): the base layer plus the adapter on the modules
    it has tensors for. `tensors` holds the adapter's trainable and frozen tensors; `base(params, name, x,
    bias=True)` is the model's own linear (default: exporters/qwen2.py's)."""
    if base is None:
        from pcpc.exporters import qwen2

        base = qwen2._linear
    adapted = adapted_modules(tensors)

    def linear(params, name, x, bias=True):
        y = base(params, name, x, bias)
        if name not in adapted:
            return y
        W = params[f"{name}.weight"]
        rows = x.reshape(-1, x.shape[-1]).float()
        return y + _delta_rows(rows, name, tensors, cfg, W).view(*x.shape[:-1], W.shape[0])

    return linear


def merged(W: torch.Tensor, name: str, tensors: dict[str, torch.Tensor], cfg: PeftConfig) -> torch.Tensor:
    """The weight of module `name` with its adapter folded in (what peft's merge_and_unload computes)."""
    s, Wf = cfg.scaling, W.float()
    if cfg.type in LORA_FAMILY:
        A, B = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
        out = Wf + s * (B @ A)
        if cfg.type == "dora":
            out = (tensors[f"{name}.lora_magnitude_vector"] / torch.linalg.norm(out, dim=1))[:, None] * out
    elif cfg.type == "vera":
        o, i = W.shape
        A, B = tensors["vera_A"][:, :i], tensors["vera_B"][:o]
        out = Wf + (tensors[f"{name}.vera_lambda_b"][:, None] * B) @ (tensors[f"{name}.vera_lambda_d"][:, None] * A)
    elif cfg.type == "adalora":
        out = Wf + tensors[f"{name}.lora_B"] @ (tensors[f"{name}.lora_A"] * tensors[f"{name}.lora_E"]) * s
    elif cfg.type == "miss":
        M = tensors[f"{name}.miss_block"]  # (r, out); delta^T (in, out) = M stacked in/r times
        out = Wf + M.repeat(W.shape[1] // M.shape[0], 1).t()
    else:
        raise AssertionError(cfg.type)
    return out.to(W.dtype)


def orth_penalty(tensors: dict[str, torch.Tensor], cfg: PeftConfig) -> torch.Tensor:
    """AdaLoRA's regulariser, as peft adds it to the loss: the mean over every A and B of |P P^T - I|_F
    (A A^T for A, B^T B for B), times orth_reg_weight."""
    terms = []
    for k, p in tensors.items():
        if k.endswith(".lora_A") or k.endswith(".lora_B"):
            cov = p @ p.t() if k.endswith(".lora_A") else p.t() @ p
            terms.append(torch.linalg.norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype), "fro"))
    return cfg.orth_reg_weight * torch.stack(terms).mean()


# ---------------------------------------------------------------------------
# peft's files


def peft_type(cfg: PeftConfig) -> str:
    return {"vera": "VERA", "miss": "MISS", "adalora": "ADALORA"}.get(cfg.type, "LORA")


def saved_state(adapter: dict, frozen: dict, cfg: PeftConfig, initial: dict | None = None,
                rank_pattern: dict | None = None) -> tuple[dict[str, torch.Tensor], PeftConfig]:
    """peft's state dict for the adapter (keys with the base_model.model. prefix), and the config it is saved
    under: pissa / milora become the plain LoRA [A; A0], [B, -B0] of rank 2r on the untouched base; adalora's
    triplets are cut to its rank pattern ({module: [kept?] * init_r}), as peft saves them."""
    out, saved_cfg = {}, cfg
    if rank_pattern:
        adapter = dict(adapter)
        for module, keep in rank_pattern.items():
            idx = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)
            adapter[f"{module}.lora_A"] = adapter[f"{module}.lora_A"][idx]
            adapter[f"{module}.lora_E"] = adapter[f"{module}.lora_E"][idx]
            adapter[f"{module}.lora_B"] = adapter[f"{module}.lora_B"][:, idx]
    if cfg.type in ("pissa", "milora"):
        assert initial is not None, "pissa / milora need the initial adapter to convert"
        for k, v in adapter.items():
            v0 = initial[k]
            out[PREFIX + k] = torch.cat([v, v0], 0) if ".lora_A." in k else torch.cat([v, -v0], 1)
        saved_cfg = replace(cfg, type="lora", r=2 * cfg.r,
                            lora_alpha=cfg.lora_alpha * (2 ** 0.5 if cfg.use_rslora else 2))
    else:
        out = {PREFIX + k: v for k, v in adapter.items()}
    if cfg.type == "vera":
        out.update({"base_model." + k: v for k, v in frozen.items()})  # save_projection=True
    return {k: v.detach().float().contiguous() for k, v in out.items()}, saved_cfg


def adapter_config(cfg: PeftConfig, base_model: str | None, rank_pattern: dict | None = None,
                   task_type: str | None = "CAUSAL_LM") -> dict:
    """adapter_config.json as peft writes it (the fields its loader reads). task_type None: a custom model
    (nanoGPT), which peft wraps in its plain PeftModel."""
    common = {"peft_type": peft_type(cfg), "task_type": task_type, "base_model_name_or_path": base_model,
              "inference_mode": True, "target_modules": sorted(cfg.target_modules), "revision": None,
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "bias": "none"}
    if cfg.type != "miss":  # MissConfig has no fan_in_fan_out
        common["fan_in_fan_out"] = False
    if cfg.type == "vera":
        return {**common, "r": cfg.r, "projection_prng_key": cfg.projection_prng_key, "save_projection": True,
                "vera_dropout": 0.0, "d_initial": cfg.d_initial, "init_weights": True}
    if cfg.type == "miss":
        return {**common, "r": cfg.r, "miss_dropout": 0.0, "init_weights": True, "mini_r": 1}
    if cfg.type == "adalora":
        return {**common, "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "init_lora_weights": True,
                "init_r": cfg.init_r, "target_r": cfg.target_r, "tinit": cfg.tinit, "tfinal": cfg.tfinal,
                "deltaT": cfg.deltaT, "beta1": cfg.beta1, "beta2": cfg.beta2, "orth_reg_weight": cfg.orth_reg_weight,
                "total_step": cfg.total_step,
                "rank_pattern": {f"{m}.lora_E": list(map(bool, k)) for m, k in rank_pattern.items()}
                if rank_pattern else None}
    return {**common, "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "use_rslora": cfg.use_rslora,
            "use_dora": cfg.type == "dora", "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}


def save(out_dir: str | Path, adapter: dict, frozen: dict, cfg: PeftConfig, base_model: str | None,
         initial: dict | None = None, rank_pattern: dict | None = None, task_type: str | None = "CAUSAL_LM") -> Path:
    """Write adapter_model.safetensors + adapter_config.json into out_dir (each file atomically)."""
    from safetensors.torch import save as st_save

    from pcpc.mlir.build import write_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state, saved_cfg = saved_state(adapter, frozen, cfg, initial, rank_pattern)
    write_atomic(out_dir / "adapter_model.safetensors", st_save(state, metadata={"format": "pt"}))
    write_atomic(out_dir / "adapter_config.json",
                 json.dumps(adapter_config(saved_cfg, base_model, rank_pattern, task_type), indent=2) + "\n")
    return out_dir


def load(adapter_dir: str | Path) -> tuple[PeftConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, trainable tensors, frozen tensors) of a peft adapter directory, pcpc's or peft's own."""
    from safetensors.torch import load_file

    from pcpc.config import load_json

    d = Path(adapter_dir)
    cfg_file, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise UserError(f"{d}: not a peft adapter directory ({f.name} is missing)")
    raw = load_json(cfg_file)
    kind = raw.get("peft_type")
    targets_ = raw.get("target_modules") or []
    if isinstance(targets_, str):
        raise UserError(f"{cfg_file}: target_modules as a regex is not supported; list the module names")
    targets_ = tuple(t for t in ALL_TARGETS if t in targets_)
    if kind == "LORA":
        for key in ("rank_pattern", "alpha_pattern"):
            if raw.get(key):
                raise UserError(f"{cfg_file}: {key} is not supported")
        cfg = PeftConfig(type="dora" if raw.get("use_dora") else "lora", r=int(raw["r"]),
                         lora_alpha=float(raw.get("lora_alpha", 8)), target_modules=targets_,
                         use_rslora=bool(raw.get("use_rslora", False)))
    elif kind == "VERA":
        cfg = PeftConfig(type="vera", r=int(raw["r"]), target_modules=targets_,
                         projection_prng_key=int(raw.get("projection_prng_key", 0)),
                         d_initial=float(raw.get("d_initial", 0.1)))
    elif kind == "ADALORA":
        cfg = PeftConfig(type="adalora", init_r=int(raw.get("init_r", 12)), target_r=int(raw.get("target_r", 8)),
                         lora_alpha=float(raw.get("lora_alpha", 8)), target_modules=targets_,
                         tinit=int(raw.get("tinit", 0)), tfinal=int(raw.get("tfinal", 0)),
                         deltaT=int(raw.get("deltaT", 1)), beta1=float(raw.get("beta1", 0.85)),
                         beta2=float(raw.get("beta2", 0.85)), orth_reg_weight=float(raw.get("orth_reg_weight", 0.5)),
                         total_step=raw.get("total_step"))
    elif kind == "MISS":
        if raw.get("init_weights", True) is not True:
            raise UserError(f"{cfg_file}: MiSS init_weights {raw['init_weights']!r} is not supported (only True)")
        cfg = PeftConfig(type="miss", r=int(raw["r"]), target_modules=targets_)
    else:
        raise UserError(f"{cfg_file}: peft_type {kind!r} is not supported (LORA, VERA, ADALORA or MISS)")
    state = load_file(str(weights))
    adapter, frozen = {}, {}
    for k, v in state.items():
        if k.startswith(PREFIX):
            adapter[k[len(PREFIX):]] = v.float()
        elif k.startswith("base_model."):
            frozen[k[len("base_model."):]] = v.float()
        else:
            raise UserError(f"{weights}: unexpected key {k!r}")
    if cfg.type == "adalora":  # triplets cut to a rank pattern come back at init_r, the pruned ones zero
        for key, keep in (raw.get("rank_pattern") or {}).items():
            module = key.removesuffix(".lora_E")
            idx = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)
            for part, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                small = adapter[f"{module}.{part}"]
                shape = list(small.shape)
                shape[dim] = len(keep)
                full = torch.zeros(shape)
                full.index_copy_(dim, idx, small)
                adapter[f"{module}.{part}"] = full
    if cfg.type == "vera" and not frozen:
        raise UserError(f"{weights}: the VeRA projections vera_A / vera_B are not in the file (saved with "
                        f"save_projection=False); save the adapter with save_projection=True")
    return cfg, adapter, frozen


def check_against(cfg: PeftConfig, adapter: dict, frozen: dict, mcfg, where: str) -> None:
    """The adapter's tensors are exactly the ones this model and config call for."""
    want, want_frozen = shapes(mcfg, cfg)
    got = {k: tuple(v.shape) for k, v in adapter.items()}
    if got != want:
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        wrong = [k for k in want if k in got and got[k] != want[k]][:3]
        raise UserError(f"{where}: the adapter does not fit this model: missing {missing}, unexpected {extra}, "
                        f"shape mismatch {[(k, got[k], want[k]) for k in wrong]}")
    for k, shape in want_frozen.items():
        if k not in frozen or tuple(frozen[k].shape) != shape:
            raise UserError(f"{where}: {k} must be {shape}")


def merge_into(weights: dict, mcfg, adapter_dir: str | Path) -> tuple[dict, PeftConfig]:
    """{name: fp32 array} of a Qwen2 model's weights with the adapter of adapter_dir folded in (only the
    adapted linear weights change; the others are passed through), and the adapter's config."""
    import numpy as np

    cfg, adapter, shared = load(adapter_dir)
    check_against(cfg, adapter, shared, mcfg, str(adapter_dir))
    tensors = {**adapter, **shared}
    out = dict(weights)
    for name, _, _ in targets(mcfg, cfg):
        W = torch.from_numpy(np.array(weights[f"{name}.weight"], np.float32))  # a copy: weights may be read-only
        out[f"{name}.weight"] = merged(W, name, tensors, cfg).numpy()
    return out, cfg
