//! Tokenizers built from a GGUF file's vocabulary (`tokenizer.ggml.*`), two kinds:
//!
//! - **Byte-level BPE** (`tokenizer.ggml.model = "gpt2"`, SmolLM2): text is split by a pre-tokenizer
//!   (named by `tokenizer.ggml.pre`), each piece's UTF-8 bytes are mapped to printable characters
//!   (GPT-2's `bytes_to_unicode`: printable Latin-1 bytes map to themselves, the others to U+0100..),
//!   and adjacent symbols are merged by `tokenizer.ggml.merges` rank, lowest rank first, until no
//!   listed pair remains.
//! - **SentencePiece BPE** (`tokenizer.ggml.model = "llama"`, Gemma-3): spaces become "▁" (U+2581)
//!   (plus a leading "▁" when `tokenizer.ggml.add_space_prefix`), the text starts as one symbol per
//!   character, and the adjacent pair whose concatenation is a vocabulary piece with the highest
//!   `tokenizer.ggml.scores` is merged (ties: leftmost) until none is; a final symbol that is not a
//!   piece is emitted as its UTF-8 bytes through the byte tokens `<0xNN>`.
//!
//! In both, special tokens (token types CONTROL and USER_DEFINED, e.g. `<|im_start|>`, Gemma's "\n\n"
//! and runs of spaces) are matched in the text first, longest first, and the text between them is
//! tokenized as above. [`Tokenizer::encode`] never adds BOS/EOS; [`Tokenizer::add_bos`] says whether
//! the model expects BOS in front (`tokenizer.ggml.add_bos_token`).
//!
//! Decoding is the inverse: `decode(encode(s)) == s` for every string (tested on the real books).
use super::gguf::Gguf;
use crate::error::{Error, Result};
use regex::Regex;
use std::collections::{BinaryHeap, HashMap};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;
/// Marks a byte without a byte-level token (SmolLM2 lacks a few control bytes); never merged.
const NO_TOKEN: u32 = u32::MAX;

/// GPT-2's pre-tokenizer pattern without its `\s+(?!\S)` alternative (the regex crate has no
/// look-around); [`Pretokenizer::split`] restores that rule: a run of whitespace followed by a
/// non-space gives its last character to the next piece.
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

enum Kind {
    Bpe {
        /// (left id, right id) -> (rank, merged id).
        merges: HashMap<(u32, u32), (u32, u32)>,
        /// Byte -> id of the token for its byte-level character ([`NO_TOKEN`] when the vocabulary
        /// lacks it: such a byte becomes the unknown token, or is dropped without one).
        byte_token: Box<[u32; 256]>,
        /// Byte-level character -> byte, for decoding.
        char_byte: HashMap<char, u8>,
        pre: Pretokenizer,
    },
    Spm {
        scores: Vec<f32>,
        /// Byte -> id of `<0xNN>`, when the vocabulary has it.
        byte_token: Box<[Option<u32>; 256]>,
        add_space_prefix: bool,
    },
}

/// A tokenizer built from GGUF metadata.
pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<i32>,
    /// Piece text -> id, for the pieces that BPE may produce (NORMAL and USER_DEFINED, and for byte
    /// level BPE every non-control token).
    index: HashMap<String, u32>,
    /// Special tokens matched in the raw text before tokenizing, longest first.
    special: Option<Regex>,
    special_ids: HashMap<String, u32>,
    kind: Kind,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    model: String,
}

fn tok_err(g: &Gguf, msg: impl Into<String>) -> Error {
    Error::File {
        path: g.origin().to_string(),
        msg: format!("tokenizer: {}", msg.into()),
    }
}

/// GPT-2's reversible byte -> character map: printable bytes ('!'..='~', '¡'..='¬', '®'..='ÿ') map
/// to the same code point, the remaining 68 bytes to U+0100 + n in byte order.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        map[b as usize] = if printable {
            b as char
        } else {
            n += 1;
            char::from_u32(0x100 + n - 1).expect("valid code point")
        };
    }
    map
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pretokenizer {
    /// GPT-2's regex.
    Gpt2,
    /// Every digit alone, then GPT-2's regex (SmolLM, StarCoder).
    DigitsGpt2,
}

impl Pretokenizer {
    fn from_name(name: &str) -> Option<Pretokenizer> {
        match name {
            "gpt-2" | "gpt2" | "default" => Some(Pretokenizer::Gpt2),
            "smollm" | "starcoder" | "refact" | "codeshell" => Some(Pretokenizer::DigitsGpt2),
            _ => None,
        }
    }

    /// Splits `text` into pieces (byte ranges), appending them to `out`.
    fn split(self, re: &Regex, text: &str, out: &mut Vec<(usize, usize)>) {
        match self {
            Pretokenizer::Gpt2 => gpt2_split(re, text, 0, out),
            Pretokenizer::DigitsGpt2 => {
                let mut start = 0;
                for (i, c) in text.char_indices() {
                    if c.is_numeric() {
                        gpt2_split(re, &text[start..i], start, out);
                        out.push((i, i + c.len_utf8()));
                        start = i + c.len_utf8();
                    }
                }
                gpt2_split(re, &text[start..], start, out);
            }
        }
    }
}

fn gpt2_split(re: &Regex, text: &str, base: usize, out: &mut Vec<(usize, usize)>) {
    let mut pos = 0;
    while pos < text.len() {
        let Some(m) = re.find_at(text, pos) else {
            out.push((base + pos, base + text.len()));
            break;
        };
        if m.start() > pos {
            // Unmatched characters (none for this pattern) become a piece of their own.
            out.push((base + pos, base + m.start()));
        }
        let mut end = m.end();
        let s = m.as_str();
        // `\s+(?!\S)`: a whitespace run of 2+ characters followed by a non-space keeps all but its
        // last character (a single whitespace character stays a piece: the trailing `\s+`).
        if s.chars().all(char::is_whitespace) && end < text.len() {
            let last = s.chars().next_back().expect("non-empty match");
            if s.len() > last.len_utf8() {
                end -= last.len_utf8();
            }
        }
        out.push((base + m.start(), base + end));
        pos = end;
    }
}

impl Tokenizer {
    /// Builds the tokenizer that `tokenizer.ggml.model` names ("gpt2" or "llama").
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let model = g.meta_str("tokenizer.ggml.model")?.to_string();
        let tokens: Vec<String> = g
            .meta_str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize {
            return Err(tok_err(g, format!("vocabulary of {n} tokens")));
        }
        let types = match g.meta("tokenizer.ggml.token_type") {
            Some(_) => g.meta_i32_array("tokenizer.ggml.token_type")?,
            None => vec![TYPE_NORMAL; n],
        };
        if types.len() != n {
            return Err(tok_err(
                g,
                format!("token_type has {} entries for {n} tokens", types.len()),
            ));
        }
        let id = |key: &str| -> Result<Option<u32>> {
            match g.meta(key) {
                None => Ok(None),
                Some(_) => {
                    let v = g.meta_u32(key)?;
                    if (v as usize) < n {
                        Ok(Some(v))
                    } else {
                        Err(tok_err(
                            g,
                            format!("{key} = {v} is outside the {n}-token vocabulary"),
                        ))
                    }
                }
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let unk = id("tokenizer.ggml.unknown_token_id")?;
        let flag = |key: &str, default: bool| -> Result<bool> {
            match g.meta(key) {
                None => Ok(default),
                Some(_) => g.meta_bool(key),
            }
        };

        // Special tokens: CONTROL and USER_DEFINED, matched longest first.
        let mut special: Vec<(String, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, &ty))| {
                (ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED) && !t.is_empty()
            })
            .map(|(i, (t, _))| (t.clone(), i as u32))
            .collect();
        special.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let special_ids: HashMap<String, u32> = special.iter().cloned().collect();
        let special = if special.is_empty() {
            None
        } else {
            let pat = special
                .iter()
                .map(|(t, _)| regex::escape(t))
                .collect::<Vec<_>>()
                .join("|");
            Some(
                regex::RegexBuilder::new(&pat)
                    .size_limit(1 << 28)
                    .dfa_size_limit(1 << 28)
                    .build()
                    .map_err(|e| tok_err(g, format!("special-token matcher: {e}")))?,
            )
        };

        let (kind, index, add_bos_default) = match model.as_str() {
            "gpt2" => {
                let pre_name = match g.meta("tokenizer.ggml.pre") {
                    Some(_) => g.meta_str("tokenizer.ggml.pre")?.to_string(),
                    None => "default".into(),
                };
                let pre = Pretokenizer::from_name(&pre_name).ok_or_else(|| {
                    tok_err(
                        g,
                        format!(
                            "unsupported pre-tokenizer `{pre_name}` (tokenizer.ggml.pre); supported: \
                             gpt-2, default, smollm, starcoder, refact, codeshell"
                        ),
                    )
                })?;
                let mut index = HashMap::with_capacity(n);
                for (i, t) in tokens.iter().enumerate() {
                    if types[i] != TYPE_CONTROL {
                        index.entry(t.clone()).or_insert(i as u32);
                    }
                }
                let b2u = bytes_to_unicode();
                let mut byte_token = [NO_TOKEN; 256];
                let mut char_byte = HashMap::with_capacity(256);
                for b in 0..256 {
                    let c = b2u[b];
                    char_byte.insert(c, b as u8);
                    if let Some(&id) = index.get(&c.to_string()) {
                        byte_token[b] = id;
                    }
                }
                let merge_list = g.meta_str_array("tokenizer.ggml.merges")?;
                let mut merges = HashMap::with_capacity(merge_list.len());
                for (rank, m) in merge_list.iter().enumerate() {
                    let (a, b) = m.split_once(' ').ok_or_else(|| {
                        tok_err(
                            g,
                            format!("merge {rank} `{m}` is not two symbols separated by a space"),
                        )
                    })?;
                    let (Some(&ia), Some(&ib), Some(&im)) =
                        (index.get(a), index.get(b), index.get(&format!("{a}{b}")))
                    else {
                        return Err(tok_err(
                            g,
                            format!("merge {rank} `{m}` names symbols missing from the vocabulary"),
                        ));
                    };
                    merges.entry((ia, ib)).or_insert((rank as u32, im));
                }
                (
                    Kind::Bpe {
                        merges,
                        byte_token: Box::new(byte_token),
                        char_byte,
                        pre,
                    },
                    index,
                    false,
                )
            }
            "llama" => {
                let scores = g.meta_f32_array("tokenizer.ggml.scores")?;
                if scores.len() != n {
                    return Err(tok_err(
                        g,
                        format!("scores has {} entries for {n} tokens", scores.len()),
                    ));
                }
                let mut index = HashMap::with_capacity(n);
                let mut byte_token = [None; 256];
                for (i, t) in tokens.iter().enumerate() {
                    match types[i] {
                        TYPE_NORMAL | TYPE_USER_DEFINED => {
                            index.entry(t.clone()).or_insert(i as u32);
                        }
                        TYPE_BYTE => {
                            let b = t
                                .strip_prefix("<0x")
                                .and_then(|h| h.strip_suffix('>'))
                                .and_then(|h| u8::from_str_radix(h, 16).ok())
                                .ok_or_else(|| {
                                    tok_err(g, format!("byte token {i} `{t}` is not <0xNN>"))
                                })?;
                            byte_token[b as usize] = Some(i as u32);
                        }
                        _ => {}
                    }
                }
                (
                    Kind::Spm {
                        scores,
                        byte_token: Box::new(byte_token),
                        add_space_prefix: flag("tokenizer.ggml.add_space_prefix", true)?,
                    },
                    index,
                    true,
                )
            }
            other => {
                return Err(tok_err(
                    g,
                    format!(
                        "unsupported tokenizer model `{other}` (tokenizer.ggml.model); supported: \
                         gpt2 (byte-level BPE), llama (SentencePiece BPE)"
                    ),
                ))
            }
        };
        let add_bos = flag("tokenizer.ggml.add_bos_token", add_bos_default)?;
        Ok(Tokenizer {
            tokens,
            types,
            index,
            special,
            special_ids,
            kind,
            bos,
            eos,
            unk,
            add_bos,
            model,
        })
    }

    /// "gpt2" or "llama" (the GGUF `tokenizer.ggml.model`).
    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the model expects BOS in front of a sequence (`tokenizer.ggml.add_bos_token`;
    /// default false for gpt2, true for llama). [`encode`](Self::encode) never adds it.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The text of a token (byte-level or "▁" form, as stored), if `id` is in the vocabulary.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Whether `id` is an ordinary text token: of type NORMAL (not control, user-defined, byte or
    /// unused) and none of BOS, EOS, UNK. The pool a random-token probe draws from.
    pub fn is_ordinary(&self, id: u32) -> bool {
        self.types.get(id as usize) == Some(&TYPE_NORMAL)
            && ![self.bos, self.eos, self.unk].contains(&Some(id))
    }

    /// The id of a token text (any type), if present.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.index
            .get(text)
            .or_else(|| self.special_ids.get(text))
            .copied()
            .or_else(|| self.tokens.iter().position(|t| t == text).map(|i| i as u32))
    }

    /// Token ids of `text` (no BOS/EOS added).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut pos = 0;
        let mut first = true;
        if let Some(re) = &self.special {
            for m in re.find_iter(text) {
                self.encode_plain(&text[pos..m.start()], first && pos == 0, &mut out);
                out.push(self.special_ids[m.as_str()]);
                pos = m.end();
                first = false;
            }
        }
        self.encode_plain(&text[pos..], first, &mut out);
        out
    }

    /// Tokenizes text that holds no special token.
    fn encode_plain(&self, text: &str, at_start: bool, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        match &self.kind {
            Kind::Bpe {
                merges,
                byte_token,
                pre,
                ..
            } => {
                thread_local! {
                    static RE: Regex = Regex::new(GPT2_PATTERN).expect("valid GPT-2 pattern");
                }
                let mut pieces = Vec::new();
                RE.with(|re| pre.split(re, text, &mut pieces));
                let mut syms = Vec::new();
                for (a, b) in pieces {
                    syms.clear();
                    syms.extend(text[a..b].bytes().map(|x| byte_token[x as usize]));
                    bpe_merge(&mut syms, merges);
                    for &id in &syms {
                        match (id, self.unk) {
                            (NO_TOKEN, Some(u)) => out.push(u),
                            (NO_TOKEN, None) => {}
                            (id, _) => out.push(id),
                        }
                    }
                }
            }
            Kind::Spm {
                scores,
                byte_token,
                add_space_prefix,
            } => {
                let mut s = String::with_capacity(text.len() + 3);
                if *add_space_prefix && at_start {
                    s.push('\u{2581}');
                }
                for c in text.chars() {
                    s.push(if c == ' ' { '\u{2581}' } else { c });
                }
                self.spm_encode(&s, scores, byte_token, out);
            }
        }
    }

    /// SentencePiece BPE: one symbol per character, then repeatedly merge the adjacent pair whose
    /// concatenation is a piece with the highest score (ties: leftmost).
    fn spm_encode(
        &self,
        s: &str,
        scores: &[f32],
        byte_token: &[Option<u32>; 256],
        out: &mut Vec<u32>,
    ) {
        // Symbols as byte ranges in a linked list; `len == 0` marks a symbol merged away.
        struct Sym {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        let mut syms: Vec<Sym> = Vec::new();
        for (i, c) in s.char_indices() {
            let k = syms.len();
            syms.push(Sym {
                start: i,
                len: c.len_utf8(),
                prev: k.checked_sub(1),
                next: None,
            });
            if k > 0 {
                syms[k - 1].next = Some(k);
            }
        }
        // Max-heap of candidate merges: (score, -left index, left, right, combined length).
        #[derive(PartialEq)]
        struct Cand(f32, usize, usize, usize);
        impl Eq for Cand {}
        impl PartialOrd for Cand {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Cand {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                self.0.total_cmp(&o.0).then_with(|| o.1.cmp(&self.1))
            }
        }
        let mut heap = BinaryHeap::new();
        let try_add = |syms: &Vec<Sym>, heap: &mut BinaryHeap<Cand>, l: usize, r: usize| {
            let piece = &s[syms[l].start..syms[r].start + syms[r].len];
            if let Some(&id) = self.index.get(piece) {
                if self.types[id as usize] == TYPE_NORMAL {
                    heap.push(Cand(scores[id as usize], l, r, piece.len()));
                }
            }
        };
        for i in 1..syms.len() {
            try_add(&syms, &mut heap, i - 1, i);
        }
        while let Some(Cand(_, l, r, len)) = heap.pop() {
            // Skip stale candidates: either side already merged or grown.
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != len {
                continue;
            }
            if syms[l].next != Some(r) {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if let Some(nx) = syms[r].next {
                syms[nx].prev = Some(l);
            }
            if let Some(p) = syms[l].prev {
                try_add(&syms, &mut heap, p, l);
            }
            if let Some(nx) = syms[l].next {
                try_add(&syms, &mut heap, l, nx);
            }
        }
        let mut i = if syms.is_empty() { None } else { Some(0) };
        while let Some(k) = i {
            let piece = &s[syms[k].start..syms[k].start + syms[k].len];
            match self.index.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        match (byte_token[b as usize], self.unk) {
                            (Some(id), _) | (None, Some(id)) => out.push(id),
                            (None, None) => {}
                        }
                    }
                }
            }
            i = syms[k].next;
        }
    }

    /// The text of `ids`; invalid UTF-8 (from byte tokens split mid-character) is replaced by
    /// U+FFFD, ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let Some(t) = self.tokens.get(id as usize) else {
                continue;
            };
            let ty = self.types[id as usize];
            match &self.kind {
                Kind::Bpe { char_byte, .. } => {
                    if ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED {
                        bytes.extend_from_slice(t.as_bytes());
                    } else {
                        for c in t.chars() {
                            match char_byte.get(&c) {
                                Some(&b) => bytes.push(b),
                                None => {
                                    let mut buf = [0u8; 4];
                                    bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                                }
                            }
                        }
                    }
                }
                Kind::Spm { byte_token, .. } => {
                    if ty == TYPE_BYTE {
                        if let Some(b) = byte_token.iter().position(|x| *x == Some(id)) {
                            bytes.push(b as u8);
                        }
                    } else {
                        bytes.extend_from_slice(t.replace('\u{2581}', " ").as_bytes());
                    }
                }
            }
        }
        let s = String::from_utf8_lossy(&bytes).into_owned();
        match &self.kind {
            // A prefix space added by the encoder is dropped again.
            Kind::Spm {
                add_space_prefix: true,
                ..
            } => s.strip_prefix(' ').map(str::to_string).unwrap_or(s),
            _ => s,
        }
    }

    /// Checks that every id is inside the vocabulary: a clear error naming the first one outside.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().position(|&i| i as usize >= self.tokens.len()) {
            None => Ok(()),
            Some(p) => Err(Error::Param {
                op: "tokens",
                msg: format!(
                    "token id {} at position {p} is outside the vocabulary of {} tokens",
                    ids[p],
                    self.tokens.len()
                ),
            }),
        }
    }
}

/// Byte-level BPE on one piece: repeatedly merge the adjacent pair of lowest rank (all its
/// occurrences, left to right, as GPT-2's `bpe()`), until no adjacent pair has a rank.
fn bpe_merge(syms: &mut Vec<u32>, merges: &HashMap<(u32, u32), (u32, u32)>) {
    while syms.len() > 1 {
        let mut best: Option<(u32, u32, u32, u32)> = None;
        for w in syms.windows(2) {
            if let Some(&(rank, id)) = merges.get(&(w[0], w[1])) {
                if best.is_none_or(|b| rank < b.0) {
                    best = Some((rank, w[0], w[1], id));
                }
            }
        }
        let Some((_, a, b, m)) = best else { break };
        let mut j = 0;
        let mut i = 0;
        while i < syms.len() {
            if i + 1 < syms.len() && syms[i] == a && syms[i + 1] == b {
                syms[j] = m;
                i += 2;
            } else {
                syms[j] = syms[i];
                i += 1;
            }
            j += 1;
        }
        syms.truncate(j);
    }
}

/// Reads a text file as bytes and decodes it as UTF-8, replacing invalid sequences with U+FFFD (the
/// Gutenberg books include ISO-8859 bytes; CRLF line ends are kept as they are).
pub fn read_text_lossy(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::File {
        path: path.display().to_string(),
        msg: format!("cannot read text: {e}"),
    })?;
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}
