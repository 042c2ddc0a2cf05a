//! libFuzzer target: the input is a whole safetensors file (8-byte length, header, data).
//! The header is parsed the way `read_header` does it; the target asserts that nothing
//! panics and that an accepted header satisfies the format's invariants (the same as
//! `check_header` in `rust/core/tests/fuzz_props.rs`).
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use fastfp8_core::header::{parse_header, MAX_HEADER_LEN};
use fastfp8_core::{Dtype, ErrorKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let n = u64::from_le_bytes(data[..8].try_into().unwrap());
    let size = data.len() as u64;
    if n > MAX_HEADER_LEN || n > size - 8 {
        return; // read_header rejects these before reading anything
    }
    let header = &data[8..8 + n as usize];
    match parse_header(Path::new("fuzz.safetensors"), header, size) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Header, "{e}"),
        Ok(h) => {
            assert_eq!(h.data_start, 8 + n);
            let data_len = size - h.data_start;
            let mut names = HashSet::new();
            let mut spans = Vec::new();
            for t in &h.tensors {
                assert!(names.insert(t.name.as_str()), "{:?} twice", t.name);
                assert_ne!(t.name, "__metadata__");
                assert!(t.begin <= t.end);
                let numel = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
                assert_eq!(numel.and_then(|n| t.dtype.nbytes(n)), Some(t.end - t.begin));
                assert_eq!(t.dtype.name().parse::<Dtype>(), Ok(t.dtype));
                spans.push((t.begin, t.end));
            }
            spans.sort();
            let mut cursor = 0;
            for (b, e) in spans {
                assert_eq!(b, cursor, "gap or overlap");
                cursor = e;
            }
            assert_eq!(cursor, data_len, "tensors do not tile the data");
        }
    }
});
