//! `SparseSpec`: which block-selection method to run, parsed from `name(key=value,...)`.
//!
//! The grammar and the methods are described in the module header of [`crate::sparse`].
use crate::error::{Error, Result};
use std::fmt;

const OP: &str = "sparse spec";

/// A selection method and its budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// Pooled block scores, softmax over the key blocks of each query block, keep the most
    /// probable blocks until their cumulative mass reaches `gamma` (in (0, 1]).
    TopMass { gamma: f64 },
    /// Pooled block scores, keep the blocks whose probability is at least `alpha` (in [0, 1])
    /// times the row's largest.
    RelThresh { alpha: f64 },
    /// MoBA gating: the `topk` key blocks with the largest `mean(q_block) . mean(k_block)`, the
    /// current (diagonal) blocks always among them.
    Moba { topk: usize },
    /// MInference vertical-slash: the last `last` query rows estimate column and diagonal mass;
    /// the `v` heaviest columns, the `s` heaviest diagonals, the first `sink` columns and the
    /// diagonals `0 <= i - j < local` (aligned positions) are kept, coarsened to tiles.
    VerticalSlash {
        v: usize,
        s: usize,
        last: usize,
        sink: usize,
        local: usize,
    },
    /// FlexPrefill: per head, the last `last` query rows decide between query-aware blocks and
    /// vertical-slash by the square-root Jensen-Shannon distance of the pooled block estimate
    /// from the exact block distribution (query-aware when it is below `tau`); either pattern
    /// keeps its smallest set reaching cumulative mass `gamma`, and at least about `min_budget`
    /// keys per row: m = ceil(min_budget / block) tiles per query tile (query-aware), or m
    /// columns and m diagonals among those with mass (vertical-slash: a column costs at most one
    /// tile of a row once coarsened).
    FlexPrefill {
        gamma: f64,
        tau: f64,
        min_budget: usize,
        last: usize,
    },
    /// ProxyAttn: per KV group one proxy head (the mean of the group's queries) scores the key
    /// tiles from `rows` sampled rows of every query tile (exact softmax, token level), shared
    /// by the group; each head keeps, per query tile, as many tiles as its own last `last` rows
    /// need to reach mass `gamma` (as a share of the tiles they see), the proxy's best first.
    Proxy {
        gamma: f64,
        rows: usize,
        last: usize,
    },
    /// Query-tile columns (element level): per query tile, `rows` sampled rows of the head
    /// attend exactly to every allowed key; the keys with the most mean probability are kept
    /// for the whole tile until their mass reaches `gamma`, with the first `sink` keys and the
    /// diagonals `0 <= i - j < local`; the tiles they cross are Partial.
    /// `check` in [0, 1] (0: off): a head whose kept keys for its last query tile (from the
    /// sampled rows) hold less than `check` of the mass of all of that tile's rows keeps every
    /// tile of the document (its sampled rows do not speak for the others); with `check_gamma`
    /// in (0, 1] it first selects again with that gamma instead of `gamma` (a budget that grows
    /// for the heads whose mass is spread, short of every tile) and keeps every tile only if
    /// that fails the check too.
    ///
    /// `gathered=1`: the gathered form the CUDA forward runs ([`crate::sparse::columns`]): the
    /// cut rounded to 2^(1/16) mass bins, the band as whole key tiles, a query tile keeping more
    /// than half its candidate keys computes them all, the check over the computed pairs.
    ///
    /// `int8=1`: the sampled rows' logits from int8 queries and keys, `lowbit`'s quantization
    /// (K smoothed by its mean and scaled per 64-key group, each query row by its own scale;
    /// exact integer products): the estimate's products at twice the tensor cores' bf16 rate
    /// on the device (`sparse_columns.cu`'s `cl_logits8`). The check stays exact.
    Columns {
        gamma: f64,
        rows: usize,
        sink: usize,
        local: usize,
        check: f64,
        check_gamma: f64,
        gathered: bool,
        int8: bool,
    },
    /// Low-bit estimate (SALE's idea on this hardware, module `sparse::lowbit`): every allowed
    /// pair's logit estimated from int8 Q and K (K smoothed by its mean); a candidate tile is
    /// kept when some row has a key in it whose estimated logit is within ln(1 / `tau`) of the
    /// row's largest estimated logit over its first `sink` keys and its band
    /// `0 <= p_i - j < local`, and always when it holds such a sink or band pair.
    LowBit { tau: f64, sink: usize, local: usize },
    /// Low-bit estimate, each row its own keys (element level): the same int8 estimate of every
    /// allowed logit; every row keeps its first `sink` keys and its band `0 <= p_i - j < local`,
    /// then its other keys by estimated logit, highest first, until the kept keys hold `gamma`
    /// of the row's estimated softmax mass. The tiles they cross are Partial.
    LowBitMass {
        gamma: f64,
        sink: usize,
        local: usize,
    },
    /// No estimate: every tile of the mask (the `skip(factor=F)` spec: skip-softmax alone).
    Whole,
}

/// A parsed sparse spec: the method, the block (tile) size it selects at (used for both the
/// query and the key side of the schedule) and the dense fallback threshold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseSpec {
    pub method: Method,
    pub block: usize,
    /// Dense fallback: with fewer keys than this, [`crate::sparse::select`] keeps every tile of
    /// the mask and runs no estimator (argument `dense_below`; `None` when not given: the
    /// backend's default, [`DENSE_BELOW`] on the CPU, `sparse::cuda::CUDA_DENSE_BELOW` on CUDA;
    /// read it with [`SparseSpec::dense_below_or`]).
    pub dense_below: Option<usize>,
    /// Dense last rows (argument `dense_last=N` of every estimating method; default 0): the
    /// last N queries of every document keep every candidate: whole query tiles at tile level,
    /// those rows alone at element level (the rows that ask the question of a prompt, and the
    /// ones the next token is read from).
    pub dense_last: usize,
    /// Skip-softmax factor F (argument `skip=F` of any method, or the `skip(factor=F)` method):
    /// the forward through the selection drops key groups whose probabilities relative to the
    /// running maximum all fall below lambda = F / Sk ([`crate::AttnParams::skip_below`]).
    pub skip: Option<f64>,
    /// Element-level lines (argument `element=1` of `vertical_slash` and `flexprefill`; default
    /// 0): the kept columns and diagonals select single pairs, not the whole tiles they cross
    /// (the tiles become Partial, their bits from [`crate::sparse::Lines`]). `columns` is
    /// element level whatever this says ([`SparseSpec::element_level`]).
    pub element: bool,
    /// A second method whose tiles are added to the selection (the spec `A + B`): the
    /// selection keeps the pairs either keeps, B's tiles whole (under the mask). Both select at
    /// `block`; B takes no `element`, `skip` or `dense_below` of its own.
    pub with: Option<Method>,
}

/// Default of `dense_below`: below 1024 keys a 64-wide selection has at most 16 key tiles per
/// row, the estimate costs a sizeable part of the attention it would save, and the blocks that
/// must stay (sink, diagonal) already cover a large share of the row; sparsity cannot pay.
pub const DENSE_BELOW: usize = 1024;

/// The accepted arguments of each method with their defaults (in canonical order).
fn arguments(name: &str) -> Option<&'static [(&'static str, f64)]> {
    Some(match name {
        "topmass" => &[("gamma", 0.95), ("block", 64.0)],
        "relthresh" => &[("alpha", 0.5), ("block", 64.0)],
        "moba" => &[("block", 512.0), ("topk", 3.0)],
        "vertical_slash" => &[
            ("v", 1000.0),
            ("s", 6096.0),
            ("block", 64.0),
            ("last", 64.0),
            ("sink", 4.0),
            ("local", 64.0),
            ("element", 0.0),
        ],
        "flexprefill" => &[
            ("gamma", 0.9),
            ("tau", 0.1),
            ("min_budget", 256.0),
            ("block", 64.0),
            ("last", 64.0),
            ("element", 0.0),
        ],
        "proxy" => &[
            ("gamma", 0.9),
            ("rows", 4.0),
            ("block", 64.0),
            ("last", 64.0),
        ],
        "columns" => &[
            ("gamma", 0.9),
            ("rows", 4.0),
            ("block", 64.0),
            ("sink", 4.0),
            ("local", 64.0),
            ("check", 0.0),
            ("check_gamma", 0.0),
            ("gathered", 0.0),
            ("int8", 0.0),
        ],
        "lowbit" => &[
            ("tau", 0.02),
            ("block", 64.0),
            ("sink", 4.0),
            ("local", 64.0),
        ],
        "lowbit_mass" => &[
            ("gamma", 0.95),
            ("block", 64.0),
            ("sink", 4.0),
            ("local", 64.0),
        ],
        "skip" => &[("factor", 600.0), ("block", 64.0)],
        _ => return None,
    })
}

/// Arguments every method accepts, after its own (name, default).
/// `skip` = 0: no skip-softmax.
const COMMON: &[(&str, f64)] = &[
    ("dense_below", DENSE_BELOW as f64),
    ("skip", 0.0),
    ("dense_last", 0.0),
];

const KNOWN: &str =
    "topmass, relthresh, moba, vertical_slash, flexprefill, proxy, columns, lowbit, lowbit_mass, skip";

fn err(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

/// Splits `name(k=v,...)` (or a bare `name`) into the name and its `(key, value)` pairs; errors
/// name the operation `op` (shared by the specs that use this grammar).
pub(crate) fn split_call<'a>(
    op: &'static str,
    text: &'a str,
) -> Result<(&'a str, Vec<(&'a str, &'a str)>)> {
    let err = |msg: String| Error::Param { op, msg };
    let t = text.trim();
    let Some(open) = t.find('(') else {
        return Ok((t, Vec::new()));
    };
    let inner = t[open + 1..]
        .strip_suffix(')')
        .ok_or_else(|| err(format!("`{t}`: the arguments must end with `)`")))?;
    let mut args = Vec::new();
    for a in inner.split(',').map(str::trim) {
        if a.is_empty() {
            if inner.trim().is_empty() {
                break; // `name()`
            }
            return Err(err(format!("`{t}`: empty argument between commas")));
        }
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| err(format!("`{t}`: argument `{a}` is not `key=value`")))?;
        args.push((k.trim(), v.trim()));
    }
    Ok((t[..open].trim(), args))
}

/// Matches the `key=value` pairs `given` to `name`'s accepted `keys`: the value of each key
/// (None where not given). Errors (naming the operation `op`): an unknown key (the accepted ones
/// listed), a key given twice, a value that is not a finite number. Shared by the specs that use
/// this grammar.
pub(crate) fn assign_args(
    op: &'static str,
    name: &str,
    keys: &[&str],
    given: Vec<(&str, &str)>,
) -> Result<Vec<Option<f64>>> {
    let err = |msg: String| Error::Param { op, msg };
    let mut vals: Vec<Option<f64>> = vec![None; keys.len()];
    for (k, v) in given {
        let idx = keys.iter().position(|&a| a == k).ok_or_else(|| {
            err(format!(
                "`{name}`: unknown argument `{k}` (`{name}` takes {})",
                keys.join(", ")
            ))
        })?;
        if vals[idx].is_some() {
            return Err(err(format!("`{name}`: argument `{k}` given twice")));
        }
        let x: f64 = v
            .parse()
            .ok()
            .filter(|x: &f64| x.is_finite())
            .ok_or_else(|| err(format!("`{name}`: `{k}={v}` is not a finite number")))?;
        vals[idx] = Some(x);
    }
    Ok(vals)
}

impl SparseSpec {
    /// Whether `text` names a sparse method (its name before any `(` is one of the methods),
    /// so that a caller can tell a sparse spec from a mask expression.
    pub fn names_a_method(text: &str) -> bool {
        let t = text.trim();
        let name = t.find('(').map_or(t, |open| t[..open].trim());
        arguments(name).is_some()
    }

    /// Parses a spec (grammar in the [`crate::sparse`] module header): one method, or the
    /// union `A + B` of two.
    pub fn parse(text: &str) -> Result<SparseSpec> {
        // Split at a '+' outside parentheses (a number's exponent sign sits inside them).
        let mut depth = 0i32;
        let plus: Vec<usize> = text
            .char_indices()
            .filter_map(|(x, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    '+' if depth == 0 => return Some(x),
                    _ => {}
                }
                None
            })
            .collect();
        match plus[..] {
            [] => Self::parse_one(text),
            [x] => {
                let (a, b) = (
                    Self::parse_one(&text[..x])?,
                    Self::parse_one(&text[x + 1..])?,
                );
                a.union(b, text)
            }
            _ => Err(err(format!(
                "`{text}`: a union takes two methods (`A + B`), this has {}",
                plus.len() + 1
            ))),
        }
    }

    /// `self + b` (texts for errors): B's method joins, with the same block; B may not set
    /// `element`, `skip` or `dense_below` (they are the union's, given on A).
    fn union(self, b: SparseSpec, text: &str) -> Result<SparseSpec> {
        let refuse = |what: &str| {
            Err(err(format!(
                "`{text}`: {what} (the union's `dense_below`, `dense_last` and `skip` are given on its first method)"
            )))
        };
        if b.element || b.skip.is_some() || b.dense_below.is_some() || b.dense_last > 0 {
            return refuse(
                "the second method of a union takes no `element`, `skip`, `dense_below` or `dense_last`",
            );
        }
        if b.method == Method::Whole || self.method == Method::Whole {
            return refuse("`skip` keeps every tile: it is not a part of a union");
        }
        if b.block != self.block {
            return refuse(&format!(
                "both methods of a union select at one block size, here {} and {} (give `block` equal)",
                self.block, b.block
            ));
        }
        let spec = SparseSpec {
            with: Some(b.method),
            ..self
        };
        spec.check()?;
        Ok(spec)
    }

    fn parse_one(text: &str) -> Result<SparseSpec> {
        let (name, given) = split_call(OP, text)?;
        if name.is_empty() {
            return Err(err(format!("`{text}`: no method name (known: {KNOWN})")));
        }
        let own = arguments(name)
            .ok_or_else(|| err(format!("unknown method `{name}` (known: {KNOWN})")))?;
        let accepted: Vec<(&str, f64)> = own.iter().chain(COMMON).copied().collect();
        // Start from the defaults; each given argument replaces one, once.
        let keys: Vec<&str> = accepted.iter().map(|a| a.0).collect();
        let given = assign_args(OP, name, &keys, given)?;
        let seen: Vec<bool> = given.iter().map(Option::is_some).collect();
        let vals: Vec<f64> = given
            .iter()
            .zip(&accepted)
            .map(|(g, a)| g.unwrap_or(a.1))
            .collect();
        let arg = |key: &str| vals[accepted.iter().position(|a| a.0 == key).unwrap()];
        let int = |key: &str, min: usize| -> Result<usize> {
            let x = arg(key);
            if x.fract() != 0.0 || x < min as f64 || x > u32::MAX as f64 {
                return Err(err(format!(
                    "`{name}`: `{key}` must be an integer in [{min}, {}], got {x}",
                    u32::MAX
                )));
            }
            Ok(x as usize)
        };
        let method = match name {
            "topmass" => Method::TopMass {
                gamma: arg("gamma"),
            },
            "relthresh" => Method::RelThresh {
                alpha: arg("alpha"),
            },
            "moba" => Method::Moba {
                topk: int("topk", 1)?,
            },
            "flexprefill" => Method::FlexPrefill {
                gamma: arg("gamma"),
                tau: arg("tau"),
                min_budget: int("min_budget", 0)?,
                last: int("last", 1)?,
            },
            "proxy" => Method::Proxy {
                gamma: arg("gamma"),
                rows: int("rows", 1)?,
                last: int("last", 1)?,
            },
            "columns" => Method::Columns {
                gamma: arg("gamma"),
                rows: int("rows", 1)?,
                sink: int("sink", 0)?,
                local: int("local", 0)?,
                check: arg("check"),
                check_gamma: arg("check_gamma"),
                gathered: match arg("gathered") {
                    0.0 => false,
                    1.0 => true,
                    x => return Err(err(format!("`columns`: `gathered` is 0 or 1, got {x}"))),
                },
                int8: match arg("int8") {
                    0.0 => false,
                    1.0 => true,
                    x => return Err(err(format!("`columns`: `int8` is 0 or 1, got {x}"))),
                },
            },
            "lowbit" => Method::LowBit {
                tau: arg("tau"),
                sink: int("sink", 0)?,
                local: int("local", 0)?,
            },
            "lowbit_mass" => Method::LowBitMass {
                gamma: arg("gamma"),
                sink: int("sink", 0)?,
                local: int("local", 0)?,
            },
            "skip" => Method::Whole,
            _ => Method::VerticalSlash {
                v: int("v", 0)?,
                s: int("s", 0)?,
                last: int("last", 1)?,
                sink: int("sink", 0)?,
                local: int("local", 0)?,
            },
        };
        let skip_at = accepted.iter().position(|a| a.0 == "skip").unwrap();
        let skip = match name {
            "skip" if seen[skip_at] => {
                return Err(err(
                    "`skip`: give the factor as `factor=F` (`skip=F` is for the other methods)"
                        .into(),
                ))
            }
            "skip" => Some(arg("factor")),
            _ => Some(arg("skip")).filter(|&f| f != 0.0),
        };
        let spec = SparseSpec {
            method,
            block: int("block", 1)?,
            dense_last: int("dense_last", 0)?,
            dense_below: match seen[accepted.iter().position(|a| a.0 == "dense_below").unwrap()] {
                true => Some(int("dense_below", 0)?),
                false => None,
            },
            skip,
            element: match accepted.iter().position(|a| a.0 == "element") {
                Some(_) => match arg("element") {
                    0.0 => false,
                    1.0 => true,
                    x => {
                        return Err(err(format!(
                        "`{name}`: `element` must be 0 (whole tiles) or 1 (single pairs), got {x}"
                    )))
                    }
                },
                None => false,
            },
            with: None,
        };
        spec.check()?;
        Ok(spec)
    }

    /// Whether the selection keeps single pairs (`element=1`, or the `columns` and
    /// `lowbit_mass` methods).
    pub fn element_level(&self) -> bool {
        self.element
            || matches!(
                self.method,
                Method::Columns { .. } | Method::LowBitMass { .. }
            )
    }

    /// The dense-fallback length: the given `dense_below`, else the backend's `default`.
    pub fn dense_below_or(&self, default: usize) -> usize {
        self.dense_below.unwrap_or(default)
    }

    /// The skip-softmax threshold lambda = F / `sk` of a forward over `sk` keys (None without
    /// skip-softmax); errors when it would not be below 1 (F >= Sk).
    pub fn skip_below(&self, sk: usize) -> Result<Option<f32>> {
        let Some(f) = self.skip else {
            return Ok(None);
        };
        let lambda = f / sk.max(1) as f64;
        if lambda >= 1.0 {
            return Err(err(format!(
                "skip-softmax factor {f} over {sk} keys gives lambda = {lambda:.3} >= 1: the factor must be below the key count"
            )));
        }
        Ok(Some(lambda as f32))
    }

    /// Checks the fields (for specs built by hand rather than parsed).
    pub fn check(&self) -> Result<()> {
        if let Some(m) = self.with {
            if self.method == Method::Whole || m == Method::Whole {
                return Err(err("`skip` is not a part of a union".into()));
            }
            let b = SparseSpec {
                method: m,
                element: false,
                with: None,
                ..*self
            };
            b.check()?;
        }
        if self.block == 0 {
            return Err(err("`block` must be >= 1".into()));
        }
        if let Some(f) = self.skip {
            if !(f > 0.0 && f.is_finite()) {
                return Err(err(format!(
                    "the skip-softmax factor must be finite and > 0, got {f}"
                )));
            }
        }
        let lines = matches!(
            self.method,
            Method::VerticalSlash { .. } | Method::FlexPrefill { .. }
        );
        if self.element && !lines {
            return Err(err(format!(
                "`element` selects single pairs on kept columns and diagonals: only `vertical_slash` and `flexprefill` take it, not {:?}",
                self.method
            )));
        }
        match self.method {
            Method::TopMass { gamma } if !(gamma > 0.0 && gamma <= 1.0) => Err(err(format!(
                "`topmass`: `gamma` must be in (0, 1], got {gamma}"
            ))),
            Method::RelThresh { alpha } if !(0.0..=1.0).contains(&alpha) => Err(err(format!(
                "`relthresh`: `alpha` must be in [0, 1], got {alpha}"
            ))),
            Method::Moba { topk: 0 } => Err(err("`moba`: `topk` must be >= 1".into())),
            Method::VerticalSlash { last: 0, .. } => {
                Err(err("`vertical_slash`: `last` must be >= 1".into()))
            }
            Method::FlexPrefill { gamma, .. } if !(gamma > 0.0 && gamma <= 1.0) => Err(err(
                format!("`flexprefill`: `gamma` must be in (0, 1], got {gamma}"),
            )),
            // sqrt(JSD) with natural logarithms lies in [0, sqrt(ln 2)].
            Method::FlexPrefill { tau, .. } if !(0.0..=1.0).contains(&tau) => Err(err(format!(
                "`flexprefill`: `tau` must be in [0, 1], got {tau}"
            ))),
            Method::FlexPrefill { last: 0, .. } => {
                Err(err("`flexprefill`: `last` must be >= 1".into()))
            }
            Method::Proxy { gamma, .. } if !(gamma > 0.0 && gamma <= 1.0) => Err(err(format!(
                "`proxy`: `gamma` must be in (0, 1], got {gamma}"
            ))),
            Method::Proxy { rows: 0, .. } | Method::Proxy { last: 0, .. } => {
                Err(err("`proxy`: `rows` and `last` must be >= 1".into()))
            }
            Method::Columns { gamma, .. } if !(gamma > 0.0 && gamma <= 1.0) => Err(err(format!(
                "`columns`: `gamma` must be in (0, 1], got {gamma}"
            ))),
            Method::Columns { rows: 0, .. } => Err(err("`columns`: `rows` must be >= 1".into())),
            Method::Columns { check, .. } if !(0.0..=1.0).contains(&check) => Err(err(format!(
                "`columns`: `check` must be in [0, 1], got {check}"
            ))),
            Method::Columns { check_gamma, .. } if !(0.0..=1.0).contains(&check_gamma) => {
                Err(err(format!(
                    "`columns`: `check_gamma` must be in [0, 1] (0: every tile), got {check_gamma}"
                )))
            }
            Method::LowBit { tau, .. } if !(tau > 0.0 && tau.is_finite()) => Err(err(format!(
                "`lowbit`: `tau` must be finite and > 0, got {tau}"
            ))),
            Method::LowBitMass { gamma, .. } if !(gamma > 0.0 && gamma <= 1.0) => Err(err(
                format!("`lowbit_mass`: `gamma` must be in (0, 1], got {gamma}"),
            )),
            Method::Whole if self.skip.is_none() => Err(err(
                "`skip`: the method keeps every tile and needs its factor (skip = Some(F))".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// The canonical text of a method with its block (every argument spelled out).
fn method_text(m: Method, b: usize, skip: Option<f64>) -> (&'static str, String) {
    match m {
        Method::TopMass { gamma } => ("topmass", format!("gamma={gamma},block={b}")),
        Method::RelThresh { alpha } => ("relthresh", format!("alpha={alpha},block={b}")),
        Method::Moba { topk } => ("moba", format!("block={b},topk={topk}")),
        Method::VerticalSlash {
            v,
            s,
            last,
            sink,
            local,
        } => (
            "vertical_slash",
            format!("v={v},s={s},block={b},last={last},sink={sink},local={local}"),
        ),
        Method::FlexPrefill {
            gamma,
            tau,
            min_budget,
            last,
        } => (
            "flexprefill",
            format!("gamma={gamma},tau={tau},min_budget={min_budget},block={b},last={last}"),
        ),
        Method::Proxy { gamma, rows, last } => (
            "proxy",
            format!("gamma={gamma},rows={rows},block={b},last={last}"),
        ),
        Method::Columns {
            gamma,
            rows,
            sink,
            local,
            check,
            check_gamma,
            gathered,
            int8,
        } => (
            "columns",
            format!(
                "gamma={gamma},rows={rows},block={b},sink={sink},local={local},check={check},check_gamma={check_gamma}{}{}",
                if gathered { ",gathered=1" } else { "" },
                if int8 { ",int8=1" } else { "" }
            ),
        ),
        Method::LowBit { tau, sink, local } => (
            "lowbit",
            format!("tau={tau},block={b},sink={sink},local={local}"),
        ),
        Method::LowBitMass { gamma, sink, local } => (
            "lowbit_mass",
            format!("gamma={gamma},block={b},sink={sink},local={local}"),
        ),
        Method::Whole => ("skip", format!("factor={},block={b}", skip.unwrap_or(0.0))),
    }
}

/// The canonical text (every argument spelled out); parses back to the same spec.
impl fmt::Display for SparseSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, args) = method_text(self.method, self.block, self.skip);
        write!(f, "{name}({args}")?;
        if self.element {
            write!(f, ",element=1")?;
        }
        if self.dense_last > 0 {
            write!(f, ",dense_last={}", self.dense_last)?;
        }
        if let Some(n) = self.dense_below {
            write!(f, ",dense_below={n}")?;
        }
        match (self.method, self.skip) {
            (Method::Whole, _) | (_, None) => write!(f, ")")?,
            (_, Some(s)) => write!(f, ",skip={s})")?,
        }
        if let Some(m) = self.with {
            let (name, args) = method_text(m, self.block, None);
            write!(f, "+{name}({args})")?;
        }
        Ok(())
    }
}
