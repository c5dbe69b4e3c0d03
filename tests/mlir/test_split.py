"""Modules compiled in parts (pcpc.mlir.split): the split itself, and builds whose functions live in several
VMFBs loaded into one context."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_target
from pcpc.errors import UserError
from pcpc.mlir import build as build_mod
from pcpc.mlir import split
from pcpc.mlir.build import build, part_path_for
from pcpc.mlir.compile import compile_flags
from pcpc.mlir.signature import load_meta
from pcpc.runtime.module import CompiledModule


def func(name, ops):
    body = "\n".join(f"    %{i} = torch.aten.{op} %x : !torch.vtensor<[4],f32> -> !torch.vtensor<[4],f32>"
                     for i, op in enumerate(ops))
    return f"  func.func @{name}(%x: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> {{\n{body}\n" \
           f"    return %x : !torch.vtensor<[4],f32>\n  }}"


def module(*funcs, extra=""):
    return "module @module {\n" + extra + "\n".join(funcs) + "\n}\n"


def test_functions_of_takes_modules_of_public_functions_only():
    text = module(func("a", ["relu"]), func("b", ["neg", "abs"]))
    header, funcs = split.functions_of(text)
    assert header == "module @module {" and list(funcs) == ["a", "b"]
    assert split.module_text(header, "module_part1", [funcs["b"]]) == module(func("b", ["neg", "abs"])).replace(
        "@module ", "@module_part1 ")
    assert split.functions_of(module(func("a", ["relu"]), extra="  util.global private @w : tensor<4xf32>\n")) is None
    assert split.functions_of(module(func("a", ["relu"]).replace("func.func @a", "func.func private @a"))) is None
    assert split.functions_of("not mlir") is None


def test_plan_keeps_a_function_with_the_larger_one_that_has_its_operations():
    big = [f"op{i}" for i in range(40)]
    funcs = {"step": func("step", big), "grad": func("grad", big[:25]), "other": func("other", ["x"] * 5 + ["y"] * 20),
             "more": func("more", [f"z{i}" for i in range(12)])}
    groups, parted, whole = split.plan(funcs, 2, 2)
    assert sorted(map(sorted, groups)) == [["grad", "step"], ["more", "other"]]
    assert parted < whole
    assert split.plan(funcs, 1, 2)[0] == [list(funcs)]
    # too many functions to try every split: placed greedily, every function once
    many = {f"f{i}": func(f"f{i}", [f"op{i}_{j}" for j in range(10 + i)]) for i in range(14)}
    groups, parted, whole = split.plan(many, 2, 2)
    assert len(groups) == 2 and sorted(n for g in groups for n in g) == sorted(many) and parted < whole
    # one core: two processes cannot beat one, so the whole module is the plan's estimate too
    assert split.plan(funcs, 2, 1)[1] >= split.plan(funcs, 2, 1)[2]


def test_small_or_single_core_modules_compile_whole(monkeypatch):
    funcs = [func("a", [f"a{i}" for i in range(300)]), func("b", [f"b{i}" for i in range(300)])]
    parts = split.parts_of(module(*funcs), 2, 2)
    assert [g for _, g in parts] == [["a"], ["b"]]
    assert parts[1][0].startswith("module @module_part1 {")
    assert split.parts_of(module(*funcs), 2, 1) is None
    assert split.parts_of(module(*funcs), 1, 2) is None
    assert split.parts_of(module(func("a", ["relu"]), func("b", ["neg"])), 2, 2) is None  # under MIN_WORK


FUNCTIONS = ("forward_loss", "value_and_grad", "logits")


@pytest.fixture
def force_split(monkeypatch):
    monkeypatch.setattr(split, "MIN_WORK", 0)
    monkeypatch.setattr(split, "GAIN", 10.0)


def args_for(mod, fn, rng):
    return [rng.integers(0, 11, s.shape) if s.dtype == "int64" else rng.standard_normal(s.shape, np.float32)
            for s in mod.signature(fn).args]


def test_a_module_in_parts_calls_as_the_whole_one(tmp_path, force_split, monkeypatch):
    said = []
    parted = build(tiny_target("t", FUNCTIONS), tmp_path / "parts", log=said.append)
    assert said[-1].endswith("(llvm-cpu, 2 parts side by side)")
    prov = load_meta(parted.meta).provenance
    assert len(prov.parts) == 1 and part_path_for(parted.vmfb, 1).is_file()
    in_parts = {fn for p in prov.parts for fn in p.functions}
    assert in_parts and in_parts < set(FUNCTIONS)
    monkeypatch.setattr(build_mod, "parts_of", lambda *a: None)
    whole = build(tiny_target("t", FUNCTIONS), tmp_path / "whole")
    assert load_meta(whole.meta).provenance.parts == () and not part_path_for(whole.vmfb, 1).exists()
    shown = subprocess.run([sys.executable, "-m", "pcpc.cli", "inspect", str(parted.vmfb)], capture_output=True,
                           text=True)
    assert shown.returncode == 0 and f"compiled in parts: t.part1.vmfb holds {', '.join(prov.parts[0].functions)}" \
        in shown.stdout
    rng = np.random.default_rng(0)
    a, b = CompiledModule(parted.vmfb), CompiledModule(whole.vmfb)
    for fn in FUNCTIONS:
        args = args_for(a, fn, rng)
        for x, y in zip(a.call_host(fn, *args), b.call_host(fn, *args)):
            np.testing.assert_array_equal(x, y)


def test_parts_are_checked_rebuilt_and_cleaned_up(tmp_path, force_split, monkeypatch):
    first = build(tiny_target("t", FUNCTIONS), tmp_path)
    part = part_path_for(first.vmfb, 1)
    assert build(tiny_target("t", FUNCTIONS), tmp_path).ran == []
    good = part.read_bytes()
    part.write_bytes(good[:-8] + b"\0" * 8)  # a part that is not the one meta.json records
    with pytest.raises(UserError, match=r"t\.part1\.vmfb: does not match its meta.json"):
        CompiledModule(first.vmfb)
    assert build(tiny_target("t", FUNCTIONS), tmp_path).ran == ["compile"]
    assert part.read_bytes() == good
    CompiledModule(first.vmfb)
    part.unlink()
    with pytest.raises(UserError, match=r"t\.part1\.vmfb: no such module"):
        CompiledModule(first.vmfb)

    # a meta.json whose parts are not files beside it, or not its functions
    raw = json.loads(first.meta.read_text())
    for bad, message in (({"file": "../t.part1.vmfb"}, r"provenance\.parts.*file must be a \.vmfb file name"),
                         ({"functions": ["nope"]}, r"provenance\.parts lists nope, which are not among its functions")):
        broken = tmp_path / "broken.meta.json"
        broken.write_text(json.dumps({**raw, "provenance": {**raw["provenance"], "parts": [
            {**raw["provenance"]["parts"][0], **bad}]}}))
        with pytest.raises(UserError, match=message):
            CompiledModule(first.vmfb, meta=broken)
        broken.unlink()

    # a failing part leaves the previous build as it was
    assert build(tiny_target("t", FUNCTIONS), tmp_path).ran == ["compile"]
    before = {p: p.read_bytes() for p in (first.vmfb, part, first.meta)}
    real = build_mod.compile_mlir

    def second_fails(mlir, vmfb, flags, encoder=None):
        if Path(mlir).name == "t.part1.mlir":
            raise UserError("iree-compile could not compile t.part1.mlir (simulated)")
        real(mlir, vmfb, flags, encoder)

    monkeypatch.setattr(build_mod, "compile_mlir", second_fails)
    monkeypatch.setattr(build_mod, "compile_flags",
                        lambda t, a=None: compile_flags(t, a) + ("--iree-opt-strip-assertions",))
    with pytest.raises(UserError, match="simulated"):
        build(tiny_target("t", FUNCTIONS), tmp_path)
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") or p.name.endswith(".parts")]

    # compiled whole again: the old part goes
    monkeypatch.setattr(build_mod, "compile_mlir", real)
    monkeypatch.setattr(build_mod, "parts_of", lambda *a: None)
    assert build(tiny_target("t", FUNCTIONS), tmp_path).ran == ["compile"]
    assert not part.exists() and json.loads(first.meta.read_text())["provenance"]["parts"] == []
    assert len(CompiledModule(first.vmfb).call_host("logits", *args_for(CompiledModule(first.vmfb), "logits",
                                                                          np.random.default_rng(1)))) == 1
