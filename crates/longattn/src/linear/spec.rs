//! `LinearSpec`: which linear attention to run, parsed from a short string.
//!
//! Grammar (whitespace ignored, names lower case):
//!
//! ```text
//!   spec := atom ('+' atom)*
//!   atom := name | name '(' [arg (',' arg)*] ')'
//!   arg  := key '=' value
//! ```
//!
//! | atom                    | meaning                                                             |
//! |-------------------------|---------------------------------------------------------------------|
//! | `plain`                 | no decay (the default)                                              |
//! | `decay(gamma=G)`        | constant decay `G` in (0, 1] for every head (RetNet style)          |
//! | `decay(gamma=LO:HI)`    | per-head decays: `1 - gamma_h` spread geometrically from `1 - LO` (head 0) to `1 - HI` (last head) |
//! | `simple_gla`            | per-token log decay `g [B, T, H]` given as an input                 |
//! | `gla`                   | per-token, per-feature log decay `g [B, T, H, F]` given as an input |
//! | `identity`              | feature map `phi(x) = x` (the default)                              |
//! | `elu`                   | `phi(x) = elu(x) + 1`                                               |
//! | `taylor`                | BASED's second-order Taylor map (see `feature`)                     |
//! | `hedgehog`              | learned map, weights `hedgehog [Hk, D, F]` given as an input        |
//! | `based(window=W)`       | `taylor + normalized` plus exact causal softmax attention over the last `W` keys (default 64) |
//! | `normalized`            | divide by the denominator `phi(q_t) . z_t`                          |
//! | `norm`                  | TransNormer's RMS norm of each output row (no learned weight)       |
//!
//! Every atom also accepts the common options `chunk=N` (chunk length of the chunked form, default
//! 64) and `scale=X` (multiplier of `phi(q) S`; default `D^-0.5` of the *input* head dim, as
//! flash-linear-attention does, and 1 for the taylor map, which holds its own `1/sqrt(D)`); each
//! option may be given once in a spec. At most one decay atom, one feature map and one
//! normalisation. Examples: `plain`, `elu+normalized`, `simple_gla(chunk=32)`, `gla+norm`,
//! `decay(gamma=0.9:0.999)`, `based(window=128)`, `hedgehog+normalized`.
use super::cpu::{check_chunk, DEFAULT_CHUNK};
use super::feature::FeatureMap;
use crate::error::{Error, Result};

const OP: &str = "linear spec";

/// The decay family of a spec.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DecaySpec {
    None,
    /// One decay for every head.
    Constant(f64),
    /// Per-head decays spread from the first to the last (see the module header).
    Spread(f64, f64),
    /// Per-token scalar log decay, an input `[B, T, H]`.
    Token,
    /// Per-token, per-feature log decay, an input `[B, T, H, F]`.
    Gate,
}

impl DecaySpec {
    /// Whether the decay is an input tensor `g`.
    pub fn needs_input(self) -> bool {
        matches!(self, DecaySpec::Token | DecaySpec::Gate)
    }
    /// Per-head log decays of the constant families.
    pub fn per_head(self, h: usize) -> Option<Vec<f32>> {
        match self {
            DecaySpec::Constant(g) => Some(vec![g.ln() as f32; h]),
            DecaySpec::Spread(lo, hi) => Some(
                (0..h)
                    .map(|i| {
                        let f = if h > 1 {
                            i as f64 / (h - 1) as f64
                        } else {
                            0.0
                        };
                        let one_minus = (1.0 - lo) * ((1.0 - hi) / (1.0 - lo)).powf(f);
                        (1.0 - one_minus).ln() as f32
                    })
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// Output normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalization {
    None,
    /// `normalized`: the `phi(q) . z` denominator.
    Denominator,
    /// `norm`: RMS norm of each output row.
    Rms,
}

/// A parsed linear-attention spec.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearSpec {
    pub feature: FeatureMap,
    pub decay: DecaySpec,
    pub norm: Normalization,
    /// `None`: the default (`D^-0.5`, or 1 for taylor).
    pub scale: Option<f32>,
    pub chunk: usize,
    /// BASED's sliding window (keys per query, the query's own included).
    pub window: Option<usize>,
}

impl Default for LinearSpec {
    fn default() -> Self {
        LinearSpec {
            feature: FeatureMap::Identity,
            decay: DecaySpec::None,
            norm: Normalization::None,
            scale: None,
            chunk: DEFAULT_CHUNK,
            window: None,
        }
    }
}

fn err(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

impl LinearSpec {
    /// The core's scale for input head dim `d`.
    pub fn scale_for(&self, d: usize) -> f32 {
        self.scale.unwrap_or(match self.feature {
            FeatureMap::Taylor => 1.0,
            _ => 1.0 / (d as f32).sqrt(),
        })
    }

    /// Checks the fields (for specs built by hand rather than parsed).
    pub fn check(&self, op: &'static str) -> Result<()> {
        check_chunk(op, self.chunk)?;
        let bad = |msg: String| Err(Error::Param { op, msg });
        if let Some(s) = self.scale {
            if !s.is_finite() {
                return bad(format!("scale must be finite, got {s}"));
            }
        }
        if self.window == Some(0) {
            return bad("the window of `based` must be >= 1".into());
        }
        let ok = |g: f64| g > 0.0 && g <= 1.0;
        match self.decay {
            DecaySpec::Constant(g) if !ok(g) => bad(format!("gamma must be in (0, 1], got {g}")),
            DecaySpec::Spread(lo, hi) if !(ok(lo) && ok(hi) && lo < 1.0 && hi < 1.0) => bad(
                format!("a spread of gammas needs both ends in (0, 1), got {lo}:{hi}"),
            ),
            _ => Ok(()),
        }
    }

    /// Parses a spec (see the module header).
    pub fn parse(text: &str) -> Result<LinearSpec> {
        let mut spec = LinearSpec::default();
        let (mut decay_atom, mut feature_atom, mut norm_atom) = (None, None, None);
        let (mut chunk_set, mut scale_set) = (false, false);
        if text.trim().is_empty() {
            return Err(err(
                "empty spec (try `plain`, `simple_gla`, `elu+normalized`)".into(),
            ));
        }
        for raw in text.split('+') {
            let atom = raw.trim();
            let (name, args) = match atom.find('(') {
                None => (atom, Vec::new()),
                Some(p) => {
                    let inner = atom[p + 1..].strip_suffix(')').ok_or_else(|| {
                        err(format!(
                            "atom `{atom}`: missing `)` at the end of its arguments"
                        ))
                    })?;
                    let mut args = Vec::new();
                    for a in inner.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                        let (k, v) = a.split_once('=').ok_or_else(|| {
                            err(format!("atom `{atom}`: argument `{a}` is not `key=value`"))
                        })?;
                        args.push((k.trim(), v.trim()));
                    }
                    (atom[..p].trim(), args)
                }
            };
            if name.is_empty() {
                return Err(err(format!(
                    "empty atom in `{text}` (atoms are joined by `+`)"
                )));
            }
            let mut window = None;
            let mut gamma = None;
            for (k, v) in args {
                match (name, k) {
                    (_, "chunk") => {
                        if chunk_set {
                            return Err(err(format!("`chunk` given twice (again in `{atom}`)")));
                        }
                        chunk_set = true;
                        spec.chunk = v.parse().map_err(|_| {
                            err(format!(
                                "atom `{atom}`: chunk `{v}` is not a positive integer"
                            ))
                        })?;
                        check_chunk(OP, spec.chunk)?;
                    }
                    (_, "scale") => {
                        if scale_set {
                            return Err(err(format!("`scale` given twice (again in `{atom}`)")));
                        }
                        scale_set = true;
                        let s: f32 = v.parse().map_err(|_| {
                            err(format!("atom `{atom}`: scale `{v}` is not a number"))
                        })?;
                        if !s.is_finite() {
                            return Err(err(format!(
                                "atom `{atom}`: scale must be finite, got {v}"
                            )));
                        }
                        spec.scale = Some(s);
                    }
                    ("based", "window") => {
                        let w: usize = v.parse().map_err(|_| {
                            err(format!(
                                "atom `{atom}`: window `{v}` is not a positive integer"
                            ))
                        })?;
                        if w == 0 {
                            return Err(err(format!("atom `{atom}`: window must be >= 1")));
                        }
                        window = Some(w);
                    }
                    ("decay", "gamma") => gamma = Some(parse_gamma(atom, v)?),
                    _ => {
                        return Err(err(format!(
                            "atom `{atom}`: unknown argument `{k}` (`{name}` takes {})",
                            match name {
                                "based" => "window=W, chunk=N, scale=X",
                                "decay" => "gamma=G or gamma=LO:HI, chunk=N, scale=X",
                                _ => "chunk=N, scale=X",
                            }
                        )))
                    }
                }
            }
            let mut set_decay = |d: DecaySpec| -> Result<()> {
                if let Some(prev) = decay_atom.replace(atom.to_string()) {
                    return Err(err(format!("two decay atoms: `{prev}` and `{atom}`")));
                }
                spec.decay = d;
                Ok(())
            };
            match name {
                "plain" => set_decay(DecaySpec::None)?,
                "decay" => {
                    let g = gamma.ok_or_else(|| {
                        err(format!("atom `{atom}`: `decay` needs gamma=G or gamma=LO:HI"))
                    })?;
                    set_decay(g)?
                }
                "simple_gla" => set_decay(DecaySpec::Token)?,
                "gla" => set_decay(DecaySpec::Gate)?,
                "identity" | "elu" | "taylor" | "hedgehog" | "based" => {
                    if let Some(prev) = feature_atom.replace(atom.to_string()) {
                        return Err(err(format!("two feature maps: `{prev}` and `{atom}`")));
                    }
                    spec.feature = match name {
                        "identity" => FeatureMap::Identity,
                        "elu" => FeatureMap::Elu,
                        "hedgehog" => FeatureMap::Hedgehog,
                        _ => FeatureMap::Taylor,
                    };
                    if name == "based" {
                        spec.window = Some(window.unwrap_or(64));
                        if let Some(prev) = norm_atom.replace(atom.to_string()) {
                            return Err(err(format!(
                                "`{atom}` is normalised already; drop `{prev}`"
                            )));
                        }
                        spec.norm = Normalization::Denominator;
                    }
                }
                "normalized" | "norm" => {
                    if let Some(prev) = norm_atom.replace(atom.to_string()) {
                        if prev.starts_with("based") {
                            return Err(err(format!(
                                "`{prev}` is normalised already; drop `{atom}`"
                            )));
                        }
                        return Err(err(format!("two normalisations: `{prev}` and `{atom}`")));
                    }
                    spec.norm = if name == "norm" {
                        Normalization::Rms
                    } else {
                        Normalization::Denominator
                    };
                }
                _ => {
                    return Err(err(format!(
                        "unknown atom `{name}` (known: plain, decay, simple_gla, gla, identity, elu, taylor, hedgehog, based, normalized, norm)"
                    )))
                }
            }
        }
        Ok(spec)
    }
}

fn parse_gamma(atom: &str, v: &str) -> Result<DecaySpec> {
    let one = |s: &str| -> Result<f64> {
        let g: f64 = s
            .trim()
            .parse()
            .map_err(|_| err(format!("atom `{atom}`: gamma `{s}` is not a number")))?;
        if !(g > 0.0 && g <= 1.0) {
            return Err(err(format!(
                "atom `{atom}`: gamma must be in (0, 1], got {s}"
            )));
        }
        Ok(g)
    };
    match v.split_once(':') {
        None => Ok(DecaySpec::Constant(one(v)?)),
        Some((lo, hi)) => {
            let (lo, hi) = (one(lo)?, one(hi)?);
            if lo == 1.0 || hi == 1.0 {
                return Err(err(format!(
                    "atom `{atom}`: a spread of gammas needs both ends below 1, got {v}"
                )));
            }
            Ok(DecaySpec::Spread(lo, hi))
        }
    }
}

impl std::fmt::Display for LinearSpec {
    /// The canonical spec string (parses back to the same spec).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut atoms: Vec<String> = vec![match self.decay {
            DecaySpec::None => "plain".into(),
            DecaySpec::Constant(g) => format!("decay(gamma={g})"),
            DecaySpec::Spread(lo, hi) => format!("decay(gamma={lo}:{hi})"),
            DecaySpec::Token => "simple_gla".into(),
            DecaySpec::Gate => "gla".into(),
        }];
        match (self.window, self.feature) {
            (Some(w), _) => atoms.push(format!("based(window={w})")),
            (None, FeatureMap::Identity) => {}
            (None, m) => atoms.push(m.name().into()),
        }
        if self.window.is_none() {
            match self.norm {
                Normalization::None => {}
                Normalization::Denominator => atoms.push("normalized".into()),
                Normalization::Rms => atoms.push("norm".into()),
            }
        }
        let mut opts = vec![format!("chunk={}", self.chunk)];
        if let Some(s) = self.scale {
            opts.push(format!("scale={s}"));
        }
        atoms[0] = match atoms[0].strip_suffix(')') {
            Some(a) => format!("{a},{})", opts.join(",")),
            None => format!("{}({})", atoms[0], opts.join(",")),
        };
        f.write_str(&atoms.join("+"))
    }
}
