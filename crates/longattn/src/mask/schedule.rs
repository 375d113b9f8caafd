//! The block schedule: the one sparsity format every kernel consumes.
//!
//! For each (batch row, head, query tile) the schedule lists the key tiles that hold at least one
//! allowed (query, key) pair, in increasing key order, each marked
//! - [`TileKind::Full`]: every pair of the tile is allowed, the kernel applies no element mask;
//! - [`TileKind::Partial`]: some pairs are masked, the kernel asks a [`RowMask`] for the bits.
//!
//! Tiles that are not listed are never loaded. Storage is CSR: `offsets[row]..offsets[row + 1]`
//! indexes `entries`, with `row = (b * heads + h) * q_tiles + qt`. A schedule whose `batch` (or
//! `heads`) is 1 is shared by every batch row (or head), so a mask that depends on neither is stored
//! once.
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TileKind {
    Full = 1,
    Partial = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileEntry {
    pub k_tile: u32,
    pub kind: TileKind,
}

/// Element-level mask for Partial tiles, evaluated a query row at a time.
pub trait RowMask: Sync {
    /// Writes the allowed bits of query row `i` (batch row `b`, query head `h`) for keys
    /// `j0 .. j0 + 64 * out.len()`: bit `t` of `out[w]` is key `j0 + 64 * w + t`. Keys at or past
    /// `Sk` must be 0.
    fn row_bits(&self, b: usize, h: usize, i: usize, j0: usize, out: &mut [u64]);
}

#[derive(Clone, Debug, PartialEq)]
pub struct BlockSchedule {
    pub tile_q: usize,
    pub tile_k: usize,
    pub sq: usize,
    pub sk: usize,
    /// Batch rows stored (1 = shared by all).
    pub batch: usize,
    /// Heads stored (1 = shared by all).
    pub heads: usize,
    pub q_tiles: usize,
    pub k_tiles: usize,
    offsets: Vec<u32>,
    entries: Vec<TileEntry>,
}

impl BlockSchedule {
    /// Builds a schedule from per-row entry lists given in row order
    /// (`row = (b * heads + h) * q_tiles + qt`). Entries must be sorted by key tile and in range.
    #[allow(clippy::too_many_arguments)]
    pub fn from_rows(
        tile_q: usize,
        tile_k: usize,
        sq: usize,
        sk: usize,
        batch: usize,
        heads: usize,
        rows: impl IntoIterator<Item = Vec<TileEntry>>,
    ) -> Result<Self> {
        let mut s = Self::empty(tile_q, tile_k, sq, sk, batch, heads)?;
        for row in rows {
            s.push_row(&row)?;
        }
        s.finish()
    }

    /// Starts a schedule to be filled row by row with [`push_row`](Self::push_row).
    pub fn empty(
        tile_q: usize,
        tile_k: usize,
        sq: usize,
        sk: usize,
        batch: usize,
        heads: usize,
    ) -> Result<Self> {
        if tile_q == 0 || tile_k == 0 || sq == 0 || sk == 0 || batch == 0 || heads == 0 {
            return Err(Error::Schedule(format!(
                "tile sizes, lengths, batch and heads must be >= 1 (tile_q {tile_q}, tile_k {tile_k}, sq {sq}, sk {sk}, batch {batch}, heads {heads})"
            )));
        }
        let q_tiles = sq.div_ceil(tile_q);
        let k_tiles = sk.div_ceil(tile_k);
        Ok(BlockSchedule {
            tile_q,
            tile_k,
            sq,
            sk,
            batch,
            heads,
            q_tiles,
            k_tiles,
            offsets: vec![0],
            entries: Vec::new(),
        })
    }

    pub fn push_row(&mut self, row: &[TileEntry]) -> Result<()> {
        let r = self.offsets.len() - 1;
        if r >= self.batch * self.heads * self.q_tiles {
            return Err(Error::Schedule(format!(
                "more rows than batch {} x heads {} x query tiles {}",
                self.batch, self.heads, self.q_tiles
            )));
        }
        let mut prev: Option<u32> = None;
        for e in row {
            if e.k_tile as usize >= self.k_tiles || prev.is_some_and(|p| p >= e.k_tile) {
                return Err(Error::Schedule(format!(
                    "row {r}: key tile {} out of order or out of range (key tiles: {})",
                    e.k_tile, self.k_tiles
                )));
            }
            prev = Some(e.k_tile);
        }
        self.entries.extend_from_slice(row);
        self.offsets.push(self.entries.len() as u32);
        Ok(())
    }

    /// Room for `n` more entries (builders that know their size up front).
    pub(crate) fn reserve(&mut self, n: usize) {
        self.entries.reserve(n);
    }

    /// Appends one row written by `fill` straight into the entry array. For builders that produce
    /// entries sorted and in range by construction (checked in debug builds only).
    pub(crate) fn push_row_with(&mut self, fill: impl FnOnce(&mut Vec<TileEntry>)) -> Result<()> {
        let r = self.offsets.len() - 1;
        if r >= self.batch * self.heads * self.q_tiles {
            return Err(Error::Schedule(format!(
                "more rows than batch {} x heads {} x query tiles {}",
                self.batch, self.heads, self.q_tiles
            )));
        }
        let start = self.entries.len();
        fill(&mut self.entries);
        debug_assert!(self.entries[start..]
            .windows(2)
            .all(|w| w[0].k_tile < w[1].k_tile));
        debug_assert!(self.entries[start..]
            .iter()
            .all(|e| (e.k_tile as usize) < self.k_tiles));
        if self.entries.len() > u32::MAX as usize {
            return Err(Error::Schedule(format!(
                "more than {} scheduled tiles: use larger tiles",
                u32::MAX
            )));
        }
        self.offsets.push(self.entries.len() as u32);
        Ok(())
    }

    pub fn finish(self) -> Result<Self> {
        let want = self.batch * self.heads * self.q_tiles;
        if self.offsets.len() - 1 != want {
            return Err(Error::Schedule(format!(
                "{} rows given, expected batch {} x heads {} x query tiles {} = {want}",
                self.offsets.len() - 1,
                self.batch,
                self.heads,
                self.q_tiles
            )));
        }
        Ok(self)
    }

    /// Dense schedule: every tile Full.
    pub fn full(tile_q: usize, tile_k: usize, sq: usize, sk: usize) -> Result<Self> {
        let mut s = Self::empty(tile_q, tile_k, sq, sk, 1, 1)?;
        let row: Vec<TileEntry> = (0..s.k_tiles as u32)
            .map(|k_tile| TileEntry {
                k_tile,
                kind: TileKind::Full,
            })
            .collect();
        for _ in 0..s.q_tiles {
            s.push_row(&row)?;
        }
        s.finish()
    }

    /// An explicit block mask: `mask` is a u8 tensor of shape `[batch, heads, q_tiles, k_tiles]`
    /// (batch or heads may be 1 = shared), nonzero = attend the whole tile: the all-Full
    /// schedule [`gated`](Self::gated) by it.
    pub fn from_block_mask(
        mask: &[u8],
        shape: [usize; 4],
        tile_q: usize,
        tile_k: usize,
        sq: usize,
        sk: usize,
    ) -> Result<Self> {
        Self::full(tile_q, tile_k, sq, sk)?.gated(mask, shape)
    }

    /// This schedule (a mask's, at the block map's tiles) under a caller's block map, e.g. a
    /// learned gate's (SeerAttention-style): `mask` u8 `[batch, heads, q_tiles, k_tiles]`
    /// (batch or heads 1 = shared), nonzero = keep. A kept tile keeps its entry (Full, or Partial
    /// with the mask's row bits), so the result is `mask & blocks`, exact for the mask part;
    /// batch and heads are the map's or this schedule's, whichever is not 1.
    pub fn gated(&self, mask: &[u8], shape: [usize; 4]) -> Result<Self> {
        let [mb, mh, mq, mk] = shape;
        let fits = |m: usize, s: usize| m == s || m == 1 || s == 1;
        if mq != self.q_tiles
            || mk != self.k_tiles
            || !fits(mb, self.batch)
            || !fits(mh, self.heads)
        {
            return Err(Error::Schedule(format!(
                "block mask has shape {shape:?}, expected [batch, heads, {}, {}] for sq {} / tile {} and sk {} / tile {}{}",
                self.q_tiles,
                self.k_tiles,
                self.sq,
                self.tile_q,
                self.sk,
                self.tile_k,
                if self.batch > 1 {
                    format!(" (batch 1 or {})", self.batch)
                } else {
                    String::new()
                }
            )));
        }
        let n = shape.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
        if n != Some(mask.len()) {
            return Err(Error::Schedule(format!(
                "block mask holds {} bytes, its shape {shape:?} needs {}",
                mask.len(),
                n.map_or("more than usize::MAX".to_string(), |n| n.to_string())
            )));
        }
        let (batch, heads) = (mb.max(self.batch), mh.max(self.heads));
        let mut s = Self::empty(self.tile_q, self.tile_k, self.sq, self.sk, batch, heads)?;
        s.reserve(self.entries.len() * (batch * heads) / (self.batch * self.heads));
        for b in 0..batch {
            for h in 0..heads {
                let (bb, hh) = (if mb == 1 { 0 } else { b }, if mh == 1 { 0 } else { h });
                for qt in 0..self.q_tiles {
                    let keep = &mask[((bb * mh + hh) * mq + qt) * mk..][..mk];
                    s.push_row_with(|out| {
                        out.extend(
                            self.row(b, h, qt)
                                .iter()
                                .filter(|e| keep[e.k_tile as usize] != 0),
                        )
                    })?;
                }
            }
        }
        s.finish()
    }

    /// The scheduled key tiles of (batch row `b`, head `h`, query tile `qt`). Shared dimensions
    /// (stored as 1) ignore the index.
    #[inline]
    pub fn row(&self, b: usize, h: usize, qt: usize) -> &[TileEntry] {
        let b = if self.batch == 1 { 0 } else { b };
        let h = if self.heads == 1 { 0 } else { h };
        let r = (b * self.heads + h) * self.q_tiles + qt;
        &self.entries[self.offsets[r] as usize..self.offsets[r + 1] as usize]
    }

    /// Index in [`entries`](Self::entries) of the first entry of the row of (b, h, qt).
    #[inline]
    pub fn row_start(&self, b: usize, h: usize, qt: usize) -> usize {
        let b = if self.batch == 1 { 0 } else { b };
        let h = if self.heads == 1 { 0 } else { h };
        self.offsets[(b * self.heads + h) * self.q_tiles + qt] as usize
    }

    /// Query rows `[start, end)` of query tile `qt`.
    pub fn q_range(&self, qt: usize) -> (usize, usize) {
        (qt * self.tile_q, ((qt + 1) * self.tile_q).min(self.sq))
    }
    /// Keys `[start, end)` of key tile `kt`.
    pub fn k_range(&self, kt: usize) -> (usize, usize) {
        (kt * self.tile_k, ((kt + 1) * self.tile_k).min(self.sk))
    }

    /// Counts of (Full, Partial) entries over all stored rows.
    pub fn counts(&self) -> (usize, usize) {
        let full = self
            .entries
            .iter()
            .filter(|e| e.kind == TileKind::Full)
            .count();
        (full, self.entries.len() - full)
    }
    pub fn entries(&self) -> &[TileEntry] {
        &self.entries
    }
    /// Number of (query, key) pairs inside the scheduled tiles of one (b, h) (an upper bound of the
    /// allowed pairs; exact when every tile is Full).
    pub fn scheduled_pairs(&self, b: usize, h: usize) -> usize {
        (0..self.q_tiles)
            .map(|qt| {
                let (q0, q1) = self.q_range(qt);
                self.row(b, h, qt)
                    .iter()
                    .map(|e| {
                        let (k0, k1) = self.k_range(e.k_tile as usize);
                        (q1 - q0) * (k1 - k0)
                    })
                    .sum::<usize>()
            })
            .sum()
    }

    /// Exact number of allowed (query, key) pairs of (batch row `b`, head `h`): Full tiles count
    /// whole, Partial tiles count the bits `rows` gives (a schedule with Partial tiles needs it).
    pub fn allowed_pairs(&self, b: usize, h: usize, rows: Option<&dyn RowMask>) -> u64 {
        let mut total = 0u64;
        let mut words = vec![0u64; self.tile_k.div_ceil(64)];
        for qt in 0..self.q_tiles {
            let (q0, q1) = self.q_range(qt);
            for e in self.row(b, h, qt) {
                let (k0, k1) = self.k_range(e.k_tile as usize);
                match (e.kind, rows) {
                    (TileKind::Full, _) => total += ((q1 - q0) * (k1 - k0)) as u64,
                    (TileKind::Partial, None) => {}
                    (TileKind::Partial, Some(rm)) => {
                        let nw = (k1 - k0).div_ceil(64);
                        let last = crate::mask::bind::last_word_mask(k1 - k0);
                        for i in q0..q1 {
                            rm.row_bits(b, h, i, k0, &mut words[..nw]);
                            words[nw - 1] &= last;
                            total += words[..nw]
                                .iter()
                                .map(|w| w.count_ones() as u64)
                                .sum::<u64>();
                        }
                    }
                }
            }
        }
        total
    }

    /// The column view (the transpose of the CSR rows): for every stored (batch row, head, key
    /// tile), the query tiles that list it, in increasing order. The backward pass walks it (one
    /// task per key tile owns dK and dV of its keys).
    pub fn columns(&self) -> ScheduleColumns {
        let rows = self.batch * self.heads;
        let cols = rows * self.k_tiles;
        // Counting sort of the entries by (b, h, key tile), stable in query-tile order.
        let mut offsets = vec![0u32; cols + 1];
        for r in 0..rows {
            for qt in 0..self.q_tiles {
                let row = r * self.q_tiles + qt;
                for e in &self.entries[self.offsets[row] as usize..self.offsets[row + 1] as usize] {
                    offsets[r * self.k_tiles + e.k_tile as usize + 1] += 1;
                }
            }
        }
        for c in 0..cols {
            offsets[c + 1] += offsets[c];
        }
        let mut fill: Vec<u32> = offsets[..cols].to_vec();
        let mut entries = vec![
            ColumnEntry {
                q_tile: 0,
                kind: TileKind::Full,
                rank: 0,
            };
            self.entries.len()
        ];
        for r in 0..rows {
            for qt in 0..self.q_tiles {
                let row = r * self.q_tiles + qt;
                let es = &self.entries[self.offsets[row] as usize..self.offsets[row + 1] as usize];
                for (rank, e) in es.iter().enumerate() {
                    let c = r * self.k_tiles + e.k_tile as usize;
                    entries[fill[c] as usize] = ColumnEntry {
                        q_tile: qt as u32,
                        kind: e.kind,
                        rank: rank as u32,
                    };
                    fill[c] += 1;
                }
            }
        }
        ScheduleColumns {
            batch: self.batch,
            heads: self.heads,
            k_tiles: self.k_tiles,
            offsets,
            entries,
        }
    }
}

/// One entry of a schedule column: query tile `q_tile` lists this key tile as `kind`, as the
/// `rank`-th entry of its row (the key tiles of a row in increasing order; the deterministic CUDA
/// backward adds the dQ partials of a query tile in this order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnEntry {
    pub q_tile: u32,
    pub kind: TileKind,
    pub rank: u32,
}

/// The column (CSC) view of a [`BlockSchedule`], from [`BlockSchedule::columns`]. Shares the
/// schedule's shared dimensions: a schedule stored for one batch row (or head) has one column set.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleColumns {
    batch: usize,
    heads: usize,
    k_tiles: usize,
    offsets: Vec<u32>,
    entries: Vec<ColumnEntry>,
}

impl ScheduleColumns {
    /// The query tiles that list key tile `kt` for (batch row `b`, head `h`), increasing.
    #[inline]
    pub fn column(&self, b: usize, h: usize, kt: usize) -> &[ColumnEntry] {
        let b = if self.batch == 1 { 0 } else { b };
        let h = if self.heads == 1 { 0 } else { h };
        let c = (b * self.heads + h) * self.k_tiles + kt;
        &self.entries[self.offsets[c] as usize..self.offsets[c + 1] as usize]
    }
}

#[cfg(test)]
mod column_tests {
    use super::*;

    /// The column view lists exactly the (query tile, kind) pairs of the rows, per key tile.
    #[test]
    fn columns_transpose_rows() {
        let mut rng = crate::testing::Rng::new(5);
        let (q_tiles, k_tiles, batch, heads) = (7usize, 5usize, 2usize, 3usize);
        let rows = (0..batch * heads * q_tiles).map(|_| {
            (0..k_tiles as u32)
                .filter_map(|k_tile| match rng.below(3) {
                    0 => None,
                    1 => Some(TileEntry {
                        k_tile,
                        kind: TileKind::Full,
                    }),
                    _ => Some(TileEntry {
                        k_tile,
                        kind: TileKind::Partial,
                    }),
                })
                .collect::<Vec<_>>()
        });
        let s = BlockSchedule::from_rows(16, 32, 100, 150, batch, heads, rows).unwrap();
        let cols = s.columns();
        for b in 0..batch {
            for h in 0..heads {
                for kt in 0..k_tiles {
                    let want: Vec<ColumnEntry> = (0..q_tiles)
                        .filter_map(|qt| {
                            let row = s.row(b, h, qt);
                            row.iter()
                                .position(|e| e.k_tile as usize == kt)
                                .map(|r| ColumnEntry {
                                    q_tile: qt as u32,
                                    kind: row[r].kind,
                                    rank: r as u32,
                                })
                        })
                        .collect();
                    assert_eq!(cols.column(b, h, kt), &want[..], "b {b} h {h} kt {kt}");
                }
            }
        }
    }
}
