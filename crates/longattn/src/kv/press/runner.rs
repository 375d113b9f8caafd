//! A press in the model: [`PressAttention`] is a [`crate::model::Attention`] that attends through
//! the paged cache under a mask (as [`MaskedAttention`]) and folds each layer's attention into the
//! press's running scores; between chunks the caller compresses with [`PressAttention::compress`]
//! (headroom = the next chunk's length), so the policy is applied as the cache grows. Positions
//! are never re-encoded: RoPE uses the position seen, whatever the cache still holds.
use std::sync::Mutex;

use super::{compress, CompressReport, Press};
use crate::attention::AttnOutput;
use crate::error::{Error, Result};
use crate::kv::score::{KvScores, Observation, Reduce, ScoreParams};
use crate::kv::{PagedKvCache, SeqId};
use crate::model::{Attention, LayerAttn, MaskedAttention};
use crate::tensor::TensorView;

/// Mask attention plus a press and its scores, for one sequence at a time.
pub struct PressAttention {
    inner: MaskedAttention,
    press: Press,
    reduce: Reduce,
    /// The running scores and the sequence they belong to (created at the first attention).
    scores: Mutex<Option<(SeqId, KvScores)>>,
}

impl PressAttention {
    /// `mask`: the attention's mask expression (usually `causal`); `reduce`: how a group's query
    /// heads are reduced into one score.
    pub fn new(mask: &str, press: Press, reduce: Reduce) -> Result<Self> {
        press.check()?;
        Ok(PressAttention {
            inner: MaskedAttention::new(mask)?,
            press,
            reduce,
            scores: Mutex::new(None),
        })
    }

    pub fn press(&self) -> &Press {
        &self.press
    }

    /// Compresses sequence `seq` under the press, leaving room for `headroom` positions.
    pub fn compress(
        &self,
        cache: &mut PagedKvCache,
        seq: SeqId,
        headroom: usize,
    ) -> Result<CompressReport> {
        let mut guard = self.scores.lock().unwrap_or_else(|e| e.into_inner());
        let scores = match guard.as_mut() {
            Some((s, sc)) if *s == seq => Some(sc),
            Some(_) => return Err(other_seq()),
            None => None,
        };
        compress(cache, seq, &self.press, scores, headroom)
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
        format!("{} with kv {}", self.inner.spec(), self.press)
    }
    fn attend(
        &self,
        cache: &PagedKvCache,
        seq: SeqId,
        q: &TensorView,
        layer: &LayerAttn,
    ) -> Result<AttnOutput> {
        let out = self.inner.attend(cache, seq, q, layer)?;
        let Some(kind) = self.press.score_kind() else {
            return Ok(out);
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
        };
        scores.observe(cache, seq, layer.layer, &obs)?;
        Ok(out)
    }
}
