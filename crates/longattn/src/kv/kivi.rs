//! KIVI quantized pages: `kivi(bits=4|2,group=G,residual=R)` (`bits=16`: no quantization).
//!
//! Asymmetric min/max quantization with b bits over a group x_1..x_G:
//!   lo = min x, hi = max x, s = (hi - lo) / (2^b - 1), c_t = round((x_t - lo) / s) in 0..2^b-1,
//!   x^_t = lo + s c_t, so |x_t - x^_t| <= s / 2 (s = 0: every c_t = 0, exact).
//! K is quantized per channel: G consecutive entries of a head form a group, and channel d has
//! its own (s_d, lo_d) over the group's G tokens. V is quantized per token: each entry's Dv
//! channels fall into Dv / G groups of G channels with their own (s, lo). Codes are packed
//! 8 / b per byte, one byte row per entry (`ceil(D b / 8)` bytes for K, `ceil(Dv b / 8)` for V).
//!
//! The newest entries of a head stay in the cache's full-precision pages (the residual): after
//! each forward [`super::PagedKvCache::quantize`] moves whole groups of the oldest residual
//! entries into the head's [`QuantHead`] while the residual keeps more than `R + G - 1`, so it
//! ends with between R and R + G - 1 entries (R = 0: fewer than a full group).
//!
//! ZipVL-style mixed precision, `zipvl(lo=2,hi=4,mass=0.9,f=0.95,group=G,residual=R)`
//! ([`Mixed`]): the same groups, each with its own bit width, following the groups' importance.
//! An entry's importance is its running A2SF score with forgetting factor f ([`super::score`]:
//! `score = f score + p` per query, p the attention probability reduced over the group's query
//! heads), i.e. the attention of the recent queries (about 1 / (1 - f) of them) on it, which all
//! groups old enough to be quantized are judged by alike; a group's importance is the sum over
//! its entries. The head's units are its K groups (quantized ones and the ones being quantized)
//! and its remaining full-precision entries one by one; the important units are the fewest, by
//! decreasing importance, that hold `mass` of the head's total ([`important_set`]: ZipVL's
//! adaptive ratio, how many are important depends on how concentrated the head's attention is).
//! At every quantization a group being quantized takes `hi` bits when it is important and `lo`
//! bits otherwise, and a quantized `hi` group that is no longer important is re-quantized to
//! `lo` from its dequantized values (its error then at most half a `lo` step plus half a `hi`
//! step); a `lo` group never goes back up (the bits are gone). Codes of 8 bits are one byte
//! each.
//!
//! Attention over the quantized entries (the cache's `attend_quant`) dequantizes them once per
//! call, x^ = lo + s c ([`QuantHead::dequantize`]), and runs the CPU attention kernel over the
//! f32 keys and values with the mask read at the entries' positions; the cache merges this part
//! with the residual's by their LSE. The plain reference is the same dequantization followed by
//! the f64 oracle (the tests compare the two through the cache).
use std::fmt;

use crate::error::{Error, Result};

const OP: &str = "kv kivi";

fn err(msg: String) -> Error {
    Error::Param { op: OP, msg }
}

/// The quantization policy (module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Kivi {
    /// 2 or 4; 16 keeps everything in full precision (a no-op). With [`Mixed`]: the bits of the
    /// groups that hold no important entry.
    pub bits: u32,
    /// Tokens per K group and channels per V group.
    pub group: usize,
    /// Newest entries always kept in full precision.
    pub residual: usize,
    /// ZipVL-style bit width per group by importance (`zipvl(...)`); None: every group `bits`.
    pub mixed: Option<Mixed>,
}

/// ZipVL-style mixed precision (module documentation): the important groups (the fewest that
/// hold `mass` of the head's importance) take `bits`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mixed {
    /// Bits of the important groups: 4 or 8, more than the policy's.
    pub bits: u32,
    /// Share of the head's importance held by the important units, in (0, 1].
    pub mass: f32,
    /// Forgetting factor of the A2SF scores importance is read from, in [0, 1).
    pub f: f32,
}

impl Kivi {
    /// KIVI with every group at `bits`.
    pub fn uniform(bits: u32, group: usize, residual: usize) -> Kivi {
        Kivi {
            bits,
            group,
            residual,
            mixed: None,
        }
    }

    /// `kivi(bits=..,group=..,residual=..)` or `zipvl(lo=..,hi=..,mass=..,f=..,group=..,residual=..)`.
    pub fn parse(text: &str) -> Result<Kivi> {
        let (name, _) = crate::sparse::spec::split_call(OP, text)?;
        if name == "zipvl" {
            return Self::parse_zipvl(text);
        }
        if name != "kivi" {
            return Err(err(format!("`{text}` is not a kivi or zipvl spec")));
        }
        let v = super::spec::parse_args(
            OP,
            text,
            &[
                ("bits", Some(4.0)),
                ("group", Some(32.0)),
                ("residual", Some(32.0)),
            ],
        )?;
        let int = |k: &str, x: f64| super::spec::int_arg(OP, name, k, x);
        let k = Kivi::uniform(
            int("bits", v[0])? as u32,
            int("group", v[1])?,
            int("residual", v[2])?,
        );
        k.check()?;
        Ok(k)
    }

    fn parse_zipvl(text: &str) -> Result<Kivi> {
        let v = super::spec::parse_args(
            OP,
            text,
            &[
                ("lo", Some(2.0)),
                ("hi", Some(4.0)),
                ("mass", Some(0.9)),
                ("f", Some(0.95)),
                ("group", Some(32.0)),
                ("residual", Some(32.0)),
            ],
        )?;
        let int = |k: &str, x: f64| super::spec::int_arg(OP, "zipvl", k, x);
        let k = Kivi {
            bits: int("lo", v[0])? as u32,
            group: int("group", v[4])?,
            residual: int("residual", v[5])?,
            mixed: Some(Mixed {
                bits: int("hi", v[1])? as u32,
                mass: v[2] as f32,
                f: v[3] as f32,
            }),
        };
        k.check()?;
        Ok(k)
    }

    /// Checks the fields alone.
    pub fn check(&self) -> Result<()> {
        if self.group == 0 {
            return Err(err(format!("`{self}`: group must be >= 1")));
        }
        let Some(m) = self.mixed else {
            if ![2, 4, 16].contains(&self.bits) {
                return Err(err(format!(
                    "`{self}`: bits must be 2 or 4 (16: no quantization), got {}",
                    self.bits
                )));
            }
            return Ok(());
        };
        if ![2, 4].contains(&self.bits) {
            return Err(err(format!(
                "`{self}`: lo must be 2 or 4, got {}",
                self.bits
            )));
        }
        if ![4, 8].contains(&m.bits) || m.bits <= self.bits {
            return Err(err(format!(
                "`{self}`: hi must be 4 or 8 and more than lo ({}), got {}",
                self.bits, m.bits
            )));
        }
        if !(m.mass > 0.0 && m.mass <= 1.0) {
            return Err(err(format!(
                "`{self}`: mass must be in (0, 1], got {}",
                m.mass
            )));
        }
        if !(0.0..1.0).contains(&m.f) {
            return Err(err(format!("`{self}`: f must be in [0, 1), got {}", m.f)));
        }
        Ok(())
    }

    /// Whether a group quantized at `bits` belongs to this policy.
    pub fn allows_bits(&self, bits: u32) -> bool {
        bits == self.bits || self.mixed.is_some_and(|m| m.bits == bits)
    }

    /// Checks the policy against a cache's head dims: V's channel groups must tile Dv.
    pub fn check_dims(&self, head_dim: usize, v_dim: usize) -> Result<()> {
        self.check()?;
        if self.bits == 16 {
            return Ok(());
        }
        if !v_dim.is_multiple_of(self.group) || !head_dim.is_multiple_of(self.group) {
            return Err(err(format!(
                "`{self}`: head dims K {head_dim} / V {v_dim} are not divisible by the group {} (V is quantized per token in groups of that many channels)",
                self.group
            )));
        }
        Ok(())
    }

    pub fn is_noop(&self) -> bool {
        self.bits == 16
    }
}

impl fmt::Display for Kivi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mixed {
            None => write!(
                f,
                "kivi(bits={},group={},residual={})",
                self.bits, self.group, self.residual
            ),
            Some(m) => write!(
                f,
                "zipvl(lo={},hi={},mass={},f={},group={},residual={})",
                self.bits, m.bits, m.mass, m.f, self.group, self.residual
            ),
        }
    }
}

/// (scale, lo) of values `x` under b bits (module documentation).
pub fn scale_lo(x: impl Iterator<Item = f32> + Clone, bits: u32) -> (f32, f32) {
    let lo = x.clone().fold(f32::INFINITY, f32::min);
    let hi = x.fold(f32::NEG_INFINITY, f32::max);
    ((hi - lo) / ((1u32 << bits) - 1) as f32, lo)
}

/// The code of `x` under (scale, lo).
pub fn code(x: f32, s: f32, lo: f32, bits: u32) -> u8 {
    if s == 0.0 {
        return 0;
    }
    ((x - lo) / s)
        .round()
        .clamp(0.0, ((1u32 << bits) - 1) as f32) as u8
}

/// Code `i` of a packed byte row.
#[inline(always)]
fn unpack(row: &[u8], i: usize, bits: u32) -> u8 {
    let at = i * bits as usize;
    ((row[at / 8] as u32 >> (at % 8)) & ((1u32 << bits) - 1)) as u8
}

/// Bytes of a packed row of `n` codes.
fn row_bytes(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(8)
}

/// The important units among units of importance `w` (a unit: a K group, or a residual
/// entry): the fewest, by decreasing w, whose importance reaches `mass` of the total; ties with
/// the last one taken are important too. `mass` 1: every unit (the policy is then
/// `kivi(bits=hi)`); otherwise no unit is important while the total is 0 (nothing observed).
pub fn important_set(w: &[f64], mass: f32) -> Vec<bool> {
    if mass >= 1.0 {
        return vec![true; w.len()];
    }
    let total: f64 = w.iter().sum();
    if total.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return vec![false; w.len()];
    }
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by(|&x, &y| w[y].total_cmp(&w[x]));
    let (mut acc, mut theta) = (0.0, f64::INFINITY);
    for &u in &order {
        acc += w[u];
        theta = w[u];
        if acc >= mass as f64 * total {
            break;
        }
    }
    w.iter().map(|&x| x >= theta).collect()
}

/// The quantized entries of one (sequence, layer, KV head), oldest first, in K groups that each
/// have their own bit width (one width for all under plain KIVI).
#[derive(Clone, Debug, Default)]
pub struct QuantHead {
    group: usize,
    d: usize,
    dv: usize,
    /// Position of each entry.
    pub(crate) pos: Vec<u32>,
    /// K group g holds entries `gstart[g] .. gstart[g + 1]` (the last to n).
    gstart: Vec<u32>,
    /// Bits of K group g's codes (and of its entries' V codes).
    gbits: Vec<u8>,
    /// Byte offsets of K group g's code rows in `kcodes` and of its entries' rows in `vcodes`.
    koff: Vec<usize>,
    voff: Vec<usize>,
    /// K codes: each entry one row of `ceil(D b / 8)` bytes, b its group's bits.
    kcodes: Vec<u8>,
    /// Per K group: scale `[D]` then lo `[D]`.
    kparams: Vec<f32>,
    /// V codes: each entry one row of `ceil(Dv b / 8)` bytes.
    vcodes: Vec<u8>,
    /// Per entry and V channel group: (scale, lo).
    vparams: Vec<f32>,
}

impl QuantHead {
    pub fn len(&self) -> usize {
        self.pos.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }
    /// Bits of each K group, oldest first.
    pub fn group_bits(&self) -> &[u8] {
        &self.gbits
    }
    /// Entries per K group and channels per V group (0 while empty and never written).
    pub fn group(&self) -> usize {
        self.group
    }

    /// Bytes held: packed codes and the f32 scales and minima (exact).
    pub fn bytes(&self) -> usize {
        self.kcodes.len() + self.vcodes.len() + 4 * (self.kparams.len() + self.vparams.len())
    }

    /// Appends one group at `bits` (one the policy allows): `k` `[n, D]`, `v` `[n, Dv]` of
    /// entries at positions `pos` (n >= 1) quantized under `kivi` (K per channel over the n
    /// entries, V per token).
    #[allow(clippy::too_many_arguments)]
    pub fn push_group(
        &mut self,
        kivi: &Kivi,
        bits: u32,
        d: usize,
        dv: usize,
        k: &[f32],
        v: &[f32],
        pos: &[u32],
    ) -> Result<()> {
        let n = pos.len();
        if self.gstart.is_empty() {
            (self.group, self.d, self.dv) = (kivi.group, d, dv);
        }
        if (self.group, self.d, self.dv) != (kivi.group, d, dv) || !kivi.allows_bits(bits) {
            return Err(err(format!(
                "this head holds entries quantized in groups of {} (D {} Dv {}); asked {kivi} at {bits} bits (D {d} Dv {dv})",
                self.group, self.d, self.dv
            )));
        }
        if n == 0 || k.len() != n * d || v.len() != n * dv || !dv.is_multiple_of(kivi.group) {
            return Err(err(format!(
                "push_group: {n} entries with {} K and {} V values (D {d}, Dv {dv}, group {})",
                k.len(),
                v.len(),
                kivi.group
            )));
        }
        let b = bits;
        self.gstart.push(self.pos.len() as u32);
        self.gbits.push(b as u8);
        self.koff.push(self.kcodes.len());
        self.voff.push(self.vcodes.len());
        let (kb, vb) = (row_bytes(d, b), row_bytes(dv, b));
        let mut params = vec![0.0f32; 2 * d];
        for x in 0..d {
            let (s, lo) = scale_lo((0..n).map(|t| k[t * d + x]), b);
            params[x] = s;
            params[d + x] = lo;
        }
        for t in 0..n {
            let mut row = vec![0u8; kb];
            for x in 0..d {
                let c = code(k[t * d + x], params[x], params[d + x], b);
                row[x * b as usize / 8] |= c << ((x * b as usize) % 8);
            }
            self.kcodes.extend(row);
            let mut row = vec![0u8; vb];
            for gv in 0..dv / self.group {
                let ch = &v[t * dv + gv * self.group..][..self.group];
                let (s, lo) = scale_lo(ch.iter().copied(), b);
                self.vparams.extend([s, lo]);
                for (i, &x) in ch.iter().enumerate() {
                    let at = (gv * self.group + i) * b as usize;
                    row[at / 8] |= code(x, s, lo, b) << (at % 8);
                }
            }
            self.vcodes.extend(row);
        }
        self.kparams.extend(params);
        self.pos.extend_from_slice(pos);
        Ok(())
    }

    /// Entry range of K group g.
    fn group_range(&self, g: usize) -> (usize, usize) {
        let e1 = self
            .gstart
            .get(g + 1)
            .map_or(self.pos.len(), |&x| x as usize);
        (self.gstart[g] as usize, e1)
    }

    /// Entries of K group g.
    pub fn group_len(&self, g: usize) -> usize {
        let (e0, e1) = self.group_range(g);
        e1 - e0
    }

    /// K group g's bits, and the K and V code rows of its entry e (an entry of the group).
    fn rows(&self, g: usize, e: usize) -> (u32, &[u8], &[u8]) {
        let b = self.gbits[g] as u32;
        let (kb, vb) = (row_bytes(self.d, b), row_bytes(self.dv, b));
        let t = e - self.gstart[g] as usize;
        (
            b,
            &self.kcodes[self.koff[g] + t * kb..][..kb],
            &self.vcodes[self.voff[g] + t * vb..][..vb],
        )
    }

    /// K `[n, D]` and V `[n, Dv]` dequantized (x^ = lo + s c): the plain path, for references,
    /// scores and key norms.
    pub fn dequantize(&self) -> (Vec<f32>, Vec<f32>) {
        let mut k = Vec::with_capacity(self.len() * self.d);
        let mut v = Vec::with_capacity(self.len() * self.dv);
        for g in 0..self.gstart.len() {
            let (gk, gv) = self.dequantize_group(g);
            k.extend(gk);
            v.extend(gv);
        }
        (k, v)
    }

    /// K and V of K group g's entries dequantized, `[n_g, D]` and `[n_g, Dv]`.
    fn dequantize_group(&self, g: usize) -> (Vec<f32>, Vec<f32>) {
        let (d, dv) = (self.d, self.dv);
        let pr = &self.kparams[g * 2 * d..][..2 * d];
        let (e0, e1) = self.group_range(g);
        let mut k = Vec::with_capacity((e1 - e0) * d);
        let mut v = Vec::with_capacity((e1 - e0) * dv);
        for t in e0..e1 {
            let (b, krow, vrow) = self.rows(g, t);
            k.extend((0..d).map(|x| pr[d + x] + pr[x] * unpack(krow, x, b) as f32));
            v.extend((0..dv).map(|x| {
                let pv = &self.vparams[(t * (dv / self.group) + x / self.group) * 2..][..2];
                pv[1] + pv[0] * unpack(vrow, x, b) as f32
            }));
        }
        (k, v)
    }

    /// An empty head with this one's layout.
    fn empty_like(&self) -> QuantHead {
        QuantHead {
            group: self.group,
            d: self.d,
            dv: self.dv,
            ..Default::default()
        }
    }

    /// Appends entry e (of K group g) to `out` as it is (codes, V scales, position); `open`: it
    /// starts a new group there, which takes g's bits and K scales.
    fn copy_entry_to(&self, out: &mut QuantHead, g: usize, e: usize, open: bool) {
        if open {
            let d2 = 2 * self.d;
            out.gstart.push(out.pos.len() as u32);
            out.gbits.push(self.gbits[g]);
            out.koff.push(out.kcodes.len());
            out.voff.push(out.vcodes.len());
            out.kparams
                .extend_from_slice(&self.kparams[g * d2..(g + 1) * d2]);
        }
        let ng = self.dv.checked_div(self.group).unwrap_or(0);
        let (_, krow, vrow) = self.rows(g, e);
        out.kcodes.extend_from_slice(krow);
        out.vcodes.extend_from_slice(vrow);
        out.vparams
            .extend_from_slice(&self.vparams[e * 2 * ng..(e + 1) * 2 * ng]);
        out.pos.push(self.pos[e]);
    }

    /// Keeps entries `keep` (strictly increasing, checked by the caller): their codes, V scales
    /// and positions move down in order; a K group keeps its scales and bits while any of its
    /// entries remains (dequantized values of the kept entries do not change) and is dropped
    /// otherwise.
    pub fn compact(&mut self, keep: &[usize]) {
        let mut out = self.empty_like();
        let mut last = usize::MAX;
        for &e in keep {
            let g = self.gstart.partition_point(|&s| s as usize <= e) - 1;
            self.copy_entry_to(&mut out, g, e, g != last);
            last = g;
        }
        *self = out;
    }

    /// Re-quantizes the groups whose width `bits[g]` differs from theirs, from their dequantized
    /// values (K per channel over the group, V per token, as `push_group` does); the others are
    /// kept as they are. Entries, positions and group bounds do not change.
    pub fn rewidth(&mut self, kivi: &Kivi, bits: &[u32]) -> Result<()> {
        if bits.len() != self.gstart.len() || bits.iter().any(|&b| !kivi.allows_bits(b)) {
            return Err(err(format!(
                "rewidth: {} widths {bits:?} for {} groups under {kivi}",
                bits.len(),
                self.gstart.len()
            )));
        }
        if bits.iter().zip(&self.gbits).all(|(&b, &o)| b == o as u32) {
            return Ok(());
        }
        let mut out = self.empty_like();
        for (g, &b) in bits.iter().enumerate() {
            let (e0, e1) = self.group_range(g);
            if b == self.gbits[g] as u32 {
                for e in e0..e1 {
                    self.copy_entry_to(&mut out, g, e, e == e0);
                }
            } else {
                let (k, v) = self.dequantize_group(g);
                out.push_group(kivi, b, self.d, self.dv, &k, &v, &self.pos[e0..e1])?;
            }
        }
        *self = out;
        Ok(())
    }
}

#[cfg(test)]
#[path = "kivi_tests.rs"]
mod tests;
