"""`pcpc generate --adapter` and `pcpc peft merge` with an adapter made by the HF peft library."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from qwen_helpers import MAX_SEQ, PREFILL_LEN, build_case, hf_model, make_hf_dir, session_root

from pcpc.cli import cli

peft = pytest.importorskip("peft")
CASE = "gqa-tied"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = session_root(tmp_path_factory)
    build_case(root, CASE, (1, 2))
    hf_dir, out = make_hf_dir(root, CASE), root / "artifacts"
    res = run("export", "--model", hf_dir, "--batch-size", 1, "--batch-size", 2, "--prefill-len", PREFILL_LEN,
              "--max-seq", MAX_SEQ, "--out-dir", out)
    assert res.exit_code == 0, res.output
    adapters = {}
    for kind, config in [("lora", peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])),
                         ("dora", peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                  target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]))]:
        torch.manual_seed(1)
        pm = peft.get_peft_model(hf_model(CASE), config)
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
        pm.save_pretrained(root / f"adapter-{kind}")
        adapters[kind] = (root / f"adapter-{kind}", pm.eval())
    return hf_dir, out, adapters


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_generate_with_an_adapter_matches_peft(env, kind):
    from pcpc.runtime.prompts import TextCodec

    hf_dir, out, adapters = env
    path, pm = adapters[kind]
    codec = TextCodec(hf_dir)
    text = "The quick brown fox"
    ids = codec.encode(text, chat=False)
    want = pm.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       max_new_tokens=16, do_sample=False, pad_token_id=0)
    res = run("generate", "--model", hf_dir, "--adapter", path, "--prompt", text, "--raw", "--max-tokens", 16,
              "--out-dir", out)
    assert res.exit_code == 0, res.output
    assert res.stdout == codec.decode(want[0, len(ids):].tolist()) + "\n"
    plain = run("generate", "--model", hf_dir, "--prompt", text, "--raw", "--max-tokens", 16, "--out-dir", out)
    assert plain.stdout != res.stdout  # the adapter changed the model


def test_merge_writes_a_hf_directory_with_the_adapted_logits(env, tmp_path):
    import transformers

    hf_dir, _, adapters = env
    path, pm = adapters["lora"]
    res = run("peft", "merge", path, "--base", hf_dir, "--out", tmp_path / "merged")
    assert res.exit_code == 0, res.output
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, pm(ids).logits, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    again = run("peft", "merge", path, "--base", hf_dir, "--out", tmp_path / "merged")
    assert again.exit_code == 2 and "exists and is not empty" in again.output


def test_a_foreign_adapter_is_refused(env, tmp_path):
    import json

    hf_dir, out, adapters = env
    path, _ = adapters["lora"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["r"] = 4
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    res = run("generate", "--model", hf_dir, "--adapter", bad, "--prompt", "x", "--out-dir", out)
    assert res.exit_code == 2 and "does not fit this model" in res.output
    res = run("peft", "merge", tmp_path, "--base", hf_dir, "--out", tmp_path / "m")
    assert res.exit_code == 2 and "not a peft adapter directory" in res.output


def test_merge_names_its_base_option(env, tmp_path):
    """An unknown --base is reported as --base, the option the user gave, not another command's --model."""
    _, _, adapters = env
    path, _ = adapters["lora"]
    res = run("peft", "merge", path, "--base", "gpt-17", "--out", tmp_path / "m")
    assert res.exit_code == 2 and "--base 'gpt-17': not a directory and not a known model" in res.output
    assert not (tmp_path / "m").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run("peft", "merge", path, "--base", empty, "--out", tmp_path / "m")
    assert res.exit_code == 2 and f"--base {empty}: expected a HF model directory" in res.output
