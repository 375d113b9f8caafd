//! The GPU correctness matrix (`longattn selftest --backend cuda`): every case runs on the device
//! and is compared with the CPU path / f64 oracle; a table of [`CaseResult`]s comes back.

/// One checked case.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// Group of the case (`forward`, `decode`, ...).
    pub group: &'static str,
    pub name: String,
    pub passed: bool,
    /// Largest error relative to max |reference| (output), and the tolerance it was held to.
    pub err: f64,
    pub tol: f64,
    /// Largest absolute LSE error (0 when not applicable).
    pub lse_err: f64,
    pub detail: String,
}
