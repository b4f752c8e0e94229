//! The gRPC adapter: authenticates each call from its metadata, hands it to [`CacheService`]
//! and turns errors into status codes chosen on purpose. tonic types stop here.

use std::sync::Arc;

use proto::v1 as pb;
use proto::v1::admin_server::Admin;
use proto::v1::worker_server::Worker;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::service::CacheService;

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let message = error.to_string();
        match error {
            Error::InvalidArgument(_) => Status::invalid_argument(message),
            Error::Unauthenticated(_) => Status::unauthenticated(message),
            Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::ProjectExists(_) => Status::already_exists(message),
            Error::NoSuchProject(_) | Error::NoSuchCache { .. } | Error::NoSuchSave(_) => Status::not_found(message),
            Error::SaveConflict(_) => Status::aborted(message),
            Error::BlobNotStored(_) => Status::failed_precondition(message),
            // Retrying may help: the store or the disk may come back.
            Error::Store(_) | Error::Database(_) | Error::Credentials(_) => Status::unavailable(message),
            Error::CorruptState(_) | Error::DataDir { .. } | Error::DataDirLocked(_) => Status::internal(message),
        }
    }
}

/// The bearer token of a call, if its metadata carries one.
fn bearer_token<T>(request: &Request<T>) -> Option<&str> {
    let value = request.metadata().get(proto::AUTHORIZATION_METADATA)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::trim)
}

/// The worker-facing service.
pub struct WorkerApi(pub Arc<CacheService>);

/// The admin service.
pub struct AdminApi(pub Arc<CacheService>);

impl WorkerApi {
    fn project<T>(&self, request: &Request<T>) -> Result<String, Status> {
        Ok(self.0.authenticate_project(bearer_token(request))?)
    }
}

impl AdminApi {
    fn admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        Ok(self.0.authenticate_admin(bearer_token(request))?)
    }
}

#[tonic::async_trait]
impl Worker for WorkerApi {
    #[tracing::instrument(skip_all)]
    async fn lookup(&self, request: Request<pb::LookupRequest>) -> Result<Response<pb::LookupResponse>, Status> {
        let project = self.project(&request)?;
        Ok(Response::new(self.0.lookup(&project, request.get_ref())?))
    }

    #[tracing::instrument(skip_all)]
    async fn begin_save(
        &self,
        request: Request<pb::BeginSaveRequest>,
    ) -> Result<Response<pb::BeginSaveResponse>, Status> {
        let project = self.project(&request)?;
        Ok(Response::new(self.0.begin_save(&project, request.get_ref()).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn commit_save(
        &self,
        request: Request<pb::CommitSaveRequest>,
    ) -> Result<Response<pb::CommitSaveResponse>, Status> {
        let project = self.project(&request)?;
        let manifest = self.0.commit_save(&project, request.get_ref()).await?;
        Ok(Response::new(pb::CommitSaveResponse { manifest: Some(manifest) }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_credentials(
        &self,
        request: Request<pb::GetCredentialsRequest>,
    ) -> Result<Response<pb::GetCredentialsResponse>, Status> {
        let project = self.project(&request)?;
        let credentials = self.0.issue_credentials(&project, request.get_ref().access()).await?;
        Ok(Response::new(pb::GetCredentialsResponse { credentials: Some(credentials) }))
    }

    async fn report_metrics(
        &self,
        request: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        let project = self.project(&request)?;
        self.0.report_metrics(&project, request.get_ref())?;
        Ok(Response::new(pb::ReportMetricsResponse {}))
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    #[tracing::instrument(skip_all)]
    async fn create_project(
        &self,
        request: Request<pb::CreateProjectRequest>,
    ) -> Result<Response<pb::CreateProjectResponse>, Status> {
        self.admin(&request)?;
        let request = request.get_ref();
        let (project, token) = self.0.create_project(&request.name, request.quota_bytes)?;
        tracing::info!(project = project.name, "project created");
        Ok(Response::new(pb::CreateProjectResponse { project: Some(project), token }))
    }

    async fn list_projects(
        &self,
        request: Request<pb::ListProjectsRequest>,
    ) -> Result<Response<pb::ListProjectsResponse>, Status> {
        self.admin(&request)?;
        Ok(Response::new(pb::ListProjectsResponse { projects: self.0.list_projects()? }))
    }

    async fn list_caches(
        &self,
        request: Request<pb::ListCachesRequest>,
    ) -> Result<Response<pb::ListCachesResponse>, Status> {
        self.admin(&request)?;
        let (project, caches) = self.0.list_caches(&request.get_ref().project)?;
        Ok(Response::new(pb::ListCachesResponse { project: Some(project), caches }))
    }

    async fn show_cache(
        &self,
        request: Request<pb::ShowCacheRequest>,
    ) -> Result<Response<pb::ShowCacheResponse>, Status> {
        self.admin(&request)?;
        let request = request.get_ref();
        let manifest = self.0.show_cache(&request.project, request.key.as_ref())?;
        Ok(Response::new(pb::ShowCacheResponse { manifest: Some(manifest) }))
    }

    #[tracing::instrument(skip_all)]
    async fn flush_project(
        &self,
        request: Request<pb::FlushProjectRequest>,
    ) -> Result<Response<pb::FlushProjectResponse>, Status> {
        self.admin(&request)?;
        Ok(Response::new(self.0.flush_project(&request.get_ref().project).await?))
    }

    async fn stats(&self, request: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        self.admin(&request)?;
        Ok(Response::new(pb::StatsResponse { services: self.0.stats(&request.get_ref().project)? }))
    }
}
