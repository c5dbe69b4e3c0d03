"""What the pretraining loops share (DiLoCo, runtime/train/diloco.py; data-parallel, runtime/train/ddp.py): the
data and tokenizer a config names, the nanoGPT build target, host-side flat buffers and their all-reduce, and
text sampling through the compiled `logits` function."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pcpc.errors import UserError
from pcpc.runtime.run.artifacts import build_artifact
from pcpc.runtime.run.skeleton import Loop
from pcpc.runtime.train.tokenizer import Tokenizer, named_tokenizer

KNOWN_DATASETS = {"tiny_shakespeare.txt": "tiny_shakespeare", "enwik8.txt": "enwik8"}
KNOWN_SHARDS = {"edu_fineweb10B": "FineWeb-Edu sample-10BT in GPT-2 tokens: build-nanogpt's fineweb.py writes its "
                                  "edufineweb_train_*.npy / edufineweb_val_*.npy there, or run `pcpc data prepare "
                                  "FILE.jsonl --tokenizer gpt2 --out edu_fineweb10B` on its JSONL"}
WHY_NOT_FOREIGN = ("pcpc does not differentiate MLIR: it derives train_step and outer_step from an exporter's "
                   "functional PyTorch model (torch.func + make_fx) before lowering, and an arbitrary MLIR file has "
                   "no such source.")


def resolve_tokenizer(cfg) -> Tokenizer | None:
    """The tokenizer the config names (None: char, whose vocabulary comes from the data).

    auto: text data as the reference's configs (byte for a preset of 256 ids, else char); jsonl gpt2; shards
    the tokenizer their dataset.json records (`pcpc data prepare`), else gpt2 (FineWeb-style shards)."""
    from pcpc.exporters.nanogpt import PRESETS
    from pcpc.runtime.train.shards import manifest

    data = cfg.dataset
    name = data.tokenizer
    if name == "auto":
        if data.kind == "shards":
            info = manifest(Path(data.path))
            if info is not None:
                return Tokenizer.from_json(json.dumps(info["tokenizer"]))
            name = "gpt2"
        elif data.kind == "jsonl":
            name = "gpt2"
        else:
            name = "byte" if PRESETS.get(cfg.preset, {}).get("vocab_size") == 256 else "char"
    return None if name == "char" else named_tokenizer(name)


def check_data(cfg) -> None:
    """The config's data exists (a file, or a shard directory), or a UserError that says how to get it."""
    path = Path(cfg.dataset.path)
    if path.is_file() or (path.is_dir() and cfg.dataset.kind == "shards"):
        return
    what = {"text": "text file", "jsonl": "JSONL file", "shards": "directory of train_* / val_* token shards"}
    hint = f"place the {what[cfg.dataset.kind]} at {path}"
    if path.name in KNOWN_SHARDS:
        hint = f"{hint}: {KNOWN_SHARDS[path.name]}"
    if path.name in KNOWN_DATASETS:
        hint = f"run `pcpc data fetch {KNOWN_DATASETS[path.name]}` (or copy {path.name} to {path})"
    raise UserError(f"{cfg.data_where}: {path} not found (relative to {Path.cwd()}); {hint}")


def model_target(cfg, vocab_size: int, functions: list[str]):
    """The build target of the experiment's modules, and the artifact path they are built at.

    Without a `model` object, an adapter or a data section (whose tokenizer and block_size shape the model)
    the artifact is model_path itself (its stem names the preset). With one, it is <model_path
    folder>/<stem>-<hash of the target's config>.mlir: every architecture (and batch shape, adapter and
    function set) gets its own build, and experiments that share one share the build.
    """
    from pcpc.exporters.peft import module_section
    from pcpc.mlir.build import sha256_bytes
    from pcpc.mlir.targets import nanogpt_target

    fields = dict(cfg.model_fields)
    fields.setdefault("vocab_size", vocab_size)
    path = Path(cfg.model_path)
    peft = getattr(cfg, "peft", None)
    target = nanogpt_target(
        path.stem, cfg.preset, cfg.batch_size, eval_batch_size=cfg.eval_batch_size, model_overrides=fields,
        optimizer={"beta1": cfg.beta1, "beta2": cfg.beta2, "weight_decay": cfg.weight_decay,
                   "grad_clip": cfg.grad_clip},
        functions=functions, peft=module_section(peft) if peft else None,
    )
    if cfg.model is not None or peft is not None or cfg.data is not None or cfg.sync != "diloco":
        key = sha256_bytes(json.dumps(target.config, sort_keys=True).encode())[:10]
        path = path.with_name(f"{path.stem}-{key}{path.suffix}")
    return target, path


def resolve_model(cfg, vocab_size: int, functions: list[str], say=print):
    """Build (or find cached) the experiment's modules; returns the BuildResult."""
    target, path = model_target(cfg, vocab_size, functions)
    return build_artifact("model_path", path, target, cfg.target, say, why=WHY_NOT_FOREIGN)


def module_model_config(mod):
    """The NanoGPTConfig a compiled module was built for."""
    from pcpc.exporters.nanogpt import make_config

    cfg = mod.meta.provenance.config
    return make_config(cfg["model"], **cfg.get("model_overrides", {}))


def unpack(flat: np.ndarray, specs, sizes) -> list[np.ndarray]:
    """Views of flat shaped like the parameters (no copy)."""
    ends = np.cumsum(sizes)
    return [flat[e - n:e].reshape(spec.shape) for e, n, spec in zip(ends, sizes, specs)]


def all_reduce_mean(array: np.ndarray, world: int, backend: str) -> None:
    """In place: the mean of `array` over the workers (nccl reduces a CUDA copy)."""
    import torch
    import torch.distributed as dist

    t = torch.from_numpy(array)
    if backend == "nccl":
        dev = t.cuda()
        dist.all_reduce(dev)
        t.copy_(dev.cpu())
    else:
        dist.all_reduce(t)
    array /= world


def sample_text(mod, weights, tokenizer, block: int, n_tokens: int, rng, prompt: str | None = None,
                temperature: float = 1.0) -> str:
    """n_tokens sampled from the model with the compiled `logits` function (one row of block tokens), after
    `prompt` (None: the end-of-text id, else a newline); returns the prompt and the sample."""
    from pcpc.runtime.module import to_host

    if prompt:
        ids = [int(i) for i in tokenizer.encode(prompt)]
    elif tokenizer.eot is not None:  # a document's start
        ids = [tokenizer.eot]
    else:
        ids = [int(tokenizer.encode("\n")[0]) if tokenizer.kind != "char" or "\n" in tokenizer.chars else 0]
    for _ in range(n_tokens):
        ctx = ids[-block:]
        idx = np.zeros((1, block), np.int64)
        idx[0, :len(ctx)] = ctx  # positions after the context are ignored (causal attention)
        logits = to_host(mod("logits", *weights, idx)[0])[0, len(ctx) - 1].astype(np.float64) / temperature
        p = np.exp(logits - logits.max())
        ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return tokenizer.decode(ids)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


class PretrainLoop(Loop):
    """What DiLoCo's and DDP's loops share on every worker: the process group's backend, the threads of a
    local worker, the module and the worker's data (open), and the validation loss over all workers."""

    @classmethod
    def world_size(cls, cfg) -> int:
        return cfg.num_workers

    def backend(self) -> str:
        cfg = self.cfg
        return cfg.backend if cfg.backend != "auto" else ("nccl" if cfg.target == "cuda" else "gloo")

    def threads(self) -> int:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        return self.cfg.threads or max(1, (os.cpu_count() or 1) // local_world)

    def open(self) -> None:
        """The compiled module (mod, specs, block) and this worker's data (tokenizer, sampler, my_val: its share
        of the fixed validation batches)."""
        from pcpc.runtime.module import CompiledModule
        from pcpc.runtime.train.data import load_dataset, val_batches

        cfg = self.cfg
        self.mod = CompiledModule(self.plan.vmfb, threads=self.threads())
        self.specs = self.mod.meta.parameters  # every weight, or an adapter's trainable tensors
        self.block = module_model_config(self.mod).block_size
        data = load_dataset(cfg.dataset, Tokenizer.from_json(self.plan.tokenizer), cfg.seed, cfg.data_where)
        self.tokenizer = data.tokenizer
        self.sampler = data.sampler(self.rank, self.world, self.block, cfg.batch_size, cfg.seed)
        self.my_val = val_batches(data.val, self.block, cfg.eval_batch_size, cfg.eval_batches,
                                  data.where)[self.rank::self.world]

    def evaluate(self, weights) -> float:
        """Mean validation loss over all workers' shares of the fixed validation batches."""
        from pcpc.runtime.module import to_host

        total = sum(float(to_host(self.mod("eval_loss", *weights, x, y)[0])) for x, y in self.my_val)
        sums = np.array([total, len(self.my_val)], np.float64)
        all_reduce_mean(sums, 1, self.backend())  # sums over workers (mean over 1 = the sum)
        return float(sums[0] / sums[1])
