//! KV-cache compression policies ("presses"): which entries of each (layer, KV head) to keep.
//!
//! A press is parsed from `name(key=value,...)`:
//!
//! | spec | keeps (n = the head's budget, see below) | scores |
//! |---|---|---|
//! | `streaming(sinks=S,window=W)` | the first S entries and the last W | none |
//! | `h2o(budget=B,recent=R,score=sum\|mean)` | the floor(R n) newest (R = 0.5), then the heaviest by accumulated attention (`mean`: divided by the queries that saw the entry) | H2O |
//! | `a2sf(budget=B,f=F)` | the n heaviest by attention accumulated with forgetting factor F | A2SF |
//! | `snapkv(budget=B,window=W,kernel=K,pool=max\|avg)` | the last W, then the heaviest by the window's attention pooled over K neighbours | SnapKV(W) |
//! | `pyramid(budget=B,window=W,kernel=K,beta=R,pool=max\|avg,counts=ceil\|kvpress)` | SnapKV's choice with a budget per layer (PyramidKV, below) | SnapKV(W) |
//! | `duo(sinks=S,window=W,ratio=F \| threshold=T)` | retrieval heads: everything; streaming heads: the first S and the last W (roles from a probe, [`crate::kv::roles`]) | none |
//! | `tova(budget=B,heads=group\|layer)` | the n most attended by the latest query (`layer`: one set per layer, below) | TOVA |
//! | `knorm(budget=B)` | the n keys of smallest L2 norm | none |
//!
//! Symbolic arguments (the first value is the default) select conventions; the second values are
//! those of NVIDIA kvpress (its ObservedAttention, SnapKV / PyramidKV and TOVA presses), with which
//! docs/QUALITY.md compares keep sets on the same weights: `h2o(recent=0,score=mean)` ranks every
//! entry by its mean attention `sum_q P[q, j] / (L - pos_j)` with no recent window; `pool=avg`
//! averages over the K neighbours (zeros beyond the ends, divided by K) instead of taking their
//! maximum; `pyramid(counts=kvpress)` computes the layers' counts as kvpress does
//! ([`LayerCounts::Kvpress`]); `tova(heads=layer)` ranks the entries of every KV head of a layer by the mean over
//! the layer's KV heads (with equal groups: over all its query heads) and always keeps the latest
//! entry, so a layer's heads keep one set.
//!
//! PyramidKV's budgets decrease linearly from the first layer to the last, the first R times the
//! last (R >= 1), averaging B over the layers: layer l of L keeps
//! `B_l = min(1, B (1 + s (1 - 2 l / (L - 1))))`, `s = (R - 1) / (R + 1)` (R = 1: SnapKV; a
//! first layer's budget clamped to 1 leaves the mean below B).
//!
//! Budgets are fractions in (0, 1] of the positions seen. Compression is decode-time friendly:
//! with `headroom` h positions about to be appended, a head of a sequence of L positions is cut
//! to `n = ceil(B (L + h)) - h` entries (streaming: `S + W - h`), so that after the append it holds
//! the budget of L + h positions. Budget 1.0 keeps everything (bit for bit the full cache).
//! Ties between equal scores keep the newer entry.
//!
//! [`compress`] computes every head's keep set first (the press's fast path; each policy module
//! has its plain reference beside it), checks them all, and only then compacts the cache and the
//! scores: an error leaves both as they were.
pub mod a2sf;
pub mod h2o;
pub mod knorm;
pub mod merge;
pub mod runner;
pub mod snapkv;
pub mod streaming;
pub mod tova;

use std::fmt;

use super::roles::{HeadRoles, RoleSelect};
use super::score::{KvScores, ScoreKind};
use super::{PagedKvCache, SeqId};
use crate::error::{Error, Result};

const OP: &str = "kv press";

fn err(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

/// SnapKV's pooling of the window's scores over `kernel` neighbours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Pool {
    /// `max_{|t - j| <= K/2} s[t]`.
    #[default]
    Max,
    /// `sum_{|t - j| <= K/2} s[t] / K` (entries beyond the ends count as 0).
    Avg,
}

/// What H2O accumulates per entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Accum {
    /// `sum_q P[q, j]`.
    #[default]
    Sum,
    /// `sum_q P[q, j] / (L - pos_j)`: the mean over the queries that saw the entry (causal).
    Mean,
}

/// Whose attention ranks a TOVA head's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Heads {
    /// The KV head's own group of query heads (reduced as the scores say).
    #[default]
    Group,
    /// The mean over the layer's KV heads, one keep set per layer, the latest entry always kept.
    Layer,
}

/// How PyramidKV turns its per-layer budget fractions into counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LayerCounts {
    /// `ceil(B_l L)` per layer (module documentation).
    #[default]
    Ceil,
    /// kvpress's: with `C = B L`, the line from `C (1 + s)` at the first layer to `C (1 - s)` at
    /// the last (the first clamped to `L - W` with the mean kept at C), each count rounded to the
    /// nearest; plain SnapKV's C in every layer when the line leaves `[W, L]`.
    Kvpress,
}

/// The symbolic values of an argument (the default first), or None for a numeric one.
fn choices(name: &str, key: &str) -> Option<&'static [&'static str]> {
    match (name, key) {
        ("snapkv" | "pyramid", "pool") => Some(&["max", "avg"]),
        ("pyramid", "counts") => Some(&["ceil", "kvpress"]),
        ("h2o", "score") => Some(&["sum", "mean"]),
        ("tova", "heads") => Some(&["group", "layer"]),
        _ => None,
    }
}

/// A compression policy (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Press {
    Streaming {
        sinks: usize,
        window: usize,
    },
    H2o {
        budget: f64,
        /// Fraction of the kept entries that are the newest (0.5).
        recent: f64,
        score: Accum,
    },
    A2sf {
        budget: f64,
        f: f64,
    },
    SnapKv {
        budget: f64,
        window: usize,
        kernel: usize,
        pool: Pool,
    },
    Pyramid {
        budget: f64,
        window: usize,
        kernel: usize,
        beta: f64,
        pool: Pool,
        counts: LayerCounts,
    },
    /// DuoAttention / RazorAttention head roles: retrieval heads keep everything, streaming
    /// heads the sinks and the window. The roles come with [`compress_with`]'s table; `select`
    /// (when given) says how a table probed on the fly chooses them.
    Duo {
        sinks: usize,
        window: usize,
        select: Option<RoleSelect>,
    },
    Tova {
        budget: f64,
        heads: Heads,
    },
    Knorm {
        budget: f64,
    },
}

const KNOWN: &str = "streaming, h2o, a2sf, snapkv, pyramid, duo, tova, knorm";

/// The accepted arguments of each press with their defaults (None: required), canonical order.
fn arguments(name: &str) -> Option<&'static [(&'static str, Option<f64>)]> {
    Some(match name {
        "streaming" => &[("sinks", Some(4.0)), ("window", None)],
        "tova" => &[("budget", None), ("heads", Some(0.0))],
        "knorm" => &[("budget", None)],
        "h2o" => &[
            ("budget", None),
            ("recent", Some(0.5)),
            ("score", Some(0.0)),
        ],
        "a2sf" => &[("budget", None), ("f", Some(0.95))],
        "snapkv" => &[
            ("budget", None),
            ("window", Some(32.0)),
            ("kernel", Some(5.0)),
            ("pool", Some(0.0)),
        ],
        "pyramid" => &[
            ("budget", None),
            ("window", Some(32.0)),
            ("kernel", Some(5.0)),
            ("beta", Some(5.0)),
            ("pool", Some(0.0)),
            ("counts", Some(0.0)),
        ],
        "duo" => &[
            ("sinks", Some(4.0)),
            ("window", None),
            ("ratio", Some(f64::NAN)),
            ("threshold", Some(f64::NAN)),
        ],
        _ => return None,
    })
}

impl Press {
    /// Parses a spec (grammar in the module documentation). `duo(...,roles=FILE)` is a `--kv`
    /// spec's ([`crate::kv::spec::KvSpec`]), which reads the file: see
    /// [`parse_with_roles`](Self::parse_with_roles).
    pub fn parse(text: &str) -> Result<Press> {
        let (p, roles) = Press::parse_with_roles(text)?;
        if roles.is_some() {
            return Err(err(format!(
                "`{text}`: `roles=FILE` names a role table, which a --kv spec reads (KvSpec::parse); a bare press takes its roles through compress_with"
            )));
        }
        Ok(p)
    }

    /// As [`parse`](Self::parse), also returning duo's `roles=FILE` argument (the path of a role
    /// table), which no other press takes.
    pub fn parse_with_roles(text: &str) -> Result<(Press, Option<String>)> {
        let (name, mut given) = crate::sparse::spec::split_call(OP, text)?;
        let mut roles = None;
        if name == "duo" {
            if let Some(i) = given.iter().position(|g| g.0 == "roles") {
                let path = given.remove(i).1;
                if given.iter().any(|g| g.0 == "roles") {
                    return Err(err("`duo`: argument `roles` given twice".into()));
                }
                if path.is_empty() {
                    return Err(err("`duo`: `roles=` names no file".into()));
                }
                roles = Some(path.to_string());
            }
        }
        if name.is_empty() {
            return Err(err(format!("`{text}`: no press name (known: {KNOWN})")));
        }
        let accepted = arguments(name)
            .ok_or_else(|| err(format!("unknown press `{name}` (known: {KNOWN})")))?;
        let keys: Vec<&str> = accepted.iter().map(|a| a.0).collect();
        // Symbolic values become their index among the argument's choices.
        let mut given_idx: Vec<(&str, String)> = Vec::with_capacity(given.len());
        for (k, v) in given {
            match choices(name, k) {
                Some(c) => {
                    let i = c.iter().position(|x| *x == v).ok_or_else(|| {
                        err(format!(
                            "`{name}`: `{k}={v}` is not one of {}",
                            c.join(", ")
                        ))
                    })?;
                    given_idx.push((k, i.to_string()));
                }
                None => given_idx.push((k, v.to_string())),
            }
        }
        let given: Vec<(&str, &str)> = given_idx.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let vals: Vec<Option<f64>> = crate::sparse::spec::assign_args(OP, name, &keys, given)?
            .into_iter()
            .zip(accepted.iter())
            .map(|(g, a)| g.or(a.1))
            .collect();
        let arg = |key: &str| -> Result<f64> {
            let i = accepted.iter().position(|a| a.0 == key).expect("listed");
            vals[i].ok_or_else(|| err(format!("`{name}`: argument `{key}` is required")))
        };
        let int = |key: &str| -> Result<usize> {
            let x = arg(key)?;
            if x.fract() != 0.0 || !(0.0..=u32::MAX as f64).contains(&x) {
                return Err(err(format!(
                    "`{name}`: `{key}` must be a non-negative integer, got {x}"
                )));
            }
            Ok(x as usize)
        };
        let press = match name {
            "streaming" => Press::Streaming {
                sinks: int("sinks")?,
                window: int("window")?,
            },
            "h2o" => Press::H2o {
                budget: arg("budget")?,
                recent: arg("recent")?,
                score: [Accum::Sum, Accum::Mean][int("score")?],
            },
            "a2sf" => Press::A2sf {
                budget: arg("budget")?,
                f: arg("f")?,
            },
            "snapkv" => Press::SnapKv {
                budget: arg("budget")?,
                window: int("window")?,
                kernel: int("kernel")?,
                pool: [Pool::Max, Pool::Avg][int("pool")?],
            },
            "pyramid" => Press::Pyramid {
                budget: arg("budget")?,
                window: int("window")?,
                kernel: int("kernel")?,
                beta: arg("beta")?,
                pool: [Pool::Max, Pool::Avg][int("pool")?],
                counts: [LayerCounts::Ceil, LayerCounts::Kvpress][int("counts")?],
            },
            "duo" => {
                let opt = |key: &str| arg(key).map(|x| (!x.is_nan()).then_some(x));
                let select = match (opt("ratio")?, opt("threshold")?) {
                    (Some(_), Some(_)) => {
                        return Err(err(format!("`{text}`: give ratio or threshold, not both")))
                    }
                    (Some(r), None) => Some(RoleSelect::Ratio(r)),
                    (None, Some(t)) => Some(RoleSelect::Threshold(t)),
                    (None, None) => None,
                };
                Press::Duo {
                    sinks: int("sinks")?,
                    window: int("window")?,
                    select,
                }
            }
            "tova" => Press::Tova {
                budget: arg("budget")?,
                heads: [Heads::Group, Heads::Layer][int("heads")?],
            },
            _ => Press::Knorm {
                budget: arg("budget")?,
            },
        };
        press.check()?;
        Ok((press, roles))
    }

    /// Checks the fields (for presses built by hand rather than parsed).
    pub fn check(&self) -> Result<()> {
        if let Some(b) = self.budget() {
            if !(b > 0.0 && b <= 1.0) {
                return Err(err(format!("`{self}`: budget {b} outside (0, 1]")));
            }
        }
        match *self {
            Press::Streaming { sinks, window } | Press::Duo { sinks, window, .. }
                if sinks + window == 0 =>
            {
                Err(err(format!(
                    "`{self}`: sinks + window must be >= 1 (nothing would be kept)"
                )))
            }
            Press::Duo {
                select: Some(sel), ..
            } => sel.check().map_err(|e| err(format!("`{self}`: {e}"))),
            Press::H2o { recent, .. } if !(0.0..=1.0).contains(&recent) => Err(err(format!(
                "`{self}`: recent = {recent} outside [0, 1] (the fraction of kept entries that are the newest)"
            ))),
            Press::A2sf { f, .. } if !(0.0..=1.0).contains(&f) => Err(err(format!(
                "`{self}`: forgetting factor f = {f} outside [0, 1]"
            ))),
            Press::SnapKv { window, kernel, .. } | Press::Pyramid { window, kernel, .. }
                if window == 0 || kernel == 0 || kernel % 2 == 0 =>
            {
                Err(err(format!(
                    "`{self}`: window must be >= 1 and kernel odd and >= 1"
                )))
            }
            Press::Pyramid { beta, .. } if !(beta >= 1.0 && beta.is_finite()) => Err(err(format!(
                "`{self}`: beta = {beta} must be >= 1 (the first layer's budget over the last's)"
            ))),
            _ => Ok(()),
        }
    }

    /// The budget fraction of layer `layer` of `layers` (PyramidKV's per-layer budget; the
    /// press's budget for the others; None for streaming and duo).
    pub fn layer_budget(&self, layer: usize, layers: usize) -> Option<f64> {
        match *self {
            Press::Pyramid { budget, beta, .. } if layers > 1 => {
                let s = (beta - 1.0) / (beta + 1.0);
                let x = 1.0 - 2.0 * layer as f64 / (layers - 1) as f64;
                Some((budget * (1.0 + s * x)).min(1.0))
            }
            _ => self.budget(),
        }
    }

    /// The budget fraction (None for streaming and duo).
    pub fn budget(&self) -> Option<f64> {
        match *self {
            Press::Streaming { .. } | Press::Duo { .. } => None,
            Press::H2o { budget, .. }
            | Press::A2sf { budget, .. }
            | Press::SnapKv { budget, .. }
            | Press::Pyramid { budget, .. }
            | Press::Tova { budget, .. }
            | Press::Knorm { budget } => Some(budget),
        }
    }

    /// The scores this press ranks by (None: it needs none).
    pub fn score_kind(&self) -> Option<ScoreKind> {
        match *self {
            Press::Streaming { .. } | Press::Duo { .. } | Press::Knorm { .. } => None,
            Press::H2o { .. } => Some(ScoreKind::H2o),
            Press::A2sf { f, .. } => Some(ScoreKind::A2sf(f as f32)),
            Press::SnapKv { window, .. } | Press::Pyramid { window, .. } => {
                Some(ScoreKind::SnapKv(window))
            }
            Press::Tova { .. } => Some(ScoreKind::Tova),
        }
    }

    /// Entries a head keeps when the sequence has seen `seq_len` positions and `headroom` more
    /// are about to be appended (module documentation).
    pub fn target(&self, seq_len: usize, headroom: usize) -> usize {
        self.layer_target(seq_len, headroom, 0, 1)
    }

    /// [`Press::target`] for layer `layer` of `layers` (PyramidKV's budgets differ by layer).
    pub fn layer_target(
        &self,
        seq_len: usize,
        headroom: usize,
        layer: usize,
        layers: usize,
    ) -> usize {
        match *self {
            Press::Streaming { sinks, window } | Press::Duo { sinks, window, .. } => {
                (sinks + window).saturating_sub(headroom)
            }
            Press::Pyramid {
                budget,
                window,
                beta,
                counts: LayerCounts::Kvpress,
                ..
            } => {
                // kvpress's PyramidKV budgets, our beta being its first-to-last ratio.
                let l = (seq_len + headroom) as f64;
                let c = budget * l;
                let s = (beta - 1.0) / (beta + 1.0);
                let (mut hi, mut lo) = (c * (1.0 + s), c * (1.0 - s));
                let w = window as f64;
                if hi >= l - w {
                    hi = l - w;
                    lo = 2.0 * c - hi;
                }
                let n = if !(l >= hi && hi >= lo && lo >= w) {
                    c.round().max(1.0)
                } else if layers > 1 {
                    (hi - layer as f64 * (hi - lo) / (layers - 1) as f64).round()
                } else {
                    hi.round()
                };
                (n as usize).saturating_sub(headroom)
            }
            _ => {
                let b = self.layer_budget(layer, layers).expect("budget presses");
                let n = (b * (seq_len + headroom) as f64).ceil() as usize;
                n.saturating_sub(headroom)
            }
        }
    }
}

impl fmt::Display for Press {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Press::Streaming { sinks, window } => {
                write!(f, "streaming(sinks={sinks},window={window})")
            }
            Press::H2o {
                budget,
                recent,
                score,
            } => {
                write!(f, "h2o(budget={budget}")?;
                if recent != 0.5 {
                    write!(f, ",recent={recent}")?;
                }
                if score == Accum::Mean {
                    write!(f, ",score=mean")?;
                }
                write!(f, ")")
            }
            Press::A2sf { budget, f: ff } => write!(f, "a2sf(budget={budget},f={ff})"),
            Press::SnapKv {
                budget,
                window,
                kernel,
                pool,
            } => {
                write!(f, "snapkv(budget={budget},window={window},kernel={kernel}")?;
                write_pool(f, pool)
            }
            Press::Pyramid {
                budget,
                window,
                kernel,
                beta,
                pool,
                counts,
            } => {
                write!(
                    f,
                    "pyramid(budget={budget},window={window},kernel={kernel},beta={beta}"
                )?;
                if counts == LayerCounts::Kvpress {
                    write!(f, ",counts=kvpress")?;
                }
                write_pool(f, pool)
            }
            Press::Duo {
                sinks,
                window,
                select,
            } => {
                write!(f, "duo(sinks={sinks},window={window}")?;
                if let Some(s) = select {
                    write!(f, ",{s}")?;
                }
                write!(f, ")")
            }
            Press::Tova { budget, heads } => {
                write!(f, "tova(budget={budget}")?;
                if heads == Heads::Layer {
                    write!(f, ",heads=layer")?;
                }
                write!(f, ")")
            }
            Press::Knorm { budget } => write!(f, "knorm(budget={budget})"),
        }
    }
}

/// `,pool=avg)` or `)` (max pooling is the default and not printed).
fn write_pool(f: &mut fmt::Formatter<'_>, pool: Pool) -> fmt::Result {
    match pool {
        Pool::Max => write!(f, ")"),
        Pool::Avg => write!(f, ",pool=avg)"),
    }
}

/// The `n` entries ranked first by `score` (descending; equal scores: the newer entry first)
/// among `candidates`, returned in ascending order. Entries past the end of `score` (appended
/// since the last fold) score 0. Fast path: a partial selection.
pub fn top_entries(candidates: std::ops::Range<usize>, score: &[f32], n: usize) -> Vec<usize> {
    let at = |j: usize| score.get(j).copied().unwrap_or(0.0);
    let mut c: Vec<usize> = candidates.collect();
    if n < c.len() {
        let rank = |a: &usize, b: &usize| at(*b).total_cmp(&at(*a)).then(b.cmp(a));
        if n > 0 {
            c.select_nth_unstable_by(n - 1, rank);
        }
        c.truncate(n);
    }
    c.sort_unstable();
    c
}

/// The plain reference of [`top_entries`]: every candidate sorted by the same order.
pub fn top_entries_reference(
    candidates: std::ops::Range<usize>,
    score: &[f32],
    n: usize,
) -> Vec<usize> {
    let at = |j: usize| score.get(j).copied().unwrap_or(0.0);
    let mut c: Vec<usize> = candidates.collect();
    c.sort_by(|a, b| at(*b).total_cmp(&at(*a)).then(b.cmp(a)));
    c.truncate(n);
    c.sort_unstable();
    c
}

/// What one head offers a policy: its entry count, the keep target, its scores and (knorm) keys.
pub struct HeadInput<'a> {
    pub len: usize,
    pub n: usize,
    pub scores: &'a [f32],
    /// `[len, D]` keys (read only by the policies that need them).
    pub keys: &'a [f32],
    pub head_dim: usize,
}

/// The keep set of one head under a press (fast path): strictly increasing entry indices.
pub fn keep(press: &Press, h: &HeadInput) -> Vec<usize> {
    if h.n >= h.len {
        return (0..h.len).collect();
    }
    match *press {
        Press::Streaming { sinks, .. } | Press::Duo { sinks, .. } => {
            // n = S + W - headroom: the sinks, then the newest n - S (a duo streaming head).
            let s = sinks.min(h.n);
            streaming::keep(h.len, s, h.n - s)
        }
        Press::H2o { recent, .. } => h2o::keep(h.len, h.n, h.scores, recent),
        Press::A2sf { .. } => a2sf::keep(h.len, h.n, h.scores),
        Press::SnapKv {
            window,
            kernel,
            pool,
            ..
        }
        | Press::Pyramid {
            window,
            kernel,
            pool,
            ..
        } => snapkv::keep(h.len, h.n, h.scores, window, kernel, pool),
        Press::Tova { heads, .. } => tova::keep(h.len, h.n, h.scores, heads == Heads::Layer),
        Press::Knorm { .. } => knorm::keep(h.len, h.n, h.keys, h.head_dim),
    }
}

/// The keep set of one head from each policy's plain reference.
pub fn keep_reference(press: &Press, h: &HeadInput) -> Vec<usize> {
    if h.n >= h.len {
        return (0..h.len).collect();
    }
    match *press {
        Press::Streaming { sinks, .. } | Press::Duo { sinks, .. } => {
            let s = sinks.min(h.n);
            streaming::keep_reference(h.len, s, h.n - s)
        }
        Press::H2o { recent, .. } => h2o::keep_reference(h.len, h.n, h.scores, recent),
        Press::A2sf { .. } => a2sf::keep_reference(h.len, h.n, h.scores),
        Press::SnapKv {
            window,
            kernel,
            pool,
            ..
        }
        | Press::Pyramid {
            window,
            kernel,
            pool,
            ..
        } => snapkv::keep_reference(h.len, h.n, h.scores, window, kernel, pool),
        Press::Tova { heads, .. } => {
            tova::keep_reference(h.len, h.n, h.scores, heads == Heads::Layer)
        }
        Press::Knorm { .. } => knorm::keep_reference(h.len, h.n, h.keys, h.head_dim),
    }
}

/// The value each entry of one head is ranked by (larger kept first; `+inf` for the entries
/// the press keeps whatever their score: SnapKV's window, H2O's recent entries, TOVA's latest
/// with `heads=layer`), one per entry: SnapKV / PyramidKV the pooled window attention, H2O /
/// A2SF / TOVA the scores given, key-norm `-|k|^2`. Empty for streaming and duo (no scores).
pub fn ranks(press: &Press, h: &HeadInput) -> Vec<f32> {
    let at = |j: usize| h.scores.get(j).copied().unwrap_or(0.0);
    let forced_from = |from: usize| -> Vec<f32> {
        (0..h.len)
            .map(|j| if j >= from { f32::INFINITY } else { at(j) })
            .collect()
    };
    let n = h.n.min(h.len);
    match *press {
        Press::Streaming { .. } | Press::Duo { .. } => Vec::new(),
        Press::H2o { recent, .. } => forced_from(h.len - h2o::recent_len(n, recent)),
        Press::A2sf { .. } => forced_from(h.len),
        Press::Tova { heads, .. } => {
            forced_from(h.len - usize::from(heads == Heads::Layer && h.len > 0))
        }
        Press::SnapKv {
            window,
            kernel,
            pool,
            ..
        }
        | Press::Pyramid {
            window,
            kernel,
            pool,
            ..
        } => {
            let (older, _) = snapkv::split(h.len, n, window);
            let mut r = snapkv::pooled(older, h.scores, kernel, pool);
            r.resize(h.len, f32::INFINITY);
            r
        }
        Press::Knorm { .. } => knorm::neg_norms(h.len, h.keys, h.head_dim),
    }
}

/// TOVA with `heads=layer`: the mean over the layer's KV heads of their scores (each already
/// reduced over its group), which needs the heads to hold the same entries.
fn layer_mean(cache: &PagedKvCache, id: SeqId, s: &KvScores, layer: usize) -> Result<Vec<f32>> {
    let hk = cache.config().kv_heads;
    let pos0 = cache.positions(id, layer, 0)?;
    for kh in 1..hk {
        if cache.positions(id, layer, kh)? != pos0 {
            return Err(err(format!(
                "tova(heads=layer): layer {layer}'s KV heads hold different entries (one keep set per layer needs the same)"
            )));
        }
    }
    let mut m = vec![0.0f64; pos0.len()];
    for kh in 0..hk {
        for (x, &v) in m.iter_mut().zip(s.head(layer, kh)) {
            *x += v as f64;
        }
    }
    Ok(m.into_iter().map(|x| (x / hk as f64) as f32).collect())
}

/// What a compression did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressReport {
    /// Entries held per `[layer * Hk + KV head]` afterwards.
    pub kept: Vec<usize>,
    /// Pages returned to the free list.
    pub pages_freed: usize,
}

/// Compresses every (layer, KV head) of sequence `id` under `press`, leaving room for `headroom`
/// positions about to be appended (0 after a prefill, 1 between decode steps). `scores` must be
/// the running scores the press ranks by (collected with its [`Press::score_kind`]) and are
/// compacted with the entries. Every keep set is computed and checked before anything changes:
/// an error leaves the cache and the scores as they were.
pub fn compress(
    cache: &mut PagedKvCache,
    id: SeqId,
    press: &Press,
    scores: Option<&mut KvScores>,
    headroom: usize,
) -> Result<CompressReport> {
    compress_with(cache, id, press, scores, headroom, None, None, None)
}

/// The keep sets a compression would apply, per `[layer * Hk + KV head]` (entry indices,
/// increasing), with (when `with_ranks`) the value each entry is ranked by ([`ranks`]) and,
/// under merging, the residual slot's entry of every head that evicts (before compaction).
#[derive(Clone, Debug, PartialEq)]
pub struct KeepPlan {
    pub keeps: Vec<Vec<usize>>,
    pub ranks: Vec<Vec<f32>>,
    pub slots: Vec<Option<usize>>,
}

/// Every head's keep set under `press` (what [`compress_with`] applies), checked against the
/// cache; nothing changes. `with_ranks` also returns the values the press ranked; `merge` plans
/// LOOK-M-style merging with these residual slots ([`merge::keep_with_slot`]); `targets`, one
/// per layer, replace the press's own entry counts ([`Press::layer_target`]; [`shared_targets`]).
#[allow(clippy::too_many_arguments)]
pub fn plan(
    cache: &PagedKvCache,
    id: SeqId,
    press: &Press,
    scores: Option<&KvScores>,
    headroom: usize,
    roles: Option<&HeadRoles>,
    with_ranks: bool,
    merge: Option<&merge::MergeSlots>,
    targets: Option<&[usize]>,
) -> Result<KeepPlan> {
    press.check()?;
    let c = cache.config();
    if let Some(m) = merge {
        if m.slots.len() != c.layers * c.kv_heads {
            return Err(err(format!(
                "merge slots of {} heads for a cache of {} layers x {} KV heads",
                m.slots.len(),
                c.layers,
                c.kv_heads
            )));
        }
    }
    if let Press::Duo { .. } = press {
        let r = roles.ok_or_else(|| {
            err(format!(
                "`{press}` needs the head role table (kv::roles::probe on the model, or roles=FILE from `longattn kv roles`); none was given"
            ))
        })?;
        r.check(c.layers, c.kv_heads)?;
    }
    let seq_len = cache.len(id)?;
    match (press.score_kind(), scores) {
        (Some(kind), None) => {
            return Err(err(format!(
                "`{press}` ranks entries by {kind:?} scores, which were not collected (KvScores::new with ScoreKind::{kind:?}, observed every step)"
            )))
        }
        (Some(kind), Some(s)) if kind != s.kind => {
            return Err(err(format!(
                "`{press}` ranks entries by {kind:?} scores, the scores given are {:?}",
                s.kind
            )))
        }
        _ => {}
    }
    if let Some(s) = scores {
        if s.scores.len() != c.layers * c.kv_heads {
            return Err(err(format!(
                "scores of {} heads for a cache of {} layers x {} KV heads",
                s.scores.len(),
                c.layers,
                c.kv_heads
            )));
        }
    }
    let mut keeps = Vec::with_capacity(c.layers * c.kv_heads);
    let mut all_ranks = Vec::new();
    let mut slots = Vec::with_capacity(c.layers * c.kv_heads);
    if let Some(t) = targets {
        if t.len() != c.layers {
            return Err(err(format!(
                "{} layer targets for a cache of {} layers",
                t.len(),
                c.layers
            )));
        }
    }
    for l in 0..c.layers {
        let n = match targets {
            Some(t) => t[l],
            None => press.layer_target(seq_len, headroom, l, c.layers),
        };
        let layer_mean = match (press, scores) {
            (
                Press::Tova {
                    heads: Heads::Layer,
                    ..
                },
                Some(s),
            ) => Some(layer_mean(cache, id, s, l)?),
            _ => None,
        };
        for kh in 0..c.kv_heads {
            let len = cache.head_len(id, l, kh)?;
            let retrieval =
                matches!((press, roles), (Press::Duo { .. }, Some(r)) if r.is_retrieval(l, kh));
            let n = if retrieval { len } else { n };
            // Streaming's sinks are positions 0 .. S - 1, held as the head's first entries
            // unless they were dropped (a sliding-window layer, `drop_dead`): then only the
            // sinks still held are kept as such, and the window keeps its own length.
            let held_press;
            let (press, n) = match *press {
                Press::Streaming { sinks, window } | Press::Duo { sinks, window, .. }
                    if !retrieval =>
                {
                    let pos = cache.positions(id, l, kh)?;
                    let held = pos.iter().take_while(|&&p| (p as usize) < sinks).count();
                    held_press = Press::Streaming {
                        sinks: held,
                        window,
                    };
                    (&held_press, n.saturating_sub(sinks - held))
                }
                _ => (press, n),
            };
            let sc: &[f32] = match scores {
                Some(s) if press.score_kind().is_some() => s.head(l, kh),
                _ => &[],
            };
            if sc.len() > len {
                return Err(err(format!(
                    "layer {l} KV head {kh}: {} scores for {len} entries (scores out of step with the cache)",
                    sc.len()
                )));
            }
            let keys = match press {
                Press::Knorm { .. } if n < len || with_ranks => cache.gather_head(id, l, kh)?.0,
                _ => Vec::new(),
            };
            // The values ranked: h2o(score=mean) divides by the queries that saw each entry
            // (L - pos under a causal mask); tova(heads=layer) ranks by the layer's mean.
            let mean_of_seen;
            let sc: &[f32] = match (press, &layer_mean) {
                (_, Some(m)) => m,
                (
                    Press::H2o {
                        score: Accum::Mean, ..
                    },
                    _,
                ) => {
                    let pos = cache.positions(id, l, kh)?;
                    mean_of_seen = sc
                        .iter()
                        .zip(&pos)
                        .map(|(&x, &p)| x / (seq_len - p as usize) as f32)
                        .collect::<Vec<f32>>();
                    &mean_of_seen
                }
                _ => sc,
            };
            let h = HeadInput {
                len,
                n,
                scores: sc,
                keys: &keys,
                head_dim: c.head_dim,
            };
            let (k, slot) = match merge {
                Some(m) if n >= 1 && n < len => {
                    if cache.head_quantized(id, l, kh)? > 0 {
                        return Err(err(format!(
                            "layer {l} KV head {kh} holds quantized entries: merging needs every entry in full precision"
                        )));
                    }
                    let old = m.slots[l * c.kv_heads + kh].map(|s| s.entry);
                    if let Some(e) = old.filter(|&e| e >= len) {
                        return Err(err(format!(
                            "layer {l} KV head {kh}: merge slot at entry {e} of {len} (slots out of step with the cache)"
                        )));
                    }
                    let (k, e) = merge::keep_with_slot(press, &h, old);
                    (k, Some(e))
                }
                _ => (keep(press, &h), None),
            };
            cache.check_keep(id, l, kh, &k)?;
            if with_ranks {
                all_ranks.push(ranks(press, &h));
            }
            keeps.push(k);
            slots.push(slot);
        }
    }
    Ok(KeepPlan {
        keeps,
        ranks: all_ranks,
        slots,
    })
}

/// The first position a query to come can see in a layer whose window is `w` keys (the query
/// included), `seq_len` positions in: the next query sits at `seq_len`.
fn first_live(seq_len: usize, w: usize) -> usize {
    (seq_len + 1).saturating_sub(w.max(1))
}

/// Drops, from every layer that attends over a sliding window, the entries of sequence `id` that
/// no query to come can see: `windows[l] = Some(W)` (W keys per query, the query included) means
/// a query at position p sees positions p - W + 1 ..= p, and the next query is at the sequence's
/// length L, so an entry at a position below L - W + 1 is dead for good. Exact: the attention of
/// every later query is unchanged, and their pages go back to the pool. `scores` and merging's
/// `slots` follow the cache (a dead slot is forgotten). Layers past `windows` and `None` keep
/// everything. Everything is checked before anything changes. Returns the pages freed.
pub fn drop_dead(
    cache: &mut PagedKvCache,
    id: SeqId,
    windows: &[Option<usize>],
    mut scores: Option<&mut KvScores>,
    mut slots: Option<&mut merge::MergeSlots>,
) -> Result<usize> {
    let c = cache.config();
    let seq_len = cache.len(id)?;
    let mut cuts = Vec::new();
    for (l, w) in windows.iter().enumerate().take(c.layers) {
        let Some(w) = *w else { continue };
        let first_live = first_live(seq_len, w);
        if first_live == 0 {
            continue;
        }
        for kh in 0..c.kv_heads {
            let pos = cache.positions(id, l, kh)?;
            if pos.iter().all(|&p| p as usize >= first_live) {
                continue;
            }
            let keep: Vec<usize> = (0..pos.len())
                .filter(|&e| pos[e] as usize >= first_live)
                .collect();
            cache.check_keep(id, l, kh, &keep)?;
            cuts.push((l, kh, keep));
        }
    }
    // Everything checked: apply.
    let mut freed = 0;
    for (l, kh, keep) in cuts {
        freed += cache.compress(id, l, kh, &keep)?;
        if let Some(s) = scores.as_deref_mut() {
            s.compact(l, kh, &keep);
        }
        if let Some(m) = slots.as_deref_mut() {
            let i = l * c.kv_heads + kh;
            m.slots[i] = m.slots[i].take().and_then(|s| {
                keep.binary_search(&s.entry).ok().map(|entry| merge::Slot {
                    entry,
                    weight: s.weight,
                })
            });
        }
    }
    Ok(freed)
}

/// Per-layer entry counts with the budget shared over the layers (`+share`): a layer with a
/// sliding window (`windows[l] = Some(W)`) can use at most its live entries (positions >=
/// L - W + 1, [`drop_dead`]), so of its heads' counts under `press` the part beyond what each
/// head holds live goes, in equal shares, to every head of the layers without a window. The
/// total over all heads never exceeds the press's own; with no window, or no layer without
/// one, the press's counts are returned unchanged.
pub fn shared_targets(
    cache: &PagedKvCache,
    id: SeqId,
    press: &Press,
    headroom: usize,
    windows: &[Option<usize>],
) -> Result<Vec<usize>> {
    let c = cache.config();
    let seq_len = cache.len(id)?;
    let mut t: Vec<usize> = (0..c.layers)
        .map(|l| press.layer_target(seq_len, headroom, l, c.layers))
        .collect();
    let windowed = |l: usize| windows.get(l).copied().flatten();
    let open = (0..c.layers).filter(|&l| windowed(l).is_none()).count();
    if open == 0 || open == c.layers {
        return Ok(t);
    }
    let mut spare = 0usize;
    for (l, &n) in t.iter().enumerate() {
        let Some(w) = windowed(l) else { continue };
        let first_live = first_live(seq_len, w);
        for kh in 0..c.kv_heads {
            let live = cache
                .positions(id, l, kh)?
                .iter()
                .filter(|&&p| p as usize >= first_live)
                .count();
            spare += n.saturating_sub(live);
        }
    }
    let extra = spare / (open * c.kv_heads);
    for (l, n) in t.iter_mut().enumerate() {
        if windowed(l).is_none() {
            *n += extra;
        }
    }
    Ok(t)
}

/// A merging head's slot after compression: (entry before compaction, K, V, weight).
type MergedSlot = (usize, Vec<f32>, Vec<f32>, f64);

/// As [`compress`] with the head role table `roles` that `duo` needs (retrieval heads keep
/// every entry, the others are cut as streaming heads; ignored by the other presses), and with
/// `merge` the residual slots of LOOK-M-style merging ([`merge`]: evicted entries are folded into
/// one slot per head instead of dropped; the slots are updated with the cache). Everything is
/// planned and the merged values computed before anything changes. `targets` as for [`plan`].
#[allow(clippy::too_many_arguments)]
pub fn compress_with(
    cache: &mut PagedKvCache,
    id: SeqId,
    press: &Press,
    mut scores: Option<&mut KvScores>,
    headroom: usize,
    roles: Option<&HeadRoles>,
    mut merge: Option<&mut merge::MergeSlots>,
    targets: Option<&[usize]>,
) -> Result<CompressReport> {
    let KeepPlan { keeps, slots, .. } = plan(
        cache,
        id,
        press,
        scores.as_deref(),
        headroom,
        roles,
        false,
        merge.as_deref(),
        targets,
    )?;
    let c = cache.config();
    // The merged slots' values (reads only) per merging head.
    let mut merged: Vec<Option<MergedSlot>> = vec![None; keeps.len()];
    for (i, (k, slot)) in keeps.iter().zip(&slots).enumerate() {
        let (Some(e), Some(m)) = (*slot, merge.as_deref()) else {
            continue;
        };
        let (l, kh) = (i / c.kv_heads, i % c.kv_heads);
        let len = cache.head_len(id, l, kh)?;
        let (hk, hv, _) = cache.gather_head(id, l, kh)?;
        let old = m.slots[i].filter(|s| s.entry == e);
        let w_old = old.map_or(0.0, |s| s.weight);
        let mut is_kept = vec![false; len];
        for &j in k {
            is_kept[j] = true;
        }
        // A new slot's own entry is merged too (W = 0).
        let evicted: Vec<usize> = (0..len)
            .filter(|&j| !is_kept[j] || (j == e && old.is_none()))
            .collect();
        let sc: &[f32] = match scores.as_deref() {
            Some(s) if press.score_kind().is_some() => s.head(l, kh),
            _ => &[],
        };
        let weights: Vec<f64> = evicted
            .iter()
            .map(|&j| match press.score_kind() {
                Some(_) => sc.get(j).copied().unwrap_or(0.0) as f64,
                None => 1.0,
            })
            .collect();
        let (mk, mv, total) = merge::merged_values(
            (e, w_old),
            &evicted,
            &weights,
            (&hk, &hv),
            (c.head_dim, c.v_dim),
        );
        merged[i] = Some((e, mk, mv, total));
    }
    // Everything checked: apply (infallible from here on).
    let mut pages_freed = 0;
    let mut kept = Vec::with_capacity(keeps.len());
    for (i, k) in keeps.iter().enumerate() {
        let (l, kh) = (i / c.kv_heads, i % c.kv_heads);
        if k.len() < cache.head_len(id, l, kh)? {
            if let Some((e, mk, mv, _)) = &merged[i] {
                cache.set_entry(id, l, kh, *e, mk, mv)?;
            }
            pages_freed += cache.compress(id, l, kh, k)?;
            if let Some(s) = scores.as_deref_mut() {
                s.compact(l, kh, k);
            }
            if let Some(m) = merge.as_deref_mut() {
                m.slots[i] = merged[i].as_ref().map(|(e, _, _, w)| merge::Slot {
                    entry: k.binary_search(e).expect("the slot is kept"),
                    weight: *w,
                });
            }
        }
        kept.push(k.len());
    }
    Ok(CompressReport { kept, pages_freed })
}

#[cfg(test)]
mod tests;
