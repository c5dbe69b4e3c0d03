"""Tiny random Qwen2 models saved as HF directories, and their compiled modules.

Shared by the tests/test_qwen_*.py files. Everything is built under one
per-session directory and reused: HF directories are written once per case
(seeded, so identical), and modules go through the build cache, so a second
test file asking for the same module gets it in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tiny configs: tied/untied, GQA / MHA / MQA, different rope_theta, head dims and depths.
CASES = {
    # 7 query heads per KV head, as Qwen2.5-0.5B (14 / 2): the shape that IREE's dispatch-creation
    # data tiling miscompiled in decode (mlir/compile.py DATA_TILING).
    "gqa-tied": dict(hidden_size=112, intermediate_size=128, num_hidden_layers=2, num_attention_heads=14,
                     num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
    "mha-untied": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "mqa-tied": dict(hidden_size=96, intermediate_size=64, num_hidden_layers=1, num_attention_heads=6,
                     num_key_value_heads=1, rope_theta=500000.0, tie_word_embeddings=True),
}
VOCAB = 320
TRAIN_TEXT = """First Citizen: Before we proceed any further, hear me speak.
All: Speak, speak. You are all resolved rather to die than to famish?
The quick brown fox jumps over the lazy dog; hello world, how are you today?
What is two plus two? The capital of France is Paris. Is fire hot? Answer yes or no.
Write a python function to add two numbers: def add(a, b): return a + b
"""
PREFILL_LEN = 8
MAX_SEQ = 64


def session_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "qwen"
    root.mkdir(exist_ok=True)
    return root


def hf_model(case: str):
    """The seeded transformers model of a case (eval mode, fp32)."""
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.1,
                                   eos_token_id=2, bos_token_id=0, pad_token_id=0, **CASES[case])
    torch.manual_seed(sum(map(ord, case)))
    return transformers.Qwen2ForCausalLM(cfg).eval()


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT.splitlines() * 4, trainer)
    return tok


def make_hf_dir(root: Path, case: str) -> Path:
    """A HF directory (config.json, model.safetensors, tokenizer files) for `case`, written once."""
    import transformers

    path = root / f"hf-{case}"
    if (path / "done").is_file():
        return path
    model = hf_model(case)
    model.save_pretrained(path, safe_serialization=True)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(path)
    (path / "done").write_text("ok")
    return path


def build_case(root: Path, case: str, batch_sizes=(1,)):
    """Build (cached) the generation module of `case` exactly as `pcpc export --model DIR
    --batch-size ... --prefill-len 8 --max-seq 64 --out-dir ROOT/artifacts` would, so the CLI
    tests reuse it. Returns (BuildResult, Qwen2Config)."""
    from pcpc.cmd_qwen import model_target
    from pcpc.mlir.build import build

    target, cfg = model_target(str(make_hf_dir(root, case)), "float32", list(batch_sizes), PREFILL_LEN, MAX_SEQ)
    return build(target, root / "artifacts"), cfg


def build_loss_module(root: Path, case: str, batch: int, seq: int):
    """A forward_loss-only module for `case`."""
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import qwen_target

    hf_config = json.loads((make_hf_dir(root, case) / "config.json").read_text())
    target = qwen_target(f"qwen-test-loss-{case}", hf_config=hf_config, functions=["forward_loss"],
                         loss_batch_size=batch, loss_seq_len=seq, max_seq=MAX_SEQ, prefill_len=PREFILL_LEN)
    return build(target, root / "artifacts")


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (the issue's "max relative error")."""
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    return float((got - want).abs().max() / want.abs().max())
