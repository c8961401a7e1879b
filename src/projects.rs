//! Projects: the service behind ProjectsService (as the engine is behind JobsService
//! and `assets` behind AssetsService). Concurrent creates share one INSERT and one
//! commit (group commit); every other call is one statement or one transaction.
use diesel_async::AsyncConnection;

use crate::{
    AppError, AppResult,
    auth::Caller,
    batch::Batcher,
    db::{
        self,
        projects::{Created, NewProject, Outcome},
    },
    domain::{
        names::ProjectName,
        project::{self, ListQuery, Path, Project, ProjectFields},
    },
    quotas::{Quota, Quotas},
};

/// Inserts in flight at once, and projects per INSERT.
const CREATE_LANES: usize = 4;
const CREATE_GROUP_MAX: usize = 128;

pub struct Projects {
    db: db::Pool,
    quotas: Quotas,
    creates: Batcher<NewProject, Created>,
}

impl Projects {
    /// Spawns the create lanes: call within the server's runtime.
    pub fn new(db: db::Pool, quotas: Quotas, metrics: crate::metrics::Metrics) -> Self {
        let pool = db.clone();
        let creates = Batcher::spawn(CREATE_LANES, CREATE_GROUP_MAX, move |group| {
            metrics.group_committed("project_create", group.len());
            let pool = pool.clone();
            async move { crate::batch::shared_or_alone(&group, |g| insert(&pool, g)).await }
        });
        Self {
            db,
            quotas,
            creates,
        }
    }

    /// Creates a project for the caller, within their quota; a `request_id` seen
    /// before with the same fields answers with the project it created.
    pub async fn create(
        &self,
        caller: &Caller,
        fields: ProjectFields,
        request_id: Option<String>,
    ) -> AppResult<Project> {
        if !caller.is_admin() {
            self.quotas.admit(Quota::Projects, &caller.sub, 1).await?;
        }
        let created = self
            .creates
            .call(NewProject {
                owner: caller.sub.clone(),
                fields,
                request_id,
            })
            .await?;
        Ok(match created {
            Created::New(p) => {
                tracing::info!(project = %p.name(), "project created");
                p
            }
            Created::Replayed(p) => p,
        })
    }

    pub async fn get(&self, caller: &Caller, name: ProjectName) -> AppResult<Project> {
        let mut conn = self.db.get().await?;
        db::projects::get(&mut conn, caller.owner_scope(), name.0)
            .await?
            .ok_or_else(|| not_found(name))
    }

    /// One page, and whether more follow.
    pub async fn list(&self, query: &ListQuery) -> AppResult<(Vec<Project>, bool)> {
        let mut conn = self.db.get().await?;
        db::projects::list(&mut conn, query).await
    }

    /// Writes the fields `paths` name; an `etag` makes it conditional.
    pub async fn update(
        &self,
        caller: &Caller,
        name: ProjectName,
        fields: &ProjectFields,
        paths: &[Path],
        etag: &str,
    ) -> AppResult<Project> {
        let mut conn = self.db.get().await?;
        let outcome = db::projects::update(
            &mut conn,
            caller.owner_scope(),
            name.0,
            fields,
            paths,
            expected_revision(etag),
        )
        .await?;
        settle(outcome, name)
    }

    /// Deletes the project with its jobs and assets; an `etag` makes it conditional.
    pub async fn delete(&self, caller: &Caller, name: ProjectName, etag: &str) -> AppResult<()> {
        let mut conn = self.db.get().await?;
        let (owner, revision) = (caller.owner_scope(), expected_revision(etag));
        let outcome = conn
            .transaction(async |conn| db::projects::delete(conn, owner, name.0, revision).await)
            .await?;
        settle(outcome, name)?;
        tracing::info!(project = %name, "project deleted");
        for quota in Quota::ALL {
            self.quotas.forget(quota, &caller.sub);
        }
        Ok(())
    }

    /// The caller's use of each quota: (quota, limit, used).
    pub async fn usage(&self, caller: &Caller) -> AppResult<Vec<(Quota, i64, i64)>> {
        self.quotas.usage(&caller.sub).await
    }
}

/// One INSERT for the group (atomic on its own).
async fn insert(pool: &db::Pool, group: &[NewProject]) -> AppResult<Vec<AppResult<Created>>> {
    let mut conn = pool.get().await?;
    db::projects::create_many(&mut conn, group).await
}

/// An etag we did not issue can never match: -1 is never a revision.
fn expected_revision(etag: &str) -> Option<i64> {
    (!etag.is_empty()).then(|| project::revision_of(etag).unwrap_or(-1))
}

fn settle<T>(outcome: Outcome<T>, name: ProjectName) -> AppResult<T> {
    match outcome {
        Outcome::Done(value) => Ok(value),
        Outcome::NotFound => Err(not_found(name)),
        Outcome::EtagMismatch => Err(AppError::Aborted(format!(
            "etag does not match the current version of {name}; read it again and retry"
        ))),
    }
}

fn not_found(name: ProjectName) -> AppError {
    AppError::NotFound(format!("project {name}"))
}
