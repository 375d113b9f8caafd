"""Hugging Face transformers integration: run a model's attention through `longattn.attention`.

Usage::

    import longattn.hf
    longattn.hf.register()                      # once per process
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="longattn")
    # or: model.set_attn_implementation("longattn")

`register(mask=None, name="longattn")` registers an attention function with
`transformers.AttentionInterface` and a mask function with `transformers.AttentionMaskInterface`
under `name`. Every attention layer then calls `longattn.attention` with

- the layer's own pattern: `causal` when the layer is causal (`is_causal`, else `module.is_causal`),
  intersected with `window(sw-1, 0)` on sliding-window layers (`sliding_window=sw`, e.g. the local
  layers of Gemma-3; `window(sw, sw)` on a bidirectional sliding layer);
- padding: the 2-D padding mask transformers hands over (bool [B, kv_len]) becomes documents:
  `k_doc[b, j] = 1` for real keys and 0 for padding, `q_doc` the same for the queries (the last Sq
  keys), combined as `... & document` (left and right padding, prefill and cached decode);
- packed sequences (no attention mask, no cache, `position_ids` restarting inside a row, as built by
  `DataCollatorWithFlattening`): one document per packed sequence;
- GQA without expanding K/V, `scaling`, `softcap` (attention logit soft-capping);
- the generation cache: K/V arrive head-major [B, H, S, D] and are passed as [B, S, H, D] views
  (no copies); queries are bottom-right aligned against the keys (a decode step sees the cache).
  Dynamic, sliding-window and static caches (a static cache's unwritten slots are cut off, as a
  view).

A sparse pattern on a pretrained model (a mask expression string or a `longattn.Mask`, e.g.
`causal & (sinks(4) | window(1024,0))`) is intersected with the layer's own pattern above (on
Gemma-3's local layers it therefore only narrows the model's window). It can be given

- for every model: `register(mask=EXPR)`;
- per model: `set_mask(model, EXPR)` (overrides the registered default for that model;
  `set_mask(model, None)` runs that model with its own masks only; `clear_mask(model)` goes back
  to the registered default);
- per call: `model(input_ids, longattn_mask=EXPR)` (the kwarg travels to the attention layers of
  models that forward `**kwargs`, as Llama and Gemma-3 do; `generate` may reject unknown kwargs:
  use `set_mask` there).

Positions in a sparse pattern are indices into the layer's keys. With left padding, a pattern
with absolute positions (`sinks`, `prefix`, `chunk`, `strided`) is evaluated per batch row with the
padding cut off, so `sinks(4)` means the first 4 real tokens of every row. Patterns with only
relative atoms (`causal`, `window`, `full`) are evaluated in one call with the padding documents.

Not supported (clear errors, naming the argument): `dropout > 0` (attention dropout in training:
call `model.eval()` or set the config's attention dropout to 0), `s_aux` (learned attention-sink
logits, gpt-oss), `position_bias` (T5-style additive biases), dense 4-D `attention_mask`s (custom
masks built outside transformers' mask interface), masks that transformers combines with extra
mask functions (or/and overlays such as image-token or block masks, chunked attention), and a
pattern with absolute positions on a sliding-window cache layer that has dropped its first tokens.
`output_attentions=True` returns no attention weights (None), as with sdpa.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable

import torch

__all__ = ["register", "set_mask", "clear_mask", "get_mask", "attention_forward", "mask_forward",
           "NAME"]

NAME = "longattn"

# The mask expression applied to every model (set by `register(mask=...)`).
_default_mask: str | None = None
# Marker of "no per-model override": distinct from None, which means "own masks only".
_UNSET = object()
# Attribute set on the modules of a model by `set_mask`.
_ATTR = "_longattn_hf_mask"
# Atoms whose meaning depends on absolute key indices (not only on query - key distances).
_ABSOLUTE = re.compile(r"\b(sinks|prefix|chunk|strided|neighborhood\w*)\b")
_DOCUMENT = re.compile(r"\bdocument\b")

# The attention function used; None = `longattn.attention` (tests of the integration may point it
# at a stand-in before the package is built).
_backend: Callable | None = None


def _attention() -> Callable:
    if _backend is not None:
        return _backend
    import longattn  # the package this module belongs to

    return longattn.attention


# ---------------------------------------------------------------------------------------------
# Registration and per-model masks
# ---------------------------------------------------------------------------------------------


def register(mask: "str | longattn.Mask | None" = None, name: str = NAME) -> None:
    """Registers the longattn attention function and its mask function under `name` with
    transformers' `AttentionInterface` and `AttentionMaskInterface`, so that
    `from_pretrained(..., attn_implementation=name)` runs every attention layer through
    `longattn.attention`. `mask`: a mask expression intersected with every layer's own pattern in
    every model (None: the models' own masks only). Calling it again replaces the default mask."""
    global _default_mask
    from transformers import AttentionInterface, AttentionMaskInterface

    _default_mask = None if mask is None else _validate(mask)
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_forward)


def set_mask(model: torch.nn.Module, mask: "str | longattn.Mask | None") -> None:
    """Per-model sparse pattern: `mask` (a mask expression) is intersected with the own pattern of
    every attention layer of `model`, replacing the default of `register(mask=...)`. `None` runs
    the model with its own masks only. Takes effect when the model runs with
    `attn_implementation="longattn"`."""
    mask = None if mask is None else _validate(mask)
    for m in model.modules():
        setattr(m, _ATTR, mask)


def clear_mask(model: torch.nn.Module) -> None:
    """Undoes `set_mask`: the model follows the default of `register(mask=...)` again."""
    for m in model.modules():
        if _ATTR in m.__dict__:
            delattr(m, _ATTR)


def get_mask(module: torch.nn.Module) -> str | None:
    """The sparse pattern that applies to an attention layer (per-model, else the default)."""
    m = getattr(module, _ATTR, _UNSET)
    return _default_mask if m is _UNSET else m


def _validate(mask) -> str:
    """The canonical text of a user mask (a string or a `longattn.Mask`); raises ValueError for
    a malformed one, so that it fails here rather than in the first layer."""
    if not isinstance(mask, str):
        if type(mask).__name__ == "Mask" and hasattr(mask, "expr"):
            mask = mask.expr
        else:
            raise TypeError(f"longattn.hf: mask must be a mask expression string, got {mask!r}")
    if not mask.strip():
        raise ValueError("longattn.hf: mask is an empty string (use None for no extra mask)")
    if _DOCUMENT.search(mask):
        raise ValueError(
            f"longattn.hf: mask {mask!r} uses `document`, which longattn.hf reserves for padding and "
            "packed sequences; call longattn.attention directly for your own documents"
        )
    try:
        Mask = None
        try:
            from longattn import Mask
        except ImportError:  # only when developing against a stand-in backend
            pass
        if Mask is not None:
            return str(Mask(mask))
        q = torch.zeros(1, 2, 1, 8)
        _attention()(q, q, q, mask)
        return mask
    except Exception as e:  # the package's own parse error, re-raised with the argument named
        raise ValueError(f"longattn.hf: invalid mask expression {mask!r}: {e}") from e


# ---------------------------------------------------------------------------------------------
# The mask function (AttentionMaskInterface)
# ---------------------------------------------------------------------------------------------


def _closure(fn: Callable) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return {}
    return {n: c.cell_contents for n, c in zip(code.co_freevars, fn.__closure__)}


def _walk_mask_function(fn: Callable | None) -> torch.Tensor | None:
    """Checks that transformers' index-based mask function is one longattn.hf expresses itself
    (causal, bidirectional, sliding windows, padding, packed sequences) and returns the packed
    sequence ids when there are any. Raises NotImplementedError for anything else: silently
    dropping an extra mask would give wrong results."""
    if fn is None:
        return None
    from transformers import masking_utils as mu

    if fn is mu.causal_mask_function or fn is mu.bidirectional_mask_function:
        return None
    qn = getattr(fn, "__qualname__", repr(fn))
    cl = _closure(fn)
    if qn.startswith("and_masks."):
        packed = None
        for f in cl.get("mask_functions", ()):
            p = _walk_mask_function(f)
            packed = p if p is not None else packed
        return packed
    if qn.startswith(("sliding_window_overlay.", "sliding_window_bidirectional_overlay.",
                      "padding_mask_function.")):
        # Windows come through the attention function's `sliding_window`; padding through the 2-D
        # mask returned below.
        return None
    if qn.startswith("remap_positions_for_packed_sequence."):
        return _walk_mask_function(cl.get("mask_function"))
    if qn.startswith("packed_sequence_mask_function."):
        return cl["packed_sequence_mask"]
    raise NotImplementedError(
        f"longattn.hf: transformers built this model's attention mask with {qn} (an or/and overlay "
        "such as image-token, block or chunked masks, or a custom mask_function); longattn.hf "
        "expresses causal, sliding-window, padding and packed-sequence masks only"
    )


def mask_forward(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                 kv_offset: int = 0, mask_function: Callable | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask function of the `AttentionMaskInterface`: like transformers' flash-attention one, it
    returns None when there is no padding, else the bool padding mask [B, kv_len] (True = real
    token), sliced from the right to the layer's keys (sliding-window caches). Packed sequences
    (no mask, no cache, position ids restarting) give their int32 sequence ids [B, kv_len]."""
    packed = _walk_mask_function(mask_function)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise NotImplementedError(
                f"longattn.hf: attention_mask of shape {tuple(attention_mask.shape)}: only 2-D "
                "padding masks [batch, kv_len] are supported"
            )
        attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            attention_mask = None
    elif packed is None and not kv_offset and q_offset is not None:
        # A static cache hands over all its slots (kv_length = max_cache_len), of which only the
        # first q_offset + q_length are written: say so with an all-real mask of that length (the
        # attention function then cuts K/V to it, as flash attention does).
        filled = int(q_offset) + q_length
        if filled < kv_length:
            return torch.ones(batch_size, filled, dtype=torch.bool, device=kwargs.get("device"))
    if packed is not None:
        if attention_mask is not None:  # transformers builds packed masks only without one
            raise NotImplementedError("longattn.hf: packed sequences together with a padding mask")
        return packed.to(torch.int32)
    return attention_mask


# ---------------------------------------------------------------------------------------------
# The attention function (AttentionInterface)
# ---------------------------------------------------------------------------------------------

_warned_output_attentions = False


def _bsh(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H, D] view (a copy only when the head dim is not contiguous)."""
    x = x.transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, s_aux: torch.Tensor | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function of the `AttentionInterface`: query [B, Hq, Sq, D], key/value
    [B, Hk, Sk, D] (Hq a multiple of Hk), `attention_mask` from `mask_forward`. Returns
    (out [B, Sq, Hq, Dv], None)."""
    global _warned_output_attentions
    if dropout:
        raise NotImplementedError(
            f"longattn.hf: dropout={dropout} (attention dropout in training) is not supported; "
            "call model.eval() or set the config's attention_dropout to 0"
        )
    if s_aux is not None:
        raise NotImplementedError(
            "longattn.hf: s_aux (learned attention-sink logits, e.g. gpt-oss) is not supported"
        )
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("longattn.hf: position_bias (additive attention biases) is not supported")
    if kwargs.get("head_mask") is not None:
        raise NotImplementedError("longattn.hf: head_mask is not supported")
    if kwargs.get("output_attentions") and not _warned_output_attentions:
        _warned_output_attentions = True
        warnings.warn("longattn.hf: output_attentions=True: longattn returns no attention weights (None)")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"longattn.hf: query/key/value must be [batch, heads, seq, dim], got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )

    q, k, v = _bsh(query), _bsh(key), _bsh(value)
    B, Sq = q.shape[0], q.shape[1]

    # The layer's own pattern.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if isinstance(causal, torch.Tensor):
        causal = bool(causal)
    parts: list[str] = []
    if causal:
        parts.append("causal")
    if sliding_window is not None:
        sw = int(sliding_window)
        if sw < 1:
            raise ValueError(f"longattn.hf: sliding_window={sliding_window} must be >= 1")
        parts.append(f"window({sw - 1},0)" if causal else f"window({sw},{sw})")
    user = kwargs.get("longattn_mask", _UNSET)
    if user is _UNSET:
        user = get_mask(module)
    elif user is not None:
        user = _validate(user)
    if user is not None:
        parts.append(f"({user})")

    # Padding / packed sequences.
    docs: torch.Tensor | None = None  # int32 [B, Sk] document id per key
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise NotImplementedError(
                f"longattn.hf: attention_mask {shape}: only the 2-D padding mask built by "
                "longattn.hf's mask function is supported (a dense 4-D mask cannot be expressed; "
                "give a sparse pattern with set_mask / register(mask=...) instead)"
            )
        if attention_mask.shape[0] != B:
            raise ValueError(
                f"longattn.hf: attention_mask has batch {attention_mask.shape[0]}, the query {B}"
            )
        L = attention_mask.shape[1]
        if L < k.shape[1]:
            # Static cache: the keys beyond the mask are unwritten slots.
            k, v = k[:, :L], v[:, :L]
        elif L > k.shape[1]:
            attention_mask = attention_mask[:, -k.shape[1]:]
        # bool padding (True = real token -> document 1, padding -> 0) or int32 packed ids.
        docs = attention_mask.to(torch.int32)
    Sk = k.shape[1]
    if Sq > Sk:
        raise ValueError(f"longattn.hf: {Sq} queries but only {Sk} keys")

    if user is not None and _ABSOLUTE.search(user) and sliding_window is not None:
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.numel() and int(pos.max()) + 1 > Sk:
            raise NotImplementedError(
                f"longattn.hf: mask {user!r} refers to absolute key positions (sinks/prefix/chunk/"
                "strided), but this sliding-window layer's cache has dropped its first tokens"
            )

    attn = _attention()
    common = dict(scale=scaling, softcap=softcap)
    if docs is None:
        expr = " & ".join(parts) if parts else None
        return attn(q, k, v, expr, **common), None

    expr = " & ".join(parts + ["document"])
    firsts = None
    if attention_mask.dtype == torch.bool and user is not None and _ABSOLUTE.search(user):
        # index of each row's first real key (Sk for a row without any)
        any_real = attention_mask.any(dim=1)
        firsts = torch.where(any_real, attention_mask.to(torch.int8).argmax(dim=1),
                             torch.full_like(any_real, Sk, dtype=torch.long)).tolist()
    if firsts is None or not any(firsts):
        return attn(q, k, v, expr, q_doc=docs[:, Sk - Sq:].contiguous(), k_doc=docs.contiguous(),
                    **common), None

    # Absolute positions under left padding: one call per row with the left padding cut off, so
    # that key index 0 is the row's first real token.
    outs = []
    for b, first in enumerate(firsts):
        q0 = max(0, first - (Sk - Sq))
        out_b = q.new_zeros((1, Sq, q.shape[2], v.shape[3]))
        if q0 < Sq:
            o = attn(q[b:b + 1, q0:], k[b:b + 1, first:], v[b:b + 1, first:], expr,
                     q_doc=docs[b:b + 1, Sk - Sq + q0:].contiguous(),
                     k_doc=docs[b:b + 1, first:].contiguous(), **common)
            out_b = torch.cat([out_b[:, :q0], o], dim=1) if q0 else o
        outs.append(out_b)
    return torch.cat(outs, dim=0), None
