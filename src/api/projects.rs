//! ProjectsService over gRPC.
use tonic::{Request, Response, Status};

use crate::{
    AppError,
    auth::caller,
    convert::project::fields,
    domain::{
        Violations,
        names::ProjectName,
        project::{self, ALL_PATHS, ListQuery},
    },
    projects::Projects,
    proto::v1 as pb,
};

pub struct ProjectsApi {
    projects: Projects,
    /// Bytes of projects one ListProjects response may hold.
    page_budget: usize,
}

impl ProjectsApi {
    pub fn new(projects: Projects, max_message_bytes: usize) -> Self {
        Self {
            projects,
            page_budget: super::page_budget(max_message_bytes),
        }
    }
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
        let request_id = (!request_id.is_empty()).then_some(request_id);
        let project = self.projects.create(&caller, fields, request_id).await?;
        Ok(Response::new(project.into()))
    }

    async fn get_project(
        &self,
        request: Request<pb::GetProjectRequest>,
    ) -> Result<Response<pb::Project>, Status> {
        let caller = caller(&request)?;
        let name = ProjectName::parse("name", &request.get_ref().name)?;
        let project = self.projects.get(&caller, name).await?;
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
        let (projects, more) = self.projects.list(&query).await?;
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
        let Some(mut project) = project else {
            return Err(AppError::invalid("project", "required").into());
        };
        let name = ProjectName::parse("project.name", &project.name)?;
        let paths = project::parse_mask(&update_mask.map(|m| m.paths).unwrap_or_default())?;
        let etag = std::mem::take(&mut project.etag);
        let mut v = Violations::default();
        let fields = fields(project, &mut v);
        fields.validate("project.", &paths, &mut v);
        let fields = v.into_result(fields)?;

        let project = self
            .projects
            .update(&caller, name, &fields, &paths, &etag)
            .await?;
        Ok(Response::new(project.into()))
    }

    async fn delete_project(
        &self,
        request: Request<pb::DeleteProjectRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let name = ProjectName::parse("name", &r.name)?;
        self.projects.delete(&caller, name, &r.etag).await?;
        Ok(Response::new(()))
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::Usage>, Status> {
        let caller = caller(&request)?;
        let quotas = self
            .projects
            .usage(&caller)
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
