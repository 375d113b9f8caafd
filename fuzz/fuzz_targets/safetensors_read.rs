//! `cargo fuzz run safetensors_read`: arbitrary bytes into `longattn::io::parse_inputs`.
//! Any input must give `Ok` or a clean `Err`, never a panic, and a parsed file must be consistent.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(inputs) = longattn::io::parse_inputs(data, "fuzz") {
        let dims = inputs.dims().expect("parsed inputs validate");
        if let Some(q) = &inputs.q_doc {
            assert_eq!(q.len(), dims.batch * dims.sq);
        }
    }
});
