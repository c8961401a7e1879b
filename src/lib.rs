//! mediaplane: the backend generative-media studios run on.
//!
//! `main.rs` only parses the command line; everything else lives here so tests can
//! start the real server in-process on port 0.
pub mod api;
pub mod assets;
pub mod auth;
pub mod batch;
pub mod cli;
pub mod client;
pub mod config;
pub mod convert;
pub mod db;
pub mod domain;
pub mod edge;
pub mod engine;
pub mod error;
pub mod guard;
pub mod health;
pub mod metrics;
pub mod projects;
pub mod proto;
pub mod quotas;
pub mod redis;
pub mod startup;
pub mod storage;
pub mod telemetry;

pub use error::{AppError, AppResult};
