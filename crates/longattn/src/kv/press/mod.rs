//! KV-cache compression policies ("presses"): which entries of each (layer, KV head) to keep.
//!
//! A press is parsed from `name(key=value,...)`:
//!
//! | spec | keeps (n = the head's budget, see below) | scores |
//! |---|---|---|
//! | `streaming(sinks=S,window=W)` | the first S entries and the last W | none |
//! | `h2o(budget=B)` | the n/2 newest, then the heaviest by accumulated attention | H2O |
//! | `a2sf(budget=B,f=F)` | the n heaviest by attention accumulated with forgetting factor F | A2SF |
//! | `snapkv(budget=B,window=W,kernel=K)` | the last W, then the heaviest by the window's attention max-pooled over K neighbours | SnapKV(W) |
//! | `pyramid(budget=B,window=W,kernel=K,beta=R)` | SnapKV's choice with a budget per layer (PyramidKV, below) | SnapKV(W) |
//! | `duo(sinks=S,window=W,ratio=F \| threshold=T)` | retrieval heads: everything; streaming heads: the first S and the last W (roles from a probe, [`crate::kv::roles`]) | none |
//! | `tova(budget=B)` | the n most attended by the latest query | TOVA |
//! | `knorm(budget=B)` | the n keys of smallest L2 norm | none |
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

/// A compression policy (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Press {
    Streaming {
        sinks: usize,
        window: usize,
    },
    H2o {
        budget: f64,
    },
    A2sf {
        budget: f64,
        f: f64,
    },
    SnapKv {
        budget: f64,
        window: usize,
        kernel: usize,
    },
    Pyramid {
        budget: f64,
        window: usize,
        kernel: usize,
        beta: f64,
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
        "h2o" | "tova" | "knorm" => &[("budget", None)],
        "a2sf" => &[("budget", None), ("f", Some(0.95))],
        "snapkv" => &[
            ("budget", None),
            ("window", Some(32.0)),
            ("kernel", Some(5.0)),
        ],
        "pyramid" => &[
            ("budget", None),
            ("window", Some(32.0)),
            ("kernel", Some(5.0)),
            ("beta", Some(5.0)),
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
            },
            "a2sf" => Press::A2sf {
                budget: arg("budget")?,
                f: arg("f")?,
            },
            "snapkv" => Press::SnapKv {
                budget: arg("budget")?,
                window: int("window")?,
                kernel: int("kernel")?,
            },
            "pyramid" => Press::Pyramid {
                budget: arg("budget")?,
                window: int("window")?,
                kernel: int("kernel")?,
                beta: arg("beta")?,
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
            Press::H2o { budget }
            | Press::A2sf { budget, .. }
            | Press::SnapKv { budget, .. }
            | Press::Pyramid { budget, .. }
            | Press::Tova { budget }
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
            Press::H2o { budget } => write!(f, "h2o(budget={budget})"),
            Press::A2sf { budget, f: ff } => write!(f, "a2sf(budget={budget},f={ff})"),
            Press::SnapKv {
                budget,
                window,
                kernel,
            } => write!(f, "snapkv(budget={budget},window={window},kernel={kernel})"),
            Press::Pyramid {
                budget,
                window,
                kernel,
                beta,
            } => write!(
                f,
                "pyramid(budget={budget},window={window},kernel={kernel},beta={beta})"
            ),
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
            Press::Tova { budget } => write!(f, "tova(budget={budget})"),
            Press::Knorm { budget } => write!(f, "knorm(budget={budget})"),
        }
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
        Press::H2o { .. } => h2o::keep(h.len, h.n, h.scores),
        Press::A2sf { .. } => a2sf::keep(h.len, h.n, h.scores),
        Press::SnapKv { window, kernel, .. } | Press::Pyramid { window, kernel, .. } => {
            snapkv::keep(h.len, h.n, h.scores, window, kernel)
        }
        Press::Tova { .. } => tova::keep(h.len, h.n, h.scores),
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
        Press::H2o { .. } => h2o::keep_reference(h.len, h.n, h.scores),
        Press::A2sf { .. } => a2sf::keep_reference(h.len, h.n, h.scores),
        Press::SnapKv { window, kernel, .. } | Press::Pyramid { window, kernel, .. } => {
            snapkv::keep_reference(h.len, h.n, h.scores, window, kernel)
        }
        Press::Tova { .. } => tova::keep_reference(h.len, h.n, h.scores),
        Press::Knorm { .. } => knorm::keep_reference(h.len, h.n, h.keys, h.head_dim),
    }
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
    compress_with(cache, id, press, scores, headroom, None)
}

/// As [`compress`] with the head role table `roles` that `duo` needs (retrieval heads keep
/// every entry, the others are cut as streaming heads); ignored by the other presses.
pub fn compress_with(
    cache: &mut PagedKvCache,
    id: SeqId,
    press: &Press,
    mut scores: Option<&mut KvScores>,
    headroom: usize,
    roles: Option<&HeadRoles>,
) -> Result<CompressReport> {
    press.check()?;
    let c = cache.config();
    if let Press::Duo { .. } = press {
        let r = roles.ok_or_else(|| {
            err(format!(
                "`{press}` needs the head role table (kv::roles::probe on the model, or roles=FILE from `longattn kv roles`); none was given"
            ))
        })?;
        r.check(c.layers, c.kv_heads)?;
    }
    let seq_len = cache.len(id)?;
    match (press.score_kind(), scores.as_deref()) {
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
    if let Some(s) = scores.as_deref() {
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
    for l in 0..c.layers {
        let n = press.layer_target(seq_len, headroom, l, c.layers);
        for kh in 0..c.kv_heads {
            let len = cache.head_len(id, l, kh)?;
            let n = match (press, roles) {
                (Press::Duo { .. }, Some(r)) if r.is_retrieval(l, kh) => len,
                _ => n,
            };
            let sc: &[f32] = match scores.as_deref() {
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
                Press::Knorm { .. } if n < len => cache.gather_head(id, l, kh)?.0,
                _ => Vec::new(),
            };
            let k = keep(
                press,
                &HeadInput {
                    len,
                    n,
                    scores: sc,
                    keys: &keys,
                    head_dim: c.head_dim,
                },
            );
            cache.check_keep(id, l, kh, &k)?;
            keeps.push(k);
        }
    }
    // Everything checked: apply (infallible from here on).
    let mut pages_freed = 0;
    let mut kept = Vec::with_capacity(keeps.len());
    for (i, k) in keeps.iter().enumerate() {
        let (l, kh) = (i / c.kv_heads, i % c.kv_heads);
        if k.len() < cache.head_len(id, l, kh)? {
            pages_freed += cache.compress(id, l, kh, k)?;
            if let Some(s) = scores.as_deref_mut() {
                s.compact(l, kh, k);
            }
        }
        kept.push(k.len());
    }
    Ok(CompressReport { kept, pages_freed })
}

#[cfg(test)]
mod tests;
