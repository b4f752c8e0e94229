//! The gRPC adapter: authenticates each call from its metadata, hands it to [`CacheService`]
//! and turns errors into status codes chosen on purpose. tonic types stop here.

use std::sync::Arc;

use proto::v1 as pb;
use proto::v1::admin_server::Admin;
use proto::v1::worker_server::Worker;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::service::CacheService;

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let message = error.line();
        match error {
            Error::InvalidArgument(_) => Status::invalid_argument(message),
            Error::Unauthenticated(_) => Status::unauthenticated(message),
            Error::PermissionDenied(_) | Error::OutOfScope(_) => Status::permission_denied(message),
            Error::ProjectExists(_) => Status::already_exists(message),
            Error::NoSuchProject(_) | Error::NoSuchCache { .. } | Error::NoSuchSave(_) => Status::not_found(message),
            Error::SaveConflict(_) => Status::aborted(message),
            Error::TooMany(_) | Error::OverQuota(_) => Status::resource_exhausted(message),
            Error::BlobNotStored(_) => Status::failed_precondition(message),
            Error::BlobCorrupt(_) => Status::data_loss(message),
            // Retrying may help: the store or the disk may come back. The operator must hear of
            // it: the worker's line names the cause, and so does the coordinator's log.
            Error::DataDirUnwritable { .. } => {
                tracing::error!(error = message, "a write to the data directory failed");
                Status::unavailable(message)
            }
            Error::Database { .. } => {
                tracing::error!(error = message, "the coordinator's database failed a call");
                Status::unavailable(message)
            }
            // Every call fails so while the database is down: said once a call in the log,
            // with its cause, and to the caller without it (a connection error's words would
            // read as the coordinator itself being unreachable).
            Error::DatabaseUnavailable { .. } => {
                tracing::warn!(error = message, "a call failed: the coordinator's database is unavailable");
                Status::unavailable(error.to_string())
            }
            Error::Store { .. } | Error::Credentials { .. } => Status::unavailable(message),
            Error::CorruptState { .. } | Error::DataDir { .. } | Error::DataDirLocked(_) => Status::internal(message),
            // A panicked task is a bug of the coordinator's: said as one, never as bad input.
            Error::Internal(_) => {
                tracing::error!(error = message, "a task of the coordinator failed");
                Status::internal(message)
            }
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
    async fn project<T>(&self, request: &Request<T>) -> Result<String, Status> {
        Ok(self.principal(request).await?.project)
    }

    async fn principal<T>(&self, request: &Request<T>) -> Result<crate::tokens::Principal, Status> {
        Ok(self.0.authenticate_worker(bearer_token(request)).await?)
    }
}

impl AdminApi {
    async fn admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        Ok(self.0.authenticate_admin(bearer_token(request)).await?)
    }
}

/// Counts a finished call by method and status code, and wraps its answer.
fn counted<T>(metrics: &Metrics, method: &str, result: Result<T, Status>) -> Result<Response<T>, Status> {
    metrics.record_grpc(method, result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok));
    result.map(Response::new)
}

#[tonic::async_trait]
impl Worker for WorkerApi {
    #[tracing::instrument(skip_all)]
    async fn lookup(&self, request: Request<pb::LookupRequest>) -> Result<Response<pb::LookupResponse>, Status> {
        let result = async { Ok(self.0.lookup(&self.principal(&request).await?, request.get_ref()).await?) }.await;
        counted(&self.0.metrics, "Lookup", result)
    }

    #[tracing::instrument(skip_all)]
    async fn begin_save(
        &self,
        request: Request<pb::BeginSaveRequest>,
    ) -> Result<Response<pb::BeginSaveResponse>, Status> {
        let result = async { Ok(self.0.begin_save(&self.principal(&request).await?, request.get_ref()).await?) }.await;
        counted(&self.0.metrics, "BeginSave", result)
    }

    #[tracing::instrument(skip_all)]
    async fn commit_save(
        &self,
        request: Request<pb::CommitSaveRequest>,
    ) -> Result<Response<pb::CommitSaveResponse>, Status> {
        let result = async { Ok(self.0.commit_save(&self.principal(&request).await?, request.get_ref()).await?) }.await;
        counted(&self.0.metrics, "CommitSave", result)
    }

    #[tracing::instrument(skip_all)]
    async fn keep_save_alive(
        &self,
        request: Request<pb::KeepSaveAliveRequest>,
    ) -> Result<Response<pb::KeepSaveAliveResponse>, Status> {
        let result = async {
            let plan = self.0.keep_save_alive(&self.project(&request).await?, &request.get_ref().save_id).await?;
            Ok(pb::KeepSaveAliveResponse { plan })
        }
        .await;
        counted(&self.0.metrics, "KeepSaveAlive", result)
    }

    #[tracing::instrument(skip_all)]
    async fn abandon_save(
        &self,
        request: Request<pb::AbandonSaveRequest>,
    ) -> Result<Response<pb::AbandonSaveResponse>, Status> {
        let result = async {
            self.0.abandon_save(&self.project(&request).await?, &request.get_ref().save_id).await?;
            Ok(pb::AbandonSaveResponse {})
        }
        .await;
        counted(&self.0.metrics, "AbandonSave", result)
    }

    #[tracing::instrument(skip_all)]
    async fn get_credentials(
        &self,
        request: Request<pb::GetCredentialsRequest>,
    ) -> Result<Response<pb::GetCredentialsResponse>, Status> {
        let result = async {
            let principal = self.principal(&request).await?;
            let request = request.get_ref();
            if request.access() == pb::Access::Write {
                principal.check_writes_some()?;
            }
            let credentials = self
                .0
                .issue_credentials(&principal.project, request.access(), &request.renew_access_key_id, Some(&principal))
                .await?;
            Ok(pb::GetCredentialsResponse { credentials: Some(credentials) })
        }
        .await;
        counted(&self.0.metrics, "GetCredentials", result)
    }

    #[tracing::instrument(skip_all)]
    async fn report_bad_blob(
        &self,
        request: Request<pb::ReportBadBlobRequest>,
    ) -> Result<Response<pb::ReportBadBlobResponse>, Status> {
        let result =
            async { Ok(self.0.report_bad_blob(&self.principal(&request).await?, &request.get_ref().digest).await?) }
                .await;
        counted(&self.0.metrics, "ReportBadBlob", result)
    }

    async fn report_metrics(
        &self,
        request: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        let result = async {
            self.0.report_metrics(&self.principal(&request).await?, request.get_ref()).await?;
            Ok(pb::ReportMetricsResponse {})
        }
        .await;
        counted(&self.0.metrics, "ReportMetrics", result)
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    #[tracing::instrument(skip_all)]
    async fn create_project(
        &self,
        request: Request<pb::CreateProjectRequest>,
    ) -> Result<Response<pb::CreateProjectResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            let request = request.get_ref();
            let (project, token) = self.0.create_project(&request.name, request.quota_bytes).await?;
            tracing::info!(project = project.name, "project created");
            Ok(pb::CreateProjectResponse { project: Some(project), token })
        }
        .await;
        counted(&self.0.metrics, "CreateProject", result)
    }

    async fn list_projects(
        &self,
        request: Request<pb::ListProjectsRequest>,
    ) -> Result<Response<pb::ListProjectsResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            Ok(pb::ListProjectsResponse { projects: self.0.list_projects().await? })
        }
        .await;
        counted(&self.0.metrics, "ListProjects", result)
    }

    async fn list_caches(
        &self,
        request: Request<pb::ListCachesRequest>,
    ) -> Result<Response<pb::ListCachesResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            let (project, caches) = self.0.list_caches(&request.get_ref().project).await?;
            Ok(pb::ListCachesResponse { project: Some(project), caches })
        }
        .await;
        counted(&self.0.metrics, "ListCaches", result)
    }

    async fn show_cache(
        &self,
        request: Request<pb::ShowCacheRequest>,
    ) -> Result<Response<pb::ShowCacheResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            let request = request.get_ref();
            let manifest = self.0.show_cache(&request.project, request.key.as_ref()).await?;
            Ok(pb::ShowCacheResponse { manifest: Some(manifest) })
        }
        .await;
        counted(&self.0.metrics, "ShowCache", result)
    }

    #[tracing::instrument(skip_all)]
    async fn flush_project(
        &self,
        request: Request<pb::FlushProjectRequest>,
    ) -> Result<Response<pb::FlushProjectResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            Ok(self.0.flush_project(&request.get_ref().project).await?)
        }
        .await;
        counted(&self.0.metrics, "FlushProject", result)
    }

    #[tracing::instrument(skip_all)]
    async fn issue_credentials(
        &self,
        request: Request<pb::IssueCredentialsRequest>,
    ) -> Result<Response<pb::GetCredentialsResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            let request = request.get_ref();
            let project = self.0.existing_project(&request.project).await?;
            let credentials = self.0.issue_credentials(&project.name, request.access(), "", None).await?;
            Ok(pb::GetCredentialsResponse { credentials: Some(credentials) })
        }
        .await;
        counted(&self.0.metrics, "IssueCredentials", result)
    }

    #[tracing::instrument(skip_all)]
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            let request = request.get_ref();
            let scope = crate::tokens::BranchScope {
                read: request.read_branches.clone(),
                write: request.write_branches.clone(),
            };
            let (token, secret) = self.0.create_token(&request.project, scope, request.expires_seconds).await?;
            Ok(pb::CreateTokenResponse { token: Some(token), secret })
        }
        .await;
        counted(&self.0.metrics, "CreateToken", result)
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            Ok(pb::ListTokensResponse { tokens: self.0.list_tokens(&request.get_ref().project).await? })
        }
        .await;
        counted(&self.0.metrics, "ListTokens", result)
    }

    #[tracing::instrument(skip_all)]
    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            let request = request.get_ref();
            self.0.revoke_token(&request.project, &request.token_id).await?;
            Ok(pb::RevokeTokenResponse {})
        }
        .await;
        counted(&self.0.metrics, "RevokeToken", result)
    }

    #[tracing::instrument(skip_all)]
    async fn rotate_project_token(
        &self,
        request: Request<pb::RotateProjectTokenRequest>,
    ) -> Result<Response<pb::RotateProjectTokenResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            Ok(pb::RotateProjectTokenResponse { token: self.0.rotate_project_token(&request.get_ref().project).await? })
        }
        .await;
        counted(&self.0.metrics, "RotateProjectToken", result)
    }

    #[tracing::instrument(skip_all)]
    async fn delete_project(
        &self,
        request: Request<pb::DeleteProjectRequest>,
    ) -> Result<Response<pb::FlushProjectResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            Ok(self.0.delete_project(&request.get_ref().project).await?)
        }
        .await;
        counted(&self.0.metrics, "DeleteProject", result)
    }

    #[tracing::instrument(skip_all)]
    async fn collect_garbage(
        &self,
        request: Request<pb::CollectGarbageRequest>,
    ) -> Result<Response<pb::CollectGarbageResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            let request = request.get_ref();
            let projects = if request.project.is_empty() {
                self.0.collect_all_garbage(request.dry_run).await?
            } else {
                vec![self.0.collect_garbage(&request.project, request.dry_run).await?]
            };
            Ok(pb::CollectGarbageResponse { projects })
        }
        .await;
        counted(&self.0.metrics, "CollectGarbage", result)
    }

    #[tracing::instrument(skip_all)]
    async fn set_quota(&self, request: Request<pb::SetQuotaRequest>) -> Result<Response<pb::SetQuotaResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            let request = request.get_ref();
            Ok(self.0.set_quota(&request.project, request.quota_bytes).await?)
        }
        .await;
        counted(&self.0.metrics, "SetQuota", result)
    }

    async fn stats(&self, request: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        let result = async {
            self.admin(&request).await?;
            Ok(pb::StatsResponse { services: self.0.stats(&request.get_ref().project).await? })
        }
        .await;
        counted(&self.0.metrics, "Stats", result)
    }
}
