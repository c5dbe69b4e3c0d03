"""Sparse masks: which weights a sparse run trains. Found from a delta log, compared, summarised.

A mask file is safetensors of uint8 tensors (1: trained), one per parameter, keyed and shaped as the
parameters, with a JSON record beside it (FILE.json: method, sparsity, target step, per-tensor counts).
Files are named as the reference design names them: sparsity_97.5pct_magnitude_step50.safetensors.

Scores, from the logged steps of a run's delta log (runtime/run/deltas.py), Δ_t = θ_t − θ_0:

    magnitude        |Δ_N|
    momentum         over the velocities v = Δ_t − Δ_{t−1} of the last W logged steps up to N (Δ_0 = 0):
                     |mean v| · (1 + |mean v| / std v), as the reference computes it
    delta-variance   Var[Δ_t] + |E[Δ_t]| over the logged steps up to N (what the reference calls "fisher")
    fisher           the empirical Fisher diagonal Σ_b g_b² over the run's first B batches' gradients, summed
                     by the run itself through its compiled gradient module (delta_log.fisher_batches B); its
                     target step is the last step summed
    random           uniform, seeded (a baseline)

Selection keeps the top (1 − P/100) of all eligible weights by score (global top-k; `invert`: the bottom, a
baseline), then raises every eligible tensor to a floor of `min_keep_percent` of its entries (the
reference keeps at least 0.25% of each). Scores are computed one tensor at a time and the global threshold
from per-tensor candidates, so finding a mask holds a few tensors and the k candidates, never the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pcpc.errors import UserError

METHODS = ("magnitude", "momentum", "delta-variance", "fisher", "random")


def sanitize(model: str) -> str:
    """A model name as a path part, as the reference design names its folders:
    "google/gemma-3-270m-it" -> "google_gemma_3_270m_it", "meta-llama/Llama-3.1-8B" -> "meta_llama_llama_3_1_8b"."""
    import re

    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9]", "_", model.strip().lower())).strip("_")


def model_of(run_dir: Path) -> str | None:
    """The model a run trained (its config.json): a GRPO / DPO run's `model`, a DiLoCo run's preset."""
    try:
        cfg = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    exp = cfg.get("experiment", {})
    model = exp.get("model")
    if isinstance(model, dict):
        model = model.get("preset")
    if model is None and exp.get("model_path"):
        model = Path(exp["model_path"]).stem
    return str(Path(model).name) if model and Path(str(model)).is_dir() else model


def mask_name(method: str, sparsity: float, step: int, window: int | None = None, invert: bool = False) -> str:
    w = f"_w{window}" if method == "momentum" and window else ""
    return f"sparsity_{sparsity:g}pct_{'inverted_' if invert else ''}{method.replace('-', '_')}{w}_step{step}"


def _tensor_at(run_dir: Path, index: dict, name: str, step: int, base: np.ndarray, cache: dict) -> np.ndarray:
    """θ_step of one tensor (streaming: one file handle per step, one tensor read)."""
    from safetensors import safe_open

    from pcpc.runtime.run.deltas import DIR

    if step == 0:
        return base
    entry = index["steps"][str(step)]
    f = cache.get(step)
    if f is None:
        f = cache[step] = safe_open(str(Path(run_dir) / DIR / entry["file"]), "np")
    keys = set(f.keys())
    if name in keys:
        return f.get_tensor(name).reshape(base.shape)
    out = np.array(base, np.float32).reshape(-1)
    out[f.get_tensor(f"{name}:indices").astype(np.int64)] = f.get_tensor(f"{name}:values")
    return out.reshape(base.shape)


def scores(run_dir: Path, method: str, target_step: int | None, window: int = 25, seed: int = 0):
    """Yields (name, score array) tensor by tensor."""
    from safetensors import safe_open

    from pcpc.runtime.run import deltas

    index = deltas.read_index(run_dir)
    logged = deltas.logged_steps(index)
    if method not in METHODS:
        raise UserError(f"--method: expected one of {', '.join(METHODS)}; got {method!r}")
    if method == "fisher":
        rec, f = deltas.read_fisher(run_dir, index)
        if target_step is not None and target_step != rec["steps"][1]:
            raise UserError(f"--target-step {target_step}: {run_dir}'s Fisher sum covers steps {rec['steps'][0]}.."
                            f"{rec['steps'][1]} ({rec['batches']} batches); give --target-step {rec['steps'][1]} "
                            f"or leave it out")
        for name in index["names"]:
            yield name, f.get_tensor(name).astype(np.float64)
        return
    if target_step is None:
        raise UserError(f"--target-step: required for --method {method} (logged steps: "
                        f"{', '.join(map(str, logged)) or 'none'})")
    if target_step not in logged:
        raise UserError(f"--target-step {target_step}: not logged in {run_dir}; logged steps: "
                        f"{', '.join(map(str, logged)) or 'none'}")
    upto = [s for s in logged if s <= target_step]
    if method == "momentum":
        if window < 1:
            raise UserError(f"--momentum-window must be >= 1; got {window}")
        used = ([0] + upto)[-(window + 1):]  # W velocities need W + 1 deltas
        if len(used) < 3:
            raise UserError(f"--method momentum needs at least 2 logged steps up to {target_step} (a mean and a "
                            f"spread of the velocities); {run_dir} has {len(upto)}")
    rng = np.random.default_rng(seed)
    base_file = safe_open(str(Path(run_dir) / deltas.DIR / "base.safetensors"), "np")
    cache: dict = {}
    for name in index["names"]:
        base = base_file.get_tensor(name)
        if method == "random":
            yield name, rng.random(base.shape, dtype=np.float32)
            continue
        if method == "magnitude":
            yield name, np.abs(_tensor_at(run_dir, index, name, target_step, base, cache).astype(np.float64) - base)
            continue
        steps = used if method == "momentum" else upto
        d = np.stack([_tensor_at(run_dir, index, name, s, base, cache).astype(np.float64) - base for s in steps])
        if method == "momentum":
            v = np.diff(d, axis=0)
            mean, std = np.abs(v.mean(0)), v.std(0)
            yield name, mean * (1.0 + mean / (std + 1e-12))
        else:
            yield name, d.var(0) + np.abs(d.mean(0))


def find(run_dir: str | Path, method: str, sparsity_percent: float, target_step: int | None, window: int = 25,
         mlp_only: bool = False, min_keep_percent: float = 0.25, invert: bool = False, seed: int = 0
         ) -> tuple[dict[str, np.ndarray], dict]:
    """({name: uint8 mask}, record) for the run's delta log (target_step None: fisher's own)."""
    run_dir = Path(run_dir)
    if not 0.0 <= sparsity_percent < 100.0:
        raise UserError(f"--sparsity-percent must be in [0, 100); got {sparsity_percent}")
    if not 0.0 <= min_keep_percent <= 100.0:
        raise UserError(f"--min-keep-percent must be in [0, 100]; got {min_keep_percent}")

    def eligible(name: str) -> bool:
        return not mlp_only or ".mlp." in name

    def scored():
        for name, s in scores(run_dir, method, target_step, window, seed):
            yield name, (-s if invert else s)

    from pcpc.runtime.run.deltas import read_fisher, read_index

    index = read_index(run_dir)
    if method == "fisher":
        # its target step: the last step the sum covers
        target_step = target_step if target_step is not None else read_fisher(run_dir, index)[0]["steps"][1]
    shapes = {n: tuple(s) for n, s in zip(index["names"], index["shapes"])}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    pool = sum(n for k, n in sizes.items() if eligible(k))
    if pool == 0:
        raise UserError(f"--mlp-only: {run_dir}'s weights have no MLP tensors")
    k = max(1, math.ceil(pool * (1 - sparsity_percent / 100)))
    # pass 1: the global threshold, from each tensor's own top-k candidates (an entry of the global top k is
    # in the top k of its own tensor)
    cand = np.empty(0)
    for name, s in scored():
        if eligible(name):
            flat = s.reshape(-1)
            top = flat if flat.size <= k else np.partition(flat, flat.size - k)[flat.size - k:]
            cand = np.concatenate([cand, top])
            if cand.size > 2 * k:
                cand = np.partition(cand, cand.size - k)[cand.size - k:]
    thr = np.partition(cand, cand.size - k)[cand.size - k]
    above = int(np.count_nonzero(cand > thr))
    ties_left = k - above  # of the entries equal to the threshold, keep this many (the first ones)
    # pass 2: the masks
    masks, counts = {}, {}
    for name, s in scored():
        if not eligible(name):
            masks[name] = np.zeros(shapes[name], np.uint8)
            counts[name] = 0
            continue
        flat = s.reshape(-1)
        keep = flat > thr
        eq = np.flatnonzero(flat == thr)
        take = eq[:max(0, ties_left)]
        ties_left -= take.size
        keep[take] = True
        floor = math.ceil(flat.size * min_keep_percent / 100)
        if keep.sum() < floor:
            keep[np.argpartition(flat, flat.size - floor)[flat.size - floor:]] = True
        masks[name] = keep.reshape(shapes[name]).astype(np.uint8)
        counts[name] = int(keep.sum())
    total = sum(sizes.values())
    kept = sum(counts.values())
    record = {"method": method, "inverted": invert, "sparsity_percent": sparsity_percent,
              "target_step": target_step, "momentum_window": window if method == "momentum" else None,
              **({"fisher": index["fisher"]} if method == "fisher" else {}),
              "mlp_only": mlp_only, "min_keep_percent": min_keep_percent, "seed": seed if method == "random" else None,
              "deltas": str(run_dir), "weights": total, "kept": kept, "density": kept / total,
              "tensors": {n: {"shape": list(shapes[n]), "kept": counts[n]} for n in sizes}}
    return masks, record


def save(path: str | Path, masks: dict[str, np.ndarray], record: dict) -> Path:
    """FILE (safetensors) and FILE.json, each atomically."""
    from safetensors.numpy import save as st_save

    from pcpc.mlir.build import write_atomic

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, st_save(masks, metadata={"format": "pcpc-mask-v1"}))
    write_atomic(record_path(path), json.dumps(record, indent=1) + "\n")
    return path


def record_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".safetensors") + ".json")


def load(path: str | Path) -> dict[str, np.ndarray]:
    """{name: bool array} of a mask file."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such mask file")
    try:
        raw = load_file(str(path))
    except Exception as e:  # a truncated or foreign file: say which
        raise UserError(f"{path}: not a readable mask file ({type(e).__name__}: {str(e)[:100]})") from None
    return {k: v.astype(bool) for k, v in raw.items()}


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], where: tuple[str, str]) -> dict:
    """Jaccard index |A∩B| / |A∪B|, aggregate and per layer, the one-sided overlaps |A∩B| / |A| and / |B|,
    and the chance Jaccard of independent masks of those densities, pA pB / (pA + pB − pA pB)."""
    from pcpc.runtime.run.deltas import layer_of

    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        odd = sorted(set(a) ^ set(b))[:3] or [k for k in a if a[k].shape != b[k].shape][:3]
        raise UserError(f"{where[0]} and {where[1]} are masks of different models (differ at {odd})")

    def stats(names):
        inter = sum(int(np.count_nonzero(a[k] & b[k])) for k in names)
        na, nb = sum(int(a[k].sum()) for k in names), sum(int(b[k].sum()) for k in names)
        n = sum(a[k].size for k in names)
        union = na + nb - inter
        pa, pb = na / n, nb / n
        chance = pa * pb / (pa + pb - pa * pb) if pa + pb > 0 else 0.0
        return {"jaccard": inter / union if union else 1.0, "a_in_b": inter / na if na else 0.0,
                "b_in_a": inter / nb if nb else 0.0, "chance_jaccard": chance, "density_a": pa, "density_b": pb}

    layers: dict[str, list[str]] = {}
    for k in a:
        layers.setdefault(layer_of(k), []).append(k)
    return {**stats(list(a)), "layers": {layer: stats(names) for layer, names in layers.items()}}
