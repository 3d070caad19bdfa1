//! Auditing a suspect file: which model it is (by the owner mark, against each original this
//! node holds whose tensor layout matches), then which license's copy it came from (by the
//! fingerprints of that model's licenses), with the on-chain facts to check it by.

use std::{collections::BTreeSet, io::Read, path::Path};

use agora_watermark::{Evidence, MasterKey, ModelFile, Options};
use alloy::primitives::{Address, B256, U256};
use serde::Serialize;

use crate::{
    artifacts::{ArtifactStore, hex},
    store::{
        Store, StoreError,
        tables::{Licenses, Models, TokenLicenses, Versions},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ForensicsError {
    #[error("the suspect file cannot be read as safetensors: {0}")]
    Suspect(agora_watermark::WatermarkError),
    #[error(transparent)]
    Watermark(#[from] agora_watermark::WatermarkError),
    #[error(transparent)]
    Artifact(#[from] crate::artifacts::ArtifactError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("temporary file: {0}")]
    Io(#[from] std::io::Error),
}

/// The model a suspect was identified as.
pub struct Identified {
    pub token_id: U256,
    pub version: u32,
    pub owner: Address,
    pub content_hash: B256,
    pub evidence: Evidence,
    /// The original, decrypted to a private temporary file for the trace.
    original: tempfile::NamedTempFile,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Accused {
    pub license_id: String,
    #[schema(value_type = String)]
    pub holder: Address,
    pub kind: String,
    #[schema(value_type = String)]
    pub purchase_tx: B256,
    pub purchase_block: u64,
    #[schema(value_type = Object)]
    pub evidence: Evidence,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Report {
    pub identified: bool,
    /// Originals with the suspect's tensor layout that were tested.
    pub candidates: usize,
    pub token_id: Option<String>,
    pub version: Option<u32>,
    #[schema(value_type = Option<String>)]
    pub owner: Option<Address>,
    #[schema(value_type = Option<String>)]
    pub content_hash: Option<B256>,
    /// `blake3::keyed_hash(K_master, H_orig)`, as recorded before the first sale.
    pub commitment: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub owner_evidence: Option<Evidence>,
    pub licenses_tested: usize,
    pub accused: Vec<Accused>,
}

impl Report {
    pub fn unidentified(candidates: usize) -> Self {
        Self {
            identified: false,
            candidates,
            token_id: None,
            version: None,
            owner: None,
            content_hash: None,
            commitment: None,
            owner_evidence: None,
            licenses_tested: 0,
            accused: Vec::new(),
        }
    }
}

fn layout(file: &ModelFile) -> BTreeSet<(String, Vec<usize>)> {
    file.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect()
}

/// The tensor layout of a stored original, from its header alone.
fn stored_layout(artifacts: &ArtifactStore, hash: &[u8; 32]) -> Option<BTreeSet<(String, Vec<usize>)>> {
    let mut len = [0u8; 8];
    artifacts.read_range(hash, 0, 8).ok()?.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    artifacts.read_range(hash, 8, 8 + n).ok()?.read_exact(&mut header).ok()?;
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header).ok()?;
    Some(metadata.tensors().into_iter().map(|(name, info)| (name, info.shape.clone())).collect())
}

fn decrypt(
    artifacts: &ArtifactStore,
    hash: &[u8; 32],
    dir: &Path,
) -> Result<tempfile::NamedTempFile, ForensicsError> {
    std::fs::create_dir_all(dir)?;
    let file = tempfile::Builder::new().prefix("original-").tempfile_in(dir)?;
    artifacts.copy_to(hash, file.as_file())?;
    Ok(file)
}

/// Finds the model whose owner mark the suspect carries, newest versions first. `Ok(Err(n))`
/// when none of the `n` candidates matched.
pub fn identify(
    store: &Store,
    artifacts: &ArtifactStore,
    master: &MasterKey,
    suspect: &Path,
    tmp: &Path,
) -> Result<Result<Identified, usize>, ForensicsError> {
    let suspect_file = ModelFile::open(suspect).map_err(ForensicsError::Suspect)?;
    let want = layout(&suspect_file);
    drop(suspect_file);
    let mut versions = Vec::new();
    for item in store.iter::<Versions>() {
        let (key, record) = item?;
        let token = U256::from_be_slice(&key[..32]);
        let version = u32::from_be_bytes(key[32..36].try_into().expect("36-byte version keys"));
        versions.push((token, version, record.content_hash));
    }
    versions.reverse();
    let mut seen = BTreeSet::new();
    let mut candidates = 0;
    for (token, version, hash) in versions {
        if !seen.insert(hash) || artifacts.info(&hash.0)?.is_none() {
            continue;
        }
        if stored_layout(artifacts, &hash.0).as_ref() != Some(&want) {
            continue;
        }
        candidates += 1;
        let original = decrypt(artifacts, &hash.0, tmp)?;
        let model_key = master.model_key(&hash.0);
        let evidence =
            agora_watermark::verify_owner(suspect, Some(original.path()), &model_key, &Options::default())?;
        if evidence.verdict {
            let owner = store.get::<Models>(&token)?.unwrap_or_default().owner;
            return Ok(Ok(Identified {
                token_id: token,
                version,
                owner,
                content_hash: hash,
                evidence,
                original,
            }));
        }
    }
    Ok(Err(candidates))
}

/// Tests every license of the identified model against the suspect.
pub fn trace(
    store: &Store,
    master: &MasterKey,
    suspect: &Path,
    found: Identified,
    candidates: usize,
) -> Result<Report, ForensicsError> {
    let mut ids = Vec::new();
    for item in store.scan::<TokenLicenses>(&found.token_id.to_be_bytes::<32>(), None, false) {
        let (key, ()) = item?;
        ids.push(U256::from_be_slice(&key[32..64]));
    }
    let model_key = master.model_key(&found.content_hash.0);
    let numeric: Vec<u128> = ids.iter().map(|id| id.saturating_to::<u128>()).collect();
    let evidence =
        agora_watermark::trace(suspect, found.original.path(), &model_key, &numeric, &Options::default())?;
    let mut accused = Vec::new();
    for (id, evidence) in ids.iter().zip(evidence) {
        if !evidence.verdict {
            continue;
        }
        if let Some(license) = store.get::<Licenses>(id)? {
            accused.push(Accused {
                license_id: id.to_string(),
                holder: license.holder,
                kind: crate::market::kind_name(license.kind),
                purchase_tx: license.purchased.tx,
                purchase_block: license.purchased.block,
                evidence,
            });
        }
    }
    Ok(Report {
        identified: true,
        candidates,
        token_id: Some(found.token_id.to_string()),
        version: Some(found.version),
        owner: Some(found.owner),
        content_hash: Some(found.content_hash),
        commitment: Some(hex(&agora_watermark::commitment(master, &found.content_hash.0))),
        owner_evidence: Some(found.evidence),
        licenses_tested: ids.len(),
        accused,
    })
}
