//! Parse arbitrary UTF-8 as a mask expression. When it parses: the canonical text re-parses to
//! the same tree, and binding to small shapes and building schedules never panics (errors are
//! fine), and the schedule's pair count matches the element reference.
#![no_main]
use libfuzzer_sys::fuzz_target;
use longattn::mask::{DocIds, MaskExpr, MaskShape};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(e) = MaskExpr::parse(text) else {
        return;
    };
    let canon = e.to_string();
    let again = MaskExpr::parse(&canon).expect("canonical text must parse");
    assert_eq!(again, e, "round trip of {text:?} via {canon:?}");
    for (batch, sq, sk) in [(1, 1, 1), (1, 7, 7), (2, 12, 12), (1, 5, 9), (1, 9, 5), (1, 1, 17)] {
        let docs = DocIds {
            q: (0..batch * sq).map(|i| (i % sq / 3) as i32).collect(),
            k: (0..batch * sk).map(|j| (j % sk / 4) as i32).collect(),
        };
        let Ok(m) = e.bind(MaskShape { batch, sq, sk }, Some(docs)) else {
            continue;
        };
        for (tq, tk) in [(1, 1), (3, 5), (64, 64)] {
            let _ = m.schedule(tq, tk);
        }
        let brute = (0..sq)
            .flat_map(|i| (0..sk).map(move |j| (i, j)))
            .filter(|&(i, j)| m.allowed(0, i, j))
            .count() as u64;
        assert_eq!(m.allowed_pairs(0), brute, "{canon}");
    }
});
