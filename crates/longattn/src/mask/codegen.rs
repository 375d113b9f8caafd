//! Device code from a bound mask: the expression becomes one small CUDA function,
//! `la_mask(p, b, h, i, j)`, compiled into the kernel variant and evaluated only inside Partial
//! tiles. Its semantics are [`BoundMask::allowed`]'s, atom for atom (the selftest checks the GPU
//! against the CPU on every atom).
//!
//! The generated text depends only on the expression's *structure* (atom kinds and operators):
//! the atoms' numeric constants (window bounds, sink / prefix lengths, chunk sizes, strides,
//! neighborhood grid sizes, strides, kernels and dilations) are kernel *arguments*, read from the
//! array `p.mc[MASK_CONSTS]` of the parameter struct (`int mc[LA_MASK_CONSTS]` in
//! `LaFwdParams` / `LaBwdParams`), so `causal & window(128,0)` and `causal & window(4000,0)` are
//! one source, one cache key, one NVRTC compile. [`CudaProgram::consts`] holds the values, in the
//! order of the bound expression's nodes (post-order, children first; within an atom in its
//! argument order: see [`atom_consts`]); the plans copy them into the parameter struct. An
//! expression with more than [`MASK_CONSTS`] constants falls back to the constants written into
//! the source (then `consts` is empty and every distinct constant is its own kernel variant).
//! Sequence lengths and document ids come from the kernel parameters too (`p.Sq`, `p.Sk`,
//! `p.qdoc`, `p.kdoc`, `p.dlo`, `p.dhi`).
use super::bind::{Atom, BoundMask, Node};

/// Longest sequence the device mask programs take: positions, their differences and sums of a
/// position and a constant then fit 32-bit ints.
pub const DEVICE_MAX_LEN: usize = 1 << 29;

/// Capacity of the mask-constant array `mc` of the kernel parameter structs (`LA_MASK_CONSTS`
/// in `cuda/kernels/common.cuh`). Expressions with more constants bake them into the source.
pub const MASK_CONSTS: usize = 32;

/// An atom constant for 32-bit device code, clamped to 2^30. With lengths up to 2^29 every result
/// is unchanged: a window or prefix bound past 2^30 already covers every key, a chunk or stride
/// of 2^30 exceeds every position difference (|pos - j| < 2^30), as the larger value does.
fn c32(v: i64) -> i32 {
    v.clamp(-(1 << 30), 1 << 30) as i32
}

/// The constants of one atom as the device program reads them (clamped by [`c32`]): `window`
/// `[l, r]`, `sinks` / `prefix` `[n]`, `chunk` `[c]`, `strided` `[s]`, `power` `[b]`, `radial`
/// `[f, w]`, a neighborhood
/// `[n, stride, k, d]` per axis (outermost first); none for `full`, `causal`, `document`.
pub(crate) fn atom_consts(atom: &Atom) -> Vec<i32> {
    match atom {
        Atom::Full | Atom::Causal | Atom::Document => Vec::new(),
        Atom::Window { l, r } => vec![c32(*l), c32(*r)],
        Atom::Below(s) => vec![c32(*s)],
        Atom::Chunk(c) => vec![c32(*c)],
        Atom::Strided { s, .. } => vec![c32(*s)],
        // A radial window clamped to 2^30 still covers the whole frame at every frame distance
        // dt of a sequence of L <= 2^29 tokens: 2^r <= dt <= L / F gives 2^30 >> r >= 2F.
        Atom::Power(b) => vec![c32(*b)],
        Atom::Radial { f, w } => vec![c32(*f), c32(*w)],
        Atom::Nbr(axes) => axes
            .iter()
            .flat_map(|ax| [ax.n, ax.stride, ax.k, ax.d].map(c32))
            .collect(),
    }
}

/// A device program: CUDA source whose text depends only on the expression's structure (unless
/// [`baked`](Self::baked)), and the values of the constants it reads from `p.mc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaProgram {
    pub source: String,
    /// `p.mc[0 .. consts.len()]`; empty when the program reads none (or has them baked in).
    pub consts: Vec<i32>,
    /// The expression had more than [`MASK_CONSTS`] constants: they are written into `source`.
    pub baked: bool,
}

impl CudaProgram {
    /// The constants as the parameter structs hold them (unused slots 0).
    pub fn const_array(&self) -> [i32; MASK_CONSTS] {
        let mut a = [0; MASK_CONSTS];
        a[..self.consts.len()].copy_from_slice(&self.consts);
        a
    }
}

/// Where each atom node's constants live: the first slot of node `n` in `p.mc` (`base[n]`), or
/// the constants themselves when they are baked in.
struct Slots {
    base: Vec<usize>,
    consts: Vec<i32>,
    baked: bool,
}

impl Slots {
    /// Constant `k` of atom node `n` as a C expression: `p.mc[slot]`, or the value itself.
    fn get(&self, n: usize, k: usize) -> String {
        let slot = self.base[n] + k;
        if self.baked {
            self.consts[slot].to_string()
        } else {
            format!("p.mc[{slot}]")
        }
    }
}

impl BoundMask {
    /// The slot layout of the constants: atom nodes in node order, each atom's constants in
    /// [`atom_consts`] order; baked in when `bake` or past [`MASK_CONSTS`].
    fn slots(&self, bake: bool) -> Slots {
        let mut base = vec![0; self.nodes.len()];
        let mut consts = Vec::new();
        for (n, node) in self.nodes.iter().enumerate() {
            base[n] = consts.len();
            if let Node::Atom(a) = node {
                consts.extend(atom_consts(a));
            }
        }
        let baked = bake || consts.len() > MASK_CONSTS;
        Slots {
            base,
            consts,
            baked,
        }
    }

    /// The program's own constants: [`CudaProgram::consts`] for `slots`.
    fn program(source: String, slots: Slots) -> CudaProgram {
        CudaProgram {
            source,
            consts: if slots.baked {
                Vec::new()
            } else {
                slots.consts
            },
            baked: slots.baked,
        }
    }

    /// CUDA source of `__device__ bool la_mask(const P& p, int b, int h, int i, int j)` for a
    /// parameter struct `P` with fields `Sq`, `Sk`, `qdoc`, `kdoc` and `mc` (the constants);
    /// `i` is the query row, `j` the key, `pos = i + Sk - Sq` the aligned query position. The
    /// source is the same for every expression of the same structure; the constants are
    /// returned beside it.
    pub fn cuda_program(&self) -> CudaProgram {
        self.cuda_program_with(false)
    }

    /// [`cuda_program`](Self::cuda_program), with the constants written into the source when
    /// `bake` (one kernel variant per distinct constant; `LONGATTN_CUDA_MASK_CONSTS=0` runs).
    pub fn cuda_program_with(&self, bake: bool) -> CudaProgram {
        let slots = self.slots(bake);
        let body = self.cuda_node(self.root, &slots);
        let shape = if slots.baked {
            self.expr().to_string().replace('\n', " ")
        } else {
            self.shape_node(self.root, &slots)
        };
        let source = format!(
            "// mask: {shape}\ntemplate <typename P>\n__device__ __forceinline__ bool la_mask(const P& p, int b, int h, int i, int j) {{\n    const int pos = i + p.Sk - p.Sq;\n    (void)pos; (void)b; (void)h;\n    return {body};\n}}\n"
        );
        Self::program(source, slots)
    }

    /// When the mask restricted to one query row is a single interval of keys for every row
    /// (`causal`, `window`, `sinks` / `prefix`, `chunk`, `full`, and `&` of those), CUDA source of
    /// `la_mask_interval(p, b, h, i, lo, hi)`: row `i` allows exactly the keys `lo <= j <= hi`
    /// (before the `j < Sk` bound), preceded by `#define LA_MASK_INTERVAL 1`. Kernels then test
    /// Partial tiles with two compares per element instead of running `la_mask`. Its constants
    /// are [`cuda_program`](Self::cuda_program)'s, in the same slots (one `p.mc` serves both).
    pub fn cuda_interval_program(&self) -> Option<CudaProgram> {
        self.cuda_interval_program_with(false)
    }

    /// [`cuda_interval_program`](Self::cuda_interval_program), constants baked in when `bake`.
    pub fn cuda_interval_program_with(&self, bake: bool) -> Option<CudaProgram> {
        let slots = self.slots(bake);
        let (lo, hi) = self.interval_node(self.root, &slots)?;
        let source = format!(
            "#define LA_MASK_INTERVAL 1\ntemplate <typename P>\n__device__ __forceinline__ void la_mask_interval(const P& p, int b, int h, int i, int& lo, int& hi) {{\n    const int pos = i + p.Sk - p.Sq;\n    (void)pos; (void)b; (void)h;\n    lo = {lo};\n    hi = {hi};\n}}\n"
        );
        Some(Self::program(source, slots))
    }

    /// Bounds `(lo, hi)` of the keys node `n` allows in row `pos`, as C expressions; `None` when
    /// the node is not one interval per row.
    fn interval_node(&self, n: usize, s: &Slots) -> Option<(String, String)> {
        const NONE_LO: &str = "-2147483647";
        const NONE_HI: &str = "2147483647";
        match &self.nodes[n] {
            Node::And(a, c) => {
                let (la, ha) = self.interval_node(*a, s)?;
                let (lc, hc) = self.interval_node(*c, s)?;
                Some((
                    format!("la_imax({la}, {lc})"),
                    format!("la_imin({ha}, {hc})"),
                ))
            }
            Node::Atom(atom) => match atom {
                Atom::Full => Some((NONE_LO.into(), NONE_HI.into())),
                Atom::Causal => Some((NONE_LO.into(), "pos".into())),
                Atom::Window { .. } => Some((
                    format!("(pos - {})", s.get(n, 0)),
                    format!("(pos + {})", s.get(n, 1)),
                )),
                Atom::Below(_) => Some((NONE_LO.into(), format!("({} - 1)", s.get(n, 0)))),
                Atom::Chunk(_) => Some((
                    format!("(la_fdiv(pos, {0}) * {0})", s.get(n, 0)),
                    format!("(la_fdiv(pos, {0}) * {0} + {0} - 1)", s.get(n, 0)),
                )),
                // Documents that are one contiguous run of keys each (packed sequences): the
                // run of row i's document, from `doc_key_intervals` (kernel parameters dlo, dhi).
                Atom::Document if self.docs_are_runs() => Some((
                    "p.dlo[(i64)b * p.Sq + i]".into(),
                    "p.dhi[(i64)b * p.Sq + i]".into(),
                )),
                _ => None,
            },
            _ => None,
        }
    }
    /// Per (batch, query row): the first and last key of the row's document when every
    /// document's keys form one contiguous run (`last < first` when the document has no keys);
    /// `None` otherwise or without documents.
    pub fn doc_key_intervals(&self) -> Option<(Vec<i32>, Vec<i32>)> {
        if !self.docs_are_runs() {
            return None;
        }
        let d = self.docs.as_ref()?;
        Some(
            d.hull
                .iter()
                .map(|&(lo, hi)| (lo as i32, hi as i32 - 1))
                .unzip(),
        )
    }

    /// Documents given, and the keys of every query row's document form one contiguous run.
    pub(crate) fn docs_are_runs(&self) -> bool {
        self.docs
            .as_ref()
            .is_some_and(|d| d.dense.iter().all(|&x| x))
    }

    /// Whether the device program reads memory or does division-heavy index math per element
    /// (`document` reads two id arrays, neighborhoods split positions into grid coordinates):
    /// the CUDA forward then evaluates it once per plan into a bit table of the Partial tiles
    /// (`cuda/kernels/mask_bits.cu`) and picks its tiles for that. Interval programs (documents
    /// as contiguous runs included) are never heavy.
    pub fn cuda_program_is_heavy(&self) -> bool {
        self.interval_node(self.root, &self.slots(false)).is_none()
            && self
                .nodes
                .iter()
                .any(|n| matches!(n, Node::Atom(Atom::Document) | Node::Atom(Atom::Nbr(_))))
    }

    fn cuda_node(&self, n: usize, s: &Slots) -> String {
        match &self.nodes[n] {
            Node::Not(a) => format!("!({})", self.cuda_node(*a, s)),
            Node::And(a, c) => format!("({} && {})", self.cuda_node(*a, s), self.cuda_node(*c, s)),
            Node::Or(a, c) => format!("({} || {})", self.cuda_node(*a, s), self.cuda_node(*c, s)),
            Node::Atom(atom) => match atom {
                Atom::Full => "true".into(),
                Atom::Causal => "(j <= pos)".into(),
                Atom::Window { .. } => {
                    format!("(pos - {} <= j && j <= pos + {})", s.get(n, 0), s.get(n, 1))
                }
                Atom::Below(_) => format!("(j < {})", s.get(n, 0)),
                Atom::Chunk(_) => format!("(la_fdiv(pos, {0}) == la_fdiv(j, {0}))", s.get(n, 0)),
                Atom::Strided { .. } => format!("(la_emod(pos - j, {}) == 0)", s.get(n, 0)),
                Atom::Power(_) => format!("la_power(pos, j, {})", s.get(n, 0)),
                Atom::Radial { .. } => {
                    format!("la_radial(pos, j, {}, {})", s.get(n, 0), s.get(n, 1))
                }
                Atom::Document => "(p.qdoc[(i64)b * p.Sq + i] == p.kdoc[(i64)b * p.Sk + j])".into(),
                Atom::Nbr(axes) => {
                    let terms: Vec<String> = (0..axes.len())
                        .map(|a| {
                            let c = |k: usize| s.get(n, 4 * a + k);
                            format!("la_nbr_axis(i, j, {}, {}, {}, {})", c(0), c(1), c(2), c(3))
                        })
                        .collect();
                    format!("({})", terms.join(" && "))
                }
            },
        }
    }

    /// The expression's structure with its constant slots, for the program's header comment:
    /// `(causal & window(mc[0], mc[1]))` (the same for every window).
    fn shape_node(&self, n: usize, s: &Slots) -> String {
        match &self.nodes[n] {
            Node::Not(a) => format!("!{}", self.shape_node(*a, s)),
            Node::And(a, c) => format!("({} & {})", self.shape_node(*a, s), self.shape_node(*c, s)),
            Node::Or(a, c) => format!("({} | {})", self.shape_node(*a, s), self.shape_node(*c, s)),
            Node::Atom(atom) => {
                let name = match atom {
                    Atom::Full => "full",
                    Atom::Causal => "causal",
                    Atom::Document => "document",
                    Atom::Window { .. } => "window",
                    Atom::Below(_) => "below",
                    Atom::Chunk(_) => "chunk",
                    Atom::Strided { .. } => "strided",
                    Atom::Power(_) => "power",
                    Atom::Radial { .. } => "radial",
                    Atom::Nbr(_) => "neighborhood",
                };
                let k = atom_consts(atom).len();
                if k == 0 {
                    return name.into();
                }
                let args: Vec<String> = (s.base[n]..s.base[n] + k)
                    .map(|slot| format!("mc[{slot}]"))
                    .collect();
                format!("{name}({})", args.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{DocIds, MaskExpr, MaskShape};

    fn bind(text: &str, shape: MaskShape) -> BoundMask {
        let e = MaskExpr::parse(text).unwrap();
        // Documents as contiguous runs of 7 tokens (interval programs with `dlo` / `dhi`).
        let docs = e.uses_documents().then(|| DocIds {
            q: (0..shape.batch * shape.sq)
                .map(|t| (t / 7) as i32)
                .collect(),
            k: (0..shape.batch * shape.sk)
                .map(|t| (t / 7) as i32)
                .collect(),
        });
        e.bind(shape, docs).unwrap()
    }

    /// Pairs of masks of the same structure with different constants, one or more per atom kind
    /// and through `&`, `|`, `!` (bound to 512 x 512).
    const SAME_SHAPE: &[(&str, &str)] = &[
        ("window(128,0)", "window(4000,0)"),
        ("causal & window(128,0)", "causal & window(4000,0)"),
        ("window(3,5)", "window(5,3)"),
        ("sinks(4)", "sinks(64)"),
        ("prefix(9)", "prefix(300)"),
        // sinks and prefix are one atom (`j < n`) on the device.
        ("sinks(4)", "prefix(300)"),
        ("chunk(64)", "chunk(100)"),
        ("causal & chunk(64)", "causal & chunk(7)"),
        ("strided(3)", "strided(17)"),
        ("power(64)", "power(7)"),
        (
            "causal & (window(63,0) | power(64))",
            "causal & (window(127,0) | power(128))",
        ),
        ("radial(16,8)", "radial(1560,1560)"),
        ("neighborhood(5)", "neighborhood(9)"),
        ("neighborhood(5,2)", "neighborhood(3,4)"),
        ("neighborhood2d(16,32,5,7)", "neighborhood2d(32,16,3,9)"),
        (
            "neighborhood2d(16,32,5,7,2,1)",
            "neighborhood2d(16,32,3,3,1,3)",
        ),
        (
            "neighborhood3d(8,8,8,3,3,3)",
            "neighborhood3d(4,16,8,3,5,7)",
        ),
        (
            "causal & (sinks(4) | window(1024,0))",
            "causal & (sinks(16) | window(64,3))",
        ),
        ("!chunk(64) & strided(3)", "!chunk(32) & strided(5)"),
        (
            "causal & document & window(9,0)",
            "causal & document & window(90,0)",
        ),
        (
            "!(prefix(8) | strided(2)) | full",
            "!(prefix(80) | strided(6)) | full",
        ),
        (
            "causal | (neighborhood(5) & !sinks(3))",
            "causal | (neighborhood(11) & !sinks(30))",
        ),
        (
            "prefix(9) & chunk(64) & window(2,2)",
            "prefix(90) & chunk(16) & window(20,0)",
        ),
    ];

    /// Masks that differ only in constants give byte-identical sources (element and interval
    /// programs: one kernel variant, one cache key) and different constants; the constants sit
    /// in `p.mc`, in node order.
    #[test]
    fn constants_are_arguments_not_source() {
        let shape = MaskShape::square(512);
        for &(x, y) in SAME_SHAPE {
            let (a, b) = (bind(x, shape), bind(y, shape));
            let (pa, pb) = (a.cuda_program(), b.cuda_program());
            assert_eq!(pa.source, pb.source, "`{x}` vs `{y}`");
            assert_ne!(pa.consts, pb.consts, "`{x}` vs `{y}`");
            assert!(!pa.baked && !pb.baked);
            assert!(pa.source.contains("p.mc[0]"), "`{x}`: {}", pa.source);
            // No constant of either mask is written into the source (numbers in it: slot
            // indices, the 64 of `(i64)`, 0 and 1).
            let numbers: Vec<i32> = pa
                .source
                .split(|ch: char| !ch.is_ascii_digit())
                .filter_map(|t| t.parse().ok())
                .collect();
            for c in pa.consts.iter().chain(&pb.consts).filter(|&&c| c > 1) {
                let slot = |n: &i32| pa.source.contains(&format!("mc[{n}]"));
                let i64_cast = *c == 64 && pa.source.contains("(i64)");
                assert!(
                    !numbers.contains(c) || slot(c) || i64_cast,
                    "`{x}`: {c} in {}",
                    pa.source
                );
            }
            let (ia, ib) = (a.cuda_interval_program(), b.cuda_interval_program());
            assert_eq!(ia.is_some(), ib.is_some(), "`{x}` vs `{y}`");
            if let (Some(ia), Some(ib)) = (ia, ib) {
                assert_eq!(ia.source, ib.source, "`{x}` vs `{y}`");
                // One array serves both programs.
                assert_eq!(ia.consts, pa.consts, "`{x}`");
                assert_eq!(ib.consts, pb.consts, "`{y}`");
            }
        }
        // The slot order: atoms in node order (post-order), arguments in atom order.
        let b = bind("causal & (sinks(4) | window(1024,3))", shape);
        assert_eq!(b.cuda_program().consts, vec![4, 1024, 3]);
        let b = bind("neighborhood2d(16,32,5,7,2,1)", shape);
        assert_eq!(b.cuda_program().consts, vec![16, 32, 5, 2, 32, 1, 7, 1]);
        let b = bind("neighborhood(5)", shape);
        assert_eq!(b.cuda_program().consts, vec![512, 1, 5, 1]);
        // Constants are clamped to 2^30 as the baked ones were.
        let b = bind("window(1099511627776,0) & chunk(4294967296)", shape);
        assert_eq!(b.cuda_program().consts, vec![1 << 30, 0, 1 << 30]);
        // Different structures differ.
        let s = |t: &str| bind(t, shape).cuda_program().source;
        assert_ne!(s("sinks(4)"), s("window(4,0)"));
        assert_ne!(s("causal & window(4,0)"), s("causal | window(4,0)"));
        assert_ne!(s("neighborhood(5)"), s("neighborhood2d(16,32,5,7)"));
        // Programs without constants read none.
        for t in ["causal", "full", "document", "causal & !document"] {
            let p = bind(t, shape).cuda_program();
            assert!(p.consts.is_empty() && !p.source.contains("p.mc"), "{t}");
            assert_eq!(p.const_array(), [0; MASK_CONSTS]);
        }
    }

    /// `p.mc[k]` replaced by `consts[k]` gives exactly the program with the constants baked in
    /// (the form the selftest checked on the GPU before constants became arguments).
    #[test]
    fn constants_substituted_give_the_baked_program() {
        fn substitute(src: &str, consts: &[i32]) -> String {
            let mut out = String::new();
            let mut rest = src;
            while let Some(at) = rest.find("p.mc[") {
                out.push_str(&rest[..at]);
                let tail = &rest[at + 5..];
                let end = tail.find(']').unwrap();
                out.push_str(&consts[tail[..end].parse::<usize>().unwrap()].to_string());
                rest = &tail[end + 1..];
            }
            out.push_str(rest);
            out
        }
        // Without the `// mask:` header line (structure vs expression text).
        let body = |s: &str| {
            s.lines()
                .filter(|l| !l.starts_with("// mask:"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let shape = MaskShape::square(512);
        for &(x, y) in SAME_SHAPE {
            for t in [x, y] {
                let m = bind(t, shape);
                let (p, baked) = (m.cuda_program(), m.cuda_program_with(true));
                assert!(baked.baked && baked.consts.is_empty() && !baked.source.contains("p.mc"));
                assert_eq!(
                    body(&substitute(&p.source, &p.consts)),
                    body(&baked.source),
                    "`{t}`"
                );
                if let Some(i) = m.cuda_interval_program() {
                    let ib = m.cuda_interval_program_with(true).unwrap();
                    assert_eq!(substitute(&i.source, &i.consts), ib.source, "`{t}`");
                }
            }
        }
    }

    /// Past [`MASK_CONSTS`] constants the program falls back to baking them in: the source then
    /// carries the values and `consts` is empty.
    #[test]
    fn too_many_constants_are_baked_in() {
        let shape = MaskShape::square(512);
        let windows = |n: usize| {
            (1..=n)
                .map(|w| format!("window({w},{})", w + 100))
                .collect::<Vec<_>>()
                .join(" | ")
        };
        // 16 windows: 32 constants, the capacity.
        let m = bind(&windows(16), shape);
        let p = m.cuda_program();
        assert!(!p.baked);
        assert_eq!(p.consts.len(), MASK_CONSTS);
        assert_eq!(p.const_array()[..], p.consts[..]);
        assert!(p.source.contains(&format!("p.mc[{}]", MASK_CONSTS - 1)));
        // 17 windows: 34.
        let m = bind(&windows(17), shape);
        let p = m.cuda_program();
        assert!(p.baked && p.consts.is_empty(), "{p:?}");
        assert!(!p.source.contains("p.mc"), "{}", p.source);
        assert!(
            p.source.contains("pos - 17 <= j && j <= pos + 117"),
            "{}",
            p.source
        );
        assert_eq!(p.const_array(), [0; MASK_CONSTS]);
        assert_ne!(
            p.source,
            bind(&windows(17).replace("117", "118"), shape)
                .cuda_program()
                .source
        );
        // The interval form of an `&` chain past the capacity is baked too.
        let chain = (1..=17)
            .map(|w| format!("window({w},{w})"))
            .collect::<Vec<_>>()
            .join(" & ");
        let i = bind(&chain, shape).cuda_interval_program().unwrap();
        assert!(i.baked && i.consts.is_empty() && !i.source.contains("p.mc"));
        // Three 3-D neighborhoods: 36.
        let n3 = ["neighborhood3d(8,8,8,3,3,3)"; 3].join(" | ");
        assert!(bind(&n3, shape).cuda_program().baked);
    }

    /// The values a generated program sees: `p`'s fields and the element's indices.
    struct Env<'a> {
        mc: &'a [i32],
        sq: i64,
        sk: i64,
        qdoc: &'a [i32],
        kdoc: &'a [i32],
        dlo: &'a [i32],
        dhi: &'a [i32],
        b: i64,
        i: i64,
        j: i64,
    }

    /// An evaluator of the C expressions the generator emits (C's int semantics: `/` and `%`
    /// truncate; every intermediate must fit a 32-bit int, as on the device).
    struct Eval<'a> {
        t: Vec<String>,
        k: usize,
        env: &'a Env<'a>,
    }

    impl Eval<'_> {
        fn run(src: &str, env: &Env) -> i64 {
            let mut t = Vec::new();
            let cs: Vec<char> = src.chars().collect();
            let mut x = 0;
            while x < cs.len() {
                let c = cs[x];
                if c.is_whitespace() {
                    x += 1;
                } else if c.is_ascii_alphanumeric() || c == '_' {
                    let s = x;
                    while x < cs.len() && (cs[x].is_ascii_alphanumeric() || cs[x] == '_') {
                        x += 1;
                    }
                    t.push(cs[s..x].iter().collect());
                } else {
                    let two: String = cs[x..(x + 2).min(cs.len())].iter().collect();
                    let n = if ["&&", "||", "==", "<="].contains(&two.as_str()) {
                        2
                    } else {
                        1
                    };
                    t.push(cs[x..x + n].iter().collect());
                    x += n;
                }
            }
            let mut e = Eval { t, k: 0, env };
            let v = e.or();
            assert_eq!(e.k, e.t.len(), "trailing input in `{src}`");
            v
        }
        fn peek(&self) -> &str {
            self.t.get(self.k).map_or("", |s| s.as_str())
        }
        fn eat(&mut self, s: &str) -> bool {
            let hit = self.peek() == s;
            self.k += hit as usize;
            hit
        }
        fn want(&mut self, s: &str) {
            assert!(
                self.eat(s),
                "expected `{s}` at token {} of {:?}",
                self.k,
                self.t
            );
        }
        fn int(v: i64) -> i64 {
            assert!(i32::try_from(v).is_ok(), "{v} overflows a 32-bit int");
            v
        }
        fn or(&mut self) -> i64 {
            let mut v = self.and();
            while self.eat("||") {
                let w = self.and();
                v = (v != 0 || w != 0) as i64;
            }
            v
        }
        fn and(&mut self) -> i64 {
            let mut v = self.eq();
            while self.eat("&&") {
                let w = self.eq();
                v = (v != 0 && w != 0) as i64;
            }
            v
        }
        fn eq(&mut self) -> i64 {
            let mut v = self.rel();
            while self.eat("==") {
                v = (v == self.rel()) as i64;
            }
            v
        }
        fn rel(&mut self) -> i64 {
            let v = self.add();
            if self.eat("<=") {
                (v <= self.add()) as i64
            } else if self.eat("<") {
                (v < self.add()) as i64
            } else {
                v
            }
        }
        fn add(&mut self) -> i64 {
            let mut v = self.mul();
            loop {
                if self.eat("+") {
                    v = Self::int(v + self.mul());
                } else if self.eat("-") {
                    v = Self::int(v - self.mul());
                } else {
                    return v;
                }
            }
        }
        fn mul(&mut self) -> i64 {
            let mut v = self.unary();
            while self.eat("*") {
                v = Self::int(v * self.unary());
            }
            v
        }
        fn unary(&mut self) -> i64 {
            if self.eat("!") {
                (self.unary() == 0) as i64
            } else if self.eat("-") {
                -self.unary()
            } else {
                self.primary()
            }
        }
        fn primary(&mut self) -> i64 {
            if self.eat("(") {
                if self.eat("i64") {
                    // A cast to 64 bits (array indices): no 32-bit check after it.
                    self.want(")");
                    return self.unary();
                }
                let v = self.or();
                self.want(")");
                return v;
            }
            let w = self.t[self.k].clone();
            self.k += 1;
            if let Ok(v) = w.parse::<i64>() {
                return v;
            }
            if w == "p" {
                self.want(".");
                let f = self.t[self.k].clone();
                self.k += 1;
                let env = self.env;
                let arr: &[i32] = match f.as_str() {
                    "Sq" => return env.sq,
                    "Sk" => return env.sk,
                    "mc" => env.mc,
                    "qdoc" => env.qdoc,
                    "kdoc" => env.kdoc,
                    "dlo" => env.dlo,
                    "dhi" => env.dhi,
                    _ => panic!("unknown field p.{f}"),
                };
                self.want("[");
                let x = self.or();
                self.want("]");
                return arr[x as usize] as i64;
            }
            if self.eat("(") {
                let mut a = vec![self.or()];
                while self.eat(",") {
                    a.push(self.or());
                }
                self.want(")");
                return match (w.as_str(), &a[..]) {
                    ("la_imax", &[x, y]) => x.max(y),
                    ("la_imin", &[x, y]) => x.min(y),
                    // As common.cuh: truncating division corrected to floor.
                    ("la_fdiv", &[x, y]) => {
                        let q = x / y;
                        if x % y != 0 && ((x < 0) != (y < 0)) {
                            q - 1
                        } else {
                            q
                        }
                    }
                    ("la_emod", &[x, y]) => {
                        let r = x % y;
                        if r < 0 {
                            r + y
                        } else {
                            r
                        }
                    }
                    // As common.cuh: floor division, then the sign dropped.
                    ("la_power", &[pos, j, b]) => {
                        let d = (pos.div_euclid(b) - j.div_euclid(b)).abs();
                        (d & (d - 1) == 0) as i64
                    }
                    ("la_radial", &[pos, j, f, w]) => {
                        let (tq, tk) = (pos.div_euclid(f), j / f);
                        let dt = (tq - tk).abs();
                        let ds = (pos.rem_euclid(f) - j % f).abs();
                        let r = if dt <= 1 {
                            0
                        } else {
                            31 - (dt as i32).leading_zeros()
                        };
                        (ds <= (w as i32 >> r) as i64) as i64
                    }
                    ("la_nbr_axis", &[i, j, n, stride, k, d]) => {
                        let (cq, ck) = ((i / stride) % n, (j / stride) % n);
                        if cq % d != ck % d {
                            return 0;
                        }
                        let r = cq % d;
                        let nr = (n - r + d - 1) / d;
                        if k >= nr {
                            return 1;
                        }
                        let (gq, gk) = (cq / d, ck / d);
                        let s = (gq - k / 2).max(0).min(nr - k);
                        (s <= gk && gk < s + k) as i64
                    }
                    _ => panic!("unknown call {w}{a:?}"),
                };
            }
            let env = self.env;
            match w.as_str() {
                "pos" => Self::int(env.i + env.sk - env.sq),
                "i" => env.i,
                "j" => env.j,
                "b" => env.b,
                "true" => 1,
                _ => panic!("unknown name {w}"),
            }
        }
    }

    /// The generated programs, run by the evaluator above with their constants, agree with the
    /// element reference on every pair (element program: `la_mask`; interval program:
    /// `lo <= j <= hi`), on shapes with Sq != Sk, two batch rows of documents, and constants
    /// past the clamp.
    #[test]
    fn programs_with_their_constants_match_the_reference() {
        let line = |src: &str, start: &str| -> String {
            let l = src
                .lines()
                .find(|l| l.trim_start().starts_with(start))
                .unwrap();
            l.trim_start()[start.len()..]
                .trim_end_matches(';')
                .to_string()
        };
        let rect = MaskShape {
            batch: 2,
            sq: 40,
            sk: 56,
        };
        let mut cases: Vec<(String, MaskShape)> = [
            "causal",
            "full",
            "window(5,2)",
            "causal & window(9,0)",
            "sinks(3) | window(4,4)",
            "prefix(10) & chunk(8)",
            "chunk(12)",
            "strided(3)",
            "!chunk(16) & strided(5)",
            "causal & document",
            "causal & document & window(6,1)",
            "!(prefix(8) | strided(2)) | full",
            "causal & (sinks(4) | window(7,0))",
            "window(1099511627776,3) & chunk(4294967296)",
            "sinks(1099511627776) & strided(4294967296)",
            "power(4)",
            "power(1)",
            "causal & (sinks(2) | window(3,0) | power(5))",
            "power(1099511627776)",
            "radial(8,4)",
            "radial(5,0)",
            "radial(7,1099511627776) & !power(3)",
            "radial(1099511627776,9)",
        ]
        .iter()
        .map(|t| (t.to_string(), rect))
        .collect();
        for t in [
            "neighborhood(5)",
            "neighborhood(3,4)",
            "neighborhood2d(6,8,3,5)",
            "neighborhood2d(6,8,3,3,2,1)",
            "neighborhood3d(2,4,6,1,3,3)",
            "causal | (neighborhood(5) & !sinks(3))",
        ] {
            cases.push((
                t.to_string(),
                MaskShape {
                    batch: 1,
                    sq: 48,
                    sk: 48,
                },
            ));
        }
        for (t, shape) in &cases {
            let m = bind(t, *shape);
            let prog = m.cuda_program();
            assert!(!prog.baked);
            let body = line(&prog.source, "return ");
            let iv = m.cuda_interval_program();
            let (dlo, dhi) = m.doc_key_intervals().unwrap_or_default();
            let (qdoc, kdoc) = m
                .docs
                .as_ref()
                .map(|d| (d.q.clone(), d.k.clone()))
                .unwrap_or_default();
            for b in 0..shape.batch {
                for i in 0..shape.sq {
                    let env = |j: usize| Env {
                        mc: &prog.consts,
                        sq: shape.sq as i64,
                        sk: shape.sk as i64,
                        qdoc: &qdoc,
                        kdoc: &kdoc,
                        dlo: &dlo,
                        dhi: &dhi,
                        b: b as i64,
                        i: i as i64,
                        j: j as i64,
                    };
                    let bounds = iv.as_ref().map(|p| {
                        assert_eq!(p.consts, prog.consts);
                        let e = env(0);
                        (
                            Eval::run(&line(&p.source, "lo = "), &e),
                            Eval::run(&line(&p.source, "hi = "), &e),
                        )
                    });
                    for j in 0..shape.sk {
                        let want = m.allowed(b, i, j);
                        let got = Eval::run(&body, &env(j)) != 0;
                        assert_eq!(got, want, "`{t}` b {b} i {i} j {j}: {body}");
                        if let Some((lo, hi)) = bounds {
                            let j = j as i64;
                            assert_eq!(
                                lo <= j && j <= hi,
                                want,
                                "`{t}` interval b {b} i {i} j {j}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The capacity is `LA_MASK_CONSTS` of the kernels.
    #[test]
    fn capacity_matches_the_kernels() {
        let common = include_str!("../cuda/kernels/common.cuh");
        assert!(
            common.contains(&format!("#define LA_MASK_CONSTS {MASK_CONSTS}\n")),
            "common.cuh must define LA_MASK_CONSTS {MASK_CONSTS}"
        );
    }
}
