#!/usr/bin/env python3
"""Reference token ids for the tokenizer tests, written to
crates/longattn/tests/data/tokenizer_reference.json.

Ground truth comes from two independent, well-kept tokenizer implementations each, fed the
vocabulary of the GGUF files (read with the `gguf` package) and nothing of longattn:
- SmolLM2 (byte-level BPE): (a) Hugging Face `tokenizers` built by hand as SmolLM2's tokenizer.json
  is configured: BPE(vocab, merges), pre-tokenizer Sequence[Digits(individual_digits=True),
  ByteLevel(add_prefix_space=False)], special tokens added; (b) `transformers` AutoTokenizer loading
  the GGUF file itself (its own GGUF -> tokenizers converter).
- Gemma-3 (SentencePiece BPE): (a) Google's `sentencepiece` on a ModelProto built from the GGUF
  pieces, scores and types (BPE, byte fallback, no dummy prefix, no whitespace normalisation);
  (b) `transformers` AutoTokenizer loading the GGUF file.
For Gemma-3 a case is recorded only when (a) and (b) agree (the script fails otherwise). For SmolLM2
(a) is the reference: transformers' GGUF converter omits SmolLM2's Digits pre-tokenizer, so (b)
differs where a run of whitespace precedes a digit ("\n\n16:16" -> (a) "ĊĊ" "1" "6", (b) "Ċ" "Ċ"
"1" "6"; llama.cpp's "smollm" pre-tokenizer also splits digits first, as (a)). Each SmolLM2 case
records whether (b) agreed. The hashed ranges (every book's first 40 kB) are recorded from (a) for
both models, with the flag: on Milton's 58-space runs transformers matches Gemma's whitespace pieces
as 16 + 16 + 26 spaces, where llama.cpp's longest-first partition (and (a), and longattn) gives
31 + 27.

Cases: hand-written strings (punctuation, digits, CRLF, non-ASCII, runs of spaces and newlines,
special tokens) and byte ranges of the Gutenberg books (stored as file + range; the text is not
committed). Usage (in a virtual environment):
  pip install gguf tokenizers transformers sentencepiece protobuf
  HF_HUB_OFFLINE=1 python3 scripts/tokenizer_reference.py
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader

CACHE = os.environ.get("LONGATTN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "longattn"))
OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "longattn", "tests", "data",
                   "tokenizer_reference.json")
SMOL = os.path.join(CACHE, "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA = os.path.join(CACHE, "gemma3", "gemma-3-270m-q4_k_m.gguf")
BOOKS = os.path.join(CACHE, "gutenberg")

STRINGS = [
    "Hello world",
    "Hello, world! How are you?",
    "The quick brown fox 12345.\r\nÉtude naïve — ok",
    "  two  spaces\n\nnew\n\n\nthree   spaces\t\ttabs",
    "I'm sure you'll see they've done it, we'd say: 'quoted' \"double\"",
    "Zürich, São Paulo, Kraków, Москва, 東京, 🙂 emoji",
    "3.14159 and 1,000,000 and x=42;",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "<start_of_turn>user\nHi<end_of_turn>\n",
    "trailing space ",
    " leading space",
    "a\u00a0non-breaking\u2009thin space",
]
# (book, start byte, length in bytes): ranges chosen to include CRLF, chapter headings and dialogue.
RANGES = [
    ("carroll-alice.txt", 0, 1500),
    ("carroll-alice.txt", 20000, 1500),
    ("melville-moby_dick.txt", 100000, 1500),
    ("shakespeare-hamlet.txt", 3000, 1500),
    ("bible-kjv.txt", 50000, 1500),
    ("whitman-leaves.txt", 200000, 1500),
]

# Larger ranges, stored as (count, FNV-1a 64 of the ids as little-endian u32): every book's first
# 40 kB, and the neighbourhood of chesterton-ball's ISO-8859 bytes.
HASHED = [(b, 0, 40000) for b in sorted(os.listdir(BOOKS)) if b.endswith(".txt")] + [
    ("chesterton-ball.txt", 220000, 40000)] if os.path.isdir(BOOKS) else []


def fnv1a64(ids):
    h = 0xcbf29ce484222325
    for b in np.asarray(ids, dtype="<u4").tobytes():
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def field_strings(r, key):
    f = r.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def field_values(r, key):
    f = r.fields[key]
    return [f.parts[i][0].item() for i in f.data]


def smol_tokenizers(r):
    from tokenizers import Tokenizer, AddedToken, models, pre_tokenizers, decoders
    tokens = field_strings(r, "tokenizer.ggml.tokens")
    types = field_values(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field_strings(r, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
    return lambda s: tok.encode(s, add_special_tokens=False).ids


def gemma_sentencepiece(r):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    tokens = field_strings(r, "tokenizer.ggml.tokens")
    scores = field_values(r, "tokenizer.ggml.scores")
    types = field_values(r, "tokenizer.ggml.token_type")
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.unk_id = 3
    m.trainer_spec.bos_id = 2
    m.trainer_spec.eos_id = 1
    m.trainer_spec.pad_id = 0
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for t, s, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece = t
        p.score = s
        p.type = ty if ty != 3 or t != "<unk>" else 2  # GGUF types use SentencePiece's numbering
    sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    special = sorted([(t, i) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)],
                     key=lambda x: -len(x[0]))

    # CONTROL pieces (<start_of_turn>, ...) and USER_DEFINED pieces ("\n\n", runs of spaces) are
    # split out of the raw text first, longest first, as llama.cpp (and transformers) do. (Plain
    # SentencePiece escapes spaces to "▁" before matching user-defined pieces, so "  " would never
    # match the piece of two spaces.)
    def enc(s):
        out = []
        i = 0
        start = 0
        while i < len(s):
            hit = next(((t, tid) for t, tid in special if s.startswith(t, i)), None)
            if hit:
                if start < i:
                    out += sp.encode(s[start:i])
                out.append(hit[1])
                i += len(hit[0])
                start = i
            else:
                i += 1
        if start < len(s):
            out += sp.encode(s[start:])
        return out
    return enc


def transformers_tok(path):
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return lambda s: t.encode(s, add_special_tokens=False)


def cases(name, path, builder, strict):
    if not os.path.exists(path):
        print(f"skipping {name}: {path} absent", file=sys.stderr)
        return None
    r = GGUFReader(path)
    a = builder(r)
    b = transformers_tok(path)
    out = {"model": name, "strings": [], "books": []}
    bad = 0
    for s in STRINGS:
        ia, ib = a(s), b(s)
        if ia != ib and strict:
            print(f"{name}: implementations disagree on {s!r}:\n  {ia}\n  {ib}", file=sys.stderr)
            bad += 1
            continue
        out["strings"].append({"text": s, "ids": ia, "transformers_agrees": ia == ib})
    for book, start, n in RANGES:
        p = os.path.join(BOOKS, book)
        raw = open(p, "rb").read()[start:start + n]
        text = raw.decode("utf-8", errors="replace")
        ia, ib = a(text), b(text)
        if ia != ib and strict:
            print(f"{name}: implementations disagree on {book}[{start}..{start + n}]", file=sys.stderr)
            bad += 1
            continue
        out["books"].append({"book": book, "start": start, "len": n, "ids": ia,
                             "transformers_agrees": ia == ib})
    out["hashed"] = []
    for book, start, n in HASHED:
        raw = open(os.path.join(BOOKS, book), "rb").read()[start:start + n]
        text = raw.decode("utf-8", errors="replace")
        ia, ib = a(text), b(text)
        out["hashed"].append({"book": book, "start": start, "len": n, "count": len(ia),
                              "fnv1a64": fnv1a64(ia), "transformers_agrees": ia == ib})
    if bad:
        sys.exit(f"{name}: {bad} disagreements between the reference implementations")
    return out


def main():
    from importlib.metadata import version
    doc = {
        "generated_by": "scripts/tokenizer_reference.py: " + ", ".join(
            f"{p} {version(p)}" for p in ["gguf", "tokenizers", "transformers", "sentencepiece"]),
        "models": [m for m in [cases("smollm2", SMOL, smol_tokenizers, False),
                               cases("gemma3", GEMMA, gemma_sentencepiece, True)] if m],
    }
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"), ensure_ascii=False)
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
