//! The cache's logic behind the gRPC API: [`CacheService`] and its project lock, with projects,
//! authentication, credentials, caches and flushes here, and the rest in children that depend
//! on this module, never it on them: `saves.rs` (the save protocol), `principals.rs` (tokens
//! and projects' admin commands), `gc.rs` (collection, expiry, quotas). Knows nothing of
//! tonic; `api.rs` adapts it.

use std::sync::Arc;

use proto::names;
use proto::object_keys::project_prefix;
use proto::v1 as pb;

use crate::credentials::{CredentialBroker, IssuedCredentials};
use crate::error::Error;
use crate::state::{KeyAccess, ProjectRecord, ServiceCounters, State};
use crate::store::{ObjectStore, ObjectTotals};
use crate::tokens;

mod gc;
mod principals;
mod saves;

/// Shared by every gRPC handler; each field is itself safe to share.
pub struct CacheService {
    pub db: std::sync::Arc<dyn crate::state::State>,
    pub broker: Arc<dyn CredentialBroker>,
    pub store: Arc<dyn ObjectStore>,
    /// The store's key prefix; a project's objects live under `<prefix>/<project>/`.
    pub store_prefix: String,
    pub admin_token_sha256_hex: String,
    pub pending_saves: crate::claims::PendingSaves,
    /// The transfer planner: part size and each worker's share of the global budget.
    pub budget: crate::budget::TransferBudget,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// A project's is taken exclusively while a flush revokes its keys (see `s3_endpoint.rs`).
    pub publish_lock: crate::s3_endpoint::PublishLock,
    /// Each project's store usage as last counted ([`CacheService::refresh_usage`]).
    pub usage: std::sync::Mutex<std::collections::HashMap<String, ObjectTotals>>,
    /// How long a blob stays unreferenced before a garbage collection removes it.
    pub gc_grace: std::time::Duration,
    /// Caches unused this long are evicted by a collection; zero: never.
    pub cache_expiry: std::time::Duration,
    /// The quota of projects created without one; zero: none.
    pub default_quota: u64,
    /// Per token of a project (project, token ID): since when (unix ms), and how many, reported
    /// bad blobs were checked this minute. Per token, so a less trusted token that spends its
    /// checks never leaves the default branch's worker without its own.
    pub bad_blob_checks: std::sync::Mutex<std::collections::HashMap<(String, String), (i64, u32)>>,
    /// The wall clock every time this service stamps or compares is read from: the system's in
    /// production, a manual one in tests.
    pub clock: proto::clock::SharedClock,
    /// Worker tokens checked lately, reused for a few seconds.
    pub recent_tokens: crate::tokens::RecentTokens,
}

/// How a project's publish lock is held (see [`CacheService::lock_project`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// Saves (begin, commit) and lookups: many at once.
    Shared,
    /// Flushes, evictions and collections: alone.
    Exclusive,
}

/// A project's publish lock, held in this process and, where the state is shared by replicas,
/// across them; released on drop.
pub struct ProjectLock {
    _in_process: Box<dyn Send + Sync>,
    _across_replicas: Option<Box<dyn Send + Sync>>,
}

async fn project_message(db: &dyn State, record: &ProjectRecord, usage: ObjectTotals) -> Result<pb::Project, Error> {
    let totals = db.totals(&record.name).await?;
    Ok(pb::Project {
        usage_bytes: usage.bytes,
        usage_objects: usage.count,
        name: record.name.clone(),
        created_unix: record.created_unix,
        generation: record.generation,
        quota_bytes: record.quota_bytes,
        stored_bytes: totals.stored_bytes,
        blob_count: totals.blobs,
        cache_count: totals.manifests as u32,
    })
}

async fn cache_summary(db: &dyn State, project: &str, manifest: &pb::Manifest) -> Result<pb::CacheSummary, Error> {
    let layers = manifest.images.iter().flat_map(|image| &image.layers);
    let digests: Vec<String> = crate::state::manifest_digests(manifest).into_iter().collect();
    let stored = db.stored_blobs(project, &digests).await?;
    Ok(pb::CacheSummary {
        stored_bytes: stored.values().map(|record| record.stored_size).sum(),
        key: manifest.key.clone(),
        image_count: manifest.images.len() as u32,
        layer_count: layers.clone().count() as u32,
        total_bytes: layers.map(|layer| layer.size).sum(),
        created_unix: manifest.created_unix,
        last_used_unix: manifest.last_used_unix,
    })
}

pub fn credentials_message(issued: IssuedCredentials) -> pb::Credentials {
    pb::Credentials {
        access_key_id: issued.access_key_id,
        secret_access_key: issued.secret_access_key,
        session_token: issued.session_token,
        expires_unix: issued.expires_unix,
        endpoint_url: issued.endpoint_url,
        region: issued.region,
        bucket: issued.bucket,
        prefix: issued.prefix,
        path_style: issued.path_style,
        access: match issued.access {
            KeyAccess::Read => pb::Access::Read,
            KeyAccess::Write => pb::Access::Write,
        } as i32,
        checksum_mode: issued.checksum_mode.to_owned(),
    }
}

pub(crate) fn validate_key(key: Option<&pb::CacheKey>) -> Result<pb::CacheKey, Error> {
    let key = key.ok_or_else(|| Error::InvalidArgument("a cache key with a service name is required".into()))?;
    names::validate_service_name(&key.service)?;
    names::validate_branch_name(&key.branch)?;
    Ok(key.clone())
}

impl CacheService {
    /// The project a worker token belongs to.
    pub async fn authenticate_project(&self, token: Option<&str>) -> Result<String, Error> {
        Ok(self.authenticate_worker(token).await?.project)
    }

    /// Takes `project`'s publish lock in this process only, for a step the state runs under
    /// the replicas' lock itself (`State::look_up`).
    async fn lock_in_process(&self, project: &str, lock: Lock) -> Box<dyn Send + Sync> {
        let in_process = self.publish_lock.of_project(project);
        match lock {
            Lock::Shared => Box::new(in_process.read_owned().await),
            Lock::Exclusive => Box::new(in_process.write_owned().await),
        }
    }

    /// Takes `project`'s publish lock: this process's first, then the replicas' (the state's).
    pub async fn lock_project(&self, project: &str, lock: Lock) -> Result<ProjectLock, Error> {
        let in_process = self.lock_in_process(project, lock).await;
        let across_replicas = self.db.project_lock(project, lock == Lock::Exclusive).await?;
        Ok(ProjectLock { _in_process: in_process, _across_replicas: across_replicas })
    }

    /// Admits the admin token only.
    pub async fn authenticate_admin(&self, token: Option<&str>) -> Result<(), Error> {
        let token =
            token.ok_or(Error::Unauthenticated("missing admin token: pass --admin-token or set CACHE_ADMIN_TOKEN"))?;
        if tokens::token_matches(token, &self.admin_token_sha256_hex) {
            return Ok(());
        }
        if self.authenticate_project(Some(token)).await.is_ok() {
            return Err(Error::PermissionDenied("a project token cannot use the admin API: use the admin token"));
        }
        Err(Error::Unauthenticated("wrong admin token"))
    }

    /// Creates a project with `quota_bytes` (`None`: the default quota).
    pub async fn create_project(&self, name: &str, quota_bytes: Option<u64>) -> Result<(pb::Project, String), Error> {
        names::validate_project_name(name)?;
        let quota_bytes = quota_bytes.unwrap_or(self.default_quota);
        let token = tokens::new_project_token(name);
        let record = ProjectRecord {
            name: name.to_owned(),
            token_sha256_hex: tokens::sha256_hex(&token),
            created_unix: self.clock.now_unix(),
            generation: 0,
            quota_bytes,
            sweep_after_unix: 0,
        };
        self.db.create_project(&record).await?;
        // The token is printed once: it must outlive a crash right after.
        self.db.durable().await?;
        Ok((project_message(self.db.as_ref(), &record, ObjectTotals::default()).await?, token))
    }

    pub async fn existing_project(&self, name: &str) -> Result<ProjectRecord, Error> {
        names::validate_project_name(name)?;
        self.db.project(name).await?.ok_or_else(|| Error::NoSuchProject(name.to_owned()))
    }

    pub async fn list_projects(&self) -> Result<Vec<pb::Project>, Error> {
        let usage = self.usage.lock().expect("usage").clone();
        let mut projects = Vec::new();
        for record in self.db.projects().await? {
            let usage = usage.get(&record.name).copied().unwrap_or_default();
            projects.push(project_message(self.db.as_ref(), &record, usage).await?);
        }
        Ok(projects)
    }

    pub async fn list_caches(&self, project: &str) -> Result<(pb::Project, Vec<pb::CacheSummary>), Error> {
        let record = self.existing_project(project).await?;
        let mut caches = Vec::new();
        for manifest in self.db.manifests(project).await? {
            caches.push(cache_summary(self.db.as_ref(), project, &manifest).await?);
        }
        let usage = self.project_usage(project).await?;
        Ok((project_message(self.db.as_ref(), &record, usage).await?, caches))
    }

    /// Counts what the store holds under a project's prefix, committed or not, and keeps it
    /// for `cachectl ls` and the metrics.
    async fn project_usage(&self, project: &str) -> Result<ObjectTotals, Error> {
        let usage = self.store.usage(&project_prefix(&self.store_prefix, project)).await?;
        self.usage.lock().expect("usage").insert(project.to_owned(), usage);
        self.metrics.set_store_usage(project, usage.bytes);
        Ok(usage)
    }

    /// Counts every project's usage (the sweeper calls it every few minutes): every stored
    /// byte counts, including uploads no commit recorded.
    pub async fn refresh_usage(&self) {
        let projects = match self.db.projects().await {
            Ok(projects) => projects,
            Err(error) => return tracing::warn!(error = %error.line(), "counting the store's usage failed"),
        };
        let names: std::collections::HashSet<String> = projects.iter().map(|record| record.name.clone()).collect();
        self.usage.lock().expect("usage").retain(|project, _| names.contains(project));
        for project in names {
            if let Err(error) = self.project_usage(&project).await {
                tracing::warn!(project, error = %error.line(), "counting a project's store usage failed");
            }
        }
    }

    /// Sets a project's quota, and evicts at once what no longer fits.
    pub async fn set_quota(&self, project: &str, quota_bytes: u64) -> Result<pb::SetQuotaResponse, Error> {
        self.existing_project(project).await?;
        let record = self.db.set_quota(project, quota_bytes).await?;
        self.db.durable().await?;
        let evicted = self.fit_quota(project, None, None).await?;
        tracing::info!(project, quota_bytes, evicted = evicted.caches.len(), "quota set");
        let usage = self.usage.lock().expect("usage").get(project).copied().unwrap_or_default();
        Ok(pb::SetQuotaResponse {
            project: Some(project_message(self.db.as_ref(), &record, usage).await?),
            evicted: Some(evicted),
        })
    }

    pub async fn show_cache(&self, project: &str, key: Option<&pb::CacheKey>) -> Result<pb::Manifest, Error> {
        self.existing_project(project).await?;
        let key = validate_key(key)?;
        self.db
            .manifest(project, &key.service, &key.branch)
            .await?
            .ok_or_else(|| Error::NoSuchCache { project: project.to_owned(), service: key.service.clone() })
    }

    /// Removes the project's manifests first (so nothing can name a deleted blob), then every
    /// object under its prefix. Safe to repeat.
    pub async fn flush_project(&self, project: &str) -> Result<pb::FlushProjectResponse, Error> {
        self.existing_project(project).await?;
        let flushed = {
            // No upload signed by one of the project's keys becomes visible meanwhile: those that
            // already did are deleted below, the others find their key revoked.
            let _no_publishing = self.lock_project(project, Lock::Exclusive).await?;
            self.db.flush_project(project).await?
        };
        self.abandon_project_saves(project).await?;
        self.db.durable().await?;
        let deleted =
            self.store.delete_prefix(&project_prefix(&self.store_prefix, project), &crate::store::keep_nothing).await?;
        self.metrics.flushes.get_or_create(&crate::metrics::ProjectLabels { project: project.to_owned() }).inc();
        tracing::info!(project, manifests = flushed.manifests_removed, objects = deleted.count, "project flushed");
        Ok(pb::FlushProjectResponse {
            manifests_removed: flushed.manifests_removed,
            objects_removed: deleted.count,
            bytes_removed: deleted.bytes,
            generation: flushed.generation,
        })
    }

    /// The sweep a flush leaves due (see `ProjectRecord::sweep_after_unix`): deletes the
    /// project's objects that neither the ledger records nor a live save claims. Holds the
    /// project's publish lock, which commits hold while they check and record their blobs.
    pub async fn sweep_after_flush(&self, project: &str, due_unix: i64) -> Result<crate::store::ObjectTotals, Error> {
        let _no_commits = self.lock_project(project, Lock::Exclusive).await?;
        let recorded = self.db.ledger_digests(project).await?;
        let prefix = project_prefix(&self.store_prefix, project);
        let in_flight = self.pending_saves.in_flight(project, self.clock.now_unix_ms()).await?;
        let keep = |key: &str| {
            let digest = key
                .strip_prefix(prefix.as_str())
                .and_then(|rest| rest.strip_prefix("blobs/sha256/"))
                .map(|hex| format!("sha256:{hex}"));
            digest.is_some_and(|digest| recorded.contains(&digest) || in_flight.contains(&digest))
        };
        let deleted = self.store.delete_prefix(&prefix, &keep).await?;
        self.db.sweep_done(project, due_unix).await?;
        self.db.durable().await?;
        tracing::info!(project, objects = deleted.count, bytes = deleted.bytes, "swept what a flushed save left");
        Ok(deleted)
    }

    /// Runs every post-flush sweep that is due.
    pub async fn run_due_sweeps(&self) {
        let due = match self.db.sweeps_due(self.clock.now_unix()).await {
            Ok(due) => due,
            Err(error) => return tracing::warn!(error = %error.line(), "looking for due sweeps failed"),
        };
        for (project, due_unix) in due {
            if let Err(error) = self.sweep_after_flush(&project, due_unix).await {
                tracing::warn!(project, error = %error.line(), "sweeping after a flush failed; it is tried again");
            }
        }
    }

    pub async fn stats(&self, project: &str) -> Result<Vec<pb::ServiceStats>, Error> {
        let filter = if project.is_empty() {
            None
        } else {
            self.existing_project(project).await?;
            Some(project)
        };
        let counters = self.db.service_counters(filter).await?;
        Ok(counters
            .into_iter()
            .map(|(project, service, c)| pb::ServiceStats {
                project,
                service,
                restores_hit: c.restores_hit,
                restores_partial: c.restores_partial,
                restores_miss: c.restores_miss,
                restores_error: c.restores_error,
                saves: c.saves,
                layers_found: c.layers_found,
                layers_transferred: c.layers_transferred,
                bytes_found: c.bytes_found,
                bytes_transferred: c.bytes_transferred,
                steps_reused: c.steps_reused,
                steps_rebuilt: c.steps_rebuilt,
            })
            .collect())
    }

    /// New credentials, or with `renew_access_key_id`, renewed ones for a worker mid-transfer,
    /// for `holder` (`None`: the admin API, whose keys count as the project token's). A key
    /// renews only for the token it was issued to.
    ///
    /// Architecture Invariant: a key is recorded with the token it is issued to before it is
    /// handed out, under the project's publish lock held shared, once the token is checked
    /// still live; a revoke, a rotation, a flush and a deletion take that lock exclusively, so
    /// each either finds the key and revokes it, or runs first and the mint is refused.
    pub async fn issue_credentials(
        &self,
        project: &str,
        access: pb::Access,
        renew_access_key_id: &str,
        holder: Option<&tokens::Principal>,
    ) -> Result<pb::Credentials, Error> {
        let token_id = holder.map_or("", |principal| principal.token_id.as_str());
        let access = match access {
            pb::Access::Read => KeyAccess::Read,
            pb::Access::Write => KeyAccess::Write,
            pb::Access::Unspecified => {
                return Err(Error::InvalidArgument("credentials need an access: read or write".into()));
            }
        };
        if renew_access_key_id.len() > 128 || !renew_access_key_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(Error::InvalidArgument("invalid access key ID to renew".into()));
        }
        let minting = self.lock_project(project, Lock::Shared).await?;
        if let Some(principal) = holder {
            self.check_still_live(principal).await?;
        }
        // Every key handed out is recorded; a flush forgets its project's, and then nobody
        // renews them: a save begun before the flush cannot go on writing after it.
        if !renew_access_key_id.is_empty() {
            match self.db.minted_key(renew_access_key_id).await? {
                None => {
                    return Err(Error::SaveConflict(
                        "the storage key to renew was revoked (the project was flushed): save or restore again".into(),
                    ));
                }
                // Renewing hands out the key's secret and keeps it alive: only its own token may.
                Some(record) if record.project != project || record.token_id != token_id => {
                    return Err(Error::PermissionDenied(
                        "the storage key to renew was issued to another token: ask for new credentials instead",
                    ));
                }
                Some(_) => {}
            }
        }
        let issued = if renew_access_key_id.is_empty() {
            self.broker.issue(project, access, token_id).await?
        } else {
            self.broker.renew(project, access, renew_access_key_id, token_id).await?
        };
        if !self.broker.records_keys() {
            let record = crate::state::MintedKeyRecord {
                project: project.to_owned(),
                access,
                expires_unix: issued.expires_unix,
                token_id: token_id.to_owned(),
            };
            self.db.insert_minted_key(&issued.access_key_id, &record).await?;
            self.db.key_durable(access).await?;
        }
        drop(minting);
        let access_name = if access == KeyAccess::Write { "write" } else { "read" };
        let grant = crate::metrics::GrantLabels { project: project.to_owned(), access: access_name.to_owned() };
        self.metrics.credential_grants.get_or_create(&grant).inc();
        let renewed = issued.access_key_id == renew_access_key_id;
        tracing::info!(project, access_key_id = issued.access_key_id, ?access, renewed, "credentials issued");
        Ok(credentials_message(issued))
    }

    /// Adds a worker's report of one save or restore to the service's counters.
    pub async fn report_metrics(
        &self,
        principal: &tokens::Principal,
        report: &pb::ReportMetricsRequest,
    ) -> Result<(), Error> {
        let project = principal.project.as_str();
        // The transfer's share of the budget comes back whatever the report says.
        if !report.lease_id.is_empty() {
            self.budget.release(project, &report.lease_id, self.clock.now_unix_ms()).await?;
        }
        names::validate_service_name(&report.service)?;
        validate_report(report)?;
        self.may_report_for(project, &report.service, principal.scope.is_some()).await?;
        let mut change = ServiceCounters::default();
        for layer in &report.layers {
            match layer.outcome() {
                pb::LayerOutcome::Found => {
                    change.layers_found += 1;
                    change.bytes_found = change.bytes_found.saturating_add(layer.bytes);
                }
                pb::LayerOutcome::Transferred => {
                    change.layers_transferred += 1;
                    change.bytes_transferred = change.bytes_transferred.saturating_add(layer.bytes);
                }
                pb::LayerOutcome::Failed | pb::LayerOutcome::Unspecified => {}
            }
        }
        if report.operation() == pb::Operation::Save {
            change.steps_reused = report.steps_reused.into();
            change.steps_rebuilt = report.steps_rebuilt.into();
        }
        if report.operation() == pb::Operation::Restore {
            match report.restore_outcome() {
                pb::RestoreOutcome::Hit => change.restores_hit = 1,
                pb::RestoreOutcome::Partial => change.restores_partial = 1,
                pb::RestoreOutcome::Miss => change.restores_miss = 1,
                pb::RestoreOutcome::Error => change.restores_error = 1,
                pb::RestoreOutcome::Unspecified => {}
            }
        }
        self.metrics.record_report(project, report);
        self.db.add_to_counters(project, &report.service, &change).await
    }

    /// Refuses a report for yet another service once a project reports for
    /// [`MAX_REPORTED_SERVICES`] without a cache: each service is a set of series for as long as
    /// the coordinator runs, and a row of `cachectl stats` for good. A scoped token (`scoped`)
    /// adds one only below half of them: the rest is the project token's, so a less trusted
    /// token never leaves the default branch's new service without its metrics.
    async fn may_report_for(&self, project: &str, service: &str, scoped: bool) -> Result<(), Error> {
        let reported: Vec<String> =
            self.db.service_counters(Some(project)).await?.into_iter().map(|(_, service, _)| service).collect();
        if reported.iter().any(|known| known == service) {
            return Ok(());
        }
        let cached: std::collections::HashSet<String> = self
            .db
            .manifests(project)
            .await?
            .into_iter()
            .filter_map(|manifest| manifest.key.map(|key| key.service))
            .collect();
        if cached.contains(service) {
            return Ok(());
        }
        let uncached = reported.iter().filter(|known| !cached.contains(*known)).count();
        if uncached >= MAX_REPORTED_SERVICES || (scoped && uncached >= MAX_REPORTED_SERVICES / 2) {
            return Err(Error::InvalidArgument(format!(
                "project {project:?} already reports metrics for {uncached} services without a cache, the most it may: metrics for {service:?} are not recorded"
            )));
        }
        Ok(())
    }

    /// The Prometheus text exposition, with the store gauges brought up to date from the ledger.
    /// Served while the database is down too (`state_up` then says so): the gauges read from
    /// it keep their last values.
    pub async fn metrics_text(&self) -> String {
        if let Err(error) = self.refresh_state_gauges().await {
            tracing::debug!(error = %error.line(), "the gauges read from the state keep their last values");
        }
        self.metrics.encode()
    }

    async fn refresh_state_gauges(&self) -> Result<(), Error> {
        for project in self.db.projects().await? {
            let totals = self.db.totals(&project.name).await?;
            let (blobs, bytes) = (totals.blobs, totals.stored_bytes);
            self.metrics.set_store_totals(&project.name, blobs, bytes);
        }
        self.metrics.transfer_granted.set(i64::from(self.budget.granted(self.clock.now_unix_ms()).await?));
        self.metrics.transfer_budget.set(i64::from(self.budget.total()));
        Ok(())
    }

    /// Finds the manifest of `key`, else of the first fallback that has one. A scoped token
    /// must be allowed to read every branch it names.
    pub async fn lookup(
        &self,
        principal: &crate::tokens::Principal,
        request: &pb::LookupRequest,
    ) -> Result<pb::LookupResponse, Error> {
        let project = principal.project.as_str();
        let mut candidates = vec![validate_key(request.key.as_ref())?];
        for fallback in &request.fallbacks {
            candidates.push(validate_key(Some(fallback))?);
        }
        for key in &candidates {
            principal.check_read(&key.branch)?;
        }
        // Held while the manifest is read and its restore's lease registered: an eviction or a
        // collection (which take the lock exclusively) either ran before, and this finds what
        // it left, or runs after and deletes none of the blobs this restore reads. Across
        // replicas the state holds it for its step (`State::look_up`).
        let _registering = self.lock_in_process(project, Lock::Shared).await;
        let lease_id = crate::tokens::random_hex_32();
        let (now_unix, now_unix_ms) = (self.clock.now_unix(), self.clock.now_unix_ms());
        let mut plan = None;
        let found = self
            .db
            .look_up(project, principal.holder(), &candidates, now_unix, &mut |manifest, leases, demands| {
                let reads = crate::state::manifest_digests(manifest);
                let (granted, demand) = self.budget.grant_in(
                    project,
                    &principal.token_id,
                    &lease_id,
                    crate::budget::LeaseKind::Restore,
                    reads,
                    now_unix_ms,
                    leases,
                    demands,
                );
                plan = Some(granted);
                demand
            })
            .await?;
        let Some(manifest) = found else { return Ok(pb::LookupResponse::default()) };
        Ok(pb::LookupResponse { found: true, matched: manifest.key.clone(), manifest: Some(manifest), plan })
    }
}

/// The most services without a cache a project may report metrics for (a first build's
/// restore misses before its first save, a service renamed): beyond it, reports are refused.
pub const MAX_REPORTED_SERVICES: usize = 64;

/// The most build steps one save may count: 1,000 images' worth of 1,000 steps.
const MAX_REPORTED_STEPS: u64 = 1_000_000;

/// The most layers one report may count: far more than any image chain has.
const MAX_REPORTED_LAYERS: usize = 100_000;

/// The longest a reported transfer may have taken: a week.
const MAX_REPORTED_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

/// A report's values must be ones a worker can measure: a known operation, durations finite
/// and under a week, each layer's size at most one object's and its digest well formed.
fn validate_report(report: &pb::ReportMetricsRequest) -> Result<(), Error> {
    let invalid = |what: String| Err(Error::InvalidArgument(format!("metrics report refused: {what}")));
    if report.operation() == pb::Operation::Unspecified {
        return invalid("it names no operation".into());
    }
    let duration_ok = |seconds: f64| seconds.is_finite() && (0.0..=MAX_REPORTED_SECONDS).contains(&seconds);
    if !duration_ok(report.total_seconds) {
        return invalid(format!("total_seconds {} is not a duration", report.total_seconds));
    }
    let steps = u64::from(report.steps_reused) + u64::from(report.steps_rebuilt);
    if report.operation() == pb::Operation::Save && steps > MAX_REPORTED_STEPS {
        return invalid(format!("{steps} build steps, more than {MAX_REPORTED_STEPS}"));
    }
    if report.operation() != pb::Operation::Save && steps > 0 {
        return invalid("build steps are counted by saves only".into());
    }
    if report.layers.len() > MAX_REPORTED_LAYERS {
        return invalid(format!("{} layers, more than {MAX_REPORTED_LAYERS}", report.layers.len()));
    }
    for layer in &report.layers {
        names::validate_digest(&layer.digest)?;
        if layer.bytes > proto::parts::MAX_BLOB_SIZE {
            return invalid(format!("layer {} of {} bytes, more than one blob may hold", layer.digest, layer.bytes));
        }
        if !duration_ok(layer.seconds) {
            return invalid(format!("layer {} took {} seconds", layer.digest, layer.seconds));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::credentials::{EmbeddedBroker, EmbeddedStoreSettings, SigningKey};

    /// The embedded broker over `db`, its signing key in `dir`, on a clock set to now.
    pub(crate) fn embedded_broker(dir: &Path, db: &crate::state::Database) -> EmbeddedBroker {
        embedded_broker_on(dir, db, proto::clock::ManualClock::starting_now())
    }

    /// The embedded broker over `db`, its signing key in `dir`, reading `clock`.
    pub(crate) fn embedded_broker_on(
        dir: &Path,
        db: &crate::state::Database,
        clock: proto::clock::SharedClock,
    ) -> EmbeddedBroker {
        EmbeddedBroker {
            state: Arc::new(db.clone()),
            clock,
            signing_key: Arc::new(SigningKey::load_or_create(dir).unwrap()),
            settings: EmbeddedStoreSettings {
                endpoint_url: "http://127.0.0.1:7401".into(),
                region: "us-east-1".into(),
                bucket: "layer-cache".into(),
                prefix: "cache".into(),
            },
            ttl: Duration::from_secs(900),
        }
    }

    /// A service on sled (`db`) with the embedded store under `dir/objects`, minting through
    /// `broker` (`None`: the embedded broker).
    pub(crate) fn service(
        dir: &Path,
        db: crate::state::Database,
        broker: Option<Arc<dyn CredentialBroker>>,
    ) -> Arc<CacheService> {
        std::fs::create_dir_all(dir.join("objects/layer-cache")).unwrap();
        let broker = broker.unwrap_or_else(|| Arc::new(embedded_broker(dir, &db)));
        let state: Arc<dyn State> = Arc::new(db);
        let plan = crate::budget::PlanSettings {
            part_size: 8 << 20,
            multipart_threshold: 16 << 20,
            worker_concurrency: 8,
            transfer_budget: 64,
        };
        Arc::new(CacheService {
            db: state.clone(),
            broker,
            store: Arc::new(crate::store::EmbeddedStore::new(&dir.join("objects"), "layer-cache").unwrap()),
            store_prefix: "cache".into(),
            admin_token_sha256_hex: tokens::sha256_hex("admin"),
            pending_saves: crate::claims::PendingSaves::new(Duration::from_secs(15), state.clone()),
            budget: crate::budget::TransferBudget::new(plan, state),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            publish_lock: Default::default(),
            usage: Default::default(),
            gc_grace: Duration::from_secs(3600),
            cache_expiry: Duration::ZERO,
            default_quota: 0,
            bad_blob_checks: Default::default(),
            clock: proto::clock::ManualClock::starting_now(),
            recent_tokens: Default::default(),
        })
    }
}
