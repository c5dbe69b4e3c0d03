"""Load a VMFB with its meta.json and call its functions with validated arguments.

The runtime is thin: load, validate, invoke, convert. Arguments may be numpy
arrays (uploaded for that call) or device arrays returned by earlier calls or
by `upload` (used in place, no host round trip), so weights and optimizer
state stay device-resident across steps. `to_host` copies: a numpy view of a
device buffer goes bad once the buffer is released.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from pcpc.errors import UserError
from pcpc.mlir.compile import DRIVERS
from pcpc.mlir.signature import FunctionSignature, ModuleMeta, TensorSpec, load_meta, meta_path_for

NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "bool": np.dtype(np.bool_),
}

_configs: dict[str, object] = {}


def _config(driver: str, threads: int | None):
    """One iree.runtime.Config (device) per driver per process; threads apply to the first."""
    import iree.runtime as rt

    if driver not in _configs:
        if driver in ("local-task", "local-sync"):
            from pcpc.runtime.host_memory import keep_freed_memory

            keep_freed_memory()  # CPU calls reuse their transient buffers' pages (runtime/host_memory.py)
        if threads and driver == "local-task":
            if threads < (os.cpu_count() or 1):
                # Fewer workers than cores: a process sharing the machine (DiLoCo's and DDP's local workers,
                # GRPO's rollout workers). Unpinned: IREE pins a max_group_count topology to the first
                # cores, so every such process would run on the same ones (two 1-thread local-task workers on
                # 2 cores each got half of core 0: bench/NOTES.md; one thread now means local-sync, on the
                # calling thread, see default_driver).
                rt.flags.parse_flags(f"--task_topology_group_count={threads}")
            else:
                rt.flags.parse_flags(f"--task_topology_max_group_count={threads}")
        try:
            if driver in ("local-task", "local-sync"):
                _configs[driver] = rt.Config(driver)
            else:
                hal = rt.get_driver(driver)
                devices = hal.query_available_devices()
                # by its entry, not a `driver://N` URI: the vulkan driver names devices by UUID only
                _configs[driver] = rt.Config(device=hal.create_device(devices[device_index(driver, len(devices))]))
        except (RuntimeError, ValueError) as e:
            raise UserError(f"IREE driver {driver!r} is not available here: {e}") from None
    return _configs[driver]


def default_driver(compile_target: str, threads: int | None) -> str:
    """The IREE driver for a module: the compile target's, and for a CPU module on one thread local-sync.

    local-sync runs each call's dispatches inline on the calling thread; local-task with one worker hands
    them to a second thread and waits on it. With processes sharing the cores (two 1-thread DiLoCo workers
    on 2 cores) that hand-off costs most: 2.3-2.6 ms per step of throughput against 3.8-4.6 with
    local-task, alone the same (bench/NOTES.md, "Worker layout")."""
    driver = DRIVERS[compile_target]
    return "local-sync" if driver == "local-task" and threads == 1 else driver


def device_index(driver: str, available: int, env=None) -> int:
    """The GPU of this process: device LOCAL_RANK of the node (each local worker its own), wrapping
    around when there are more local processes than devices (GRPO's learner and a rollout worker
    may share one). Without LOCAL_RANK (a plain process) device 0."""
    env = os.environ if env is None else env
    if available < 1:
        raise UserError(f"IREE driver {driver!r} sees no device")
    return int(env.get("LOCAL_RANK", 0)) % available


def _np_dtype(spec: TensorSpec):
    if spec.dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return NP_DTYPES[spec.dtype]


_ELEMENT_DTYPES: dict[int, np.dtype] = {}


def _element_dtype(element_type: int) -> np.dtype:
    """numpy dtype of an IREE HAL element type (memoized)."""
    dtype = _ELEMENT_DTYPES.get(element_type)
    if dtype is None:
        import iree.runtime as rt

        dtype = _ELEMENT_DTYPES[element_type] = np.dtype(rt.HalElementType.map_to_dtype(element_type))
    return dtype


def is_resident(meta: ModuleMeta) -> bool:
    """True when the module's weights are parameter-backed globals: it has parameters, but no
    function takes one as an argument (see pcpc.mlir.lower.ExportFunction.globals); a weight written in place
    (role "inplace", the in-place AdamW module's) is an argument too."""
    return bool(meta.parameters) and not any(a.role in ("param", "inplace") for sig in meta.functions.values()
                                             for a in sig.args)


def to_host(array) -> np.ndarray:
    """A numpy copy of a device array (safe after the device buffer is released)."""
    host = array.to_host() if hasattr(array, "to_host") else array
    return np.array(host, copy=True)


def host_view(array) -> np.ndarray:
    """A host numpy view of a device array (local-task: mapped memory, no copy), valid while `array` lives."""
    return np.asarray(array.to_host() if hasattr(array, "to_host") else array)


def flat_layout(meta: ModuleMeta) -> list[tuple[str, int, int]]:
    """(name, bytes, offset) of each parameter in a flat weight file, in the module's parameter order."""
    out, offset = [], 0
    for spec in meta.parameters:
        out.append((spec.name, spec.nbytes, offset))
        offset += spec.nbytes
    return out


def base_specs(meta: ModuleMeta) -> list:
    """The specs of the base model's weights (a flat weight file's layout, a checkpoint's params): a module's
    parameters, or the frozen weights of a training module that trains an adapter (exporters/peft.py)."""
    return frozen_specs(meta) or list(meta.parameters)


def frozen_specs(meta: ModuleMeta) -> list:
    """The frozen base-model inputs of a training module that trains an adapter; [] for any other module."""
    from pcpc.exporters.peft import SHARED

    for name in ("token_logprobs", "sequence_logps", "eval_loss"):
        if name in meta.functions:
            frozen = [a for a in meta.functions[name].args if a.role == "frozen" and a.name not in SHARED]
            if frozen:
                return frozen
    return []


def base_bytes(meta: ModuleMeta) -> int:
    return sum(s.nbytes for s in base_specs(meta))


def _map_readonly(path: Path):
    import mmap

    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)


class CompiledModule:
    """A VMFB + meta.json pair, checked against each other, with validated calls."""

    def __init__(self, vmfb: str | Path, meta: str | Path | None = None, driver: str | None = None,
                 threads: int | None = None, parameters: str | Path | None = None):
        """`parameters`: the flat weight file, for a module whose weights are parameter-backed
        globals (`resident`: no function takes them as arguments); loaded once, here."""
        import iree.runtime as rt

        self.path = Path(vmfb)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such module (build it with `pcpc build`)")
        self.meta: ModuleMeta = load_meta(meta or meta_path_for(self.path))
        self.driver = driver or default_driver(self.meta.provenance.compile_target, threads)
        self.config = _config(self.driver, threads)
        # NAME.vmfb, then the parts of a module compiled in parts (pcpc.mlir.split), each with the functions it holds
        parts = self.meta.provenance.parts
        stray = sorted({f for p in parts for f in p.functions} - set(self.meta.functions))
        if stray:
            raise UserError(f"{meta or meta_path_for(self.path)}: provenance.parts lists {', '.join(stray)}, which "
                            f"are not among its functions")
        files = self.meta.vmfbs(self.path.name)
        vm_modules = [self._load(self.path.with_name(name), sha256, fns) for name, sha256, fns in files]
        self.resident = is_resident(self.meta)
        if parameters is not None and not self.resident:
            raise UserError(f"{self.path}: takes its weights as call arguments; it has no parameters to load")
        self.context, self._functions = None, {}
        self._indexes = []  # parameter indexes and mapped files the context reads from: kept alive with it
        if self.resident and parameters is None:
            return  # inspectable, not callable: a call says which file is missing
        modules = list(vm_modules)
        if self.resident:
            modules.insert(0, self._parameters_module(Path(parameters)))
        self.context = rt.SystemContext(vm_modules=modules, config=self.config)
        for vm, (_, _, fns) in zip(vm_modules, files):
            bound = self.context.modules[vm.name]
            self._functions.update({fn: bound[fn] for fn in fns})  # each a FunctionInvoker, made once (it parses the ABI)

    def _load(self, path: Path, sha256: str, functions):
        """One VMFB of the module, checked against meta.json: its digest, and the functions it exports."""
        import iree.runtime as rt

        if not path.is_file():
            raise UserError(f"{path}: no such module (build it with `pcpc build`)")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise UserError(
                f"{path}: does not match its meta.json (sha256 {digest[:12]}…, meta records "
                f"{sha256[:12]}…); the pair is stale or foreign, rebuild it"
            )
        try:
            vm_module = rt.VmModule.copy_buffer(self.config.vm_instance, data)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{path}: not a valid VMFB (corrupt or truncated): {e}") from None
        exported = {n for n in vm_module.function_names if not n.startswith("__") and "$" not in n}
        if exported != set(functions):
            raise UserError(f"{path}: module exports {sorted(exported)} but meta.json lists {sorted(functions)}")
        return vm_module

    def _parameters_module(self, path: Path):
        """An io_parameters module serving each parameter from its offset in the flat file (scope "model",
        keys = parameter names; see pcpc.mlir.lower.PARAMETER_SCOPE), and for a module built to read its
        matrices packed (meta encoder_sha256) the packed file as scope "packed" (pcpc.runtime.pack)."""
        import os

        import iree.runtime as rt

        size = path.stat().st_size if path.is_file() else None
        if size != self.meta.parameter_bytes:
            raise UserError(f"{path}: weight file is {size if size is not None else 'missing'} bytes but the module's "
                            f"parameters need {self.meta.parameter_bytes:,} bytes (meta.json parameter_bytes)")
        if not self.meta.provenance.encoder_sha256:  # IREE reads (and packs) the weights at load
            self._param_fd = os.open(path, os.O_RDONLY)
            model = self._index(rt.FileHandle.wrap_fd(self._param_fd),
                                flat_layout(self.meta))
            return rt.create_io_parameters_module(self.config.vm_instance, model.create_provider(scope="model"))
        # Packed at export (pcpc.runtime.pack): both files memory-mapped and imported without a copy; of
        # the flat file only what the module reads unpacked gets paged in (norms, biases, gathered rows).
        from pcpc.mlir.compile import PACKED_SCOPE
        from pcpc.runtime.pack import ensure_packed

        packed, entries = ensure_packed(self.path, self.meta, path)
        flat_map, packed_map = _map_readonly(path), _map_readonly(packed)
        self._indexes += [flat_map, packed_map]
        model = self._index(rt.FileHandle.wrap_memory(flat_map), flat_layout(self.meta))
        packed_index = self._index(rt.FileHandle.wrap_memory(packed_map),
                                   [(e["key"], e["length"], e["offset"]) for e in entries])
        return rt.create_io_parameters_module(self.config.vm_instance, model.create_provider(scope="model"),
                                              packed_index.create_provider(scope=PACKED_SCOPE))

    def _index(self, handle, entries):
        import iree.runtime as rt

        index = rt.ParameterIndex()
        for key, length, offset in entries:
            index.add_from_file_handle(key, handle, length, offset)
        self._indexes.append(index)
        return index

    @property
    def device(self):
        return self.config.device

    def signature(self, fn: str) -> FunctionSignature:
        if fn not in self.meta.functions:
            raise UserError(f"{self.path}: no function {fn!r}; it has {', '.join(self.meta.functions)}")
        return self.meta.functions[fn]

    def upload(self, array: np.ndarray):
        """Copy a host array to the device once; pass the result to later calls."""
        import iree.runtime as rt

        return rt.asdevicearray(self.device, np.ascontiguousarray(array))

    def _check(self, fn: str, spec: TensorSpec, value, index: int):
        view = getattr(value, "_buffer_view", None)  # an IREE DeviceArray: read its buffer view directly
        if view is not None:
            # DeviceArray.shape goes through numpy's __array_function__ (1.4 us): with it, checking the 49
            # arguments of a nanoGPT train_step took 135-150 us a call, now 35-40 (Zen 3; 1% of make run's step).
            shape = tuple(view.shape)
            dtype = getattr(value, "_override_dtype", None) or _element_dtype(view.element_type)
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            shape, dtype = tuple(value.shape), value.dtype
        else:
            raise UserError(f"{fn}: argument {index} {spec.name!r} must be an array, got {type(value).__name__}")
        if shape != spec.shape or dtype != _np_dtype(spec):
            raise UserError(
                f"{fn}: argument {index} {spec.name!r} expects {spec.dtype}{list(spec.shape)}, "
                f"got {np.dtype(dtype).name}{list(shape)}"
            )

    def __call__(self, fn: str, *args) -> list:
        """Invoke `fn`; returns its results as device arrays (see `to_host`)."""
        sig = self.signature(fn)
        if self.context is None:
            raise UserError(f"{self.path}: its weights are module parameters; load it with the flat weight file "
                            f"(CompiledModule(..., parameters=FILE))")
        if len(args) != len(sig.args):
            raise UserError(f"{fn}: expects {len(sig.args)} arguments, got {len(args)}")
        converted = []
        for i, (spec, value) in enumerate(zip(sig.args, args)):
            if isinstance(value, (int, float)) and spec.shape == ():
                value = np.asarray(value, dtype=_np_dtype(spec))
            self._check(fn, spec, value, i)
            converted.append(value)
        out = self._functions[fn](*converted)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def call_host(self, fn: str, *args) -> list[np.ndarray]:
        """Invoke `fn` and copy every result to host numpy arrays."""
        return [to_host(r) for r in self(fn, *args)]

    def upload_all(self, arrays: Sequence[np.ndarray]) -> list:
        return [self.upload(a) for a in arrays]
