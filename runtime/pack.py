"""Pack a flat weight file, once, for a module built with PACK_AT_EXPORT.

Such a module (e.g. `qwen-generation-resident`) reads its data-tiled matrices from a second
parameter scope, `packed`, in the layout its matmuls use, and the rest (norms, biases, the
embedding rows it gathers) from the flat weight file, scope `model`. Its NAME.encoder.vmfb,
written by the same build, turns the flat file into the packed one:

    WEIGHTS.<encoder sha256[:12]>.packed        the packed weights (entries at 4 KiB-aligned offsets)
    WEIGHTS.<encoder sha256[:12]>.packed.json   what they were made from and where each entry is

The record names the weight file's size and mtime and the encoder's hash; a packed file whose
record does not match is remade (`ensure_packed`). Packing runs in a child process
(`python -m pcpc.runtime.pack MODULE.vmfb WEIGHTS`), so the loading and writing it does never
count against the process that generates. Both files are then memory-mapped and handed to
IREE without a copy: the process holds each weight once.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

from pcpc.errors import UserError
from pcpc.mlir.build import atomic_path, encoder_path_for, sha256_file, write_atomic
from pcpc.mlir.compile import PACKED_SCOPE
from pcpc.mlir.signature import ModuleMeta, load_meta, meta_path_for
from pcpc.runtime.module import flat_layout

ALIGN = 4096
"""Offset alignment of the entries in a packed file (page-aligned, so each maps on its own pages)."""


def packed_path(weights: Path, meta: ModuleMeta) -> Path:
    return weights.with_name(f"{weights.name}.{meta.provenance.encoder_sha256[:12]}.packed")


def _record_path(packed: Path) -> Path:
    return packed.with_name(packed.name + ".json")


def _source(weights: Path, meta: ModuleMeta) -> dict:
    st = weights.stat()
    return {"weights_size": st.st_size, "weights_mtime_ns": st.st_mtime_ns,
            "encoder_sha256": meta.provenance.encoder_sha256}


def packed_entries(weights: Path, meta: ModuleMeta) -> list[dict] | None:
    """The packed file's entries ({key, offset, length}) if it is up to date with `weights`, else None."""
    packed = packed_path(weights, meta)
    try:
        record = json.loads(_record_path(packed).read_text())
        size = packed.stat().st_size
    except (OSError, ValueError):
        return None
    if record.get("source") != _source(weights, meta) or size != record.get("size"):
        return None
    return record["entries"]


def _encoder_layout(ctx, encoder) -> list[dict]:
    """The encoder's output entries, laid out one after another at ALIGN-aligned offsets."""
    import iree.runtime as rt

    out = rt.VmVariantList(1)
    ctx.vm_context.invoke(encoder.lookup_function("__encode_parameter_indices_all"), rt.VmVariantList(0), out)
    scopes = out.get_as_list(0)
    entries, offset = [], 0
    for i in range(scopes.size):
        scope = scopes.get_as_list(i)
        name = bytes(scope.get_as_object(0, rt.VmBuffer)).decode()
        if name != PACKED_SCOPE:
            raise RuntimeError(f"encoder writes parameter scope {name!r}, expected {PACKED_SCOPE!r}")
        items = scope.get_as_list(1)
        for j in range(items.size):
            item = items.get_as_list(j)  # [kind, key, metadata, length, alignment]
            if item.get_variant(0) != 1:
                raise RuntimeError(f"encoder output entry of kind {item.get_variant(0)} (only file entries are supported)")
            length, align = item.get_variant(3), max(item.get_variant(4), ALIGN)
            offset = -(-offset // align) * align
            entries.append({"key": bytes(item.get_as_object(1, rt.VmBuffer)).decode(), "offset": offset, "length": length})
            offset += length
    return entries


def pack(vmfb: Path, meta: ModuleMeta, weights: Path) -> Path:
    """Run vmfb's encoder over the flat weight file; write the packed file (atomically), its record last."""
    import iree.runtime as rt

    encoder_file = encoder_path_for(vmfb)
    if not encoder_file.is_file() or sha256_file(encoder_file) != meta.provenance.encoder_sha256:
        raise UserError(f"{encoder_file}: missing or not the encoder this module was built with; rebuild the module")
    config = rt.Config("local-task")
    model = rt.ParameterIndex()
    with open(weights, "rb") as f:
        handle = rt.FileHandle.wrap_fd(f.fileno())
        for name, length, offset in flat_layout(meta):
            model.add_from_file_handle(name, handle, length, offset)
        encoder = rt.VmModule.copy_buffer(config.vm_instance, encoder_file.read_bytes())
        probe = rt.SystemContext(vm_modules=[rt.create_io_parameters_module(config.vm_instance, model.create_provider(scope="model")),
                                             encoder], config=config)
        entries = _encoder_layout(probe, encoder)
        del probe
        size = max(e["offset"] + e["length"] for e in entries)

        out = packed_path(weights, meta)
        with atomic_path(out) as tmp, open(tmp, "r+b") as f_out:
            f_out.truncate(size)
            buf = mmap.mmap(f_out.fileno(), size)
            target = rt.ParameterIndex()
            whandle = rt.FileHandle.wrap_memory(buf, readable=True, writable=True)
            for e in entries:
                target.add_from_file_handle(e["key"], whandle, e["length"], e["offset"])
            params = rt.create_io_parameters_module(config.vm_instance, model.create_provider(scope="model"),
                                                    target.create_provider(scope=PACKED_SCOPE))
            ctx = rt.SystemContext(vm_modules=[params, encoder], config=config)
            done = rt.HalFence.create_at(config.device.create_semaphore(0), 1)
            args = rt.VmVariantList(3)
            args.push_list(rt.VmVariantList(0))
            args.push_ref(rt.HalFence(1))  # nothing to wait for
            args.push_ref(done)
            ctx.vm_context.invoke(encoder.lookup_function("__encode_parameters_all"), args, rt.VmVariantList(0))
            done.wait()
            buf.flush()  # the mapping itself goes with the process (IREE's file handle still points into it)
            os.fsync(f_out.fileno())
    write_atomic(_record_path(out), json.dumps({"source": _source(weights, meta), "size": size, "entries": entries}, indent=1))
    return out


def ensure_packed(vmfb: Path, meta: ModuleMeta, weights: Path) -> tuple[Path, list[dict]]:
    """(packed file, its entries) for `weights`, packing it first (in a child process) if it is missing or stale."""
    entries = packed_entries(weights, meta)
    if entries is None:
        proc = subprocess.run([sys.executable, "-m", "pcpc.runtime.pack", str(vmfb), str(weights)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise UserError(f"{weights}: packing the weights for {vmfb.name} failed:\n{tail}")
        entries = packed_entries(weights, meta)
        if entries is None:
            raise RuntimeError(f"{weights}: packed file missing after packing")
    return packed_path(weights, meta), entries


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m pcpc.runtime.pack MODULE.vmfb WEIGHTS", file=sys.stderr)
        return 2
    vmfb, weights = Path(argv[0]), Path(argv[1])
    try:
        pack(vmfb, load_meta(meta_path_for(vmfb)), weights)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
