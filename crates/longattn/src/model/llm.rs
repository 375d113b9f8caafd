//! A small decoder-only LLM (Llama family: SmolLM2; Gemma-3) run by longattn.
//!
//! Per layer (x the residual stream `[n, d_model]`):
//!   h = RMSNorm(x) ; q, k, v = h Wq^T, h Wk^T, h Wv^T ; [Gemma: q, k <- RMSNorm per head (QK-norm)]
//!   q, k <- RoPE(q, k) (rotate-half; llama.cpp's Q/K row permutation undone at load for Llama)
//!   k, v -> paged KV cache ; a = Attention(q, cache) Wo^T ; [Gemma: a <- RMSNorm(a)] ; x += a
//!   h = RMSNorm(x) ; f = (act(h Wg^T) * (h Wu^T)) Wd^T (SiLU: SwiGLU, GELU-tanh: GeGLU)
//!   [Gemma: f <- RMSNorm(f)] ; x += f
//! then logits = RMSNorm(x) E^T with E the (tied) embedding. Gemma scales the embedding by
//! sqrt(d_model); its GGUF norm weights already hold (1 + w).
//!
//! Weights are dequantized to f32 once at load ([`WeightSource`]); matmuls go through
//! [`ops::matmul_t`] (the `gemm` crate); attention through an [`Attention`] method.
use super::attn::{Attention, LayerAttn};
use super::ops::{self, Mat};
use crate::error::{Error, Result};
use crate::kv::{KvConfig, PagedKvCache, SeqId};
use crate::tensor::TensorView;

/// What the model loader needs from a weight file (implemented for the GGUF reader; tests use a
/// synthetic source).
pub trait WeightSource {
    fn architecture(&self) -> String;
    /// An integer metadata value (any width).
    fn meta_int(&self, key: &str) -> Option<u64>;
    fn meta_float(&self, key: &str) -> Option<f32>;
    /// Dims of a tensor in GGML order (dims[0] contiguous), `None` when absent.
    fn dims(&self, name: &str) -> Option<Vec<usize>>;
    /// A tensor dequantized to f32, row-major `[dims[1]][dims[0]]` for 2-D.
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>>;
}

fn model_err(msg: String) -> Error {
    Error::Param { op: "model", msg }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Gemma3,
}

/// Hyper-parameters read from the file's metadata.
#[derive(Clone, Debug)]
pub struct Config {
    pub arch: Arch,
    pub layers: usize,
    pub d_model: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
    pub rms_eps: f32,
    /// RoPE base of global layers (and of every layer without sliding window).
    pub rope_base: f32,
    /// RoPE base of sliding-window layers.
    pub rope_base_local: f32,
    /// Sliding window (keys per query) of local layers, if any.
    pub window: Option<usize>,
    /// Layer l is local (sliding window) when `l % pattern < pattern - 1` (Gemma-3: 6).
    pub window_pattern: usize,
    pub embed_scale: f32,
    pub attn_scale: f32,
}

impl Config {
    pub fn from_source(src: &dyn WeightSource) -> Result<Config> {
        let a = src.architecture();
        let arch = match a.as_str() {
            "llama" => Arch::Llama,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(model_err(format!(
                    "unsupported architecture `{other}` (supported: llama, gemma3)"
                )))
            }
        };
        let int = |k: &str| -> Result<usize> {
            src.meta_int(&format!("{a}.{k}"))
                .map(|x| x as usize)
                .ok_or_else(|| model_err(format!("metadata key `{a}.{k}` missing")))
        };
        let layers = int("block_count")?;
        let d_model = int("embedding_length")?;
        let heads = int("attention.head_count")?;
        let kv_heads = src
            .meta_int(&format!("{a}.attention.head_count_kv"))
            .map_or(heads, |x| x as usize);
        let head_dim = src
            .meta_int(&format!("{a}.attention.key_length"))
            .map_or(d_model / heads.max(1), |x| x as usize);
        let ffn = int("feed_forward_length")?;
        let context = int("context_length")?;
        let rms_eps = src
            .meta_float(&format!("{a}.attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5);
        let emb = src
            .dims("token_embd.weight")
            .ok_or_else(|| model_err("tensor `token_embd.weight` missing".into()))?;
        let vocab = emb.get(1).copied().unwrap_or(0);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim % 2 != 0 {
            return Err(model_err(format!(
                "heads {heads} / kv heads {kv_heads} / head dim {head_dim}: need heads a multiple of kv heads and an even head dim"
            )));
        }
        let rope_base = src
            .meta_float(&format!("{a}.rope.freq_base"))
            .unwrap_or(10000.0);
        let (window, window_pattern, embed_scale, rope_base_local) = match arch {
            Arch::Llama => (None, 1, 1.0, rope_base),
            // llama.cpp's Gemma-3 conventions: 5 local layers then 1 global, local RoPE base 10k.
            Arch::Gemma3 => (
                src.meta_int("gemma3.attention.sliding_window")
                    .map(|w| w as usize),
                6,
                (d_model as f32).sqrt(),
                10000.0,
            ),
        };
        Ok(Config {
            arch,
            layers,
            d_model,
            heads,
            kv_heads,
            head_dim,
            ffn,
            vocab,
            context,
            rms_eps,
            rope_base,
            rope_base_local,
            window,
            window_pattern,
            embed_scale,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
        })
    }

    /// The sliding window of layer `l` (None on global layers).
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        self.window.filter(|_| {
            self.window_pattern > 1 && l % self.window_pattern < self.window_pattern - 1
        })
    }
    fn layer_rope_base(&self, l: usize) -> f32 {
        if self.layer_window(l).is_some() {
            self.rope_base_local
        } else {
            self.rope_base
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Mat,
    wk: Mat,
    wv: Mat,
    wo: Mat,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Mat,
    up: Mat,
    down: Mat,
    post_ffn_norm: Option<Vec<f32>>,
}

/// Load-time choices (the un-permutation switch exists for the self-check that it matters).
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub unpermute_qk: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { unpermute_qk: true }
    }
}

/// The model: config and f32 weights.
pub struct Model {
    pub cfg: Config,
    embed: Mat,
    output: Option<Mat>,
    out_norm: Vec<f32>,
    layers: Vec<Layer>,
}

/// Post-RoPE q `[n, Hq, D]`, k `[n, Hk, D]`, v `[n, Hk, Dv]` of one layer (for capture).
pub struct Captured<'a> {
    pub layer: usize,
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
}

impl Model {
    pub fn load(src: &dyn WeightSource, opts: LoadOptions) -> Result<Model> {
        let cfg = Config::from_source(src)?;
        let mat = |name: &str, rows: usize, cols: usize| -> Result<Mat> {
            let dims = src
                .dims(name)
                .ok_or_else(|| model_err(format!("tensor `{name}` missing")))?;
            if dims.len() != 2 || dims[0] != cols || dims[1] != rows {
                return Err(model_err(format!(
                    "tensor `{name}` has dims {dims:?}, expected [{cols}, {rows}]"
                )));
            }
            Ok(Mat::new(rows, cols, src.tensor_f32(name)?))
        };
        let vec = |name: &str, n: usize| -> Result<Vec<f32>> {
            let v = src.tensor_f32(name)?;
            if v.len() != n {
                return Err(model_err(format!(
                    "tensor `{name}` holds {} values, expected {n}",
                    v.len()
                )));
            }
            Ok(v)
        };
        let opt_vec = |name: &str, n: usize| -> Result<Option<Vec<f32>>> {
            match src.dims(name) {
                Some(_) => Ok(Some(vec(name, n)?)),
                None => Ok(None),
            }
        };
        let (d, hd) = (cfg.d_model, cfg.head_dim);
        let embed = mat("token_embd.weight", cfg.vocab, d)?;
        let output = match src.dims("output.weight") {
            Some(_) => Some(mat("output.weight", cfg.vocab, d)?),
            None => None,
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            let mut wq = mat(&n("attn_q"), cfg.heads * hd, d)?;
            let mut wk = mat(&n("attn_k"), cfg.kv_heads * hd, d)?;
            if cfg.arch == Arch::Llama && opts.unpermute_qk {
                wq = ops::unpermute_rows(&wq, cfg.heads);
                wk = ops::unpermute_rows(&wk, cfg.kv_heads);
            }
            layers.push(Layer {
                attn_norm: vec(&n("attn_norm"), d)?,
                wq,
                wk,
                wv: mat(&n("attn_v"), cfg.kv_heads * hd, d)?,
                wo: mat(&n("attn_output"), d, cfg.heads * hd)?,
                q_norm: opt_vec(&n("attn_q_norm"), hd)?,
                k_norm: opt_vec(&n("attn_k_norm"), hd)?,
                post_attn_norm: opt_vec(&n("post_attention_norm"), d)?,
                ffn_norm: vec(&n("ffn_norm"), d)?,
                gate: mat(&n("ffn_gate"), cfg.ffn, d)?,
                up: mat(&n("ffn_up"), cfg.ffn, d)?,
                down: mat(&n("ffn_down"), d, cfg.ffn)?,
                post_ffn_norm: opt_vec(&n("post_ffw_norm"), d)?,
            });
        }
        let out_norm = vec("output_norm.weight", d)?;
        Ok(Model {
            cfg,
            embed,
            output,
            out_norm,
            layers,
        })
    }

    /// A cache sized for this model.
    pub fn new_cache(&self, page_size: usize) -> Result<PagedKvCache> {
        PagedKvCache::new(KvConfig {
            layers: self.cfg.layers,
            kv_heads: self.cfg.kv_heads,
            head_dim: self.cfg.head_dim,
            v_dim: self.cfg.head_dim,
            page_size,
        })
    }

    /// Each layer's sliding window (keys per query, the query included); `None`: the layer
    /// attends over the whole prefix.
    pub fn windows(&self) -> Vec<Option<usize>> {
        (0..self.cfg.layers)
            .map(|l| self.cfg.layer_window(l))
            .collect()
    }

    /// Frees, in every sliding-window layer, the entries of `seq` that no later query can see
    /// (positions below L - W + 1, L the sequence's length: [`crate::kv::press::drop_dead`]).
    /// Exact for every attention the model runs, each of which applies the layer's window; it is
    /// what keeps a windowed model's cache (Gemma-3: five layers in six) at its windows' size.
    /// Returns the pages freed. A press ([`crate::kv::press::runner::PressAttention`]) does this
    /// itself in its `compress`, its scores following the entries.
    pub fn drop_dead(&self, cache: &mut PagedKvCache, seq: SeqId) -> Result<usize> {
        crate::kv::press::drop_dead(cache, seq, &self.windows(), None, None)
    }

    /// Multiply-add count (x2 = FLOPs) of the matmuls for `n` tokens, LM head on `rows` of them.
    pub fn matmul_flops(&self, n: usize, rows: usize) -> f64 {
        let c = &self.cfg;
        let qkvo = c.d_model * c.head_dim * (2 * c.heads + 2 * c.kv_heads);
        let per_tok = c.layers * (qkvo + 3 * c.d_model * c.ffn);
        2.0 * (n * per_tok + rows * c.vocab * c.d_model) as f64
    }

    /// Checks token ids against the vocabulary.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if let Some((i, &t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= self.cfg.vocab)
        {
            return Err(model_err(format!(
                "token id {t} at index {i} is out of range (vocabulary size {})",
                self.cfg.vocab
            )));
        }
        Ok(())
    }

    /// Runs `tokens` (appended to `seq` in the cache) through every layer and returns the final
    /// normalized hidden states `[n, d_model]`; `capture` sees each layer's post-RoPE q/k/v.
    pub fn forward(
        &self,
        cache: &mut PagedKvCache,
        seq: SeqId,
        tokens: &[u32],
        attn: &dyn Attention,
        mut capture: Option<&mut dyn FnMut(Captured)>,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let n = tokens.len();
        if n == 0 {
            return Err(model_err("forward: no tokens".into()));
        }
        self.check_tokens(tokens)?;
        let start = cache.len(seq)?;
        if start + n > c.context {
            return Err(model_err(format!(
                "{} tokens exceed the model's context of {} tokens",
                start + n,
                c.context
            )));
        }
        let pos0 = cache.extend(seq, n)?;
        let (d, hd, hq, hk) = (c.d_model, c.head_dim, c.heads, c.kv_heads);
        let mut x = Vec::with_capacity(n * d);
        for &t in tokens {
            x.extend(
                self.embed
                    .row(t as usize)
                    .iter()
                    .map(|&e| e * c.embed_scale),
            );
        }
        let mut h = vec![0.0f32; n * d];
        let mut q = vec![0.0f32; n * hq * hd];
        let mut k = vec![0.0f32; n * hk * hd];
        let mut v = vec![0.0f32; n * hk * hd];
        let mut a = vec![0.0f32; n * d];
        let mut g = vec![0.0f32; n * c.ffn];
        let mut u = vec![0.0f32; n * c.ffn];
        for (l, w) in self.layers.iter().enumerate() {
            h.copy_from_slice(&x);
            ops::rms_norm(&mut h, &w.attn_norm, c.rms_eps);
            ops::matmul_t(&h, n, &w.wq, &mut q);
            ops::matmul_t(&h, n, &w.wk, &mut k);
            ops::matmul_t(&h, n, &w.wv, &mut v);
            if let Some(qn) = &w.q_norm {
                ops::rms_norm(&mut q, qn, c.rms_eps);
            }
            if let Some(kn) = &w.k_norm {
                ops::rms_norm(&mut k, kn, c.rms_eps);
            }
            let base = c.layer_rope_base(l);
            ops::rope(&mut q, hq, hd, pos0, base);
            ops::rope(&mut k, hk, hd, pos0, base);
            cache.write(seq, l, pos0, &k, &v)?;
            if let Some(cb) = capture.as_mut() {
                cb(Captured {
                    layer: l,
                    q: &q,
                    k: &k,
                    v: &v,
                });
            }
            let qv = TensorView::contiguous(&q[..], [1, n, hq, hd])?;
            let la = LayerAttn {
                layer: l,
                scale: c.attn_scale,
                window: c.layer_window(l),
            };
            let o = attn.attend(cache, seq, &qv, &la)?;
            let o = match &o.out.data {
                crate::tensor::Buffer::F32(o) => o,
                _ => return Err(model_err("attention returned a non-f32 output".into())),
            };
            ops::matmul_t(o, n, &w.wo, &mut a);
            if let Some(pn) = &w.post_attn_norm {
                ops::rms_norm(&mut a, pn, c.rms_eps);
            }
            for (xi, ai) in x.iter_mut().zip(&a) {
                *xi += ai;
            }
            h.copy_from_slice(&x);
            ops::rms_norm(&mut h, &w.ffn_norm, c.rms_eps);
            ops::matmul_t(&h, n, &w.gate, &mut g);
            ops::matmul_t(&h, n, &w.up, &mut u);
            let act: fn(f32) -> f32 = match c.arch {
                Arch::Llama => ops::silu,
                Arch::Gemma3 => ops::gelu_tanh,
            };
            for (gi, ui) in g.iter_mut().zip(&u) {
                *gi = act(*gi) * ui;
            }
            ops::matmul_t(&g, n, &w.down, &mut a);
            if let Some(pn) = &w.post_ffn_norm {
                ops::rms_norm(&mut a, pn, c.rms_eps);
            }
            for (xi, ai) in x.iter_mut().zip(&a) {
                *xi += ai;
            }
        }
        ops::rms_norm(&mut x, &self.out_norm, c.rms_eps);
        Ok(x)
    }

    /// Logits `[rows, vocab]` of final hidden states `[rows, d_model]`.
    pub fn logits(&self, hidden: &[f32]) -> Vec<f32> {
        let rows = hidden.len() / self.cfg.d_model;
        let w = self.output.as_ref().unwrap_or(&self.embed);
        let mut y = vec![0.0f32; rows * self.cfg.vocab];
        ops::matmul_t(hidden, rows, w, &mut y);
        y
    }

    /// Feeds `prompt` in chunks of `chunk` tokens (memory O(chunk x vocab) for logits), then
    /// decodes greedily up to `max_new` tokens, stopping at `stop`. Returns the new tokens. After
    /// every forward the window layers' dead entries are freed ([`drop_dead`](Self::drop_dead)),
    /// unless `attn` evicts entries itself (a press, which the caller compresses).
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        cache: &mut PagedKvCache,
        seq: SeqId,
        prompt: &[u32],
        max_new: usize,
        stop: Option<u32>,
        attn: &dyn Attention,
        chunk: usize,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        // One forward, then the window layers' dead entries freed unless `attn` evicts itself.
        let step = |cache: &mut PagedKvCache, tokens: &[u32]| -> Result<Vec<f32>> {
            let h = self.forward(cache, seq, tokens, attn, None)?;
            if !attn.evicts() {
                self.drop_dead(cache, seq)?;
            }
            Ok(h)
        };
        let mut last = Vec::new();
        for part in prompt.chunks(chunk.max(1)) {
            last = step(cache, part)?;
        }
        let d = self.cfg.d_model;
        let mut hidden = last[last.len() - d..].to_vec();
        let mut out = Vec::new();
        for _ in 0..max_new {
            let t = ops::argmax(&self.logits(&hidden)) as u32;
            out.push(t);
            on_token(t);
            if Some(t) == stop || cache.len(seq)? >= self.cfg.context {
                break;
            }
            hidden = step(cache, &[t])?;
        }
        Ok(out)
    }
}

impl WeightSource for super::gguf::Gguf {
    fn architecture(&self) -> String {
        super::gguf::Gguf::architecture(self).to_string()
    }
    fn meta_int(&self, key: &str) -> Option<u64> {
        self.meta(key)
            .and_then(|v| v.as_i128())
            .and_then(|x| u64::try_from(x).ok())
    }
    fn meta_float(&self, key: &str) -> Option<f32> {
        self.meta(key).and_then(|v| v.as_f64()).map(|x| x as f32)
    }
    fn dims(&self, name: &str) -> Option<Vec<usize>> {
        self.tensor(name).map(|t| t.dims.clone())
    }
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.dequantize(name)
    }
}
