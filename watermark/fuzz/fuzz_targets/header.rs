#![no_main]
//! Any bytes: the parser returns a header or an error, never panics, and what it accepts is
//! internally consistent (tensors in order, inside the file, sizes matching dtype × shape).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header_len, tensors)) = agora_watermark::format::parse_header(data) {
        let mut previous = header_len;
        for tensor in &tensors {
            assert!(tensor.start >= previous && tensor.end <= data.len() && tensor.start <= tensor.end);
            previous = tensor.end;
        }
        assert_eq!(previous, data.len());
    }
});
