"""lower(): each function traced once and imported as it was traced.

The recipes' modules are checked end to end elsewhere (their losses, gradients
and HF parity); these are the graph shapes no recipe happens to make.
"""

import numpy as np
import pytest
import torch

from pcpc.mlir.compile import compile_flags, compile_mlir
from pcpc.mlir.lower import ExportFunction, lower
from pcpc.mlir.signature import TensorSpec


BIG = np.linspace(-1.0, 1.0, 4 * 1024, dtype=np.float32).reshape(1024, 4)


def with_constants(x):
    # a small constant (inlined) and a large one (lifted to a global by iree-turbine)
    small = torch.tensor([1.0, -2.0, 3.0, 0.5])
    big = torch.from_numpy(BIG)
    return (x * small).sum(-1), x @ big.T


def one_result(x):
    return torch.relu(x) * 2.0  # a bare tensor, not a tuple


def bump(buf, x):
    buf.add_(x)  # in place: exported through torch.export, its mutation kept
    return (buf.sum(),)


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    import iree.runtime as rt

    x = TensorSpec("x", "data", (2, 4), "float32")
    fns = [
        ExportFunction("with_constants", with_constants, [x], [("a", "output"), ("b", "output")]),
        ExportFunction("one_result", one_result, [x], [("y", "output")]),
        ExportFunction("bump", bump, [TensorSpec("buf", "inplace", (2, 4), "float32"), x], [("s", "output")],
                       inplace=True),
    ]
    text, signatures = lower(fns)
    assert text.count("util.global private") == 1  # BIG
    d = tmp_path_factory.mktemp("lower")
    (d / "m.mlir").write_text(text)
    compile_mlir(d / "m.mlir", d / "m.vmfb", compile_flags("llvm-cpu"))
    config = rt.Config("local-task")
    ctx = rt.SystemContext(config=config)
    ctx.add_vm_module(rt.VmModule.mmap(config.vm_instance, str(d / "m.vmfb")))
    return ctx.modules.module, signatures, config.device


def test_constants_lifted_and_results_match_eager(module):
    vm, signatures, _ = module
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    want = with_constants(torch.from_numpy(x))
    got = vm.with_constants(x)
    np.testing.assert_allclose(got[0].to_host(), want[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(got[1].to_host(), want[1].numpy(), rtol=1e-5)
    assert [(r.name, r.shape) for r in signatures["with_constants"].results] == [("a", (2,)), ("b", (2, 1024))]


def test_single_tensor_result(module):
    vm, signatures, _ = module
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(vm.one_result(x).to_host(), one_result(torch.from_numpy(x)).numpy())
    assert [r.name for r in signatures["one_result"].results] == ["y"]


def test_inplace_function_beside_traced_ones(module):
    import iree.runtime as rt

    vm, _, device = module
    buf = rt.asdevicearray(device, np.ones((2, 4), np.float32))
    s = vm.bump(buf, np.full((2, 4), 0.5, np.float32))
    assert float(s.to_host()) == pytest.approx(12.0)
    np.testing.assert_array_equal(buf.to_host(), np.full((2, 4), 1.5, np.float32))


def put(p, idx, vals):
    p.view(-1).index_put_((idx,), vals)  # K entries written into the argument
    return (vals[:1] * 1.0,)


def test_an_in_place_write_does_not_copy_its_argument(tmp_path):
    """IREE turns the barrier after an argument's new value into a copy of the whole argument
    (mlir/compile.py alias_barriers); after the rewrite no such copy is left, and the write still lands in
    the argument, only at the indices."""
    import subprocess

    import iree.runtime as rt

    from pcpc.mlir.compile import alias_barriers, iree_compile_exe, mutates_arguments

    shape, K = (256, 64), 40
    fn = ExportFunction("put", put, [TensorSpec("p", "inplace", shape, "float32"), TensorSpec("idx", "data", (K,), "int64"),
                                     TensorSpec("vals", "data", (K,), "float32")], [("first", "output")], inplace=True)
    text, _ = lower([fn])
    (tmp_path / "m.mlir").write_text(text)
    assert mutates_arguments(tmp_path / "m.mlir")
    flags = compile_flags("llvm-cpu")

    def stream_ir(src, *extra):
        out = tmp_path / f"{src.stem}.stream.mlir"
        subprocess.run([iree_compile_exe(), str(src), *flags, *extra, "--compile-to=stream", "-o", str(out)], check=True)
        return out.read_text()

    whole = f"{shape[0] * shape[1] * 4}"
    subprocess.run([iree_compile_exe(), str(tmp_path / "m.mlir"), *flags, "--compile-to=input", "-o",
                    str(tmp_path / "input.mlir")], check=True)
    rewritten, n = alias_barriers((tmp_path / "input.mlir").read_text())
    assert n == 1
    (tmp_path / "aliased.mlir").write_text(rewritten)
    copies = [ln for ln in stream_ir(tmp_path / "input.mlir", "--compile-from=input").splitlines()
              if "stream.cmd.copy" in ln and f", %c{whole} :" in ln]
    assert copies  # what IREE does without the rewrite
    assert not [ln for ln in stream_ir(tmp_path / "aliased.mlir", "--compile-from=input").splitlines()
                if "stream.cmd.copy" in ln and f", %c{whole} :" in ln]
    compile_mlir(tmp_path / "m.mlir", tmp_path / "m.vmfb", flags)
    config = rt.Config("local-task")
    ctx = rt.SystemContext(config=config)
    ctx.add_vm_module(rt.VmModule.mmap(config.vm_instance, str(tmp_path / "m.vmfb")))
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(shape).astype(np.float32)
    idx = np.sort(rng.choice(p0.size, K, replace=False)).astype(np.int64)
    vals = rng.standard_normal(K).astype(np.float32)
    p = rt.asdevicearray(config.device, p0)
    ctx.modules.module.put(p, idx, vals)
    want = p0.reshape(-1).copy()
    want[idx] = vals
    np.testing.assert_array_equal(p.to_host().reshape(-1), want)


def test_alias_barriers_leaves_a_used_or_dynamic_value_alone():
    from pcpc.mlir.compile import alias_barriers

    text = "\n".join([
        "  util.func public @f$async(%arg0: !hal.buffer_view, %arg3: !hal.fence, %arg4: !hal.fence) {",
        "    %4 = hal.tensor.alias wait(%arg3) => %3 : tensor<8x4xf32> to %arg0 : !hal.buffer_view",
        "    %7 = hal.tensor.alias wait(%arg3) => %6 : tensor<?x4xf32>{%d} to %arg1 : !hal.buffer_view",
        "    %5:2 = hal.tensor.barrier join(%4, %x : tensor<8x4xf32>, tensor<1xf32>) => %arg4 : !hal.fence",
        "    %9 = hal.tensor.barrier join(%7 : tensor<?x4xf32>) => %arg5 : !hal.fence",
        "    %6 = hal.tensor.export %5#0 : tensor<8x4xf32> -> !hal.buffer_view",
        "  }",
    ])
    out, n = alias_barriers(text)
    assert (out, n) == (text, 0)  # %5#0 is exported; %7 is dynamic
    out, n = alias_barriers(text.replace("%5#0", "%5#1"))
    assert n == 1 and "join(%__pcpc_written0, %x : tensor<1x1xf32>, tensor<1xf32>)" in out
    assert "%__pcpc_written0 = tensor.extract_slice %4[0, 0] [1, 1] [1, 1] : tensor<8x4xf32> to tensor<1x1xf32>" in out


def test_compiles_skip_the_verifier_between_passes_and_make_the_same_module(tmp_path):
    import subprocess

    from pcpc.mlir.compile import SKIP_VERIFIER, iree_compile_exe

    x = TensorSpec("x", "data", (2, 4), "float32")
    text, _ = lower([ExportFunction("with_constants", with_constants, [x], [("a", "output"), ("b", "output")])])
    (tmp_path / "m.mlir").write_text(text)
    flags = compile_flags("llvm-cpu")
    compile_mlir(tmp_path / "m.mlir", tmp_path / "fast.vmfb", flags)
    subprocess.run([iree_compile_exe(), str(tmp_path / "m.mlir"), *flags, "-o", str(tmp_path / "checked.vmfb")],
                   check=True)
    assert SKIP_VERIFIER not in flags
    assert (tmp_path / "fast.vmfb").read_bytes() == (tmp_path / "checked.vmfb").read_bytes()


def test_a_failed_compile_is_reported_from_a_run_with_the_verifier(tmp_path, monkeypatch):
    import sys

    from pcpc.errors import UserError
    from pcpc.mlir import compile as compile_mod

    log = tmp_path / "calls.txt"
    fake = tmp_path / "iree-compile"
    fake.write_text(f"#!{sys.executable}\nimport sys\nopen({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                    "sys.exit('error: unchecked run' if '--verify=false' in sys.argv else "
                    "\"error: 'linalg.generic' op failed to verify after pass X\")\n")
    fake.chmod(0o755)
    monkeypatch.setattr(compile_mod, "iree_compile_exe", lambda: str(fake))
    (tmp_path / "m.mlir").write_text("module {}\n")
    with pytest.raises(UserError, match="failed to verify after pass X"):
        compile_mlir(tmp_path / "m.mlir", tmp_path / "m.vmfb", compile_flags("llvm-cpu"))
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and "--verify=false" in calls[0] and "--verify=false" not in calls[1]
    assert not (tmp_path / "m.vmfb").exists()


def test_graphs_lowered_without_their_python_code_give_the_same_mlir(monkeypatch):
    import contextlib

    import torch.export.exported_program as exported_program

    from pcpc.mlir import lower as lower_mod

    before = exported_program._create_graph_module_for_export
    x = TensorSpec("x", "data", (2, 4), "float32")
    fns = [ExportFunction("with_constants", with_constants, [x], [("a", "output"), ("b", "output")]),
           ExportFunction("one_result", one_result, [x], [("y", "output")])]
    lazy, _ = lower(fns)
    assert exported_program._create_graph_module_for_export is before  # put back
    monkeypatch.setattr(lower_mod, "_no_python_code", contextlib.nullcontext)
    eager, _ = lower(fns)
    assert lazy == eager


def mix(b, x):
    return b[:, :4] * torch.tensor([2.0, 0.5, -1.0, 4.0]) + x  # a constant of its own, its traced name with_constants' first


def test_a_composite_splices_its_calls_graphs_and_shares_their_constants(tmp_path):
    import iree.runtime as rt

    from pcpc.mlir.lower import Composite

    x = TensorSpec("x", "data", (2, 4), "float32")
    first = ExportFunction("with_constants", with_constants, [x], [("a", "output"), ("b", "output")])
    second = ExportFunction("mix", mix, [TensorSpec("b", "data", (2, 1024), "float32"), x], [("y", "output")])
    both = Composite(calls=((first, ((-1, 0),)), (second, ((0, 1), (-1, 0)))), returns=((1, 0), (0, 0)))
    spliced = ExportFunction("both", both, [x], [("y", "output"), ("a", "output")])
    traced = ExportFunction("both", lambda *a: both(*a), [x], [("y", "output"), ("a", "output")])
    text, signatures = lower([first, spliced])  # first's graph serves both
    # the same functions as a trace of the whole, but for the constants: a trace makes its own copy of each,
    # the spliced graph holds with_constants' own (one global for BIG, where the trace has two)
    again = lower([first, traced])[0]
    assert (text.count("util.global private"), again.count("util.global private")) == (1, 2)
    assert text.count("torch.aten.mm") == again.count("torch.aten.mm") == 2
    assert [(r.name, r.shape) for r in signatures["both"].results] == [("y", (2, 4)), ("a", (2,))]

    (tmp_path / "m.mlir").write_text(text)
    compile_mlir(tmp_path / "m.mlir", tmp_path / "m.vmfb", compile_flags("llvm-cpu"))
    config = rt.Config("local-task")
    ctx = rt.SystemContext(config=config)
    ctx.add_vm_module(rt.VmModule.mmap(config.vm_instance, str(tmp_path / "m.vmfb")))
    xs = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    got = ctx.modules.module.both(xs)
    want = both(torch.from_numpy(xs))  # called eagerly, a Composite runs its calls
    np.testing.assert_allclose(got[0].to_host(), want[0].numpy(), rtol=1e-5)
    np.testing.assert_allclose(got[1].to_host(), want[1].numpy(), rtol=1e-6)


def test_a_composite_wired_to_the_wrong_shape_is_refused():
    from pcpc.mlir.lower import Composite

    x = TensorSpec("x", "data", (2, 4), "float32")
    first = ExportFunction("one_result", one_result, [x], [("y", "output")])
    wrong = Composite(calls=((first, ((-1, 0),)),), returns=((0, 0),))
    with pytest.raises(ValueError, match=r"composite argument 0 \(x\): declared float32\[3, 4\], its call takes "
                                         r"float32\[2, 4\]"):
        lower([ExportFunction("wrong", wrong, [TensorSpec("x", "data", (3, 4), "float32")], [("y", "output")])])


def test_one_function_exported_twice_is_traced_once_and_lowered_twice(monkeypatch):
    from pcpc.mlir import lower as lower_mod

    traces = []
    real = lower_mod._trace
    monkeypatch.setattr(lower_mod, "_trace", lambda *a: traces.append(a) or real(*a))
    x = TensorSpec("x", "data", (2, 4), "float32")
    same = [ExportFunction("a", one_result, [x], [("y", "output")]),
            ExportFunction("b", one_result, [x], [("y", "output")]),
            ExportFunction("c", one_result, [TensorSpec("x", "data", (3, 4), "float32")], [("y", "output")])]
    text, _ = lower(same)
    assert len(traces) == 2  # a and b share one trace; c's shapes differ
    copies = [ExportFunction(f.name, lambda t: one_result(t), f.args, f.results) for f in same]
    assert text == lower(copies)[0]
