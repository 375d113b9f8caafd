//! Paged KV cache on the CPU and attention of new queries against it.
//!
//! Storage: one pool of pages of `P` tokens of one KV head: K pages `[page][P][D]` and V pages
//! `[page][P][Dv]` (f32). Every (sequence, layer, KV head) owns its own block table (logical page
//! -> physical page), its length and the position of each entry it holds (ragged per head: a
//! compressed head holds fewer entries than the sequence has positions). `extend` grows every
//! head of a sequence by the same new positions and takes pages from the free list (or grows the
//! pool); `compress` keeps a subset of one head's entries, compacts them into the first pages of
//! its table in order and returns the pages it no longer needs to the free list; `drop_sequence`
//! returns all pages of a sequence; `trim` gives back the memory of free pages at the end of the
//! pool. [`KvMemory`] is the exact accounting (pages and bytes allocated, in use, held by entries,
//! and what the uncompressed cache would hold).
//!
//! Attention (`attend`): the queries are the last `Sq` positions of the sequence (the mask is
//! bottom-right aligned over positions: query row i sits at position i + len - Sq, as in
//! [`crate::forward`]). Per KV head, the G query heads of its group attend the head's entries: its
//! block table is split into runs of physically consecutive pages; each run is a `[1, run_len, 1,
//! D]` view of the pool, attended with [`crate::forward`], and the partial results are merged by
//! their LSE (see [`merge_partials`]). A head holding every position uses the mask's own schedule;
//! a compressed head evaluates the mask at the positions its entries came from (a row mask over
//! entry -> position), so attention is exactly attention over the kept keys. Decode of many
//! sequences goes through [`decode::decode`] with per-head tables ([`PagedKvCache::decode`]).
//!
//! Quantized entries ([`kivi`], [`PagedKvCache::quantize`]): a head's oldest entries can move
//! out of its pages into packed codes with per-group scales; entry indices then run over the
//! quantized entries first and the pages' after them (`head_len`, `positions`, `compress`,
//! `gather_head` see both; `gather_head` dequantizes). Attention of such a head is the quantized
//! part (dequantized in the inner loop) merged with the pages' part by LSE; the batched decode
//! goes through the same attention per sequence when any head of the layer is quantized.
//! Query-aware page selection ([`quest`]) attends, per query head and row, a subset of a head's
//! entries through [`PagedKvCache::attend_selected`] (quantized entries included, under the same
//! selection).
pub mod cuda;
pub mod decode;
pub mod kivi;
pub mod kivi_cuda;
pub mod press;
pub mod quest;
pub mod roles;
pub mod score;
pub mod score_cuda;
pub mod spec;

use crate::api::MaskArg;
use crate::attention::{AttnOutput, AttnParams, MaskSpec};
use crate::error::{Error, Result};
use crate::mask::{BlockSchedule, BoundMask, MaskExpr, MaskShape, RowMask, TileEntry, TileKind};
use crate::tensor::{Buffer, Slice, Tensor, TensorView};

/// Smallest and largest page sizes accepted.
pub const PAGE_SIZES: std::ops::RangeInclusive<usize> = 16..=256;

/// Shape of what one cache holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvConfig {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Head dim of V (usually `head_dim`).
    pub v_dim: usize,
    /// Tokens per page.
    pub page_size: usize,
}

/// Handle of one sequence in a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqId(usize);

/// The entries of one (sequence, layer, KV head): its quantized entries (oldest, see
/// [`kivi`]; empty unless quantized), then the full-precision residual in pages with the
/// position of each entry (strictly increasing; residual entry e lives in page `pages[e / P]` at
/// offset `e % P`). Entry indices seen from outside run over both: quantized first.
#[derive(Clone, Debug, Default)]
struct HeadTable {
    quant: kivi::QuantHead,
    pages: Vec<u32>,
    pos: Vec<u32>,
}

impl HeadTable {
    /// Entries in full-precision pages.
    fn len(&self) -> usize {
        self.pos.len()
    }
    /// Every entry held (quantized and full precision).
    fn held(&self) -> usize {
        self.quant.len() + self.pos.len()
    }
}

#[derive(Clone, Debug, Default)]
struct Seq {
    /// Positions seen (appended) so far.
    len: usize,
    /// `[layer * Hk + kv head]`.
    heads: Vec<HeadTable>,
}

/// Exact memory accounting of a cache (K and V, f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KvMemory {
    /// Pages held by the pool (free or not).
    pub pages_allocated: usize,
    /// Pages in the block tables of live sequences.
    pub pages_in_use: usize,
    /// Bytes of the pool.
    pub bytes_allocated: usize,
    /// Bytes of the pages in use.
    pub bytes_in_use: usize,
    /// Bytes of the entries held (in-use pages less their unfilled tails).
    pub bytes_entries: usize,
    /// Bytes the live sequences would hold uncompressed (every position in every layer and head).
    pub bytes_full: usize,
    /// Bytes of the pages the live sequences would use uncompressed.
    pub bytes_full_in_use: usize,
    /// Bytes of quantized entries (packed codes and scales; included in the figures above
    /// except the `_full` ones).
    pub bytes_quantized: usize,
}

/// The paged cache: see the module documentation.
pub struct PagedKvCache {
    cfg: KvConfig,
    /// K pages `[page][P][D]`.
    k: Vec<f32>,
    /// V pages `[page][P][Dv]`.
    v: Vec<f32>,
    /// Pages in the pool (allocated storage).
    n_pages: usize,
    free: Vec<u32>,
    seqs: Vec<Option<Seq>>,
}

fn param(msg: String) -> Error {
    Error::Param {
        op: "kv cache",
        msg,
    }
}

/// `s[off..]` of any dtype.
fn slice_from(s: Slice<'_>, off: usize) -> Slice<'_> {
    match s {
        Slice::F32(x) => Slice::F32(&x[off..]),
        Slice::BF16(x) => Slice::BF16(&x[off..]),
        Slice::F16(x) => Slice::F16(&x[off..]),
    }
}

impl PagedKvCache {
    pub fn new(cfg: KvConfig) -> Result<Self> {
        if !PAGE_SIZES.contains(&cfg.page_size) {
            return Err(param(format!(
                "page size {} outside {}..={}",
                cfg.page_size,
                PAGE_SIZES.start(),
                PAGE_SIZES.end()
            )));
        }
        if cfg.layers == 0 || cfg.kv_heads == 0 || cfg.head_dim == 0 || cfg.v_dim == 0 {
            return Err(param(format!(
                "layers, kv heads and head dims must be >= 1, got {cfg:?}"
            )));
        }
        Ok(PagedKvCache {
            cfg,
            k: Vec::new(),
            v: Vec::new(),
            n_pages: 0,
            free: Vec::new(),
            seqs: Vec::new(),
        })
    }

    pub fn config(&self) -> KvConfig {
        self.cfg
    }
    fn k_page(&self) -> usize {
        self.cfg.page_size * self.cfg.head_dim
    }
    fn v_page(&self) -> usize {
        self.cfg.page_size * self.cfg.v_dim
    }
    /// Bytes of one entry (K and V of one token of one head).
    fn entry_bytes(&self) -> usize {
        (self.cfg.head_dim + self.cfg.v_dim) * 4
    }

    /// Starts an empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let s = Seq {
            len: 0,
            heads: vec![HeadTable::default(); self.cfg.layers * self.cfg.kv_heads],
        };
        if let Some(i) = self.seqs.iter().position(|s| s.is_none()) {
            self.seqs[i] = Some(s);
            return SeqId(i);
        }
        self.seqs.push(Some(s));
        SeqId(self.seqs.len() - 1)
    }

    fn seq(&self, id: SeqId) -> Result<&Seq> {
        self.seqs
            .get(id.0)
            .and_then(|s| s.as_ref())
            .ok_or_else(|| param(format!("sequence {} does not exist (dropped?)", id.0)))
    }

    fn head(&self, id: SeqId, layer: usize, kh: usize) -> Result<&HeadTable> {
        let c = self.cfg;
        if layer >= c.layers || kh >= c.kv_heads {
            return Err(param(format!(
                "layer {layer} / KV head {kh} outside the cache's {} layers x {} KV heads",
                c.layers, c.kv_heads
            )));
        }
        Ok(&self.seq(id)?.heads[layer * c.kv_heads + kh])
    }

    /// Positions seen by a sequence (what an uncompressed head holds).
    pub fn len(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.len)
    }

    /// Entries held by one (sequence, layer, KV head), quantized or not.
    pub fn head_len(&self, id: SeqId, layer: usize, kh: usize) -> Result<usize> {
        Ok(self.head(id, layer, kh)?.held())
    }

    /// Quantized entries held by one (sequence, layer, KV head) (the oldest ones).
    pub fn head_quantized(&self, id: SeqId, layer: usize, kh: usize) -> Result<usize> {
        Ok(self.head(id, layer, kh)?.quant.len())
    }

    /// The position each entry of one (sequence, layer, KV head) came from (increasing).
    pub fn positions(&self, id: SeqId, layer: usize, kh: usize) -> Result<Vec<u32>> {
        let h = self.head(id, layer, kh)?;
        Ok([&h.quant.pos[..], &h.pos[..]].concat())
    }

    /// Releases the pages of a sequence to the free list.
    pub fn drop_sequence(&mut self, id: SeqId) -> Result<()> {
        self.seq(id)?;
        let s = self.seqs[id.0].take().unwrap_or_default();
        for h in s.heads {
            self.free.extend(h.pages);
        }
        Ok(())
    }

    /// Pages in use by live sequences.
    pub fn pages_in_use(&self) -> usize {
        self.n_pages - self.free.len()
    }
    /// Bytes of K/V storage held by the pool.
    pub fn bytes_allocated(&self) -> usize {
        self.n_pages * (self.k_page() + self.v_page()) * 4
    }

    /// The exact memory accounting (see [`KvMemory`]).
    pub fn memory(&self) -> KvMemory {
        let live = self.seqs.iter().flatten();
        let entries: usize = live
            .clone()
            .flat_map(|s| s.heads.iter().map(|h| h.len()))
            .sum();
        let quant: usize = live
            .clone()
            .flat_map(|s| s.heads.iter().map(|h| h.quant.bytes()))
            .sum();
        let full: usize = live
            .clone()
            .map(|s| s.len * self.cfg.layers * self.cfg.kv_heads)
            .sum();
        let full_pages: usize = live
            .map(|s| s.len.div_ceil(self.cfg.page_size) * self.cfg.layers * self.cfg.kv_heads)
            .sum();
        let page_bytes = (self.k_page() + self.v_page()) * 4;
        KvMemory {
            pages_allocated: self.n_pages,
            pages_in_use: self.pages_in_use(),
            bytes_allocated: self.bytes_allocated() + quant,
            bytes_in_use: self.pages_in_use() * page_bytes + quant,
            bytes_entries: entries * self.entry_bytes() + quant,
            bytes_full: full * self.entry_bytes(),
            bytes_full_in_use: full_pages * page_bytes,
            bytes_quantized: quant,
        }
    }

    /// Returns the storage of free pages at the end of the pool to the allocator.
    pub fn trim(&mut self) {
        let mut free: Vec<u32> = std::mem::take(&mut self.free);
        free.sort_unstable();
        while free.last().is_some_and(|&p| p as usize + 1 == self.n_pages) {
            free.pop();
            self.n_pages -= 1;
        }
        let (kp, vp) = (self.k_page(), self.v_page());
        self.k.truncate(self.n_pages * kp);
        self.k.shrink_to_fit();
        self.v.truncate(self.n_pages * vp);
        self.v.shrink_to_fit();
        // Lowest pages first out of the free list (pop takes the last): keeps runs long.
        free.reverse();
        self.free = free;
    }

    fn take_page(&mut self) -> u32 {
        if let Some(p) = self.free.pop() {
            return p;
        }
        let p = self.n_pages as u32;
        self.n_pages += 1;
        let (kp, vp) = (self.k_page(), self.v_page());
        self.k.resize(self.n_pages * kp, 0.0);
        self.v.resize(self.n_pages * vp, 0.0);
        p
    }

    /// Grows a sequence by `n` positions in every layer and KV head (pages taken as needed) and
    /// returns the first new position. The new positions must then be written in every layer
    /// with [`write`](Self::write) before they are attended.
    pub fn extend(&mut self, id: SeqId, n: usize) -> Result<usize> {
        let s = self.seq(id)?;
        let len = s.len;
        if len + n > u32::MAX as usize {
            return Err(param(format!(
                "a sequence of {} positions: at most 2^32 - 1",
                len + n
            )));
        }
        let p = self.cfg.page_size;
        let need: Vec<usize> = s
            .heads
            .iter()
            .map(|h| (h.len() + n).div_ceil(p) - h.pages.len())
            .collect();
        let mut taken: Vec<Vec<u32>> = Vec::with_capacity(need.len());
        for &m in &need {
            taken.push((0..m).map(|_| self.take_page()).collect());
        }
        let s = self.seqs[id.0]
            .as_mut()
            .ok_or_else(|| param("gone".into()))?;
        for (h, pages) in s.heads.iter_mut().zip(taken) {
            h.pages.extend(pages);
            h.pos.extend(len as u32..(len + n) as u32);
        }
        s.len = len + n;
        Ok(len)
    }

    /// Writes K `[n, Hk, D]` and V `[n, Hk, Dv]` (row-major) of one layer at positions
    /// `pos .. pos + n`, which every head of the layer must hold (appended since its last
    /// compression).
    pub fn write(
        &mut self,
        id: SeqId,
        layer: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let c = self.cfg;
        let (kr, vr) = (c.kv_heads * c.head_dim, c.kv_heads * c.v_dim);
        if !k.len().is_multiple_of(kr)
            || v.len() / vr != k.len() / kr
            || !v.len().is_multiple_of(vr)
        {
            return Err(param(format!(
                "write: k holds {} values and v {}, expected n x {kr} and n x {vr}",
                k.len(),
                v.len()
            )));
        }
        let n = k.len() / kr;
        let s = self.seq(id)?;
        let slen = s.len;
        if layer >= c.layers || pos + n > slen {
            return Err(param(format!(
                "write: layer {layer} (of {}), positions {pos}..{} outside the sequence of length {}",
                c.layers,
                pos + n,
                slen
            )));
        }
        if n == 0 {
            return Ok(());
        }
        // Entry of `pos` in each head: the last n entries hold the last positions if no
        // compression dropped them. The slot of each (head, new position) first, then the copy.
        let p = c.page_size;
        let mut slots = Vec::with_capacity(c.kv_heads * n);
        for kh in 0..c.kv_heads {
            let h = &s.heads[layer * c.kv_heads + kh];
            match (h.len() + pos).checked_sub(slen) {
                Some(e0)
                    if h.pos[e0] as usize == pos && h.pos[e0 + n - 1] as usize == pos + n - 1 =>
                {
                    slots.extend((e0..e0 + n).map(|e| h.pages[e / p] as usize * p + e % p))
                }
                _ => {
                    return Err(param(format!(
                        "write: layer {layer} KV head {kh} no longer holds positions {pos}..{} (compressed away)",
                        pos + n
                    )))
                }
            }
        }
        let (d, dv) = (c.head_dim, c.v_dim);
        for (i, &slot) in slots.iter().enumerate() {
            let (kh, t) = (i / n, i % n);
            self.k[slot * d..][..d].copy_from_slice(&k[(t * c.kv_heads + kh) * d..][..d]);
            self.v[slot * dv..][..dv].copy_from_slice(&v[(t * c.kv_heads + kh) * dv..][..dv]);
        }
        Ok(())
    }

    /// Overwrites K `[D]` and V `[Dv]` of entry `e` of one (sequence, layer, KV head), an entry
    /// in full precision; its position stays (the residual slot of a merging press,
    /// [`press::merge`]).
    pub fn set_entry(
        &mut self,
        id: SeqId,
        layer: usize,
        kh: usize,
        e: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let c = self.cfg;
        if k.len() != c.head_dim || v.len() != c.v_dim {
            return Err(param(format!(
                "set_entry: k holds {} values and v {}, expected {} and {}",
                k.len(),
                v.len(),
                c.head_dim,
                c.v_dim
            )));
        }
        let h = self.head(id, layer, kh)?;
        let nq = h.quant.len();
        if e < nq || e >= h.held() {
            return Err(param(format!(
                "set_entry: entry {e} of layer {layer} KV head {kh}, which holds {nq} quantized and {} full-precision entries",
                h.len()
            )));
        }
        let r = e - nq;
        let slot = h.pages[r / c.page_size] as usize * c.page_size + r % c.page_size;
        self.k[slot * c.head_dim..][..c.head_dim].copy_from_slice(k);
        self.v[slot * c.v_dim..][..c.v_dim].copy_from_slice(v);
        Ok(())
    }

    /// Convenience: extends by `n` and writes every layer (`kv[l] = (k, v)` of layer l).
    pub fn append(&mut self, id: SeqId, kv: &[(&[f32], &[f32])]) -> Result<usize> {
        if kv.len() != self.cfg.layers {
            return Err(param(format!(
                "append: {} layers given, the cache has {}",
                kv.len(),
                self.cfg.layers
            )));
        }
        let n = kv[0].0.len() / (self.cfg.kv_heads * self.cfg.head_dim);
        let pos = self.extend(id, n)?;
        for (l, (k, v)) in kv.iter().enumerate() {
            self.write(id, l, pos, k, v)?;
        }
        Ok(pos)
    }

    /// K `[len, D]` and V `[len, Dv]` of the entries of one (sequence, layer, KV head), copied
    /// out contiguously, and their positions.
    pub fn gather_head(
        &self,
        id: SeqId,
        layer: usize,
        kh: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<u32>)> {
        let c = self.cfg;
        let h = self.head(id, layer, kh)?;
        let (p, d, dv) = (c.page_size, c.head_dim, c.v_dim);
        let mut k = Vec::with_capacity(h.held() * d);
        let mut v = Vec::with_capacity(h.held() * dv);
        if !h.quant.is_empty() {
            // Quantized entries come out dequantized (the plain path: scores, key norms).
            let (qk, qv) = h.quant.dequantize();
            k.extend(qk);
            v.extend(qv);
        }
        for (lp, &pp) in h.pages.iter().enumerate() {
            let m = (h.len() - lp * p).min(p);
            let pp = pp as usize * p;
            k.extend_from_slice(&self.k[pp * d..(pp + m) * d]);
            v.extend_from_slice(&self.v[pp * dv..(pp + m) * dv]);
        }
        Ok((k, v, [&h.quant.pos[..], &h.pos[..]].concat()))
    }

    /// K `[n, D]` of the entries `from ..` of one (sequence, layer, KV head), every one in
    /// full precision (what appending added since `from`).
    pub fn head_keys(&self, id: SeqId, layer: usize, kh: usize, from: usize) -> Result<Vec<f32>> {
        let c = self.cfg;
        let h = self.head(id, layer, kh)?;
        let nq = h.quant.len();
        if from < nq || from > h.held() {
            return Err(param(format!(
                "head_keys: entries {from}.. of layer {layer} KV head {kh}, which holds {} quantized and {} full-precision entries",
                nq,
                h.len()
            )));
        }
        let (p, d) = (c.page_size, c.head_dim);
        let mut k = Vec::with_capacity((h.held() - from) * d);
        for e in from - nq..h.len() {
            let slot = h.pages[e / p] as usize * p + e % p;
            k.extend_from_slice(&self.k[slot * d..][..d]);
        }
        Ok(k)
    }

    /// K and V of positions `0..len` of one layer copied out contiguously (`[len, Hk, D]`,
    /// `[len, Hk, Dv]`): for reference paths and capture. Every head of the layer must hold
    /// every position (no compression); see [`gather_head`](Self::gather_head) otherwise.
    pub fn gather(&self, id: SeqId, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = self.cfg;
        let len = self.seq(id)?.len;
        let (hk, d, dv) = (c.kv_heads, c.head_dim, c.v_dim);
        let mut k = vec![0.0f32; len * hk * d];
        let mut v = vec![0.0f32; len * hk * dv];
        for kh in 0..hk {
            let (hkv, hvv, _) = self.gather_head(id, layer, kh)?;
            if hkv.len() != len * d {
                return Err(param(format!(
                    "gather: layer {layer} KV head {kh} holds {} of the {len} positions (compressed); gather it with gather_head",
                    hkv.len() / d
                )));
            }
            for j in 0..len {
                k[(j * hk + kh) * d..][..d].copy_from_slice(&hkv[j * d..][..d]);
                v[(j * hk + kh) * dv..][..dv].copy_from_slice(&hvv[j * dv..][..dv]);
            }
        }
        Ok((k, v))
    }

    /// Checks a keep set of one head: strictly increasing entry indices below the head's length.
    pub fn check_keep(&self, id: SeqId, layer: usize, kh: usize, keep: &[usize]) -> Result<()> {
        let len = self.head(id, layer, kh)?.held();
        for (i, &e) in keep.iter().enumerate() {
            if e >= len || (i > 0 && e <= keep[i - 1]) {
                return Err(param(format!(
                    "compress: layer {layer} KV head {kh}: keep[{i}] = {e} is not a strictly increasing entry index below the head's {len} entries"
                )));
            }
        }
        Ok(())
    }

    /// Keeps entries `keep` (strictly increasing indices into the head's entries) of one
    /// (sequence, layer, KV head): entry `keep[i]` moves to index i (in place, ascending; a
    /// source is never overwritten before it is read since `keep[i] >= i`), the table shrinks to
    /// `ceil(|keep| / P)` pages and the rest go back to the free list. Returns the pages freed.
    /// Bad input changes nothing.
    pub fn compress(
        &mut self,
        id: SeqId,
        layer: usize,
        kh: usize,
        keep: &[usize],
    ) -> Result<usize> {
        self.check_keep(id, layer, kh, keep)?;
        let hi = layer * self.cfg.kv_heads + kh;
        let s = self.seqs[id.0].as_mut().expect("checked above");
        let h = &mut s.heads[hi];
        // Quantized entries first (indices below nq), then the residual's, renumbered from 0.
        let nq = h.quant.len();
        let split = keep.partition_point(|&e| e < nq);
        if split < nq {
            h.quant.compact(&keep[..split]);
        }
        let rest: Vec<usize> = keep[split..].iter().map(|&e| e - nq).collect();
        Ok(self.compact_residual(id, hi, &rest))
    }

    /// Keeps residual entries `keep` (strictly increasing, checked) of head `hi` of a live
    /// sequence: entry `keep[i]` moves to index i (in place, ascending; a source is never
    /// overwritten before it is read since `keep[i] >= i`), the table shrinks to
    /// `ceil(|keep| / P)` pages and the rest go back to the free list. Returns the pages freed.
    fn compact_residual(&mut self, id: SeqId, hi: usize, keep: &[usize]) -> usize {
        let c = self.cfg;
        let (p, d, dv) = (c.page_size, c.head_dim, c.v_dim);
        let s = self.seqs[id.0].as_mut().expect("live sequence");
        let h = &mut s.heads[hi];
        let slot = |pages: &[u32], e: usize| pages[e / p] as usize * p + e % p;
        for (i, &e) in keep.iter().enumerate() {
            if i == e {
                continue;
            }
            let (src, dst) = (slot(&h.pages, e), slot(&h.pages, i));
            self.k.copy_within(src * d..(src + 1) * d, dst * d);
            self.v.copy_within(src * dv..(src + 1) * dv, dst * dv);
            h.pos[i] = h.pos[e];
        }
        h.pos.truncate(keep.len());
        let freed = h.pages.split_off(keep.len().div_ceil(p));
        let n = freed.len();
        self.free.extend(freed.into_iter().rev());
        n
    }

    /// Quantizes sequence `id` under `kivi` (see [`kivi`]): in every (layer, KV head) the oldest
    /// residual entries move into the head's quantized store in whole groups of G while the
    /// residual holds at least R + G entries; their pages go back to the free list. Returns the
    /// entries quantized. `bits=16` does nothing. Checked before anything changes (dims, and
    /// heads quantized under another setting). A mixed policy (`zipvl`) needs the running
    /// scores: [`quantize_scored`](Self::quantize_scored).
    pub fn quantize(&mut self, id: SeqId, kivi: &kivi::Kivi) -> Result<usize> {
        self.quantize_scored(id, kivi, None)
    }

    /// [`quantize`](Self::quantize) with the running scores of the sequence, which a mixed
    /// policy ranks groups by ([`kivi`]'s ZipVL rule; [`score::KvScores`] of
    /// [`score::ScoreKind::A2sf`] with the policy's f, in step with the cache): each new group
    /// takes the high bit width when it is among the head's important units, and quantized
    /// high-width groups that are no longer important are re-quantized to the low width.
    pub fn quantize_scored(
        &mut self,
        id: SeqId,
        kivi: &kivi::Kivi,
        scores: Option<&score::KvScores>,
    ) -> Result<usize> {
        let c = self.cfg;
        kivi.check_dims(c.head_dim, c.v_dim)?;
        if kivi.is_noop() {
            return Ok(0);
        }
        if let Some(m) = kivi.mixed {
            let s = scores.ok_or_else(|| {
                param(format!(
                    "quantize: `{kivi}` ranks groups by their recent attention, and no scores were given (KvScores of ScoreKind::A2sf({}), observed every step)",
                    m.f
                ))
            })?;
            if s.kind != score::ScoreKind::A2sf(m.f) || s.scores.len() != c.layers * c.kv_heads {
                return Err(param(format!(
                    "quantize: `{kivi}` needs A2SF({}) scores of {} layers x {} KV heads, got {:?} scores of {} heads",
                    m.f,
                    c.layers,
                    c.kv_heads,
                    s.kind,
                    s.scores.len()
                )));
            }
            debug_assert!(m.bits > kivi.bits);
        }
        let (g, r) = (kivi.group, kivi.residual);
        for (hi, h) in self.seq(id)?.heads.iter().enumerate() {
            let q = &h.quant;
            if !q.is_empty()
                && (q.group() != kivi.group
                    || q.group_bits().iter().any(|&b| !kivi.allows_bits(b as u32)))
            {
                return Err(param(format!(
                    "quantize: layer {} KV head {} holds entries quantized in groups of {} at bits {:?}, asked {kivi}",
                    hi / c.kv_heads,
                    hi % c.kv_heads,
                    q.group(),
                    q.group_bits()
                )));
            }
        }
        let (p, d, dv) = (c.page_size, c.head_dim, c.v_dim);
        let mut total = 0;
        for hi in 0..c.layers * c.kv_heads {
            let h = &self.seq(id)?.heads[hi];
            let nr = h.len();
            if nr < r + g {
                continue;
            }
            let m = (nr - r) / g * g;
            // ZipVL (module kivi): the head's units are its quantized groups, the m / g groups
            // about to be, and its other residual entries one by one; `hot[x]`: whether new group
            // x is among the important units, `widths[x]`: quantized group x's width from now on.
            let (mut hot, mut widths) = (Vec::new(), Vec::new());
            if let (Some(mx), Some(s)) = (kivi.mixed, scores) {
                let a = |e: usize| s.scores[hi].get(e).copied().unwrap_or(0.0) as f64;
                let nq = h.quant.len();
                let mut units = Vec::new();
                let mut e0 = 0;
                for x in 0..h.quant.group_bits().len() {
                    let n = h.quant.group_len(x);
                    units.push((e0..e0 + n).map(a).sum::<f64>());
                    e0 += n;
                }
                let old = units.len();
                units.extend(
                    (0..m)
                        .step_by(g)
                        .map(|g0| (nq + g0..nq + g0 + g).map(a).sum::<f64>()),
                );
                units.extend((nq + m..nq + nr).map(a));
                let imp = kivi::important_set(&units, mx.mass);
                hot = imp[old..old + m / g].to_vec();
                widths = h
                    .quant
                    .group_bits()
                    .iter()
                    .zip(&imp[..old])
                    .map(|(&b, &i)| if i { b as u32 } else { kivi.bits })
                    .collect();
            }
            let mut groups = Vec::with_capacity(m / g);
            for g0 in (0..m).step_by(g) {
                let mut k = Vec::with_capacity(g * d);
                let mut v = Vec::with_capacity(g * dv);
                for e in g0..g0 + g {
                    let slot = h.pages[e / p] as usize * p + e % p;
                    k.extend_from_slice(&self.k[slot * d..][..d]);
                    v.extend_from_slice(&self.v[slot * dv..][..dv]);
                }
                let bits = match kivi.mixed {
                    Some(mx) if hot[g0 / g] => mx.bits,
                    _ => kivi.bits,
                };
                groups.push((bits, k, v, h.pos[g0..g0 + g].to_vec()));
            }
            let s = self.seqs[id.0].as_mut().expect("live sequence");
            let q = &mut s.heads[hi].quant;
            if kivi.mixed.is_some() {
                q.rewidth(kivi, &widths)?;
            }
            for (bits, k, v, pos) in groups {
                q.push_group(kivi, bits, d, dv, &k, &v, &pos)?;
            }
            let rest: Vec<usize> = (m..nr).collect();
            self.compact_residual(id, hi, &rest);
            total += m;
        }
        Ok(total)
    }

    /// Quantized entries of sequence `id` by bit width (ascending), over every (layer, KV head).
    pub fn quantized_by_bits(&self, id: SeqId) -> Result<Vec<(u32, usize)>> {
        let mut by = std::collections::BTreeMap::new();
        for h in &self.seq(id)?.heads {
            for (g, &b) in h.quant.group_bits().iter().enumerate() {
                *by.entry(b as u32).or_insert(0) += h.quant.group_len(g);
            }
        }
        Ok(by.into_iter().collect())
    }

    /// Per-head block tables of one layer for a batch of sequences, as the decode reads them:
    /// tables `[B, Hk, max_pages]` (padded with -1), `max_pages`, lengths `[B, Hk]`.
    pub fn head_tables(&self, ids: &[SeqId], layer: usize) -> Result<(Vec<i32>, usize, Vec<i32>)> {
        let hk = self.cfg.kv_heads;
        let mut heads = Vec::with_capacity(ids.len() * hk);
        for &id in ids {
            for kh in 0..hk {
                heads.push(self.head(id, layer, kh)?);
            }
        }
        let w = heads
            .iter()
            .map(|h| h.pages.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut t = vec![-1i32; heads.len() * w];
        for (r, h) in heads.iter().enumerate() {
            for (x, &pg) in t[r * w..].iter_mut().zip(&h.pages) {
                *x = pg as i32;
            }
        }
        let lens = heads.iter().map(|h| h.len() as i32).collect();
        Ok((t, w, lens))
    }

    /// One new query per sequence (`q` `[B, 1, Hq, D]`, the last position of each sequence of
    /// `ids`, already written) against one layer: the paged decode ([`decode::decode`]) over the
    /// per-head tables. K and V must have the same head dim.
    pub fn decode(
        &self,
        ids: &[SeqId],
        layer: usize,
        q: &TensorView,
        params: &decode::DecodeParams,
    ) -> Result<AttnOutput> {
        let c = self.cfg;
        if c.v_dim != c.head_dim {
            return Err(param(format!(
                "decode needs V's head dim ({}) equal to K's ({})",
                c.v_dim, c.head_dim
            )));
        }
        if self.any_quantized(ids, layer)? {
            return self.decode_quantized(ids, layer, q, params);
        }
        let (t, w, lens) = self.head_tables(ids, layer)?;
        let kv = decode::PagedKv {
            k: Slice::F32(&self.k),
            v: Slice::F32(&self.v),
            page_size: c.page_size,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
        };
        decode::decode(q, &kv, &decode::BlockTables::per_head(&t, w, &lens), params)
    }

    fn any_quantized(&self, ids: &[SeqId], layer: usize) -> Result<bool> {
        for &id in ids {
            for kh in 0..self.cfg.kv_heads {
                if !self.head(id, layer, kh)?.quant.is_empty() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Decode over heads with quantized entries: each sequence's query row attends its entries
    /// through [`attend`](Self::attend) (quantized part dequantized in the inner loop, residual
    /// through the kernel, merged by LSE).
    fn decode_quantized(
        &self,
        ids: &[SeqId],
        layer: usize,
        q: &TensorView,
        params: &decode::DecodeParams,
    ) -> Result<AttnOutput> {
        let [b, one, hq, d] = q.shape;
        if b != ids.len() || one != 1 {
            return Err(Error::Shape {
                op: "kv decode",
                tensor: "q".into(),
                got: q.shape.to_vec(),
                expected: format!("[{}, 1, Hq, {d}]", ids.len()),
            });
        }
        let ap = AttnParams {
            scale: params.scale,
            softcap: params.softcap,
            ..Default::default()
        };
        let dv = self.cfg.v_dim;
        let mut out = Vec::with_capacity(b * hq * dv);
        let mut lse = Vec::with_capacity(b * hq);
        for (bi, &id) in ids.iter().enumerate() {
            let qb = TensorView::strided(
                slice_from(q.data, q.offset(bi, 0, 0, 0)),
                [1, 1, hq, d],
                q.strides,
            )?;
            let r = self.attend(id, layer, &qb, None, &ap)?;
            out.extend(r.out.data.to_f32_vec());
            lse.extend(r.lse);
        }
        Ok(AttnOutput {
            out: Tensor::new(Buffer::F32(out), vec![b, 1, hq, dv])?,
            lse,
        })
    }

    /// Runs of physically consecutive pages of a head: (first entry, first physical page, entries).
    fn runs(&self, h: &HeadTable) -> Vec<(usize, usize, usize)> {
        let p = self.cfg.page_size;
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (lp, &pp) in h.pages.iter().enumerate() {
            let m = (h.len() - lp * p).min(p);
            match runs.last_mut() {
                Some(r) if r.1 + r.2 / p == pp as usize && r.2 % p == 0 => r.2 += m,
                _ => runs.push((lp * p, pp as usize, m)),
            }
        }
        runs
    }

    /// Attention of `q` `[1, Sq, Hq, D]` (the last Sq positions of the sequence, already written)
    /// over the entries of one layer, under `mask` (`None` = every pair) evaluated at the
    /// entries' positions. Output `[1, Sq, Hq, Dv]` f32 and LSE `[1, Hq, Sq]`.
    pub fn attend(
        &self,
        id: SeqId,
        layer: usize,
        q: &TensorView,
        mask: Option<&MaskExpr>,
        params: &AttnParams,
    ) -> Result<AttnOutput> {
        let c = self.cfg;
        let s = self.seq(id)?;
        let [_, sq, hq, d] = q.shape;
        let bound = self.check_query("kv attend", s.len, layer, q, mask)?;
        let g = hq / c.kv_heads;
        let dv = c.v_dim;
        let mut out = vec![0.0f32; sq * hq * dv];
        let mut lse = vec![f32::NEG_INFINITY; hq * sq];
        // The mask's schedule over positions, with key tiles of one page (built once, shared by
        // the heads that hold every position and span several runs).
        let mut page_sched: Option<BlockSchedule> = None;
        for kh in 0..c.kv_heads {
            let h = &s.heads[layer * c.kv_heads + kh];
            if h.held() == 0 {
                continue; // no entry: o = 0, lse = -inf
            }
            // The group's query heads: a strided view of q from head kh * G.
            let qg = TensorView::strided(
                slice_from(q.data, q.offset(0, 0, kh * g, 0)),
                [1, sq, g, d],
                q.strides,
            )?;
            let r =
                self.attend_entries(h, &qg, s.len, bound.as_ref(), &mut page_sched, params, None)?;
            let ro = r.out.data.to_f32_vec();
            for i in 0..sq {
                for gi in 0..g {
                    out[(i * hq + kh * g + gi) * dv..][..dv]
                        .copy_from_slice(&ro[(i * g + gi) * dv..][..dv]);
                    lse[(kh * g + gi) * sq + i] = r.lse[gi * sq + i];
                }
            }
        }
        Ok(AttnOutput {
            out: Tensor::new(Buffer::F32(out), vec![1, sq, hq, dv])?,
            lse,
        })
    }

    /// Checks the queries `q` `[1, Sq <= len, Hq (a multiple of the KV heads), D]` of `layer`
    /// against a sequence of `len` cached positions and binds `mask` to (Sq, len).
    fn check_query(
        &self,
        op: &'static str,
        len: usize,
        layer: usize,
        q: &TensorView,
        mask: Option<&MaskExpr>,
    ) -> Result<Option<BoundMask>> {
        let c = self.cfg;
        let [qb, sq, hq, d] = q.shape;
        if qb != 1
            || d != c.head_dim
            || sq > len
            || layer >= c.layers
            || !hq.is_multiple_of(c.kv_heads)
        {
            return Err(Error::Shape {
                op,
                tensor: "q".into(),
                got: q.shape.to_vec(),
                expected: format!(
                    "[1, Sq <= {len} (the cached length), Hq (a multiple of the {} KV heads), {}] and layer < {} (got layer {layer})",
                    c.kv_heads, c.head_dim, c.layers
                ),
            });
        }
        mask.map(|e| {
            e.bind(
                MaskShape {
                    batch: 1,
                    sq,
                    sk: len,
                },
                None,
            )
        })
        .transpose()
    }

    /// Attention of the query heads `q` `[1, Sq, Hq, D]` of one layer over the entries each
    /// query head selects: `select(query head, query row, position)` must hold (besides `mask`)
    /// for a key to be attended (Quest's pages). One kernel call per query head and run of
    /// pages, every tile read through the row mask; a head's quantized entries (KIVI) are
    /// attended under the same selection and merged with its full-precision ones by LSE.
    pub fn attend_selected(
        &self,
        id: SeqId,
        layer: usize,
        q: &TensorView,
        mask: Option<&MaskExpr>,
        params: &AttnParams,
        select: &(dyn Fn(usize, usize, usize) -> bool + Sync),
    ) -> Result<AttnOutput> {
        let c = self.cfg;
        let s = self.seq(id)?;
        let [_, sq, hq, d] = q.shape;
        let bound = self.check_query("kv attend_selected", s.len, layer, q, mask)?;
        let g = hq / c.kv_heads;
        let dv = c.v_dim;
        let mut out = vec![0.0f32; sq * hq * dv];
        let mut lse = vec![f32::NEG_INFINITY; hq * sq];
        let mut none: Option<BlockSchedule> = None;
        for h in 0..hq {
            let ht = &s.heads[layer * c.kv_heads + h / g];
            if ht.held() == 0 {
                continue;
            }
            let q1 = TensorView::strided(
                slice_from(q.data, q.offset(0, 0, h, 0)),
                [1, sq, 1, d],
                q.strides,
            )?;
            let sel = |i: usize, pos: usize| select(h, i, pos);
            let r = self.attend_entries(
                ht,
                &q1,
                s.len,
                bound.as_ref(),
                &mut none,
                params,
                Some(&sel),
            )?;
            let ro = r.out.data.to_f32_vec();
            for i in 0..sq {
                out[(i * hq + h) * dv..][..dv].copy_from_slice(&ro[i * dv..][..dv]);
                lse[h * sq + i] = r.lse[i];
            }
        }
        Ok(AttnOutput {
            out: Tensor::new(Buffer::F32(out), vec![1, sq, hq, dv])?,
            lse,
        })
    }

    /// One KV head's entries, quantized and full precision, attended by its group's query heads
    /// `qg` `[1, Sq, G, D]` (with `sel`, as in [`attend_head`](Self::attend_head), one query
    /// head narrowed to the positions it selects, in both parts). With a quantized part the two
    /// partial results (o_q, lse_q) and (o_r, lse_r) are merged by [`merge_partials`]:
    ///   lse = log(e^lse_q + e^lse_r),  o = e^(lse_q - lse) o_q + e^(lse_r - lse) o_r.
    #[allow(clippy::too_many_arguments)]
    fn attend_entries(
        &self,
        h: &HeadTable,
        qg: &TensorView,
        seq_len: usize,
        bound: Option<&BoundMask>,
        page_sched: &mut Option<BlockSchedule>,
        params: &AttnParams,
        sel: Option<&(dyn Fn(usize, usize) -> bool + Sync)>,
    ) -> Result<AttnOutput> {
        if h.quant.is_empty() {
            return self.attend_head(h, qg, seq_len, bound, page_sched, params, sel);
        }
        let [_, sq, g, _] = qg.shape;
        let mut parts = vec![self.attend_quant(h, qg, bound, params, sel)?];
        if h.len() > 0 {
            parts.push(self.attend_head(h, qg, seq_len, bound, page_sched, params, sel)?);
        }
        merge_partials(&parts, [1, sq, g, self.cfg.v_dim])
    }

    /// One KV head's quantized entries attended by its group's query heads `qg` `[1, Sq, G, D]`
    /// (`sel` as in [`attend_head`](Self::attend_head)): the entries dequantized once per call
    /// (x^ = lo + s c, [`kivi::QuantHead::dequantize`]) into f32 keys and values, then the CPU
    /// attention kernel over them with the mask (and selection) read at the entries' positions,
    /// every 64-key tile in part: the kernel's own SIMD / AMX paths, one dequantization for all
    /// the rows of the call instead of one per row.
    fn attend_quant(
        &self,
        h: &HeadTable,
        qg: &TensorView,
        bound: Option<&BoundMask>,
        params: &AttnParams,
        sel: Option<&(dyn Fn(usize, usize) -> bool + Sync)>,
    ) -> Result<AttnOutput> {
        let c = self.cfg;
        let sq = qg.shape[1];
        let q = &h.quant;
        let n = q.len();
        let (kd, vd) = q.dequantize();
        let k = TensorView::contiguous(&kd[..], [1, n, 1, c.head_dim])?;
        let v = TensorView::contiguous(&vd[..], [1, n, 1, c.v_dim])?;
        let sched = if bound.is_none() && sel.is_none() {
            BlockSchedule::full(64, 64, sq, n)?
        } else {
            every_tile_in_part(64, sq, n)?
        };
        let at = Shifted {
            inner: bound,
            off: 0,
            len: n,
            pos: Some(&q.pos),
            sel,
        };
        let spec = MaskSpec::Schedule {
            schedule: &sched,
            rows: (bound.is_some() || sel.is_some()).then_some(&at as &dyn RowMask),
        };
        crate::api::forward_host(qg, &k, &v, MaskArg::Prepared(spec), None, params)
    }

    /// One KV head's full-precision entries attended by its group's query heads `qg`
    /// `[1, Sq, G, D]`; `sel(query row, position)` (one query head only) narrows the keys.
    #[allow(clippy::too_many_arguments)]
    fn attend_head(
        &self,
        h: &HeadTable,
        qg: &TensorView,
        seq_len: usize,
        bound: Option<&BoundMask>,
        page_sched: &mut Option<BlockSchedule>,
        params: &AttnParams,
        sel: Option<&(dyn Fn(usize, usize) -> bool + Sync)>,
    ) -> Result<AttnOutput> {
        let c = self.cfg;
        let [_, sq, g, _] = qg.shape;
        let p = c.page_size;
        // Positions are strictly increasing and below seq_len: holding seq_len entries means
        // holding every position (entry j = position j). A selection reads every key through
        // the row mask, as a compressed head does.
        let whole = h.len() == seq_len && sel.is_none();
        let runs = self.runs(h);
        let view = |run: &(usize, usize, usize)| -> Result<(TensorView, TensorView)> {
            let (_, pp, m) = *run;
            let ks = &self.k[pp * p * c.head_dim..];
            let vs = &self.v[pp * p * c.v_dim..];
            Ok((
                TensorView::contiguous(&ks[..m * c.head_dim], [1, m, 1, c.head_dim])?,
                TensorView::contiguous(&vs[..m * c.v_dim], [1, m, 1, c.v_dim])?,
            ))
        };
        if whole && runs.len() == 1 {
            // One run holding every position: the kernel builds its own schedule from the mask.
            let (k, v) = view(&runs[0])?;
            let spec = match bound {
                Some(b) => MaskSpec::Expr(b),
                None => MaskSpec::Full,
            };
            return crate::api::forward_host(qg, &k, &v, MaskArg::Prepared(spec), None, params);
        }
        if whole && page_sched.is_none() {
            *page_sched = Some(match bound {
                Some(b) => b.schedule(64, p)?,
                None => BlockSchedule::full(64, p, sq, seq_len)?,
            });
        }
        let mut parts = Vec::with_capacity(runs.len());
        for run in &runs {
            let (k, v) = view(run)?;
            let (j0, _, m) = *run;
            let (t0, t1) = (j0 / p, (j0 + m).div_ceil(p));
            let sub = match (whole, bound) {
                // Every position: the run takes its columns of the mask's schedule.
                (true, _) => {
                    let full_sched = page_sched.as_ref().expect("built above");
                    let rows = (0..full_sched.q_tiles).map(|qt| {
                        full_sched
                            .row(0, 0, qt)
                            .iter()
                            .filter(|e| (t0..t1).contains(&(e.k_tile as usize)))
                            .map(|e| TileEntry {
                                k_tile: e.k_tile - t0 as u32,
                                kind: e.kind,
                            })
                            .collect::<Vec<_>>()
                    });
                    BlockSchedule::from_rows(64, p, sq, m, 1, 1, rows)?
                }
                // Compressed, no mask: every pair.
                (false, None) if sel.is_none() => BlockSchedule::full(64, p, sq, m)?,
                // Compressed under a mask or a selection: every tile in part, the mask read at
                // the positions.
                (false, _) => every_tile_in_part(p, sq, m)?,
            };
            let shifted = (bound.is_some() || sel.is_some()).then(|| Shifted {
                inner: bound,
                off: j0,
                len: m,
                pos: if whole {
                    None
                } else {
                    Some(&h.pos[j0..j0 + m])
                },
                sel,
            });
            let spec = MaskSpec::Schedule {
                schedule: &sub,
                rows: shifted.as_ref().map(|r| r as &dyn RowMask),
            };
            parts.push(crate::api::forward_host(
                qg,
                &k,
                &v,
                MaskArg::Prepared(spec),
                None,
                params,
            )?);
        }
        merge_partials(&parts, [1, sq, g, c.v_dim])
    }
}

/// The schedule of `sq` query rows against `m` keys in tiles of 64 x `tile_k` with every tile
/// Partial: the keys' mask is read per pair (at the entries' positions, through [`Shifted`]).
fn every_tile_in_part(tile_k: usize, sq: usize, m: usize) -> Result<BlockSchedule> {
    let row: Vec<TileEntry> = (0..m.div_ceil(tile_k) as u32)
        .map(|k_tile| TileEntry {
            k_tile,
            kind: TileKind::Partial,
        })
        .collect();
    BlockSchedule::from_rows(
        64,
        tile_k,
        sq,
        m,
        1,
        1,
        (0..sq.div_ceil(64)).map(|_| row.clone()),
    )
}

/// A row mask over entries `off .. off + len` of a head, renumbered from 0: with `pos = None` the
/// entries are positions `off ..` of `inner` (which is then given); else entry `j` is position
/// `pos[j]` (a compressed head, or a selection) and the mask (None: every pair) and the
/// selection `sel(row, position)` are read pair by pair there.
struct Shifted<'a> {
    inner: Option<&'a BoundMask>,
    off: usize,
    len: usize,
    pos: Option<&'a [u32]>,
    sel: Option<&'a (dyn Fn(usize, usize) -> bool + Sync)>,
}

impl RowMask for Shifted<'_> {
    fn row_bits(&self, b: usize, h: usize, i: usize, j0: usize, out: &mut [u64]) {
        match (self.pos, self.inner) {
            (None, Some(inner)) => inner.row_bits(b, h, i, j0 + self.off, out),
            (pos, inner) => {
                for (w, word) in out.iter_mut().enumerate() {
                    *word = 0;
                    for t in 0..64 {
                        let j = j0 + 64 * w + t;
                        if j >= self.len {
                            continue;
                        }
                        let at = pos.map_or(j + self.off, |p| p[j] as usize);
                        if inner.is_none_or(|m| m.allowed(b, i, at))
                            && self.sel.is_none_or(|f| f(i, at))
                        {
                            *word |= 1u64 << t;
                        }
                    }
                }
            }
        }
        // Keys at or past this run's end belong to the next run: clear them.
        for (w, word) in out.iter_mut().enumerate() {
            let first = j0 + 64 * w;
            if first >= self.len {
                *word = 0;
            } else if first + 64 > self.len {
                *word &= (1u64 << (self.len - first)) - 1;
            }
        }
    }
}

/// Merges attention results over disjoint key sets. With partials (o_i, lse_i) of one query row:
///   lse = log sum_i exp(lse_i),   o = sum_i exp(lse_i - lse) o_i.
/// A partial with lse_i = -inf (no allowed key) has weight 0; if every partial is -inf the row
/// stays o = 0, lse = -inf. `shape` is the `[B, Sq, Hq, Dv]` of every partial's output (f32).
pub fn merge_partials(parts: &[AttnOutput], shape: [usize; 4]) -> Result<AttnOutput> {
    let [b, sq, hq, dv] = shape;
    let mut out = vec![0.0f32; b * sq * hq * dv];
    let mut lse = vec![f32::NEG_INFINITY; b * hq * sq];
    let outs: Vec<Vec<f32>> = parts.iter().map(|p| p.out.data.to_f32_vec()).collect();
    for bi in 0..b {
        for h in 0..hq {
            for i in 0..sq {
                let li = (bi * hq + h) * sq + i;
                let m = parts
                    .iter()
                    .map(|p| p.lse[li])
                    .fold(f32::NEG_INFINITY, f32::max);
                if m == f32::NEG_INFINITY {
                    continue;
                }
                // Summed relative to the largest lse_i so exp never overflows.
                let sum: f64 = parts.iter().map(|p| ((p.lse[li] - m) as f64).exp()).sum();
                let l = m as f64 + sum.ln();
                lse[li] = l as f32;
                let o = &mut out[((bi * sq + i) * hq + h) * dv..][..dv];
                for (p, po) in parts.iter().zip(&outs) {
                    let w = ((p.lse[li] as f64) - l).exp() as f32;
                    if w == 0.0 {
                        continue;
                    }
                    let src = &po[((bi * sq + i) * hq + h) * dv..][..dv];
                    for (x, &y) in o.iter_mut().zip(src) {
                        *x += w * y;
                    }
                }
            }
        }
    }
    Ok(AttnOutput {
        out: Tensor::new(Buffer::F32(out), shape.to_vec())?,
        lse,
    })
}

#[cfg(test)]
pub(crate) mod tests;
