//! Text views of a schedule: an ASCII picture, the tile grid (for the PNG drawer), a summary.
use std::fmt::Write;
use std::time::Instant;

use super::bind::BoundMask;
use super::schedule::{BlockSchedule, TileKind};
use crate::error::Result;

/// Tile classes of batch row `b` (head 0): `grid[qt][kt]` is 0 empty, 1 Full, 2 Partial.
pub fn tile_grid(sched: &BlockSchedule, b: usize) -> Vec<Vec<u8>> {
    (0..sched.q_tiles)
        .map(|qt| {
            let mut row = vec![0u8; sched.k_tiles];
            for e in sched.row(b, 0, qt) {
                row[e.k_tile as usize] = match e.kind {
                    TileKind::Full => 1,
                    TileKind::Partial => 2,
                };
            }
            row
        })
        .collect()
}

/// One character per tile of batch row `b`: `#` Full, `+` Partial, `.` not scheduled. With more
/// than `max_cells` tiles along a side, each character covers a block of tiles and shows the
/// largest class in it (`.` < `#` < `+`).
pub fn render_ascii(sched: &BlockSchedule, b: usize, max_cells: usize) -> String {
    let max_cells = max_cells.max(1);
    let fq = sched.q_tiles.div_ceil(max_cells).max(1);
    let fk = sched.k_tiles.div_ceil(max_cells).max(1);
    let (rows, cols) = (sched.q_tiles.div_ceil(fq), sched.k_tiles.div_ceil(fk));
    let mut cells = vec![vec![0u8; cols]; rows];
    for qt in 0..sched.q_tiles {
        for e in sched.row(b, 0, qt) {
            let c = &mut cells[qt / fq][e.k_tile as usize / fk];
            let v = match e.kind {
                TileKind::Full => 1,
                TileKind::Partial => 2,
            };
            *c = (*c).max(v);
        }
    }
    let mut s = String::with_capacity(rows * (cols + 1));
    for row in cells {
        s.extend(row.iter().map(|&v| match v {
            0 => '.',
            1 => '#',
            _ => '+',
        }));
        s.push('\n');
    }
    s
}

/// A summary of the mask on `tile_q` x `tile_k` tiles: density, allowed pairs, Full / Partial /
/// empty tile counts and the schedule build time.
pub fn explain(bound: &BoundMask, tile_q: usize, tile_k: usize) -> Result<String> {
    let shape = bound.shape();
    let t = Instant::now();
    let sched = bound.schedule(tile_q, tile_k)?;
    let build = t.elapsed();
    let (full, partial) = sched.counts();
    let tiles = sched.batch * sched.q_tiles * sched.k_tiles;
    let rows: Vec<usize> = (0..sched.batch).collect();
    let mut pairs: u64 = rows.iter().map(|&b| bound.count_pairs(&sched, b)).sum();
    if sched.batch == 1 {
        pairs *= shape.batch as u64;
    }
    let total = shape.batch as f64 * shape.sq as f64 * shape.sk as f64;
    let mut s = String::new();
    let _ = writeln!(s, "mask:          {}", bound.expr());
    let _ = writeln!(
        s,
        "shape:         batch {}, Sq {}, Sk {} (query i at position p = i + Sk - Sq)",
        shape.batch, shape.sq, shape.sk
    );
    let _ = writeln!(
        s,
        "tiles:         {tile_q} x {tile_k} -> {} x {} per batch row{}",
        sched.q_tiles,
        sched.k_tiles,
        if sched.batch == 1 && shape.batch > 1 {
            " (one schedule shared by all batch rows)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "schedule:      {full} Full, {partial} Partial, {} empty of {tiles} tiles ({:.2}% scheduled)",
        tiles - full - partial,
        100.0 * (full + partial) as f64 / tiles as f64
    );
    let _ = writeln!(
        s,
        "allowed pairs: {pairs} of {total} (density {:.6})",
        pairs as f64 / total
    );
    let _ = writeln!(s, "build time:    {:.3} ms", build.as_secs_f64() * 1e3);
    Ok(s)
}
