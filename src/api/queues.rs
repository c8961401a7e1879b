//! QueuesService over gRPC: a queue per job kind, read by admins and workers, set by
//! admins.
use tonic::{Request, Response, Status};

use crate::{
    AppError,
    auth::{Caller, caller},
    convert::duration,
    domain::{
        Violations,
        job::valid_kind,
        project::revision_of,
        queue::{QueueSettings, StartRate},
    },
    engine::Engine,
    proto::v1 as pb,
};

pub struct QueuesApi {
    engine: Engine,
}

impl QueuesApi {
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

/// Figures are for fleets too (autoscalers read them with a worker token).
fn require_reader(caller: &Caller) -> Result<(), Status> {
    if caller.is_admin() || caller.is_worker() {
        Ok(())
    } else {
        Err(AppError::PermissionDenied(
            "reading queues needs a token with the `admin` or `worker` role".into(),
        )
        .into())
    }
}

fn require_admin(caller: &Caller) -> Result<(), Status> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(AppError::PermissionDenied(
            "queues are managed by admins: this needs a token with the `admin` role".into(),
        )
        .into())
    }
}

/// The kind a queue name (`queues/{kind}`) names.
fn kind_of(field: &str, name: &str) -> Result<String, AppError> {
    match name.strip_prefix("queues/") {
        Some(kind) if valid_kind(kind) => Ok(kind.to_owned()),
        _ => Err(AppError::invalid(
            field,
            "expected queues/{kind}, the kind being 1 to 63 lowercase letters, digits, `.`, `_` or `-`",
        )),
    }
}

const SETTABLE: [&str; 4] = ["paused", "max_running", "max_running_per_key", "start_rate"];

/// `current` with the fields `paths` names (every settable one when empty) from `q`.
fn apply(
    current: &QueueSettings,
    q: &pb::Queue,
    paths: &[String],
    v: &mut Violations,
) -> QueueSettings {
    let mut out = current.clone();
    let paths: Vec<&str> = if paths.is_empty() {
        SETTABLE.to_vec()
    } else {
        paths.iter().map(String::as_str).collect()
    };
    let limit = |n: i32, field: &str, v: &mut Violations| match n {
        0 => None,
        n if n > 0 => Some(n),
        _ => {
            v.add(field, "0 (no limit) or more");
            None
        }
    };
    for path in paths {
        match path {
            "paused" => out.paused = q.paused,
            "max_running" => out.max_running = limit(q.max_running, "queue.max_running", v),
            "max_running_per_key" => {
                out.max_running_per_key =
                    limit(q.max_running_per_key, "queue.max_running_per_key", v)
            }
            "start_rate" => {
                out.start_rate = q.start_rate.as_ref().and_then(|r| {
                    let interval = r.interval.as_ref().and_then(duration);
                    if interval.is_none() {
                        v.add("queue.start_rate.interval", "required: a positive duration");
                    }
                    interval.map(|interval| StartRate {
                        jobs: r.jobs,
                        interval,
                    })
                })
            }
            other => v.add(
                "update_mask",
                format!(
                    "`{}` cannot be updated; settable: {}",
                    crate::domain::text::quote(other),
                    SETTABLE.join(", ")
                ),
            ),
        }
    }
    out.validate(v);
    out
}

#[tonic::async_trait]
impl crate::proto::server::queues_service_server::QueuesService for QueuesApi {
    async fn get_queue(
        &self,
        request: Request<pb::GetQueueRequest>,
    ) -> Result<Response<pb::Queue>, Status> {
        let caller = caller(&request)?;
        require_reader(&caller)?;
        let kind = kind_of("name", &request.get_ref().name)?;
        Ok(Response::new(self.engine.get_queue(&kind).await?.into()))
    }

    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let caller = caller(&request)?;
        require_reader(&caller)?;
        let queues = self.engine.list_queues().await?;
        Ok(Response::new(pb::ListQueuesResponse {
            queues: queues.into_iter().map(Into::into).collect(),
        }))
    }

    async fn update_queue(
        &self,
        request: Request<pb::UpdateQueueRequest>,
    ) -> Result<Response<pb::Queue>, Status> {
        let caller = caller(&request)?;
        require_admin(&caller)?;
        let pb::UpdateQueueRequest { queue, update_mask } = request.into_inner();
        let Some(queue) = queue else {
            return Err(AppError::invalid("queue", "required").into());
        };
        let kind = kind_of("queue.name", &queue.name)?;
        let paths = update_mask.map(|m| m.paths).unwrap_or_default();
        let etag = (!queue.etag.is_empty()).then(|| revision_of(&queue.etag).unwrap_or(-1));
        // The mask's fields go onto the queue as read; without an etag, a concurrent
        // update between the read and the write makes it read again (a few times) rather
        // than write back fields it did not name.
        let mut tries = 0;
        let updated = loop {
            let current = self.engine.get_queue(&kind).await?.queue;
            let mut v = Violations::default();
            let settings = apply(&current.settings, &queue, &paths, &mut v);
            let settings = v.into_result(settings)?;
            let expected = etag.unwrap_or(current.revision);
            match self
                .engine
                .update_queue(&kind, &settings, Some(expected))
                .await
            {
                Err(AppError::Aborted(_)) if etag.is_none() && tries < 3 => tries += 1,
                other => break other?,
            }
        };
        Ok(Response::new(updated.into()))
    }
}
