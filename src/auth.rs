//! Bearer-token authentication (JWT) and the caller identity handlers receive.
//!
//! Tokens are HS256 with the configured secret; a configured RSA or Ed25519 public key
//! additionally accepts RS256 or EdDSA tokens. `exp` is required and enforced.
use std::{sync::Arc, time::Duration};

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
}

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
        })
    }

    pub fn verify(&self, token: &str) -> Result<Caller, Status> {
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
            sub, roles, kinds, ..
        } = data.claims;
        if sub.is_empty() {
            return Err(Status::unauthenticated("token has an empty sub"));
        }
        Ok(Caller { sub, roles, kinds })
    }
}

fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.set_required_spec_claims(&["exp", "sub"]);
    v.leeway = 5;
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
