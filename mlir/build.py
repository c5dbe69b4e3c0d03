"""The build graph: target -> export (MLIR) -> compile (VMFB) -> meta.json, cached by content hash.

Each step is a pure function of hashed inputs:
  export_key  = sha256(recipe, config, sources of the modules it depends on, torch/turbine/pcpc versions)
  compile_key = sha256(MLIR bytes, target, flags, compiler version, host CPU features)
A step whose key matches what is on disk is skipped, so a no-op rebuild only
hashes a few files (no torch import). Outputs are written to a temporary file
and renamed into place, meta.json last; a per-target file lock makes
concurrent builds of the same target (make -j2) safe.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pcpc.mlir.compile import compile_flags, compile_mlir, isa_flags, mutates_arguments, packs_at_export
from pcpc.mlir.cpu import features_hash, target_cpu
from pcpc.mlir.signature import SCHEMA_VERSION, TensorSpec, parse_meta
from pcpc.mlir.split import parts_of

ARTIFACTS = Path("artifacts")


@dataclass(frozen=True)
class Target:
    """A buildable module: a recipe (module:function) applied to a JSON-able config."""

    name: str
    recipe: str
    config: dict
    sources: tuple[str, ...]
    """Modules whose source the export depends on (hashed into export_key)."""
    description: str = ""
    llvm_cpu_flags: tuple[str, ...] = ()
    """Extra iree-compile flags for llvm-cpu builds of this target, after the defaults (a later
    flag wins, e.g. `--iree-opt-data-tiling=false`); part of the compile key like every flag."""


@dataclass
class BuildResult:
    mlir: Path
    vmfb: Path
    meta: Path
    ran: list[str] = field(default_factory=list)
    """Steps that actually ran ("export", "compile"); empty for a no-op rebuild."""
    seconds: dict[str, float] = field(default_factory=dict)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    out = {}
    for dist in ("torch", "iree-turbine", "iree-base-compiler", "pcpc"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _source_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"build source module {module!r} not found")
    return Path(spec.origin)


def export_key(target: Target, versions: dict) -> str:
    sources = {m: sha256_file(_source_file(m)) for m in sorted(set(target.sources))}
    blob = {
        "schema": SCHEMA_VERSION,
        "recipe": target.recipe,
        "config": target.config,
        "sources": sources,
        "versions": {k: versions[k] for k in ("torch", "iree-turbine", "pcpc")},
    }
    return sha256_bytes(json.dumps(blob, sort_keys=True).encode())


def compile_key(mlir_sha: str, compile_target: str, flags: tuple[str, ...], versions: dict, cpu: str) -> str:
    blob = {
        "mlir": mlir_sha,
        "target": compile_target,
        "flags": list(flags),
        "compiler": versions["iree-base-compiler"],
        "cpu": cpu if compile_target == "llvm-cpu" else "",
    }
    return sha256_bytes(json.dumps(blob, sort_keys=True).encode())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path):
    """A temp path in `path`'s directory to write `path` through; renamed into place when the block
    ends, removed if it raises (the old `path`, if any, is untouched). The file gets the mode a plain
    open() would (0666 less the umask), not mkstemp's 0600, so a group sharing the folder can read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_file(path: Path):
    """A binary file to write `path` through (atomic_path), fsynced before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temp file in the same directory, fsync, then rename into place."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _acquire(path: Path):
    """An exclusive lock on the file `path` (made if missing), held until _release: a target's builds, one at a
    time across processes and threads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _release(f) -> None:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resolve_recipe(recipe: str) -> Callable:
    module, _, fn = recipe.partition(":")
    return getattr(importlib.import_module(module), fn)


def paths_for(name: str, out_dir: Path) -> tuple[Path, Path, Path, Path]:
    """(mlir, export sidecar, vmfb, meta) paths of artifact `name` in out_dir."""
    return (
        out_dir / f"{name}.mlir",
        out_dir / f".{name}.export.json",
        out_dir / f"{name}.vmfb",
        out_dir / f"{name}.meta.json",
    )


def encoder_path_for(vmfb: Path) -> Path:
    """NAME.encoder.vmfb next to NAME.vmfb: the weight-packing module of a PACK_AT_EXPORT build."""
    return vmfb.with_name(vmfb.name.removesuffix(".vmfb") + ".encoder.vmfb")


def _run_export(target: Target, key: str, mlir_path: Path, sidecar: Path) -> dict:
    from pcpc.mlir.lower import lower

    functions, params = resolve_recipe(target.recipe)(target.config)
    mlir_text, signatures = lower(functions)
    data = mlir_text.encode()
    write_atomic(mlir_path, data)
    record = {
        "export_key": key,
        "mlir_sha256": sha256_bytes(data),
        "functions": {k: _asdict(v) for k, v in signatures.items()},
        "parameters": [_asdict(p) for p in params],
    }
    write_atomic(sidecar, json.dumps(record, indent=1))
    return record


def _asdict(obj):
    from dataclasses import asdict

    return asdict(obj)


def bf16_warning(target: Target, compile_target: str) -> str | None:
    """A warning for a bfloat16 module compiled for a CPU without avx512_bf16 (Qwen `dtype` or nanoGPT
    `compute_dtype`): there IREE emulates its bf16 matmuls. With PCPC_CPU=znver3 the resident bf16
    qwen-generation decoded at 0.10x and prefilled at 0.02x the fp32 module's speed (bench/NOTES.md)."""
    cfg = target.config
    bf16 = "bfloat16" in (cfg.get("dtype"), cfg.get("compute_dtype"), (cfg.get("model_overrides") or {}).get(
        "compute_dtype"))
    cpu = target_cpu()
    if compile_target != "llvm-cpu" or not bf16 or cpu.bf16:
        return None
    return (f"warning: {target.name} computes in bfloat16, but the CPU it is compiled for ({cpu.name}) has no "
            f"avx512_bf16: its matmuls are emulated, about 10x slower than float32 (bench/NOTES.md); use float32")


MAX_COMPILES = 2
"""iree-compile processes one process runs at once (start_build). A compile keeps ~1.2 of two cores busy, an
export (Python) one: two compiles, or an export beside a compile, fill a 2-core machine (bench/NOTES.md,
"Builds side by side")."""
_compiles = threading.BoundedSemaphore(MAX_COMPILES)


class PendingBuild:
    """A build whose export is done and whose compile (an iree-compile process) runs in a thread, so the
    caller can export the next target meanwhile. `wait()` returns the BuildResult or raises the compile's
    error. The target's lock is held until the compile ends, waited for or not."""

    def __init__(self, result: BuildResult, compile_step: Callable[[], None] | None = None):
        self.result, self._error = result, None
        self._thread = None
        if compile_step is not None:
            self._thread = threading.Thread(target=self._run, args=(compile_step,), name=f"compile {result.vmfb.name}")
            self._thread.start()

    def _run(self, compile_step) -> None:
        try:
            compile_step()
        except BaseException as e:  # handed to wait(), in the caller's thread
            self._error = e

    def wait(self) -> BuildResult:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self.result


def build(
    target: Target,
    out_dir: Path | str = ARTIFACTS,
    compile_target: str = "llvm-cpu",
    arch: str | None = None,
    log: Callable[[str], None] | None = None,
) -> BuildResult:
    """Bring `out_dir/<name>.{mlir,vmfb,meta.json}` up to date; run only the steps whose inputs changed."""
    return start_build(target, out_dir, compile_target, arch, log).wait()


def start_build(
    target: Target,
    out_dir: Path | str = ARTIFACTS,
    compile_target: str = "llvm-cpu",
    arch: str | None = None,
    log: Callable[[str], None] | None = None,
) -> PendingBuild:
    """build(), returning once the export is done: the compile, if one is needed, goes on in a thread
    (at most MAX_COMPILES at once). Start a run's modules one after another, then wait for each."""
    out_dir = Path(out_dir)
    log = log or (lambda msg: None)
    mlir_path, sidecar, vmfb_path, meta_path = paths_for(target.name, out_dir)
    encoder_path = encoder_path_for(vmfb_path)
    flags = compile_flags(compile_target, arch) + (isa_flags(target.llvm_cpu_flags) if compile_target == "llvm-cpu" else ())
    versions = _versions()
    cpu = features_hash()
    result = BuildResult(mlir_path, vmfb_path, meta_path)

    lock = _acquire(out_dir / ".locks" / f"{target.name}.lock")
    try:
        ekey = export_key(target, versions)
        record = _load_json(sidecar)
        mlir_ok = (
            record is not None
            and record.get("export_key") == ekey
            and mlir_path.is_file()
            and sha256_file(mlir_path) == record.get("mlir_sha256")
        )
        if not mlir_ok:
            log(f"export  {target.name} -> {mlir_path}")
            t0 = time.perf_counter()
            record = _run_export(target, ekey, mlir_path, sidecar)
            result.seconds["export"] = time.perf_counter() - t0
            result.ran.append("export")

        ckey = compile_key(record["mlir_sha256"], compile_target, flags, versions, cpu)
        if _compiled(meta_path, vmfb_path, encoder_path, ckey, ekey):
            _release(lock)
            return PendingBuild(result)

        encodes = packs_at_export(flags)
        parts = None if encodes or mutates_arguments(mlir_path) else parts_of(
            mlir_path.read_text(), MAX_COMPILES, os.cpu_count() or 1)
        side_by_side = f", {len(parts)} parts side by side" if parts else ""
        log(f"compile {target.name} -> {vmfb_path} ({compile_target}{side_by_side})")
        warning = bf16_warning(target, compile_target)
        if warning:
            print(warning, file=sys.stderr)
    except BaseException:
        _release(lock)
        raise

    def compile_step() -> None:
        try:
            t0 = time.perf_counter()
            if parts is None:
                with _compiles, atomic_path(vmfb_path) as out, \
                        (atomic_path(encoder_path) if encodes else nullcontext()) as encoder_out:
                    compile_mlir(mlir_path, out, flags, encoder_out)
            else:
                _compile_parts(parts, vmfb_path, flags)
            result.seconds["compile"] = time.perf_counter() - t0
            result.ran.append("compile")
            _write_meta(meta_path, target, record, ekey, ckey, versions, compile_target, flags, cpu,
                        vmfb_path, encoder_path if encodes else None, [g for _, g in parts[1:]] if parts else [])
        finally:
            _release(lock)

    return PendingBuild(result, compile_step)


def part_path_for(vmfb: Path, index: int) -> Path:
    """NAME.partI.vmfb next to NAME.vmfb: part I of a module compiled in parts (pcpc.mlir.split)."""
    return vmfb.with_name(vmfb.name.removesuffix(".vmfb") + f".part{index}.vmfb")


def _compile_parts(parts: list[tuple[str, list[str]]], vmfb_path: Path, flags) -> None:
    """Compile each part (module text, functions) in its own iree-compile, side by side (each holding one of
    the MAX_COMPILES slots); part 0 becomes vmfb_path, part I NAME.partI.vmfb. The files are put in place only
    when every part compiled, so a failure leaves the previous build as it was."""
    # a fixed folder (the target's lock is held): the MLIR's file name goes into the module's debug
    # locations, so a random one would make each build's bytes differ
    stem = vmfb_path.name.removesuffix(".vmfb")
    tmp = vmfb_path.parent / f".{stem}.parts"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        errors: dict[int, BaseException] = {}

        def one(i: int, text: str) -> None:
            try:
                with _compiles:
                    src = tmp / (f"{stem}.part{i}.mlir" if i else f"{stem}.mlir")  # the names a compile error gives
                    src.write_text(text)
                    compile_mlir(src, tmp / f"part{i}.vmfb", flags)
            except BaseException as e:  # raised below, in the build's thread
                errors[i] = e

        threads = [threading.Thread(target=one, args=(i, text), name=f"compile {vmfb_path.name} part {i}")
                   for i, (text, _) in enumerate(parts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[min(errors)]
        for i in reversed(range(len(parts))):  # NAME.vmfb last
            dest = part_path_for(vmfb_path, i) if i else vmfb_path
            with atomic_path(dest) as out:
                os.replace(tmp / f"part{i}.vmfb", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compiled(meta_path: Path, vmfb_path: Path, encoder_path: Path, ckey: str, ekey: str) -> bool:
    """Whether the VMFB (and encoder) on disk are the ones meta.json records for these keys."""
    prov = (_load_json(meta_path) or {}).get("provenance", {})
    return (
        prov.get("compile_key") == ckey
        and prov.get("export_key") == ekey
        and vmfb_path.is_file()
        and sha256_file(vmfb_path) == prov.get("vmfb_sha256")
        and (not prov.get("encoder_sha256") or (encoder_path.is_file()
                                                and sha256_file(encoder_path) == prov["encoder_sha256"]))
        and all(isinstance(p, dict) and (vmfb_path.parent / str(p.get("file"))).is_file()
                and sha256_file(vmfb_path.parent / str(p["file"])) == p.get("sha256") for p in prov.get("parts", []))
    )


def _write_meta(meta_path: Path, target: Target, record: dict, ekey: str, ckey: str, versions: dict,
                compile_target: str, flags, cpu: str, vmfb_path: Path, encoder_path: Path | None,
                parts: list[list[str]]) -> None:
    """Write meta.json (last: it is what makes the build current), recording parts 1.. (their functions), and
    remove part files of an earlier build that this one no longer has."""
    part_files = [part_path_for(vmfb_path, i + 1) for i in range(len(parts))]
    meta_obj = parse_meta(
        {
            "schema_version": SCHEMA_VERSION,
            "functions": record["functions"],
            "parameters": record["parameters"],
            "parameter_bytes": sum(TensorSpec(**{**p, "shape": tuple(p["shape"])}).nbytes for p in record["parameters"]),
            "provenance": {
                "target_name": target.name,
                "recipe": target.recipe,
                "config": target.config,
                "export_key": ekey,
                "compile_key": ckey,
                "mlir_sha256": record["mlir_sha256"],
                "vmfb_sha256": sha256_file(vmfb_path),
                "versions": versions,
                "compile_target": compile_target,
                "compile_flags": list(flags),
                "cpu_features": cpu,
                "encoder_sha256": sha256_file(encoder_path) if encoder_path else "",
                "parts": [{"file": f.name, "sha256": sha256_file(f), "functions": g}
                          for f, g in zip(part_files, parts)],
            },
        },
        where=f"{meta_path} (being written)",
    )
    write_atomic(meta_path, meta_obj.to_json())
    prefix = vmfb_path.name.removesuffix(".vmfb") + ".part"
    for old in vmfb_path.parent.iterdir():
        if (old.name.startswith(prefix) and old.name.endswith(".vmfb") and old.name[len(prefix):-5].isdigit()
                and old not in part_files):
            old.unlink(missing_ok=True)
