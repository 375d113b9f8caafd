//! The mask expression tree, its canonical text, and the shapes it binds to.
//!
//! Positions: query `i` in `[0, Sq)`, key `j` in `[0, Sk)`, aligned query position
//! `p = i + Sk - Sq` (bottom-right alignment: a decode query, `Sq = 1`, sees the whole cache).
//! See `docs/MASKS.md` for the language.
use std::fmt;

/// A parsed mask expression. Atoms carry their arguments as written; [`MaskExpr::bind`] checks
/// them against the shapes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MaskExpr {
    /// Every pair.
    Full,
    /// `j <= p`.
    Causal,
    /// `p - left <= j <= p + right`.
    Window {
        left: usize,
        right: usize,
    },
    /// `j < S`: attention sinks.
    Sinks(usize),
    /// `j < P`: a shared prefix every query sees.
    Prefix(usize),
    /// `floor(p / C) == floor(j / C)`: block-diagonal chunks.
    Chunk(usize),
    /// `(p - j) mod S == 0`.
    Strided(usize),
    /// `q_doc[b, i] == k_doc[b, j]`: packed / varlen documents.
    Document,
    /// PowerAttention: with blocks of `B` tokens, `d = |floor(p / B) - floor(j / B)|` is 0 or a
    /// power of two (key blocks at distances 0, 1, 2, 4, 8, ... in either direction).
    Power(usize),
    /// Radial Attention on frames of `frame` tokens (frame `t = floor(pos / F)`, spatial index
    /// `s = pos mod F`): `|s_q - s_k| <= window >> r` with `r = floor(log2 |t_q - t_k|)` for
    /// frame distances >= 2 and `r = 0` for 0 and 1: the spatial window halves each time the
    /// temporal distance doubles (once it reaches 0 only the same spatial index remains).
    Radial {
        frame: usize,
        window: usize,
    },
    /// NATTEN neighborhood attention on a 1-D (`grid` empty), 2-D or 3-D row-major grid.
    Neighborhood {
        /// Grid sizes per axis, outermost first; empty for 1-D (the grid is the sequence).
        grid: Vec<usize>,
        /// Kernel size per axis (one entry for 1-D).
        kernel: Vec<usize>,
        /// Dilation per axis (one entry for 1-D), 1 = none.
        dilation: Vec<usize>,
    },
    Not(Box<MaskExpr>),
    And(Box<MaskExpr>, Box<MaskExpr>),
    Or(Box<MaskExpr>, Box<MaskExpr>),
}

/// Sequence lengths a mask is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaskShape {
    pub batch: usize,
    pub sq: usize,
    pub sk: usize,
}

impl MaskShape {
    /// One batch row of `n` queries and `n` keys.
    pub fn square(n: usize) -> MaskShape {
        MaskShape {
            batch: 1,
            sq: n,
            sk: n,
        }
    }
}

/// Document ids per batch row for the `document` atom: `q` is `[batch * sq]`, `k` is
/// `[batch * sk]`. Ids are arbitrary `i32` (need not be sorted or contiguous).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DocIds {
    pub q: Vec<i32>,
    pub k: Vec<i32>,
}

impl MaskExpr {
    /// True when the expression contains the `document` atom (then binding needs [`DocIds`] and
    /// the schedule is stored per batch row).
    pub fn uses_documents(&self) -> bool {
        match self {
            MaskExpr::Document => true,
            MaskExpr::Not(a) => a.uses_documents(),
            MaskExpr::And(a, b) | MaskExpr::Or(a, b) => a.uses_documents() || b.uses_documents(),
            _ => false,
        }
    }

    /// Binding strength for printing: 0 = `|`, 1 = `&`, 2 = `!`, 3 = atom.
    fn level(&self) -> u8 {
        match self {
            MaskExpr::Or(..) => 0,
            MaskExpr::And(..) => 1,
            MaskExpr::Not(..) => 2,
            _ => 3,
        }
    }
}

/// Writes `e`, in parentheses when it binds less tightly than `min_level`.
fn write_at(f: &mut fmt::Formatter<'_>, e: &MaskExpr, min_level: u8) -> fmt::Result {
    if e.level() < min_level {
        write!(f, "({e})")
    } else {
        write!(f, "{e}")
    }
}

fn write_list(f: &mut fmt::Formatter<'_>, name: &str, args: &[usize]) -> fmt::Result {
    write!(f, "{name}(")?;
    for (n, a) in args.iter().enumerate() {
        if n > 0 {
            write!(f, ",")?;
        }
        write!(f, "{a}")?;
    }
    write!(f, ")")
}

/// Canonical text: minimal parentheses, `a & b` / `a | b` with single spaces, `!a`. Binary
/// operators are left-associative, so a right operand of the same operator is parenthesized;
/// `MaskExpr::parse(&e.to_string()) == Ok(e)` for every parsed expression.
impl fmt::Display for MaskExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaskExpr::Full => write!(f, "full"),
            MaskExpr::Causal => write!(f, "causal"),
            MaskExpr::Window { left, right } => write!(f, "window({left},{right})"),
            MaskExpr::Sinks(s) => write!(f, "sinks({s})"),
            MaskExpr::Prefix(p) => write!(f, "prefix({p})"),
            MaskExpr::Chunk(c) => write!(f, "chunk({c})"),
            MaskExpr::Strided(s) => write!(f, "strided({s})"),
            MaskExpr::Document => write!(f, "document"),
            MaskExpr::Power(b) => write!(f, "power({b})"),
            MaskExpr::Radial { frame, window } => write!(f, "radial({frame},{window})"),
            MaskExpr::Neighborhood {
                grid,
                kernel,
                dilation,
            } => {
                let name = match grid.len() {
                    0 => "neighborhood".to_string(),
                    n => format!("neighborhood{n}d"),
                };
                let mut args: Vec<usize> = grid.clone();
                args.extend_from_slice(kernel);
                if dilation.iter().any(|&d| d != 1) {
                    args.extend_from_slice(dilation);
                }
                write_list(f, &name, &args)
            }
            MaskExpr::Not(a) => {
                write!(f, "!")?;
                write_at(f, a, 2)
            }
            MaskExpr::And(a, b) => {
                write_at(f, a, 1)?;
                write!(f, " & ")?;
                write_at(f, b, 2)
            }
            MaskExpr::Or(a, b) => {
                write_at(f, a, 0)?;
                write!(f, " | ")?;
                write_at(f, b, 1)
            }
        }
    }
}
