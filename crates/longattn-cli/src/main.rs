//! The `longattn` command: thin glue over the `longattn` library.
//!
//! - `longattn run`: attention over the tensors of a safetensors file.
//! - `longattn mask`: explain a mask expression and draw its tile schedule.
//! - `longattn bench`: the benchmark suite (mask x length x head dim x dtype), optionally against
//!   PyTorch's CPU `scaled_dot_product_attention` in the same run.
//! - `longattn selftest --backend cuda`: the GPU correctness matrix.
//! - `longattn fetch`: download the real-model fixtures (models, books) into the cache.
//! - `longattn tokenize`: token ids of a text file under a GGUF model's tokenizer.
//! - `longattn eval`, `generate`, `capture`: a real model run with longattn's attention.
//! - `longattn kv roles`: the head role table of a model (DuoAttention / RazorAttention probe).
//! - `longattn kv keep`: one prefill-time compression under a press, the kept sets as JSON.
//! - `longattn cp run` / `cp bench`: context parallelism (ring, zigzag, all-gather, Ulysses,
//!   auto) with ranks as threads or processes (TCP); `cp nccl-check` (NCCL on the GPUs),
//!   `cp loopback-check` (the ring with ranks as streams of one GPU).
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod bench;
mod bench_cuda;
mod bench_linear;
mod bench_sparse;
mod capture;
mod common;
mod cp;
mod cp_loopback;
mod eval;
mod fetch;
mod generate;
mod kv;
mod lm;
mod mask;
mod maskglue;
mod peer;
mod plot;
mod run;
mod selftest;
mod tokenize;

#[derive(Parser, Debug)]
#[command(name = "longattn", version, about = "Long-context attention engine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Attention over q/k/v read from a safetensors file; writes out and lse.
    Run(run::Args),
    /// Explain a mask expression: density, tile counts, an ASCII picture, optionally a PNG.
    Mask(mask::Args),
    /// Benchmark suite: correctness against the f64 oracle, then timing; writes a report folder.
    Bench(bench::Args),
    /// Next-token NLL / perplexity of a GGUF model on a text, or the passkey retrieval task.
    Eval(eval::Args),
    /// Greedy generation with the paged KV cache.
    Generate(generate::Args),
    /// Post-RoPE q/k/v of chosen layers on real text, as safetensors.
    Capture(capture::Args),
    /// GPU correctness matrix against the CPU path / f64 oracle (pass/fail table).
    Selftest(selftest::Args),
    /// Download the real-model fixtures (SmolLM2, Gemma-3, Gutenberg books) into the cache.
    Fetch(fetch::Args),
    /// Token ids of a text file under a GGUF model's tokenizer, whitespace-separated.
    Tokenize(tokenize::Args),
    /// Context parallelism: `cp run` (the contract of `run`, the sequence over ranks), `cp bench`
    /// (scaling), `cp decode`, `cp nccl-check` and `cp loopback-check` (the GPU transports).
    Cp(cp::Args),
    /// KV-cache tools: `kv roles` probes a model's heads and saves the role table of `duo(...)`;
    /// `kv keep` writes one prefill-time compression's kept sets as JSON.
    Kv(kv::Args),
}

fn main() -> ExitCode {
    // Output piped into a reader that stops early (`longattn mask ... | head`) ends the process
    // quietly, as other command-line tools do, instead of a panic from `println!`.
    #[cfg(unix)]
    // SAFETY: resetting a signal disposition to its default at startup, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run::main(a),
        Cmd::Mask(a) => mask::main(a),
        Cmd::Bench(a) => bench::main(a),
        Cmd::Eval(a) => eval::main(a),
        Cmd::Generate(a) => generate::main(a),
        Cmd::Capture(a) => capture::main(a),
        Cmd::Selftest(a) => selftest::main(a),
        Cmd::Fetch(a) => fetch::main(a),
        Cmd::Tokenize(a) => tokenize::main(a),
        Cmd::Cp(a) => cp::main(a),
        Cmd::Kv(a) => kv::main(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
