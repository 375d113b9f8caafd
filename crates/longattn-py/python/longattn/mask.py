"""Mask expressions as Python objects."""
from __future__ import annotations

from . import _native


class Mask:
    """A parsed mask expression, e.g. ``Mask("causal & (sinks(4) | window(1024, 0))")``.

    Parsed once (a malformed expression raises ``ValueError`` pointing at the mistake) and
    reusable across calls and sequence lengths: the lengths (and document ids) are bound per call,
    and the CUDA plans are cached per (shape, mask). ``str(mask)`` is the canonical text.

    Atoms (query row ``i``, key ``j``, aligned query position ``pos = i + Sk - Sq``):
    ``full``, ``causal`` (j <= pos), ``window(l, r)`` (pos - l <= j <= pos + r), ``sinks(n)`` /
    ``prefix(n)`` (j < n), ``chunk(c)``, ``document`` (``q_doc[b, i] == k_doc[b, j]``),
    ``neighborhood2d(...)``, combined with ``&``, ``|``, ``!`` (see docs/MASKS.md).
    """

    __slots__ = ("expr",)

    def __init__(self, expr: "str | Mask"):
        if isinstance(expr, Mask):
            expr = expr.expr
        if not isinstance(expr, str):
            raise TypeError(f"Mask expects an expression string, got {type(expr).__name__}")
        self.expr: str = _native.parse_mask(expr)

    @property
    def uses_documents(self) -> bool:
        """True when the expression uses ``document`` (calls then need q_doc / k_doc)."""
        return _native.mask_uses_documents(self.expr)

    def explain(self, sq: int, sk: "int | None" = None, tile_q: int = 64, tile_k: int = 64) -> str:
        """The block schedule at (Sq, Sk): tile counts, density, and a small drawing."""
        return _native.explain_mask(self.expr, sq, sq if sk is None else sk, tile_q, tile_k)

    def __str__(self) -> str:
        return self.expr

    def __repr__(self) -> str:
        return f"longattn.Mask({self.expr!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Mask) and other.expr == self.expr

    def __hash__(self) -> int:
        return hash(self.expr)


def mask_text(mask) -> "str | None":
    """The expression text of a mask argument (None means every pair attends)."""
    if mask is None:
        return None
    if isinstance(mask, Mask):
        return mask.expr
    if isinstance(mask, str):
        return mask
    raise TypeError(
        f"`mask` must be a mask expression string, a longattn.Mask or None, got {type(mask).__name__}"
    )
