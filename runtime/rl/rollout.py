"""Rollout workers and the learner's side of the conversation, over torch.distributed.

Rank 0 is the learner; ranks 1..W are rollout workers, each running the
compiled generation module (prefill_bs{B} / decode_bs{B}) with its own copy
of the policy weights. One exchange per iteration, all collectives from rank 0:

    broadcast_object_list([order])        order = {"op": "rollout", "sync": bool, "tasks": {rank: [task]}}
    broadcast(parameter) x n              only when sync: every parameter, fp32, in meta.json order
    gather_object(results)                each worker's finished tasks (completion ids, timings)

On the CPU the weights cross without extra copies: the learner broadcasts
straight from its device arrays' host views, and a worker receives into
aligned host buffers that its device arrays wrap (imported once, zero-copy),
so a sync costs no weight-sized allocation on either side.

and a final {"op": "stop"}. A task is one generation call: `batch_size`
prompt rows plus the seed of its sampler, so the completions of an
iteration do not depend on how many workers share it. A worker that dies
is noticed by the launcher within seconds (runtime/run/launch.py) or, across
machines, by the collective timeout.
"""

from __future__ import annotations

import os
import signal
import time
import warnings
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Task:
    """One generation call: rows of prompt token ids (exactly the module's batch) and a seed."""

    index: int
    prompts: list[list[int]]
    seed: int


@dataclass(frozen=True)
class SamplingPlan:
    """What every worker needs to generate (picklable)."""

    generation_vmfb: str
    max_tokens: int
    temperature: float
    top_p: float
    eos_token_ids: tuple[int, ...]
    threads: int


def task_seed(seed: int, iteration: int, index: int) -> int:
    """A sampler seed that depends only on (seed, iteration, batch index)."""
    return int(np.random.SeedSequence([seed, iteration, index]).generate_state(1)[0])


def make_tasks(rows: list[list[int]], batch: int, seed: int, iteration: int) -> tuple[list[Task], int]:
    """Split prompt rows into generation calls of exactly `batch` rows; the last is padded by repeating its
    final row. Returns (tasks, number of real rows)."""
    tasks = []
    for index, start in enumerate(range(0, len(rows), batch)):
        chunk = rows[start:start + batch]
        chunk = chunk + [chunk[-1]] * (batch - len(chunk))
        tasks.append(Task(index, chunk, task_seed(seed, iteration, index)))
    return tasks, len(rows)


class RolloutClient:
    """The learner's handle on the workers (rank 0 of the process group)."""

    def __init__(self, world: int):
        self.world, self.workers = world, list(range(1, world))

    def rollout(self, tasks: list[Task], weights=None) -> tuple[dict[int, dict], float]:
        """Hand tasks round-robin to the workers (first syncing `weights`, device or host arrays, when given);
        returns ({task index: result}, seconds spent broadcasting weights)."""
        import torch
        import torch.distributed as dist

        from pcpc.runtime.module import host_view

        by_rank = {r: [] for r in self.workers}
        for i, t in enumerate(tasks):
            by_rank[self.workers[i % len(self.workers)]].append(t)
        dist.broadcast_object_list([{"op": "rollout", "sync": weights is not None, "tasks": by_rank}], src=0)
        sync_s = 0.0
        if weights is not None:
            t0 = time.perf_counter()
            with warnings.catch_warnings():  # torch warns on read-only memory; a source broadcast only reads it
                warnings.simplefilter("ignore", UserWarning)
                for w in weights:
                    dist.broadcast(torch.from_numpy(np.ascontiguousarray(host_view(w), np.float32)), src=0)
            sync_s = time.perf_counter() - t0
        gathered = [None] * self.world
        dist.gather_object(None, gathered, dst=0)
        results = {}
        for part in gathered[1:]:
            for res in part:
                results[res["index"]] = res
        missing = sorted({t.index for t in tasks} - set(results))
        assert not missing, f"rollout tasks {missing} came back from no worker"
        return results, sync_s

    def stop(self) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([{"op": "stop"}], src=0)


def serve(rank: int, plan: SamplingPlan) -> None:
    """A rollout worker's loop: wait for orders from rank 0, generate, send completions back."""
    import torch
    import torch.distributed as dist

    from pcpc.runtime.module import CompiledModule

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the learner decides when to stop (after a checkpoint)
    from pcpc.exporters.hf_weights import aligned_empty
    from pcpc.runtime.generate import QwenModel, import_host_array

    mod = CompiledModule(plan.generation_vmfb, threads=plan.threads)
    specs = mod.meta.parameters
    # Receive buffers, aligned so the device can use them in place (CPU); other devices get a copy per sync.
    buffers = [aligned_empty(max(s.nbytes, 4))[:s.nbytes].view(np.float32).reshape(s.shape) for s in specs]
    zero_copy = mod.driver == "local-task"
    model = QwenModel.from_module(mod, [import_host_array(mod, b) for b in buffers]) if zero_copy else None
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        order = box[0]
        if order["op"] == "stop":
            return
        if order["sync"]:
            for b in buffers:
                dist.broadcast(torch.from_numpy(b), src=0)
            if not zero_copy:
                model = QwenModel.from_module(mod, mod.upload_all(buffers))
        results = []
        for task in order["tasks"].get(rank, []):
            t0 = time.perf_counter()
            completions = generate_completions(model, task.prompts, plan, task.seed)
            results.append({"index": task.index, "completions": completions, "seconds": time.perf_counter() - t0,
                            "worker": rank, "pid": os.getpid()})
        dist.gather_object(results, None, dst=0)


def generate_completions(model, prompts: list[list[int]], plan: SamplingPlan, seed: int) -> list[list[int]]:
    """Sample one completion per prompt row with the compiled generation module (runtime/generate.py's verbs).

    Each completion holds the generated ids up to and including the first EOS
    (the loss trains on it: that is how the policy learns to stop), or
    max_tokens ids without one. len(prompts) must be one of the module's batch sizes.
    """
    from pcpc.runtime.generate import SamplingConfig, decode_one_token, prefill, sample

    batch = len(prompts)
    sampling = SamplingConfig(plan.temperature, plan.top_p, seed)
    rng = np.random.default_rng(seed)
    eos = set(plan.eos_token_ids)
    cache = model.new_cache(batch, max(len(p) for p in prompts) + plan.max_tokens)
    logits, cache = prefill(model, prompts, batch, cache)
    cur = sample(logits, rng, sampling)  # (B,) the token at position len(prompt)
    pos = np.array([len(p) for p in prompts], np.int64)
    out = [[] for _ in prompts]
    done = np.zeros(batch, bool)
    for step in range(plan.max_tokens):
        for b in np.flatnonzero(~done):
            out[b].append(int(cur[b]))
            done[b] = int(cur[b]) in eos
        if done.all() or step == plan.max_tokens - 1:
            break
        # finished rows decode padding (position -1 writes nothing to the cache)
        logits, cache = decode_one_token(model, np.where(done, 0, cur), np.where(done, -1, pos), cache)
        cur = sample(logits, rng, sampling)
        pos = pos + 1
    return out
