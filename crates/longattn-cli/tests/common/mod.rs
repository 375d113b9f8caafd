//! Helpers shared by the CLI's integration tests.
use std::path::PathBuf;

/// A fresh path `name` in this process's temporary folder `longattn-{prefix}-{pid}`: a file or
/// folder left there by an earlier process of the same id is removed first (the commands refuse
/// to overwrite their outputs).
pub fn tmp(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("longattn-{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    let _ = std::fs::remove_file(&p);
    let _ = std::fs::remove_dir_all(&p);
    p
}
