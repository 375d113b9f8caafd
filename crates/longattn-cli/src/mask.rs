//! `longattn mask`: explain a mask expression and draw its tile schedule.
use crate::maskglue::{bind_mask, equal_docs};
use crate::plot;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Mask expression, e.g. `causal & (sinks(4) | window(1024,0))`.
    expr: String,
    /// Query length.
    #[arg(long)]
    sq: usize,
    /// Key length.
    #[arg(long)]
    sk: usize,
    /// Batch rows (document masks may differ per row; batch row 0 is drawn).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Tile size (query and key).
    #[arg(long, default_value_t = 64)]
    tile: usize,
    /// For `document` masks: split every batch row into this many equal documents.
    #[arg(long)]
    docs: Option<usize>,
    /// Also draw the tile schedule into this PNG file.
    #[arg(long)]
    png: Option<PathBuf>,
}

pub fn main(a: Args) -> Result<()> {
    if a.sq == 0 || a.sk == 0 || a.batch == 0 || a.tile == 0 {
        bail!("--sq, --sk, --batch and --tile must be >= 1");
    }
    let docs = match a.docs {
        Some(0) => bail!("--docs must be >= 1"),
        Some(n) => Some((equal_docs(a.batch, a.sq, n), equal_docs(a.batch, a.sk, n))),
        None => None,
    };
    let has_docs = docs.is_some();
    let mask = bind_mask(&a.expr, a.batch, a.sq, a.sk, docs).map_err(|e| {
        let mut m = e.to_string();
        if !has_docs && a.expr.contains("document") {
            m += "\n  pass --docs N to split each sequence into N equal documents";
        }
        anyhow::anyhow!(m)
    })?;
    println!("{}", longattn::mask::explain(&mask, a.tile, a.tile)?);
    let sched = mask.schedule(a.tile, a.tile)?;
    print!("{}", longattn::mask::render_ascii(&sched, 0, 64));
    if let Some(p) = &a.png {
        let grid = longattn::mask::tile_grid(&sched, 0);
        let title = format!("{}  (Sq {} x Sk {}, tile {})", a.expr, a.sq, a.sk, a.tile);
        plot::tile_grid_png(p, &title, &grid)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
