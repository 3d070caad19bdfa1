//! Sign-in with Ethereum (EIP-4361) and the session tokens it issues.
//!
//! 1. `nonce()` hands out a random single-use nonce that expires after five minutes.
//! 2. The wallet signs a SIWE message carrying it (domain, address, URI, chain id, nonce,
//!    issued-at, expiration). `login()` takes the nonce out of the table whatever happens next
//!    (so a message can be tried once), then checks the domain, the chain id, the time window
//!    and the EIP-191 signature — or, for a contract wallet, asks the contract through ERC-1271.
//! 3. A short-lived HS256 JWT bound to the address comes back; [`Sessions::verify`] checks it on
//!    every request. Its key is kept under the data dir with mode 0600, so sessions survive a
//!    restart and no other node can mint them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use alloy::primitives::{Address, B256, Bytes};
use serde::{Deserialize, Serialize};

/// How long a nonce may wait for its login.
const NONCE_TTL: Duration = Duration::from_secs(300);
/// Outstanding nonces at most (older ones are dropped first).
const MAX_NONCES: usize = 100_000;
const AUDIENCE: &str = "agora";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the sign-in message is not a valid EIP-4361 message: {0}")]
    Message(String),
    #[error("unknown or already used nonce; ask POST /api/v1/auth/nonce for a new one")]
    Nonce,
    #[error("the nonce expired; ask for a new one")]
    NonceExpired,
    #[error("the message is for domain {found}, this node is {expected}")]
    Domain { found: String, expected: String },
    #[error("the message is for chain {found}, this node serves chain {expected}")]
    Chain { found: u64, expected: u64 },
    #[error("the message has no expiration time; sign one that expires")]
    NoExpiry,
    #[error("the message is not valid now (expired, or not yet valid)")]
    Time,
    #[error("the signature is not the address's: {0}")]
    Signature(String),
    /// The address may be a contract wallet, and the chain cannot be asked now.
    #[error("{0}")]
    Unavailable(String),
    #[error("the session token is not valid: {0}")]
    Token(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Claims {
    /// Checksummed address.
    sub: String,
    aud: String,
    iat: u64,
    exp: u64,
}

/// A session that `login` granted.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Session {
    pub token: String,
    #[schema(value_type = String)]
    pub address: Address,
    /// Unix seconds.
    pub expires_at: u64,
}

pub use crate::signers::ContractCheck;

#[derive(Clone)]
pub struct Sessions {
    key: Arc<[u8; 32]>,
    nonces: Arc<Mutex<HashMap<String, SystemTime>>>,
    chain_id: u64,
    /// The domain messages must name; `None`: the Host the request came to.
    domain: Option<String>,
    ttl: Duration,
    contract_check: Option<ContractCheck>,
    /// Tokens already checked, by their blake3: the address and expiry (unix seconds). A
    /// signed-in client sends the same token with every call, and checking it again (base64,
    /// HMAC, two JSON documents, the address's checksum) cost a few µs a call.
    verified: Arc<Mutex<Verified>>,
}

/// Checked tokens by their blake3: (address, expiry in unix seconds).
type Verified = rustc_hash::FxHashMap<[u8; 32], (Address, u64)>;

/// Checked tokens kept at most; past this the expired ones go, and if none had, all.
const MAX_VERIFIED: usize = 65_536;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Sessions {
    pub fn new(key: [u8; 32], chain_id: u64, domain: Option<String>, ttl: Duration) -> Self {
        Self {
            key: Arc::new(key),
            nonces: Arc::new(Mutex::new(HashMap::new())),
            chain_id,
            domain,
            ttl,
            contract_check: None,
            verified: Arc::default(),
        }
    }

    /// Lets contract wallets sign in (ERC-1271).
    pub fn with_contract_check(mut self, check: ContractCheck) -> Self {
        self.contract_check = Some(check);
        self
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// A fresh single-use nonce and when it expires (unix seconds).
    pub fn nonce(&self) -> (String, u64) {
        let nonce = random_nonce();
        let expires = SystemTime::now() + NONCE_TTL;
        let mut nonces = self.nonces.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        nonces.retain(|_, expiry| *expiry > now);
        if nonces.len() >= MAX_NONCES
            && let Some(oldest) = nonces.iter().min_by_key(|(_, e)| **e).map(|(n, _)| n.clone())
        {
            nonces.remove(&oldest);
        }
        nonces.insert(nonce.clone(), expires);
        (nonce, unix(expires))
    }

    /// Checks a signed SIWE message and opens a session for its address. `host` is the Host
    /// the request came to (the expected domain unless one is configured).
    pub async fn login(&self, message: &str, signature: &[u8], host: &str) -> Result<Session, AuthError> {
        let parsed: siwe::Message =
            message.parse().map_err(|e: siwe::ParseError| AuthError::Message(e.to_string()))?;
        let expiry = self
            .nonces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&parsed.nonce)
            .ok_or(AuthError::Nonce)?;
        if expiry <= SystemTime::now() {
            return Err(AuthError::NonceExpired);
        }
        let expected = self.domain.clone().unwrap_or_else(|| host.to_owned());
        if parsed.domain.as_str() != expected {
            return Err(AuthError::Domain { found: parsed.domain.to_string(), expected });
        }
        if parsed.chain_id != self.chain_id {
            return Err(AuthError::Chain { found: parsed.chain_id, expected: self.chain_id });
        }
        if parsed.expiration_time.is_none() {
            return Err(AuthError::NoExpiry);
        }
        if !parsed.valid_now() {
            return Err(AuthError::Time);
        }
        let address = Address::from(parsed.address);
        let eoa = match <&[u8; 65]>::try_from(signature) {
            Ok(sig) => parsed.verify_eip191(sig).map(|_| ()).map_err(|e| e.to_string()),
            Err(_) => Err(format!("{} bytes, expected 65", signature.len())),
        };
        if let Err(why) = eoa {
            let hash = parsed.eip191_hash().map_err(|e| AuthError::Message(e.to_string()))?;
            let by_contract = match &self.contract_check {
                Some(check) => check(address, B256::from(hash), Bytes::copy_from_slice(signature)).await,
                None => Ok(false),
            };
            match by_contract {
                Ok(true) => {}
                Ok(false) => return Err(AuthError::Signature(why)),
                Err(e) => {
                    return Err(AuthError::Unavailable(format!(
                        "the signature is not {address}'s key's ({why}); it may be a contract wallet's, and the wallet cannot be asked now: {e}"
                    )));
                }
            }
        }
        let now = SystemTime::now();
        let message_expiry =
            parsed.expiration_time.as_ref().map(|t| t.as_ref().unix_timestamp().max(0) as u64).unwrap_or(0);
        let expires_at = (unix(now) + self.ttl.as_secs()).min(message_expiry.max(unix(now) + 60));
        let claims =
            Claims { sub: address.to_checksum(None), aud: AUDIENCE.into(), iat: unix(now), exp: expires_at };
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(self.key.as_ref())
                .map_err(|e| AuthError::Token(e.to_string()))?,
        )
        .map_err(|e| AuthError::Token(e.to_string()))?;
        Ok(Session { token, address, expires_at })
    }

    /// The address a session token belongs to.
    pub fn verify(&self, token: &str) -> Result<Address, AuthError> {
        self.verify_at(token, unix(SystemTime::now()))
    }

    /// [`Self::verify`] at `now` (unix seconds) for a token already checked; a new one is
    /// checked against the clock.
    fn verify_at(&self, token: &str, now: u64) -> Result<Address, AuthError> {
        let id = *blake3::hash(token.as_bytes()).as_bytes();
        let known = self.verified.lock().unwrap_or_else(|p| p.into_inner()).get(&id).copied();
        if let Some((address, expires)) = known {
            // the token's own rule, with no leeway: valid up to and including its `exp`
            return if expires >= now {
                Ok(address)
            } else {
                Err(AuthError::Token(
                    jsonwebtoken::errors::Error::from(jsonwebtoken::errors::ErrorKind::ExpiredSignature)
                        .to_string(),
                ))
            };
        }
        let (address, expires) = self.check_token(token)?;
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= MAX_VERIFIED {
            verified.retain(|_, (_, expires)| *expires >= now);
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
        }
        verified.insert(id, (address, expires));
        Ok(address)
    }

    fn check_token(&self, token: &str) -> Result<(Address, u64), AuthError> {
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = 0;
        let key = jsonwebtoken::DecodingKey::from_secret(self.key.as_ref())
            .map_err(|e| AuthError::Token(e.to_string()))?;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| AuthError::Token(e.to_string()))?;
        let address = data.claims.sub.parse::<Address>().map_err(|e| AuthError::Token(e.to_string()))?;
        Ok((address, data.claims.exp))
    }
}

/// 16 alphanumeric characters (SIWE asks for at least 8).
fn random_nonce() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    bytes.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect()
}

/// The SIWE message a client signs to sign in to the node at `node_url`.
pub fn message(
    node_url: &url::Url,
    address: Address,
    chain_id: u64,
    nonce: &str,
    valid_for: Duration,
) -> Result<String, String> {
    let domain = match node_url.port() {
        Some(port) => format!("{}:{port}", node_url.host_str().unwrap_or_default()),
        None => node_url.host_str().unwrap_or_default().to_owned(),
    };
    let now = time::OffsetDateTime::now_utc();
    let format = &time::format_description::well_known::Rfc3339;
    let issued = now.format(format).map_err(|e| e.to_string())?;
    let expires = (now + valid_for).format(format).map_err(|e| e.to_string())?;
    Ok(format!(
        "{domain} wants you to sign in with your Ethereum account:\n{}\n\nSign in to the Agora node.\n\nURI: {node_url}\nVersion: 1\nChain ID: {chain_id}\nNonce: {nonce}\nIssued At: {issued}\nExpiration Time: {expires}",
        address.to_checksum(None)
    ))
}

#[cfg(test)]
mod tests {
    use alloy::signers::{SignerSync, local::PrivateKeySigner};

    use super::*;

    fn sessions() -> Sessions {
        Sessions::new([7; 32], 31337, None, Duration::from_secs(3600))
    }

    fn signed(s: &Sessions, signer: &PrivateKeySigner, chain: u64, valid: Duration) -> (String, Vec<u8>) {
        let (nonce, _) = s.nonce();
        let url = url::Url::parse("http://127.0.0.1:8080").unwrap();
        let text = message(&url, signer.address(), chain, &nonce, valid).unwrap();
        let sig = signer.sign_message_sync(text.as_bytes()).unwrap().as_bytes().to_vec();
        (text, sig)
    }

    #[tokio::test]
    async fn a_signed_message_opens_one_session() {
        let s = sessions();
        let signer = PrivateKeySigner::random();
        let (text, sig) = signed(&s, &signer, 31337, Duration::from_secs(600));
        let session = s.login(&text, &sig, "127.0.0.1:8080").await.unwrap();
        assert_eq!(session.address, signer.address());
        assert_eq!(s.verify(&session.token).unwrap(), signer.address());
        // Replaying the same message: the nonce is gone.
        assert_eq!(s.login(&text, &sig, "127.0.0.1:8080").await.unwrap_err(), AuthError::Nonce);
    }

    #[tokio::test]
    async fn wrong_domain_chain_signature_or_time_are_refused() {
        let s = sessions();
        let signer = PrivateKeySigner::random();
        let (text, sig) = signed(&s, &signer, 31337, Duration::from_secs(600));
        assert!(matches!(s.login(&text, &sig, "evil.example").await, Err(AuthError::Domain { .. })));
        let (text, sig) = signed(&s, &signer, 1, Duration::from_secs(600));
        assert!(matches!(
            s.login(&text, &sig, "127.0.0.1:8080").await,
            Err(AuthError::Chain { found: 1, .. })
        ));
        let (text, _) = signed(&s, &signer, 31337, Duration::from_secs(600));
        let other =
            PrivateKeySigner::random().sign_message_sync(text.as_bytes()).unwrap().as_bytes().to_vec();
        assert!(matches!(s.login(&text, &other, "127.0.0.1:8080").await, Err(AuthError::Signature(_))));
        // a contract wallet's signature: the wallet says yes, says no, or cannot be asked
        let answers = [Ok(true), Ok(false), Err("connection refused".to_owned())];
        for answer in answers {
            let asked = answer.clone();
            let s = sessions().with_contract_check(Arc::new(move |_, _, _| {
                let answer = asked.clone();
                Box::pin(async move { answer })
            }));
            let (text, _) = signed(&s, &signer, 31337, Duration::from_secs(600));
            match (s.login(&text, &other, "127.0.0.1:8080").await, &answer) {
                (Ok(session), Ok(true)) => assert_eq!(session.address, signer.address()),
                (Err(AuthError::Signature(_)), Ok(false)) => {}
                (Err(AuthError::Unavailable(m)), Err(_)) => assert!(m.contains("connection refused"), "{m}"),
                (got, _) => panic!("{answer:?} gave {got:?}"),
            }
        }
        let (text, sig) = signed(&s, &signer, 31337, Duration::ZERO);
        assert_eq!(s.login(&text, &sig, "127.0.0.1:8080").await.unwrap_err(), AuthError::Time);
        assert!(matches!(s.login("hello", &sig, "127.0.0.1:8080").await, Err(AuthError::Message(_))));
    }

    #[tokio::test]
    async fn tampered_or_foreign_tokens_are_refused() {
        let s = sessions();
        let signer = PrivateKeySigner::random();
        let (text, sig) = signed(&s, &signer, 31337, Duration::from_secs(600));
        let token = s.login(&text, &sig, "127.0.0.1:8080").await.unwrap().token;
        // the genuine token, checked (and so remembered) first, vouches for no other
        assert_eq!(s.verify(&token).unwrap(), signer.address());
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = parts[1].chars().rev().collect();
        assert!(matches!(s.verify(&parts.join(".")), Err(AuthError::Token(_))));
        let other = Sessions::new([8; 32], 31337, None, Duration::from_secs(3600));
        assert!(matches!(other.verify(&token), Err(AuthError::Token(_))));
    }

    /// A remembered token still expires at its `exp`, as an unremembered one does.
    #[test]
    fn a_checked_token_expires_on_time() {
        let s = sessions();
        let address = PrivateKeySigner::random().address();
        let token = |exp: u64| {
            let claims = Claims { sub: address.to_checksum(None), aud: AUDIENCE.into(), iat: exp - 60, exp };
            let key = jsonwebtoken::EncodingKey::from_secret(&[7; 32]).unwrap();
            jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key)
                .unwrap()
        };
        let now = unix(SystemTime::now());
        assert!(matches!(s.verify(&token(now - 1)), Err(AuthError::Token(_))), "expired");
        let soon = token(now + 60);
        assert_eq!(s.verify(&soon).unwrap(), address);
        assert_eq!(s.verify_at(&soon, now + 60).unwrap(), address, "remembered, valid through its exp");
        let late = s.verify_at(&soon, now + 61).unwrap_err();
        assert_eq!(late, s.check_token(&token(now - 1)).map(|_| ()).unwrap_err(), "the full check's error");
    }
}
