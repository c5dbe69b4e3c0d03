"""Weight files (safetensors in, flat binary out) and prompt files."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from qwen_helpers import hf_model, make_hf_dir, session_root

from pcpc.errors import UserError
from pcpc.exporters import hf_weights, qwen2
from pcpc.mlir.signature import TensorSpec
from pcpc.runtime.prompts import decode_prompts, encode_prompts, read_prompts, write_prompts


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(session_root(tmp_path_factory), "mha-untied")


def specs_for(cfg, dtype="float32"):
    return [TensorSpec(n, "param", s, dtype) for n, s in qwen2.param_shapes(cfg).items()]


def test_flat_binary_round_trip(hf_dir, tmp_path):
    hf = hf_model("mha-untied")
    cfg = qwen2.config_from_hf(hf_weights.read_hf_config(hf_dir))
    specs = specs_for(cfg)
    nbytes = sum(s.nbytes for s in specs)
    ordered = list(hf_weights.ordered_tensors(hf_weights.read_safetensors(hf_dir), qwen2.param_shapes(cfg), False, "d"))
    path = tmp_path / "w.bin"
    assert hf_weights.write_flat(path, ordered, "float32", nbytes) == nbytes == path.stat().st_size
    arrays = hf_weights.read_flat(path, specs, nbytes)
    for (name, p), arr in zip(hf.named_parameters(), arrays):
        assert arr.ctypes.data % hf_weights.ALIGN == 0
        np.testing.assert_array_equal(arr, p.detach().numpy(), err_msg=name)
    # raw little-endian f32, no header: the first tensor is the first bytes
    first = np.frombuffer(path.read_bytes()[:16], "<f4")
    np.testing.assert_array_equal(first, hf.model.embed_tokens.weight.detach().numpy().ravel()[:4])


def test_flat_binary_size_mismatch_gives_both_sizes(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match=r"w.bin: weight file is 100 bytes but the module's parameters need 104 bytes"):
        hf_weights.verify_flat(path, 104)
    with pytest.raises(UserError, match="weight file is 100 bytes .* need 96 bytes"):
        hf_weights.read_flat(path, [TensorSpec("a", "param", (24,), "float32")], 96)
    with pytest.raises(UserError, match="weight file not found"):
        hf_weights.verify_flat(tmp_path / "missing.bin", 4)


def test_bf16_weights_round_like_torch(tmp_path):
    x = torch.randn(1000) * 3
    bits = hf_weights.f32_to_bf16_bits(x.numpy())
    np.testing.assert_array_equal(bits, x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    # a bf16 safetensors checkpoint is widened exactly
    hf = hf_model("mqa-tied").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    tensors = hf_weights.read_safetensors(tmp_path / "bf16")
    w = hf.model.layers[0].mlp.up_proj.weight
    np.testing.assert_array_equal(hf_weights.to_f32(tensors["model.layers.0.mlp.up_proj.weight"]), w.detach().float().numpy())


def test_safetensors_and_tensor_set_errors(hf_dir, tmp_path):
    cfg = qwen2.config_from_hf(hf_weights.read_hf_config(hf_dir))
    shapes = qwen2.param_shapes(cfg)
    tensors = hf_weights.read_safetensors(hf_dir)
    with pytest.raises(UserError, match=r"missing 1 tensors, e.g. \['model.norm.weight'\]"):
        list(hf_weights.ordered_tensors({k: v for k, v in tensors.items() if k != "model.norm.weight"}, shapes, False, "d"))
    with pytest.raises(UserError, match=r"unexpected tensors \['extra'\]"):
        list(hf_weights.ordered_tensors({**tensors, "extra": tensors["model.norm.weight"]}, shapes, False, "d"))
    bad = dict(shapes)
    bad["model.norm.weight"] = (7,)
    with pytest.raises(UserError, match=r"'model.norm.weight' has shape \[48\], the config expects \[7\]"):
        list(hf_weights.ordered_tensors(tensors, bad, False, "d"))
    # a truncated safetensors file
    data = (hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="outside the file or has the wrong byte size"):
        hf_weights.read_safetensors(tmp_path / "cut")


def test_find_model_dir_in_hub_cache_and_download_hint(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UserError, match=r"no weights for qwen2.5-0.5b: download Qwen/Qwen2.5-0.5B-Instruct .*--weights DIR"):
        hf_weights.find_model_dir("qwen2.5-0.5b")
    snap = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snap / f).write_bytes((hf_dir / f).read_bytes())
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    assert hf_weights.find_model_dir("qwen2.5-0.5b") == snap
    with pytest.raises(UserError, match="--weights .*: expected a directory with config.json and \\*.safetensors"):
        hf_weights.find_model_dir("qwen2.5-0.5b", tmp_path / "home")
    with pytest.raises(UserError, match="valid names: qwen2.5-0.5b"):
        hf_weights.find_model_dir("gpt5")


def test_eos_ids_from_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert hf_weights.eos_token_ids(tmp_path) == [7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    assert hf_weights.eos_token_ids(tmp_path) == [151645, 151643]


PROMPTS = [[1, 2, 3], [], [151645, 2**40, 0], list(range(300))]


def test_prompt_file_round_trip_and_layout(tmp_path):
    path = tmp_path / "p.bin"
    size = write_prompts(path, PROMPTS)
    data = path.read_bytes()
    assert size == len(data) == 4 + sum(4 + 8 * len(p) for p in PROMPTS)
    assert struct.unpack_from("<I", data, 0) == (4,)
    assert struct.unpack_from("<IQQQ", data, 4) == (3, 1, 2, 3)
    assert read_prompts(path) == PROMPTS
    assert decode_prompts(encode_prompts([])) == []


def test_truncated_prompt_file_is_an_error_at_every_cut():
    data = encode_prompts(PROMPTS)
    for cut in [0, 2, 4, 7, 8 + 8 * 3 - 1, 12 + 8 * 3, len(data) - 1]:
        with pytest.raises(UserError, match="truncated"):
            decode_prompts(data[:cut], "p.bin")
    with pytest.raises(UserError, match="prompt 0 declares 3 tokens \\(24 bytes\\) but only 16 bytes remain"):
        decode_prompts(data[:24], "p.bin")
    with pytest.raises(UserError, match="5 unexpected bytes after the last of 4 prompts"):
        decode_prompts(data + b"extra", "p.bin")
    with pytest.raises(UserError, match="token ids must be >= 0"):
        encode_prompts([[1, -2]])


def test_text_stream_holds_back_incomplete_utf8_and_flushes_it_at_the_end():
    from pcpc.runtime.prompts import TextStream

    class ByteCodec:  # token = one byte, as a byte-level tokenizer without merges
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(ByteCodec())
    euro = "€".encode()  # 3 bytes
    assert [stream.push(b) for b in b"a" + euro] == ["a", "", "", "€"]
    assert stream.push(euro[0]) == ""  # held back: the sequence may still complete
    assert stream.finish() == "\ufffd"  # the stream ended: shown as the decoder shows it
    assert stream.finish() == ""
