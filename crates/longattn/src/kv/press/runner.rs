//! A press in the model: [`PressAttention`] is a [`crate::model::Attention`] that attends through
//! the paged cache under a mask (as [`MaskedAttention`]) and folds each layer's attention into the
//! press's running scores; between chunks the caller compresses with [`PressAttention::compress`]
//! (headroom = the next chunk's length), so the policy is applied as the cache grows. Positions
//! are never re-encoded: RoPE uses the position seen, whatever the cache still holds.
//!
//! A composed spec ([`KvSpec`]) runs its parts in a fixed order: after each forward the eviction
//! press, then quantization of what is kept ([`PagedKvCache::quantize_scored`]); Quest keeps its
//! page bounds up to date at each attention and selects pages per query ([`QuestIndex`]). The
//! running scores are the eviction press's kind, or A2SF's for `zipvl` (which ranks its groups
//! by their recent attention; the spec refuses a press that keeps another kind beside it).
use std::sync::Mutex;

use super::merge::MergeSlots;
use super::{compress_with, plan, CompressReport, KeepPlan, Press};
use crate::attention::{AttnOutput, AttnParams};
use crate::error::{Error, Result};
use crate::kv::quest::QuestIndex;
use crate::kv::roles::HeadRoles;
use crate::kv::score::{KvScores, Observation, Reduce, ScoreKind, ScoreParams};
use crate::kv::spec::KvSpec;
use crate::kv::{PagedKvCache, SeqId};
use crate::model::{Attention, LayerAttn, MaskedAttention};
use crate::tensor::TensorView;

/// Mask attention plus the policies of a spec and the press's scores, for one sequence at a time.
pub struct PressAttention {
    inner: MaskedAttention,
    spec: KvSpec,
    reduce: Reduce,
    /// The running scores and the sequence they belong to (created at the first attention).
    scores: Mutex<Option<(SeqId, KvScores)>>,
    /// Quest's page bounds and their sequence (created at the first attention).
    quest: Mutex<Option<(SeqId, QuestIndex)>>,
    /// `duo`'s head role table ([`set_roles`](Self::set_roles)).
    roles: Option<HeadRoles>,
    /// `+merge`: the residual slots and their sequence (created at the first compression).
    merge: Mutex<Option<(SeqId, MergeSlots)>>,
    /// Each layer's sliding window as its attentions reported it (`LayerAttn::window`): the
    /// entries no later query of such a layer can see are dropped before the press ranks.
    windows: Mutex<Vec<Option<usize>>>,
}

impl PressAttention {
    /// `mask`: the attention's mask expression (usually `causal`); `reduce`: how a group's query
    /// heads are reduced into one score.
    pub fn new(mask: &str, press: Press, reduce: Reduce) -> Result<Self> {
        Self::with_spec(mask, press.into(), reduce)
    }

    /// As [`new`](Self::new) with a composed spec.
    pub fn with_spec(mask: &str, spec: KvSpec, reduce: Reduce) -> Result<Self> {
        if let Some(p) = &spec.evict {
            p.check()?;
        }
        if let Some(k) = &spec.kivi {
            k.check()?;
        }
        if let Some(q) = &spec.quest {
            q.check()?;
        }
        Ok(PressAttention {
            inner: MaskedAttention::new(mask)?,
            spec,
            reduce,
            scores: Mutex::new(None),
            quest: Mutex::new(None),
            roles: None,
            merge: Mutex::new(None),
            windows: Mutex::new(Vec::new()),
        })
    }

    /// Gives `duo` its head role table (from [`crate::kv::roles::probe`] or a saved table);
    /// an error for any other press.
    pub fn set_roles(&mut self, roles: HeadRoles) -> Result<()> {
        if !self.spec.needs_roles() {
            return Err(Error::Param {
                op: "kv press",
                msg: format!("`{}` takes no head role table (only duo does)", self.spec),
            });
        }
        self.roles = Some(roles);
        Ok(())
    }

    /// The role table given with [`set_roles`](Self::set_roles).
    pub fn roles(&self) -> Option<&HeadRoles> {
        self.roles.as_ref()
    }

    /// Forgets the running scores and Quest's page bounds: the next attention starts a new
    /// sequence (call it before reusing the press on a new cache, whose sequence ids start
    /// again at the same values).
    pub fn reset(&self) {
        *self.scores.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.quest.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.merge.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.windows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn press(&self) -> &KvSpec {
        &self.spec
    }

    /// The running scores this spec needs: the eviction press's, else A2SF's for `zipvl`.
    fn score_kind(&self) -> Option<ScoreKind> {
        let zip = self.spec.kivi.and_then(|k| k.mixed);
        self.spec
            .evict
            .and_then(|p| p.score_kind())
            .or(zip.map(|m| ScoreKind::A2sf(m.f)))
    }

    /// The keep sets the eviction press would apply to sequence `seq` now (with `headroom`), and
    /// the values it ranks ([`super::plan`] over this press's running scores); nothing changes.
    /// An error for a spec without an eviction press.
    pub fn plan(&self, cache: &PagedKvCache, seq: SeqId, headroom: usize) -> Result<KeepPlan> {
        let press = self.spec.evict.as_ref().ok_or_else(|| Error::Param {
            op: "kv press",
            msg: format!("`{}` evicts nothing: no keep sets to plan", self.spec),
        })?;
        let mut guard = self.scores.lock().unwrap_or_else(|e| e.into_inner());
        let scores = of_seq(&mut guard, seq)?.map(|s| &*s);
        let mguard = self.merge.lock().unwrap_or_else(|e| e.into_inner());
        let fresh;
        let slots = match (self.spec.merge, mguard.as_ref()) {
            (false, _) => None,
            (true, Some((s, m))) if *s == seq => Some(m),
            (true, Some(_)) => return Err(other_seq()),
            (true, None) => {
                let c = cache.config();
                fresh = MergeSlots::new(c.layers, c.kv_heads);
                Some(&fresh)
            }
        };
        let targets = self.targets(cache, seq, press, headroom)?;
        plan(
            cache,
            seq,
            press,
            scores,
            headroom,
            self.roles.as_ref(),
            true,
            slots,
            targets.as_deref(),
        )
    }

    /// `+share`: the layers' entry counts with the budget shared ([`super::shared_targets`]);
    /// otherwise the press's own.
    fn targets(
        &self,
        cache: &PagedKvCache,
        seq: SeqId,
        press: &Press,
        headroom: usize,
    ) -> Result<Option<Vec<usize>>> {
        if !self.spec.share {
            return Ok(None);
        }
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        super::shared_targets(cache, seq, press, headroom, &windows).map(Some)
    }

    /// Compresses sequence `seq` under the spec, leaving room for `headroom` positions: the
    /// entries that layers with a sliding window can no longer see are dropped first
    /// ([`super::drop_dead`]: exact), then the eviction press ranks what is left, then
    /// quantization. A press that fails leaves the cache as it was apart from those dead
    /// entries (nothing any later query could read is lost).
    pub fn compress(
        &self,
        cache: &mut PagedKvCache,
        seq: SeqId,
        headroom: usize,
    ) -> Result<CompressReport> {
        let mut guard = self.scores.lock().unwrap_or_else(|e| e.into_inner());
        let mut scores = of_seq(&mut guard, seq)?;
        let dead = {
            let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
            let mut mguard = self.merge.lock().unwrap_or_else(|e| e.into_inner());
            let slots = of_seq(&mut mguard, seq)?;
            super::drop_dead(cache, seq, &windows, scores.as_deref_mut(), slots)?
        };
        let mut report = match &self.spec.evict {
            Some(press) => {
                let mut mguard = self.merge.lock().unwrap_or_else(|e| e.into_inner());
                let slots = if self.spec.merge {
                    let c = cache.config();
                    let (s, m) =
                        mguard.get_or_insert_with(|| (seq, MergeSlots::new(c.layers, c.kv_heads)));
                    if *s != seq {
                        return Err(other_seq());
                    }
                    Some(m)
                } else {
                    None
                };
                let targets = self.targets(cache, seq, press, headroom)?;
                compress_with(
                    cache,
                    seq,
                    press,
                    scores.as_deref_mut(),
                    headroom,
                    self.roles.as_ref(),
                    slots,
                    targets.as_deref(),
                )?
            }
            None => {
                let c = cache.config();
                let mut kept = Vec::with_capacity(c.layers * c.kv_heads);
                for l in 0..c.layers {
                    for kh in 0..c.kv_heads {
                        kept.push(cache.head_len(seq, l, kh)?);
                    }
                }
                CompressReport {
                    kept,
                    pages_freed: 0,
                }
            }
        };
        report.pages_freed += dead;
        if let Some(k) = &self.spec.kivi {
            let before = cache.pages_in_use();
            cache.quantize_scored(seq, k, scores.as_deref())?;
            report.pages_freed += before - cache.pages_in_use();
        }
        Ok(report)
    }
}

/// What `slot` holds if it belongs to sequence `seq` (None before the first use); an error if it
/// follows another sequence.
fn of_seq<T>(slot: &mut Option<(SeqId, T)>, seq: SeqId) -> Result<Option<&mut T>> {
    match slot {
        Some((s, x)) if *s == seq => Ok(Some(x)),
        Some(_) => Err(other_seq()),
        None => Ok(None),
    }
}

fn other_seq() -> Error {
    Error::Param {
        op: "kv press",
        msg: "the scores of this press follow another sequence (one PressAttention per sequence)"
            .into(),
    }
}

impl Attention for PressAttention {
    fn spec(&self) -> String {
        format!("{} with kv {}", self.inner.spec(), self.spec)
    }
    /// Its `compress` drops and evicts entries, its scores following them.
    fn evicts(&self) -> bool {
        true
    }
    fn attend(
        &self,
        cache: &PagedKvCache,
        seq: SeqId,
        q: &TensorView,
        layer: &LayerAttn,
    ) -> Result<AttnOutput> {
        {
            let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
            if w.len() <= layer.layer {
                w.resize(layer.layer + 1, None);
            }
            w[layer.layer] = layer.window;
        }
        if let Some(quest) = self.spec.quest {
            let mut guard = self.quest.lock().unwrap_or_else(|e| e.into_inner());
            if guard.is_none() {
                *guard = Some((seq, QuestIndex::new(quest, cache)?));
            }
            let (s, index) = guard.as_mut().expect("set above");
            if *s != seq {
                return Err(other_seq());
            }
            index.update(cache, seq, layer.layer)?;
            let expr = self.inner.expr_for(layer.window)?;
            let params = AttnParams {
                scale: Some(layer.scale),
                ..Default::default()
            };
            let sel = index.select(cache, seq, layer.layer, q)?;
            let out =
                index.attend_selection(cache, seq, layer.layer, q, Some(&expr), &params, &sel)?;
            if self.score_kind().is_none() {
                return Ok(out);
            }
            // The press's scores see what the queries attended: the selected pages.
            let select = index.selector(&sel, cache, layer.layer);
            self.observe(cache, seq, q, layer, &out, Some(&select))?;
            return Ok(out);
        }
        let out = self.inner.attend(cache, seq, q, layer)?;
        if self.score_kind().is_none() {
            return Ok(out);
        }
        self.observe(cache, seq, q, layer, &out, None)?;
        Ok(out)
    }
}

impl PressAttention {
    /// Folds one layer's attention (`out`'s LSE, the queries, the keys `select` let them attend)
    /// into the running scores.
    fn observe(
        &self,
        cache: &PagedKvCache,
        seq: SeqId,
        q: &TensorView,
        layer: &LayerAttn,
        out: &AttnOutput,
        select: Option<&(dyn Fn(usize, usize, usize) -> bool + Sync)>,
    ) -> Result<()> {
        let Some(kind) = self.score_kind() else {
            return Ok(());
        };
        let mut guard = self.scores.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let params = ScoreParams {
                scale: Some(layer.scale),
                softcap: None,
                reduce: self.reduce,
            };
            *guard = Some((seq, KvScores::new(cache, kind, params)?));
        }
        let (s, scores) = guard.as_mut().expect("set above");
        if *s != seq {
            return Err(other_seq());
        }
        scores.params.scale = Some(layer.scale);
        let expr = self.inner.expr_for(layer.window)?;
        let obs = Observation {
            q,
            lse: &out.lse,
            mask: Some(&expr),
            select,
        };
        scores.observe(cache, seq, layer.layer, &obs)
    }
}
