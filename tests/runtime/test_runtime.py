"""The runtime: strict meta.json, module/meta pairing, validated calls, device-resident results."""

import json
import shutil

import numpy as np
import pytest

from conftest import tiny_target
from pcpc.errors import UserError
from pcpc.mlir.build import build
from pcpc.mlir.signature import load_meta
from pcpc.runtime.module import CompiledModule, to_host


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt")
    return build(tiny_target("rt", functions=("forward_loss", "value_and_grad")), out)


def copy_pair(result, dest):
    vmfb, meta = dest / "m.vmfb", dest / "m.meta.json"
    shutil.copy(result.vmfb, vmfb)
    shutil.copy(result.meta, meta)
    return vmfb, meta


def args_for(mod, fn="forward_loss"):
    sig = mod.signature(fn)
    out = []
    for s in sig.args:
        if s.dtype == "int64":
            out.append(np.zeros(s.shape, np.int64))
        else:
            out.append(np.full(s.shape, 0.01, np.float32))
    return out


def test_call_and_feed_device_results_back(tiny):
    mod = CompiledModule(tiny.vmfb, threads=2)
    args = args_for(mod, "value_and_grad")
    n = len(mod.meta.parameters)
    loss, *grads = mod("value_and_grad", *args)
    assert type(loss).__name__ == "DeviceArray"
    # device arrays go straight back in as arguments
    params = mod.upload_all(args[:n])
    again = mod.call_host("value_and_grad", *params, *args[n:])
    np.testing.assert_array_equal(again[0], to_host(loss))
    assert to_host(loss).shape == () and np.isfinite(to_host(loss))
    assert [tuple(g.shape) for g in grads] == [s.shape for s in mod.meta.parameters]


def test_one_thread_runs_on_local_sync_with_the_same_results(tiny):
    """A CPU module on one thread runs its dispatches on the calling thread (local-sync: no hand-off to a
    worker thread, measured faster when processes share the cores); the results are local-task's."""
    one, two = CompiledModule(tiny.vmfb, threads=1), CompiledModule(tiny.vmfb, threads=2)
    assert (one.driver, two.driver) == ("local-sync", "local-task")
    args = args_for(one, "value_and_grad")
    for a, b in zip(one.call_host("value_and_grad", *args), two.call_host("value_and_grad", *args)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a[:-1], r"forward_loss: expects \d+ arguments, got \d+"),
        (lambda a: a[:-1] + [a[-1][:1]], r"argument \d+ 'y' expects int64\[2, 8\], got int64\[1, 8\]"),
        (lambda a: a[:-1] + [a[-1].astype(np.int32)], r"'y' expects int64\[2, 8\], got int32\[2, 8\]"),
        (lambda a: [a[0].astype(np.float64)] + a[1:], r"argument 0 'transformer.wte.weight' expects float32\[11, 16\], got float64"),
        (lambda a: a[:-1] + ["tokens"], r"'y' must be an array, got str"),
    ],
)
def test_bad_calls_name_the_argument(tiny, mutate, message):
    mod = CompiledModule(tiny.vmfb)
    with pytest.raises(UserError, match=message):
        mod("forward_loss", *mutate(args_for(mod)))


def test_bad_device_arrays_name_the_argument(tiny):
    """Device arrays (uploads, and results fed back) are checked through their buffer views: the same errors."""
    mod = CompiledModule(tiny.vmfb)
    args = args_for(mod)
    with pytest.raises(UserError, match=r"'y' expects int64\[2, 8\], got int32\[2, 8\]"):
        mod("forward_loss", *args[:-1], mod.upload(args[-1].astype(np.int32)))
    with pytest.raises(UserError, match=r"argument 0 'transformer.wte.weight' expects float32\[11, 16\], got float32\[16, 11\]"):
        mod("forward_loss", mod.upload(args[0].T), *args[1:])
    loss = mod("forward_loss", *mod.upload_all(args))[0]  # a result as an argument: a float32 scalar
    with pytest.raises(UserError, match=r"'y' expects int64\[2, 8\], got float32\[\]"):
        mod("forward_loss", *args[:-1], loss)


def test_unknown_function(tiny):
    mod = CompiledModule(tiny.vmfb)
    with pytest.raises(UserError, match=r"no function 'train_step'; it has forward_loss, value_and_grad"):
        mod("train_step")


def test_stale_or_foreign_pair_detected(tiny, tmp_path):
    other = build(tiny_target("other", vocab_size=13), tmp_path / "other")
    vmfb, meta = copy_pair(tiny, tmp_path)
    shutil.copy(other.vmfb, vmfb)  # a different module next to this meta.json
    with pytest.raises(UserError, match=r"does not match its meta.json .* stale or foreign"):
        CompiledModule(vmfb)


def test_truncated_vmfb(tiny, tmp_path):
    vmfb, meta = copy_pair(tiny, tmp_path)
    data = vmfb.read_bytes()[:1000]
    vmfb.write_bytes(data)
    with pytest.raises(UserError, match="stale or foreign"):
        CompiledModule(vmfb)
    # even with a meta.json that records the truncated file's hash, it cannot load
    import hashlib

    raw = json.loads(meta.read_text())
    raw["provenance"]["vmfb_sha256"] = hashlib.sha256(data).hexdigest()
    meta.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"not a valid VMFB \(corrupt or truncated\)"):
        CompiledModule(vmfb)


def test_meta_function_list_must_match_module(tiny, tmp_path):
    vmfb, meta = copy_pair(tiny, tmp_path)
    raw = json.loads(meta.read_text())
    raw["functions"]["decode_bs1"] = raw["functions"]["forward_loss"]
    meta.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"module exports \['forward_loss', 'value_and_grad'\] but meta.json lists"):
        CompiledModule(vmfb)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(extra=1), r"unknown key 'extra'"),
        (lambda r: r.pop("parameters"), r"missing required key 'parameters'"),
        (lambda r: r.update(schema_version=99), r"schema_version 99 is not supported"),
        (lambda r: r["provenance"].pop("compile_key"), r"provenance: missing required key 'compile_key'"),
        (lambda r: r["functions"]["forward_loss"]["args"][0].update(role="weights"), r"role of .* must be one of param"),
        (lambda r: r["functions"]["forward_loss"]["args"][0].update(shape=[-1]), r"negative dimension"),
        (lambda r: r.update(parameter_bytes=5), r"parameter_bytes is 5 but the parameters add up to"),
    ],
)
def test_meta_is_strict(tiny, tmp_path, edit, message):
    raw = json.loads(tiny.meta.read_text())
    edit(raw)
    path = tmp_path / "x.meta.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=message):
        load_meta(path)


def test_missing_meta_and_module(tmp_path, tiny):
    with pytest.raises(UserError, match="no such module"):
        CompiledModule(tmp_path / "nope.vmfb")
    shutil.copy(tiny.vmfb, tmp_path / "lonely.vmfb")
    with pytest.raises(UserError, match="meta.json not found"):
        CompiledModule(tmp_path / "lonely.vmfb")


def test_peak_rss_is_this_process_own():
    """A child of a big process reports its own peak, not the parent's (ru_maxrss would)."""
    import subprocess
    import sys

    from pcpc.runtime.host_memory import peak_rss_bytes

    big = np.ones(200_000_000 // 8)  # 200 MB held while the child starts
    code = "from pcpc.runtime.host_memory import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert peak_rss_bytes() >= big.nbytes and child < big.nbytes
