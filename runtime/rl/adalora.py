"""AdaLoRA's rank allocation (Zhang et al. 2023, peft's RankAllocator), on the host, after each optimizer step.

Every adapted layer holds init_r triplets (rows of A, entries of E, columns of B). After each step:

    ipt   = |p * grad|                       for every entry of A, E, B
    avg   = beta1 avg + (1 - beta1) ipt      sensitivity, smoothed
    unc   = beta2 unc + (1 - beta2) |ipt - avg|
    score of a triplet = its E entry's avg*unc + the means of its A row's and its B column's avg*unc

and a cubic schedule sets the budget of triplets kept: all of them for tinit steps, then down to
target_r per layer by total_step - tfinal (every deltaT steps), when the pattern is fixed. The triplets
under the budget's score get E = 0. Shapes never change: the compiled modules always see init_r triplets,
the pruned ones zero (and they stay zero: masked after every step). The saved adapter is cut to the pattern.
"""

from __future__ import annotations

import numpy as np


class RankAllocator:
    def __init__(self, names: list[str], cfg):
        from pcpc.exporters.peft import module_of

        self.cfg, self.names = cfg, names
        self.modules = list(dict.fromkeys(module_of(n) for n in names))
        self.index = {n: i for i, n in enumerate(names)}
        self.init_budget = cfg.init_r * len(self.modules)
        self.target_budget = cfg.target_r * len(self.modules)
        self.avg: dict[str, np.ndarray] = {}
        self.unc: dict[str, np.ndarray] = {}
        self.pattern: dict[str, list[bool]] | None = None
        self.final = False

    # --- the schedule (peft's budget_schedule)

    def budget(self, step: int) -> tuple[int, bool]:
        c = self.cfg
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        mul = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_budget - self.target_budget) * mul ** 3 + self.target_budget), step % c.deltaT == 0

    def _update_scores(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for n, p, g in zip(self.names, params, grads):
            ipt = np.abs(p * g)
            avg = self.avg.get(n, np.zeros_like(ipt))
            unc = self.unc.get(n, np.zeros_like(ipt))
            avg = b1 * avg + (1 - b1) * ipt
            self.avg[n], self.unc[n] = avg, b2 * unc + (1 - b2) * np.abs(ipt - avg)

    def _mask_to(self, budget: int) -> dict[str, list[bool]]:
        scores = {}
        for m in self.modules:
            s = lambda part: self.avg[f"{m}.{part}"] * self.unc[f"{m}.{part}"]  # noqa: E731
            scores[m] = s("lora_E").reshape(-1) + (s("lora_A").mean(1) + s("lora_B").mean(0))  # peft's order
        every = np.concatenate(list(scores.values())).astype(np.float32)
        k = self.init_budget - budget
        threshold = np.partition(every, k - 1)[k - 1] if k > 0 else -np.inf  # torch.kthvalue(k)
        return {m: (sc > threshold).tolist() for m, sc in scores.items()}

    def step(self, step: int, params: list[np.ndarray], grads: list[np.ndarray]) -> bool:
        """After optimizer step `step` (1-based), as peft's update_and_allocate: update the scores and, when
        the schedule says so, the pattern; True when the pattern is to be applied now (`apply`): at every
        allocation, and at every step once it is final."""
        c = self.cfg
        end = c.total_step - c.tfinal
        if step < end:
            self._update_scores(params, grads)
            budget, now = self.budget(step)
            if now:
                self.pattern = self._mask_to(budget)
            return now
        if step == end:  # the final pattern, from the scores so far
            self.pattern, self.final = self._mask_to(self.budget(step)[0]), True
            self.avg, self.unc = {}, {}
        return self.final

    def apply(self, params: list[np.ndarray]) -> list[int]:
        """Zero the pruned triplets' E entries in params (in place); the indices of the E tensors changed."""
        changed = []
        for m, keep in (self.pattern or {}).items():
            i = self.index[f"{m}.lora_E"]
            params[i] = params[i] * np.asarray(keep, np.float32)[:, None]
            changed.append(i)
        return changed

    # --- checkpoints

    def state(self) -> dict:
        return {"avg": [self.avg.get(n) for n in self.names], "unc": [self.unc.get(n) for n in self.names],
                "pattern": self.pattern, "final": self.final}

    def load(self, state: dict) -> None:
        self.avg = {n: np.asarray(a) for n, a in zip(self.names, state["avg"]) if a is not None}
        self.unc = {n: np.asarray(a) for n, a in zip(self.names, state["unc"]) if a is not None}
        self.pattern, self.final = state["pattern"], state["final"]
