//! ProjectsService over gRPC.
use diesel_async::AsyncConnection;
use tonic::{Request, Response, Status};

use super::convert::{json_to_struct, struct_to_json, timestamp};
use crate::{
    AppError, AppResult,
    auth::caller,
    batch::Batcher,
    db::{
        self,
        projects::{Created, NewProject, Outcome},
    },
    domain::{
        Violations,
        names::ProjectName,
        project::{self, ALL_PATHS, ListQuery, Project, ProjectFields},
    },
    proto::v1 as pb,
    quotas::{Quota, Quotas},
};

pub struct ProjectsApi {
    db: db::Pool,
    quotas: Quotas,
    /// Concurrent creates share one INSERT and one commit (group commit).
    creates: Batcher<NewProject, Created>,
    /// Bytes of projects one ListProjects response may hold.
    page_budget: usize,
}

/// Inserts in flight at once, and projects per INSERT.
const CREATE_LANES: usize = 4;
const CREATE_GROUP_MAX: usize = 128;

impl ProjectsApi {
    /// Spawns the create lanes: call within the server's runtime.
    pub fn new(db: db::Pool, quotas: Quotas, max_message_bytes: usize) -> Self {
        let pool = db.clone();
        let creates = Batcher::spawn(CREATE_LANES, CREATE_GROUP_MAX, move |group| {
            let pool = pool.clone();
            async move { crate::batch::shared_or_alone(&group, |g| insert(&pool, g)).await }
        });
        Self {
            db,
            quotas,
            creates,
            page_budget: super::page_budget(max_message_bytes),
        }
    }
}

/// One INSERT for the group (atomic on its own).
async fn insert(pool: &db::Pool, group: &[NewProject]) -> AppResult<Vec<AppResult<Created>>> {
    let mut conn = pool.get().await?;
    db::projects::create_many(&mut conn, group).await
}

/// Client-settable fields of a wire project; output-only fields are ignored (AIP-203).
fn fields(project: pb::Project, v: &mut Violations) -> ProjectFields {
    let metadata = match project.metadata.map(struct_to_json).transpose() {
        Ok(m) => m.unwrap_or_default(),
        Err(why) => {
            v.add("project.metadata", why);
            Default::default()
        }
    };
    ProjectFields {
        display_name: project.display_name,
        description: project.description,
        labels: project.labels,
        metadata,
    }
}

impl From<Project> for pb::Project {
    fn from(p: Project) -> Self {
        let name = p.name().to_string();
        let etag = p.etag();
        let Project {
            id: _,
            owner,
            display_name,
            description,
            labels,
            metadata,
            revision: _,
            create_time,
            update_time,
        } = p;
        pb::Project {
            name,
            display_name,
            description,
            labels,
            metadata: Some(json_to_struct(metadata)),
            owner,
            create_time: Some(timestamp(create_time)),
            update_time: Some(timestamp(update_time)),
            etag,
        }
    }
}

fn not_found(name: ProjectName) -> Status {
    AppError::NotFound(format!("project {name}")).into()
}

/// An etag we did not issue can never match: -1 is never a revision.
fn expected_revision(etag: &str) -> Option<i64> {
    (!etag.is_empty()).then(|| project::revision_of(etag).unwrap_or(-1))
}

fn etag_conflict(name: ProjectName) -> Status {
    AppError::Aborted(format!(
        "etag does not match the current version of {name}; read it again and retry"
    ))
    .into()
}

#[tonic::async_trait]
impl crate::proto::server::projects_service_server::ProjectsService for ProjectsApi {
    async fn create_project(
        &self,
        request: Request<pb::CreateProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        let caller = caller(&request)?;
        let pb::CreateProjectRequest {
            project,
            request_id,
        } = request.into_inner();
        let mut v = Violations::default();
        let Some(project) = project else {
            return Err(AppError::invalid("project", "required").into());
        };
        let fields = fields(project, &mut v);
        fields.validate("project.", &ALL_PATHS, &mut v);
        if request_id.chars().count() > project::MAX_REQUEST_ID
            || !crate::domain::text::storable(&request_id)
        {
            v.add(
                "request_id",
                format!(
                    "at most {} characters, without NUL",
                    project::MAX_REQUEST_ID
                ),
            );
        }
        let fields = v.into_result(fields)?;
        if !caller.is_admin() {
            self.quotas.admit(Quota::Projects, &caller.sub, 1).await?;
        }
        let created = self
            .creates
            .call(NewProject {
                owner: caller.sub,
                fields,
                request_id: (!request_id.is_empty()).then_some(request_id),
            })
            .await?;
        let project = match created {
            Created::New(p) => {
                tracing::info!(project = %p.name(), "project created");
                p
            }
            Created::Replayed(p) => p,
        };
        Ok(Response::new(project.into()))
    }

    async fn get_project(
        &self,
        request: Request<pb::GetProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        let caller = caller(&request)?;
        let name = ProjectName::parse("name", &request.get_ref().name)?;
        let mut conn = super::conn(&self.db).await?;
        let project = db::projects::get(&mut conn, caller.owner_scope(), name.0)
            .await?
            .ok_or_else(|| not_found(name))?;
        Ok(Response::new(project.into()))
    }

    async fn list_projects(
        &self,
        request: Request<pb::ListProjectsRequest>,
    ) -> Result<Response<pb::ListProjectsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let query = ListQuery::new(
            caller.owner_scope(),
            r.page_size,
            &r.page_token,
            &r.filter,
            &r.order_by,
        )?;
        let mut conn = super::conn(&self.db).await?;
        let (projects, more) = db::projects::list(&mut conn, &query).await?;
        let (projects, last, cut) = super::fit_page(projects, self.page_budget, |p| {
            crate::domain::page::Cursor {
                create_time: p.create_time,
                id: p.id,
            }
        });
        let next_page_token = query.next_token(more || cut, last);
        Ok(Response::new(pb::ListProjectsResponse {
            projects,
            next_page_token,
        }))
    }

    async fn update_project(
        &self,
        request: Request<pb::UpdateProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        let caller = caller(&request)?;
        let pb::UpdateProjectRequest {
            project,
            update_mask,
        } = request.into_inner();
        let Some(project) = project else {
            return Err(AppError::invalid("project", "required").into());
        };
        let name = ProjectName::parse("project.name", &project.name)?;
        let paths = project::parse_mask(&update_mask.map(|m| m.paths).unwrap_or_default())?;
        let expected = expected_revision(&project.etag);
        let mut v = Violations::default();
        let fields = fields(project, &mut v);
        fields.validate("project.", &paths, &mut v);
        let fields = v.into_result(fields)?;

        let mut conn = super::conn(&self.db).await?;
        match db::projects::update(
            &mut conn,
            caller.owner_scope(),
            name.0,
            &fields,
            &paths,
            expected,
        )
        .await?
        {
            Outcome::Done(p) => Ok(Response::new(p.into())),
            Outcome::NotFound => Err(not_found(name)),
            Outcome::EtagMismatch => Err(etag_conflict(name)),
        }
    }

    async fn delete_project(
        &self,
        request: Request<pb::DeleteProjectRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let name = ProjectName::parse("name", &r.name)?;
        let mut conn = super::conn(&self.db).await?;
        let (owner, revision) = (caller.owner_scope(), expected_revision(&r.etag));
        match conn
            .transaction(async |conn| db::projects::delete(conn, owner, name.0, revision).await)
            .await?
        {
            Outcome::Done(()) => {
                tracing::info!(project = %name, "project deleted");
                for quota in Quota::ALL {
                    self.quotas.forget(quota, &caller.sub);
                }
                Ok(Response::new(()))
            }
            Outcome::NotFound => Err(not_found(name)),
            Outcome::EtagMismatch => Err(etag_conflict(name)),
        }
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::Usage>, Status> {
        let caller = caller(&request)?;
        let quotas = self
            .quotas
            .usage(&caller.sub)
            .await?
            .into_iter()
            .map(|(quota, limit, used)| pb::QuotaUsage {
                quota: quota.name().to_owned(),
                limit,
                used,
            })
            .collect();
        Ok(Response::new(pb::Usage {
            owner: caller.sub,
            quotas,
        }))
    }
}
