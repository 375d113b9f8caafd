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
}

/// A parsed sparse spec: the method and the block (tile) size it selects at, used for both the
/// query and the key side of the schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseSpec {
    pub method: Method,
    pub block: usize,
}

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
        ],
        _ => return None,
    })
}

const KNOWN: &str = "topmass, relthresh, moba, vertical_slash";

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

impl SparseSpec {
    /// Parses a spec (grammar in the [`crate::sparse`] module header).
    pub fn parse(text: &str) -> Result<SparseSpec> {
        let (name, given) = split_call(OP, text)?;
        if name.is_empty() {
            return Err(err(format!("`{text}`: no method name (known: {KNOWN})")));
        }
        let accepted = arguments(name)
            .ok_or_else(|| err(format!("unknown method `{name}` (known: {KNOWN})")))?;
        // Start from the defaults; each given argument replaces one, once.
        let mut vals: Vec<f64> = accepted.iter().map(|a| a.1).collect();
        let mut seen = vec![false; accepted.len()];
        for (k, v) in given {
            let idx = accepted.iter().position(|a| a.0 == k).ok_or_else(|| {
                let names: Vec<&str> = accepted.iter().map(|a| a.0).collect();
                err(format!(
                    "`{name}`: unknown argument `{k}` (`{name}` takes {})",
                    names.join(", ")
                ))
            })?;
            if std::mem::replace(&mut seen[idx], true) {
                return Err(err(format!("`{name}`: argument `{k}` given twice")));
            }
            let x: f64 = v
                .parse()
                .ok()
                .filter(|x: &f64| x.is_finite())
                .ok_or_else(|| err(format!("`{name}`: `{k}={v}` is not a finite number")))?;
            vals[idx] = x;
        }
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
            _ => Method::VerticalSlash {
                v: int("v", 0)?,
                s: int("s", 0)?,
                last: int("last", 1)?,
                sink: int("sink", 0)?,
                local: int("local", 0)?,
            },
        };
        let spec = SparseSpec {
            method,
            block: int("block", 1)?,
        };
        spec.check()?;
        Ok(spec)
    }

    /// Checks the fields (for specs built by hand rather than parsed).
    pub fn check(&self) -> Result<()> {
        if self.block == 0 {
            return Err(err("`block` must be >= 1".into()));
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
            _ => Ok(()),
        }
    }
}

/// The canonical text (every argument spelled out); parses back to the same spec.
impl fmt::Display for SparseSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.block;
        match self.method {
            Method::TopMass { gamma } => write!(f, "topmass(gamma={gamma},block={b})"),
            Method::RelThresh { alpha } => write!(f, "relthresh(alpha={alpha},block={b})"),
            Method::Moba { topk } => write!(f, "moba(block={b},topk={topk})"),
            Method::VerticalSlash {
                v,
                s,
                last,
                sink,
                local,
            } => write!(
                f,
                "vertical_slash(v={v},s={s},block={b},last={last},sink={sink},local={local})"
            ),
        }
    }
}
