"""`pcpc export`, `pcpc generate` and `pcpc data prompts` on a tiny HF directory, and their error exits."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from qwen_helpers import MAX_SEQ, PREFILL_LEN, build_case, hf_model, make_hf_dir, session_root

from pcpc.cli import cli

CASE = "gqa-tied"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = session_root(tmp_path_factory)
    build_case(root, CASE, (1, 2))  # the module export asks for: cached if another file built it
    return root, make_hf_dir(root, CASE), root / "artifacts"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def exported(env):
    root, hf_dir, out = env
    res = run("export", "--model", hf_dir, "--batch-size", 1, "--batch-size", 2, "--prefill-len", PREFILL_LEN,
              "--max-seq", MAX_SEQ, "--out-dir", out)
    assert res.exit_code == 0, res.output
    return env


def hf_reply(hf_dir, prompt_ids, n):
    """HF generate's greedy continuation (stops at the model's EOS, as pcpc does), decoded."""
    from pcpc.runtime.prompts import TextCodec

    hf = hf_model(CASE)
    out = hf.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, pad_token_id=0)
    return TextCodec(hf_dir).decode(out[0, len(prompt_ids):].tolist())


def test_export_writes_weights_and_record(exported):
    _, hf_dir, out = exported
    name = "qwen-hf-gqa-tied"
    meta = (out / f"{name}.meta.json").read_text()
    assert (out / f"{name}.weights.bin").stat().st_size == int(meta.split('"parameter_bytes": ')[1].split(",")[0])
    assert (out / f"{name}.model.json").is_file()


def test_generate_raw_and_chat_match_hf(exported):
    import transformers

    _, hf_dir, out = exported
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "The capital of France is"
    res = run("generate", "--model", hf_dir, "--prompt", text, "--max-tokens", 20, "--raw", "--out-dir", out)
    assert res.exit_code == 0, res.output
    assert res.stdout == hf_reply(hf_dir, tok(text)["input_ids"], 20) + "\n"
    res = run("generate", "--model", hf_dir, "--prompt", text, "--max-tokens", 20, "--out-dir", out)
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    assert res.stdout == hf_reply(hf_dir, tok(chat)["input_ids"], 20) + "\n"
    assert "prefill" in res.stderr and "new tokens" in res.stderr


def test_prompt_file_and_batch_generation(exported, tmp_path):
    _, hf_dir, out = exported
    pf = tmp_path / "prompts.bin"
    res = run("data", "prompts", "encode", pf, "--model", hf_dir, "--prompt", "2+2=", "--prompt", "Is fire hot?", "--raw")
    assert res.exit_code == 0 and "2 prompts" in res.stdout, res.output
    res = run("data", "prompts", "show", pf, "--model", hf_dir)
    assert res.exit_code == 0 and "'2+2='" in res.stdout and "'Is fire hot?'" in res.stdout, res.output
    a = run("generate", "--model", hf_dir, "--prompt-file", pf, "--max-tokens", 8, "--out-dir", out)
    b = run("generate", "--model", hf_dir, "--prompt", "2+2=", "--prompt", "Is fire hot?", "--raw", "--max-tokens", 8,
            "--out-dir", out)
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert [l for l in a.stdout.splitlines() if not l.startswith("---")] == \
           [l for l in b.stdout.splitlines() if not l.startswith("---")]
    # seeded sampling is reproducible from the command line
    s1, s2 = (run("generate", "--model", hf_dir, "--prompt", "hi", "--temperature", 1.0, "--top-p", 0.9, "--seed", 3,
                  "--max-tokens", 12, "--out-dir", out) for _ in range(2))
    assert s1.stdout == s2.stdout and s1.exit_code == 0


def test_resident_export_and_generate(exported):
    _, hf_dir, out = exported
    res = run("export", "--model", hf_dir, "--resident", "--batch-size", 1, "--prefill-len", PREFILL_LEN,
              "--max-seq", MAX_SEQ, "--out-dir", out)
    assert res.exit_code == 0, res.output
    assert not (out / "qwen-hf-gqa-tied-resident.weights.bin").exists()  # shares the contract module's file
    assert "packed for qwen-hf-gqa-tied-resident.vmfb" in res.output  # its matrices, packed at export
    assert len(list(out.glob("qwen-hf-gqa-tied.weights.bin.*.packed"))) == 1
    args = ["generate", "--model", hf_dir, "--prompt", "Is fire hot?", "--max-tokens", 12, "--out-dir", out]
    a, b = run(*args), run(*args, "--resident")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert a.stdout == b.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "--model", "gpt-17"], "not a directory and not a known model; valid names: qwen2.5-0.5b"),
        (["generate", "--model", "qwen2.5-0.5b", "--prompt", "x", "--out-dir", "{tmp}"], "not exported yet"),
        (["generate", "--model", "{hf}", "--prompt", "x", "--top-p", "0", "--out-dir", "{out}"], "--top-p must be in"),
        (["generate", "--model", "{hf}", "--prompt", "x", "--max-tokens", "500", "--out-dir", "{out}"],
         "the module's KV cache holds 64"),
        (["generate", "--model", "{hf}", "--out-dir", "{out}"], "give --prompt TEXT"),
        (["export", "--model", "{hf}", "--weights", "{tmp}", "--out-dir", "{tmp}"], "expected a directory with config.json"),
        (["export", "--model", "{hf}", "--prefill-len", "8", "--max-seq", "64", "--cache-size", "4", "--out-dir", "{tmp}"],
         "--cache-size 4: must lie in [--prefill-len, --max-seq) = [8, 64)"),
        (["data", "prompts", "show", "{tmp}/cut.bin"], "truncated"),
        (["data", "prompts", "encode", "{tmp}/x.bin", "--model", "{hf}"], "no prompts"),
    ],
)
def test_cli_errors_exit_2(exported, tmp_path, args, message):
    _, hf_dir, out = exported
    (tmp_path / "cut.bin").write_bytes(b"\x02\x00\x00\x00\x01\x00\x00\x00\x05")
    args = [a.format(hf=hf_dir, out=out, tmp=tmp_path) for a in args]
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr


def test_generate_exports_a_model_that_is_not_exported_yet(env, tmp_path):
    """A fresh HF directory: generate builds the module and writes the weights first, says so once, and the
    tokens are HF's."""
    _, hf_dir, _ = env
    out = tmp_path / "fresh"
    ids = [3, 4, 5]
    from pcpc.runtime.prompts import write_prompts

    write_prompts(tmp_path / "p.bin", [ids])
    res = run("generate", "--model", hf_dir, "--prompt-file", tmp_path / "p.bin", "--max-tokens", 6, "--out-dir", out)
    assert res.exit_code == 0, res.output
    assert res.stderr.count("not exported yet") == 1 and "exporting it now" in res.stderr
    assert (out / "qwen-hf-gqa-tied.model.json").is_file()
    assert res.stdout.strip() == hf_reply(hf_dir, ids, 6).strip()
    again = run("generate", "--model", hf_dir, "--prompt-file", tmp_path / "p.bin", "--max-tokens", 6, "--out-dir", out)
    assert again.exit_code == 0 and "not exported yet" not in again.stderr and again.stdout == res.stdout


def test_export_passes_cache_sizes_to_the_target(monkeypatch):
    import pcpc.cmd_qwen as cmd_qwen
    from pcpc.errors import UserError

    seen = []

    def target(*args):
        seen.append(args)
        raise UserError("stop here")

    monkeypatch.setattr(cmd_qwen, "model_target", target)
    run("export", "--model", "qwen2.5-0.5b", "--cache-size", 200, "--cache-size", 512)
    run("export", "--model", "qwen2.5-0.5b")
    assert [a[-1] for a in seen] == [[200, 512], None]  # None: the default (SHORT_CACHE where it fits)


def test_export_preset_without_weights_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    res = run("export", "--model", "qwen2.5-0.5b", "--out-dir", tmp_path)
    assert res.exit_code == 2
    assert "download Qwen/Qwen2.5-0.5B-Instruct" in res.stderr and "--weights DIR" in res.stderr
