"""The build graph: caching by content hash, exact invalidation, atomic writes, concurrent builds."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_target
from pcpc.errors import UserError
from pcpc.mlir import build as build_mod
from pcpc.mlir.build import Target, build
from pcpc.mlir.signature import load_meta
from pcpc.mlir.targets import get_target
from pcpc.runtime.module import CompiledModule


def mtimes(result):
    return {p: os.stat(p).st_mtime_ns for p in (result.mlir, result.vmfb, result.meta)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    return out, build(tiny_target(), out)


def test_first_build_runs_every_step(built):
    out, result = built
    assert result.ran == ["export", "compile"]
    meta = load_meta(result.meta)
    assert set(meta.functions) == {"forward_loss"}
    prov = meta.provenance
    assert prov.compile_target == "llvm-cpu" and "--iree-llvmcpu-target-cpu=host" in prov.compile_flags
    assert set(prov.versions) == {"torch", "iree-turbine", "iree-base-compiler", "pcpc"}
    assert prov.config["model_overrides"]["n_embd"] == 16
    assert meta.parameter_bytes == sum(p.nbytes for p in meta.parameters)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_noop_rebuild_rewrites_nothing(built):
    out, first = built
    before = mtimes(first)
    again = build(tiny_target(), out)
    assert again.ran == []
    assert mtimes(again) == before


def test_compile_flag_change_recompiles_only(built, monkeypatch):
    out, first = built
    mlir_before = os.stat(first.mlir).st_mtime_ns
    real = build_mod.compile_flags
    monkeypatch.setattr(build_mod, "compile_flags", lambda t, a=None: real(t, a) + ("--iree-opt-strip-assertions",))
    result = build(tiny_target(), out)
    assert result.ran == ["compile"]
    assert os.stat(result.mlir).st_mtime_ns == mlir_before
    assert "--iree-opt-strip-assertions" in load_meta(result.meta).provenance.compile_flags
    monkeypatch.setattr(build_mod, "compile_flags", real)
    assert build(tiny_target(), out).ran == ["compile"]  # back to the default flags


def test_compiler_version_change_recompiles_only(built, monkeypatch):
    out, _ = built
    real = build_mod._versions
    monkeypatch.setattr(build_mod, "_versions", lambda: {**real(), "iree-base-compiler": "0.0-other"})
    assert build(tiny_target(), out).ran == ["compile"]
    monkeypatch.setattr(build_mod, "_versions", real)
    assert build(tiny_target(), out).ran == ["compile"]


def test_config_change_rebuilds_and_other_targets_untouched(tmp_path):
    a = build(tiny_target("a"), tmp_path)
    b = build(tiny_target("b", vocab_size=13), tmp_path)
    assert b.ran == ["export", "compile"]
    a_times = mtimes(a)
    b2 = build(tiny_target("b", vocab_size=17), tmp_path)
    assert b2.ran == ["export", "compile"]
    assert mtimes(build(tiny_target("a"), tmp_path)) == a_times


def test_source_change_reexports(tmp_path, monkeypatch):
    """Editing a source module the target depends on re-runs the export."""
    mod_file = tmp_path / "pcpc_test_extra_source.py"
    mod_file.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = tiny_target("src")
    target = Target(base.name, base.recipe, base.config, base.sources + ("pcpc_test_extra_source",))
    out = tmp_path / "out"
    assert build(target, out).ran == ["export", "compile"]
    assert build(target, out).ran == []
    mod_file.write_text("X = 2\n")
    assert build(target, out).ran[0] == "export"


def test_failed_compile_leaves_previous_artifacts_intact(built, monkeypatch):
    out, _ = built
    good = build(tiny_target(), out)
    before = {p: p.read_bytes() for p in (good.vmfb, good.meta)}

    def broken(mlir, vmfb, flags, encoder=None):
        Path(vmfb).write_bytes(b"half-written")
        raise RuntimeError("iree-compile failed (simulated)")

    monkeypatch.setattr(build_mod, "compile_mlir", broken)
    monkeypatch.setattr(build_mod, "compile_flags", lambda t, a=None: ("--something-new",))
    with pytest.raises(RuntimeError, match="simulated"):
        build(tiny_target(), out)
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_started_build_compiles_while_the_next_target_exports(tmp_path, monkeypatch):
    """start_build returns after the export; the compile goes on in a thread (here held until the next
    target has exported), and the modules equal those of builds one after another."""
    import threading

    real, release, compiling = build_mod.compile_mlir, threading.Event(), []

    def held(mlir, vmfb, flags, encoder=None):
        compiling.append(Path(mlir).stem)
        if Path(mlir).stem == "a":
            assert release.wait(timeout=300)
        real(mlir, vmfb, flags, encoder)

    monkeypatch.setattr(build_mod, "compile_mlir", held)
    a = build_mod.start_build(tiny_target("a"), tmp_path / "side")
    b = build_mod.start_build(tiny_target("b", vocab_size=13), tmp_path / "side")  # exported while a compiles
    assert (tmp_path / "side" / "b.mlir").is_file() and not (tmp_path / "side" / "a.meta.json").exists()
    release.set()
    ra, rb = a.wait(), b.wait()
    assert ra.ran == rb.ran == ["export", "compile"] and sorted(compiling) == ["a", "b"]
    monkeypatch.setattr(build_mod, "compile_mlir", real)
    rng = np.random.default_rng(0)
    for side, target in ((ra, tiny_target("a")), (rb, tiny_target("b", vocab_size=13))):
        alone = build(target, tmp_path / "alone")
        assert side.mlir.read_bytes() == alone.mlir.read_bytes()
        mods = [CompiledModule(r.vmfb) for r in (side, alone)]
        sig = mods[0].signature("forward_loss")
        args = [rng.integers(0, 11, s.shape) if s.dtype == "int64" else rng.standard_normal(s.shape, np.float32)
                for s in sig.args]
        first, second = (m.call_host("forward_loss", *args)[0] for m in mods)
        assert first == second
    assert build_mod.start_build(tiny_target("a"), tmp_path / "side").wait().ran == []


def test_a_started_builds_failure_comes_out_of_wait_and_frees_the_target(tmp_path, monkeypatch):
    def broken(mlir, vmfb, flags, encoder=None):
        Path(vmfb).write_bytes(b"half-written")
        raise UserError("iree-compile could not compile a.mlir (simulated)")

    monkeypatch.setattr(build_mod, "compile_mlir", broken)
    pending = build_mod.start_build(tiny_target("a"), tmp_path)
    with pytest.raises(UserError, match="simulated"):
        pending.wait()
    assert not (tmp_path / "a.vmfb").exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert build(tiny_target("a"), tmp_path).ran == ["compile"]  # the lock was let go; the export is kept


def test_concurrent_builds_of_one_target(tmp_path):
    """Two processes building the same target at once (make -j2) leave one correct result."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from conftest import tiny_target
        from pcpc.mlir.build import build
        print(build(tiny_target("race"), {str(tmp_path)!r}).ran)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    ran = sorted(o.strip().splitlines()[-1] for o in outs)
    assert ran == ["['export', 'compile']", "[]"]  # the second waited on the lock, then found it built
    mod = CompiledModule(tmp_path / "race.vmfb")
    assert "forward_loss" in mod.meta.functions


def test_unknown_target_lists_valid():
    with pytest.raises(UserError, match=r"unknown build target 'nanogpt-large'; valid: .*nanogpt-small"):
        get_target("nanogpt-large")
    assert get_target("nanogpt-small.vmfb").name == "nanogpt-small"


def test_meta_is_versioned_json(built):
    _, result = built
    raw = json.loads(result.meta.read_text())
    assert raw["schema_version"] == 1
    assert raw["provenance"]["vmfb_sha256"] == build_mod.sha256_file(result.vmfb)


@pytest.mark.parametrize(
    "target, flag",
    [("cuda", "--iree-cuda-target=sm_80"), ("rocm", "--iree-rocm-target=gfx942"), ("vulkan", "--iree-vulkan-target=rdna3")],
)
def test_gpu_targets_compile(built, target, flag):
    """GPU targets are selectable and compile here (running them needs the GPU)."""
    out, _ = built
    arch = flag.split("=")[1]
    result = build(tiny_target("gpu"), out / target, compile_target=target, arch=arch)
    prov = load_meta(result.meta).provenance
    assert prov.compile_target == target and flag in prov.compile_flags
    assert result.vmfb.stat().st_size > 0


def test_detected_cuda_arch_newer_than_compiler_falls_back(monkeypatch):
    from pcpc.mlir import compile as compile_mod

    monkeypatch.setattr(compile_mod, "detect_cuda_arch", lambda: "sm_90")
    assert "--iree-cuda-target=sm_89" in compile_mod.compile_flags("cuda")
    monkeypatch.setattr(compile_mod, "detect_cuda_arch", lambda: "sm_86")
    assert "--iree-cuda-target=sm_86" in compile_mod.compile_flags("cuda")
    assert "--iree-cuda-target=sm_75" in compile_mod.compile_flags("cuda", "sm_75")
    # named by --arch: the compiler knows nothing past sm_89 ("missing GPU target"), so the same fallback
    assert "--iree-cuda-target=sm_89" in compile_mod.compile_flags("cuda", "sm_90")
    assert "--iree-cuda-target=sm_89" in compile_mod.compile_flags("cuda", "sm_100a")
    for bad in ("gfx942", "90", "sm_x"):
        with pytest.raises(UserError, match="--arch: expected a CUDA architecture"):
            compile_mod.compile_flags("cuda", bad)


def test_the_detected_cuda_arch_is_nvidia_smis_compute_capability_or_none(monkeypatch):
    from pcpc.mlir import compile as compile_mod

    for stdout, code, want in (("9.0\n", 0, "sm_90"), ("8.6\n8.6\n", 0, "sm_86"), ("[N/A]\n", 0, None), ("", 0, None),
                               ("9.0\n", 9, None)):
        monkeypatch.setattr(compile_mod.subprocess, "run",
                            lambda *a, out=stdout, rc=code, **k: subprocess.CompletedProcess(a, rc, out, ""))
        assert compile_mod.detect_cuda_arch() == want, stdout
        if want is None:  # no GPU seen: the default, not an --arch error
            assert "--iree-cuda-target=sm_80" in compile_mod.compile_flags("cuda")


def test_vulkan_target_follows_an_nvidia_gpu(monkeypatch):
    from pcpc.mlir import compile as compile_mod

    for detected, want in (("sm_90", "ampere"), ("sm_80", "ampere"), ("sm_75", "turing"), (None, "rdna3")):
        monkeypatch.setattr(compile_mod, "detect_cuda_arch", lambda d=detected: d)
        assert f"--iree-vulkan-target={want}" in compile_mod.compile_flags("vulkan")
    assert "--iree-vulkan-target=valhall" in compile_mod.compile_flags("vulkan", "valhall")


def test_merge_identical_globals():
    from pcpc.mlir.compile import merge_identical_globals

    def glob(name, param):
        return (f"  util.global private @{name} {{a}} : tensor<4xf32>\n  util.initializer {{\n"
                f"    %0 = flow.tensor.constant #flow.parameter.named<\"model\"::\"{param}\"> : tensor<4xf32>\n"
                f"    util.global.store %0, @{name} : tensor<4xf32>\n    util.return\n  }}")

    text = "\n".join(["module {", glob("w", "a"), glob("w_1", "a"), glob("w_10", "b"),
                      "  func.func @f() {", "    %0 = util.global.load @w_1 : tensor<4xf32>",
                      "    %1 = util.global.load @w_10 : tensor<4xf32>", "  }", "}"])
    merged, n = merge_identical_globals(text)
    assert n == 1
    assert "@w_1 " not in merged and "util.global.load @w : " in merged  # the copy's use now reads @w
    assert "util.global.load @w_10 :" in merged and merged.count("util.initializer") == 2


def test_artifacts_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    """A group that shares a build folder can read what pcpc builds there."""
    import stat

    old = os.umask(0o027)
    try:
        result = build(tiny_target("modes"), tmp_path)
    finally:
        os.umask(old)
    for path in (result.mlir, result.vmfb, result.meta):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
