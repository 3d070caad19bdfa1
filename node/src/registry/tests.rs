use std::io::Read;

use alloy::primitives::{Address, U256};

use super::*;
use crate::{artifacts::load_or_create_key, store::tables::VersionRecord};

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    registry: Registry,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    let key = load_or_create_key(&dir.path().join("artifacts.key")).unwrap();
    let artifacts = ArtifactStore::open(&dir.path().join("artifacts"), key, store.clone()).unwrap();
    let registry = Registry::new(store.clone(), artifacts, Audit::new(store.clone()));
    Fixture { _dir: dir, store, registry }
}

fn op() -> Context {
    Context::operator()
}

fn wallet(n: u8) -> Context {
    Context { actor: Actor::Wallet(Address::repeat_byte(n)), request_id: Some(format!("req-{n}")) }
}

fn safetensors(seed: u8) -> Vec<u8> {
    let header = r#"{"w":{"dtype":"BF16","shape":[4,8],"data_offsets":[0,64]},"b":{"dtype":"F32","shape":[4],"data_offsets":[64,80]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend((0..80u8).map(|i| i.wrapping_mul(seed)));
    bytes
}

impl Fixture {
    /// Streams a file through the check into the artifact store, as the upload endpoint does.
    fn upload(&self, bytes: &[u8]) -> Result<ModelFileSummary, RegistryError> {
        let (reader, header) = upload::Checked::new(bytes);
        let blob = self.registry.artifacts().put(reader, u64::MAX)?;
        let header = header.lock().unwrap().clone().unwrap();
        file_summary("model.safetensors", &blob, header)
    }

    /// The bytes of the tree's file at `path`.
    fn read(&self, path: &str) -> Vec<u8> {
        let record = self.registry.file(path).unwrap().unwrap();
        let mut bytes = Vec::new();
        self.registry
            .artifacts()
            .read_range(&record.blake3, 0, record.size)
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        bytes
    }
}

#[test]
fn models_versions_stages_and_aliases() {
    let f = fixture();
    let mut events = f.registry.subscribe();
    let mut tags = BTreeMap::new();
    tags.insert("team".to_owned(), "risk".to_owned());
    let model = f.registry.create_model(&op(), "fraud", "detects fraud", tags).unwrap();
    assert_eq!(model.owner, None);
    assert!(matches!(
        f.registry.create_model(&op(), "fraud", "", BTreeMap::new()),
        Err(RegistryError::AlreadyExists(_))
    ));

    let file = f.upload(&safetensors(3)).unwrap();
    assert_eq!((file.parameters, file.tensors), (36, 2));
    assert_eq!(file.dtypes.get("BF16"), Some(&32));
    let v1 = f
        .registry
        .create_version(&op(), "fraud", NewVersion { file: Some(file.clone()), ..Default::default() })
        .unwrap();
    assert_eq!(v1.version.version, 1);
    assert_eq!(v1.version.source, format!("mlflow-artifacts:/registry/{}/1", model.id));
    let v2 = f
        .registry
        .create_version(
            &op(),
            "fraud",
            NewVersion { source: "s3://bucket/m".into(), run_id: "r2".into(), ..Default::default() },
        )
        .unwrap();
    assert_eq!(v2.version.version, 2);

    f.registry.transition_stage(&op(), "fraud", 1, Stage::Production, false).unwrap();
    f.registry.transition_stage(&op(), "fraud", 2, Stage::parse("production").unwrap(), true).unwrap();
    assert_eq!(f.registry.version("fraud", 1).unwrap().stage, Stage::Archived);
    assert_eq!(f.registry.version("fraud", 2).unwrap().stage, Stage::Production);
    let latest = f.registry.latest_versions("fraud", &[]).unwrap();
    assert_eq!(
        latest.iter().map(|v| (v.stage, v.version.version)).collect::<Vec<_>>(),
        [(Stage::Production, 2), (Stage::Archived, 1)]
    );

    f.registry.set_alias(&op(), "fraud", "champion", 1).unwrap();
    f.registry.set_alias(&op(), "fraud", "champion", 2).unwrap();
    assert_eq!(f.registry.by_alias("fraud", "champion").unwrap().version.version, 2);
    for bad in ["latest", "v3", "a b", ""] {
        assert!(
            matches!(f.registry.set_alias(&op(), "fraud", bad, 1), Err(RegistryError::Invalid(_))),
            "{bad}"
        );
    }
    assert!(matches!(f.registry.set_alias(&op(), "fraud", "x", 9), Err(RegistryError::NotFound(_))));

    // Deleting a version drops its aliases; its number is never given again.
    f.registry.delete_version(&op(), "fraud", 2).unwrap();
    assert!(matches!(f.registry.by_alias("fraud", "champion"), Err(RegistryError::NotFound(_))));
    let v3 = f.registry.create_version(&op(), "fraud", NewVersion::default()).unwrap();
    assert_eq!(v3.version.version, 3);

    f.registry.rename_model(&op(), "fraud", "fraud-v2").unwrap();
    assert!(f.registry.model("fraud").unwrap().is_none());
    assert_eq!(f.registry.versions("fraud-v2").unwrap().len(), 2);

    let kinds: Vec<_> = std::iter::from_fn(|| events.try_recv().ok()).map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            "model_created",
            "version_created",
            "version_created",
            "stage_changed",
            "stage_changed",
            "stage_changed",
            "alias_set",
            "alias_set",
            "version_deleted",
            "version_created",
            "model_renamed"
        ]
    );
    // Each change is in the audit log, and the chain holds.
    let log = crate::audit::list(&f.store, 0, 100).unwrap();
    assert_eq!(log.len(), kinds.len());
    assert!(
        log.iter()
            .any(|e| e.action == "registry.stage_changed Production -> Archived"
                && e.object == "model:fraud/1")
    );
    assert!(crate::audit::verify(&f.store).unwrap().first_broken.is_none());
}

#[test]
fn only_the_owner_or_an_operator_writes_a_model() {
    let f = fixture();
    assert!(matches!(
        f.registry.create_model(
            &Context { actor: Actor::Anonymous, request_id: None },
            "m",
            "",
            BTreeMap::new()
        ),
        Err(RegistryError::Unauthenticated(_))
    ));
    let model = f.registry.create_model(&wallet(1), "m", "", BTreeMap::new()).unwrap();
    assert_eq!(model.owner, Some(Address::repeat_byte(1)));
    assert!(matches!(
        f.registry.create_version(&wallet(2), "m", NewVersion::default()),
        Err(RegistryError::Forbidden(_))
    ));
    assert!(matches!(f.registry.set_model_tag(&wallet(2), "m", "k", "v"), Err(RegistryError::Forbidden(_))));
    assert!(matches!(f.registry.delete_model(&wallet(2), "m"), Err(RegistryError::Forbidden(_))));
    f.registry.create_version(&wallet(1), "m", NewVersion::default()).unwrap();
    f.registry.set_model_tag(&op(), "m", "k", "v").unwrap();
    assert_eq!(f.registry.versions("m").unwrap().len(), 1);
    // The audit log names the wallet and the request.
    let log = crate::audit::list(&f.store, 0, 10).unwrap();
    assert_eq!(log[0].actor, Address::repeat_byte(1).to_checksum(None));
    assert_eq!(log[0].request_id.as_deref(), Some("req-1"));
}

#[test]
fn bad_input_changes_nothing() {
    let f = fixture();
    f.registry.create_model(&op(), "m", "", BTreeMap::new()).unwrap();
    for source in ["../etc/passwd", "s3://b/%2e%2e/x", "a%2Fb", "x\0y", "runs:/r/../../m"] {
        assert!(
            matches!(
                f.registry.create_version(
                    &op(),
                    "m",
                    NewVersion { source: source.into(), ..Default::default() }
                ),
                Err(RegistryError::Invalid(_))
            ),
            "{source}"
        );
    }
    assert!(matches!(
        f.registry.create_model(&op(), "", "", BTreeMap::new()),
        Err(RegistryError::Invalid(_))
    ));
    assert!(matches!(
        f.registry.create_model(&op(), "a\nb", "", BTreeMap::new()),
        Err(RegistryError::Invalid(_))
    ));
    assert!(matches!(
        f.registry.transition_stage(&op(), "m", 1, Stage::Staging, false),
        Err(RegistryError::NotFound(_))
    ));
    assert!(matches!(Stage::parse("prod"), Err(RegistryError::Invalid(_))));
    assert!(f.registry.versions("m").unwrap().is_empty());
    assert_eq!(f.registry.model("m").unwrap().unwrap().last_version, 0);

    // A failed version creation drops the file reference it was handed.
    let file = f.upload(&safetensors(5)).unwrap();
    let err = f.registry.create_version(
        &wallet(9),
        "m",
        NewVersion { file: Some(file.clone()), ..Default::default() },
    );
    assert!(matches!(err, Err(RegistryError::Forbidden(_))));
    assert_eq!(f.registry.artifacts().info(&file.blake3).unwrap().unwrap().refs, 0);

    // Not a safetensors file: the store keeps nothing.
    let mut bad = safetensors(5);
    bad.push(0);
    assert!(f.upload(&bad).is_err());
    assert_eq!(f.store.iter::<crate::store::tables::Blobs>().count(), 1);
}

#[test]
fn metrics_series_keep_their_order() {
    let f = fixture();
    f.registry.create_model(&op(), "m", "", BTreeMap::new()).unwrap();
    f.registry.create_version(&op(), "m", NewVersion::default()).unwrap();
    let point = |key: &str, value: f64, step: i64| MetricPoint {
        key: key.into(),
        value,
        step,
        timestamp: 1000 + step as u64,
    };
    f.registry.log_metrics(&op(), "m", 1, vec![point("loss", 0.9, 0), point("acc", 0.5, 0)]).unwrap();
    f.registry.log_metrics(&op(), "m", 1, vec![point("loss", 0.4, 1)]).unwrap();
    let series = f.registry.metrics("m", 1).unwrap();
    assert_eq!(series["loss"].iter().map(|p| p.value).collect::<Vec<_>>(), [0.9, 0.4]);
    assert_eq!(series["acc"].len(), 1);
    assert!(matches!(
        f.registry.log_metrics(&op(), "m", 1, vec![point("x", f64::NAN, 0)]),
        Err(RegistryError::Invalid(_))
    ));
    assert!(matches!(
        f.registry.log_metrics(&op(), "m", 7, vec![point("x", 1.0, 0)]),
        Err(RegistryError::NotFound(_))
    ));
    assert!(matches!(
        f.registry.log_metrics(&wallet(3), "m", 1, vec![point("x", 1.0, 0)]),
        Err(RegistryError::Forbidden(_))
    ));
    assert_eq!(f.registry.metrics("m", 1).unwrap().values().map(Vec::len).sum::<usize>(), 3);
}

#[test]
fn artifact_tree_files_directories_and_references() {
    let f = fixture();
    let put = |path: &str, bytes: &[u8]| {
        let blob = f.registry.artifacts().put(bytes, u64::MAX).unwrap();
        f.registry.put_file(&op(), path, &blob).map(|_| blob)
    };
    let a = put("runs/1/model/MLmodel", b"flavors: {}").unwrap();
    put("runs/1/model/weights.bin", b"0123456789").unwrap();
    put("runs/2/x", b"other").unwrap();
    let root: Vec<_> = f.registry.list("").unwrap().into_iter().map(|e| (e.path, e.is_dir)).collect();
    assert_eq!(root, [("runs".to_owned(), true)]);
    let model = f.registry.list("runs/1/model").unwrap();
    assert_eq!(
        model.iter().map(|e| (e.path.as_str(), e.file_size)).collect::<Vec<_>>(),
        [("runs/1/model/MLmodel", Some(11)), ("runs/1/model/weights.bin", Some(10))]
    );
    assert_eq!(f.read("runs/1/model/MLmodel"), b"flavors: {}");

    // Replacing a file releases the old blob; deleting a directory releases everything under it.
    put("runs/1/model/MLmodel", b"flavors: {python: {}}").unwrap();
    let old = blake3::Hash::from_hex(&a.blake3).unwrap();
    assert_eq!(f.registry.artifacts().info(old.as_bytes()).unwrap().unwrap().refs, 0);
    assert_eq!(f.registry.delete_path(&op(), "runs/1").unwrap(), 2);
    assert!(f.registry.list("runs/1").unwrap().is_empty());
    assert!(matches!(f.registry.delete_path(&op(), "runs/1"), Err(RegistryError::NotFound(_))));

    for bad in ["../x", "a/../b", "a//b", "./a", ""] {
        assert!(put(bad, b"x").is_err(), "{bad}");
    }
    assert!(
        matches!(put("runs/2/x/y", b"x"), Err(RegistryError::Invalid(_))),
        "a file cannot become a directory"
    );
    assert!(
        matches!(put("runs/2", b"x"), Err(RegistryError::Invalid(_))),
        "a directory cannot become a file"
    );
    let blob = f.registry.artifacts().put(&b"x"[..], u64::MAX).unwrap();
    assert!(matches!(
        f.registry.put_file(&wallet(1), "registry/1/1/x", &blob),
        Err(RegistryError::Forbidden(_))
    ));
}

#[test]
fn anchored_versions_are_read_from_the_index() {
    let f = fixture();
    f.registry.create_model(&op(), "m", "", BTreeMap::new()).unwrap();
    let file = f.upload(&safetensors(7)).unwrap();
    let v = f
        .registry
        .create_version(&op(), "m", NewVersion { file: Some(file.clone()), ..Default::default() })
        .unwrap();
    assert!(v.anchored.is_none());
    let hash = B256::from(file.blake3);
    let tx = B256::repeat_byte(0xab);
    f.store
        .put::<Versions>(
            &(U256::from(4), 1),
            &VersionRecord {
                content_hash: hash,
                anchored: crate::store::tables::Origin { block: 77, tx, log_index: 0 },
            },
        )
        .unwrap();
    f.store.put::<ContentVersions>(&hash, &(U256::from(4), 1)).unwrap();
    let anchored = f.registry.version("m", 1).unwrap().anchored.unwrap();
    assert_eq!(anchored, Anchor { token_id: "4".into(), version: 1, tx, block: 77 });
}

#[test]
fn changes_their_audit_entries_and_webhook_events_are_stored_together_in_order() {
    use crate::store::tables::{AuditLog, WebhookOutbox};
    let f = fixture();
    let outbox = webhooks::Outbox::open(f.store.clone()).unwrap();
    let registry = f.registry.clone().with_outbox(outbox);
    registry.create_model(&op(), "ranker", "", BTreeMap::new()).unwrap();
    for _ in 0..8 {
        registry.create_version(&op(), "ranker", NewVersion::default()).unwrap();
    }
    // eight writers move one alias about at once
    let threads: Vec<_> = (1..=8u32)
        .map(|version| {
            let registry = registry.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    registry.set_alias(&op(), "ranker", "champion", version).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    // a change that fails leaves no entry and no event
    assert!(registry.set_alias(&op(), "ranker", "champion", 99).is_err());

    let entries: Vec<_> = f.store.iter::<AuditLog>().map(|e| e.unwrap().1).collect();
    let events: Vec<_> = f.store.iter::<WebhookOutbox>().map(|e| e.unwrap()).collect();
    assert_eq!((entries.len(), events.len()), (1 + 8 + 200, 1 + 8 + 200));
    assert_eq!(crate::audit::verify(&f.store).unwrap().first_broken, None);
    // the log and the outbox tell the same changes in the same order, numbered without a gap
    for (n, (entry, (key, event))) in entries.iter().zip(&events).enumerate() {
        assert_eq!(u64::from_be_bytes(key[..].try_into().unwrap()), n as u64 + 1);
        let object = match event.version {
            Some(v) => format!("model:{}/{v}", event.model),
            None => format!("model:{}", event.model),
        };
        assert_eq!(
            (&entry.object, entry.action.starts_with(&format!("registry.{}", event.kind))),
            (&object, true)
        );
    }
    // and the last change they tell of is the one the model kept
    let kept = registry.require_model("ranker").unwrap().aliases["champion"];
    assert_eq!(events.last().unwrap().1.version, Some(kept));
}

/// A version registered from a run's (or a logged model's) files holds its own copy of their
/// records: what the run does to its files afterwards, and its collection, leave it whole.
#[test]
fn a_version_registered_from_a_run_keeps_its_own_files() {
    let f = fixture();
    let text = |path: &str| String::from_utf8(f.read(path)).unwrap();
    let put = |ctx: &Context, path: &str, bytes: &[u8]| {
        let blob = f.registry.artifacts().put(bytes, u64::MAX).unwrap();
        f.registry.put_file(ctx, path, &blob).unwrap();
        blake3::Hash::from_hex(&blob.blake3).unwrap()
    };
    let owner = wallet(1);
    put(&owner, "1/run/artifacts/model/MLmodel", b"flavors: {}");
    let weights = put(&owner, "1/run/artifacts/model/data/weights.bin", b"0123456789");
    put(&owner, "1/run/artifacts/plot.png", b"not part of the model");
    let model = f.registry.create_model(&owner, "m", "", BTreeMap::new()).unwrap();
    let new = |source: &str| NewVersion { source: source.into(), run_id: "run".into(), ..Default::default() };
    let v1 = f.registry.create_version(&owner, "m", new("mlflow-artifacts:/1/run/artifacts/model")).unwrap();
    let dir = format!("registry/{}/1", model.id);
    assert_eq!(v1.version.artifact_dir.as_deref(), Some(dir.as_str()));
    assert!(v1.version.owns_dir);
    assert_eq!(v1.version.source, "mlflow-artifacts:/1/run/artifacts/model", "the source is kept as given");
    let listed: Vec<_> = f.registry.list(&dir).unwrap().into_iter().map(|e| (e.path, e.is_dir)).collect();
    assert_eq!(listed, [(format!("{dir}/MLmodel"), false), (format!("{dir}/data"), true)]);
    assert_eq!(f.registry.artifacts().info(weights.as_bytes()).unwrap().unwrap().refs, 2);

    // The run overwrites and then deletes its files; they are collected; the version is whole.
    put(&owner, "1/run/artifacts/model/MLmodel", b"flavors: {changed: {}}");
    f.registry.delete_path(&owner, "1/run").unwrap();
    f.registry.artifacts().gc().unwrap();
    assert_eq!(text(&format!("{dir}/MLmodel")), "flavors: {}");
    assert_eq!(text(&format!("{dir}/data/weights.bin")), "0123456789");
    assert_eq!(f.registry.artifacts().info(weights.as_bytes()).unwrap().unwrap().refs, 1);

    // A single file is copied under its name; a location with nothing in it stays a pointer.
    let v2 = f
        .registry
        .create_version(&owner, "m", new(&format!("mlflow-artifacts:/{dir}/data/weights.bin")))
        .unwrap();
    assert_eq!(text(&format!("registry/{}/2/weights.bin", model.id)), "0123456789");
    let v3 = f.registry.create_version(&owner, "m", new("mlflow-artifacts:/1/empty")).unwrap();
    assert_eq!((v3.version.artifact_dir.as_deref(), v3.version.owns_dir), (Some("1/empty"), false));
    assert_eq!(f.registry.artifacts().info(weights.as_bytes()).unwrap().unwrap().refs, 2);

    // Deleting a version releases its copies.
    f.registry.delete_version(&owner, "m", v2.version.version).unwrap();
    f.registry.delete_version(&owner, "m", v1.version.version).unwrap();
    assert_eq!(f.registry.artifacts().info(weights.as_bytes()).unwrap().unwrap().refs, 0);
}

/// A registered version's files are its model's originals: read by the owner or an operator,
/// and never copied into another's version by someone who may not read them.
#[test]
fn registered_files_are_read_by_the_owner_or_an_operator() {
    let f = fixture();
    let owner = wallet(1);
    let model = f.registry.create_model(&owner, "sold", "", BTreeMap::new()).unwrap();
    let file = f.upload(&safetensors(5)).unwrap();
    f.registry.create_version(&owner, "sold", NewVersion { file: Some(file), ..Default::default() }).unwrap();
    let path = format!("registry/{}/1/model.safetensors", model.id);
    f.registry.check_tree_read(&owner.actor, &path).unwrap();
    f.registry.check_tree_read(&op().actor, &path).unwrap();
    let refused = f.registry.check_tree_read(&wallet(2).actor, &path).unwrap_err();
    assert!(
        matches!(&refused, RegistryError::Forbidden(m) if m.contains("'sold'") && m.contains("buyers download their own copy")),
        "{refused}"
    );
    assert!(matches!(
        f.registry.check_tree_read(&Actor::Anonymous, &format!("registry/{}", model.id)),
        Err(RegistryError::Unauthenticated(_))
    ));
    assert!(matches!(
        f.registry.check_tree_read(&wallet(2).actor, "registry/999/1/x"),
        Err(RegistryError::Forbidden(_))
    ));
    for open in ["registry", "1/run/artifacts/x", ""] {
        f.registry.check_tree_read(&Actor::Anonymous, open).unwrap();
    }

    // Someone else cannot make the original theirs by registering its location.
    f.registry.create_model(&wallet(2), "copycat", "", BTreeMap::new()).unwrap();
    let source = format!("mlflow-artifacts:/registry/{}/1", model.id);
    let refused = f.registry.create_version(
        &wallet(2),
        "copycat",
        NewVersion { source: source.clone(), ..Default::default() },
    );
    assert!(matches!(refused, Err(RegistryError::Forbidden(_))), "{refused:?}");
    assert!(f.registry.versions("copycat").unwrap().is_empty(), "nothing was made");
    let hash = f.registry.file(&path).unwrap().unwrap().blake3;
    assert_eq!(f.registry.artifacts().info(&hash).unwrap().unwrap().refs, 1, "no reference kept");
    // the owner may
    f.registry.create_version(&owner, "sold", NewVersion { source, ..Default::default() }).unwrap();
    assert_eq!(f.registry.artifacts().info(&hash).unwrap().unwrap().refs, 2);
}
