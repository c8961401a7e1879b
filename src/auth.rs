//! Bearer-token authentication (JWT) and the caller identity handlers receive.
//!
//! Tokens are HS256 with the configured secret; a configured RSA or Ed25519 public key
//! additionally accepts RS256 or EdDSA tokens. `exp` is required; `nbf` and `iat` may
//! not lie in the future (beyond a small leeway); `exp` may not lie further after `iat`
//! (or after now, without `iat`) than the configured maximum lifetime; `aud` and `iss`
//! must match when the server is configured with them.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::{Request, Status};

use crate::config::{JwtSettings, Secret};

pub const ROLE_ADMIN: &str = "admin";
pub const ROLE_WORKER: &str = "worker";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Kinds a worker token may acquire; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// One audience; the library also accepts an array on the way in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
}

/// Who is calling, as proven by the token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub sub: String,
    pub roles: Vec<String>,
    pub kinds: Vec<String>,
    /// The token's `exp` (seconds since the epoch): a stream outliving it is ended.
    pub expires: u64,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == ROLE_ADMIN)
    }
    pub fn is_worker(&self) -> bool {
        self.roles.iter().any(|r| r == ROLE_WORKER)
    }
    /// `None` when the caller sees every owner's resources (admins).
    pub fn owner_scope(&self) -> Option<&str> {
        (!self.is_admin()).then_some(self.sub.as_str())
    }
    /// When the token stops being accepted: after its `exp` and the clock-skew leeway,
    /// through the whole last second (`verify` compares whole seconds).
    pub fn valid_until(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(self.expires.saturating_add(LEEWAY_SECS + 1))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the JWT public key is neither an RSA nor an Ed25519 PEM public key")]
    BadPublicKey,
    #[error("no JWT secret or public key is configured")]
    NoKey,
}

/// Verifies tokens; cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    keys: Arc<Vec<(DecodingKey, Validation)>>,
    max_lifetime_secs: u64,
    /// Tokens verified before, by their exact text, with their expiry: a client sends
    /// the same token on every call, and checking its signature and parsing its claims
    /// again was ~6% of the server's CPU under load. Same answer as a full check until
    /// the token expires (an entry is only made by a successful full check).
    verified: Arc<Mutex<Verified>>,
}

/// Verified tokens with their `exp` (seconds since the epoch).
type Verified = HashMap<Box<str>, (Caller, u64)>;

/// Distinct tokens remembered; when full the cache starts over (a flood of distinct
/// valid tokens costs full checks, never memory).
const VERIFIED_CAPACITY: usize = 4096;
/// Clock skew allowed between the token's issuer and this server (`exp`, `nbf`, `iat`).
const LEEWAY_SECS: u64 = 30;

impl Verifier {
    pub fn new(settings: &JwtSettings) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        if let Some(secret) = &settings.secret {
            keys.push((
                DecodingKey::from_secret(secret.expose().as_bytes()),
                validation(Algorithm::HS256, settings),
            ));
        }
        if let Some(pem) = &settings.public_key_pem {
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                (k, validation(Algorithm::RS256, settings))
            } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
                (k, validation(Algorithm::EdDSA, settings))
            } else {
                return Err(KeyError::BadPublicKey);
            };
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(KeyError::NoKey);
        }
        Ok(Self {
            keys: Arc::new(keys),
            max_lifetime_secs: settings.max_lifetime.as_secs(),
            verified: Arc::default(),
        })
    }

    pub fn verify(&self, token: &str) -> Result<Caller, Status> {
        let now = jsonwebtoken::get_current_timestamp();
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        match verified.get(token) {
            Some((caller, exp)) if now <= exp.saturating_add(LEEWAY_SECS) => {
                return Ok(caller.clone());
            }
            Some(_) => {
                verified.remove(token);
            }
            None => {}
        }
        drop(verified);
        let (caller, exp) = self.verify_fully(token)?;
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= VERIFIED_CAPACITY {
            verified.clear();
        }
        verified.insert(token.into(), (caller.clone(), exp));
        Ok(caller)
    }

    fn verify_fully(&self, token: &str) -> Result<(Caller, u64), Status> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Status::unauthenticated("malformed bearer token"))?;
        let (key, validation) = self
            .keys
            .iter()
            .find(|(_, v)| v.algorithms.contains(&header.alg))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "token signed with an algorithm this server does not accept",
                )
            })?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            Status::unauthenticated(match e.kind() {
                K::ExpiredSignature => "token expired",
                K::ImmatureSignature => "token not valid yet (nbf is in the future)",
                K::InvalidSignature => "token signature is invalid",
                K::InvalidAudience => "token audience is not this service",
                K::InvalidIssuer => "token issuer is not trusted",
                K::MissingRequiredClaim(_) => "token lacks a required claim",
                _ => "invalid bearer token",
            })
        })?;
        let Claims {
            sub,
            roles,
            kinds,
            exp,
            iat,
            ..
        } = data.claims;
        if sub.is_empty() {
            return Err(Status::unauthenticated("token has an empty sub"));
        }
        let now = jsonwebtoken::get_current_timestamp();
        if iat.is_some_and(|iat| iat > now.saturating_add(LEEWAY_SECS)) {
            return Err(Status::unauthenticated(
                "token issued in the future (iat is after now)",
            ));
        }
        // A stolen long-lived token is a standing key: cap what any issuer may mint.
        let issued = iat.unwrap_or(now);
        if exp.saturating_sub(issued) > self.max_lifetime_secs.saturating_add(LEEWAY_SECS) {
            return Err(Status::unauthenticated(
                "token lifetime (exp - iat) is longer than this server accepts",
            ));
        }
        Ok((
            Caller {
                sub,
                roles,
                kinds,
                expires: exp,
            },
            exp,
        ))
    }
}

fn validation(alg: Algorithm, settings: &JwtSettings) -> Validation {
    let mut v = Validation::new(alg);
    let mut required = vec!["exp", "sub"];
    v.leeway = LEEWAY_SECS;
    v.validate_nbf = true;
    match &settings.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        None => v.validate_aud = false,
    }
    if let Some(iss) = &settings.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    v
}

/// Signs an HS256 token with the server's issuer and audience (if configured), for
/// `mediaplane token` and the first-run token.
pub fn mint_for(
    settings: &JwtSettings,
    sub: &str,
    roles: &[String],
    kinds: &[String],
    ttl: Duration,
) -> Result<String, MintError> {
    let secret = settings.secret.as_ref().ok_or(MintError::NoSecret)?;
    if ttl > settings.max_lifetime {
        return Err(MintError::TooLong(settings.max_lifetime));
    }
    let claims = Claims {
        iss: settings.issuer.clone(),
        aud: settings.audience.clone().map(serde_json::Value::String),
        ..claims(sub, roles, kinds, ttl)
    };
    Ok(sign(secret, &claims)?)
}

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("no secret: set MEDIAPLANE_JWT_SECRET (or --jwt-secret) to the server's secret")]
    NoSecret,
    #[error("the lifetime is longer than the server's maximum ({}); raise MEDIAPLANE_JWT_MAX_LIFETIME or ask for less", humantime::format_duration(*.0))]
    TooLong(Duration),
    #[error(transparent)]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Signs an HS256 token with no issuer or audience.
pub fn mint(
    secret: &Secret,
    sub: &str,
    roles: &[String],
    kinds: &[String],
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    sign(secret, &claims(sub, roles, kinds, ttl))
}

fn claims(sub: &str, roles: &[String], kinds: &[String], ttl: Duration) -> Claims {
    let now = jsonwebtoken::get_current_timestamp();
    Claims {
        sub: sub.to_owned(),
        roles: roles.to_vec(),
        kinds: kinds.to_vec(),
        iat: Some(now),
        exp: now + ttl.as_secs(),
        ..Claims::default()
    }
}

fn sign(secret: &Secret, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
}

/// Binds a job's lease to the token that acquired it. The lease id a worker sees is the
/// stored one masked with a keyed hash of the token's subject, so the id is only
/// valid when the same subject sends it back: another token, even a worker's, gets a
/// different stored id out of it and is refused like a stale lease. No column or
/// statement changes, and the same answer on every instance that shares the key.
#[derive(Clone)]
pub struct LeaseBinding {
    key: Arc<[u8]>,
}

impl std::fmt::Debug for LeaseBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseBinding([redacted])")
    }
}

impl LeaseBinding {
    pub fn new(key: &[u8]) -> Self {
        Self { key: key.into() }
    }

    fn mask(&self, sub: &str) -> u128 {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"mediaplane lease\0");
        mac.update(sub.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        u128::from_be_bytes(first)
    }

    /// The id `sub` is given for the stored lease `lease`.
    pub fn seal(&self, sub: &str, lease: uuid::Uuid) -> uuid::Uuid {
        uuid::Uuid::from_u128(lease.as_u128() ^ self.mask(sub))
    }

    /// The stored lease an id sent by `sub` stands for.
    pub fn open(&self, sub: &str, shown: uuid::Uuid) -> uuid::Uuid {
        self.seal(sub, shown)
    }
}

/// The caller put in place by the guard (`crate::guard`); its absence is a wiring bug.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("internal error"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> (Verifier, Secret) {
        let secret = Secret::new("a-test-secret-of-enough-length");
        let v = Verifier::new(&JwtSettings {
            secret: Some(secret.clone()),
            ..JwtSettings::default()
        })
        .expect("verifier");
        (v, secret)
    }

    #[test]
    fn remembered_tokens_answer_like_a_full_check_until_they_expire() {
        let (v, secret) = verifier();
        let token = mint(
            &secret,
            "alice",
            &["worker".into()],
            &[],
            Duration::from_secs(60),
        )
        .expect("mint");
        let first = v.verify(&token).expect("valid token");
        let again = v.verify(&token).expect("remembered token");
        assert_eq!((first.sub, first.roles), (again.sub, again.roles));
        assert_eq!(v.verified.lock().unwrap().len(), 1);

        let now = jsonwebtoken::get_current_timestamp();
        let expired = {
            let claims = Claims {
                sub: "alice".into(),
                iat: Some(now - 100),
                exp: now - 60,
                ..Claims::default()
            };
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(secret.expose().as_bytes()),
            )
            .unwrap()
        };
        assert_eq!(v.verify(&expired).unwrap_err().message(), "token expired");
        assert!(!v.verified.lock().unwrap().contains_key(expired.as_str()));

        // An entry past its expiry (and the leeway) is not served: pretend the
        // expired token had been remembered while it was valid.
        let caller = Caller {
            sub: "alice".into(),
            roles: vec![],
            kinds: vec![],
            expires: now - 60,
        };
        v.verified
            .lock()
            .unwrap()
            .insert(expired.as_str().into(), (caller, now - 60));
        assert_eq!(v.verify(&expired).unwrap_err().message(), "token expired");
    }
}
