"""runtime/train/data.py (tokenizers, split, per-worker sampling) and `pcpc data fetch` (download, checksum,
offline), the download tested against a local HTTP server the test starts (a real download, no mock)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import stat
import threading
import zipfile

import numpy as np
import pytest

from corpus import write_play
from pcpc import cmd_data
from pcpc.errors import UserError
from pcpc.runtime.train.data import WorkerSampler, load_text, val_batches
from pcpc.runtime.train.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """A seeded play with tiny Shakespeare's 65 characters (tests/corpus.py)."""
    return write_play(tmp_path_factory.mktemp("data") / "tiny_shakespeare.txt", 1_115_394)


@pytest.fixture
def http_root(tmp_path):
    """(folder, base URL) of an HTTP server on 127.0.0.1 serving the folder, for the test's duration."""
    root = tmp_path / "www"
    root.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_char_tokenizer_on_tiny_shakespeare(shakespeare):
    ds = load_text(shakespeare, "char")
    text = shakespeare.read_text()
    assert ds.tokenizer.vocab_size == 65  # nanoGPT's shakespeare_char vocabulary
    assert ds.tokenizer.chars == "".join(sorted(set(text)))
    assert len(ds.train) == int(len(text) * 0.9) and len(ds.train) + len(ds.val) == len(text)
    assert ds.tokenizer.decode(ds.train[:200]) == text[:200]
    assert ds.tokenizer.decode(ds.val[-50:]) == text[-50:]
    assert np.array_equal(ds.tokenizer.encode(text[:1000]), ds.train[:1000])
    again = Tokenizer.from_json(ds.tokenizer.to_json())
    assert again == ds.tokenizer


def test_byte_tokenizer(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("héllo wörld\n".encode() * 50)
    ds = load_text(path, "byte")
    assert ds.tokenizer.vocab_size == 256
    raw = path.read_bytes()
    assert np.array_equal(np.concatenate([ds.train, ds.val]), np.frombuffer(raw, np.uint8))
    n = len("héllo wörld\n".encode())
    assert ds.tokenizer.decode(ds.train[:n]) == "héllo wörld\n"


def test_char_tokenizer_rejects_unknown_characters(shakespeare):
    tok = load_text(shakespeare, "char").tokenizer
    with pytest.raises(UserError, match="not in the run's vocabulary"):
        tok.encode("naïve")


def test_sampler_is_a_pure_function_of_seed_rank_and_step(shakespeare):
    train = load_text(shakespeare, "char").train
    a = WorkerSampler(train, 0, 2, block_size=32, batch_size=8, seed=7)
    b = WorkerSampler(train, 0, 2, block_size=32, batch_size=8, seed=7)
    steps = [0, 5, a.steps_per_epoch + 3, 1]
    batches = [a.batch(s) for s in steps]
    for s, (x, y) in zip(reversed(steps), reversed(batches)):  # any order, fresh object: same batches
        bx, by = b.batch(s)
        assert np.array_equal(bx, x) and np.array_equal(by, y)
    x, y = batches[0]
    assert x.shape == y.shape == (8, 32) and x.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    other_seed = WorkerSampler(train, 0, 2, 32, 8, seed=8).batch(0)[0]
    assert not np.array_equal(other_seed, x)


def test_workers_draw_from_disjoint_shards_and_epochs_cover_every_window(shakespeare):
    train = load_text(shakespeare, "char").train[:20_000]
    world, block, batch = 2, 16, 4
    seen = []
    for rank in range(world):
        s = WorkerSampler(train, rank, world, block, batch, seed=1)
        shard = train[rank * (len(train) // world):(rank + 1) * (len(train) // world)]
        assert np.array_equal(s.shard, shard)
        starts = np.concatenate([s.starts(step) for step in range(s.steps_per_epoch)])  # one epoch
        assert len(set(starts.tolist())) == len(starts) == s.steps_per_epoch * batch  # each window once
        assert len(set((starts % block).tolist())) == 1  # on one grid (its phase drawn per epoch)
        assert starts.min() >= 0 and starts.max() + block + 1 <= len(shard)
        assert s.epoch_of(s.steps_per_epoch) == 1
        x, y = s.batch(3)
        for row, target, start in zip(x, y, s.starts(3)):  # rows are the shard's tokens at those offsets
            assert np.array_equal(row, shard[start:start + block])
            assert np.array_equal(target, shard[start + 1:start + block + 1])
        seen.append({rank * len(shard) + int(v) for v in starts})  # offsets into the training split
    assert not seen[0] & seen[1]


def test_val_batches_are_fixed_and_evenly_spaced(shakespeare):
    val = load_text(shakespeare, "char").val
    every = val_batches(val, 32, 16)
    assert len(every) == ((len(val) - 1) // 32) // 16
    some = val_batches(val, 32, 16, max_batches=5)
    assert len(some) == 5
    assert np.array_equal(some[0][0], every[0][0]) and np.array_equal(some[-1][0], every[-1][0])
    x, y = some[2]
    assert x.shape == (16, 32) and np.array_equal(x[:, 1:], y[:, :-1])


def test_too_little_data_is_a_user_error(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("abcdefgh" * 20)
    ds = load_text(path, "char")
    with pytest.raises(UserError, match="data_path: .* too few for one batch"):
        WorkerSampler(ds.train, 0, 2, block_size=32, batch_size=4, seed=0)
    with pytest.raises(UserError, match="validation split .* too few"):
        val_batches(ds.val, 32, 4)
    with pytest.raises(UserError, match="data_path: .* not found"):
        load_text(tmp_path / "missing.txt", "char")


def test_fetch_downloads_verifies_and_places(tmp_path, monkeypatch, shakespeare, http_root):
    www, url = http_root
    (www / "input.txt").write_bytes(shakespeare.read_bytes())
    digest = hashlib.sha256(shakespeare.read_bytes()).hexdigest()
    src = cmd_data.SOURCES["tiny_shakespeare"]
    monkeypatch.setitem(cmd_data.SOURCES, "tiny_shakespeare", cmd_data.Source(
        f"{url}/input.txt", src.file_name, src.algorithm, digest, shakespeare.stat().st_size))
    old = os.umask(0o022)
    try:
        out = cmd_data.fetch_dataset("tiny_shakespeare", tmp_path / "data", say=lambda m: None)
    finally:
        os.umask(old)
    assert out == tmp_path / "data" / "tiny_shakespeare.txt"
    assert out.read_bytes() == shakespeare.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # the umask's mode, not mkstemp's 0600
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny_shakespeare.txt"]  # no temp files left
    messages = []
    cmd_data.fetch_dataset("tiny_shakespeare", tmp_path / "data", say=messages.append)
    assert "already there" in messages[0]


def test_fetch_unzips_a_member_and_rejects_a_bad_checksum(tmp_path, monkeypatch, http_root):
    www, url = http_root
    payload = b"<mediawiki>" + bytes(range(256)) * 10
    with zipfile.ZipFile(www / "enwik8.zip", "w") as zf:
        zf.writestr("enwik8", payload)
    good = cmd_data.Source(f"{url}/enwik8.zip", "enwik8.txt", "sha1", hashlib.sha1(payload).hexdigest(),
                           len(payload), member="enwik8")
    monkeypatch.setitem(cmd_data.SOURCES, "enwik8", good)
    out = cmd_data.fetch_dataset("enwik8", tmp_path / "data", say=lambda m: None)
    assert out.name == "enwik8.txt" and out.read_bytes() == payload
    bad = cmd_data.Source(f"{url}/enwik8.zip", "other.txt", "sha1", "0" * 40, len(payload), member="enwik8")
    monkeypatch.setitem(cmd_data.SOURCES, "enwik8", bad)
    with pytest.raises(UserError, match="does not match the published"):
        cmd_data.fetch_dataset("enwik8", tmp_path / "data", say=lambda m: None)
    assert not (tmp_path / "data" / "other.txt").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["enwik8.txt"]


def test_fetch_of_a_missing_file_says_so_and_leaves_nothing(tmp_path, monkeypatch, http_root):
    _, url = http_root
    src = cmd_data.SOURCES["tiny_shakespeare"]
    monkeypatch.setitem(cmd_data.SOURCES, "tiny_shakespeare", cmd_data.Source(
        f"{url}/moved.txt", src.file_name, src.algorithm, src.digest, src.size))
    with pytest.raises(UserError, match=r"could not download tiny_shakespeare from .*/moved.txt \(HTTP 404 "):
        cmd_data.fetch_dataset("tiny_shakespeare", tmp_path / "data", say=lambda m: None)
    assert list((tmp_path / "data").iterdir()) == []


def test_fetch_without_network_says_which_file_to_place_where(tmp_path, monkeypatch):
    src = cmd_data.SOURCES["enwik8"]
    # Port 9 (discard) on localhost is closed: the same failure as no network, without touching one.
    monkeypatch.setitem(cmd_data.SOURCES, "enwik8", cmd_data.Source(
        "http://127.0.0.1:9/enwik8.zip", src.file_name, src.algorithm, src.digest, src.size, member=src.member))
    with pytest.raises(UserError) as e:
        cmd_data.fetch_dataset("enwik8", tmp_path / "data", timeout=5, say=lambda m: None)
    msg = str(e.value)
    assert "could not download enwik8" in msg and str(tmp_path / "data" / "enwik8.txt") in msg
    assert "57b8363b814821dc9d47aa4d41f58733519076b2" in msg and "rename enwik8 to enwik8.txt" in msg
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        cmd_data.fetch_dataset("nope", tmp_path)
