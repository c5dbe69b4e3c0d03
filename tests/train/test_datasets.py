"""The `data` section: JSONL documents, token shards (llm.c / build-nanogpt formats), BPE tokenizers (a local HF
directory, tiktoken's gpt2 offline), `pcpc data prepare`, and DiLoCo runs that train on each.

The tokenizer is a tiny byte-level BPE the tests train with the `tokenizers` library (tests/corpus.py);
nothing is downloaded. The gpt2 tests only check what happens without tiktoken's files (its download is
made to fail, whatever the network), since the files cannot be fetched here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corpus import play_text, write_bpe, write_documents
from pcpc.errors import UserError
from pcpc.runtime.run import checkpoint
from pcpc.runtime.train import shards as shard_io
from pcpc.runtime.train import tokenizer as tokenizers
from pcpc.runtime.train.config import parse_experiment
from pcpc.runtime.train.data import ShardSampler, load_jsonl, load_shards, val_batches
from pcpc.runtime.train.tokenizer import Tokenizer, named_tokenizer

PCPC = str(Path(sys.executable).parent / "pcpc")
MODEL = {"preset": "nanogpt-small", "n_layer": 1, "n_head": 2, "n_embd": 32}
BASE = {"model_path": "models/tiny.mlir", "tau": 4, "outer_loop_steps": 4, "batch_size": 4, "eval_batch_size": 8,
        "eval_batches": 4, "sample_tokens": 0, "wandb_project": None, "model": MODEL}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """docs.jsonl (400 speeches) and tok/ (a BPE trained on them), in a scratch directory."""
    ws = tmp_path_factory.mktemp("datasets")
    docs = write_documents(ws / "docs.jsonl", 400, seed=3)
    texts = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    write_bpe(ws / "tok", texts)
    write_bpe(ws / "tok_vm", texts, files="vocab+merges")
    return ws


@pytest.fixture(scope="module")
def bpe(ws) -> Tokenizer:
    return named_tokenizer(str(ws / "tok"))


def texts_of(ws) -> list[str]:
    return [json.loads(line)["text"] for line in (ws / "docs.jsonl").read_text().splitlines()]


# --- tokenizers


def test_a_local_hf_tokenizer_directory_round_trips_and_travels_in_vocab_json(ws, bpe):
    text = texts_of(ws)[1]  # a speech
    ids = bpe.encode(text)
    assert ids.dtype == np.int64 and len(ids) < len(text.encode())  # merges happened
    assert bpe.decode(ids) == text
    assert bpe.eot == 0 and bpe.vocab_size == 320
    again = Tokenizer.from_json(bpe.to_json())  # the run's vocab.json: no directory needed
    assert again == bpe and np.array_equal(again.encode(text), ids)
    # GPT-2-style vocab.json + merges.txt: the same BPE
    vm = named_tokenizer(str(ws / "tok_vm"))
    assert np.array_equal(vm.encode(text), ids) and vm.decode(ids) == text
    batch = bpe.encode_batch(texts_of(ws)[:5])
    assert all(np.array_equal(b, bpe.encode(t)) for b, t in zip(batch, texts_of(ws)[:5]))


def test_bad_tokenizer_names_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="neither char, byte, gpt2 nor a local HF tokenizer directory"):
        named_tokenizer("gpt-3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds neither tokenizer.json nor vocab.json"):
        named_tokenizer(str(tmp_path / "empty"))


def test_gpt2_without_its_files_names_them_their_sha256_and_the_cache(tmp_path, monkeypatch):
    import tiktoken.load

    def offline(url):
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # nothing loaded earlier in this process
    tokenizers._gpt2.cache_clear()
    try:
        with pytest.raises(UserError) as e:
            named_tokenizer("gpt2")
    finally:
        tokenizers._gpt2.cache_clear()
    msg = str(e.value)
    for name, digest in tokenizers.GPT2_FILES.items():
        assert name in msg and digest in msg
    for _, _, path in tokenizers.gpt2_files():
        assert str(path) in msg and path.parent == tmp_path / "cache"
    assert "TIKTOKEN_CACHE_DIR" in msg


# --- JSONL


def test_jsonl_split_is_seeded_and_workers_draw_windows_inside_their_own_documents(ws, bpe):
    a = load_jsonl(ws / "docs.jsonl", bpe, 40, seed=5)
    b = load_jsonl(ws / "docs.jsonl", bpe, 40, seed=5)
    c = load_jsonl(ws / "docs.jsonl", bpe, 0.25, seed=6)
    assert len(a.train) == 360 and len(c.train) == 300  # a count, or a fraction of the documents
    assert np.array_equal(a.train.tokens, b.train.tokens) and np.array_equal(a.val, b.val)
    assert not np.array_equal(a.val, c.val[:len(a.val)])
    # validation: the held-out documents joined, each after <|endoftext|>
    assert int((a.val == bpe.eot).sum()) == 40
    all_docs = {tuple(bpe.encode(t)) for t in texts_of(ws)}
    train_docs = {tuple(a.train.tokens[a.train.offsets[i]:a.train.offsets[i + 1]]) for i in range(len(a.train))}
    assert train_docs <= all_docs
    block, batch = 16, 8
    for rank in range(2):
        s = a.sampler(rank, 2, block, batch, seed=1)
        mine = [a.train.tokens[a.train.offsets[i]:a.train.offsets[i + 1]] for i in range(rank, len(a.train), 2)]
        x, y = s.batch(3)
        x2, y2 = a.sampler(rank, 2, block, batch, seed=1).batch(3)  # a pure function of (seed, rank, step)
        assert np.array_equal(x, x2) and np.array_equal(y, y2) and x.shape == (batch, block)
        assert np.array_equal(x[:, 1:], y[:, :-1])
        for row, target in zip(x, y):
            window = np.concatenate([row, target[-1:]])
            assert any(len(d) > block and any(np.array_equal(d[i:i + block + 1], window)
                                              for i in range(len(d) - block)) for d in mine)
        assert not np.array_equal(s.batch(4)[0], x)
    val_batches(a.val, block, 4)  # the joined held-out documents make validation batches


def test_jsonl_errors_name_the_line_the_field_and_the_split(tmp_path, bpe):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected an object with a string 'text' field"):
        load_jsonl(bad, bpe, 1, seed=0)
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON"):
        load_jsonl(bad, bpe, 1, seed=0)
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": "ab"}) + "\n" for _ in range(10)))
    with pytest.raises(UserError, match="test_size: 10 of 10 documents"):
        load_jsonl(short, bpe, 10, seed=0)
    ds = load_jsonl(short, bpe, 2, seed=0)
    with pytest.raises(UserError, match="no document of at least 17 tokens"):
        ds.sampler(0, 1, 16, 4, seed=0)


# --- shards


def test_shard_files_in_every_format_users_have(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) * 7
    shard_io.write_shard(tmp_path / "a_train_000000.bin", ids)
    header = np.fromfile(tmp_path / "a_train_000000.bin", np.int32, count=256)
    assert list(header[:3]) == [20240520, 1, 1000] and not header[3:].any()  # llm.c's gpt-2 header
    assert np.array_equal(shard_io.read_shard(tmp_path / "a_train_000000.bin"), ids)
    big = np.array([5, 70_000, 100_000], np.uint32)
    shard_io.write_shard(tmp_path / "big.bin", big)
    assert list(np.fromfile(tmp_path / "big.bin", np.int32, count=2)) == [20240801, 7]  # llama-3's
    assert np.array_equal(shard_io.read_shard(tmp_path / "big.bin"), big)
    np.save(tmp_path / "edufineweb_val_000000.npy", ids)  # build-nanogpt's np.save shards
    assert np.array_equal(shard_io.read_shard(tmp_path / "edufineweb_val_000000.npy"), ids)
    ids.tofile(tmp_path / "raw.bin")  # headerless uint16
    assert np.array_equal(shard_io.read_shard(tmp_path / "raw.bin"), ids)
    data = (tmp_path / "a_train_000000.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-10])
    with pytest.raises(UserError, match="header says 1,000 tokens .* truncated"):
        shard_io.read_shard(tmp_path / "cut.bin")
    train, val = shard_io.shard_paths(tmp_path)
    assert [p.name for p in train] == ["a_train_000000.bin"] and [p.name for p in val] == [
        "edufineweb_val_000000.npy"]
    (tmp_path / "edufineweb_val_000000.npy").unlink()
    with pytest.raises(UserError, match="no val_\\* shard"):
        shard_io.shard_paths(tmp_path)


def test_shard_sampler_reads_disjoint_strides_in_order_and_skips_short_tails(tmp_path):
    a, b = np.arange(0, 1000, dtype=np.uint16), np.arange(2000, 2500, dtype=np.uint16)
    B, T, W = 2, 8, 3
    samplers = [ShardSampler([a, b], r, W, T, B) for r in range(W)]
    stride = B * T * W  # 48: shard a holds 20 strides (+1 token), b holds 10
    assert samplers[0].steps_per_epoch == (999 // stride) + (499 // stride) == 20 + 10
    seen = set()
    for step in range(samplers[0].steps_per_epoch):
        for r, s in enumerate(samplers):
            x, y = s.batch(step)
            k, off = s.position(step)
            src = (a, b)[k]
            assert np.array_equal(x.reshape(-1), src[off:off + B * T]) and np.array_equal(y.reshape(-1), src[off + 1:off + B * T + 1])
            part = (k, off)
            assert part not in seen  # every worker's part of every step is its own
            seen.add(part)
        assert samplers[0].position(step) == ((0, step * stride) if step < 20 else (1, (step - 20) * stride))
    assert samplers[1].position(20) == (1, B * T)  # after a's 20 strides (its tail skipped), b from its start
    assert samplers[0].position(30) == samplers[0].position(0)  # the next epoch
    with pytest.raises(UserError, match="no train shard holds one step"):
        ShardSampler([a[:40]], 0, W, T, B)


def test_prepare_streams_documents_into_atomic_shards_with_a_manifest(ws, bpe, tmp_path):
    out = tmp_path / "shards"
    info = shard_io.prepare(ws / "docs.jsonl", out, bpe, shard_size=5000, val_tokens=3000, progress=False,
                            batch_docs=16)
    names = sorted(p.name for p in out.iterdir())
    assert names[-1] == "val_000000.bin" and "dataset.json" in names
    assert not [n for n in names if n.startswith(".")]  # no temporary files left
    train, val = shard_io.shard_paths(out)
    got = np.concatenate([shard_io.read_shard(p) for p in val + train])  # val holds the first tokens
    want = np.concatenate([np.concatenate([[bpe.eot], bpe.encode(t)]) for t in texts_of(ws)])
    assert np.array_equal(got, want)  # every document, in order, after <|endoftext|>
    assert len(shard_io.read_shard(val[0])) == 3000
    assert [len(shard_io.read_shard(p)) for p in train[:-1]] == [5000] * (len(train) - 1)
    assert info["tokens"] == {"train": len(want) - 3000, "val": 3000} and info["documents"] == 400
    assert Tokenizer.from_json(json.dumps(shard_io.manifest(out)["tokenizer"])) == bpe
    ds = load_shards(out, bpe)
    assert np.array_equal(ds.val, want[:3000])
    with pytest.raises(UserError, match="is not empty; .* --overwrite"):
        shard_io.prepare(ws / "docs.jsonl", out, bpe, progress=False)
    with pytest.raises(UserError, match="outside the 256 ids of tokenizer byte"):
        load_shards(out, Tokenizer("byte"))


def test_prepare_text_in_chunks_is_the_whole_text(tmp_path):
    text = play_text(60_000, seed=2)
    (tmp_path / "play.txt").write_text(text)
    byte = Tokenizer("byte")
    shard_io.prepare(tmp_path / "play.txt", tmp_path / "s", byte, shard_size=20_000, val_tokens=5000,
                     progress=False)
    train, val = shard_io.shard_paths(tmp_path / "s")
    got = np.concatenate([shard_io.read_shard(p) for p in val + train])
    assert np.array_equal(got, np.frombuffer(text.encode(), np.uint8))  # one document, no separators
    with pytest.raises(UserError, match="nothing would train"):
        shard_io.prepare(tmp_path / "play.txt", tmp_path / "s2", byte, val_tokens=10 ** 6, progress=False)
    assert not (tmp_path / "s2" / "dataset.json").exists() and not list((tmp_path / "s2").glob("*.bin"))


def test_pcpc_data_prepare_command(ws, tmp_path):
    proc = subprocess.run([PCPC, "data", "prepare", str(ws / "docs.jsonl"), "--tokenizer", str(ws / "tok"),
                           "--out", str(tmp_path / "out"), "--shard-size", "4000", "--val-tokens", "2000"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "train + 2,000 val tokens (uint16) from 400 document(s)" in proc.stdout
    for args, msg in [(["--tokenizer", "char"], "char builds its vocabulary"),
                      (["--tokenizer", "nope"], "neither char, byte, gpt2"),
                      (["--tokenizer", "byte", "--shard-size", "0"], "--shard-size must be >= 1")]:
        proc = subprocess.run([PCPC, "data", "prepare", str(ws / "docs.jsonl"), "--out", str(tmp_path / "x"),
                               *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# --- the config


@pytest.mark.parametrize("fields, msg", [
    ({"data_path": "a.txt", "data": {"path": "a.jsonl"}}, "data_path or a data section, not both"),
    ({}, "as data_path .* or as a data section"),
    ({"data": {"path": "a.jsonl"}, "tokenizer": "byte"}, "tokenizer: with a data section"),
    ({"data": {"path": "d", "format": "shards", "test_size": 0.1}}, "shards validate on their val_"),
    ({"data": {"path": "a.txt", "test_size": 3}}, "test_size must be a fraction"),
    ({"data": {"path": "a.jsonl", "test_size": 1.5}}, "test_size must be a fraction"),
    ({"data": {"path": "a.jsonl", "format": "csv"}}, "format must be one of"),
    ({"data": {"path": "a.jsonl", "size": 3}}, "data: unknown key 'size'"),
    ({"data": {"path": "a.jsonl", "block_size": 64}, "model": {**MODEL, "block_size": 32}},
     "data.block_size \\(64\\) and model.block_size \\(32\\) differ"),
])
def test_data_section_errors_name_the_field(fields, msg):
    raw = {k: v for k, v in BASE.items()}
    raw.update(fields)
    with pytest.raises(UserError, match=msg):
        parse_experiment(raw)


def test_data_block_size_sets_the_models():
    cfg = parse_experiment({**BASE, "data": {"path": "a.jsonl", "block_size": 48}})
    assert cfg.model_config(300).block_size == 48 and cfg.dataset.kind == "jsonl"


# --- runs


def run(ws: Path, name: str, out: str, *args, **fields) -> subprocess.CompletedProcess:
    (ws / name).write_text(json.dumps({**BASE, **fields}))
    proc = subprocess.run([PCPC, "run", name, "--out", out, *args], cwd=ws, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc


def test_diloco_trains_on_jsonl_documents_with_a_bpe(ws, bpe):
    proc = run(ws, "jsonl.json", "runs/jsonl", data={"path": "docs.jsonl", "tokenizer": "tok", "block_size": 32,
                                                     "test_size": 40}, sample_tokens=30)
    rows = [json.loads(x) for x in (ws / "runs/jsonl/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < np.log(320)  # below uniform over the BPE's ids
    assert Tokenizer.from_json((ws / "runs/jsonl/vocab.json").read_text()) == bpe
    sample = (ws / "runs/jsonl/sample.txt").read_text()
    assert sample.startswith("<|endoftext|>") and len(sample) > 30  # decoded BPE tokens, not ids
    assert "tiny" in proc.stdout


def test_diloco_on_prepared_shards_resumes_at_the_data_position(ws, bpe):
    """The shards' tokenizer comes from their dataset.json; a run stopped after round 2 and resumed ends with
    the weights of an uninterrupted one (the checkpoint holds the step, the data position a function of it)."""
    shard_io.prepare(ws / "docs.jsonl", ws / "shards", bpe, shard_size=6000, val_tokens=3000, progress=False)
    data = {"path": "shards", "block_size": 32}
    run(ws, "full.json", "runs/full", data=data)
    run(ws, "half.json", "runs/half", data=data, outer_loop_steps=2)
    run(ws, "half.json", "runs/half", "--resume", "--set", "outer_loop_steps=4", data=data, outer_loop_steps=2)
    a = checkpoint.load(checkpoint.path_in(ws / "runs/full"), "diloco").state["params"]
    b = checkpoint.load(checkpoint.path_in(ws / "runs/half"), "diloco").state["params"]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert json.loads((ws / "runs/full/vocab.json").read_text())["kind"] == "hf"
