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
    ``prefix(n)`` (j < n), ``chunk(c)``, ``strided(s)``, ``power(b)`` (key blocks at distance 0
    or 2^k), ``radial(f, w)`` (frames of f tokens, a spatial window halving with frame distance),
    ``document`` (``q_doc[b, i] == k_doc[b, j]``), ``neighborhood2d(...)``, combined with ``&``, ``|``, ``!`` (see docs/MASKS.md).
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


class BlockMask:
    """An explicit block mask: ``table`` uint8 / bool ``[B or 1, H or 1, ceil(Sq / block_q),
    ceil(Sk / block_k)]`` (nonzero: the whole tile of ``block_q`` queries x ``block_k`` keys
    attends). The schedule is built from it per call shape (on CUDA the table is read to the host:
    one synchronisation per new table) and cached.

    ``under`` (a mask expression or :class:`Mask`): the table gates that mask instead of
    attending whole tiles, e.g. a learned gate's block map (SeerAttention-style) over ``causal``:
    the pairs ``under & table`` attend, the mask exact inside the kept tiles (causal diagonals,
    document boundaries with ``q_doc`` / ``k_doc``). Forward and backward, CPU and CUDA."""

    __slots__ = ("table", "block_q", "block_k", "under")

    def __init__(self, table, block_size=(128, 128), under=None):
        import torch

        if not isinstance(table, torch.Tensor) or table.dtype not in (torch.uint8, torch.bool):
            raise TypeError("BlockMask: `table` must be a uint8 or bool torch.Tensor")
        if table.dim() != 4:
            raise ValueError(
                f"BlockMask: `table` has shape {tuple(table.shape)}; expected [B or 1, H or 1, "
                "q_tiles, k_tiles]"
            )
        bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
        if bq < 1 or bk < 1:
            raise ValueError(f"BlockMask: `block_size` must be >= 1, got {block_size!r}")
        self.table = table.contiguous()
        self.block_q, self.block_k = int(bq), int(bk)
        if under is not None and not isinstance(under, (str, Mask)):
            raise TypeError(
                f"BlockMask: `under` must be a mask expression string or a longattn.Mask, got {type(under).__name__}"
            )
        self.under = None if under is None else Mask(under).expr

    def __repr__(self) -> str:
        under = "" if self.under is None else f", under={self.under!r}"
        return (f"longattn.BlockMask(table {tuple(self.table.shape)}, "
                f"block_size=({self.block_q}, {self.block_k}){under})")


def mask_args(mask):
    """(expression text or None, block table or None, block_q, block_k) of a mask argument
    (None means every pair attends; a table with an expression: the table gates it)."""
    if mask is None:
        return None, None, 0, 0
    if isinstance(mask, Mask):
        return mask.expr, None, 0, 0
    if isinstance(mask, str):
        return mask, None, 0, 0
    if isinstance(mask, BlockMask):
        return mask.under, mask.table, mask.block_q, mask.block_k
    raise TypeError(
        "`mask` must be a mask expression string, a longattn.Mask, a longattn.BlockMask or None, "
        f"got {type(mask).__name__}"
    )
