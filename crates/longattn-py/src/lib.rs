//! `longattn._native`: the thin layer between PyTorch tensors and [`longattn::api`].
//!
//! Each function reads the tensors' pointers, shapes, strides, dtypes and devices (no copy),
//! releases the GIL and calls the one Rust entry point, which routes to the CPU or CUDA path.
//! Outputs are allocated by the Python side (torch's allocator) and written in place; CUDA work
//! is queued on the stream handle the Python side passes (torch's current stream). The Python
//! package (`python/longattn`) registers these as `torch.library` ops with fake implementations
//! and autograd.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use longattn::api::{self, AttnArgs, Device, KvCacheArgs, MaskArg, RawDType, RawTensor};
use longattn::kv::decode::DecodeParams;
use longattn::mask::{MaskExpr, MaskShape};
use longattn::{AttnParams, BackwardParams, DType, Error};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;

/// A longattn error as the Python exception torch would raise for it: dtype problems are
/// `TypeError`, CUDA failures `RuntimeError`, everything else about the arguments `ValueError`.
fn py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::DType { .. } => PyTypeError::new_err(msg),
        Error::Cuda { .. } | Error::File { .. } | Error::Comm { .. } => {
            PyRuntimeError::new_err(msg)
        }
        _ => PyValueError::new_err(msg),
    }
}

/// torch's dtype objects, looked up once: a tensor's dtype is then found by identity.
fn dtypes(py: Python<'_>) -> PyResult<&'static [(Py<PyAny>, RawDType); 6]> {
    static CELL: pyo3::sync::PyOnceLock<[(Py<PyAny>, RawDType); 6]> = pyo3::sync::PyOnceLock::new();
    CELL.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        let get = |n: &str| -> PyResult<Py<PyAny>> { Ok(torch.getattr(n)?.unbind()) };
        Ok([
            (get("float32")?, RawDType::Float(DType::F32)),
            (get("bfloat16")?, RawDType::Float(DType::BF16)),
            (get("float16")?, RawDType::Float(DType::F16)),
            (get("int32")?, RawDType::I32),
            (get("uint8")?, RawDType::U8),
            (get("bool")?, RawDType::U8),
        ])
    })
}

/// A torch tensor's memory description (never its data). Strides of size-1 dimensions are
/// normalised (torch leaves them arbitrary; they address nothing).
fn raw(t: &Bound<'_, PyAny>, name: &str) -> PyResult<RawTensor> {
    let py = t.py();
    let dtype_obj = t.getattr(intern!(py, "dtype")).map_err(|_| {
        PyTypeError::new_err(format!(
            "`{name}` must be a torch.Tensor, got {}",
            type_name(t)
        ))
    })?;
    let dtype = match dtypes(py)?.iter().find(|(d, _)| d.bind(py).is(&dtype_obj)) {
        Some((_, d)) => *d,
        None => {
            return Err(PyTypeError::new_err(format!(
                "tensor `{name}` has dtype {}; longattn takes float32, bfloat16, float16 (int32 for ids, lengths and tables; uint8 / bool for block masks)",
                dtype_obj.str()?
            )))
        }
    };
    let shape: Vec<usize> = t.getattr(intern!(py, "shape"))?.extract()?;
    let strides: Vec<i64> = t.call_method0(intern!(py, "stride"))?.extract()?;
    if shape.len() > 4 {
        return Err(PyValueError::new_err(format!(
            "tensor `{name}` has rank {} (shape {shape:?}); at most 4 here",
            shape.len()
        )));
    }
    if strides.iter().any(|&s| s < 0) {
        return Err(PyValueError::new_err(format!(
            "tensor `{name}` has negative strides {strides:?}"
        )));
    }
    // -1 on the CPU, the ordinal on CUDA; other devices raise.
    let ord: i64 = t
        .call_method0(intern!(py, "get_device"))
        .and_then(|x| x.extract())
        .map_err(|_| {
            PyValueError::new_err(format!(
                "tensor `{name}` is on a device longattn does not run on (cpu, cuda)"
            ))
        })?;
    let device = if ord < 0 {
        if !t.getattr(intern!(py, "is_cpu"))?.extract::<bool>()? {
            return Err(PyValueError::new_err(format!(
                "tensor `{name}` is on {}; longattn runs on cpu and cuda",
                t.getattr(intern!(py, "device"))?.str()?
            )));
        }
        Device::Cpu
    } else {
        Device::Cuda(ord as usize)
    };
    let ptr: u64 = t.call_method0(intern!(py, "data_ptr"))?.extract()?;
    let mut r = RawTensor::contiguous(ptr, dtype, &shape, device);
    for (a, &s) in strides.iter().enumerate() {
        if shape[a] != 1 {
            r.strides[a] = s as usize;
        }
    }
    Ok(r)
}

fn type_name(t: &Bound<'_, PyAny>) -> String {
    t.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn opt_raw(t: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<RawTensor>> {
    match t {
        Some(t) if !t.is_none() => Ok(Some(raw(t, name)?)),
        _ => Ok(None),
    }
}

/// Parsed mask expressions by their text: each distinct text is parsed once per process.
fn mask_expr(text: &str) -> PyResult<Arc<MaskExpr>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<MaskExpr>>>> = OnceLock::new();
    let m = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(e) = m.lock().unwrap().get(text) {
        return Ok(e.clone());
    }
    let e = Arc::new(MaskExpr::parse(text).map_err(py_err)?);
    let mut g = m.lock().unwrap();
    if g.len() > 4096 {
        g.clear();
    }
    g.insert(text.to_string(), e.clone());
    Ok(e)
}

/// Canonical text of a mask expression (ValueError with the position of a mistake).
#[pyfunction]
fn parse_mask(expr: &str) -> PyResult<String> {
    Ok(mask_expr(expr)?.to_string())
}

/// Whether the expression uses `document` (then q_doc / k_doc are needed).
#[pyfunction]
fn mask_uses_documents(expr: &str) -> PyResult<bool> {
    Ok(mask_expr(expr)?.uses_documents())
}

/// The block schedule of a mask at (Sq, Sk) explained in words and a small drawing.
#[pyfunction]
#[pyo3(signature = (expr, sq, sk, tile_q=64, tile_k=64))]
fn explain_mask(
    expr: &str,
    sq: usize,
    sk: usize,
    tile_q: usize,
    tile_k: usize,
) -> PyResult<String> {
    let e = mask_expr(expr)?;
    let bm = e
        .bind(MaskShape { batch: 1, sq, sk }, None)
        .map_err(py_err)?;
    longattn::mask::render::explain(&bm, tile_q, tile_k).map_err(py_err)
}

fn params(scale: Option<f32>, softcap: Option<f32>) -> AttnParams {
    AttnParams {
        scale,
        softcap,
        isa: None,
        skip_below: None,
    }
}

/// The inputs forward and backward share, read from their Python arguments (no data).
struct Inputs {
    q: RawTensor,
    k: RawTensor,
    v: RawTensor,
    expr: Option<Arc<MaskExpr>>,
    blocks: Option<RawTensor>,
    block_q: usize,
    block_k: usize,
    q_doc: Option<RawTensor>,
    k_doc: Option<RawTensor>,
    params: AttnParams,
}

impl Inputs {
    #[allow(clippy::too_many_arguments)]
    fn read(
        (q, k, v): (&Bound<'_, PyAny>, &Bound<'_, PyAny>, &Bound<'_, PyAny>),
        mask: Option<&str>,
        scale: Option<f32>,
        softcap: Option<f32>,
        q_doc: Option<&Bound<'_, PyAny>>,
        k_doc: Option<&Bound<'_, PyAny>>,
        block_mask: Option<&Bound<'_, PyAny>>,
        (block_q, block_k): (usize, usize),
    ) -> PyResult<Inputs> {
        let blocks = opt_raw(block_mask, "block_mask")?;
        let expr = mask.map(mask_expr).transpose()?;
        if blocks.is_some() && (block_q == 0 || block_k == 0) {
            return Err(PyValueError::new_err(format!(
                "`block_mask` needs tile sizes >= 1, got ({block_q}, {block_k})"
            )));
        }
        Ok(Inputs {
            q: raw(q, "q")?,
            k: raw(k, "k")?,
            v: raw(v, "v")?,
            expr,
            blocks,
            block_q,
            block_k,
            q_doc: opt_raw(q_doc, "q_doc")?,
            k_doc: opt_raw(k_doc, "k_doc")?,
            params: params(scale, softcap),
        })
    }

    fn args(&self) -> AttnArgs<'_> {
        AttnArgs {
            q: self.q,
            k: self.k,
            v: self.v,
            // An expression, an explicit block table (gating the expression when both are
            // given), or every pair.
            mask: match (&self.expr, self.blocks) {
                (e, Some(table)) => MaskArg::Blocks {
                    table,
                    tile_q: self.block_q,
                    tile_k: self.block_k,
                    under: e.as_deref(),
                },
                (Some(e), None) => MaskArg::Expr(e),
                (None, None) => MaskArg::Full,
            },
            q_doc: self.q_doc,
            k_doc: self.k_doc,
            params: &self.params,
        }
    }
}

/// Linear attention's inputs, read from their Python arguments (no data).
#[allow(clippy::too_many_arguments)]
fn linear_args(
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    g: Option<&Bound<'_, PyAny>>,
    initial_state: Option<&Bound<'_, PyAny>>,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    scale: f32,
    stream: u64,
) -> PyResult<api::LinearArgs> {
    Ok(api::LinearArgs {
        q: raw(q, "q")?,
        k: raw(k, "k")?,
        v: raw(v, "v")?,
        g: opt_raw(g, "g")?,
        initial_state: opt_raw(initial_state, "initial_state")?,
        cu_seqlens: opt_raw(cu_seqlens, "cu_seqlens")?,
        scale,
        stream,
    })
}

/// Linear attention forward: writes `out` and `final_state` (allocated by the caller).
#[pyfunction]
#[pyo3(signature = (q, k, v, g, initial_state, cu_seqlens, out, final_state, scale, stream))]
#[allow(clippy::too_many_arguments)]
fn linear_fwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    g: Option<&Bound<'_, PyAny>>,
    initial_state: Option<&Bound<'_, PyAny>>,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    final_state: &Bound<'_, PyAny>,
    scale: f32,
    stream: u64,
) -> PyResult<()> {
    let a = linear_args(q, k, v, g, initial_state, cu_seqlens, scale, stream)?;
    let (out, fin) = (raw(out, "out")?, raw(final_state, "final_state")?);
    // SAFETY: live torch tensors held by the caller for the call; CUDA work is queued on the
    // caller's stream, which orders it before any reuse of the memory.
    py.detach(|| unsafe { api::linear_forward(&a, &out, &fin) })
        .map_err(py_err)
}

/// Linear attention backward: writes `dq`, `dk`, `dv`, `dg` (when given) and `d_initial_state`.
#[pyfunction]
#[pyo3(signature = (q, k, v, g, initial_state, cu_seqlens, dout, d_final_state, dq, dk, dv, dg, d_initial_state, scale, stream))]
#[allow(clippy::too_many_arguments)]
fn linear_bwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    g: Option<&Bound<'_, PyAny>>,
    initial_state: Option<&Bound<'_, PyAny>>,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    dout: &Bound<'_, PyAny>,
    d_final_state: Option<&Bound<'_, PyAny>>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    dg: Option<&Bound<'_, PyAny>>,
    d_initial_state: &Bound<'_, PyAny>,
    scale: f32,
    stream: u64,
) -> PyResult<()> {
    let a = linear_args(q, k, v, g, initial_state, cu_seqlens, scale, stream)?;
    let dout = raw(dout, "dout")?;
    let dfin = opt_raw(d_final_state, "d_final_state")?;
    let grads = api::LinearGradsOut {
        dq: raw(dq, "dq")?,
        dk: raw(dk, "dk")?,
        dv: raw(dv, "dv")?,
        dg: opt_raw(dg, "dg")?,
        d_initial_state: raw(d_initial_state, "d_initial_state")?,
    };
    // SAFETY: as for `linear_fwd`.
    py.detach(|| unsafe { api::linear_backward(&a, &dout, dfin.as_ref(), &grads) })
        .map_err(py_err)
}

/// One linear-attention decode step: reads and updates `state`, writes `out`.
#[pyfunction]
#[pyo3(signature = (q, k, v, g, state, out, scale, stream))]
#[allow(clippy::too_many_arguments)]
fn linear_step(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    g: Option<&Bound<'_, PyAny>>,
    state: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    scale: f32,
    stream: u64,
) -> PyResult<()> {
    let a = linear_args(q, k, v, g, None, None, scale, stream)?;
    let (state, out) = (raw(state, "state")?, raw(out, "out")?);
    // SAFETY: as for `linear_fwd`; `state` is the caller's to update.
    py.detach(|| unsafe { api::linear_step(&a, &state, &out) })
        .map_err(py_err)
}

/// Forward: writes `out` and `lse` (allocated by the caller).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, mask, scale, softcap, q_doc, k_doc, stream, block_mask=None, block_q=0, block_k=0))]
#[allow(clippy::too_many_arguments)]
fn fwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    mask: Option<&str>,
    scale: Option<f32>,
    softcap: Option<f32>,
    q_doc: Option<&Bound<'_, PyAny>>,
    k_doc: Option<&Bound<'_, PyAny>>,
    stream: u64,
    block_mask: Option<&Bound<'_, PyAny>>,
    block_q: usize,
    block_k: usize,
) -> PyResult<()> {
    let inp = Inputs::read(
        (q, k, v),
        mask,
        scale,
        softcap,
        q_doc,
        k_doc,
        block_mask,
        (block_q, block_k),
    )?;
    let (out, lse) = (raw(out, "out")?, raw(lse, "lse")?);
    py.detach(|| {
        let a = inp.args();
        // SAFETY: the tensors are live torch tensors held by the caller for the call; CUDA work
        // is queued on the caller's stream, which orders it before any reuse of the memory.
        unsafe { api::forward(&a, &out, &lse, stream) }
    })
    .map_err(py_err)
}

/// int32 values from the bytes of a contiguous int32 array (little-endian), as u32 (the ids
/// and counts of a gathered selection: negative values are refused).
fn u32s(b: &[u8], name: &str) -> PyResult<Vec<u32>> {
    if !b.len().is_multiple_of(4) {
        return Err(PyValueError::new_err(format!(
            "`{name}`: {} bytes is not a whole number of int32 values",
            b.len()
        )));
    }
    b.chunks_exact(4)
        .map(|c| {
            let x = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            u32::try_from(x).map_err(|_| {
                PyValueError::new_err(format!("`{name}` holds a negative value ({x})"))
            })
        })
        .collect()
}

/// Attention over a gathered-key selection (`longattn::sparse::gather::TileKeys`): per row
/// (b heads + h) q_tiles + qt of a `[batch, heads, q_tiles]` layout (`layout`, batch and heads
/// each 1 or the inputs'), `tile_counts[row]` whole key tiles from `tile_ids` and
/// `key_counts[row]` single keys from `key_ids` (int32 bytes). Writes `out` and `lse` (CPU, or
/// CUDA on the caller's stream).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, mask, scale, softcap, q_doc, k_doc, stream, tiles, layout, tile_counts, tile_ids, key_counts, key_ids))]
#[allow(clippy::too_many_arguments)]
fn fwd_gathered(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    mask: Option<&str>,
    scale: Option<f32>,
    softcap: Option<f32>,
    q_doc: Option<&Bound<'_, PyAny>>,
    k_doc: Option<&Bound<'_, PyAny>>,
    stream: u64,
    tiles: (usize, usize),
    layout: (usize, usize),
    tile_counts: &[u8],
    tile_ids: &[u8],
    key_counts: &[u8],
    key_ids: &[u8],
) -> PyResult<()> {
    let inp = Inputs::read((q, k, v), mask, scale, softcap, q_doc, k_doc, None, (0, 0))?;
    let (out, lse) = (raw(out, "out")?, raw(lse, "lse")?);
    let sel = selection(
        &inp,
        tiles,
        layout,
        (tile_counts, tile_ids),
        (key_counts, key_ids),
    )?;
    py.detach(|| {
        let a = inp.args();
        // SAFETY: as for `fwd` (live torch tensors held by the caller for the call; CUDA work
        // on the caller's stream).
        unsafe { api::forward_gathered(&a, &sel, &out, &lse, stream) }
    })
    .map_err(py_err)
}

/// The selection of `fwd_gathered` / `bwd_gathered` from its flat int32 lists, for the inputs'
/// sequence lengths.
fn selection(
    inp: &Inputs,
    tiles: (usize, usize),
    layout: (usize, usize),
    (tile_counts, tile_ids): (&[u8], &[u8]),
    (key_counts, key_ids): (&[u8], &[u8]),
) -> PyResult<longattn::sparse::gather::TileKeys> {
    let (qd, kd) = (inp.q.dims(), inp.k.dims());
    if qd.len() != 4 || kd.len() != 4 {
        return Err(PyValueError::new_err(format!(
            "q and k must be [B, S, H, D] tensors, got shapes {qd:?} and {kd:?}"
        )));
    }
    longattn::sparse::gather::TileKeys::from_counts(
        tiles,
        (qd[1], kd[1]),
        layout,
        (
            &u32s(tile_counts, "tile_counts")?,
            &u32s(tile_ids, "tiles")?,
        ),
        (&u32s(key_counts, "key_counts")?, &u32s(key_ids, "keys")?),
    )
    .map_err(py_err)
}

/// The backward of `fwd_gathered` through the same selection: dq, dk, dv from the forward's
/// out and lse and dout (CPU, or CUDA on the caller's stream).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, dout, dq, dk, dv, mask, scale, softcap, q_doc, k_doc, deterministic, stream, tiles, layout, tile_counts, tile_ids, key_counts, key_ids))]
#[allow(clippy::too_many_arguments)]
fn bwd_gathered(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    dout: &Bound<'_, PyAny>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    mask: Option<&str>,
    scale: Option<f32>,
    softcap: Option<f32>,
    q_doc: Option<&Bound<'_, PyAny>>,
    k_doc: Option<&Bound<'_, PyAny>>,
    deterministic: bool,
    stream: u64,
    tiles: (usize, usize),
    layout: (usize, usize),
    tile_counts: &[u8],
    tile_ids: &[u8],
    key_counts: &[u8],
    key_ids: &[u8],
) -> PyResult<()> {
    let inp = Inputs::read((q, k, v), mask, scale, softcap, q_doc, k_doc, None, (0, 0))?;
    let (out, lse, dout) = (raw(out, "out")?, raw(lse, "lse")?, raw(dout, "dout")?);
    let (dq, dk, dv) = (raw(dq, "dq")?, raw(dk, "dk")?, raw(dv, "dv")?);
    let sel = selection(
        &inp,
        tiles,
        layout,
        (tile_counts, tile_ids),
        (key_counts, key_ids),
    )?;
    let b = BackwardParams {
        deterministic,
        ..Default::default()
    };
    py.detach(|| {
        let a = inp.args();
        // SAFETY: as in `fwd`.
        unsafe { api::backward_gathered(&a, &sel, &out, &lse, &dout, &dq, &dk, &dv, &b, stream) }
    })
    .map_err(py_err)
}

/// The (query rows, keys) tiles a gathered selection must use for these inputs and mask.
#[pyfunction]
#[pyo3(signature = (q, k, v, mask, q_doc, k_doc))]
fn gather_tiles(
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    mask: Option<&str>,
    q_doc: Option<&Bound<'_, PyAny>>,
    k_doc: Option<&Bound<'_, PyAny>>,
) -> PyResult<(usize, usize)> {
    let inp = Inputs::read((q, k, v), mask, None, None, q_doc, k_doc, None, (0, 0))?;
    api::gather_tiles(&inp.args()).map_err(py_err)
}

/// Forward with the block-pooled attention map: writes `out`, `lse`, `mass` and `max` (CPU, or
/// CUDA on the caller's stream).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, mass, max, block, mask, scale, softcap, q_doc, k_doc, block_mask=None, block_q=0, block_k=0, stream=0))]
#[allow(clippy::too_many_arguments)]
fn fwd_map(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    mass: &Bound<'_, PyAny>,
    max: &Bound<'_, PyAny>,
    block: usize,
    mask: Option<&str>,
    scale: Option<f32>,
    softcap: Option<f32>,
    q_doc: Option<&Bound<'_, PyAny>>,
    k_doc: Option<&Bound<'_, PyAny>>,
    block_mask: Option<&Bound<'_, PyAny>>,
    block_q: usize,
    block_k: usize,
    stream: u64,
) -> PyResult<()> {
    let inp = Inputs::read(
        (q, k, v),
        mask,
        scale,
        softcap,
        q_doc,
        k_doc,
        block_mask,
        (block_q, block_k),
    )?;
    let (out, lse) = (raw(out, "out")?, raw(lse, "lse")?);
    let (mass, max) = (raw(mass, "mass")?, raw(max, "max")?);
    py.detach(|| {
        let a = inp.args();
        // SAFETY: as for `fwd` (live torch tensors held by the caller for the call; CUDA work
        // on the caller's stream).
        unsafe { api::forward_map(&a, &out, &lse, [&mass, &max], block, stream) }
    })
    .map_err(py_err)
}

/// Dynamic sparse forward: selects key tiles of `mask` by `spec` and writes `out` and `lse`.
/// Returns (fallback, (tile_q, tile_k), density, table bytes, table shape, skip-softmax's
/// (tested, dropped)); the last four are None unless `report` (on CUDA the report synchronises
/// the stream), the last also without skip-softmax.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, spec, mask, scale, softcap, q_doc, k_doc, stream, report))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn sparse_fwd<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    lse: &Bound<'py, PyAny>,
    spec: &str,
    mask: Option<&str>,
    scale: Option<f32>,
    softcap: Option<f32>,
    q_doc: Option<&Bound<'py, PyAny>>,
    k_doc: Option<&Bound<'py, PyAny>>,
    stream: u64,
    report: bool,
) -> PyResult<(
    bool,
    (usize, usize),
    Option<f64>,
    Option<Bound<'py, pyo3::types::PyBytes>>,
    Option<[usize; 4]>,
    Option<(u64, u64)>,
)> {
    let spec = longattn::SparseSpec::parse(spec).map_err(py_err)?;
    let inp = Inputs::read((q, k, v), mask, scale, softcap, q_doc, k_doc, None, (0, 0))?;
    let (out, lse) = (raw(out, "out")?, raw(lse, "lse")?);
    let info = py
        .detach(|| {
            let a = inp.args();
            // SAFETY: as for `fwd`.
            unsafe { api::sparse_forward(&a, &spec, &out, &lse, stream, report) }
        })
        .map_err(py_err)?;
    let (bytes, shape) = match info.table {
        Some((t, shape)) => (Some(pyo3::types::PyBytes::new(py, &t)), Some(shape)),
        None => (None, None),
    };
    Ok((
        info.fallback,
        info.tiles,
        info.density,
        bytes,
        shape,
        info.skipped,
    ))
}

/// What a sparse spec's selection is, for the Python layer's autograd: (element level: it
/// keeps single pairs, not tiles; skip-softmax asked). Parse errors name the problem.
#[pyfunction]
fn sparse_spec_info(spec: &str) -> PyResult<(bool, bool)> {
    let s = longattn::SparseSpec::parse(spec).map_err(py_err)?;
    Ok((s.element_level(), s.skip.is_some()))
}

/// Backward: writes `dq`, `dk`, `dv` (allocated by the caller).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, dout, dq, dk, dv, mask, scale, softcap, q_doc, k_doc, deterministic, stream, block_mask=None, block_q=0, block_k=0))]
#[allow(clippy::too_many_arguments)]
fn bwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    dout: &Bound<'_, PyAny>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    mask: Option<&str>,
    scale: Option<f32>,
    softcap: Option<f32>,
    q_doc: Option<&Bound<'_, PyAny>>,
    k_doc: Option<&Bound<'_, PyAny>>,
    deterministic: bool,
    stream: u64,
    block_mask: Option<&Bound<'_, PyAny>>,
    block_q: usize,
    block_k: usize,
) -> PyResult<()> {
    let inp = Inputs::read(
        (q, k, v),
        mask,
        scale,
        softcap,
        q_doc,
        k_doc,
        block_mask,
        (block_q, block_k),
    )?;
    let (out, lse, dout) = (raw(out, "out")?, raw(lse, "lse")?, raw(dout, "dout")?);
    let (dq, dk, dv) = (raw(dq, "dq")?, raw(dk, "dk")?, raw(dv, "dv")?);
    let b = BackwardParams {
        deterministic,
        ..Default::default()
    };
    py.detach(|| {
        let a = inp.args();
        // SAFETY: as in `fwd`.
        unsafe { api::backward(&a, &out, &lse, &dout, &dq, &dk, &dv, &b, stream) }
    })
    .map_err(py_err)
}

/// Decode of one query per sequence against a (paged) K/V cache: writes `out` and `lse`.
#[pyfunction]
#[pyo3(signature = (q, k_cache, v_cache, block_table, seqlens, out, lse, scale, softcap, stream))]
#[allow(clippy::too_many_arguments)]
fn decode(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k_cache: &Bound<'_, PyAny>,
    v_cache: &Bound<'_, PyAny>,
    block_table: Option<&Bound<'_, PyAny>>,
    seqlens: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    scale: Option<f32>,
    softcap: Option<f32>,
    stream: u64,
) -> PyResult<()> {
    let q = raw(q, "q")?;
    let cache = KvCacheArgs {
        k: raw(k_cache, "k_cache")?,
        v: raw(v_cache, "v_cache")?,
        block_table: opt_raw(block_table, "block_table")?,
        seqlens: raw(seqlens, "cache_seqlens")?,
    };
    let (out, lse) = (raw(out, "out")?, raw(lse, "lse")?);
    let p = DecodeParams {
        scale,
        softcap,
        split_len: None,
    };
    py.detach(|| {
        // SAFETY: as in `fwd`.
        unsafe { api::decode(&q, &cache, &out, &lse, &p, stream) }
    })
    .map_err(py_err)
}

/// Plans cached so far (forward, backward, decode): a repeated call adds none.
#[pyfunction]
fn plan_counts() -> (usize, usize, usize) {
    api::plan_counts()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fwd, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(fwd_map, m)?)?;
    m.add_function(wrap_pyfunction!(fwd_gathered, m)?)?;
    m.add_function(wrap_pyfunction!(bwd_gathered, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_spec_info, m)?)?;
    m.add_function(wrap_pyfunction!(gather_tiles, m)?)?;
    m.add_function(wrap_pyfunction!(bwd, m)?)?;
    m.add_function(wrap_pyfunction!(decode, m)?)?;
    m.add_function(wrap_pyfunction!(parse_mask, m)?)?;
    m.add_function(wrap_pyfunction!(mask_uses_documents, m)?)?;
    m.add_function(wrap_pyfunction!(explain_mask, m)?)?;
    m.add_function(wrap_pyfunction!(plan_counts, m)?)?;
    m.add_function(wrap_pyfunction!(linear_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(linear_bwd, m)?)?;
    m.add_function(wrap_pyfunction!(linear_step, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
