//! Device code from a bound mask: the expression becomes one small CUDA function,
//! `la_mask(p, b, h, i, j)`, compiled into the kernel variant and evaluated only inside Partial
//! tiles. Its semantics are [`BoundMask::allowed`]'s, atom for atom (the selftest checks the GPU
//! against the CPU on every atom); constants of the atoms are baked in, sequence lengths and
//! document ids come from the kernel parameters (`p.Sq`, `p.Sk`, `p.qdoc`, `p.kdoc`).
use super::bind::{Atom, BoundMask, Node};

impl BoundMask {
    /// CUDA source of `__device__ bool la_mask(const P& p, int b, int h, i64 i, i64 j)` for a
    /// parameter struct `P` with fields `Sq`, `Sk`, `qdoc`, `kdoc`; `i` is the query row, `j` the
    /// key, `pos = i + Sk - Sq` the aligned query position.
    pub fn cuda_program(&self) -> String {
        let body = self.cuda_node(self.root);
        format!(
            "// mask: {}\ntemplate <typename P>\n__device__ __forceinline__ bool la_mask(const P& p, int b, int h, i64 i, i64 j) {{\n    const i64 pos = i + (i64)p.Sk - (i64)p.Sq;\n    (void)pos; (void)b; (void)h;\n    return {body};\n}}\n",
            self.expr().to_string().replace('\n', " ")
        )
    }

    fn cuda_node(&self, n: usize) -> String {
        match &self.nodes[n] {
            Node::Not(a) => format!("!({})", self.cuda_node(*a)),
            Node::And(a, c) => format!("({} && {})", self.cuda_node(*a), self.cuda_node(*c)),
            Node::Or(a, c) => format!("({} || {})", self.cuda_node(*a), self.cuda_node(*c)),
            Node::Atom(atom) => match atom {
                Atom::Full => "true".into(),
                Atom::Causal => "(j <= pos)".into(),
                Atom::Window { l, r } => format!("(pos - {l}LL <= j && j <= pos + {r}LL)"),
                Atom::Below(s) => format!("(j < {s}LL)"),
                Atom::Chunk(c) => format!("(la_fdiv(pos, {c}LL) == la_fdiv(j, {c}LL))"),
                Atom::Strided { s, .. } => format!("(la_emod(pos - j, {s}LL) == 0)"),
                Atom::Document => "(p.qdoc[(i64)b * p.Sq + i] == p.kdoc[(i64)b * p.Sk + j])".into(),
                Atom::Nbr(axes) => {
                    let terms: Vec<String> = axes
                        .iter()
                        .map(|ax| {
                            format!(
                                "la_nbr_axis(i, j, {}LL, {}LL, {}LL, {}LL)",
                                ax.n, ax.stride, ax.k, ax.d
                            )
                        })
                        .collect();
                    format!("({})", terms.join(" && "))
                }
            },
        }
    }
}
