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
