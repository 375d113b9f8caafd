//! Binding an expression to shapes: the compiled atoms, the scalar element reference
//! ([`BoundMask::allowed`]) and the word-parallel row evaluator ([`RowMask::row_bits`]).
use std::collections::HashMap;

use super::expr::{DocIds, MaskExpr, MaskShape};
use super::schedule::{BlockSchedule, RowMask};
use crate::error::{Error, Result};

/// Longest sequence a mask binds to (tile and key indices are stored as `u32`).
pub const MAX_LEN: usize = u32::MAX as usize;
/// Arguments are clamped to this in the `i64` arithmetic: it exceeds every position difference
/// (`|p - j| < 2^33`), so clamping never changes a result and nothing overflows.
const CAP: i64 = 1 << 40;

fn cap(v: usize) -> i64 {
    v.min(CAP as usize) as i64
}

/// One axis of a neighborhood grid (outermost first). A token's coordinate on the axis is
/// `(t / stride) % n`.
#[derive(Clone, Debug)]
pub(crate) struct Axis {
    pub n: i64,
    pub stride: i64,
    pub k: i64,
    pub d: i64,
    /// Bits at multiples of `d` (see [`periodic`]).
    pub pat: u64,
}

impl Axis {
    /// The key coordinates a query at coordinate `c` attends on this axis: the arithmetic
    /// progression `first, first + d, ..., first + (count - 1) d`.
    ///
    /// NATTEN: coordinates split into `d` groups by `c mod d`; group `r` holds
    /// `n_r = ceil((n - r) / d)` coordinates; the query at group position `g = c div d` attends
    /// the `min(k, n_r)` group positions starting at `clamp(g - k div 2, 0, n_r - min(k, n_r))`.
    #[inline]
    pub fn ap(&self, c: i64) -> (i64, i64) {
        let r = c % self.d;
        let g = c / self.d;
        let nr = (self.n - r + self.d - 1) / self.d;
        let k = self.k.min(nr);
        let s = (g - self.k / 2).clamp(0, nr - k);
        (r + s * self.d, k)
    }
}

/// A compiled atom: arguments clamped to `i64`, per-atom tables precomputed.
#[derive(Clone, Debug)]
pub(crate) enum Atom {
    /// Every pair.
    Full,
    /// `j <= p`.
    Causal,
    /// `p - l <= j <= p + r`.
    Window { l: i64, r: i64 },
    /// `j < n` (`sinks(n)` and `prefix(n)`).
    Below(i64),
    /// `floor(p / c) == floor(j / c)`.
    Chunk(i64),
    /// `(p - j) mod s == 0`; `pat` has the bits at multiples of `s`.
    Strided { s: i64, pat: u64 },
    /// `q_doc[b, i] == k_doc[b, j]`.
    Document,
    /// `|floor(p / b) - floor(j / b)|` is 0 or a power of two ([`power_gap`]).
    Power(i64),
    /// Frames of `f` tokens, spatial window `w >> r` at frame distance `dt` ([`radial_window`]).
    Radial { f: i64, w: i64 },
    /// Every axis allows the pair (see [`Axis::ap`]).
    Nbr(Vec<Axis>),
}

/// Expression nodes in post-order: children come before their parent.
#[derive(Clone, Debug)]
pub(crate) enum Node {
    Atom(Atom),
    Not(usize),
    And(usize, usize),
    Or(usize, usize),
}

/// Row-evaluation program (post-order, larger subtree first: Sethi-Ullman, so the operand stack
/// stays at `need` entries).
#[derive(Clone, Copy, Debug)]
enum Op {
    Atom(usize),
    Not,
    And,
    Or,
}

/// Document ids with, per query, the key hull of its document.
#[derive(Clone, Debug)]
pub(crate) struct Docs {
    pub q: Vec<i32>,
    pub k: Vec<i32>,
    /// Per (b, i): the keys of document `q[b, i]` lie in `[lo, hi)` (`lo == hi`: none).
    pub hull: Vec<(u32, u32)>,
    /// Per (b, i): every key in the hull belongs to the document (a contiguous run), so the
    /// document test is the interval test.
    pub dense: Vec<bool>,
}

/// A mask expression bound to shapes (and document ids): the element reference, the row
/// evaluator for Partial tiles, and the schedule builder.
#[derive(Clone, Debug)]
pub struct BoundMask {
    expr: MaskExpr,
    shape: MaskShape,
    pub(crate) nodes: Vec<Node>,
    pub(crate) root: usize,
    prog: Vec<Op>,
    need: usize,
    pub(crate) docs: Option<Docs>,
}

/// Operand stack entries kept on the machine stack by [`BoundMask::row_bits`].
const STACK: usize = 8;
/// Words evaluated at once.
const CHUNK: usize = 4;

/// Bits `t` of the word starting at key `jw0` with `lo <= jw0 + t <= hi`.
#[inline]
pub(crate) fn range_mask(lo: i64, hi: i64, jw0: i64) -> u64 {
    let a = (lo - jw0).max(0);
    let b = (hi - jw0).min(63);
    if a > b {
        0
    } else {
        (u64::MAX >> (63 - (b - a))) << a
    }
}

/// Bits at multiples of `s` (for `s >= 64` only bit 0).
pub(crate) fn pattern(s: i64) -> u64 {
    let mut m = 0u64;
    let mut t = 0;
    while t < 64 {
        m |= 1 << t;
        t += s.max(1);
    }
    m
}

/// Bits `t` of the word starting at `jw0` with `(jw0 + t - anchor) mod s == 0`: the pattern
/// shifted to the first such `t`.
#[inline]
pub(crate) fn periodic(s: i64, pat: u64, anchor: i64, jw0: i64) -> u64 {
    let t0 = (anchor - jw0).rem_euclid(s);
    if t0 >= 64 {
        0
    } else {
        pat << t0
    }
}

/// Neighborhood bits of the word at `jw0`: keys `base + sum_a c_a stride_a` with every `c_a` in
/// its axis progression `ap[a]`. Visits only the outer coordinates whose block meets the word.
fn nbr_word(axes: &[Axis], ap: &[(i64, i64)], base: i64, jw0: i64) -> u64 {
    let ax = &axes[0];
    let (first, count) = ap[0];
    if axes.len() == 1 {
        // Innermost axis (stride 1): an interval intersected with a residue class.
        let lo = base + first;
        let hi = lo + (count - 1) * ax.d;
        let r = range_mask(lo, hi, jw0);
        return if r == 0 || ax.d == 1 {
            r
        } else {
            r & periodic(ax.d, ax.pat, lo, jw0)
        };
    }
    let st = ax.stride;
    // Coordinates c whose keys [base + c st, base + c st + st - 1] meet [jw0, jw0 + 63].
    let c_lo = ceil_div(jw0 - base - st + 1, st);
    let c_hi = (jw0 + 63 - base).div_euclid(st);
    let m_lo = ceil_div(c_lo - first, ax.d).max(0);
    let m_hi = (c_hi - first).div_euclid(ax.d).min(count - 1);
    let mut w = 0;
    let mut m = m_lo;
    while m <= m_hi {
        let c = first + m * ax.d;
        w |= nbr_word(&axes[1..], &ap[1..], base + c * st, jw0);
        m += 1;
    }
    w
}

/// PowerAttention's block distances: `d` (either sign) is 0 or a power of two.
#[inline]
pub(crate) fn power_gap(d: i64) -> bool {
    let d = d.unsigned_abs();
    d & d.wrapping_sub(1) == 0
}

/// Radial Attention's spatial half-width at frame distance `dt >= 0`: `w` for `dt <= 1`, else
/// `w >> floor(log2 dt)` (halved each time the distance doubles).
#[inline]
pub(crate) fn radial_window(w: i64, dt: i64) -> i64 {
    if dt <= 1 {
        w
    } else {
        w >> (63 - dt.leading_zeros())
    }
}

/// Radial Attention's keys of query position `p` inside frame `tk` (frames of `f` tokens,
/// half-width `w`): the closed interval `[tk f + max(0, s - w'), tk f + min(f - 1, s + w')]`,
/// `s = p mod f`, `w' = radial_window(w, |floor(p / f) - tk|)`.
#[inline]
pub(crate) fn radial_keys(f: i64, w: i64, p: i64, tk: i64) -> (i64, i64) {
    let (tq, s) = (p.div_euclid(f), p.rem_euclid(f));
    let ww = radial_window(w, (tq - tk).abs());
    (tk * f + (s - ww).max(0), tk * f + (s + ww).min(f - 1))
}

fn ceil_div(a: i64, b: i64) -> i64 {
    -((-a).div_euclid(b))
}

fn bind_err(e: &MaskExpr, msg: impl Into<String>) -> Error {
    Error::MaskBind {
        expr: e.to_string(),
        msg: msg.into(),
    }
}

struct Compiler<'a> {
    top: &'a MaskExpr,
    shape: MaskShape,
    nodes: Vec<Node>,
}

impl Compiler<'_> {
    /// `msg` about atom `e`, naming the atom when it is only part of the whole expression (the
    /// error already shows the whole expression).
    fn in_atom(&self, e: &MaskExpr, msg: String) -> String {
        if e == self.top {
            msg
        } else {
            format!("`{e}`: {msg}")
        }
    }

    fn atom(&self, e: &MaskExpr) -> Result<Atom> {
        let zero = |what: &str| bind_err(self.top, self.in_atom(e, format!("{what} must be >= 1")));
        Ok(match e {
            MaskExpr::Full => Atom::Full,
            MaskExpr::Causal => Atom::Causal,
            MaskExpr::Window { left, right } => Atom::Window {
                l: cap(*left),
                r: cap(*right),
            },
            MaskExpr::Sinks(n) | MaskExpr::Prefix(n) => Atom::Below(cap(*n)),
            MaskExpr::Chunk(c) => {
                if *c == 0 {
                    return Err(zero("the chunk size"));
                }
                Atom::Chunk(cap(*c))
            }
            MaskExpr::Strided(s) => {
                if *s == 0 {
                    return Err(zero("the stride"));
                }
                Atom::Strided {
                    s: cap(*s),
                    pat: pattern(cap(*s)),
                }
            }
            MaskExpr::Document => Atom::Document,
            MaskExpr::Power(b) => {
                if *b == 0 {
                    return Err(zero("the block size"));
                }
                Atom::Power(cap(*b))
            }
            MaskExpr::Radial { frame, window } => {
                if *frame == 0 {
                    return Err(zero("the frame size"));
                }
                Atom::Radial {
                    f: cap(*frame),
                    w: cap(*window),
                }
            }
            MaskExpr::Neighborhood {
                grid,
                kernel,
                dilation,
            } => {
                let MaskShape { sq, sk, .. } = self.shape;
                if sq != sk {
                    return Err(bind_err(
                        self.top,
                        self.in_atom(e, format!("needs Sq == Sk, got Sq {sq}, Sk {sk}")),
                    ));
                }
                let grid: Vec<usize> = if grid.is_empty() {
                    vec![sq]
                } else {
                    grid.clone()
                };
                if !(1..=3).contains(&grid.len())
                    || kernel.len() != grid.len()
                    || dilation.len() != grid.len()
                {
                    return Err(bind_err(
                        self.top,
                        format!(
                            "`{e}`: grid {grid:?}, kernel {kernel:?} and dilation {dilation:?} need 1 to 3 axes each, the same number"
                        ),
                    ));
                }
                if grid.iter().chain(kernel).chain(dilation).any(|&v| v == 0) {
                    return Err(zero("every grid size, kernel size and dilation"));
                }
                let prod = grid
                    .iter()
                    .try_fold(1usize, |a, &g| a.checked_mul(g))
                    .unwrap_or(usize::MAX);
                if prod != sq {
                    return Err(bind_err(
                        self.top,
                        self.in_atom(
                            e,
                            format!("grid {grid:?} holds {prod} tokens, but Sq = Sk = {sq}"),
                        ),
                    ));
                }
                let mut axes = Vec::with_capacity(grid.len());
                let mut stride = 1i64;
                for a in (0..grid.len()).rev() {
                    let d = cap(dilation[a]);
                    axes.push(Axis {
                        n: grid[a] as i64,
                        stride,
                        k: cap(kernel[a]),
                        d,
                        pat: pattern(d),
                    });
                    stride *= grid[a] as i64;
                }
                axes.reverse();
                Atom::Nbr(axes)
            }
            MaskExpr::Not(_) | MaskExpr::And(..) | MaskExpr::Or(..) => {
                return Err(bind_err(self.top, "internal: operator compiled as an atom"))
            }
        })
    }

    /// Appends `e` in post-order; returns its node index.
    fn compile(&mut self, e: &MaskExpr) -> Result<usize> {
        let node = match e {
            MaskExpr::Not(a) => Node::Not(self.compile(a)?),
            MaskExpr::And(a, b) => {
                let a = self.compile(a)?;
                Node::And(a, self.compile(b)?)
            }
            MaskExpr::Or(a, b) => {
                let a = self.compile(a)?;
                Node::Or(a, self.compile(b)?)
            }
            atom => Node::Atom(self.atom(atom)?),
        };
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }
}

/// Operand-stack entries needed to evaluate node `n` (Sethi-Ullman number).
fn need(nodes: &[Node], memo: &[usize], n: usize) -> usize {
    match nodes[n] {
        Node::Atom(_) => 1,
        Node::Not(a) => memo[a],
        Node::And(a, b) | Node::Or(a, b) => {
            let (x, y) = (memo[a], memo[b]);
            if x == y {
                x + 1
            } else {
                x.max(y)
            }
        }
    }
}

fn emit(nodes: &[Node], memo: &[usize], n: usize, prog: &mut Vec<Op>) {
    match nodes[n] {
        Node::Atom(_) => prog.push(Op::Atom(n)),
        Node::Not(a) => {
            emit(nodes, memo, a, prog);
            prog.push(Op::Not);
        }
        Node::And(a, b) | Node::Or(a, b) => {
            // And / Or commute: evaluate the hungrier operand first.
            let (x, y) = if memo[a] >= memo[b] { (a, b) } else { (b, a) };
            emit(nodes, memo, x, prog);
            emit(nodes, memo, y, prog);
            prog.push(if matches!(nodes[n], Node::And(..)) {
                Op::And
            } else {
                Op::Or
            });
        }
    }
}

/// Per batch row: key hull of every document and whether its keys are one contiguous run.
fn doc_hulls(shape: MaskShape, q: &[i32], k: &[i32]) -> (Vec<(u32, u32)>, Vec<bool>) {
    let MaskShape { batch, sq, sk } = shape;
    let mut hull = vec![(0u32, 0u32); batch * sq];
    let mut dense = vec![true; batch * sq];
    let mut map: HashMap<i32, (usize, usize, usize)> = HashMap::new();
    for b in 0..batch {
        map.clear();
        let ks = &k[b * sk..(b + 1) * sk];
        // Runs of equal ids: one map update per run (sorted input: one per document).
        let mut j = 0;
        while j < sk {
            let id = ks[j];
            let mut e = j + 1;
            while e < sk && ks[e] == id {
                e += 1;
            }
            let h = map.entry(id).or_insert((j, e, 0));
            h.0 = h.0.min(j);
            h.1 = h.1.max(e);
            h.2 += e - j;
            j = e;
        }
        let qs = &q[b * sq..(b + 1) * sq];
        let mut i = 0;
        while i < sq {
            let id = qs[i];
            let mut e = i + 1;
            while e < sq && qs[e] == id {
                e += 1;
            }
            let (h, d) = match map.get(&id) {
                Some(&(lo, hi, n)) => ((lo as u32, hi as u32), n == hi - lo),
                None => ((0, 0), true),
            };
            hull[b * sq + i..b * sq + e].fill(h);
            dense[b * sq + i..b * sq + e].fill(d);
            i = e;
        }
    }
    (hull, dense)
}

impl MaskExpr {
    /// Binds the expression to sequence lengths (and document ids, needed iff
    /// [`uses_documents`](Self::uses_documents)). Errors ([`Error::MaskBind`]): zero or too long
    /// lengths, `document` without ids or with ids of the wrong length, a neighborhood with
    /// `Sq != Sk` or a grid whose sizes do not multiply to `Sq`, zero arguments.
    pub fn bind(&self, shape: MaskShape, docs: Option<DocIds>) -> Result<BoundMask> {
        let MaskShape { batch, sq, sk } = shape;
        if batch == 0 || sq == 0 || sk == 0 || sq > MAX_LEN || sk > MAX_LEN {
            return Err(bind_err(
                self,
                format!(
                    "batch {batch}, Sq {sq} and Sk {sk} must be >= 1 (and lengths <= {MAX_LEN})"
                ),
            ));
        }
        let mut c = Compiler {
            top: self,
            shape,
            nodes: Vec::new(),
        };
        let root = c.compile(self)?;
        let nodes = c.nodes;
        let mut memo = vec![0; nodes.len()];
        for n in 0..nodes.len() {
            memo[n] = need(&nodes, &memo, n);
        }
        let mut prog = Vec::with_capacity(nodes.len());
        emit(&nodes, &memo, root, &mut prog);

        let docs = if self.uses_documents() {
            let Some(d) = docs else {
                return Err(bind_err(
                    self,
                    "`document` needs document ids (DocIds with q: [batch * Sq], k: [batch * Sk])",
                ));
            };
            let (wq, wk) = (batch.saturating_mul(sq), batch.saturating_mul(sk));
            if d.q.len() != wq || d.k.len() != wk {
                return Err(bind_err(
                    self,
                    format!(
                        "document ids have lengths q {} and k {}, expected batch {batch} x Sq {sq} = {wq} and batch {batch} x Sk {sk} = {wk}",
                        d.q.len(),
                        d.k.len()
                    ),
                ));
            }
            let (hull, dense) = doc_hulls(shape, &d.q, &d.k);
            Some(Docs {
                q: d.q,
                k: d.k,
                hull,
                dense,
            })
        } else {
            None
        };
        Ok(BoundMask {
            expr: self.clone(),
            shape,
            nodes,
            root,
            prog,
            need: memo[root],
            docs,
        })
    }
}

impl BoundMask {
    pub fn expr(&self) -> &MaskExpr {
        &self.expr
    }
    pub fn shape(&self) -> MaskShape {
        self.shape
    }

    /// Aligned query position `p = i + Sk - Sq`.
    #[inline]
    pub(crate) fn pos(&self, i: usize) -> i64 {
        i as i64 + self.shape.sk as i64 - self.shape.sq as i64
    }

    /// The element reference: is key `j` allowed for query `i` of batch row `b`? Evaluated
    /// straight from the definitions, one pair at a time (the truth of the tests). Out-of-range
    /// indices give `false`.
    pub fn allowed(&self, b: usize, i: usize, j: usize) -> bool {
        let MaskShape { batch, sq, sk } = self.shape;
        b < batch && i < sq && j < sk && self.eval(self.root, b, i, j)
    }

    fn eval(&self, n: usize, b: usize, i: usize, j: usize) -> bool {
        let p = self.pos(i);
        let jj = j as i64;
        match &self.nodes[n] {
            Node::Not(a) => !self.eval(*a, b, i, j),
            Node::And(a, c) => self.eval(*a, b, i, j) && self.eval(*c, b, i, j),
            Node::Or(a, c) => self.eval(*a, b, i, j) || self.eval(*c, b, i, j),
            Node::Atom(atom) => match atom {
                Atom::Full => true,
                Atom::Causal => jj <= p,
                Atom::Window { l, r } => p - l <= jj && jj <= p + r,
                Atom::Below(s) => jj < *s,
                Atom::Chunk(c) => p.div_euclid(*c) == jj.div_euclid(*c),
                Atom::Strided { s, .. } => (p - jj).rem_euclid(*s) == 0,
                Atom::Power(bs) => power_gap(p.div_euclid(*bs) - jj.div_euclid(*bs)),
                Atom::Radial { f, w } => {
                    let (tq, tk) = (p.div_euclid(*f), jj.div_euclid(*f));
                    let ds = (p.rem_euclid(*f) - jj.rem_euclid(*f)).abs();
                    ds <= radial_window(*w, (tq - tk).abs())
                }
                Atom::Document => self
                    .docs
                    .as_ref()
                    .is_some_and(|d| d.q[b * self.shape.sq + i] == d.k[b * self.shape.sk + j]),
                Atom::Nbr(axes) => axes.iter().all(|ax| {
                    // Coordinates on this axis, their groups and group positions.
                    let cq = (i as i64 / ax.stride) % ax.n;
                    let ck = (jj / ax.stride) % ax.n;
                    if cq % ax.d != ck % ax.d {
                        return false;
                    }
                    let r = cq % ax.d;
                    let nr = (ax.n - r + ax.d - 1) / ax.d;
                    let (gq, gk) = (cq / ax.d, ck / ax.d);
                    if ax.k >= nr {
                        return true;
                    }
                    let start = (gq - ax.k / 2).clamp(0, nr - ax.k);
                    start <= gk && gk < start + ax.k
                }),
            },
        }
    }

    /// Writes the bits of atom node `n` for query `i` into `out` (word `w` = keys
    /// `jw0 + 64 w ..`). Bits past `Sk` may be set; the caller clears them.
    pub(crate) fn atom_words(&self, n: usize, b: usize, i: usize, jw0: i64, out: &mut [u64]) {
        let Node::Atom(atom) = &self.nodes[n] else {
            return;
        };
        let p = self.pos(i);
        let words = (0..out.len() as i64).map(|w| jw0 + 64 * w);
        match atom {
            Atom::Full => out.fill(u64::MAX),
            Atom::Causal => {
                for (o, j) in out.iter_mut().zip(words) {
                    *o = range_mask(0, p, j);
                }
            }
            Atom::Window { l, r } => {
                for (o, j) in out.iter_mut().zip(words) {
                    *o = range_mask(p - l, p + r, j);
                }
            }
            Atom::Below(s) => {
                for (o, j) in out.iter_mut().zip(words) {
                    *o = range_mask(0, s - 1, j);
                }
            }
            Atom::Chunk(c) => {
                let lo = p.div_euclid(*c) * c;
                for (o, j) in out.iter_mut().zip(words) {
                    *o = range_mask(lo, lo + c - 1, j);
                }
            }
            Atom::Strided { s, pat } => {
                for (o, j) in out.iter_mut().zip(words) {
                    *o = periodic(*s, *pat, p, j);
                }
            }
            // The key blocks meeting the word, each whole or not at all.
            Atom::Power(bs) => {
                let qb = p.div_euclid(*bs);
                for (o, j) in out.iter_mut().zip(words) {
                    let mut m = 0;
                    let mut kb = j.max(0) / bs;
                    while kb * bs <= j + 63 {
                        if power_gap(qb - kb) {
                            m |= range_mask(kb * bs, kb * bs + bs - 1, j);
                        }
                        kb += 1;
                    }
                    *o = m;
                }
            }
            // One interval per frame meeting the word.
            Atom::Radial { f, w } => {
                for (o, j) in out.iter_mut().zip(words) {
                    let mut m = 0;
                    let mut tk = j.max(0) / f;
                    while tk * f <= j + 63 {
                        let (lo, hi) = radial_keys(*f, *w, p, tk);
                        m |= range_mask(lo, hi, j);
                        tk += 1;
                    }
                    *o = m;
                }
            }
            Atom::Document => {
                let Some(d) = &self.docs else {
                    out.fill(0);
                    return;
                };
                let qi = b * self.shape.sq + i;
                let (lo, hi) = (d.hull[qi].0 as i64, d.hull[qi].1 as i64);
                if d.dense[qi] {
                    for (o, j) in out.iter_mut().zip(words) {
                        *o = range_mask(lo, hi - 1, j);
                    }
                } else {
                    // Scattered document: compare the keys inside its hull.
                    let id = d.q[qi];
                    let ks = &d.k[b * self.shape.sk..(b + 1) * self.shape.sk];
                    for (o, j) in out.iter_mut().zip(words) {
                        let mut m = 0u64;
                        for jj in lo.max(j)..hi.min(j + 64) {
                            m |= ((ks[jj as usize] == id) as u64) << (jj - j);
                        }
                        *o = m;
                    }
                }
            }
            Atom::Nbr(axes) => {
                let mut ap = [(0i64, 0i64); 3];
                for (a, ax) in axes.iter().enumerate() {
                    ap[a] = ax.ap((i as i64 / ax.stride) % ax.n);
                }
                for (o, j) in out.iter_mut().zip(words) {
                    *o = nbr_word(axes, &ap[..axes.len()], 0, j);
                }
            }
        }
    }

    /// Evaluates the program on up to [`CHUNK`] words with the operand stack `st`.
    #[inline]
    fn eval_chunk(&self, st: &mut [[u64; CHUNK]], b: usize, i: usize, jw0: i64, out: &mut [u64]) {
        let len = out.len();
        let mut sp = 0;
        for op in &self.prog {
            match *op {
                Op::Atom(n) => {
                    self.atom_words(n, b, i, jw0, &mut st[sp][..len]);
                    sp += 1;
                }
                Op::Not => st[sp - 1][..len].iter_mut().for_each(|w| *w = !*w),
                Op::And | Op::Or => {
                    sp -= 1;
                    let (lo, hi) = st.split_at_mut(sp);
                    let (x, y) = (&mut lo[sp - 1][..len], &hi[0][..len]);
                    if matches!(op, Op::And) {
                        x.iter_mut().zip(y).for_each(|(x, y)| *x &= y);
                    } else {
                        x.iter_mut().zip(y).for_each(|(x, y)| *x |= y);
                    }
                }
            }
        }
        let sk = self.shape.sk as i64;
        for (w, (o, s)) in out.iter_mut().zip(&st[0][..len]).enumerate() {
            *o = s & range_mask(0, sk - 1, jw0 + 64 * w as i64);
        }
    }

    /// Exact number of allowed pairs of batch row `b` (0 if out of range), from the 64 x 64
    /// schedule: Full tiles count whole, Partial tiles count their row bits.
    pub fn allowed_pairs(&self, b: usize) -> u64 {
        if b >= self.shape.batch {
            return 0;
        }
        match self.schedule(64, 64) {
            Ok(s) => self.count_pairs(&s, b),
            Err(_) => 0,
        }
    }

    pub(crate) fn count_pairs(&self, s: &BlockSchedule, b: usize) -> u64 {
        s.allowed_pairs(b, 0, Some(self))
    }

    /// Allowed pairs / (batch * Sq * Sk).
    pub fn density(&self) -> f64 {
        let MaskShape { batch, sq, sk } = self.shape;
        let Ok(s) = self.schedule(64, 64) else {
            return 0.0;
        };
        let pairs: u64 = if s.batch == 1 {
            self.count_pairs(&s, 0) * batch as u64
        } else {
            (0..batch).map(|b| self.count_pairs(&s, b)).sum()
        };
        pairs as f64 / (batch as f64 * sq as f64 * sk as f64)
    }
}

/// Mask of the valid bits of the last word of a `len`-key range.
#[inline]
pub(crate) fn last_word_mask(len: usize) -> u64 {
    match len % 64 {
        0 => u64::MAX,
        r => (1u64 << r) - 1,
    }
}

/// Row bits in O(expression size) word operations per word: interval atoms build range masks,
/// strided / dilated atoms shift a periodic pattern, `!`, `&`, `|` are word ops on a small
/// operand stack (no heap allocation unless the expression needs more than 8 stack entries).
impl RowMask for BoundMask {
    fn row_bits(&self, b: usize, _h: usize, i: usize, j0: usize, out: &mut [u64]) {
        if b >= self.shape.batch || i >= self.shape.sq {
            out.fill(0);
            return;
        }
        let j0 = j0.min(1 << 62) as i64;
        let mut small = [[0u64; CHUNK]; STACK];
        let mut big = Vec::new();
        let st: &mut [[u64; CHUNK]] = if self.need <= STACK {
            &mut small
        } else {
            big.resize(self.need, [0u64; CHUNK]);
            &mut big
        };
        for (c, chunk) in out.chunks_mut(CHUNK).enumerate() {
            self.eval_chunk(st, b, i, j0 + (64 * CHUNK * c) as i64, chunk);
        }
    }
}
