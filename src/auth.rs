//! Bearer-token authentication (JWT) and the caller identity handlers receive.
//!
//! Tokens are HS256 with the configured secret; a configured RSA or Ed25519 public key
//! additionally accepts RS256 or EdDSA tokens. `exp` is required and enforced.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::{Request, Status, service::Interceptor};

use crate::config::{JwtSettings, Secret};

pub const ROLE_ADMIN: &str = "admin";
pub const ROLE_WORKER: &str = "worker";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Kinds a worker token may acquire; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<String>,
    pub exp: u64,
    pub iat: u64,
}

/// Who is calling, as proven by the token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub sub: String,
    pub roles: Vec<String>,
    pub kinds: Vec<String>,
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
/// Same as the validation's `leeway`.
const LEEWAY_SECS: u64 = 5;

impl Verifier {
    pub fn new(settings: &JwtSettings) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        if let Some(secret) = &settings.secret {
            keys.push((
                DecodingKey::from_secret(secret.expose().as_bytes()),
                validation(Algorithm::HS256),
            ));
        }
        if let Some(pem) = &settings.public_key_pem {
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                (k, validation(Algorithm::RS256))
            } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
                (k, validation(Algorithm::EdDSA))
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
                K::InvalidSignature => "token signature is invalid",
                K::MissingRequiredClaim(_) => "token lacks a required claim (sub, exp)",
                _ => "invalid bearer token",
            })
        })?;
        let Claims {
            sub,
            roles,
            kinds,
            exp,
            ..
        } = data.claims;
        if sub.is_empty() {
            return Err(Status::unauthenticated("token has an empty sub"));
        }
        Ok((Caller { sub, roles, kinds }, exp))
    }
}

fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.set_required_spec_claims(&["exp", "sub"]);
    v.leeway = LEEWAY_SECS;
    v.validate_aud = false;
    v
}

/// Signs an HS256 token, for `mediaplane token` and the first-run token.
pub fn mint(
    secret: &Secret,
    sub: &str,
    roles: &[String],
    kinds: &[String],
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: sub.to_owned(),
        roles: roles.to_vec(),
        kinds: kinds.to_vec(),
        iat: now,
        exp: now + ttl.as_secs(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
}

/// Tonic interceptor: rejects calls without a valid `authorization: Bearer` token and
/// puts the [`Caller`] in the request extensions.
#[derive(Clone)]
pub struct Authenticate(pub Verifier);

impl Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated("missing authorization metadata (expected `Bearer <token>`)")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        let caller = self.0.verify(token)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The caller put in place by [`Authenticate`]; its absence is a wiring bug.
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
            public_key_pem: None,
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
                roles: vec![],
                kinds: vec![],
                iat: now - 100,
                exp: now - 60,
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
        };
        v.verified
            .lock()
            .unwrap()
            .insert(expired.as_str().into(), (caller, now - 60));
        assert_eq!(v.verify(&expired).unwrap_err().message(), "token expired");
    }
}
