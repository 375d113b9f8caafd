//! Paged KV cache on the CPU and attention of new queries against it.
//!
//! Storage: a pool of pages of `P` tokens. Each layer owns one K buffer and one V buffer laid out
//! `[page][P][Hk][D]` (f32), so page `p` of every layer is the same slot. A sequence owns a block
//! table (logical page -> physical page) and a length; `extend` grows the length and takes pages
//! from the free list (or grows the pool), `drop_sequence` returns its pages to the free list and
//! `trim` gives back the memory of free pages at the end of the pool.
//!
//! Attention (`attend`): the queries are the last `Sq` positions of the sequence (the mask is
//! bottom-right aligned: query row i sits at position i + Sk - Sq, as in [`crate::forward`]). The
//! block table is split into runs of physically consecutive pages; each run is a strided
//! `[1, run_len, Hk, D]` view of the pool, attended with [`crate::forward`], and the partial
//! results are merged by their LSE (see [`merge_partials`]).
pub mod decode;

use crate::api::MaskArg;
use crate::attention::{AttnOutput, AttnParams, MaskSpec};
use crate::error::{Error, Result};
use crate::mask::{BlockSchedule, BoundMask, MaskExpr, MaskShape, RowMask, TileEntry};
use crate::tensor::{Buffer, Tensor, TensorView};

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

#[derive(Clone, Debug, Default)]
struct Seq {
    pages: Vec<u32>,
    len: usize,
}

/// The paged cache: see the module documentation.
pub struct PagedKvCache {
    cfg: KvConfig,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
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
            k: vec![Vec::new(); cfg.layers],
            v: vec![Vec::new(); cfg.layers],
            n_pages: 0,
            free: Vec::new(),
            seqs: Vec::new(),
        })
    }

    pub fn config(&self) -> KvConfig {
        self.cfg
    }
    fn k_page(&self) -> usize {
        self.cfg.page_size * self.cfg.kv_heads * self.cfg.head_dim
    }
    fn v_page(&self) -> usize {
        self.cfg.page_size * self.cfg.kv_heads * self.cfg.v_dim
    }

    /// Starts an empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        if let Some(i) = self.seqs.iter().position(|s| s.is_none()) {
            self.seqs[i] = Some(Seq::default());
            return SeqId(i);
        }
        self.seqs.push(Some(Seq::default()));
        SeqId(self.seqs.len() - 1)
    }

    fn seq(&self, id: SeqId) -> Result<&Seq> {
        self.seqs
            .get(id.0)
            .and_then(|s| s.as_ref())
            .ok_or_else(|| param(format!("sequence {} does not exist (dropped?)", id.0)))
    }

    /// Tokens held for a sequence.
    pub fn len(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.len)
    }

    /// Releases the pages of a sequence to the free list.
    pub fn drop_sequence(&mut self, id: SeqId) -> Result<()> {
        self.seq(id)?;
        let s = self.seqs[id.0].take().unwrap_or_default();
        self.free.extend(s.pages);
        Ok(())
    }

    /// Pages in use by live sequences.
    pub fn pages_in_use(&self) -> usize {
        self.n_pages - self.free.len()
    }
    /// Bytes of K/V storage held by the pool (all layers).
    pub fn bytes_allocated(&self) -> usize {
        self.n_pages * (self.k_page() + self.v_page()) * self.cfg.layers * 4
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
        for l in 0..self.cfg.layers {
            self.k[l].truncate(self.n_pages * kp);
            self.k[l].shrink_to_fit();
            self.v[l].truncate(self.n_pages * vp);
            self.v[l].shrink_to_fit();
        }
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
        for l in 0..self.cfg.layers {
            self.k[l].resize(self.n_pages * kp, 0.0);
            self.v[l].resize(self.n_pages * vp, 0.0);
        }
        p
    }

    /// Grows a sequence by `n` positions (pages taken as needed) and returns the first new position.
    /// The new positions must then be written in every layer with [`write`](Self::write) before
    /// they are attended.
    pub fn extend(&mut self, id: SeqId, n: usize) -> Result<usize> {
        let len = self.seq(id)?.len;
        let need = (len + n).div_ceil(self.cfg.page_size);
        let mut new_pages = Vec::new();
        for _ in self.seq(id)?.pages.len()..need {
            new_pages.push(self.take_page());
        }
        let s = self.seqs[id.0]
            .as_mut()
            .ok_or_else(|| param("gone".into()))?;
        s.pages.extend(new_pages);
        s.len = len + n;
        Ok(len)
    }

    /// Writes K `[n, Hk, D]` and V `[n, Hk, Dv]` (row-major) of one layer at positions
    /// `pos .. pos + n`, which must lie inside the sequence.
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
        let (slen, pages) = (s.len, s.pages.clone());
        if layer >= c.layers || pos + n > slen {
            return Err(param(format!(
                "write: layer {layer} (of {}), positions {pos}..{} outside the sequence of length {}",
                c.layers,
                pos + n,
                slen
            )));
        }
        let p = c.page_size;
        let mut t = 0;
        while t < n {
            let at = pos + t;
            let page = pages[at / p] as usize;
            let off = at % p;
            let m = (p - off).min(n - t);
            let kd = &mut self.k[layer][(page * p + off) * kr..][..m * kr];
            kd.copy_from_slice(&k[t * kr..(t + m) * kr]);
            let vd = &mut self.v[layer][(page * p + off) * vr..][..m * vr];
            vd.copy_from_slice(&v[t * vr..(t + m) * vr]);
            t += m;
        }
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

    /// K and V of positions `0..len` of one layer copied out contiguously (`[len, Hk, D]`,
    /// `[len, Hk, Dv]`): for reference paths and capture.
    pub fn gather(&self, id: SeqId, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = self.cfg;
        let s = self.seq(id)?;
        let (kr, vr) = (c.kv_heads * c.head_dim, c.kv_heads * c.v_dim);
        let mut k = Vec::with_capacity(s.len * kr);
        let mut v = Vec::with_capacity(s.len * vr);
        for (lp, &pp) in s.pages.iter().enumerate() {
            let m = (s.len - lp * c.page_size).min(c.page_size);
            let pp = pp as usize * c.page_size;
            k.extend_from_slice(&self.k[layer][pp * kr..(pp + m) * kr]);
            v.extend_from_slice(&self.v[layer][pp * vr..(pp + m) * vr]);
        }
        Ok((k, v))
    }

    /// Runs of physically consecutive pages: (first logical position, first physical page, tokens).
    fn runs(&self, s: &Seq) -> Vec<(usize, usize, usize)> {
        let p = self.cfg.page_size;
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (lp, &pp) in s.pages.iter().enumerate() {
            let m = (s.len - lp * p).min(p);
            match runs.last_mut() {
                Some(r) if r.1 + r.2 / p == pp as usize && r.2 % p == 0 => r.2 += m,
                _ => runs.push((lp * p, pp as usize, m)),
            }
        }
        runs
    }

    /// Attention of `q` `[1, Sq, Hq, D]` (the last Sq positions of the sequence, already written)
    /// over the whole sequence of one layer, under `mask` (`None` = every pair). Output
    /// `[1, Sq, Hq, Dv]` f32 and LSE `[1, Hq, Sq]`.
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
        let [qb, sq, hq, d] = q.shape;
        if qb != 1 || d != c.head_dim || sq > s.len || layer >= c.layers {
            return Err(Error::Shape {
                op: "kv attend",
                tensor: "q".into(),
                got: q.shape.to_vec(),
                expected: format!(
                    "[1, Sq <= {} (the cached length), Hq, {}] and layer < {} (got layer {layer})",
                    s.len, c.head_dim, c.layers
                ),
            });
        }
        let bound = match mask {
            Some(e) => Some(e.bind(
                MaskShape {
                    batch: 1,
                    sq,
                    sk: s.len,
                },
                None,
            )?),
            None => None,
        };
        let runs = self.runs(s);
        let view = |run: &(usize, usize, usize)| -> Result<(TensorView, TensorView)> {
            let (_, pp, m) = *run;
            let (kr, vr) = (c.kv_heads * c.head_dim, c.kv_heads * c.v_dim);
            let ks = &self.k[layer][pp * c.page_size * kr..];
            let vs = &self.v[layer][pp * c.page_size * vr..];
            Ok((
                TensorView::contiguous(&ks[..m * kr], [1, m, c.kv_heads, c.head_dim])?,
                TensorView::contiguous(&vs[..m * vr], [1, m, c.kv_heads, c.v_dim])?,
            ))
        };
        if runs.len() == 1 {
            // One run: the kernel builds its own schedule from the bound mask.
            let (k, v) = view(&runs[0])?;
            let spec = match &bound {
                Some(b) => MaskSpec::Expr(b),
                None => MaskSpec::Full,
            };
            return crate::api::forward_host(q, &k, &v, MaskArg::Prepared(spec), None, params);
        }
        // Several runs: one schedule with key tiles of one page; each run takes its columns.
        let full_sched = match &bound {
            Some(b) => b.schedule(64, c.page_size)?,
            None => BlockSchedule::full(64, c.page_size, sq, s.len)?,
        };
        let mut parts = Vec::with_capacity(runs.len());
        for run in &runs {
            let (k, v) = view(run)?;
            let (j0, _, m) = *run;
            let (t0, t1) = (j0 / c.page_size, (j0 + m).div_ceil(c.page_size));
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
            let sub = BlockSchedule::from_rows(64, c.page_size, sq, m, 1, 1, rows)?;
            let shifted = bound.as_ref().map(|b| Shifted {
                inner: b,
                off: j0,
                len: m,
            });
            let spec = MaskSpec::Schedule {
                schedule: &sub,
                rows: shifted.as_ref().map(|r| r as &dyn RowMask),
            };
            parts.push(crate::api::forward_host(
                q,
                &k,
                &v,
                MaskArg::Prepared(spec),
                None,
                params,
            )?);
        }
        merge_partials(&parts, [1, sq, hq, c.v_dim])
    }
}

/// A row mask over keys `off .. off + len` of `inner`, renumbered from 0.
struct Shifted<'a> {
    inner: &'a BoundMask,
    off: usize,
    len: usize,
}

impl RowMask for Shifted<'_> {
    fn row_bits(&self, b: usize, h: usize, i: usize, j0: usize, out: &mut [u64]) {
        self.inner.row_bits(b, h, i, j0 + self.off, out);
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
mod tests;
