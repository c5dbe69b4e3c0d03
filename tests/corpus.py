"""A seeded stand-in for tiny Shakespeare, made by the tests themselves (nothing is read from outside the repo).

`play_text(n_chars, seed)` writes a play: speaker lines ("FIRST CITIZEN:"),
then lines of words drawn from a seeded Zipf-like vocabulary of made-up
words, with punctuation, blank lines between speeches, and the same 65
characters as tiny Shakespeare (nanoGPT's shakespeare_char vocabulary), so
tests written against that vocabulary size hold. It has enough structure
for a tiny model's loss to fall and is a pure function of its arguments.
"""

from __future__ import annotations

import numpy as np

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
"""The 65 characters of tiny Shakespeare, sorted."""


def _words(rng: np.random.Generator, n: int) -> list[str]:
    consonants, vowels = "bcdfghjklmnprstvwxyzq", "aeiou"
    out = set()
    while len(out) < n:
        k = int(rng.integers(1, 4))
        w = "".join(rng.choice(list(consonants)) + rng.choice(list(vowels)) for _ in range(k))
        if rng.random() < 0.4:
            w += rng.choice(list(consonants))
        out.add(w)
    return sorted(out)


def play_text(n_chars: int = 400_000, seed: int = 0) -> str:
    """n_chars characters of seeded play text over CHARS (every one of them occurs, given 10,000 or more)."""
    rng = np.random.default_rng(seed)
    words = _words(rng, 2000)
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    p /= p.sum()
    speakers = [f"{a.upper()} {b.upper()}" for a, b in zip(_words(rng, 12), _words(rng, 12)[::-1])]
    # Every character of the vocabulary once, up front (digits and rare signs included).
    parts = ["THE PLAY OF 3 & $ ZQX JV, WITH ALL ITS MARKS: ' - ; ? ! .\n\n"]
    size = len(parts[0])
    while size < n_chars:
        speech = [rng.choice(speakers) + ":\n"]
        for _ in range(int(rng.integers(1, 5))):
            n = int(rng.integers(4, 12))
            picked = [words[i] for i in rng.choice(len(words), n, p=p)]
            if rng.random() < 0.15:  # the rare signs and capitals occur throughout, as in the play
                picked[int(rng.integers(n))] = str(rng.choice(["&", "$3", "3", "ZOUNDS", "QUEEN", "JOVE", "VEX",
                                                                "XANTHIPPE", "Kate", "York", "Gaunt"]))
            line = " ".join(picked)
            line = line[0].upper() + line[1:]
            line += str(rng.choice([".", ",", "!", "?", ";", ":", "."], p=[.4, .2, .1, .1, .1, .05, .05]))
            if rng.random() < 0.1:
                line = line.replace(" ", "'s ", 1)
            if rng.random() < 0.05:
                line = line.replace(" ", " - ", 1)
            speech.append(line + "\n")
        text = "".join(speech) + "\n"
        parts.append(text)
        size += len(text)
    text = "".join(parts)[:n_chars]
    assert set(text) <= set(CHARS), sorted(set(text) - set(CHARS))
    assert n_chars < 10_000 or len(set(text)) == len(CHARS), sorted(set(CHARS) - set(text))
    return text


def write_play(path, n_chars: int = 400_000, seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(play_text(n_chars, seed))
    return path


def write_documents(path, n_docs: int = 400, seed: int = 0, field: str = "text"):
    """A JSONL file of n_docs play speeches (one document per line, its text in `field`), 20 to ~600 chars."""
    import json

    text = play_text(n_docs * 400, seed)
    speeches = [s for s in text.split("\n\n") if s][:n_docs]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for s in speeches:
            f.write(json.dumps({field: s + "\n", "id": len(s)}) + "\n")
    return path


def write_bpe(directory, texts, vocab_size: int = 320, files: str = "tokenizer.json"):
    """A byte-level BPE trained on `texts` with the `tokenizers` library, saved as a local HF tokenizer
    directory: tokenizer.json, or (files="vocab+merges") GPT-2-style vocab.json + merges.txt. <|endoftext|>
    is id 0."""
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if files == "tokenizer.json":
        tok.save(str(directory / "tokenizer.json"))
    else:
        tok.model.save(str(directory))
    return directory
