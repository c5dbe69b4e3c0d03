"""Build artifacts a run names in its config: built when missing or stale, refused when foreign.

A config's artifact path (models/nanogpt_small.mlir, models/qwen_grpo_training.vmfb)
names an output of the build graph: the folder is the output directory and
the file stem the target name. `build_artifact` builds it there when it is
missing or stale (cached by content hash, mlir/build.py) and says so once.
A file at that path that pcpc did not produce is an error, never
overwritten: pcpc derives gradients and generation steps from its
exporters' functional PyTorch models before lowering, so it cannot use an
MLIR/VMFB file it did not build.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Callable

from pcpc.errors import UserError


def made_by_pcpc(path: Path) -> bool:
    """True if `path` (.mlir, or .vmfb with its meta.json) carries pcpc's build record and matches it."""
    from pcpc.mlir.build import paths_for, sha256_file
    from pcpc.mlir.signature import meta_path_for

    try:
        if path.suffix == ".mlir":
            record = json.loads(paths_for(path.stem, path.parent)[1].read_text())
            return record.get("mlir_sha256") == sha256_file(path) and "export_key" in record
        return "vmfb_sha256" in json.loads(meta_path_for(path).read_text()).get("provenance", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def check_not_foreign(field: str, path: Path, why: str) -> None:
    """Refuse a file at `path` that pcpc did not build; `why` says what pcpc would have derived."""
    if path.exists() and not made_by_pcpc(path):
        raise UserError(
            f"{field}: {path} was not produced by pcpc (no matching build record next to it). {why} Move the "
            f"file away and pcpc builds {path.name} there.")


WHY_DERIVED = ("pcpc derives the gradient and generation functions from its functional models before lowering, "
               "so it cannot use an MLIR/VMFB file it did not build.")


class PendingArtifact:
    """An artifact whose compile goes on (mlir/build.py PendingBuild); `wait()` says it is built and returns the
    BuildResult."""

    def __init__(self, pending, say: Callable[[str], None]):
        self._pending, self._say = pending, say

    def wait(self):
        result = self._pending.wait()
        if result.ran:
            self._say(f"  built {result.vmfb} ({', '.join(f'{k} {v:.1f}s' for k, v in result.seconds.items())})")
        return result


def build_artifact(field: str, path: str | Path, target, compile_target: str, say: Callable[[str], None],
                   why: str = WHY_DERIVED):
    """Build (or find up to date) the artifact `path` names; returns the BuildResult."""
    return start_artifact(field, path, target, compile_target, say, why).wait()


def start_artifact(field: str, path: str | Path, target, compile_target: str, say: Callable[[str], None],
                   why: str = WHY_DERIVED) -> PendingArtifact:
    """build_artifact, returning once the export is done while the compile goes on: a run starts its modules
    one after another, each export beside the compiles before it, then waits for them."""
    from pcpc.mlir.build import start_build

    path = Path(path)
    check_not_foreign(field, path, why)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{field}: cannot create the folder of {path}: {e.strerror}") from None
    if not path.with_suffix(".vmfb").exists():
        say(f"building {path.with_suffix('.vmfb')} (once, cached afterwards)")
    with warnings.catch_warnings():  # tracing's FutureWarnings are noise to someone running an experiment
        warnings.simplefilter("ignore", FutureWarning)
        pending = start_build(dataclasses.replace(target, name=path.stem), path.parent, compile_target=compile_target,
                              log=lambda m: say("  " + m))
    return PendingArtifact(pending, say)
