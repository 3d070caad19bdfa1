//! Bad input: clear errors, nothing written, never a panic; and a corpus of malformed headers
//! (the same parser the cargo-fuzz target in watermark/fuzz drives).

use agora_watermark::{MasterKey, ModelFile, Options, WatermarkError, embed, verify_owner};

use crate::model::{self, Rng};

fn key() -> agora_watermark::ModelKey {
    MasterKey::from_bytes([1; 32]).model_key(&[0; 32])
}

fn header(json: &str, body: usize) -> Vec<u8> {
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend(std::iter::repeat_n(0u8, body));
    out
}

#[test]
fn malformed_files_are_clear_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "shorter than the 8-byte header length"),
        ("not safetensors", b"PK\x03\x04 this is a zip file, not weights".to_vec(), "header length"),
        ("header not json", header("{not json", 0), "not a safetensors header"),
        (
            "truncated",
            header(r#"{"w":{"dtype":"F32","shape":[512,512],"data_offsets":[0,1048576]}}"#, 1000),
            "do not end where the file ends",
        ),
        (
            "size lies",
            header(r#"{"w":{"dtype":"F32","shape":[512,512],"data_offsets":[0,16]}}"#, 16),
            "does not match its dtype and shape",
        ),
        (
            "overlapping",
            header(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
            ),
            "overlap",
        ),
    ];
    for (what, bytes, expected) in cases {
        let input = dir.path().join(format!("{what}.safetensors"));
        std::fs::write(&input, &bytes).unwrap();
        let out = dir.path().join(format!("{what}.out"));
        let error = embed(&input, &out, &key(), None, &Options::default()).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, WatermarkError::Format { .. }), "{what}: {message}");
        assert!(message.contains(expected), "{what}: {message}");
        assert!(!out.exists(), "{what}: nothing written");
        assert!(verify_owner(&input, None, &key(), &Options::default()).is_err());
    }
    // too few eligible weights: a valid file with one small tensor
    let small = dir.path().join("small.safetensors");
    model::Model {
        tensors: vec![model::Tensor {
            name: "w".into(),
            shape: vec![64, 64],
            data: model::Data::Float(agora_watermark::FloatKind::F32, vec![0.5; 4096]),
        }],
    }
    .save(&small);
    let out = dir.path().join("small.out");
    let error = embed(&small, &out, &key(), None, &Options::default()).unwrap_err();
    assert!(matches!(error, WatermarkError::TooFewWeights { eligible: 0, .. }), "{error}");
    assert!(!out.exists());
    let missing = embed(&dir.path().join("absent"), &out, &key(), None, &Options::default()).unwrap_err();
    assert!(matches!(missing, WatermarkError::Io { .. }), "{missing}");
}

#[test]
fn a_corpus_of_mutated_headers_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let valid = dir.path().join("valid.safetensors");
    model::synthetic(32, 1, 1).save(&valid);
    let bytes = std::fs::read(&valid).unwrap();
    let header_len = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut rng = Rng::new(42);
    let path = dir.path().join("mutant.safetensors");
    let mut errors = 0;
    for round in 0..2_000 {
        let mut mutant = bytes.clone();
        match round % 4 {
            // flip bytes of the header (digits of offsets and shapes, quotes, brackets)
            0 | 1 => {
                for _ in 0..1 + rng.next_u64() % 4 {
                    let at = (rng.next_u64() as usize) % header_len;
                    mutant[at] = rng.next_u64() as u8;
                }
            }
            // truncate anywhere
            2 => mutant.truncate((rng.next_u64() as usize) % bytes.len()),
            // a lying header length
            _ => mutant[..8].copy_from_slice(&(rng.next_u64() % (2 * header_len as u64)).to_le_bytes()),
        }
        // the fuzz target's checks, on stable
        match agora_watermark::format::parse_header(&mutant) {
            Ok((header_len, tensors)) => {
                let mut previous = header_len;
                for tensor in &tensors {
                    assert!(
                        tensor.start >= previous && tensor.end <= mutant.len() && tensor.start <= tensor.end
                    );
                    previous = tensor.end;
                }
                assert_eq!(previous, mutant.len());
            }
            Err(_) => errors += 1,
        }
        if round % 100 == 0 {
            std::fs::write(&path, &mutant).unwrap();
            let _ = ModelFile::open(&path);
        }
    }
    assert!(errors > 1_000, "most mutants are rejected ({errors})");
}
