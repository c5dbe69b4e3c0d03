"""First-build compile time: each module compiled whole against compiled in parts side by side (pcpc.mlir.split).

Each target is exported once; then, alternating, its MLIR is compiled into an empty folder whole (one
iree-compile) and in the parts pcpc.mlir.split picks for this machine (one iree-compile each, at once).
Prints the medians and their ratio, with the host CPU.

    python bench/build.py [--targets nanogpt-small,nanogpt-medium,qwen-generation] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="nanogpt-small,nanogpt-medium,qwen-generation")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error(f"--rounds: expected 1 or more, got {a.rounds}")

    from pcpc.mlir import build as build_mod
    from pcpc.mlir import cpu
    from pcpc.mlir.build import build, paths_for
    from pcpc.mlir.signature import load_meta
    from pcpc.mlir.targets import get_target

    print(f"bench/build.py  {time.strftime('%Y-%m-%d %H:%M')}  {cpu.summary()}; "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; "
          f"medians of {a.rounds} alternating compiles")
    print("\n| module | whole s | in parts s | ratio | parts |\n|---|---|---|---|---|")
    real_parts_of = build_mod.parts_of
    with tempfile.TemporaryDirectory(prefix="pcpc-bench-build-") as tmp:
        tmp = Path(tmp)
        for name in a.targets.split(","):
            target = get_target(name)
            exported = build(target, tmp / "export").seconds.get("export")
            times: dict[str, list[float]] = {"whole": [], "parts": []}
            split = ""
            for r in range(a.rounds):
                for how in (("whole", "parts") if r % 2 == 0 else ("parts", "whole")):
                    out = tmp / f"{name}-{how}-{r}"
                    out.mkdir()
                    mlir, sidecar, _, _ = paths_for(name, tmp / "export")
                    shutil.copy(mlir, out)
                    shutil.copy(sidecar, out)
                    build_mod.parts_of = real_parts_of if how == "parts" else (lambda *args: None)
                    res = build(target, out)
                    assert res.ran == ["compile"], res.ran
                    times[how].append(res.seconds["compile"])
                    if how == "parts":
                        files = load_meta(res.meta).vmfbs(res.vmfb.name)
                        split = " / ".join(", ".join(fns) for _, _, fns in files) if len(files) > 1 else ""
                    shutil.rmtree(out)
            build_mod.parts_of = real_parts_of
            whole, parted = (statistics.median(times[k]) for k in ("whole", "parts"))
            each = {k: ", ".join(f"{t:.1f}" for t in v) for k, v in times.items()}
            print(f"| {name} (export {exported:.1f} s) | {whole:.1f} ({each['whole']}) "
                  f"| {parted:.1f} ({each['parts']}) | {whole / parted:.2f}x "
                  f"| {split or 'whole (not split here)'} |", flush=True)


if __name__ == "__main__":
    main()
