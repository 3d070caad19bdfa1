//! `agora wallet …` as a process: keystore files geth and MetaMask can read back, passwords
//! from the environment, choosing among several wallets, clear errors.

use std::os::unix::fs::PermissionsExt;

use agora_contracts::anvil::DEV_KEYS;
use agora_e2e::agora;
use alloy::signers::local::PrivateKeySigner;
use serde_json::Value;

fn run(args: &[&str], keystore: &str, password: &str) -> (bool, Value, String) {
    let (status, stdout, stderr) = agora(
        args,
        &[("AGORA_KEYSTORE", keystore), ("AGORA_WALLET_PASSWORD", password), ("AGORA_PRIVATE_KEY", "")],
    );
    (status.success(), serde_json::from_str(stdout.trim()).unwrap_or(Value::Null), stderr)
}

#[test]
fn wallets_are_created_imported_listed_and_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let keystore = dir.path().join("keystore");
    let ks = keystore.to_str().unwrap();

    let (ok, created, err) = run(&["wallet", "new", "--json"], ks, "correct horse");
    assert!(ok, "{err}");
    let file = created["file"].as_str().unwrap().to_owned();
    let address = created["address"].as_str().unwrap().to_owned();
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    // Web3 Secret Storage, readable by any other implementation.
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(json["version"], 3);
    assert!(json["crypto"]["kdf"].is_string());
    let opened = PrivateKeySigner::decrypt_keystore(&file, "correct horse").unwrap();
    assert_eq!(opened.address().to_checksum(None), address);
    assert!(PrivateKeySigner::decrypt_keystore(&file, "wrong").is_err());

    let (ok, only, err) = run(&["wallet", "address", "--json"], ks, "");
    assert!(ok, "{err}");
    assert_eq!(only["address"], address.as_str());

    let dev = PrivateKeySigner::from_bytes(&DEV_KEYS[1].parse().unwrap()).unwrap();
    let (ok, imported, err) =
        run(&["wallet", "import", "--private-key", DEV_KEYS[1], "--name", "dev1", "--json"], ks, "pw");
    assert!(ok, "{err}");
    assert_eq!(imported["address"], dev.address().to_checksum(None));
    let (ok, list, _) = run(&["wallet", "list", "--json"], ks, "");
    assert!(ok);
    assert_eq!(list.as_array().unwrap().len(), 2);

    // Two wallets: the choice must be explicit, by name or address.
    let (ok, _, err) = run(&["wallet", "address"], ks, "");
    assert!(!ok);
    assert!(err.contains("--wallet"), "{err}");
    let (ok, chosen, _) = run(&["wallet", "address", "--wallet", "dev1", "--json"], ks, "");
    assert!(ok);
    assert_eq!(chosen["address"], dev.address().to_checksum(None));
    let (ok, chosen, _) = run(&["wallet", "address", "--wallet", &address, "--json"], ks, "");
    assert!(ok);
    assert_eq!(chosen["address"], address.as_str());

    // Importing a keystore file needs its password; the same name is never overwritten.
    let elsewhere = dir.path().join("other");
    let other = elsewhere.to_str().unwrap();
    let (ok, _, err) = run(&["wallet", "import", "--file", &file], other, "wrong");
    assert!(!ok);
    assert!(err.contains("password"), "{err}");
    let (ok, copied, err) = run(&["wallet", "import", "--file", &file, "--json"], other, "correct horse");
    assert!(ok, "{err}");
    assert_eq!(copied["address"], address.as_str());
    let (ok, _, err) = run(&["wallet", "import", "--private-key", DEV_KEYS[1], "--name", "dev1"], ks, "pw");
    assert!(!ok);
    assert!(err.contains("exists"), "{err}");
    let (ok, _, err) = run(&["wallet", "import", "--private-key", "0x1234"], ks, "pw");
    assert!(!ok);
    assert!(err.contains("32 bytes"), "{err}");
}
