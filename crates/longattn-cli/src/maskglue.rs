//! INTEGRATION POINT with `longattn::mask` (expressions) and `MaskSpec::Expr`.
//!
//! This is the only file of the CLI that depends on the mask-expression API
//! (`MaskExpr::parse`, `expr.bind`, `BoundMask`, `mask::render`). Until that API is merged into
//! `main`, the functions below carry a small, clearly limited fallback that understands only the
//! expressions `full` and `causal` (every other known mask name is refused with a message saying
//! so). When the mask module lands, replace the bodies marked `FALLBACK` by the calls written
//! in their doc comments; nothing else in the CLI needs to change.
use longattn::mask::{BlockSchedule, RowMask, TileEntry, TileKind};
use longattn::{AttnOutput, AttnParams, Error, MaskSpec, Result, TensorView};

/// Names of the mask language, for the fallback's error messages.
const KNOWN: &[&str] = &[
    "full",
    "causal",
    "window",
    "document",
    "sinks",
    "neighborhood2d",
    "prefix",
    "none",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Full,
    Causal,
}

/// A mask expression bound to shapes (wraps `longattn::mask::BoundMask`).
pub struct Mask {
    expr: String,
    kind: Kind,
    sq: usize,
    sk: usize,
}

/// Parses `expr` and binds it to `[batch, sq, sk]` and optional document ids `(q_doc, k_doc)`,
/// each `[batch, seq]` row-major.
///
/// Real API: `MaskExpr::parse(expr)?.bind(MaskShape { batch, sq, sk }, docs.map(|(q, k)| DocIds { q, k }))`.
pub fn bind_mask(
    expr: &str,
    batch: usize,
    sq: usize,
    sk: usize,
    docs: Option<(Vec<i32>, Vec<i32>)>,
) -> Result<Mask> {
    let _ = (batch, docs);
    // FALLBACK: a one-word parser.
    let t = expr.trim();
    let start = expr.len() - expr.trim_start().len();
    let kind = match t {
        "full" => Kind::Full,
        "causal" => Kind::Causal,
        _ => {
            // Report the first unknown word with its position, as the real parser does.
            let mut pos = 0;
            for w in expr.split(|c: char| !c.is_ascii_alphanumeric() && c != '_') {
                if !w.is_empty() && !w.chars().all(|c| c.is_ascii_digit()) && !KNOWN.contains(&w) {
                    return Err(Error::MaskParse {
                        pos,
                        msg: format!("unknown mask `{w}`"),
                        expr: expr.to_string(),
                        caret: format!("{}^", " ".repeat(pos)),
                    });
                }
                pos += w.len() + 1;
            }
            return Err(Error::MaskBind {
                expr: expr.to_string(),
                msg: format!(
                    "this build understands only `full` and `causal` (the mask-expression module is not merged yet); got `{}`",
                    &expr[start..]
                ),
            });
        }
    };
    Ok(Mask {
        expr: expr.to_string(),
        kind,
        sq,
        sk,
    })
}

/// Causal in the bottom-right convention (key j visible to query i iff j <= i + sk - sq).
struct CausalRows {
    sq: usize,
    sk: usize,
}
impl RowMask for CausalRows {
    fn row_bits(&self, _b: usize, _h: usize, i: usize, j0: usize, out: &mut [u64]) {
        let last = (i + self.sk).checked_sub(self.sq); // last allowed key
        for (w, o) in out.iter_mut().enumerate() {
            let mut bits = 0u64;
            for t in 0..64 {
                let j = j0 + 64 * w + t;
                if j < self.sk && last.is_some_and(|l| j <= l) {
                    bits |= 1 << t;
                }
            }
            *o = bits;
        }
    }
}

impl Mask {
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// Real API: `bound.allowed(b, i, j)`.
    pub fn allowed(&self, _b: usize, i: usize, j: usize) -> bool {
        match self.kind {
            Kind::Full => true,
            Kind::Causal => j + self.sq <= i + self.sk,
        }
    }

    /// Real API: `bound.allowed_pairs(b)`.
    pub fn allowed_pairs(&self, _b: usize) -> u64 {
        match self.kind {
            Kind::Full => (self.sq * self.sk) as u64,
            Kind::Causal => (0..self.sq)
                .map(|i| ((i + self.sk + 1).saturating_sub(self.sq)).min(self.sk) as u64)
                .sum(),
        }
    }

    /// Real API: `bound.density()`.
    pub fn density(&self) -> f64 {
        self.allowed_pairs(0) as f64 / (self.sq * self.sk) as f64
    }

    /// Real API: `bound.schedule(tile_q, tile_k)`.
    pub fn schedule(&self, tile_q: usize, tile_k: usize) -> Result<BlockSchedule> {
        let mut s = BlockSchedule::empty(tile_q, tile_k, self.sq, self.sk, 1, 1)?;
        for qt in 0..s.q_tiles {
            let (q0, q1) = s.q_range(qt);
            let mut row = Vec::new();
            for kt in 0..s.k_tiles {
                let (k0, k1) = s.k_range(kt);
                let any = self.allowed(0, q1 - 1, k0);
                let all = self.allowed(0, q0, k1 - 1);
                if any {
                    row.push(TileEntry {
                        k_tile: kt as u32,
                        kind: if all {
                            TileKind::Full
                        } else {
                            TileKind::Partial
                        },
                    });
                }
            }
            s.push_row(&row)?;
        }
        s.finish()
    }

    /// The fast kernel on this mask. Real API: `longattn::forward(q, k, v, params, MaskSpec::Expr(&bound))`.
    pub fn forward(
        &self,
        q: &TensorView,
        k: &TensorView,
        v: &TensorView,
        params: &AttnParams,
    ) -> Result<AttnOutput> {
        match self.kind {
            Kind::Full => longattn::forward(q, k, v, params, MaskSpec::Full),
            Kind::Causal => {
                let sched = self.schedule(TILE, TILE)?;
                let rows = CausalRows {
                    sq: self.sq,
                    sk: self.sk,
                };
                longattn::forward(
                    q,
                    k,
                    v,
                    params,
                    MaskSpec::Schedule {
                        schedule: &sched,
                        rows: Some(&rows),
                    },
                )
            }
        }
    }

    /// Real API: `longattn::mask::render::explain(&bound, tile_q, tile_k)`.
    pub fn explain(&self, tile_q: usize, tile_k: usize) -> Result<String> {
        let s = self.schedule(tile_q, tile_k)?;
        let (full, partial) = s.counts();
        Ok(format!(
            "mask `{}` on Sq {} x Sk {}: {} allowed pairs (density {:.4})\ntiles {tile_q}x{tile_k}: {} x {} = {} tiles, {full} full, {partial} partial, {} empty",
            self.expr,
            self.sq,
            self.sk,
            self.allowed_pairs(0),
            self.density(),
            s.q_tiles,
            s.k_tiles,
            s.q_tiles * s.k_tiles,
            s.q_tiles * s.k_tiles - full - partial
        ))
    }

    /// Real API: `longattn::mask::render::render_ascii(&sched, b, max_cells)`.
    pub fn render_ascii(&self, sched: &BlockSchedule, b: usize, max_cells: usize) -> String {
        let grid = self.tile_grid(sched, b);
        let mut s = String::new();
        for row in grid.iter().take(max_cells) {
            for &c in row.iter().take(max_cells) {
                s.push(match c {
                    1 => '#',
                    2 => '+',
                    _ => '.',
                });
            }
            s.push('\n');
        }
        s
    }

    /// Real API: `longattn::mask::render::tile_grid(&sched, b)` (0 empty, 1 full, 2 partial).
    pub fn tile_grid(&self, sched: &BlockSchedule, b: usize) -> Vec<Vec<u8>> {
        (0..sched.q_tiles)
            .map(|qt| {
                let mut r = vec![0u8; sched.k_tiles];
                for e in sched.row(b, 0, qt) {
                    r[e.k_tile as usize] = e.kind as u8;
                }
                r
            })
            .collect()
    }
}

/// Tile size used to build schedules in the CLI (the kernel's own choice lives in `longattn::cpu`).
pub const TILE: usize = 64;
