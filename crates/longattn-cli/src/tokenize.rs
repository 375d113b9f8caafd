//! `longattn tokenize`: token ids of a text file, whitespace-separated on stdout.
//!
//! The file is read as bytes and decoded as UTF-8 lossily (invalid bytes, e.g. ISO-8859, become
//! U+FFFD); CRLF line ends are kept. No BOS is added unless `--bos` is given.
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use longattn::model::gguf::Gguf;
use longattn::model::tokenizer::{read_text_lossy, Tokenizer};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// GGUF model file whose vocabulary to use.
    #[arg(long)]
    model: PathBuf,
    /// Text file (UTF-8; invalid bytes are replaced with U+FFFD).
    #[arg(long)]
    text: PathBuf,
    /// Print at most N ids (the first N).
    #[arg(long)]
    limit: Option<usize>,
    /// Put the model's BOS id in front.
    #[arg(long)]
    bos: bool,
}

pub fn main(a: Args) -> Result<()> {
    let g = Gguf::open(&a.model)?;
    let t = Tokenizer::from_gguf(&g)?;
    let text = read_text_lossy(&a.text)?;
    // Tokenizing a book takes a second or more: show a spinner on stderr meanwhile.
    let spin = (text.len() > 1 << 20).then(|| {
        let p = ProgressBar::new_spinner();
        p.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").unwrap());
        p.set_message(format!(
            "tokenizing {} ({:.1} MB)",
            a.text.display(),
            text.len() as f64 / 1e6
        ));
        p.enable_steady_tick(Duration::from_millis(100));
        p
    });
    let mut ids = Vec::new();
    if a.bos {
        ids.push(
            t.bos()
                .with_context(|| format!("{} defines no BOS token", a.model.display()))?,
        );
    }
    ids.extend(t.encode(&text));
    if let Some(p) = spin {
        p.finish_and_clear();
    }
    if let Some(n) = a.limit {
        ids.truncate(n);
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.write_all(b" ")?;
        }
        write!(out, "{id}")?;
    }
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}
