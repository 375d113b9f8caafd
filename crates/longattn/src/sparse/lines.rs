//! Element-level selections (`element=1`): the kept key columns and diagonals of vertical-slash
//! (and FlexPrefill's vertical-slash heads) as the row mask of the selected tiles.
//!
//! A tile crossed by a kept column or diagonal is listed as Partial; its bits for query row i
//! (aligned position p_i, in document d of its batch row) and key j are
//!
//! ```text
//!   allowed(i, j) = mask(i, j) & (col(j) | diag_d(p_i - j))
//! ```
//!
//! with `mask` the caller's element mask at the candidate tiles (Full tile: every pair; Partial:
//! the caller's row bits; not listed: none) and `col` / `diag_d` the kept lines. A document
//! whose estimate is not a line pattern (a FlexPrefill head that chose query-aware blocks, a
//! document below `dense_below`) is `whole`: its rows keep every pair of their selected tiles,
//! and those tiles keep the mask's kind. So do the rows of a document's `dense_last` (from
//! `dense_from` on), in tiles that are Partial for the document's other rows. The tiles of a
//! union's second method (`A + B`, B's tiles whole) keep every pair too.
//!
//! The `columns` method adds keys per query tile: `allowed(i, j)` also holds for j in the kept
//! keys of i's query tile (`tiles`, sorted lists). The `lowbit_mass` method adds keys per query
//! row: `allowed(i, j)` also holds for j in row i's own kept keys (`rows`, [`RowKeys`]).
//!
//! Storage, per (batch row, query head): the kept columns as a bit set over the keys, and per
//! document the kept offsets o = p_i - j as a bit set in reverse, bit x = offset omax - x
//! (omax = p_(q1-1) - k0, the document's largest offset), so that the keys j0, j0 + 1, ... of
//! a row read the consecutive bits x = j - (p_i - omax): a row's 64-key word is two shifts of
//! each set, as for the columns.
use crate::mask::{BlockSchedule, RowMask, TileKind};

/// The lines one document of a (batch row, head) keeps.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DocLines {
    /// No line pattern: every pair of the selected tiles (under the mask).
    pub whole: bool,
    /// The largest offset of the document's pairs, p_(q1-1) - k0.
    pub omax: i64,
    /// Kept offsets, bit x = offset omax - x.
    pub diag: Vec<u64>,
    /// Rows from here on keep every pair of their tiles (`dense_last`).
    pub dense_from: usize,
}

impl DocLines {
    pub fn whole() -> DocLines {
        DocLines {
            whole: true,
            ..DocLines::lines(0, Vec::new())
        }
    }

    /// A line pattern: kept offsets `diag` (bit x = offset omax - x), no dense rows.
    pub fn lines(omax: i64, diag: Vec<u64>) -> DocLines {
        DocLines {
            whole: false,
            omax,
            diag,
            dense_from: usize::MAX,
        }
    }
}

/// The lines of one (batch row, query head).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct HeadLines {
    /// Kept columns, bit j = key j (Sk bits).
    pub cols: Vec<u64>,
    /// One per document of the batch row, in query order.
    pub docs: Vec<DocLines>,
    /// Keys kept for the rows of one query tile only (the `columns` method), per query tile,
    /// ascending.
    pub tiles: Vec<Vec<u32>>,
    /// Keys kept for one query row only (the `lowbit_mass` method).
    pub rows: RowKeys,
}

impl HeadLines {
    pub fn new(sk: usize, docs: usize, q_tiles: usize) -> HeadLines {
        HeadLines {
            cols: vec![0; sk.div_ceil(64)],
            docs: vec![DocLines::whole(); docs],
            tiles: vec![Vec::new(); q_tiles],
            rows: RowKeys::default(),
        }
    }
}

/// Keys kept per query row, as bit sets over the words that hold them: row i's words are
/// `words[span.start..][..span.len]`, covering keys from 64 * span.w0 on (a row with no span
/// keeps no key of its own). About a bit per key up to the row's last kept key, so a causal
/// row i costs (i + 1) / 8 bytes at most.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct RowKeys {
    spans: Vec<RowSpan>,
    words: Vec<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct RowSpan {
    w0: usize,
    start: usize,
    len: usize,
}

impl RowKeys {
    /// Sets row `i`'s kept keys (`keys` ascending, not empty); each row at most once.
    pub fn set(&mut self, i: usize, keys: &[u32]) {
        let (Some(&lo), Some(&hi)) = (keys.first(), keys.last()) else {
            return;
        };
        if self.spans.len() <= i {
            self.spans.resize(i + 1, RowSpan::default());
        }
        let (w0, w1) = (lo as usize / 64, hi as usize / 64 + 1);
        let start = self.words.len();
        self.words.resize(start + w1 - w0, 0);
        for &j in keys {
            set_bit(&mut self.words[start..], j as usize - 64 * w0);
        }
        self.spans[i] = RowSpan {
            w0,
            start,
            len: w1 - w0,
        };
    }

    /// The 64 bits of row `i` from key `j` on (bit t = key j + t).
    #[inline]
    fn bits(&self, i: usize, j: i64) -> u64 {
        match self.spans.get(i) {
            Some(sp) if sp.len > 0 => {
                bits_at(&self.words[sp.start..][..sp.len], j - 64 * sp.w0 as i64)
            }
            _ => 0,
        }
    }
}

/// Sets bit `x` of a bit set.
#[inline]
pub(crate) fn set_bit(bits: &mut [u64], x: usize) {
    bits[x / 64] |= 1 << (x % 64);
}

/// The 64 bits of `bits` from bit position `at` (bit t = bit at + t; bits outside the set are 0).
#[inline]
fn bits_at(bits: &[u64], at: i64) -> u64 {
    let get = |w: i64| match usize::try_from(w) {
        Ok(w) if w < bits.len() => bits[w],
        _ => 0,
    };
    let (w, r) = (at.div_euclid(64), at.rem_euclid(64) as u32);
    match r {
        0 => get(w),
        _ => (get(w) >> r) | (get(w + 1) << (64 - r)),
    }
}

/// ORs the first `n` bits of `src` into `dst` from bit `at` on.
fn or_bits(dst: &mut [u64], at: usize, src: &[u64], n: usize) {
    if at.is_multiple_of(64) && n.is_multiple_of(64) {
        for (d, s) in dst[at / 64..].iter_mut().zip(&src[..n / 64]) {
            *d |= s;
        }
        return;
    }
    for t in (0..n).filter(|t| src[t / 64] >> (t % 64) & 1 == 1) {
        set_bit(dst, at + t);
    }
}

/// Sets bits `a..b` of `dst`.
fn set_range(dst: &mut [u64], a: usize, b: usize) {
    let mut x = a;
    while x < b {
        if x.is_multiple_of(64) && x + 64 <= b {
            dst[x / 64] = !0;
            x += 64;
        } else {
            set_bit(dst, x);
            x += 1;
        }
    }
}

/// Scratch words: on the stack up to 512 keys (a tile), on the heap beyond.
#[derive(Default)]
struct Words {
    small: [u64; 8],
    big: Vec<u64>,
}

impl Words {
    fn get(&mut self, n: usize) -> &mut [u64] {
        if n <= self.small.len() {
            return &mut self.small[..n];
        }
        self.big.resize(n, 0);
        &mut self.big[..]
    }
}

/// The entries of row i's query tile in `s` from the one holding key `j0` on (entries are sorted
/// by key tile: a binary search, not a walk of the row).
fn tiles_from(
    s: &BlockSchedule,
    (b, h, i): (usize, usize, usize),
    j0: usize,
) -> &[crate::mask::TileEntry] {
    let row = s.row(b, h, i / s.tile_q);
    let kt = (j0 / s.tile_k) as u32;
    &row[row.partition_point(|e| e.k_tile < kt)..]
}

/// The row mask of an element-level selection (module header).
pub struct Lines<'a> {
    heads: usize,
    sq: usize,
    sk: usize,
    /// `[B * Hq]`.
    lines: Vec<HeadLines>,
    /// Per batch row, the first query of each document (ascending; the documents tile 0..Sq).
    doc_q0: Vec<Vec<usize>>,
    /// The candidates (the caller's mask at the selection's tiles) and their row bits.
    cand: BlockSchedule,
    rows: Option<&'a dyn RowMask>,
    /// The tiles a union's second method keeps (`A + B`): whole, whatever the lines say.
    whole: Option<BlockSchedule>,
}

impl<'a> Lines<'a> {
    pub(crate) fn new(
        (heads, sq, sk): (usize, usize, usize),
        lines: Vec<HeadLines>,
        doc_q0: Vec<Vec<usize>>,
        (cand, whole): (BlockSchedule, Option<BlockSchedule>),
        rows: Option<&'a dyn RowMask>,
    ) -> Lines<'a> {
        Lines {
            heads,
            sq,
            sk,
            lines,
            doc_q0,
            cand,
            rows,
            whole,
        }
    }

    /// The caller's element mask at the candidates for row i, keys j0 .. j0 + 64 out.len().
    fn mask_bits(&self, (b, h, i): (usize, usize, usize), j0: usize, out: &mut [u64]) {
        out.fill(0);
        let end = (j0 + 64 * out.len()).min(self.sk);
        let mut tmp = Words::default();
        for e in tiles_from(&self.cand, (b, h, i), j0) {
            let (k0, k1) = self.cand.k_range(e.k_tile as usize);
            let (c0, c1) = (k0.max(j0), k1.min(end));
            if c0 >= end {
                break;
            }
            if c0 >= c1 {
                continue;
            }
            match (e.kind, self.rows) {
                (TileKind::Full, _) => set_range(out, c0 - j0, c1 - j0),
                (TileKind::Partial, None) => {}
                (TileKind::Partial, Some(rm)) => {
                    let w = tmp.get((c1 - c0).div_ceil(64));
                    rm.row_bits(b, h, i, c0, w);
                    or_bits(out, c0 - j0, w, c1 - c0);
                }
            }
        }
    }
}

impl RowMask for Lines<'_> {
    fn row_bits(&self, b: usize, h: usize, i: usize, j0: usize, out: &mut [u64]) {
        let hl = &self.lines[b * self.heads + h];
        let starts = &self.doc_q0[b];
        let d = starts.partition_point(|&q0| q0 <= i).saturating_sub(1);
        let dl = &hl.docs[d];
        if dl.whole || i >= dl.dense_from {
            out.fill(!0);
        } else {
            // Bit x = omax - o of key j: x = j - (p_i - omax).
            let p = i as i64 + self.sk as i64 - self.sq as i64;
            let shift = p - dl.omax;
            for (w, o) in out.iter_mut().enumerate() {
                let j = (j0 + 64 * w) as i64;
                *o = bits_at(&hl.cols, j) | bits_at(&dl.diag, j - shift) | hl.rows.bits(i, j);
            }
            // The query tile's own keys.
            let keys = &hl.tiles[i / self.cand.tile_q];
            let end = (j0 + 64 * out.len()).min(self.sk) as u32;
            let from = keys.partition_point(|&j| (j as usize) < j0);
            for &j in keys[from..].iter().take_while(|&&j| j < end) {
                set_bit(out, j as usize - j0);
            }
            // A union's whole tiles.
            if let Some(w) = &self.whole {
                let end = (j0 + 64 * out.len()).min(self.sk);
                for e in tiles_from(w, (b, h, i), j0) {
                    let (k0, k1) = w.k_range(e.k_tile as usize);
                    let (c0, c1) = (k0.max(j0), k1.min(end));
                    if c0 >= end {
                        break;
                    }
                    if c0 < c1 {
                        set_range(out, c0 - j0, c1 - j0);
                    }
                }
            }
        }
        let mut m = Words::default();
        let mb = m.get(out.len());
        self.mask_bits((b, h, i), j0, mb);
        out.iter_mut().zip(mb.iter()).for_each(|(o, m)| *o &= m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_windows_read_across_words_and_outside() {
        let mut b = vec![0u64; 3];
        for x in [0, 5, 63, 64, 100, 191] {
            set_bit(&mut b, x);
        }
        let plain = |at: i64| -> u64 {
            (0..64)
                .filter(|&t| {
                    let x = at + t;
                    (0..192).contains(&x) && [0, 5, 63, 64, 100, 191].contains(&x)
                })
                .fold(0, |a, t| a | 1 << t)
        };
        for at in [
            -70, -64, -3, 0, 1, 5, 37, 63, 64, 65, 100, 128, 150, 191, 192, 300,
        ] {
            assert_eq!(bits_at(&b, at), plain(at), "at {at}");
        }
        let mut d = vec![0u64; 3];
        or_bits(&mut d, 7, &[0b1011, 0], 70);
        assert_eq!(d[0], 0b1011 << 7);
        let mut e = vec![0u64; 2];
        or_bits(&mut e, 64, &[u64::MAX], 64);
        assert_eq!(e, vec![0, u64::MAX]);
        set_range(&mut e, 3, 66);
        assert_eq!(e[0], !0u64 << 3);
    }
}
