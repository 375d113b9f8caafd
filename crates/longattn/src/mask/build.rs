//! The schedule builder: interval reasoning over tiles, never a pass over every (i, j) pair.
//!
//! For each query tile (aligned positions `p0 ..= p1`):
//! 1. Every node gets two key-interval lists: its *support* (keys some row of the tile may
//!    allow) and its *core* (keys every row of the tile allows). Atoms give them in O(1)
//!    (causal: support `[0, p1]`, core `[0, p0]`; window: `[p0 - L, p1 + R]` / `[p1 - L, p0 + R]`;
//!    ...), `&` intersects, `|` unites, `!` swaps them complemented. Only key tiles meeting the
//!    root support are visited; tiles inside the root core are Full without further work.
//! 2. Each remaining tile is classified per atom, exactly, as Empty / Full / Partial and the
//!    classes are combined with three-valued logic (`!`, `&`, `|`). The combination is exact
//!    except `Partial & Partial` (may be Empty) and `Partial | Partial` (may be Full).
//! 3. Tiles whose class went through such a lossy step are refined with `row_bits` over the rows
//!    of the tile, so the schedule is exact: a tile is listed iff it holds an allowed pair, and it
//!    is Full iff all its pairs are allowed.
use super::bind::{last_word_mask, power_gap, radial_window, Atom, Axis, BoundMask, Node};
use super::schedule::{BlockSchedule, RowMask, TileEntry, TileKind};
use crate::error::Result;
use rayon::prelude::*;

/// Closed key intervals `[lo, hi]`, sorted, disjoint, inside `[0, Sk - 1]`.
type Ivs = Vec<(i64, i64)>;

const EMPTY: u8 = 0;
const FULL: u8 = 1;
/// Partial, and really Partial.
const PART: u8 = 2;
/// Partial after a lossy `&` / `|`: may really be Empty or Full.
const MAYBE: u8 = 3;

fn set(v: &mut Ivs, lo: i64, hi: i64, sk: i64) {
    v.clear();
    let (lo, hi) = (lo.max(0), hi.min(sk - 1));
    if lo <= hi {
        v.push((lo, hi));
    }
}

fn intersect(a: &Ivs, b: &Ivs, out: &mut Ivs) {
    out.clear();
    let (mut x, mut y) = (0, 0);
    while x < a.len() && y < b.len() {
        let lo = a[x].0.max(b[y].0);
        let hi = a[x].1.min(b[y].1);
        if lo <= hi {
            out.push((lo, hi));
        }
        if a[x].1 < b[y].1 {
            x += 1;
        } else {
            y += 1;
        }
    }
}

/// Appends `[lo, hi]` (given in increasing `lo` order), merging with the last interval.
fn push_merge(out: &mut Ivs, lo: i64, hi: i64) {
    match out.last_mut() {
        Some(last) if lo <= last.1 + 1 => last.1 = last.1.max(hi),
        _ => out.push((lo, hi)),
    }
}

fn union(a: &Ivs, b: &Ivs, out: &mut Ivs) {
    out.clear();
    let (mut x, mut y) = (0, 0);
    while x < a.len() || y < b.len() {
        let take_a = y >= b.len() || (x < a.len() && a[x].0 <= b[y].0);
        let (lo, hi) = if take_a { a[x] } else { b[y] };
        if take_a {
            x += 1;
        } else {
            y += 1;
        }
        push_merge(out, lo, hi);
    }
}

fn complement(a: &Ivs, sk: i64, out: &mut Ivs) {
    out.clear();
    let mut next = 0;
    for &(lo, hi) in a {
        if lo > next {
            out.push((next, lo - 1));
        }
        next = hi + 1;
    }
    if next < sk {
        out.push((next, sk - 1));
    }
}

/// Sorted, deduplicated ids.
fn distinct(ids: impl Iterator<Item = i32>, out: &mut Vec<i32>) {
    out.clear();
    for id in ids {
        if out.last() != Some(&id) {
            out.push(id);
        }
    }
    out.sort_unstable();
    out.dedup();
}

fn disjoint(a: &[i32], b: &[i32]) -> bool {
    let (mut x, mut y) = (0, 0);
    while x < a.len() && y < b.len() {
        match a[x].cmp(&b[y]) {
            std::cmp::Ordering::Less => x += 1,
            std::cmp::Ordering::Greater => y += 1,
            std::cmp::Ordering::Equal => return false,
        }
    }
    true
}

/// Scratch state of one schedule build.
struct Builder<'a> {
    m: &'a BoundMask,
    tq: usize,
    tk: usize,
    sk: i64,
    /// Support and core per node for the current query tile.
    sup: Vec<Ivs>,
    core: Vec<Ivs>,
    /// Tile class per node for the current tile.
    class: Vec<u8>,
    /// Documents: distinct ids of each key tile (shared by the builders of a batch row) and of
    /// the current query tile.
    kt: &'a KeyTileIds,
    q_ids: Vec<i32>,
    /// Word buffer for row scans.
    words: Vec<u64>,
    /// The root allows one interval of keys per row ([`BoundMask::row_interval`]): undecided
    /// tiles are then classified from the rows' intervals instead of their bits.
    interval_root: bool,
    /// Every document's keys form one contiguous run (documents are then intervals too).
    doc_runs: bool,
}

/// Distinct document ids of every key tile of one batch row (CSR: tile t's ids are
/// `ids[off[t]..off[t + 1]]`); empty without documents.
#[derive(Default)]
struct KeyTileIds {
    off: Vec<usize>,
    ids: Vec<i32>,
}

impl KeyTileIds {
    /// The ids of batch row `b` for key tiles of `tk` keys. Built once per batch row (it reads
    /// every key's id) and shared by the parallel row builders.
    fn new(m: &BoundMask, b: usize, tk: usize) -> KeyTileIds {
        let Some(d) = &m.docs else {
            return KeyTileIds::default();
        };
        let sk = m.shape().sk;
        let ks = &d.k[b * sk..(b + 1) * sk];
        let mut kt = KeyTileIds {
            off: vec![0],
            ids: Vec::new(),
        };
        let mut tmp = Vec::new();
        for chunk in ks.chunks(tk) {
            distinct(chunk.iter().copied(), &mut tmp);
            kt.ids.extend_from_slice(&tmp);
            kt.off.push(kt.ids.len());
        }
        kt
    }
}

impl Builder<'_> {
    /// The schedule row of query tile `qt` of batch row `b`: the key tiles inside the root's
    /// core are Full in bulk, the others in its support are classified one by one.
    fn row(&mut self, b: usize, qt: usize, k_tiles: usize) -> Vec<TileEntry> {
        let (tile_k, sk) = (self.tk, self.sk);
        let q0 = qt * self.tq;
        let q1 = (q0 + self.tq).min(self.m.shape().sq);
        self.supports(b, q0, q1);
        let root = self.m.root;
        let sup = std::mem::take(&mut self.sup[root]);
        let core = std::mem::take(&mut self.core[root]);
        let full = |t: usize| TileEntry {
            k_tile: t as u32,
            kind: TileKind::Full,
        };
        let mut row = Vec::new();
        let mut next = 0usize;
        let mut ci = 0usize;
        for &(a, z) in &sup {
            let mut kt = (a as usize / tile_k).max(next);
            let kt_end = z as usize / tile_k;
            while kt <= kt_end {
                let k0 = (kt * tile_k) as i64;
                let k1 = ((kt + 1) * tile_k).min(sk as usize) as i64 - 1;
                while ci < core.len() && core[ci].1 < k0 {
                    ci += 1;
                }
                if ci < core.len() && core[ci].0 <= k0 && k1 <= core[ci].1 {
                    // Tiles kt..=last lie inside the core: Full, in bulk.
                    let c_hi = core[ci].1;
                    let last = if c_hi >= sk - 1 {
                        k_tiles - 1
                    } else {
                        (c_hi as usize + 1) / tile_k - 1
                    };
                    let last = last.min(kt_end);
                    row.extend((kt..=last).map(full));
                    kt = last + 1;
                    continue;
                }
                match self.classify(b, q0, q1, kt) {
                    FULL => row.push(full(kt)),
                    EMPTY => {}
                    _ => row.push(TileEntry {
                        k_tile: kt as u32,
                        kind: TileKind::Partial,
                    }),
                }
                kt += 1;
            }
            next = kt;
        }
        self.sup[root] = sup;
        self.core[root] = core;
        row
    }

    /// Support and core of every node for query rows `q0..q1` of batch row `b`.
    fn supports(&mut self, b: usize, q0: usize, q1: usize) {
        let m = self.m;
        let sk = self.sk;
        let (p0, p1) = (m.pos(q0), m.pos(q1 - 1));
        for n in 0..m.nodes.len() {
            let mut sup = std::mem::take(&mut self.sup[n]);
            let mut core = std::mem::take(&mut self.core[n]);
            match &m.nodes[n] {
                Node::Not(a) => {
                    complement(&self.core[*a], sk, &mut sup);
                    complement(&self.sup[*a], sk, &mut core);
                }
                Node::And(a, c) => {
                    intersect(&self.sup[*a], &self.sup[*c], &mut sup);
                    intersect(&self.core[*a], &self.core[*c], &mut core);
                }
                Node::Or(a, c) => {
                    union(&self.sup[*a], &self.sup[*c], &mut sup);
                    union(&self.core[*a], &self.core[*c], &mut core);
                }
                Node::Atom(atom) => match atom {
                    Atom::Full => {
                        set(&mut sup, 0, sk - 1, sk);
                        set(&mut core, 0, sk - 1, sk);
                    }
                    // j <= p: some row allows j <= p1, every row allows j <= p0.
                    Atom::Causal => {
                        set(&mut sup, 0, p1, sk);
                        set(&mut core, 0, p0, sk);
                    }
                    // p - L <= j <= p + R.
                    Atom::Window { l, r } => {
                        set(&mut sup, p0 - l, p1 + r, sk);
                        set(&mut core, p1 - l, p0 + r, sk);
                    }
                    Atom::Below(s) => {
                        set(&mut sup, 0, s - 1, sk);
                        set(&mut core, 0, s - 1, sk);
                    }
                    // Chunks floor(p0 / C) ..= floor(p1 / C); a common core only within one chunk.
                    Atom::Chunk(c) => {
                        let (c0, c1) = (p0.div_euclid(*c), p1.div_euclid(*c));
                        set(&mut sup, c0 * c, c1 * c + c - 1, sk);
                        if c0 == c1 {
                            set(&mut core, c0 * c, c0 * c + c - 1, sk);
                        } else {
                            core.clear();
                        }
                    }
                    // Keys j = p - m s: per m the interval [p0 - m s, p1 - m s]; listed when
                    // they are few and leave gaps, else the whole range.
                    Atom::Strided { s, .. } => {
                        if p1 - p0 + 1 < *s && sk / s <= 4096 {
                            sup.clear();
                            let mut lo = p0 - (p0 + 1).div_euclid(*s) * s - s;
                            while lo < sk {
                                let hi = lo + (p1 - p0);
                                if hi >= 0 {
                                    push_merge(&mut sup, lo.max(0), hi.min(sk - 1));
                                }
                                lo += s;
                            }
                        } else {
                            set(&mut sup, 0, sk - 1, sk);
                        }
                        if *s == 1 {
                            set(&mut core, 0, sk - 1, sk);
                        } else {
                            core.clear();
                        }
                    }
                    // The key blocks at distance 0 or 2^k of each of the tile's query blocks
                    // (when they are few), else every key; a core only when the tile lies in one
                    // query block (its rows then share one key set).
                    Atom::Power(bs) => {
                        let (qb0, qb1) = (p0.div_euclid(*bs), p1.div_euclid(*bs));
                        if qb1 - qb0 < 16 {
                            power_support(*bs, qb0, qb1, sk, &mut sup);
                            core.clear();
                            if qb0 == qb1 {
                                core.extend_from_slice(&sup);
                            }
                        } else {
                            set(&mut sup, 0, sk - 1, sk);
                            core.clear();
                        }
                    }
                    // A tile inside one frame (spatial indices s0..=s1): per key frame the keys
                    // some row allows, [s0 - w', s1 + w'], and those every row allows,
                    // [s1 - w', s0 + w'] (w' that frame distance's half-width); else every key.
                    Atom::Radial { f, w } => {
                        let (t0, t1) = (p0.div_euclid(*f), p1.div_euclid(*f));
                        let frames = (sk - 1) / f + 1;
                        sup.clear();
                        core.clear();
                        if t0 == t1 && frames <= 4096 {
                            let (s0, s1) = (p0.rem_euclid(*f), p1.rem_euclid(*f));
                            for tk in 0..frames {
                                let ww = radial_window(*w, (t0 - tk).abs());
                                let base = tk * f;
                                let hi = (base + (s1 + ww).min(f - 1)).min(sk - 1);
                                push_merge(&mut sup, base + (s0 - ww).max(0), hi);
                                let (clo, chi) =
                                    (base + (s1 - ww).max(0), base + (s0 + ww).min(f - 1));
                                if clo <= chi.min(sk - 1) {
                                    push_merge(&mut core, clo, chi.min(sk - 1));
                                }
                            }
                        } else {
                            set(&mut sup, 0, sk - 1, sk);
                        }
                    }
                    // Union of the key hulls of the documents of the tile's queries; a core only
                    // when every query is in one contiguous document.
                    Atom::Document => {
                        sup.clear();
                        core.clear();
                        if let Some(d) = &m.docs {
                            let base = b * m.shape().sq;
                            let mut prev = None;
                            for qi in base + q0..base + q1 {
                                let h = d.hull[qi];
                                if prev != Some(h) && h.0 < h.1 {
                                    sup.push((h.0 as i64, h.1 as i64 - 1));
                                }
                                prev = Some(h);
                            }
                            sup.sort_unstable();
                            let raw = std::mem::take(&mut sup);
                            for &(lo, hi) in &raw {
                                push_merge(&mut sup, lo, hi);
                            }
                            distinct(d.q[base + q0..base + q1].iter().copied(), &mut self.q_ids);
                            let h = d.hull[base + q0];
                            if self.q_ids.len() == 1 && d.dense[base + q0] && h.0 < h.1 {
                                core.push((h.0 as i64, h.1 as i64 - 1));
                            }
                        }
                    }
                    // Hull of the rows' neighborhoods; for 1-D without dilation each row's set is
                    // an interval, so the core is their intersection.
                    Atom::Nbr(axes) => {
                        let (mut lo, mut hi) = (i64::MAX, i64::MIN);
                        let (mut clo, mut chi) = (i64::MIN, i64::MAX);
                        for i in q0..q1 {
                            let (mut a, mut z) = (0, 0);
                            for ax in axes {
                                let (first, count) = ax.ap((i as i64 / ax.stride) % ax.n);
                                a += first * ax.stride;
                                z += (first + (count - 1) * ax.d) * ax.stride;
                            }
                            lo = lo.min(a);
                            hi = hi.max(z);
                            clo = clo.max(a);
                            chi = chi.min(z);
                        }
                        set(&mut sup, lo, hi, sk);
                        if axes.len() == 1 && axes[0].d == 1 {
                            set(&mut core, clo, chi, sk);
                        } else {
                            core.clear();
                        }
                    }
                },
            }
            self.sup[n] = sup;
            self.core[n] = core;
        }
    }

    /// Scans rows `q0..q1` over keys `[k0, k1)` with `fill(i, words)`: Empty, Full or Partial.
    fn scan_rows(
        words: &mut [u64],
        q0: usize,
        q1: usize,
        k0: usize,
        k1: usize,
        mut fill: impl FnMut(usize, &mut [u64]),
    ) -> u8 {
        let nw = (k1 - k0).div_ceil(64);
        let last = last_word_mask(k1 - k0);
        let words = &mut words[..nw];
        let (mut any, mut all) = (false, true);
        for i in q0..q1 {
            fill(i, words);
            words[nw - 1] &= last;
            for (w, &x) in words.iter().enumerate() {
                let valid = if w + 1 == nw { last } else { u64::MAX };
                any |= x != 0;
                all &= x == valid;
            }
            if any && !all {
                return PART;
            }
        }
        if all {
            FULL
        } else if any {
            PART
        } else {
            EMPTY
        }
    }

    /// Exact class of tile (rows `q0..q1`, key tile `kt`) of batch row `b`.
    fn classify(&mut self, b: usize, q0: usize, q1: usize, kt: usize) -> u8 {
        let m = self.m;
        let (p0, p1) = (m.pos(q0), m.pos(q1 - 1));
        let k0 = kt * self.tk;
        let k1 = (k0 + self.tk).min(self.sk as usize);
        let (j0, j1) = (k0 as i64, k1 as i64 - 1);
        for n in 0..m.nodes.len() {
            let c = match &m.nodes[n] {
                Node::Not(a) => match self.class[*a] {
                    EMPTY => FULL,
                    FULL => EMPTY,
                    x => x,
                },
                Node::And(a, c) => match (self.class[*a], self.class[*c]) {
                    (EMPTY, _) | (_, EMPTY) => EMPTY,
                    (FULL, x) | (x, FULL) => x,
                    _ => MAYBE,
                },
                Node::Or(a, c) => match (self.class[*a], self.class[*c]) {
                    (FULL, _) | (_, FULL) => FULL,
                    (EMPTY, x) | (x, EMPTY) => x,
                    _ => MAYBE,
                },
                Node::Atom(atom) => match atom {
                    Atom::Full => FULL,
                    Atom::Causal => tri(j1 <= p0, j0 > p1),
                    // j - p ranges over [j0 - p1, j1 - p0].
                    Atom::Window { l, r } => {
                        tri(j0 >= p1 - l && j1 <= p0 + r, j1 - p0 < -l || j0 - p1 > *r)
                    }
                    Atom::Below(s) => tri(j1 < *s, j0 >= *s),
                    Atom::Chunk(c) => {
                        let (a0, a1) = (p0.div_euclid(*c), p1.div_euclid(*c));
                        let (b0, b1) = (j0 / c, j1 / c);
                        tri(a0 == a1 && b0 == b1 && a0 == b0, a1 < b0 || b1 < a0)
                    }
                    // p - j ranges over [p0 - j1, p1 - j0]: Empty iff it holds no multiple of s.
                    Atom::Strided { s, .. } => {
                        let (lo, hi) = (p0 - j1, p1 - j0);
                        let none = hi.div_euclid(*s) * s < lo;
                        tri(*s == 1 || (lo == hi && !none), none)
                    }
                    // floor(p / B) - floor(j / B) ranges over every integer in
                    // [qb0 - kb1, qb1 - kb0] (each query and key block of the tile occurs).
                    Atom::Power(bs) => power_tile(
                        p0.div_euclid(*bs) - j1.div_euclid(*bs),
                        p1.div_euclid(*bs) - j0.div_euclid(*bs),
                    ),
                    // Inside one query frame and one key frame it is a window on the spatial
                    // indices; across frames the rows are scanned.
                    Atom::Radial { f, w } => {
                        let (t0, u0) = (p0.div_euclid(*f), j0 / f);
                        if t0 == p1.div_euclid(*f) && u0 == j1 / f {
                            let ww = radial_window(*w, (t0 - u0).abs());
                            let (s0, s1) = (p0.rem_euclid(*f), p1.rem_euclid(*f));
                            let (a, z) = (j0 - u0 * f, j1 - u0 * f);
                            tri(a >= s1 - ww && z <= s0 + ww, z < s0 - ww || a > s1 + ww)
                        } else {
                            let jw0 = k0 as i64;
                            Self::scan_rows(&mut self.words, q0, q1, k0, k1, |i, w| {
                                m.atom_words(n, b, i, jw0, w)
                            })
                        }
                    }
                    Atom::Document => {
                        let ids = &self.kt.ids[self.kt.off[kt]..self.kt.off[kt + 1]];
                        tri(
                            self.q_ids.len() == 1 && ids == self.q_ids.as_slice(),
                            disjoint(ids, &self.q_ids),
                        )
                    }
                    Atom::Nbr(axes) => {
                        if let Some(c) = nbr_tile(axes, q0, q1, k0, k1) {
                            self.class[n] = c;
                            continue;
                        }
                        let jw0 = k0 as i64;
                        Self::scan_rows(&mut self.words, q0, q1, k0, k1, |i, w| {
                            m.atom_words(n, b, i, jw0, w)
                        })
                    }
                },
            };
            self.class[n] = c;
        }
        match self.class[m.root] {
            MAYBE if self.interval_root => {
                // Row i allows keys lo..=hi: the tile is Full when every row covers [j0, j1],
                // Empty when none meets it.
                let (mut any, mut all) = (false, true);
                for i in q0..q1 {
                    let (lo, hi) = m
                        .row_interval(m.root, b, i, self.doc_runs)
                        .unwrap_or((1, 0));
                    let (a, z) = (lo.max(j0), hi.min(j1));
                    any |= a <= z;
                    all &= a == j0 && z == j1;
                    if any && !all {
                        return PART;
                    }
                }
                if !any {
                    EMPTY
                } else if all {
                    FULL
                } else {
                    PART
                }
            }
            MAYBE => Self::scan_rows(&mut self.words, q0, q1, k0, k1, |i, w| {
                m.row_bits(b, 0, i, k0, w)
            }),
            c => c,
        }
    }
}

impl BoundMask {
    /// Node `n` restricted to query row `i` of batch row `b` as one interval of keys
    /// `(lo, hi)` (allowed iff lo <= j <= hi, before the `j < Sk` bound; lo > hi: none), or `None`
    /// when the node is not an interval per row: `&` of causal, window, sinks / prefix, chunk,
    /// full, and documents that are contiguous key runs (`doc_runs`). The CPU twin of
    /// `cuda_interval_program`.
    pub(crate) fn row_interval(
        &self,
        n: usize,
        b: usize,
        i: usize,
        doc_runs: bool,
    ) -> Option<(i64, i64)> {
        const LO: i64 = i64::MIN / 4;
        const HI: i64 = i64::MAX / 4;
        let p = self.pos(i);
        Some(match &self.nodes[n] {
            Node::And(a, c) => {
                let (la, ha) = self.row_interval(*a, b, i, doc_runs)?;
                let (lc, hc) = self.row_interval(*c, b, i, doc_runs)?;
                (la.max(lc), ha.min(hc))
            }
            Node::Atom(atom) => match atom {
                Atom::Full => (LO, HI),
                Atom::Causal => (LO, p),
                Atom::Window { l, r } => (p - l, p + r),
                Atom::Below(s) => (LO, s - 1),
                Atom::Chunk(c) => (p.div_euclid(*c) * c, p.div_euclid(*c) * c + c - 1),
                Atom::Document if doc_runs => {
                    let (lo, hi) = self.docs.as_ref()?.hull[b * self.shape().sq + i];
                    (lo as i64, hi as i64 - 1)
                }
                _ => return None,
            },
            _ => return None,
        })
    }
}

/// Exact class of an undilated neighborhood atom on the tile of queries `q0..q1` and keys
/// `k0..k1` without visiting its rows; `None` (scan the rows) for dilated axes or tiles that cut
/// the grid into too many pieces.
///
/// Tokens split into runs of one innermost line (every outer coordinate fixed). For a query run
/// and a key run the outer axes allow all pairs or none; on the innermost axis (dilation 1) query
/// coordinate x sees the window [f(x), f(x) + c) with f non-decreasing and steps of at most 1, so
/// the queries a..=b together see [f(a), f(b) + c) and all of them see [f(b), f(a) + c). The tile
/// is Full iff every run pair sees all its keys, Empty iff none sees any.
fn nbr_tile(axes: &[Axis], q0: usize, q1: usize, k0: usize, k1: usize) -> Option<u8> {
    let inner = axes.last()?;
    if inner.stride != 1 || axes.iter().any(|a| a.d != 1) {
        return None;
    }
    let line = inner.n as usize;
    let runs = |lo: usize, hi: usize| -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        let mut a = lo;
        while a < hi {
            let e = ((a / line + 1) * line).min(hi);
            v.push((a, e - 1));
            a = e;
        }
        v
    };
    let (qr, kr) = (runs(q0, q1), runs(k0, k1));
    if qr.len() * kr.len() > 256 {
        return None;
    }
    let (mut any, mut all) = (false, true);
    for &(qa, qb) in &qr {
        let (fa, cnt) = inner.ap(qa as i64 % inner.n);
        let (fb, _) = inner.ap(qb as i64 % inner.n);
        for &(ka, kb) in &kr {
            let outer = axes[..axes.len() - 1].iter().all(|ax| {
                let (f, c) = ax.ap((qa as i64 / ax.stride) % ax.n);
                let ck = (ka as i64 / ax.stride) % ax.n;
                f <= ck && ck < f + c
            });
            let (ca, cb) = (ka as i64 % inner.n, kb as i64 % inner.n);
            any |= outer && ca < fb + cnt && cb >= fa;
            all &= outer && ca >= fb && cb < fa + cnt;
            if any && !all {
                return Some(PART);
            }
        }
    }
    Some(tri(all, !any))
}

/// The keys of the blocks at distance 0 or 2^k (either direction) of query blocks `qb0..=qb1`
/// (blocks of `bs` keys, clipped to `[0, sk)`), as sorted disjoint intervals.
fn power_support(bs: i64, qb0: i64, qb1: i64, sk: i64, out: &mut Ivs) {
    let blocks = (sk - 1) / bs + 1;
    let mut kbs = Vec::new();
    for qb in qb0..=qb1 {
        kbs.push(qb);
        let mut d = 1i64;
        while d <= blocks + qb.abs() {
            kbs.extend([qb - d, qb + d]);
            d *= 2;
        }
    }
    kbs.retain(|&kb| (0..blocks).contains(&kb));
    kbs.sort_unstable();
    kbs.dedup();
    out.clear();
    for kb in kbs {
        push_merge(out, kb * bs, (kb * bs + bs - 1).min(sk - 1));
    }
}

/// Class of `power` on a tile whose block distances are every integer in `[lo, hi]`: Empty when
/// none is 0 or +-2^k, Full when all are (the allowed distances form the run -2..=2 and
/// isolated values beyond, so only ranges of at most 5 values can be Full).
fn power_tile(lo: i64, hi: i64) -> u8 {
    // A power of two in [a, b], 1 <= a.
    let pow2_in = |a: i64, b: i64| a <= b && (a as u64).next_power_of_two() <= b as u64;
    let any = (lo <= 0 && 0 <= hi) || pow2_in(lo.max(1), hi) || pow2_in((-hi).max(1), -lo);
    let all = hi - lo <= 4 && (lo..=hi).all(power_gap);
    tri(all, !any)
}

fn tri(full: bool, empty: bool) -> u8 {
    if full {
        FULL
    } else if empty {
        EMPTY
    } else {
        PART
    }
}

impl BoundMask {
    /// The exact block schedule for tiles of `tile_q` x `tile_k` (heads = 1, shared; batch = 1
    /// unless the expression uses `document`). Cost: O(expression size) per visited tile plus a
    /// row scan of the few tiles a lossy `&` / `|` leaves undecided; tiles inside the common core
    /// of a query tile are emitted in bulk.
    pub fn schedule(&self, tile_q: usize, tile_k: usize) -> Result<BlockSchedule> {
        let shape = self.shape();
        let batch = if self.docs.is_some() { shape.batch } else { 1 };
        let mut sched = BlockSchedule::empty(tile_q, tile_k, shape.sq, shape.sk, batch, 1)?;
        let nn = self.nodes.len();
        let doc_runs = self.docs_are_runs();
        let interval_root = shape.sq > 0 && self.row_interval(self.root, 0, 0, doc_runs).is_some();
        let k_tiles = sched.k_tiles;
        for b in 0..batch {
            // Query tiles are independent: rows are built in parallel (one builder per worker)
            // and appended in order.
            let kt = &KeyTileIds::new(self, b, tile_k);
            let builder = || Builder {
                m: self,
                tq: tile_q,
                tk: tile_k,
                sk: shape.sk as i64,
                sup: vec![Vec::new(); nn],
                core: vec![Vec::new(); nn],
                class: vec![EMPTY; nn],
                kt,
                q_ids: Vec::new(),
                words: vec![0; tile_k.div_ceil(64)],
                interval_root,
                doc_runs,
            };
            let rows: Vec<Vec<TileEntry>> = (0..sched.q_tiles)
                .into_par_iter()
                .with_min_len(8)
                .map_init(builder, |bl, qt| bl.row(b, qt, k_tiles))
                .collect();
            sched.reserve(rows.iter().map(Vec::len).sum());
            for r in rows {
                sched.push_row_with(|row| row.extend_from_slice(&r))?;
            }
        }
        sched.finish()
    }
}
