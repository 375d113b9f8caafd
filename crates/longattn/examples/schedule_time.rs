//! Build time of the block schedule for a mask at one length and tile size (the CPU kernel's
//! 64 x 64 tiles and the CUDA kernels' 128 x 64).
//!
//! `cargo run --release --example schedule_time -- 'neighborhood2d(256,256,13,13)' 65536`
use longattn::mask::{MaskExpr, MaskShape};
use std::time::Instant;

fn main() -> longattn::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let expr = args.get(1).map(String::as_str).unwrap_or("causal");
    let n: usize = args.get(2).and_then(|x| x.parse().ok()).unwrap_or(65536);
    let m = MaskExpr::parse(expr)?.bind(
        MaskShape {
            batch: 1,
            sq: n,
            sk: n,
        },
        None,
    )?;
    for (tq, tk) in [(64, 64), (128, 64)] {
        m.schedule(tq, tk)?; // warm-up (thread pool start)
        let reps = 5;
        let t0 = Instant::now();
        let mut counts = (0, 0);
        for _ in 0..reps {
            counts = m.schedule(tq, tk)?.counts();
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3 / reps as f64;
        println!(
            "{expr} n {n} tiles {tq}x{tk}: {ms:.3} ms (Full {}, Partial {}) on {} threads",
            counts.0,
            counts.1,
            rayon::current_num_threads()
        );
    }
    Ok(())
}
