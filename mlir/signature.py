"""meta.json: the versioned, strict signature of a compiled module.

One file next to each VMFB. It records, per exported function, every
argument and result (name, role, shape, dtype), the parameter order, and
provenance (what produced the module and how it was compiled). Loading is
strict: unknown or missing keys, an unsupported schema version or a
malformed entry are errors naming the file and the field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pcpc.config import from_dict
from pcpc.errors import UserError

SCHEMA_VERSION = 1

ROLES = ("param", "frozen", "optimizer_state", "state", "data", "scalar", "loss", "grad", "output", "inplace")
"""param: model weight (trained); frozen: a weight that is an input but never trained (a PEFT run's base
model and VeRA's projections); inplace: an argument the function writes into (the sparse step's weights and
compact moments, mlir/sparse_functions.py); optimizer_state: AdamW moments / outer momentum; state: KV cache and
similar carried values; data: batch inputs; scalar: lr, step and other 0-d controls;
loss / grad / output: results."""

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1}


@dataclass(frozen=True)
class TensorSpec:
    """One argument or result of an exported function."""

    name: str
    role: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role of {self.name!r} must be one of {', '.join(ROLES)}; got {self.role!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype of {self.name!r} must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"shape of {self.name!r} has a negative dimension: {self.shape}")

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class FunctionSignature:
    """Arguments and results of one entry point, in call order."""

    args: tuple[TensorSpec, ...]
    results: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class ModulePart:
    """A VMFB compiled beside NAME.vmfb that holds some of the module's functions (pcpc.mlir.split); the
    runtime loads it into the same context."""

    file: str
    """Its file name, in NAME.vmfb's folder (NAME.part1.vmfb, ...)."""
    sha256: str
    functions: tuple[str, ...]

    def __post_init__(self):
        if "/" in self.file or "\\" in self.file or not self.file.endswith(".vmfb") or self.file.startswith("."):
            raise ValueError(f"file must be a .vmfb file name in the module's folder, got {self.file!r}")
        if not self.functions:
            raise ValueError("functions must not be empty")


@dataclass(frozen=True)
class Provenance:
    """What produced the module: enough to tell whether it is stale."""

    target_name: str
    """Build-graph target (or artifact name) this module was built as."""
    recipe: str
    """module:function that produced the exported functions."""
    config: dict
    """The exporter / recipe configuration, as given."""
    export_key: str
    """sha256 of the recipe, config, exporter sources and tool versions."""
    compile_key: str
    """sha256 of the MLIR, target, flags, compiler version and CPU features."""
    mlir_sha256: str
    vmfb_sha256: str
    versions: dict
    """torch, iree-turbine, iree-base-compiler and pcpc versions at build time."""
    compile_target: str
    """llvm-cpu | cuda | rocm | vulkan"""
    compile_flags: tuple[str, ...]
    cpu_features: str
    """sha256 of the host CPU feature flags (llvm-cpu modules are host-specific)."""
    encoder_sha256: str = ""
    """sha256 of NAME.encoder.vmfb, the module that packs the flat weight file into the layout this module
    reads (pcpc.runtime.pack); empty when the module reads the flat weights as they are."""
    parts: tuple[ModulePart, ...] = ()
    """The other VMFBs of a module compiled in parts; NAME.vmfb holds the functions none of them lists."""


@dataclass(frozen=True)
class ModuleMeta:
    """Top level of meta.json."""

    schema_version: int
    functions: dict[str, FunctionSignature]
    parameters: tuple[TensorSpec, ...]
    """The model weights in the documented order (the order every function takes them)."""
    parameter_bytes: int
    """Sum of the parameters' sizes: the size of a flat weight file in this order."""
    provenance: Provenance

    def __post_init__(self):
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is not supported (this pcpc reads {SCHEMA_VERSION}); rebuild the module"
            )
        total = sum(p.nbytes for p in self.parameters)
        if total != self.parameter_bytes:
            raise ValueError(f"parameter_bytes is {self.parameter_bytes} but the parameters add up to {total}")

    @property
    def parameter_order(self) -> list[str]:
        return [p.name for p in self.parameters]

    def vmfbs(self, vmfb_name: str) -> list[tuple[str, str, tuple[str, ...]]]:
        """(file name, sha256, functions) of each VMFB of the module: NAME.vmfb (`vmfb_name`) with the functions
        no part lists, then its parts (one entry for a module compiled whole)."""
        parts = self.provenance.parts
        rest = tuple(f for f in self.functions if not any(f in p.functions for p in parts))
        return [(vmfb_name, self.provenance.vmfb_sha256, rest)] + [(p.file, p.sha256, p.functions) for p in parts]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def _parse_functions(raw: dict, where: str) -> dict[str, FunctionSignature]:
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: expected a non-empty object of functions")
    return {name: from_dict(FunctionSignature, sig, where=f"{where}.{name}") for name, sig in raw.items()}


def parse_meta(data: dict, where: str) -> ModuleMeta:
    """ModuleMeta from a decoded meta.json dict; errors name `where` and the field."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object")
    data = dict(data)
    functions = _parse_functions(data.pop("functions", None), f"{where}: functions")
    data["functions"] = {}
    meta = from_dict(ModuleMeta, data, where=where)
    return ModuleMeta(
        schema_version=meta.schema_version,
        functions=functions,
        parameters=meta.parameters,
        parameter_bytes=meta.parameter_bytes,
        provenance=meta.provenance,
    )


def load_meta(path: str | Path) -> ModuleMeta:
    """Read and validate a meta.json file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: meta.json not found (every module needs its meta.json; rebuild with `pcpc build`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return parse_meta(data, str(path))


def step_name(kind: str, batch: int, capacity: int, max_seq: int) -> str:
    """A generation module's prefill / decode entry point for batch size `batch` on a KV cache of
    `capacity` positions: prefill_bs{B} at the full max_seq, prefill_bs{B}_kv{C} for a smaller one."""
    return f"{kind}_bs{batch}" if capacity == max_seq else f"{kind}_bs{batch}_kv{capacity}"


def meta_path_for(vmfb: str | Path) -> Path:
    """artifacts/x.vmfb -> artifacts/x.meta.json"""
    vmfb = Path(vmfb)
    return vmfb.with_name(vmfb.name.removesuffix(".vmfb") + ".meta.json")
