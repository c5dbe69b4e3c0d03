"""Data-parallel pretraining and its data: pcpc against the plain PyTorch / tokenizer peers, side by side.

    ddp       `pcpc run` of a "sync": "ddp" config (compiled value_and_grad + adamw_step, one all-reduce of
              one flat buffer per step) against torch DistributedDataParallel (gloo) over the eager
              model (pcpc.exporters.nanogpt.forward as an nn.Module), torch.optim.AdamW, clip_grad_norm_:
              gpt-mini shape (6 layers, 6 heads, 192 wide, block 128), 2 local workers of 1 thread each, the
              same shards, batches, steps and schedule. Reported: training tokens/s of each (the step loop,
              its final evaluation included), the ratio, and both last train losses.
    loader    batches/s of the shard loader (ShardSampler.batch) next to the train steps/s it feeds.
    prepare   `pcpc data prepare` tokens/s against a plain single-process loop over the same JSONL: tiktoken's
              encode_ordinary per document with gpt2 when its BPE files are in the cache; otherwise (no
              network) a 4096-id byte-level BPE trained here, its `encode` per document.

The corpus is data/tiny_shakespeare.txt (`make run` puts it there); prepare uses it as JSONL of its
speeches, repeated to --prepare-mb.

    .venv/bin/python bench/ddp.py                   # all three
    .venv/bin/python bench/ddp.py --steps 60 --only ddp
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pcpc.mlir import cpu as target_cpu

target_cpu.match_torch()  # with PCPC_CPU=znver3, torch runs AVX2 too (before it is imported)


ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "tiny_shakespeare.txt"
MODEL = {"preset": "gpt-mini"}
BLOCK, BATCH, WORKERS = 128, 8, 2
TARGET = 1.3


def config(shards: Path, steps: int) -> dict:
    return {"model_path": "models/gpt_mini.mlir", "sync": "ddp", "model": MODEL,
            "data": {"path": str(shards), "block_size": BLOCK}, "num_workers": WORKERS, "batch_size": BATCH,
            "max_steps": steps, "learning_rate": 1e-3, "lr_schedule": "cosine", "warmup_steps": 5,
            "eval_interval": 0, "eval_batch_size": BATCH, "eval_batches": 4, "sample_tokens": 0,
            "checkpoint_interval": 0, "seed": 1337, "wandb_project": None}


def eager_worker(rank: int, world: int, payload) -> dict:
    """One process of torch DDP over the eager model: the peer."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from pcpc.config import from_dict
    from pcpc.exporters import nanogpt
    from pcpc.runtime.train.config import DDPConfig
    from pcpc.runtime.train.data import load_shards, val_batches
    from pcpc.runtime.train.tokenizer import Tokenizer

    raw, steps = payload
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    cfg = from_dict(DDPConfig, raw)
    data = load_shards(cfg.data.path, Tokenizer("byte"))
    mcfg = cfg.model_config(256)
    init = nanogpt.init_params(mcfg, cfg.seed)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.names = list(init)
            self.ps = torch.nn.ParameterList([torch.nn.Parameter(v.clone()) for v in init.values()])

        def forward(self, x):
            return nanogpt.forward(dict(zip(self.names, self.ps)), x, mcfg)

    model = torch.nn.parallel.DistributedDataParallel(Model())
    ps = list(model.module.ps)
    groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    sampler = data.sampler(rank, world, BLOCK, BATCH, cfg.seed)
    val = val_batches(data.val, BLOCK, cfg.eval_batch_size, cfg.eval_batches)[rank::world]
    t0, losses = time.perf_counter(), []
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(s)
        x, y = (torch.from_numpy(a) for a in sampler.batch(s))
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients' buckets during the backward
        torch.nn.utils.clip_grad_norm_(ps, cfg.grad_clip)
        opt.step()
        t = torch.tensor([loss.item()])
        dist.all_reduce(t)
        losses.append(float(t) / world)
    with torch.no_grad():  # the final evaluation, as pcpc's loop makes one after its last step
        total = sum(F.cross_entropy(model.module(torch.from_numpy(x)).view(-1, 256), torch.from_numpy(y).view(-1))
                    .item() for x, y in val)
    t = torch.tensor([total, len(val)], dtype=torch.float64)
    dist.all_reduce(t)
    seconds = time.perf_counter() - t0
    dist.destroy_process_group()
    tokens = steps * world * BATCH * BLOCK
    return {"tokens_per_s": tokens / seconds, "train_seconds": seconds, "last_train_loss": losses[-1],
            "val_loss": float(t[0] / t[1])}


def bench_ddp(args, work: Path) -> None:
    from pcpc.runtime.run.launch import launch_local
    from pcpc.runtime.train.data import load_shards
    from pcpc.runtime.train.tokenizer import Tokenizer

    pcpc = str(Path(sys.executable).parent / "pcpc")
    shards = work / "shards"
    subprocess.run([pcpc, "data", "prepare", str(DATA), "--tokenizer", "byte", "--out", str(shards),
                    "--val-tokens", "100000", "--quiet"], check=True, capture_output=True)
    raw = config(shards, args.steps)
    (work / "ddp.json").write_text(json.dumps(raw))
    # the build outside the timing: a 1-step run, then the measured one
    subprocess.run([pcpc, "run", "ddp.json", "--out", "runs/warm", "--quiet", "--set", "max_steps=1"], cwd=work,
                   check=True)
    results = {"pcpc": [], "eager": []}
    for i in range(args.repeat):  # alternate, so background load hits both alike
        subprocess.run([pcpc, "run", "ddp.json", "--out", f"runs/r{i}", "--quiet"], cwd=work, check=True)
        s = json.loads((work / f"runs/r{i}/summary.json").read_text())
        results["pcpc"].append({"tokens_per_s": s["tokens_per_s"], "last_train_loss": s["final_train_loss"],
                                "val_loss": s["final_val_loss"], "train_seconds": s["train_seconds"]})
        results["eager"].append(launch_local(eager_worker, (raw, args.steps), WORKERS, say=lambda m: None)[0])
    med = {k: sorted(v, key=lambda r: r["tokens_per_s"])[len(v) // 2] for k, v in results.items()}
    ratio = med["pcpc"]["tokens_per_s"] / med["eager"]["tokens_per_s"]
    print(f"\nDDP, gpt-mini (6 x 192, block {BLOCK}), {WORKERS} workers x batch {BATCH}, {args.steps} steps, gloo; "
          f"median of {args.repeat}")
    print("| system | tokens/s | train s | last train loss | val loss |\n|---|---|---|---|---|")
    for name, r in med.items():
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['train_seconds']:.1f} | {r['last_train_loss']:.4f} | "
              f"{r['val_loss']:.4f} |")
    print(f"pcpc / torch DDP eager: {ratio:.2f}x (target >= {TARGET}x: {'met' if ratio >= TARGET else 'NOT met'})")
    # the loader beside the step it feeds
    data = load_shards(shards, Tokenizer("byte"))
    sampler = data.sampler(0, WORKERS, BLOCK, BATCH, 0)
    n = 2000
    t0 = time.perf_counter()
    for s in range(n):
        sampler.batch(s)
    loader = n / (time.perf_counter() - t0)
    steps_per_s = med["pcpc"]["tokens_per_s"] / (WORKERS * BATCH * BLOCK)
    print(f"shard loader: {loader:,.0f} batches/s per worker against {steps_per_s:.1f} train steps/s "
          f"({loader / steps_per_s:,.0f}x headroom)")


def bench_prepare(args, work: Path) -> None:
    from pcpc.errors import UserError
    from pcpc.runtime.train.shards import prepare
    from pcpc.runtime.train.tokenizer import named_tokenizer

    speeches = [s for s in DATA.read_text().split("\n\n") if s.strip()]
    jsonl = work / "speeches.jsonl"
    with open(jsonl, "w") as f:
        size = 0
        while size < args.prepare_mb * 1e6:
            for s in speeches:
                line = json.dumps({"text": s + "\n"}) + "\n"
                f.write(line)
                size += len(line)
    try:
        tok = named_tokenizer("gpt2")
        import tiktoken

        enc = tiktoken.get_encoding("gpt2")
        peer_name = "tiktoken gpt2 encode_ordinary, one process"

        def peer(text):
            return enc.encode_ordinary(text)
    except UserError:
        from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

        hf = HF(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.train_from_iterator(speeches, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                                             show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        (work / "bpe").mkdir(exist_ok=True)
        hf.save(str(work / "bpe" / "tokenizer.json"))
        tok = named_tokenizer(str(work / "bpe"))
        peer_name = "tokenizers BPE (4096 ids) encode per document, one process (gpt2's files not cached)"

        def peer(text):
            return hf.encode(text, add_special_tokens=False).ids
    t0 = time.perf_counter()
    n_peer = 0
    with open(jsonl) as f:
        for line in f:
            n_peer += len(peer(json.loads(line)["text"])) + 1
    peer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = prepare(jsonl, work / "prepared", tok, val_tokens=100_000, progress=False)
    ours_s = time.perf_counter() - t0
    n = info["tokens"]["train"] + info["tokens"]["val"]
    assert n == n_peer, (n, n_peer)
    print(f"\npcpc data prepare, {jsonl.stat().st_size / 1e6:.1f} MB JSONL ({info['documents']:,} documents, "
          f"{n:,} tokens)")
    print("| system | tokens/s |\n|---|---|")
    print(f"| pcpc data prepare (shards written) | {n / ours_s:,.0f} |")
    print(f"| {peer_name} (ids discarded) | {n_peer / peer_s:,.0f} |")
    print(f"ratio: {peer_s / ours_s:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--prepare-mb", type=float, default=20.0)
    ap.add_argument("--only", choices=["ddp", "prepare"], default=None)
    args = ap.parse_args()
    if not DATA.is_file():
        sys.exit(f"{DATA} is missing: `make run` (or `pcpc data fetch tiny_shakespeare`) puts it there")
    print(f"bench/ddp.py, {datetime.date.today()}; {target_cpu.summary()}; load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "ddp"):
            bench_ddp(args, Path(tmp))
        if args.only in (None, "prepare"):
            bench_prepare(args, Path(tmp))


if __name__ == "__main__":
    main()
