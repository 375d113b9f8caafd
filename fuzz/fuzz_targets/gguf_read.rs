//! `cargo fuzz run gguf_read`: arbitrary bytes into `longattn::model::gguf::Gguf::from_bytes`.
//! Any input must give `Ok` or a clean `Err`, never a panic or a huge allocation; every tensor of a
//! parsed file dequantizes or fails cleanly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use longattn::model::gguf::Gguf;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = Gguf::from_bytes(data, "fuzz") {
        let names: Vec<String> = g.tensors().iter().map(|t| t.name.clone()).collect();
        for name in names {
            // Bound the work: dequantize only tensors of modest size.
            if g.tensor(&name).is_some_and(|t| t.n_elements() <= 1 << 20) {
                let _ = g.dequantize(&name);
            }
        }
    }
});
