//! `agora watermark` as a user runs it: keygen, embed with a license, verify (non-blind, blind,
//! JSON), trace, and bad input that must fail clearly and write nothing.

use std::{os::unix::fs::PermissionsExt, path::Path};

use agora_e2e::agora;

/// A bf16 safetensors file with two 512×384 matrices of varied weights and a small bias.
fn write_model(path: &Path) {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut body = Vec::new();
    let mut header = Vec::new();
    for name in ["layer.0.weight", "layer.1.weight"] {
        let start = body.len();
        for _ in 0..512 * 384 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let value = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04;
            body.extend_from_slice(&((value.to_bits() >> 16) as u16).to_le_bytes());
        }
        header.push(format!(
            r#""{name}":{{"dtype":"BF16","shape":[512,384],"data_offsets":[{start},{}]}}"#,
            body.len()
        ));
    }
    let start = body.len();
    body.extend_from_slice(&[0u8; 384 * 4]);
    header.push(format!(
        r#""layer.0.bias":{{"dtype":"F32","shape":[384],"data_offsets":[{start},{}]}}"#,
        body.len()
    ));
    let header = format!("{{{}}}", header.join(","));
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    std::fs::write(path, out).unwrap();
}

fn run(args: &[&str]) -> (bool, String, String) {
    let (status, stdout, stderr) = agora(args, &[]);
    (status.success(), stdout, stderr)
}

#[test]
fn keygen_embed_verify_trace_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (key, original, marked) = (p("master.key"), p("model.safetensors"), p("marked.safetensors"));
    write_model(Path::new(&original));

    let (ok, _, _) = run(&["watermark", "keygen", "-o", &key]);
    assert!(ok);
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let before = std::fs::read(&key).unwrap();
    let (ok, _, stderr) = run(&["watermark", "keygen", "-o", &key]);
    assert!(!ok && stderr.contains("never overwritten"), "{stderr}");
    assert_eq!(std::fs::read(&key).unwrap(), before, "the existing key is untouched");

    let (ok, stdout, stderr) =
        run(&["watermark", "embed", &original, &marked, "--key", &key, "--license", "7", "--json"]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["output_blake3"], blake3::hash(&std::fs::read(&marked).unwrap()).to_hex().to_string());
    assert_eq!(report["commitment"].as_str().unwrap().len(), 64);
    assert_eq!(report["license"], "7");

    let (ok, stdout, _) =
        run(&["watermark", "verify", &marked, "--key", &key, "--original", &original, "--json"]);
    assert!(ok);
    let evidence: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(evidence["verdict"], true, "{evidence}");
    assert_eq!(evidence["mode"], "non_blind");
    assert_eq!(evidence["statistics"].as_array().unwrap().len(), 4);
    assert!(evidence["p_value"].as_f64().unwrap() <= 1e-9);

    let (ok, stdout, _) = run(&["watermark", "verify", &original, "--key", &key, "--original", &original]);
    assert!(ok);
    assert!(stdout.contains("owner mark: not found"), "{stdout}");

    let hash = report["original_blake3"].as_str().unwrap();
    let (ok, stdout, _) =
        run(&["watermark", "verify", &marked, "--key", &key, "--original-hash", hash, "--json"]);
    assert!(ok);
    let blind: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(blind["mode"], "blind");

    let (ok, stdout, _) =
        run(&["watermark", "trace", &marked, "--key", &key, "--original", &original, "--licenses", "1-50"]);
    assert!(ok);
    assert!(stdout.contains("1 of 50 licenses accused") && stdout.contains("license 7: PRESENT"), "{stdout}");
    let list = p("ids.txt");
    std::fs::write(&list, "# suspects\n1-6\n8\n").unwrap();
    let (ok, stdout, _) =
        run(&["watermark", "trace", &marked, "--key", &key, "--original", &original, "--licenses", &list]);
    assert!(ok);
    assert!(stdout.contains("no license accused among 7 tested"), "{stdout}");
}

#[test]
fn bad_input_fails_clearly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (key, original, out) = (p("master.key"), p("model.safetensors"), p("out.safetensors"));
    write_model(Path::new(&original));
    assert!(run(&["watermark", "keygen", "-o", &key]).0);

    let not_a_key = p("not.key");
    std::fs::write(&not_a_key, "hello").unwrap();
    let (ok, _, stderr) = run(&["watermark", "embed", &original, &out, "--key", &not_a_key]);
    assert!(!ok && stderr.contains("is not a watermark key file"), "{stderr}");

    let text = p("notes.safetensors");
    std::fs::write(&text, "these are not weights").unwrap();
    let (ok, _, stderr) = run(&["watermark", "embed", &text, &out, "--key", &key]);
    assert!(!ok && stderr.contains("is not a usable safetensors file"), "{stderr}");

    let bytes = std::fs::read(&original).unwrap();
    let truncated = p("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, stderr) = run(&["watermark", "embed", &truncated, &out, "--key", &key]);
    assert!(!ok && stderr.contains("truncated"), "{stderr}");

    let (ok, _, stderr) = run(&["watermark", "verify", &original, "--key", &key]);
    assert!(!ok && stderr.contains("--original-hash"), "{stderr}");
    let (ok, _, stderr) =
        run(&["watermark", "trace", &original, "--key", &key, "--original", &original, "--licenses", "9-1"]);
    assert!(!ok && stderr.contains("9-1"), "{stderr}");

    assert!(!Path::new(&out).exists(), "nothing was written");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(leftovers.iter().all(|n| !n.to_string_lossy().contains("partial")), "{leftovers:?}");
}
