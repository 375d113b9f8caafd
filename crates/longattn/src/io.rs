//! Reading and writing attention tensors as safetensors files.
//!
//! Input file: `q` `[B, Sq, Hq, D]`, `k` `[B, Sk, Hk, D]`, `v` `[B, Sk, Hk, Dv]`, all of one dtype
//! (F32, BF16 or F16), and optionally the document ids `q_doc` `[B, Sq]` and `k_doc` `[B, Sk]`
//! (I32, both or neither) used by the `document` mask.
//! Output file: `out` `[B, Sq, Hq, Dv]` in the input dtype and `lse` `[B, Hq, Sq]` F32 (natural log).
//!
//! Backward (`longattn run --backward`): the input file also holds `do` `[B, Sq, Hq, Dv]` (the
//! gradient of the output, dtype of q); the output file also gets `dq` `[B, Sq, Hq, D]`, `dk`
//! `[B, Sk, Hk, D]` and `dv` `[B, Sk, Hk, Dv]` in the input dtype.
//!
//! Every error is an [`Error::File`] whose message starts with the path (or origin) and names the
//! tensor and what was expected. Nothing here panics on malformed bytes (see the fuzz target
//! `fuzz/fuzz_targets/safetensors_read.rs`).
//!
//! Values are not checked: NaN or Inf in the inputs propagates through
//! [`forward`](crate::forward) into the rows it touches. Callers that want to reject them use
//! [`TensorView::find_non_finite`](crate::TensorView::find_non_finite) (the CLI does, unless
//! `--allow-nonfinite`).
use crate::attention::{validate, Dims};
use crate::error::{Error, Result};
use crate::tensor::{Buffer, DType, Tensor};
use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, TensorView as StView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// The tensors of one attention problem, owned and contiguous.
#[derive(Clone, Debug, PartialEq)]
pub struct Inputs {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// Document id of each query position, `[B, Sq]` row-major.
    pub q_doc: Option<Vec<i32>>,
    /// Document id of each key position, `[B, Sk]` row-major.
    pub k_doc: Option<Vec<i32>>,
    /// Optional explicit block mask: u8 `[B or 1, Hq or 1, query tiles, key tiles]`, nonzero =
    /// attend the whole tile (see `BlockSchedule::from_block_mask`).
    pub block_mask: Option<(Vec<u8>, [usize; 4])>,
}

impl Inputs {
    /// The validated problem sizes.
    pub fn dims(&self) -> Result<Dims> {
        validate(
            "inputs",
            &self.q.view("q")?,
            &self.k.view("k")?,
            &self.v.view("v")?,
        )
    }
    pub fn dtype(&self) -> DType {
        self.q.dtype()
    }
}

fn file_err(origin: &str, msg: impl Into<String>) -> Error {
    Error::File {
        path: origin.to_string(),
        msg: msg.into(),
    }
}

fn dtype_of(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::BF16 => Some(DType::BF16),
        StDtype::F16 => Some(DType::F16),
        _ => None,
    }
}

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
    }
}

/// Reads an input file. See the module documentation for the expected tensors.
pub fn read_inputs(path: impl AsRef<Path>) -> Result<Inputs> {
    let path = path.as_ref();
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| file_err(&origin, format!("cannot read: {e}")))?;
    parse_inputs(&bytes, &origin)
}

/// Reads the per-layer tensors written by `longattn capture`: `q.<L>`, `k.<L>`, `v.<L>`
/// (`[1, N, H, D]`), one [`Inputs`] per layer in increasing layer order. `layers = None` reads
/// every layer of the file.
pub fn read_captured(
    path: impl AsRef<Path>,
    layers: Option<&[usize]>,
) -> Result<Vec<(usize, Inputs)>> {
    let path = path.as_ref();
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| file_err(&origin, format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(&origin, format!("not a safetensors file: {e}")))?;
    let mut found: Vec<usize> = st
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix("q.")?.parse().ok())
        .collect();
    found.sort_unstable();
    if found.is_empty() {
        return Err(file_err(
            &origin,
            "no captured layer (tensors `q.<layer>`, `k.<layer>`, `v.<layer>` from `longattn capture`)",
        ));
    }
    let want: Vec<usize> = match layers {
        Some(l) => l.to_vec(),
        None => found.clone(),
    };
    let layout = "[1, N, H, D] (from `longattn capture`)";
    want.iter()
        .map(|&l| {
            if !found.contains(&l) {
                return Err(file_err(
                    &origin,
                    format!("layer {l} is not in the file (it holds layers {found:?})"),
                ));
            }
            let t = |x: &str| -> Result<Tensor> {
                let name = format!("{x}.{l}");
                let v = require(&st, &origin, &name, "a captured layer")?;
                float_tensor(&origin, &name, &v, layout)
            };
            let inp = Inputs {
                q: t("q")?,
                k: t("k")?,
                v: t("v")?,
                q_doc: None,
                k_doc: None,
                block_mask: None,
            };
            inp.dims()?;
            Ok((l, inp))
        })
        .collect()
}

fn get<'a>(st: &SafeTensors<'a>, origin: &str, name: &str) -> Result<Option<StView<'a>>> {
    match st.tensor(name) {
        Ok(t) => Ok(Some(t)),
        Err(safetensors::SafeTensorError::TensorNotFound(_)) => Ok(None),
        Err(e) => Err(file_err(origin, format!("tensor `{name}`: {e}"))),
    }
}

fn require<'a>(st: &SafeTensors<'a>, origin: &str, name: &str, what: &str) -> Result<StView<'a>> {
    get(st, origin, name)?.ok_or_else(|| {
        let mut have: Vec<String> = st.names().into_iter().cloned().collect();
        have.sort();
        file_err(
            origin,
            format!("missing tensor `{name}` ({what}); the file holds {have:?}"),
        )
    })
}

/// Decodes a float tensor of rank 4 into an owned [`Tensor`].
fn float_tensor(origin: &str, name: &str, t: &StView, layout: &str) -> Result<Tensor> {
    let shape = t.shape().to_vec();
    if shape.len() != 4 {
        return Err(file_err(
            origin,
            format!(
                "tensor `{name}` has shape {shape:?} (rank {}), expected rank 4 {layout}",
                shape.len()
            ),
        ));
    }
    if shape.contains(&0) {
        return Err(file_err(
            origin,
            format!("tensor `{name}` has shape {shape:?}, expected every dimension >= 1 {layout}"),
        ));
    }
    let dtype = dtype_of(t.dtype()).ok_or_else(|| {
        file_err(
            origin,
            format!(
                "tensor `{name}` has dtype {:?}, expected F32, BF16 or F16",
                t.dtype()
            ),
        )
    })?;
    let n = checked_len(origin, name, &shape)?;
    let data = t.data();
    if data.len() != n * dtype.size() {
        return Err(file_err(
            origin,
            format!(
                "tensor `{name}` holds {} bytes, its shape {shape:?} needs {}",
                data.len(),
                n * dtype.size()
            ),
        ));
    }
    // The data is not necessarily aligned: decode from little-endian bytes.
    let buf = match dtype {
        DType::F32 => Buffer::F32(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::BF16 => Buffer::BF16(
            data.chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DType::F16 => Buffer::F16(
            data.chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
    };
    Tensor::new(buf, shape)
}

fn checked_len(origin: &str, name: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s))
        .ok_or_else(|| {
            file_err(
                origin,
                format!("tensor `{name}` has shape {shape:?}, too many elements"),
            )
        })
}

/// Decodes an I32 document-id tensor that must have shape `[batch, seq]`.
fn doc_ids(
    origin: &str,
    name: &str,
    t: &StView,
    batch: usize,
    seq: usize,
    seq_name: &str,
) -> Result<Vec<i32>> {
    if t.dtype() != StDtype::I32 {
        return Err(file_err(
            origin,
            format!(
                "tensor `{name}` has dtype {:?}, expected I32 (document ids)",
                t.dtype()
            ),
        ));
    }
    if t.shape() != [batch, seq] {
        return Err(file_err(
            origin,
            format!(
                "tensor `{name}` has shape {:?}, expected [{batch}, {seq}] ([B, {seq_name}])",
                t.shape()
            ),
        ));
    }
    let data = t.data();
    if data.len() != batch * seq * 4 {
        return Err(file_err(
            origin,
            format!(
                "tensor `{name}` holds {} bytes, expected {}",
                data.len(),
                batch * seq * 4
            ),
        ));
    }
    Ok(data
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Parses the bytes of an input file; `origin` (a path) prefixes every error message.
pub fn parse_inputs(bytes: &[u8], origin: &str) -> Result<Inputs> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| file_err(origin, format!("not a valid safetensors file: {e}")))?;
    let tq = require(&st, origin, "q", "queries [B, Sq, Hq, D]")?;
    let tk = require(&st, origin, "k", "keys [B, Sk, Hk, D]")?;
    let tv = require(&st, origin, "v", "values [B, Sk, Hk, Dv]")?;
    let q = float_tensor(origin, "q", &tq, "[B, Sq, Hq, D]")?;
    let k = float_tensor(origin, "k", &tk, "[B, Sk, Hk, D]")?;
    let v = float_tensor(origin, "v", &tv, "[B, Sk, Hk, Dv]")?;
    for (name, t) in [("k", &k), ("v", &v)] {
        if t.dtype() != q.dtype() {
            return Err(file_err(
                origin,
                format!(
                    "tensor `{name}` has dtype {}, expected {} like `q` (q, k and v must share one dtype)",
                    t.dtype(),
                    q.dtype()
                ),
            ));
        }
    }
    let dims = validate("read_inputs", &q.view("q")?, &k.view("k")?, &v.view("v")?)
        .map_err(|e| file_err(origin, e.to_string()))?;
    let qd = get(&st, origin, "q_doc")?;
    let kd = get(&st, origin, "k_doc")?;
    let (q_doc, k_doc) = match (qd, kd) {
        (None, None) => (None, None),
        (Some(qd), Some(kd)) => (
            Some(doc_ids(origin, "q_doc", &qd, dims.batch, dims.sq, "Sq")?),
            Some(doc_ids(origin, "k_doc", &kd, dims.batch, dims.sk, "Sk")?),
        ),
        (Some(_), None) => {
            return Err(file_err(
                origin,
                "tensor `q_doc` is present but `k_doc` is missing (give both or neither)",
            ))
        }
        (None, Some(_)) => {
            return Err(file_err(
                origin,
                "tensor `k_doc` is present but `q_doc` is missing (give both or neither)",
            ))
        }
    };
    let block_mask = match get(&st, origin, "block_mask")? {
        None => None,
        Some(t) => {
            if t.dtype() != StDtype::U8 {
                return Err(file_err(
                    origin,
                    format!(
                        "tensor `block_mask` has dtype {:?}, expected U8 (0 = skip the tile)",
                        t.dtype()
                    ),
                ));
            }
            let shape: [usize; 4] = t.shape().try_into().map_err(|_| {
                file_err(
                    origin,
                    format!(
                        "tensor `block_mask` has shape {:?}, expected rank 4 [B or 1, Hq or 1, query tiles, key tiles]",
                        t.shape()
                    ),
                )
            })?;
            Some((t.data().to_vec(), shape))
        }
    };
    Ok(Inputs {
        q,
        k,
        v,
        q_doc,
        k_doc,
        block_mask,
    })
}

/// Serializes named tensors; `(name, dtype, shape, little-endian bytes)`.
fn write_tensors(
    path: &Path,
    tensors: &[(&str, StDtype, Vec<usize>, &[u8])],
    overwrite: bool,
) -> Result<()> {
    let origin = path.display().to_string();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, dt, shape, data) in tensors {
        let v = StView::new(*dt, shape.clone(), data)
            .map_err(|e| file_err(&origin, format!("tensor `{name}`: {e}")))?;
        views.push((name.to_string(), v));
    }
    let info: Option<HashMap<String, String>> = None;
    let bytes =
        safetensors::serialize(views, &info).map_err(|e| file_err(&origin, e.to_string()))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if overwrite {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            file_err(&origin, "already exists; refusing to overwrite it")
        } else {
            file_err(&origin, format!("cannot create: {e}"))
        }
    })?;
    f.write_all(&bytes)
        .and_then(|_| f.flush())
        .map_err(|e| file_err(&origin, format!("cannot write: {e}")))
}

/// Writes `out` (its own dtype, shape as given) and `lse` (F32, `lse_shape` = `[B, Hq, Sq]`).
/// With `overwrite == false` an existing file is an error and is left untouched.
pub fn write_outputs(
    path: impl AsRef<Path>,
    out: &Tensor,
    lse: &[f32],
    lse_shape: [usize; 3],
    overwrite: bool,
) -> Result<()> {
    write_outputs_with(path, out, lse, lse_shape, None, &[], overwrite)
}

/// Data of an extra tensor written beside the outputs ([`write_outputs_with`]).
#[derive(Clone, Copy, Debug)]
pub enum Extra<'a> {
    U8(&'a [u8]),
    I32(&'a [i32]),
    F32(&'a [f32]),
}

/// Writes `out` and `lse` (as [`write_outputs`]), the gradients `dq`, `dk`, `dv` when given, and
/// the `extra` tensors `(name, shape, data)` (e.g. the selected `block_mask` of a sparse run).
pub fn write_outputs_with(
    path: impl AsRef<Path>,
    out: &Tensor,
    lse: &[f32],
    lse_shape: [usize; 3],
    grads: Option<&crate::backward::Grads>,
    extra: &[(&str, Vec<usize>, Extra)],
    overwrite: bool,
) -> Result<()> {
    let path = path.as_ref();
    let n: usize = lse_shape.iter().product();
    if n != lse.len() {
        return Err(Error::Shape {
            op: "write_outputs",
            tensor: "lse".into(),
            got: vec![lse.len()],
            expected: format!("{n} values for shape {lse_shape:?}"),
        });
    }
    let lse_bytes: Vec<u8> = lse.iter().flat_map(|x| x.to_le_bytes()).collect();
    let extra_bytes: Vec<(StDtype, Vec<u8>)> = extra
        .iter()
        .map(|e| match e.2 {
            Extra::U8(b) => (StDtype::U8, b.to_vec()),
            Extra::I32(x) => (
                StDtype::I32,
                x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            Extra::F32(x) => (
                StDtype::F32,
                x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        })
        .collect();
    fn t<'a>(name: &'a str, x: &'a Tensor) -> (&'a str, StDtype, Vec<usize>, &'a [u8]) {
        (name, st_dtype(x.dtype()), x.shape.clone(), x.data.bytes())
    }
    let mut ts = vec![
        t("out", out),
        ("lse", StDtype::F32, lse_shape.to_vec(), &lse_bytes),
    ];
    if let Some(g) = grads {
        ts.extend([t("dq", &g.dq), t("dk", &g.dk), t("dv", &g.dv)]);
    }
    for ((name, shape, _), (dt, bytes)) in extra.iter().zip(&extra_bytes) {
        ts.push((name, *dt, shape.clone(), bytes));
    }
    write_tensors(path, &ts, overwrite)
}

/// Reads the output gradient `do` of an input file for the backward pass; it must have the shape
/// `[B, Sq, Hq, Dv]` of the output and the dtype of `q` (`inputs`).
pub fn read_dout(path: impl AsRef<Path>, inputs: &Inputs) -> Result<Tensor> {
    let path = path.as_ref();
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| file_err(&origin, format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(&origin, format!("not a valid safetensors file: {e}")))?;
    let t = require(
        &st,
        &origin,
        "do",
        "the gradient of the output [B, Sq, Hq, Dv], needed by --backward",
    )?;
    let dout = float_tensor(&origin, "do", &t, "[B, Sq, Hq, Dv]")?;
    let d = inputs
        .dims()
        .map_err(|e| file_err(&origin, e.to_string()))?;
    let want = vec![d.batch, d.sq, d.hq, d.dv];
    if dout.shape != want {
        return Err(file_err(
            &origin,
            format!(
                "tensor `do` has shape {:?}, expected {want:?} (the shape of out: [B, Sq, Hq] of q, Dv of v)",
                dout.shape
            ),
        ));
    }
    if dout.dtype() != inputs.dtype() {
        return Err(file_err(
            &origin,
            format!(
                "tensor `do` has dtype {}, expected {} like `q`",
                dout.dtype(),
                inputs.dtype()
            ),
        ));
    }
    Ok(dout)
}

/// Writes the forward's `out` and `lse` (as [`write_outputs`]) and the gradients `dq`, `dk`, `dv`.
pub fn write_backward_outputs(
    path: impl AsRef<Path>,
    out: &Tensor,
    lse: &[f32],
    lse_shape: [usize; 3],
    grads: &crate::backward::Grads,
    overwrite: bool,
) -> Result<()> {
    write_outputs_with(path, out, lse, lse_shape, Some(grads), &[], overwrite)
}

/// The extra tensors of a linear-attention input file (`longattn run --linear`), beside `q`, `k`,
/// `v` (read by [`read_inputs`]): `g` (F32 log decay, `[B, T, H]` for `simple_gla`, `[B, T, H, F]`
/// for `gla`), `initial_state` (F32 `[seqs, H, F, V']`), `cu_seqlens` (I32 `[N + 1]`), `hedgehog`
/// (F32 `[Hk, D, F]`), and for `--backward` `do` (`[B, T, H, V]`, any float dtype) and `d_state`
/// (F32, shaped like the state). Shapes are checked by the entry point, which names the tensor.
#[derive(Clone, Debug, Default)]
pub struct LinearFile {
    pub g: Option<(Vec<f32>, Vec<usize>)>,
    pub initial_state: Option<(Vec<f32>, Vec<usize>)>,
    pub cu_seqlens: Option<Vec<i32>>,
    pub hedgehog: Option<(Vec<f32>, Vec<usize>)>,
    pub dout: Option<Tensor>,
    pub d_state: Option<(Vec<f32>, Vec<usize>)>,
}

fn f32_tensor(origin: &str, name: &str, t: &StView) -> Result<(Vec<f32>, Vec<usize>)> {
    if t.dtype() != StDtype::F32 {
        return Err(file_err(
            origin,
            format!("tensor `{name}` has dtype {:?}, expected F32", t.dtype()),
        ));
    }
    let shape = t.shape().to_vec();
    let n = checked_len(origin, name, &shape)?;
    let data = t.data();
    if data.len() != n * 4 {
        return Err(file_err(
            origin,
            format!(
                "tensor `{name}` holds {} bytes, its shape {shape:?} needs {}",
                data.len(),
                n * 4
            ),
        ));
    }
    Ok((
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        shape,
    ))
}

/// Reads the extra tensors of a linear-attention input file (see [`LinearFile`]).
pub fn read_linear_extras(path: impl AsRef<Path>) -> Result<LinearFile> {
    let path = path.as_ref();
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| file_err(&origin, format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(&origin, format!("not a valid safetensors file: {e}")))?;
    let f = |name: &str| -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        get(&st, &origin, name)?
            .map(|t| f32_tensor(&origin, name, &t))
            .transpose()
    };
    let cu_seqlens = match get(&st, &origin, "cu_seqlens")? {
        None => None,
        Some(t) => {
            if t.dtype() != StDtype::I32 || t.shape().len() != 1 {
                return Err(file_err(
                    &origin,
                    format!(
                        "tensor `cu_seqlens` has dtype {:?} and shape {:?}, expected I32 [N + 1]",
                        t.dtype(),
                        t.shape()
                    ),
                ));
            }
            Some(
                t.data()
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        }
    };
    let dout = match get(&st, &origin, "do")? {
        None => None,
        Some(t) => Some(float_tensor(&origin, "do", &t, "[B, T, H, V]")?),
    };
    Ok(LinearFile {
        g: f("g")?,
        initial_state: f("initial_state")?,
        cu_seqlens,
        hedgehog: f("hedgehog")?,
        dout,
        d_state: f("d_state")?,
    })
}

/// Writes a linear-attention result: `out` `[B, T, H, V]` and `state` `[seqs, H, F, V']` (F32), and
/// with gradients `dq`, `dk`, `dv`, `d_initial_state` and, when present, `dg` (shaped like `g`:
/// `g_shape`) and `d_hedgehog` (`hedgehog_shape`), all F32.
#[allow(clippy::too_many_arguments)]
pub fn write_linear_outputs(
    path: impl AsRef<Path>,
    out: &Tensor,
    state: &[f32],
    state_shape: [usize; 4],
    grads: Option<&crate::linear::LinearGrads>,
    g_shape: Option<&[usize]>,
    hedgehog_shape: Option<&[usize]>,
    overwrite: bool,
) -> Result<()> {
    let path = path.as_ref();
    let bytes = |x: &[f32]| -> Vec<u8> { x.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let mut owned: Vec<(&str, Vec<usize>, Vec<u8>)> = vec![
        ("out", out.shape.clone(), bytes(&out.data.to_f32_vec())),
        ("state", state_shape.to_vec(), bytes(state)),
    ];
    if let Some(g) = grads {
        for (name, t) in [("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)] {
            owned.push((name, t.shape.clone(), bytes(&t.data.to_f32_vec())));
        }
        owned.push((
            "d_initial_state",
            state_shape.to_vec(),
            bytes(&g.d_initial_state),
        ));
        if let (Some(dg), Some(shape)) = (&g.dg, g_shape) {
            owned.push(("dg", shape.to_vec(), bytes(dg)));
        }
        if let (Some(dh), Some(shape)) = (&g.d_hedgehog, hedgehog_shape) {
            owned.push(("d_hedgehog", shape.to_vec(), bytes(dh)));
        }
    }
    let ts: Vec<(&str, StDtype, Vec<usize>, &[u8])> = owned
        .iter()
        .map(|(n, s, b)| (*n, StDtype::F32, s.clone(), &b[..]))
        .collect();
    write_tensors(path, &ts, overwrite)
}

/// Reads the gradients `dq`, `dk`, `dv` of a file written by [`write_backward_outputs`].
pub fn read_grads(path: impl AsRef<Path>) -> Result<crate::backward::Grads> {
    let path = path.as_ref();
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| file_err(&origin, format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(&origin, format!("not a valid safetensors file: {e}")))?;
    let mut g = Vec::new();
    for (name, layout) in [
        ("dq", "[B, Sq, Hq, D]"),
        ("dk", "[B, Sk, Hk, D]"),
        ("dv", "[B, Sk, Hk, Dv]"),
    ] {
        let t = require(&st, &origin, name, layout)?;
        g.push(float_tensor(&origin, name, &t, layout)?);
    }
    let dv = g.pop().expect("three");
    let dk = g.pop().expect("three");
    let dq = g.pop().expect("three");
    Ok(crate::backward::Grads { dq, dk, dv })
}

/// Writes an input file (tests, examples, the benchmark's fixtures).
pub fn write_inputs(path: impl AsRef<Path>, inputs: &Inputs, overwrite: bool) -> Result<()> {
    let path = path.as_ref();
    let mut ts: Vec<(&str, StDtype, Vec<usize>, &[u8])> = vec![
        (
            "q",
            st_dtype(inputs.q.dtype()),
            inputs.q.shape.clone(),
            inputs.q.data.bytes(),
        ),
        (
            "k",
            st_dtype(inputs.k.dtype()),
            inputs.k.shape.clone(),
            inputs.k.data.bytes(),
        ),
        (
            "v",
            st_dtype(inputs.v.dtype()),
            inputs.v.shape.clone(),
            inputs.v.data.bytes(),
        ),
    ];
    let (b, sq, sk) = (inputs.q.shape[0], inputs.q.shape[1], inputs.k.shape[1]);
    let qd: Vec<u8>;
    let kd: Vec<u8>;
    if let (Some(q), Some(k)) = (&inputs.q_doc, &inputs.k_doc) {
        qd = q.iter().flat_map(|x| x.to_le_bytes()).collect();
        kd = k.iter().flat_map(|x| x.to_le_bytes()).collect();
        ts.push(("q_doc", StDtype::I32, vec![b, sq], &qd));
        ts.push(("k_doc", StDtype::I32, vec![b, sk], &kd));
    }
    if let Some((bytes, shape)) = &inputs.block_mask {
        ts.push(("block_mask", StDtype::U8, shape.to_vec(), bytes));
    }
    write_tensors(path, &ts, overwrite)
}

/// Reads an output file written by [`write_outputs`]: `(out, lse, lse_shape)`.
pub fn read_outputs(path: impl AsRef<Path>) -> Result<(Tensor, Vec<f32>, Vec<usize>)> {
    let path = path.as_ref();
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| file_err(&origin, format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(&origin, format!("not a valid safetensors file: {e}")))?;
    let to = require(&st, &origin, "out", "output [B, Sq, Hq, Dv]")?;
    let out = float_tensor(&origin, "out", &to, "[B, Sq, Hq, Dv]")?;
    let tl = require(&st, &origin, "lse", "log-sum-exp [B, Hq, Sq]")?;
    if tl.dtype() != StDtype::F32 {
        return Err(file_err(
            &origin,
            format!("tensor `lse` has dtype {:?}, expected F32", tl.dtype()),
        ));
    }
    let lse = tl
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((out, lse, tl.shape().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("longattn-io-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }

    fn inputs(dtype: DType, docs: bool) -> Inputs {
        let mk = |shape: Vec<usize>, seed: f32| {
            let n: usize = shape.iter().product();
            let x: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect();
            Tensor::new(Buffer::from_f32(dtype, &x), shape).unwrap()
        };
        Inputs {
            q: mk(vec![2, 5, 4, 8], 0.0),
            k: mk(vec![2, 7, 2, 8], 1.0),
            v: mk(vec![2, 7, 2, 3], 2.0),
            q_doc: docs.then(|| (0..10).map(|i| i / 3).collect()),
            k_doc: docs.then(|| (0..14).map(|i| i / 4).collect()),
            block_mask: None,
        }
    }

    /// Raw file with arbitrary tensors: (name, dtype, shape, bytes).
    fn raw(ts: &[(&str, StDtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let views: Vec<(String, StView)> = ts
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), StView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, &None).unwrap()
    }

    fn msg(r: Result<Inputs>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn roundtrip_every_dtype() {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            for docs in [false, true] {
                let x = inputs(dt, docs);
                let p = tmp(&format!("rt-{dt}-{docs}.safetensors"));
                write_inputs(&p, &x, false).unwrap();
                assert_eq!(read_inputs(&p).unwrap(), x);
            }
        }
    }

    #[test]
    fn outputs_roundtrip_and_refuse_overwrite() {
        let x = inputs(DType::BF16, false);
        let p = tmp("out.safetensors");
        let lse: Vec<f32> = (0..2 * 4 * 5).map(|i| i as f32).collect();
        write_outputs(&p, &x.q, &lse, [2, 4, 5], false).unwrap();
        let e = write_outputs(&p, &x.q, &lse, [2, 4, 5], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already exists"), "{e}");
        write_outputs(&p, &x.q, &lse, [2, 4, 5], true).unwrap();
        let (out, l, ls) = read_outputs(&p).unwrap();
        assert_eq!(out, x.q);
        assert_eq!(l, lse);
        assert_eq!(ls, vec![2, 4, 5]);
        let e = write_outputs(&p, &x.q, &lse, [2, 4, 6], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lse"), "{e}");
    }

    #[test]
    fn missing_file() {
        let e = read_inputs("/nonexistent/dir/x.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/nonexistent/dir/x.safetensors: cannot read"),
            "{e}"
        );
    }

    #[test]
    fn truncated_and_garbage() {
        let x = inputs(DType::F32, false);
        let p = tmp("trunc.safetensors");
        write_inputs(&p, &x, false).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        for cut in [0, 3, 8, 20, bytes.len() / 2, bytes.len() - 1] {
            let e = msg(parse_inputs(&bytes[..cut], "f.safetensors"));
            assert!(
                e.starts_with("f.safetensors: not a valid safetensors file"),
                "{cut}: {e}"
            );
        }
        let e = msg(parse_inputs(b"hello world, not a tensor file", "g"));
        assert!(e.contains("not a valid safetensors"), "{e}");
    }

    #[test]
    fn missing_tensor_is_named() {
        let f = raw(&[
            ("q", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
            ("k", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
        ]);
        let e = msg(parse_inputs(&f, "f"));
        assert!(e.contains("missing tensor `v`"), "{e}");
    }

    #[test]
    fn wrong_rank() {
        let f = raw(&[
            ("q", StDtype::F32, vec![2, 1, 2], vec![0; 16]),
            ("k", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
            ("v", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
        ]);
        let e = msg(parse_inputs(&f, "f"));
        assert!(e.contains("`q`") && e.contains("rank 3"), "{e}");
    }

    #[test]
    fn wrong_and_mixed_dtypes() {
        let f = raw(&[
            ("q", StDtype::F64, vec![1, 1, 1, 2], vec![0; 16]),
            ("k", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
            ("v", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
        ]);
        let e = msg(parse_inputs(&f, "f"));
        assert!(e.contains("`q` has dtype F64"), "{e}");
        let f = raw(&[
            ("q", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
            ("k", StDtype::BF16, vec![1, 2, 1, 2], vec![0; 8]),
            ("v", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
        ]);
        let e = msg(parse_inputs(&f, "f"));
        assert!(e.contains("`k` has dtype bf16, expected f32"), "{e}");
    }

    #[test]
    fn doc_ids_checked() {
        let base = || {
            vec![
                ("q", StDtype::F32, vec![1, 2, 1, 2], vec![0u8; 16]),
                ("k", StDtype::F32, vec![1, 3, 1, 2], vec![0u8; 24]),
                ("v", StDtype::F32, vec![1, 3, 1, 2], vec![0u8; 24]),
            ]
        };
        let mut f = base();
        f.push(("q_doc", StDtype::I64, vec![1, 2], vec![0; 16]));
        f.push(("k_doc", StDtype::I32, vec![1, 3], vec![0; 12]));
        let e = msg(parse_inputs(&raw(&f), "f"));
        assert!(e.contains("`q_doc` has dtype I64, expected I32"), "{e}");
        let mut f = base();
        f.push(("q_doc", StDtype::I32, vec![1, 2], vec![0; 8]));
        f.push(("k_doc", StDtype::I32, vec![1, 2], vec![0; 8]));
        let e = msg(parse_inputs(&raw(&f), "f"));
        assert!(
            e.contains("`k_doc` has shape [1, 2], expected [1, 3]"),
            "{e}"
        );
        let mut f = base();
        f.push(("q_doc", StDtype::I32, vec![1, 2], vec![0; 8]));
        let e = msg(parse_inputs(&raw(&f), "f"));
        assert!(e.contains("`k_doc` is missing"), "{e}");
    }

    #[test]
    fn shape_disagreements() {
        // Hq = 3 is not a multiple of Hk = 2.
        let f = raw(&[
            ("q", StDtype::F32, vec![1, 2, 3, 2], vec![0; 48]),
            ("k", StDtype::F32, vec![1, 2, 2, 2], vec![0; 32]),
            ("v", StDtype::F32, vec![1, 2, 2, 2], vec![0; 32]),
        ]);
        let e = msg(parse_inputs(&f, "f"));
        assert!(
            e.starts_with("f: ") && e.contains("multiple of key/value heads"),
            "{e}"
        );
        // Zero-sized dimension.
        let f = raw(&[
            ("q", StDtype::F32, vec![1, 0, 1, 2], vec![]),
            ("k", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
            ("v", StDtype::F32, vec![1, 2, 1, 2], vec![0; 16]),
        ]);
        let e = msg(parse_inputs(&f, "f"));
        assert!(e.contains("every dimension >= 1"), "{e}");
    }

    #[test]
    fn never_panics_on_mutations() {
        let x = inputs(DType::F16, true);
        let p = tmp("mut.safetensors");
        write_inputs(&p, &x, false).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let hdr = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + 8;
        for i in 0..hdr.min(bytes.len()) {
            for v in [0u8, b'9', b'"', b']', 0xff] {
                let mut b = bytes.clone();
                b[i] = v;
                let _ = parse_inputs(&b, "m");
            }
        }
    }
}
