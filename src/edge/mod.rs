//! Everything HTTP on the shared port besides native gRPC: health endpoints for people
//! and load balancers, CORS for browsers, and the per-call middleware.
pub mod calls;
pub mod cors;
pub mod health;
pub mod json;
pub mod openapi;
pub mod rules;
pub mod signed;
pub mod transcode;
