//! Device code from a bound mask: the expression becomes one small CUDA function,
//! `la_mask(p, b, h, i, j)`, compiled into the kernel variant and evaluated only inside Partial
//! tiles. Its semantics are [`BoundMask::allowed`]'s, atom for atom (the selftest checks the GPU
//! against the CPU on every atom); constants of the atoms are baked in, sequence lengths and
//! document ids come from the kernel parameters (`p.Sq`, `p.Sk`, `p.qdoc`, `p.kdoc`).
use super::bind::{Atom, BoundMask, Node};

/// Longest sequence the device mask programs take: positions, their differences and sums of a
/// position and a constant then fit 32-bit ints.
pub const DEVICE_MAX_LEN: usize = 1 << 29;

/// An atom constant for 32-bit device code, clamped to 2^30. With lengths up to 2^29 every result
/// is unchanged: a window or prefix bound past 2^30 already covers every key, a chunk or stride
/// of 2^30 exceeds every position difference (|pos - j| < 2^30), as the larger value does.
fn c32(v: i64) -> i64 {
    v.clamp(-(1 << 30), 1 << 30)
}

impl BoundMask {
    /// CUDA source of `__device__ bool la_mask(const P& p, int b, int h, int i, int j)` for a
    /// parameter struct `P` with fields `Sq`, `Sk`, `qdoc`, `kdoc`; `i` is the query row, `j` the
    /// key, `pos = i + Sk - Sq` the aligned query position.
    pub fn cuda_program(&self) -> String {
        let body = self.cuda_node(self.root);
        format!(
            "// mask: {}\ntemplate <typename P>\n__device__ __forceinline__ bool la_mask(const P& p, int b, int h, int i, int j) {{\n    const int pos = i + p.Sk - p.Sq;\n    (void)pos; (void)b; (void)h;\n    return {body};\n}}\n",
            self.expr().to_string().replace('\n', " ")
        )
    }

    /// When the mask restricted to one query row is a single interval of keys for every row
    /// (`causal`, `window`, `sinks` / `prefix`, `chunk`, `full`, and `&` of those), CUDA source of
    /// `la_mask_interval(p, b, h, i, lo, hi)`: row `i` allows exactly the keys `lo <= j <= hi`
    /// (before the `j < Sk` bound), preceded by `#define LA_MASK_INTERVAL 1`. Kernels then test
    /// Partial tiles with two compares per element instead of running `la_mask`.
    pub fn cuda_interval_program(&self) -> Option<String> {
        let (lo, hi) = self.interval_node(self.root)?;
        Some(format!(
            "#define LA_MASK_INTERVAL 1\ntemplate <typename P>\n__device__ __forceinline__ void la_mask_interval(const P& p, int b, int h, int i, int& lo, int& hi) {{\n    const int pos = i + p.Sk - p.Sq;\n    (void)pos; (void)b; (void)h;\n    lo = {lo};\n    hi = {hi};\n}}\n"
        ))
    }

    /// Bounds `(lo, hi)` of the keys node `n` allows in row `pos`, as C expressions; `None` when
    /// the node is not one interval per row.
    fn interval_node(&self, n: usize) -> Option<(String, String)> {
        const NONE_LO: &str = "-2147483647";
        const NONE_HI: &str = "2147483647";
        match &self.nodes[n] {
            Node::And(a, c) => {
                let (la, ha) = self.interval_node(*a)?;
                let (lc, hc) = self.interval_node(*c)?;
                Some((
                    format!("la_imax({la}, {lc})"),
                    format!("la_imin({ha}, {hc})"),
                ))
            }
            Node::Atom(atom) => match atom {
                Atom::Full => Some((NONE_LO.into(), NONE_HI.into())),
                Atom::Causal => Some((NONE_LO.into(), "pos".into())),
                Atom::Window { l, r } => Some((
                    format!("(pos - {})", c32(*l)),
                    format!("(pos + {})", c32(*r)),
                )),
                Atom::Below(s) => Some((NONE_LO.into(), format!("({} - 1)", c32(*s)))),
                Atom::Chunk(c) => Some((
                    format!("(la_fdiv(pos, {0}) * {0})", c32(*c)),
                    format!("(la_fdiv(pos, {0}) * {0} + {0} - 1)", c32(*c)),
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
        self.interval_node(self.root).is_none()
            && self
                .nodes
                .iter()
                .any(|n| matches!(n, Node::Atom(Atom::Document) | Node::Atom(Atom::Nbr(_))))
    }

    fn cuda_node(&self, n: usize) -> String {
        match &self.nodes[n] {
            Node::Not(a) => format!("!({})", self.cuda_node(*a)),
            Node::And(a, c) => format!("({} && {})", self.cuda_node(*a), self.cuda_node(*c)),
            Node::Or(a, c) => format!("({} || {})", self.cuda_node(*a), self.cuda_node(*c)),
            Node::Atom(atom) => match atom {
                Atom::Full => "true".into(),
                Atom::Causal => "(j <= pos)".into(),
                Atom::Window { l, r } => {
                    format!("(pos - {} <= j && j <= pos + {})", c32(*l), c32(*r))
                }
                Atom::Below(s) => format!("(j < {})", c32(*s)),
                Atom::Chunk(c) => format!("(la_fdiv(pos, {0}) == la_fdiv(j, {0}))", c32(*c)),
                Atom::Strided { s, .. } => format!("(la_emod(pos - j, {}) == 0)", c32(*s)),
                Atom::Document => "(p.qdoc[(i64)b * p.Sq + i] == p.kdoc[(i64)b * p.Sk + j])".into(),
                Atom::Nbr(axes) => {
                    let terms: Vec<String> = axes
                        .iter()
                        .map(|ax| {
                            format!(
                                "la_nbr_axis(i, j, {}, {}, {}, {})",
                                c32(ax.n),
                                c32(ax.stride),
                                c32(ax.k),
                                c32(ax.d)
                            )
                        })
                        .collect();
                    format!("({})", terms.join(" && "))
                }
            },
        }
    }
}
