"""HF model directories, safetensors reading and the flat weight binary.

A HF model directory holds config.json, *.safetensors (one file or shards)
and tokenizer files. It is found from `--weights DIR`, a model path, or the
HF hub cache (~/.cache/huggingface/hub, $HF_HOME/hub, $HF_HUB_CACHE).

Safetensors files are parsed here directly (8-byte header length, JSON
header, raw little-endian data) and memory-mapped, so reading a 1 GB
checkpoint makes no extra full copy; bf16 tensors are widened per tensor.

The flat binary (the reference design's weight file) is every parameter as
raw little-endian values (float32, or bfloat16 for a bf16 module),
concatenated in the module's parameter order, with no header. Its size must
equal the module's meta.json `parameter_bytes`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pcpc.errors import UserError

HUB_REPOS = {"qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct"}
"""Preset name -> HF hub repository whose files the preset's weights come from."""

ALIGN = 4096
"""Alignment of host weight arrays: IREE's CPU kernels need aligned buffers to import them without a copy."""

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32}


def hub_cache_dirs() -> list[Path]:
    """Where the HF hub cache may live, in the order huggingface_hub looks."""
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        out.append(Path(os.environ["HF_HOME"]) / "hub")
    out.append(Path.home() / ".cache" / "huggingface" / "hub")
    return out


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def find_in_hub_cache(repo: str) -> Path | None:
    """The snapshot directory of `repo` in the HF cache that has config.json and safetensors, or None."""
    for cache in hub_cache_dirs():
        root = cache / ("models--" + repo.replace("/", "--"))
        snaps = root / "snapshots"
        if not snaps.is_dir():
            continue
        ref = root / "refs" / "main"
        if ref.is_file() and _is_model_dir(snaps / ref.read_text().strip()):
            return snaps / ref.read_text().strip()
        for snap in sorted(snaps.iterdir()):
            if _is_model_dir(snap):
                return snap
    return None


def find_preset(model: str, option: str = "--model") -> tuple[str, Path | None]:
    """(HF repo, its snapshot in the HF cache or None) of a preset name; an unknown name is a UserError that
    names `option`, the argument or config field the name came from."""
    repo = HUB_REPOS.get(model)
    if repo is None:
        raise UserError(f"{option} {model!r}: not a directory and not a known model; "
                        f"valid names: {', '.join(HUB_REPOS)}")
    return repo, find_in_hub_cache(repo)


def find_model_dir(model: str, weights: str | Path | None = None, option: str = "--model") -> Path:
    """The HF directory holding the weights of `model` (a preset name or a path); errors name `option`."""
    if weights is not None:
        path = Path(weights)
        if not _is_model_dir(path):
            raise UserError(f"--weights {path}: expected a directory with config.json and *.safetensors")
        return path
    path = Path(model)
    if path.is_dir():
        if not _is_model_dir(path):
            raise UserError(f"{option} {path}: expected a HF model directory with config.json and *.safetensors")
        return path
    repo, found = find_preset(model, option)
    if found is None:
        raise UserError(
            f"no weights for {model}: download {repo} (config.json, model.safetensors, tokenizer.json, "
            f"tokenizer_config.json), e.g. `huggingface-cli download {repo}` into the HF cache "
            f"({hub_cache_dirs()[-1]}), or put the files in a directory and pass --weights DIR"
        )
    return found


def read_hf_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read config.json: {e}") from None


def _safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        size = path.stat().st_size
        if n > size - 8:
            raise UserError(f"{path}: safetensors header of {n} bytes does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the directory's *.safetensors files, memory-mapped (bf16 as raw uint16)."""
    tensors: dict[str, np.ndarray] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no *.safetensors files")
    for path in files:
        header, base = _safetensors_header(path)
        size = path.stat().st_size
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        for name, info in header.items():
            dtype = _ST_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise UserError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            start, end = info["data_offsets"]
            count = int(np.prod(info["shape"], dtype=np.int64))
            if base + end > size or end - start != count * np.dtype(dtype).itemsize:
                raise UserError(f"{path}: tensor {name!r} lies outside the file or has the wrong byte size (truncated?)")
            arr = mm[base + start : base + end].view(dtype).reshape(info["shape"])
            tensors[name] = _Bf16(arr) if info["dtype"] == "BF16" else arr
    return tensors


class _Bf16:
    """A memory-mapped bf16 tensor (raw uint16) widened on demand."""

    def __init__(self, raw: np.ndarray):
        self.raw = raw
        self.shape = raw.shape

    def astype_f32(self) -> np.ndarray:
        return (self.raw.astype(np.uint32) << 16).view(np.float32)


def to_f32(t) -> np.ndarray:
    """A float32 array of a tensor from `read_safetensors`."""
    if isinstance(t, _Bf16):
        return t.astype_f32()
    return np.asarray(t, dtype=np.float32)


def ordered_tensors(tensors: dict, shapes: dict[str, tuple[int, ...]], tied: bool, where: str) -> Iterator[tuple[str, object]]:
    """(name, tensor) in parameter order, checking names and shapes against `shapes`."""
    expected = set(shapes) | ({"lm_head.weight"} if tied else set())
    extra = sorted(set(tensors) - expected)
    if extra:
        raise UserError(f"{where}: unexpected tensors {extra[:5]} (not a model of this configuration)")
    missing = [n for n in shapes if n not in tensors]
    if missing:
        raise UserError(f"{where}: missing {len(missing)} tensors, e.g. {missing[:3]}")
    for name, shape in shapes.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise UserError(f"{where}: tensor {name!r} has shape {list(t.shape)}, the config expects {list(shape)}")
        yield name, t


def _encode(t, dtype: str) -> bytes:
    f32 = np.ascontiguousarray(to_f32(t), dtype="<f4")
    if dtype == "float32":
        return f32.tobytes()
    if dtype == "bfloat16":
        return f32_to_bf16_bits(f32).tobytes()
    raise ValueError(f"flat weights dtype must be float32 or bfloat16, got {dtype!r}")


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16), as torch does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype("<u2")


def write_flat(path: Path, tensors: Sequence[tuple[str, object]], dtype: str, expected_bytes: int) -> int:
    """Write tensors back to back in order as raw little-endian `dtype`; atomic; verified; returns the size."""
    from pcpc.mlir.build import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # fsynced, checked, then renamed into place
        for _, t in tensors:
            f.write(_encode(t, dtype))
        f.flush()
        os.fsync(f.fileno())
        verify_flat(tmp, expected_bytes)
    return path.stat().st_size


def verify_flat(path: Path, expected_bytes: int) -> None:
    """The flat file's size must equal the module's parameter_bytes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weight file not found (write it with `pcpc export`)")
    size = path.stat().st_size
    if size != expected_bytes:
        raise UserError(
            f"{path}: weight file is {size:,} bytes but the module's parameters need {expected_bytes:,} bytes "
            f"(meta.json parameter_bytes); it was written for another model or dtype"
        )


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """An uninitialised uint8 array whose data starts on an `align`-byte boundary."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes]


NP_DTYPES = {"float32": np.dtype("<f4"), "bfloat16": np.dtype("<u2")}


def read_flat(path: Path, specs: Sequence, expected_bytes: int) -> list[np.ndarray]:
    """The flat file as one array per spec (name, shape, dtype), each aligned, read without a second copy.

    bfloat16 tensors come back as their raw uint16 bit patterns; view them
    with the runtime's bfloat16 dtype before use.
    """
    verify_flat(path, expected_bytes)
    out = []
    with open(path, "rb") as f:
        for spec in specs:
            dt = NP_DTYPES[spec.dtype]
            n = int(np.prod(spec.shape, dtype=np.int64)) * dt.itemsize
            buf = aligned_empty(max(n, 1))[:n]
            if f.readinto(memoryview(buf)) != n:
                raise UserError(f"{path}: truncated while reading {spec.name!r}")
            out.append(buf.view(dt).reshape(spec.shape))
    return out


def eos_token_ids(model_dir: Path) -> list[int]:
    """End-of-sequence ids from generation_config.json, else config.json."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            try:
                eos = json.loads(path.read_text()).get("eos_token_id")
            except json.JSONDecodeError:
                continue
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return []
