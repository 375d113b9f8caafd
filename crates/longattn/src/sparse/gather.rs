//! Gathered keys: the keys a query tile keeps outside whole key tiles (MInference's column lists,
//! the `columns` method's per-tile keys), computed at the cost of the keys kept rather than of
//! the tiles they fall in.
//!
//! A [`TileKeys`] selection says, per (batch row, query head, query tile of `tile_q` rows), which
//! key tiles (of `tile_k` keys) the tile computes whole and which single keys it computes besides;
//! under a mask the allowed pairs are
//!
//! ```text
//!   allowed(i, j) = mask(i, j) & (tile(j) in tiles[qt(i)] | j in keys[qt(i)])
//! ```
//!
//! Every row of a query tile keeps the same keys. The CPU runs it as a row mask ([`RowKeys`])
//! over the tiles the selection touches ([`TileKeys::cpu_schedule`]): a kept tile keeps the
//! mask's kind, a tile holding kept keys is Partial. The CUDA forward (`LA_GATHER`,
//! `cuda/kernels/attn_fwd_ws.cu`, [`crate::cuda::FwdPlan::with_gather`]) runs the kept tiles as
//! schedule entries and the keys as *chunks* ([`lower`]): `tile_k` keys whose K and V rows the
//! producer copies one by one into a tile that is then computed like any other, an entry
//! `GATHERED | chunk << 1 | tested` beside the tiles' `k_tile << 1 | partial`. A chunk is whole
//! (no element test) when each of its keys lies in a key tile the mask allows whole for the query
//! tile; the keys in the mask's Partial tiles, and the last keys of the row with the padding, go
//! to chunks whose elements the kernel tests with the mask program.
use crate::error::{Error, Result};
use crate::mask::{BlockSchedule, RowMask, TileEntry, TileKind};
use crate::testing::Rng;

/// Per (batch row, query head, query tile): key tiles computed whole and keys computed besides.
#[derive(Clone, Debug, PartialEq)]
pub struct TileKeys {
    pub tile_q: usize,
    pub tile_k: usize,
    pub sq: usize,
    pub sk: usize,
    /// Batch rows stored (1: one selection for every batch row).
    pub batch: usize,
    /// Query heads stored (1: one selection for every head).
    pub heads: usize,
    pub q_tiles: usize,
    /// Per row `(b heads + h) q_tiles + qt`: key tiles kept whole, ascending.
    tiles: Vec<Vec<u32>>,
    /// Per row: keys kept, ascending, none inside the row's whole tiles.
    keys: Vec<Vec<u32>>,
}

fn bad(msg: String) -> Error {
    Error::Param {
        op: "gathered keys",
        msg,
    }
}

impl TileKeys {
    /// A selection from per-row lists (rows `(b heads + h) q_tiles + qt`): `tiles` ascending key
    /// tiles below `ceil(sk / tile_k)`, `keys` ascending keys below `sk`. Keys inside a row's
    /// whole tiles are dropped (they are kept anyway).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        (tile_q, tile_k): (usize, usize),
        (sq, sk): (usize, usize),
        (batch, heads): (usize, usize),
        tiles: Vec<Vec<u32>>,
        mut keys: Vec<Vec<u32>>,
    ) -> Result<TileKeys> {
        if tile_q == 0 || tile_k == 0 || sq == 0 || sk == 0 || batch == 0 || heads == 0 {
            return Err(bad(format!(
                "tiles {tile_q} x {tile_k}, Sq {sq}, Sk {sk}, batch {batch}, heads {heads}: all must be positive"
            )));
        }
        let q_tiles = sq.div_ceil(tile_q);
        let k_tiles = sk.div_ceil(tile_k);
        let rows = batch * heads * q_tiles;
        if tiles.len() != rows || keys.len() != rows {
            return Err(bad(format!(
                "{} tile lists and {} key lists for {rows} rows (batch {batch} x heads {heads} x {q_tiles} query tiles)",
                tiles.len(),
                keys.len()
            )));
        }
        let ascending = |v: &[u32], end: usize| {
            v.windows(2).all(|w| w[0] < w[1]) && v.last().is_none_or(|&x| (x as usize) < end)
        };
        for (r, (t, k)) in tiles.iter().zip(keys.iter_mut()).enumerate() {
            if !ascending(t, k_tiles) {
                return Err(bad(format!(
                    "row {r}: key tiles must ascend, each below {k_tiles}"
                )));
            }
            if !ascending(k, sk) {
                return Err(bad(format!(
                    "row {r}: keys must ascend, each below Sk {sk}"
                )));
            }
            k.retain(|&j| t.binary_search(&(j / tile_k as u32)).is_err());
        }
        Ok(TileKeys {
            tile_q,
            tile_k,
            sq,
            sk,
            batch,
            heads,
            q_tiles,
            tiles,
            keys,
        })
    }

    /// A selection from flat lists (the Python package's form): per row
    /// `(b heads + h) q_tiles + qt` in order, `tile_counts[row]` key tiles taken from
    /// `tile_ids` and `key_counts[row]` keys from `key_ids`, each row's ascending
    /// ([`TileKeys::new`] checks them). The counts must cover the lists exactly.
    pub fn from_counts(
        tiles: (usize, usize),
        size: (usize, usize),
        (batch, heads): (usize, usize),
        (tile_counts, tile_ids): (&[u32], &[u32]),
        (key_counts, key_ids): (&[u32], &[u32]),
    ) -> Result<TileKeys> {
        let q_tiles = size.0.div_ceil(tiles.0.max(1));
        let rows = batch * heads * q_tiles;
        let split = |what: &str, counts: &[u32], ids: &[u32]| -> Result<Vec<Vec<u32>>> {
            if counts.len() != rows {
                return Err(bad(format!(
                    "{} {what} counts for {rows} rows (batch {batch} x heads {heads} x {q_tiles} query tiles of {})",
                    counts.len(),
                    tiles.0
                )));
            }
            let total: u64 = counts.iter().map(|&c| c as u64).sum();
            if total != ids.len() as u64 {
                return Err(bad(format!(
                    "the {what} counts add up to {total}, but {} {what} ids were given",
                    ids.len()
                )));
            }
            let mut at = 0;
            Ok(counts
                .iter()
                .map(|&c| {
                    let row = ids[at..at + c as usize].to_vec();
                    at += c as usize;
                    row
                })
                .collect())
        };
        let t = split("tile", tile_counts, tile_ids)?;
        let k = split("key", key_counts, key_ids)?;
        TileKeys::new(tiles, size, (batch, heads), t, k)
    }

    fn row_index(&self, b: usize, h: usize, qt: usize) -> usize {
        let b = if self.batch == 1 { 0 } else { b };
        let h = if self.heads == 1 { 0 } else { h };
        (b * self.heads + h) * self.q_tiles + qt
    }

    /// Key tiles query tile `qt` of (b, h) computes whole.
    pub fn tiles_of(&self, b: usize, h: usize, qt: usize) -> &[u32] {
        &self.tiles[self.row_index(b, h, qt)]
    }

    /// Keys query tile `qt` of (b, h) computes besides its whole tiles.
    pub fn keys_of(&self, b: usize, h: usize, qt: usize) -> &[u32] {
        &self.keys[self.row_index(b, h, qt)]
    }

    /// Whether the selection keeps pair (i, j) of (b, h) (the mask aside).
    pub fn keeps(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        let qt = i / self.tile_q;
        self.tiles_of(b, h, qt)
            .binary_search(&((j / self.tile_k) as u32))
            .is_ok()
            || self.keys_of(b, h, qt).binary_search(&(j as u32)).is_ok()
    }

    /// Keys kept by query tile `qt` of (b, h), whole tiles and single keys together (the mask
    /// aside).
    pub fn kept_keys(&self, b: usize, h: usize, qt: usize) -> usize {
        let t: usize = self
            .tiles_of(b, h, qt)
            .iter()
            .map(|&kt| (self.sk - kt as usize * self.tile_k).min(self.tile_k))
            .sum();
        t + self.keys_of(b, h, qt).len()
    }

    /// A seeded selection with the structure of the sparse estimators' output: per query tile
    /// the first key tile (sinks) and the key tiles over the tile's own rows and the `tile_q`
    /// keys before them (the local band; rows aligned to the keys' end when Sk > Sq) whole, and
    /// each other key up to the tile's last row with probability `p`.
    #[allow(clippy::too_many_arguments)]
    pub fn synthetic(
        (tile_q, tile_k): (usize, usize),
        (sq, sk): (usize, usize),
        (batch, heads): (usize, usize),
        p: f64,
        seed: u64,
    ) -> Result<TileKeys> {
        if !(0.0..=1.0).contains(&p) {
            return Err(bad(format!("key probability {p} outside [0, 1]")));
        }
        let q_tiles = sq.div_ceil(tile_q.max(1));
        let k_tiles = sk.div_ceil(tile_k.max(1));
        let shift = sk.saturating_sub(sq);
        let mut rng = Rng::new(seed);
        let (mut tiles, mut keys) = (Vec::new(), Vec::new());
        for _ in 0..batch * heads {
            for qt in 0..q_tiles {
                let q0 = qt * tile_q + shift;
                let q1 = ((qt + 1) * tile_q).min(sq) + shift;
                let lo = q0.saturating_sub(tile_q) / tile_k;
                let hi = ((q1 - 1) / tile_k).min(k_tiles - 1);
                let mut t: Vec<u32> = std::iter::once(0)
                    .chain((lo..=hi).map(|x| x as u32))
                    .collect();
                t.dedup();
                let end = q1.min(sk);
                let k: Vec<u32> = (0..end)
                    .filter(|&j| {
                        rng.uniform() < p && t.binary_search(&((j / tile_k) as u32)).is_err()
                    })
                    .map(|j| j as u32)
                    .collect();
                tiles.push(t);
                keys.push(k);
            }
        }
        TileKeys::new((tile_q, tile_k), (sq, sk), (batch, heads), tiles, keys)
    }

    /// The CPU's schedule of the selection under `mask` (the mask's schedule at the selection's
    /// tiles): each kept tile the mask lists, with the mask's kind; each other tile the mask
    /// lists that holds a kept key, Partial. Run it with [`RowKeys`] as the row mask.
    pub fn cpu_schedule(
        &self,
        mask: &BlockSchedule,
        batch: usize,
        hq: usize,
    ) -> Result<BlockSchedule> {
        self.check_fits(mask, batch, hq)?;
        self.schedule_at(mask, batch, hq)
    }

    /// The selection under `mask` at the mask schedule's own tiles (any sizes: a kernel's), for
    /// kernels that test a Partial tile's pairs one by one (the CUDA backward, with
    /// [`TileKeys::key_bits`] ANDed into its mask program). A tile `(qt, kt)` the mask lists is
    ///
    /// ```text
    ///   Full     the mask's tile is Full and every selection row u meeting rows of qt keeps all
    ///            of kt's keys as whole tiles of its own;
    ///   Partial  else, when some such u keeps a key of kt (in a whole tile or listed);
    ///   dropped  otherwise.
    /// ```
    /// At the selection's tiles this is [`TileKeys::cpu_schedule`].
    pub fn schedule_at(
        &self,
        mask: &BlockSchedule,
        batch: usize,
        hq: usize,
    ) -> Result<BlockSchedule> {
        if (mask.sq, mask.sk) != (self.sq, self.sk) {
            return Err(bad(format!(
                "the selection is over Sq {} x Sk {}, the mask over {} x {}",
                self.sq, self.sk, mask.sq, mask.sk
            )));
        }
        if self.batch != 1 && self.batch != batch || self.heads != 1 && self.heads != hq {
            return Err(bad(format!(
                "selection for batch {} x heads {} does not fit batch {batch} x query heads {hq}",
                self.batch, self.heads
            )));
        }
        let (tq, tk) = (mask.tile_q, mask.tile_k);
        let (ob, oh) = (self.batch.max(mask.batch), self.heads.max(mask.heads));
        let mut s = BlockSchedule::empty(tq, tk, self.sq, self.sk, ob, oh)?;
        let mut row = Vec::new();
        for b in 0..ob {
            for h in 0..oh {
                for qt in 0..mask.q_tiles {
                    row.clear();
                    // The selection's rows meeting query rows [qt tq, min((qt + 1) tq, Sq)).
                    let u0 = qt * tq / self.tile_q;
                    let u1 = (((qt + 1) * tq).min(self.sq) - 1) / self.tile_q;
                    for e in mask.row(b, h, qt) {
                        let k0 = e.k_tile as usize * tk;
                        let k1 = (k0 + tk).min(self.sk);
                        let (t0, t1) = (k0 / self.tile_k, (k1 - 1) / self.tile_k);
                        let (mut any, mut all) = (false, true);
                        for u in u0..=u1 {
                            let (t, k) = (self.tiles_of(b, h, u), self.keys_of(b, h, u));
                            // Whole tiles of u among t0 ..= t1, and listed keys in [k0, k1).
                            let a = t.partition_point(|&x| (x as usize) < t0);
                            let z = t.partition_point(|&x| (x as usize) <= t1);
                            let ka = k.partition_point(|&j| (j as usize) < k0);
                            let kz = k.partition_point(|&j| (j as usize) < k1);
                            any |= z > a || kz > ka;
                            all &= z - a == t1 - t0 + 1;
                        }
                        if !any {
                            continue;
                        }
                        let kind = if all && e.kind == TileKind::Full {
                            TileKind::Full
                        } else {
                            TileKind::Partial
                        };
                        row.push(TileEntry {
                            k_tile: e.k_tile,
                            kind,
                        });
                    }
                    s.push_row(&row)?;
                }
            }
        }
        s.finish()
    }

    /// Bytes of [`TileKeys::key_bits`].
    pub fn key_bits_len(&self) -> usize {
        self.batch * self.heads * self.q_tiles * self.sk.div_ceil(8)
    }

    /// The kept keys as bits: per selection row `(b heads + h) q_tiles + qt`, `ceil(Sk / 8)`
    /// bytes, bit `j % 8` of byte `j / 8` set iff the row keeps key `j` (in a whole tile or
    /// listed): `keeps(b, h, i, j) = bits[row(b, h, i / tile_q)][j / 8] >> (j % 8) & 1`.
    pub fn key_bits(&self) -> Vec<u8> {
        let w = self.sk.div_ceil(8);
        let mut bits = vec![0u8; self.key_bits_len()];
        for (r, out) in bits.chunks_mut(w).enumerate() {
            let mut set = |j: usize| out[j / 8] |= 1 << (j % 8);
            for &t in &self.tiles[r] {
                let k0 = t as usize * self.tile_k;
                (k0..(k0 + self.tile_k).min(self.sk)).for_each(&mut set);
            }
            self.keys[r].iter().for_each(|&j| set(j as usize));
        }
        bits
    }

    fn check_fits(&self, mask: &BlockSchedule, batch: usize, hq: usize) -> Result<()> {
        if (mask.tile_q, mask.tile_k, mask.sq, mask.sk)
            != (self.tile_q, self.tile_k, self.sq, self.sk)
        {
            return Err(bad(format!(
                "the selection's tiles {} x {} over Sq {} x Sk {} must be the mask schedule's ({} x {} over {} x {}): on the GPU, the forward kernel's tiles (cuda::gather_tiles)",
                self.tile_q, self.tile_k, self.sq, self.sk, mask.tile_q, mask.tile_k, mask.sq, mask.sk
            )));
        }
        if self.batch != 1 && self.batch != batch || self.heads != 1 && self.heads != hq {
            return Err(bad(format!(
                "selection for batch {} x heads {} does not fit batch {batch} x query heads {hq}",
                self.batch, self.heads
            )));
        }
        Ok(())
    }
}

/// The CPU's row mask of a selection: the mask's bits (every key below Sk without one) and the
/// selection's ([`TileKeys::keeps`]).
pub struct RowKeys<'a> {
    pub mask: Option<&'a dyn RowMask>,
    pub sel: &'a TileKeys,
}

impl RowMask for RowKeys<'_> {
    fn row_bits(&self, b: usize, h: usize, i: usize, j0: usize, out: &mut [u64]) {
        match self.mask {
            Some(m) => m.row_bits(b, h, i, j0, out),
            None => {
                for (w, o) in out.iter_mut().enumerate() {
                    let lo = j0 + 64 * w;
                    let n = self.sel.sk.saturating_sub(lo).min(64);
                    *o = if n == 64 { !0 } else { (1u64 << n) - 1 };
                }
            }
        }
        let s = self.sel;
        let qt = i / s.tile_q;
        let (tiles, keys) = (s.tiles_of(b, h, qt), s.keys_of(b, h, qt));
        let first = keys.partition_point(|&j| (j as usize) < j0);
        let tk = s.tile_k;
        for (w, o) in out.iter_mut().enumerate() {
            let (lo, hi) = (j0 + 64 * w, j0 + 64 * w + 64);
            let mut keep = 0u64;
            // The whole tiles' key ranges that meet this word, as bit ranges.
            let t0 = tiles.partition_point(|&t| (t as usize + 1) * tk <= lo);
            for &t in &tiles[t0..] {
                let (a, b) = (t as usize * tk, (t as usize + 1) * tk);
                if a >= hi {
                    break;
                }
                let (a, b) = (a.max(lo) - lo, b.min(hi) - lo);
                keep |= if b - a == 64 {
                    !0
                } else {
                    ((1u64 << (b - a)) - 1) << a
                };
            }
            for &j in &keys[first..] {
                let j = j as usize;
                if j >= lo + 64 {
                    break;
                }
                if j >= lo {
                    keep |= 1 << (j - lo);
                }
            }
            *o &= keep;
        }
    }
}

/// The CPU's form of a selection under `mask` (`Full` or an expression) for these inputs: the
/// selection's schedule ([`TileKeys::cpu_schedule`]) and its row mask ([`RowKeys`]).
fn cpu_form<'a>(
    [q, k, v]: [&crate::TensorView; 3],
    mask: crate::MaskSpec<'a>,
    sel: &'a TileKeys,
) -> Result<(BlockSchedule, RowKeys<'a>)> {
    let dims = crate::attention::validate("gathered keys", q, k, v)?;
    let (sched, rows): (BlockSchedule, Option<&dyn RowMask>) = match mask {
        crate::MaskSpec::Full => (
            BlockSchedule::full(sel.tile_q, sel.tile_k, dims.sq, dims.sk)?,
            None,
        ),
        crate::MaskSpec::Expr(bm) => (bm.schedule(sel.tile_q, sel.tile_k)?, Some(bm)),
        _ => {
            return Err(bad(
                "a gathered selection takes the full mask or a mask expression".into(),
            ))
        }
    };
    let s = sel.cpu_schedule(&sched, dims.batch, dims.hq)?;
    Ok((s, RowKeys { mask: rows, sel }))
}

/// The forward of a selection under `mask` (`Full` or an expression) on the CPU: the selection's
/// schedule ([`TileKeys::cpu_schedule`]) with [`RowKeys`] as its row mask. The GPU's is
/// [`crate::cuda::forward_gathered`].
pub fn forward(
    q: &crate::TensorView,
    k: &crate::TensorView,
    v: &crate::TensorView,
    params: &crate::AttnParams,
    mask: crate::MaskSpec,
    sel: &TileKeys,
) -> Result<crate::AttnOutput> {
    let (s, rows) = cpu_form([q, k, v], mask, sel)?;
    crate::forward(
        q,
        k,
        v,
        params,
        crate::MaskSpec::Schedule {
            schedule: &s,
            rows: Some(&rows),
        },
    )
}

/// The backward of [`forward`] through the same selection on the CPU (sparse fine-tuning through
/// a fixed selection): the gradients of the pairs `mask & selection` alone, the selection held
/// fixed. `out` / `lse` are the forward's.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &crate::TensorView,
    k: &crate::TensorView,
    v: &crate::TensorView,
    out: &crate::TensorView,
    lse: &[f32],
    dout: &crate::TensorView,
    params: &crate::AttnParams,
    mask: crate::MaskSpec,
    sel: &TileKeys,
    bwd: &crate::BackwardParams,
) -> Result<crate::Grads> {
    let (s, rows) = cpu_form([q, k, v], mask, sel)?;
    crate::backward(
        q,
        k,
        v,
        out,
        lse,
        dout,
        params,
        crate::MaskSpec::Schedule {
            schedule: &s,
            rows: Some(&rows),
        },
        bwd,
    )
}

/// The density of a selection under its mask (allowed pairs it computes / allowed pairs of the
/// mask, over every (batch row, query head)) and its table `[batch, hq, query tiles, key
/// tiles]` (0 skipped, 1 tile computed whole (the mask's Full tile), 2 computed in part): what
/// `run --sparse` and the entry point's report give. `mask`: the mask's schedule at the
/// selection's tiles, `rows` its element rule (None: every pair of its tiles).
pub fn report(
    sel: &TileKeys,
    mask: &BlockSchedule,
    rows: Option<&dyn RowMask>,
    batch: usize,
    hq: usize,
) -> Result<(f64, Vec<u8>)> {
    let s = sel.cpu_schedule(mask, batch, hq)?;
    let keyed = RowKeys { mask: rows, sel };
    let (mut kept, mut all) = (0u64, 0u64);
    for b in 0..batch {
        for h in 0..hq {
            kept += s.allowed_pairs(b, h, Some(&keyed));
            all += mask.allowed_pairs(b, h, rows);
        }
    }
    let density = if all == 0 {
        1.0
    } else {
        kept as f64 / all as f64
    };
    Ok((density, super::block_table(&s, batch, hq)))
}

/// Entry flag of a gathered chunk in the kernels' schedule (`LA_GATHERED`).
pub(crate) const GATHERED: u32 = 1 << 31;
/// Key-list padding: a key past any Sk the kernels take (masked, loaded as zeros).
pub(crate) const PAD: u32 = i32::MAX as u32;

/// The CUDA forward's schedule of a selection: CSR rows (b, h, qt) over `batch` x `heads` (each
/// 1 where both the mask's schedule and the selection share it), entries first the kept tiles the
/// mask lists (`k_tile << 1 | partial`, the mask's kind), then the chunks (`GATHERED | chunk << 1
/// | tested`), and the chunks' key lists, `tile_k` keys each.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Lowered {
    pub offs: Vec<u32>,
    pub ents: Vec<u32>,
    pub keys: Vec<u32>,
    pub batch: usize,
    pub heads: usize,
    /// Kept tiles and chunks listed.
    pub tiles: usize,
    pub chunks: usize,
}

/// Lowers `sel` under `mask` (the mask's schedule at the kernel's tiles, which must be the
/// selection's) for a problem of `batch` x `hq` query heads. A key whose tile the mask does not
/// list is dropped (no pair of it is allowed); keys in tiles the mask lists Full fill whole chunks
/// in order; what is left of them and the keys in Partial tiles go to tested chunks, the last one
/// padded with [`PAD`].
pub(crate) fn lower(
    mask: &BlockSchedule,
    sel: &TileKeys,
    batch: usize,
    hq: usize,
) -> Result<Lowered> {
    sel.check_fits(mask, batch, hq)?;
    let bc = sel.tile_k;
    let (ob, oh) = (sel.batch.max(mask.batch), sel.heads.max(mask.heads));
    let mut out = Lowered {
        offs: vec![0],
        ents: Vec::new(),
        keys: Vec::new(),
        batch: ob,
        heads: oh,
        tiles: 0,
        chunks: 0,
    };
    let (mut whole, mut tested) = (Vec::new(), Vec::new());
    for b in 0..ob {
        for h in 0..oh {
            for qt in 0..sel.q_tiles {
                let m = mask.row(b, h, qt);
                let t = sel.tiles_of(b, h, qt);
                for e in m {
                    if t.binary_search(&e.k_tile).is_ok() {
                        out.ents
                            .push(e.k_tile << 1 | (e.kind == TileKind::Partial) as u32);
                        out.tiles += 1;
                    }
                }
                whole.clear();
                tested.clear();
                let mut mi = 0;
                for &j in sel.keys_of(b, h, qt) {
                    let kt = j / bc as u32;
                    while mi < m.len() && m[mi].k_tile < kt {
                        mi += 1;
                    }
                    match m.get(mi) {
                        Some(e) if e.k_tile == kt && e.kind == TileKind::Full => whole.push(j),
                        Some(e) if e.k_tile == kt => tested.push(j),
                        _ => {}
                    }
                }
                let n_whole = whole.len() / bc * bc;
                tested.extend_from_slice(&whole[n_whole..]);
                let chunk = |keys: &[u32], flag: u32, out: &mut Lowered| -> Result<()> {
                    if out.chunks >= 1 << 30 {
                        return Err(bad(format!("more than 2^30 gathered chunks of {bc} keys")));
                    }
                    out.ents.push(GATHERED | (out.chunks as u32) << 1 | flag);
                    out.keys.extend_from_slice(keys);
                    out.keys.resize(out.keys.len() + bc - keys.len(), PAD);
                    out.chunks += 1;
                    Ok(())
                };
                for c in whole[..n_whole].chunks(bc) {
                    chunk(c, 0, &mut out)?;
                }
                for c in tested.chunks(bc) {
                    chunk(c, 1, &mut out)?;
                }
                if out.ents.len() > u32::MAX as usize {
                    return Err(bad("more than 2^32 schedule entries".into()));
                }
                out.offs.push(out.ents.len() as u32);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{BoundMask, MaskExpr, MaskShape};
    use crate::reference::attention_f64;
    use crate::testing::{compare, random_tensor};
    use crate::{AttnParams, DType, MaskSpec};

    fn causal(sq: usize, sk: usize) -> BoundMask {
        MaskExpr::parse("causal")
            .unwrap()
            .bind(MaskShape { batch: 1, sq, sk }, None)
            .unwrap()
    }

    /// Every (i, j) the lowered rows allow, by reading them as the kernel does: a tile entry's
    /// pairs under the mask, a whole chunk's keys for every row of the tile, a tested chunk's
    /// keys where the mask allows them.
    fn lowered_allows(l: &Lowered, bm: &BoundMask, sel: &TileKeys, i: usize, j: usize) -> bool {
        let qt = i / sel.tile_q;
        let ents = &l.ents[l.offs[qt] as usize..l.offs[qt + 1] as usize];
        let allowed = bm.allowed(0, i, j);
        ents.iter().any(|&e| {
            if e & GATHERED == 0 {
                (e >> 1) as usize == j / sel.tile_k && allowed
            } else {
                let c = ((e >> 1) & 0x3fff_ffff) as usize;
                let ks = &l.keys[c * sel.tile_k..(c + 1) * sel.tile_k];
                ks.contains(&(j as u32)) && (e & 1 == 0 || allowed)
            }
        })
    }

    #[test]
    fn lowered_rows_allow_exactly_the_selection_under_the_mask() {
        for (sq, sk, tq, tk, p) in [
            (300, 300, 64, 64, 0.3),
            (130, 517, 128, 64, 0.5),
            (1, 700, 64, 128, 0.2),
            (700, 700, 128, 128, 0.9),
        ] {
            let bm = causal(sq, sk);
            let sel = TileKeys::synthetic((tq, tk), (sq, sk), (1, 1), p, 7).unwrap();
            let l = lower(&bm.schedule(tq, tk).unwrap(), &sel, 1, 1).unwrap();
            assert_eq!(l.offs.len(), sel.q_tiles + 1);
            assert!(l.chunks > 0, "{sq} x {sk}: no chunk to check");
            for i in 0..sq {
                for j in 0..sk {
                    let want = bm.allowed(0, i, j) && sel.keeps(0, 0, i, j);
                    assert_eq!(
                        lowered_allows(&l, &bm, &sel, i, j),
                        want,
                        "{sq} x {sk} tiles {tq} x {tk}: pair ({i}, {j})"
                    );
                }
            }
            // Whole chunks hold only keys the mask allows for every row of their query tile.
            for qt in 0..sel.q_tiles {
                let (q0, q1) = (qt * tq, ((qt + 1) * tq).min(sq));
                for &e in &l.ents[l.offs[qt] as usize..l.offs[qt + 1] as usize] {
                    if e & GATHERED != 0 && e & 1 == 0 {
                        let c = ((e >> 1) & 0x3fff_ffff) as usize;
                        for &j in &l.keys[c * tk..(c + 1) * tk] {
                            assert!(
                                (q0..q1).all(|i| bm.allowed(0, i, j as usize)),
                                "whole chunk key {j} in query tile {qt}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The selection at other tiles ([`TileKeys::schedule_at`], the CUDA backward's form) with
    /// its key bits allows exactly `mask & selection`, and its Full tiles need no test.
    #[test]
    fn schedule_at_other_tiles_allows_exactly_the_selection() {
        // (sq, sk, selection tiles, kernel tiles, key probability, batch x heads of the selection)
        for (sq, sk, st, kt, p, bh) in [
            (300, 300, (64, 64), (128, 128), 0.3, (1, 1)),
            (130, 517, (128, 64), (64, 128), 0.5, (2, 3)),
            (1, 700, (64, 128), (64, 64), 0.2, (1, 3)),
            (113, 65, (32, 16), (48, 80), 0.6, (2, 1)),
            (700, 700, (128, 128), (128, 128), 0.9, (1, 1)),
        ] {
            let bm = causal(sq, sk);
            let sel = TileKeys::synthetic(st, (sq, sk), bh, p, 11).unwrap();
            let (batch, hq) = (2, 3);
            let s = sel
                .schedule_at(&bm.schedule(kt.0, kt.1).unwrap(), batch, hq)
                .unwrap();
            let bits = sel.key_bits();
            assert_eq!(bits.len(), sel.key_bits_len());
            let w = sk.div_ceil(8);
            let mut partial = 0;
            for b in 0..batch {
                for h in 0..hq {
                    let (sb, sh) = (b % sel.batch, h % sel.heads);
                    for i in 0..sq {
                        let row = &s.row(b, h, i / kt.0);
                        let brow = &bits[((sb * sel.heads + sh) * sel.q_tiles + i / st.0) * w..];
                        for j in 0..sk {
                            let want = bm.allowed(0, i, j) && sel.keeps(b, h, i, j);
                            let bit = brow[j / 8] >> (j % 8) & 1 == 1;
                            assert_eq!(bit, sel.keeps(b, h, i, j), "bits ({b}, {h}, {i}, {j})");
                            let got = match row.iter().find(|e| e.k_tile as usize == j / kt.1) {
                                None => false,
                                Some(e) if e.kind == TileKind::Full => true,
                                Some(_) => {
                                    partial += 1;
                                    bm.allowed(0, i, j) && bit
                                }
                            };
                            assert_eq!(
                                got, want,
                                "{sq} x {sk}, selection tiles {st:?}, kernel tiles {kt:?}: ({b}, {h}, {i}, {j})"
                            );
                        }
                    }
                }
            }
            assert!(partial > 0, "{sq} x {sk}: no Partial tile tested");
        }
        // At the selection's own tiles it is the CPU's schedule.
        let bm = causal(300, 400);
        let sel = TileKeys::synthetic((64, 64), (300, 400), (1, 2), 0.4, 3).unwrap();
        let m = bm.schedule(64, 64).unwrap();
        assert_eq!(
            sel.schedule_at(&m, 1, 2).unwrap(),
            sel.cpu_schedule(&m, 1, 2).unwrap()
        );
        // A mask over other sizes is refused by name.
        let e = sel
            .schedule_at(&causal(300, 401).schedule(64, 64).unwrap(), 1, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Sk 400") && e.contains("401"), "{e}");
    }

    #[test]
    fn cpu_path_matches_the_oracle() {
        let (sq, sk, d) = (200, 333, 64);
        let bm = causal(sq, sk);
        let sel = TileKeys::synthetic((64, 64), (sq, sk), (1, 2), 0.25, 3).unwrap();
        let q = random_tensor(DType::F32, &[1, sq, 2, d], 1.0, 1);
        let k = random_tensor(DType::F32, &[1, sk, 1, d], 1.0, 2);
        let v = random_tensor(DType::F32, &[1, sk, 1, d], 1.0, 3);
        let (qv, kv, vv) = (
            q.view("q").unwrap(),
            k.view("k").unwrap(),
            v.view("v").unwrap(),
        );
        let params = AttnParams::default();
        let got = forward(&qv, &kv, &vv, &params, MaskSpec::Expr(&bm), &sel).unwrap();
        let want = attention_f64(&qv, &kv, &vv, &params, &|b, h, i, j| {
            bm.allowed(b, i, j) && sel.keeps(b, h, i, j)
        })
        .unwrap();
        let (e, l) = compare(&got.out, &got.lse, &want);
        assert!(e < 1e-4 && l < 1e-4, "out err {e}, lse err {l}");
    }

    #[test]
    fn cpu_backward_matches_the_oracle() {
        use crate::reference::attention_backward_f64;
        use crate::testing::{compare_grad, grad_tolerance};
        // Awkward sizes, Sq != Sk, a decode row, GQA, both mask forms.
        for (sq, sk, tiles, p, causal_mask, seed) in [
            (113, 200, (64, 32), 0.3, true, 11),
            (65, 65, (32, 64), 0.5, false, 12),
            (1, 130, (64, 64), 0.4, true, 13),
        ] {
            let (hq, hk, d) = (4, 2, 16);
            let sel = TileKeys::synthetic(tiles, (sq, sk), (1, hq), p, seed).unwrap();
            let q = random_tensor(DType::F32, &[1, sq, hq, d], 1.0, seed + 1);
            let k = random_tensor(DType::F32, &[1, sk, hk, d], 1.0, seed + 2);
            let v = random_tensor(DType::F32, &[1, sk, hk, d], 1.0, seed + 3);
            let d_o = random_tensor(DType::F32, &[1, sq, hq, d], 1.0, seed + 4);
            let (qv, kv, vv, dov) = (
                q.view("q").unwrap(),
                k.view("k").unwrap(),
                v.view("v").unwrap(),
                d_o.view("do").unwrap(),
            );
            let params = AttnParams::default();
            let bm = causal(sq, sk);
            let mask = || {
                if causal_mask {
                    MaskSpec::Expr(&bm)
                } else {
                    MaskSpec::Full
                }
            };
            let fwd = forward(&qv, &kv, &vv, &params, mask(), &sel).unwrap();
            let ov = fwd.out.view("out").unwrap();
            let g = backward(
                &qv,
                &kv,
                &vv,
                &ov,
                &fwd.lse,
                &dov,
                &params,
                mask(),
                &sel,
                &crate::BackwardParams::default(),
            )
            .unwrap();
            let allowed = |b: usize, h: usize, i: usize, j: usize| {
                (!causal_mask || bm.allowed(b, i, j)) && sel.keeps(b, h, i, j)
            };
            let r = attention_backward_f64(&qv, &kv, &vv, &dov, &params, &allowed).unwrap();
            let floor = r.dv.iter().fold(0.0f64, |a, x| a.max(x.abs()));
            assert!(floor > 0.0, "{sq} x {sk}: nothing kept");
            for (name, got, want) in [
                ("dq", &g.dq, &r.dq),
                ("dk", &g.dk, &r.dk),
                ("dv", &g.dv, &r.dv),
            ] {
                let e = compare_grad(got, want, floor);
                assert!(
                    e <= grad_tolerance(DType::F32),
                    "{sq} x {sk}: {name} error {e:e}"
                );
            }
        }
    }

    #[test]
    fn bad_selections_are_refused_by_name() {
        let t = |tiles: Vec<Vec<u32>>, keys: Vec<Vec<u32>>| {
            TileKeys::new((64, 64), (100, 100), (1, 1), tiles, keys).map(|_| ())
        };
        let e = t(vec![vec![0]], vec![vec![]]).unwrap_err().to_string();
        assert!(e.contains("1 tile lists"), "{e}");
        let e = t(vec![vec![1, 0], vec![]], vec![vec![], vec![]])
            .unwrap_err()
            .to_string();
        assert!(e.contains("must ascend"), "{e}");
        let e = t(vec![vec![], vec![]], vec![vec![5, 100], vec![]])
            .unwrap_err()
            .to_string();
        assert!(e.contains("below Sk 100"), "{e}");
        let sel = TileKeys::synthetic((64, 64), (100, 100), (1, 1), 0.5, 1).unwrap();
        let e = lower(&causal(100, 100).schedule(128, 64).unwrap(), &sel, 1, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be the mask schedule's"), "{e}");
        assert!(TileKeys::synthetic((64, 64), (100, 100), (1, 1), 1.5, 1).is_err());
    }

    #[test]
    fn flat_lists_give_the_same_selection() {
        let sel = TileKeys::synthetic((64, 32), (200, 300), (2, 3), 0.3, 5).unwrap();
        let (mut tc, mut ti, mut kc, mut ki) = (vec![], vec![], vec![], vec![]);
        for r in 0..sel.tiles.len() {
            tc.push(sel.tiles[r].len() as u32);
            ti.extend(&sel.tiles[r]);
            kc.push(sel.keys[r].len() as u32);
            ki.extend(&sel.keys[r]);
        }
        let flat = |tc: &[u32], kc: &[u32]| {
            TileKeys::from_counts((64, 32), (200, 300), (2, 3), (tc, &ti), (kc, &ki))
        };
        assert_eq!(flat(&tc, &kc).unwrap(), sel);
        let e = flat(&tc[1..], &kc).unwrap_err().to_string();
        assert!(e.contains("tile counts for 24 rows"), "{e}");
        let mut more = kc.clone();
        more[0] += 1;
        let e = flat(&tc, &more).unwrap_err().to_string();
        assert!(e.contains("key counts add up to"), "{e}");
    }
}
