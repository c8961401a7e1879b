//! JobsService: the contract is complete; the engine lands with the Jobs issue.
//! Until then every RPC answers UNIMPLEMENTED (after authentication).
use crate::proto::v1::jobs_service_server::JobsService;

#[derive(Debug, Default)]
pub struct JobsApi;

impl JobsService for JobsApi {}
