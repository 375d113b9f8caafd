//! Binding a mask expression given on the command line.
use longattn::mask::{BoundMask, DocIds, MaskExpr, MaskShape};
use longattn::Result;

/// Parses `expr` and binds it to `[batch, sq, sk]` and optional document ids `(q_doc, k_doc)`,
/// each `[batch, seq]` row-major.
pub fn bind_mask(
    expr: &str,
    batch: usize,
    sq: usize,
    sk: usize,
    docs: Option<(Vec<i32>, Vec<i32>)>,
) -> Result<BoundMask> {
    MaskExpr::parse(expr)?.bind(
        MaskShape { batch, sq, sk },
        docs.map(|(q, k)| DocIds { q, k }),
    )
}

/// [`bind_mask`] over the inputs read from `path` (their shapes and document ids); an error of a
/// `document` mask on inputs without ids says which tensors the file lacks.
pub fn bind_input_mask(
    expr: &str,
    inputs: &longattn::io::Inputs,
    path: &std::path::Path,
) -> anyhow::Result<BoundMask> {
    let dims = inputs.dims()?;
    let docs = inputs.q_doc.clone().zip(inputs.k_doc.clone());
    let has_docs = docs.is_some();
    bind_mask(expr, dims.batch, dims.sq, dims.sk, docs).map_err(|e| {
        let mut m = e.to_string();
        if !has_docs && expr.contains("document") {
            m += &format!(
                "\n  the `document` mask needs the i32 tensors `q_doc` [B, Sq] and `k_doc` [B, Sk] in {}",
                path.display()
            );
        }
        anyhow::anyhow!(m)
    })
}

/// Document ids of `n` equal documents over `len` tokens, the same in each of `batch` rows
/// (`[batch, len]` row-major; what `--docs N` means).
pub fn equal_docs(batch: usize, len: usize, n: usize) -> Vec<i32> {
    (0..batch)
        .flat_map(|_| (0..len).map(move |i| (i * n / len) as i32))
        .collect()
}

/// Tile size used to build schedules in the CLI's reports (the kernel's own choice lives in
/// `longattn::cpu`).
pub const TILE: usize = 64;
