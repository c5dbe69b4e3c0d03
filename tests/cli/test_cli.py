"""The pcpc command line: build, inspect, and user mistakes (exit 2, one line, no traceback)."""

import subprocess
import sys


from conftest import tiny_target
from pcpc.mlir.build import build


def pcpc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pcpc.cli", *args], capture_output=True, text=True, cwd=cwd)


def assert_user_error(proc, message):
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_build_list():
    proc = pcpc("build", "--list")
    assert proc.returncode == 0
    assert "nanogpt-small" in proc.stdout and "nanogpt-medium" in proc.stdout


def test_build_unknown_target(tmp_path):
    assert_user_error(pcpc("build", "nanogpt-huge"), "unknown build target 'nanogpt-huge'; valid:")
    # every name is checked before anything is built
    proc = pcpc("build", "nanogpt-small", "nanogpt-huge", "--out-dir", str(tmp_path / "out"))
    assert_user_error(proc, "unknown build target 'nanogpt-huge'")
    assert not (tmp_path / "out").exists()


def test_build_without_name():
    assert_user_error(pcpc("build"), "name a target")


def test_bad_target_choice():
    proc = pcpc("build", "nanogpt-small", "--target", "tpu")
    assert proc.returncode == 2 and "'tpu' is not one of" in proc.stderr


def test_inspect_prints_signature(tmp_path):
    result = build(tiny_target("cli", functions=("forward_loss", "value_and_grad")), tmp_path)
    proc = pcpc("inspect", str(result.vmfb))
    assert proc.returncode == 0, proc.stderr
    assert "forward_loss:" in proc.stdout and "value_and_grad:" in proc.stdout
    assert "arg    param x" in proc.stdout and "x: data int64[2, 8]" in proc.stdout
    assert "result loss: loss float32[]" in proc.stdout


def test_inspect_corrupt_and_debug(tmp_path):
    result = build(tiny_target("cli2"), tmp_path)
    result.vmfb.write_bytes(b"\x00" * 64)
    assert_user_error(pcpc("inspect", str(result.vmfb)), "stale or foreign")
    proc = pcpc("--debug", "inspect", str(result.vmfb))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_inspect_missing_file(tmp_path):
    assert_user_error(pcpc("inspect", str(tmp_path / "x.vmfb")), "no such module")


def test_a_target_the_compiler_rejects_is_one_line_and_debug_shows_its_output(tmp_path):
    args = ("build", "nanogpt-small", "--target", "rocm", "--arch", "gfx_bogus", "--out-dir", str(tmp_path))
    assert_user_error(pcpc(*args), "iree-compile could not compile nanogpt-small.mlir for "
                                   "--iree-hal-target-backends=rocm --iree-rocm-target=gfx_bogus: error:")
    debug = pcpc("--debug", *args)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert len(debug.stderr.splitlines()) > 10  # the compiler's whole report
    assert not list(tmp_path.glob("*.vmfb"))


def test_a_cuda_arch_that_is_not_one_is_named_before_anything_is_built(tmp_path):
    proc = pcpc("build", "nanogpt-small", "--target", "cuda", "--arch", "gfx942", "--out-dir", str(tmp_path))
    assert_user_error(proc, "--arch: expected a CUDA architecture such as sm_80 or sm_90 for --target cuda, "
                            "got 'gfx942'")
    assert not list(tmp_path.glob("*.vmfb"))
