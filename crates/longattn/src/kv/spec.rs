//! The `--kv` spec: policies composed with `+`, e.g. `snapkv(budget=0.2)+kivi(bits=4)`.
//!
//! Each part is `name(key=value,...)` (the grammar shared with the presses and sparse specs):
//! at most one eviction press ([`Press`]), optionally `merge` (its evicted entries folded into a
//! residual slot per head, [`super::press::merge`]) and `share` (its budget shared over the
//! layers: what layers with a sliding window cannot hold goes to the others), at most one quantization ([`Kivi`]: `kivi`
//! or its mixed-precision form `zipvl`) and at most one page selection ([`Quest`]). Order of application does not follow the text: after each forward
//! the eviction press runs first, then quantization of the kept entries; Quest selects pages per
//! query at attention time and drops nothing (it composes with nothing yet: its page bounds are
//! over full-precision keys of every position).
use std::fmt;

use super::kivi::Kivi;
use super::press::Press;
use super::quest::Quest;
use super::score::ScoreKind;
use crate::error::{Error, Result};

const OP: &str = "kv spec";

fn err(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

/// Parses the arguments of `text` (`name(key=value,...)`) against `accepted` (name, default;
/// None: required) and returns the values in the order of `accepted`. `op` names the caller in
/// errors.
pub(crate) fn parse_args(
    op: &'static str,
    text: &str,
    accepted: &[(&str, Option<f64>)],
) -> Result<Vec<f64>> {
    let e = |msg: String| Error::Param { op, msg };
    let (name, given) = crate::sparse::spec::split_call(op, text)?;
    let mut vals: Vec<Option<f64>> = accepted.iter().map(|a| a.1).collect();
    let mut seen = vec![false; accepted.len()];
    for (k, v) in given {
        let idx = accepted.iter().position(|a| a.0 == k).ok_or_else(|| {
            let names: Vec<&str> = accepted.iter().map(|a| a.0).collect();
            e(format!(
                "`{name}`: unknown argument `{k}` (`{name}` takes {})",
                names.join(", ")
            ))
        })?;
        if std::mem::replace(&mut seen[idx], true) {
            return Err(e(format!("`{name}`: argument `{k}` given twice")));
        }
        let x: f64 = v
            .parse()
            .ok()
            .filter(|x: &f64| x.is_finite())
            .ok_or_else(|| e(format!("`{name}`: `{k}={v}` is not a finite number")))?;
        vals[idx] = Some(x);
    }
    vals.iter()
        .zip(accepted)
        .map(|(v, a)| v.ok_or_else(|| e(format!("`{name}`: argument `{}` is required", a.0))))
        .collect()
}

/// A non-negative integer argument.
pub(crate) fn int_arg(op: &'static str, name: &str, key: &str, x: f64) -> Result<usize> {
    if x.fract() != 0.0 || !(0.0..=u32::MAX as f64).contains(&x) {
        return Err(Error::Param {
            op,
            msg: format!("`{name}`: `{key}` must be a non-negative integer, got {x}"),
        });
    }
    Ok(x as usize)
}

/// The policies of one `--kv` spec (module documentation).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KvSpec {
    pub evict: Option<Press>,
    pub kivi: Option<Kivi>,
    pub quest: Option<Quest>,
    /// `duo(...,roles=FILE)`: the role table's path (read by the caller, which owns the model).
    pub roles: Option<String>,
    /// `+merge`: what the eviction press evicts is merged into a residual slot per head
    /// ([`super::press::merge`]).
    pub merge: bool,
    /// `+share`: the eviction press's budget is shared over the layers: what layers with a
    /// sliding window cannot use goes to the others ([`super::press::shared_targets`]).
    pub share: bool,
}

impl From<Press> for KvSpec {
    fn from(p: Press) -> Self {
        KvSpec {
            evict: Some(p),
            ..Default::default()
        }
    }
}

/// `text` split at the `+` signs outside parentheses.
fn split_plus(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, ch) in text.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            '+' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

impl KvSpec {
    /// Whether the eviction press is `duo` (it needs a head role table).
    pub fn needs_roles(&self) -> bool {
        matches!(self.evict, Some(Press::Duo { .. }))
    }

    pub fn parse(text: &str) -> Result<KvSpec> {
        let mut s = KvSpec::default();
        for part in split_plus(text) {
            let t = part.trim();
            if t.is_empty() {
                return Err(err(format!("`{text}`: an empty policy around `+`")));
            }
            let name = t.find('(').map_or(t, |o| t[..o].trim());
            let twice = |what: &str| err(format!("`{text}`: more than one {what}"));
            match name {
                "kivi" | "zipvl" => {
                    if s.kivi.replace(Kivi::parse(t)?).is_some() {
                        return Err(twice("quantization (kivi, zipvl)"));
                    }
                }
                "merge" | "share" => {
                    let (_, args) = crate::sparse::spec::split_call(OP, t)?;
                    if !args.is_empty() {
                        return Err(err(format!("`{t}`: `{name}` takes no arguments")));
                    }
                    let flag = if name == "merge" {
                        &mut s.merge
                    } else {
                        &mut s.share
                    };
                    if std::mem::replace(flag, true) {
                        return Err(twice(name));
                    }
                }
                "quest" => {
                    if s.quest.replace(Quest::parse(t)?).is_some() {
                        return Err(twice("page selection (quest)"));
                    }
                }
                _ => {
                    let (p, roles) = Press::parse_with_roles(t)?;
                    if s.evict.replace(p).is_some() {
                        return Err(twice("eviction press"));
                    }
                    s.roles = roles;
                }
            }
        }
        if s.merge && s.evict.is_none() {
            return Err(err(format!(
                "`{text}`: `merge` folds what an eviction press evicts into a residual slot: give one (e.g. snapkv(budget=0.2)+merge)"
            )));
        }
        if s.share && s.evict.is_none() {
            return Err(err(format!(
                "`{text}`: `share` moves an eviction press's budget between layers: give one (e.g. h2o(budget=0.2)+share)"
            )));
        }
        if s.share && s.needs_roles() {
            return Err(err(format!(
                "`{text}`: duo's budget is its roles' (retrieval heads keep everything): `share` does not apply"
            )));
        }
        if s.merge && s.kivi.is_some() {
            return Err(err(format!(
                "`{text}`: merge composes with no quantization yet (the residual slot stays in full precision)"
            )));
        }
        if let (Some(m), Some(p)) = (s.kivi.and_then(|k| k.mixed), &s.evict) {
            match p.score_kind() {
                Some(kind) if kind != ScoreKind::A2sf(m.f) => {
                    return Err(err(format!(
                        "`{text}`: zipvl ranks groups by their recent attention (A2SF scores, f = {}) and `{p}` keeps {kind:?} scores: compose zipvl with streaming, knorm, duo or a2sf(f={}), or use kivi",
                        m.f, m.f
                    )))
                }
                _ => {}
            }
        }
        if s.quest.is_some() && s.merge {
            return Err(err(format!(
                "`{text}`: quest composes with no `merge` (a residual slot is not a position its pages can bound)"
            )));
        }
        Ok(s)
    }
}

impl fmt::Display for KvSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if let Some(p) = &self.evict {
            let t = p.to_string();
            parts.push(match &self.roles {
                Some(r) => format!("{},roles={r})", t.strip_suffix(')').unwrap_or(&t)),
                None => t,
            });
        }
        if self.merge {
            parts.push("merge".into());
        }
        if self.share {
            parts.push("share".into());
        }
        if let Some(k) = &self.kivi {
            parts.push(k.to_string());
        }
        if let Some(q) = &self.quest {
            parts.push(q.to_string());
        }
        write!(f, "{}", parts.join("+"))
    }
}
