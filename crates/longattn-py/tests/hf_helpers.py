"""Helpers of test_hf.py: locating the fixtures and the `longattn` CLI, tokenizing a book, and a
pure-torch STAND-IN for `longattn.attention`.

The stand-in (`standin_attention`) exists only to develop `longattn.hf` before the real package is
built. The tests use it only when `longattn` cannot be imported AND the environment variable
`LONGATTN_HF_STANDIN=1` is set; otherwise they skip with "longattn not built". It is a plain dense
reference: it builds the whole [B, Sq, Sk] mask from the mask expression and copies K/V for GQA.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("LONGATTN_CACHE", str(Path.home() / ".cache" / "longattn")))
SMOL = CACHE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = CACHE / "gemma3" / "gemma-3-270m-q4_k_m.gguf"
BOOKS = CACHE / "gutenberg"


def read_book(name: str) -> str:
    """A Gutenberg book as the CLI reads it: lossy UTF-8, CRLF normalized to LF."""
    return (BOOKS / name).read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")


def find_cli() -> Path | None:
    """The `longattn` binary: $LONGATTN_BIN, else target/release/longattn of the repository, else
    `longattn` on PATH. None when there is none (the tests never build it: a release build of the
    CLI takes minutes)."""
    env = os.environ.get("LONGATTN_BIN")
    if env:
        p = Path(env)
        return p if p.is_file() else None
    for d in (os.environ.get("CARGO_TARGET_DIR"), str(REPO / "target")):
        if d and (Path(d) / "release" / "longattn").is_file():
            return Path(d) / "release" / "longattn"
    w = shutil.which("longattn")
    return Path(w) if w else None


def cli_nll(cli: Path, model: Path, ids: list[int], tmp: Path, attention: str = "causal") -> float:
    """Mean next-token NLL that `longattn eval --ids` reports for these token ids."""
    ids_path = tmp / "ids.txt"
    ids_path.write_text(" ".join(str(i) for i in ids) + "\n")
    out = tmp / "eval.json"
    subprocess.run(
        [str(cli), "eval", "--model", str(model), "--ids", str(ids_path), "--tokens",
         str(len(ids)), "--attention", attention, "--json", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    import json

    return float(json.loads(out.read_text())["nll_mean"])


# ---------------------------------------------------------------------------------------------
# STAND-IN for longattn.attention (development only; see the module docstring)
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_]+)|(.))")


def _tokens(s: str):
    out = []
    pos = 0
    s = s.strip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None:
            break
        pos = m.end()
        if m.group(1) is not None:
            out.append(("num", int(m.group(1))))
        elif m.group(2) is not None:
            out.append(("name", m.group(2)))
        elif m.group(3).strip():
            out.append(("op", m.group(3)))
    return out


class _Parser:
    def __init__(self, s: str):
        self.t = _tokens(s)
        self.k = 0
        self.src = s

    def peek(self):
        return self.t[self.k] if self.k < len(self.t) else (None, None)

    def take(self, kind=None, val=None):
        tok = self.peek()
        if tok[0] is None or (kind and tok[0] != kind) or (val and tok[1] != val):
            raise ValueError(f"stand-in: cannot parse mask expression {self.src!r} at token {self.k}")
        self.k += 1
        return tok

    def parse(self):
        e = self.or_()
        if self.k != len(self.t):
            raise ValueError(f"stand-in: trailing input in mask expression {self.src!r}")
        return e

    def or_(self):
        e = self.and_()
        while self.peek() == ("op", "|"):
            self.take()
            e = ("or", e, self.and_())
        return e

    def and_(self):
        e = self.not_()
        while self.peek() == ("op", "&"):
            self.take()
            e = ("and", e, self.not_())
        return e

    def not_(self):
        if self.peek() == ("op", "!"):
            self.take()
            return ("not", self.not_())
        return self.atom()

    def atom(self):
        if self.peek() == ("op", "("):
            self.take()
            e = self.or_()
            self.take("op", ")")
            return e
        _, name = self.take("name")
        args = []
        if self.peek() == ("op", "("):
            self.take()
            while True:
                args.append(self.take("num")[1])
                if self.peek() == ("op", ","):
                    self.take()
                    continue
                break
            self.take("op", ")")
        arity = {"full": 0, "causal": 0, "document": 0, "window": 2, "sinks": 1, "prefix": 1,
                 "chunk": 1, "strided": 1}
        if name not in arity or arity[name] != len(args):
            raise ValueError(f"stand-in: unknown atom {name}({args}) in {self.src!r}")
        return ("atom", name, args)


def standin_mask(expr: str | None, b: int, sq: int, sk: int, q_doc=None, k_doc=None, device="cpu"):
    """Dense bool [B, Sq, Sk] mask of a mask expression (None = full)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    p = i + (sk - sq)

    def ev(e):
        if e[0] == "and":
            return ev(e[1]) & ev(e[2])
        if e[0] == "or":
            return ev(e[1]) | ev(e[2])
        if e[0] == "not":
            return ~ev(e[1])
        _, name, a = e
        if name == "full":
            m = torch.ones(sq, sk, dtype=torch.bool, device=device)
        elif name == "causal":
            m = j <= p
        elif name == "window":
            m = (p - a[0] <= j) & (j <= p + a[1])
        elif name == "sinks":
            m = (j < a[0]).expand(sq, sk)
        elif name == "prefix":
            m = (j < a[0]).expand(sq, sk)
        elif name == "chunk":
            m = torch.div(p, a[0], rounding_mode="floor") == torch.div(j, a[0], rounding_mode="floor")
        elif name == "strided":
            m = ((p - j) % a[0]) == 0
        elif name == "document":
            if q_doc is None or k_doc is None:
                raise ValueError("stand-in: the mask uses `document` but q_doc / k_doc are missing")
            return q_doc[:, :, None] == k_doc[:, None, :]
        return m.expand(sq, sk)[None].expand(b, sq, sk)

    if expr is None:
        return torch.ones(b, sq, sk, dtype=torch.bool, device=device)
    m = ev(_Parser(expr).parse())
    return m.expand(b, sq, sk)


def standin_attention(q, k, v, mask="causal", *, scale=None, softcap=None, q_doc=None, k_doc=None,
                      return_lse=False):
    """STAND-IN for `longattn.attention` (same signature, layout [B, S, H, D]); dense pure torch.
    Rows that see no key give zeros (and lse -inf)."""
    B, Sq, Hq, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    if Hq % Hk:
        raise ValueError(f"stand-in: Hq {Hq} is not a multiple of Hk {Hk}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("stand-in: the head dim must be contiguous")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    m = standin_mask(mask, B, Sq, Sk, q_doc, k_doc, q.device)  # [B, Sq, Sk]
    rep = Hq // Hk
    kk = k.repeat_interleave(rep, dim=2)
    vv = v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~m[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Sq]
    empty = torch.isinf(lse)
    w = torch.exp(s - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    w = torch.where(empty[..., None], torch.zeros_like(w), w)
    out = torch.einsum("bhqk,bkhd->bqhd", w, vv)
    if return_lse:
        return out, lse  # [B, Hq, Sq]
    return out
