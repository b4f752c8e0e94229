//! The coordinator's persistent state in sled: projects, minted storage keys, manifests, the
//! blob ledger and counters. The only file that imports sled.
//!
//! Trees and their keys (`\0` separates parts; names never contain it):
//! - `projects`: project name → [`ProjectRecord`] (JSON)
//! - `minted_keys`: access key ID → [`MintedKeyRecord`] (JSON)
//! - `manifests`: project `\0` service `\0` branch → `proto::v1::Manifest` (protobuf)
//! - `blobs`: project `\0` digest → [`BlobRecord`] (JSON), the ledger
//! - `counters`: project `\0` service → [`ServiceCounters`] (JSON)
//! - `totals`: project → [`ProjectTotals`] (JSON), kept in step by the same transactions that
//!   change manifests and the ledger, so totals are read, never counted

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use prost::Message;
use proto::v1 as pb;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::error::Error;

use super::{
    BlobRecord, Committed, FlushedRecords, KeyAccess, MintedKeyRecord, ProjectRecord, ProjectTotals, ScopedTokenRecord,
    ServiceCounters, State, ledger, manifest_digests,
};

/// A change to a project's totals, applied in the transaction that makes it.
#[derive(Debug, Clone, Copy, Default)]
struct TotalsChange {
    blobs: i64,
    stored_bytes: i64,
    manifests: i64,
}

impl TotalsChange {
    /// The totals' part of a ledger rule's change set.
    fn of(change: &ledger::ChangeSet) -> TotalsChange {
        TotalsChange {
            blobs: change.blobs_delta,
            stored_bytes: change.stored_bytes_delta,
            manifests: change.manifests_delta,
        }
    }

    fn apply(
        self,
        totals: &sled::transaction::TransactionalTree,
        project: &str,
    ) -> Result<(), ConflictableTransactionError<Error>> {
        let mut current: ProjectTotals = match totals.get(project.as_bytes())? {
            Some(bytes) => json_from_slice("totals", &bytes).map_err(ConflictableTransactionError::Abort)?,
            None => ProjectTotals::default(),
        };
        let add = |value: u64, change: i64| (value as i64 + change).max(0) as u64;
        current.blobs = add(current.blobs, self.blobs);
        current.stored_bytes = add(current.stored_bytes, self.stored_bytes);
        current.manifests = add(current.manifests, self.manifests);
        totals.insert(project.as_bytes(), json_to_vec(&current))?;
        Ok(())
    }
}

/// Group commit: writes that finish while a flush runs share the next one, so concurrent
/// acknowledgements cost one disk sync between them rather than one each.
#[derive(Default)]
struct GroupCommit {
    /// Bumped after every write that must become durable; a write's number is its ticket.
    n_writes: std::sync::atomic::AtomicU64,
    /// The highest ticket known to be on disk.
    n_durable: std::sync::atomic::AtomicU64,
    /// Held by the one caller flushing; the others wait on it, then find their ticket covered.
    flushing: tokio::sync::Mutex<()>,
}

/// The coordinator's database. Cloning is cheap: every clone shares one sled instance, which
/// does its own locking.
#[derive(Clone)]
pub struct Database {
    db: sled::Db,
    group_commit: std::sync::Arc<GroupCommit>,
    projects: sled::Tree,
    minted_keys: sled::Tree,
    manifests: sled::Tree,
    blobs: sled::Tree,
    counters: sled::Tree,
    scoped_tokens: sled::Tree,
    totals: sled::Tree,
    /// Open saves and transfer leases: one process's, so in its memory.
    ephemeral: std::sync::Arc<super::InMemory>,
}

fn json_to_vec<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize to JSON")
}

fn json_from_slice<T: for<'de> Deserialize<'de>>(tree: &str, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|error| Error::corrupt(tree, error))
}

fn db_error(error: sled::Error) -> Error {
    match error {
        sled::Error::Io(io) => match crate::error::disk_problem(&io) {
            Some(problem) => Error::DataDirUnwritable { problem, source: io },
            None => Error::database("sled", io),
        },
        error => Error::database("sled", error),
    }
}

fn composite_key(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

fn project_prefix(project: &str) -> Vec<u8> {
    let mut prefix = project.as_bytes().to_vec();
    prefix.push(0);
    prefix
}

impl Database {
    /// Opens (or creates) the database in `data_dir/db`. A data directory held by another
    /// coordinator is refused with [`Error::DataDirLocked`].
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        let path: PathBuf = data_dir.join("db");
        let db = sled::Config::new().path(&path).open().map_err(|error| match error {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") => {
                Error::DataDirLocked(data_dir.to_path_buf())
            }
            other => Error::DataDir { path: data_dir.to_path_buf(), reason: other.to_string() },
        })?;
        let open_tree = |name: &str| db.open_tree(name).map_err(db_error);
        Ok(Database {
            projects: open_tree("projects")?,
            minted_keys: open_tree("minted_keys")?,
            manifests: open_tree("manifests")?,
            blobs: open_tree("blobs")?,
            counters: open_tree("counters")?,
            scoped_tokens: open_tree("scoped_tokens")?,
            totals: open_tree("totals")?,
            ephemeral: Default::default(),
            db,
            group_commit: Default::default(),
        })
        .and_then(Database::count_missing_totals)
    }

    /// Counts, once, the totals of projects a coordinator from before they were kept left.
    fn count_missing_totals(self) -> Result<Database, Error> {
        for project in self.scan_projects()? {
            if self.totals.get(project.name.as_bytes()).map_err(db_error)?.is_some() {
                continue;
            }
            let mut totals =
                ProjectTotals { manifests: self.scan_manifests(&project.name)?.len() as u64, ..Default::default() };
            for entry in self.blobs.scan_prefix(project_prefix(&project.name)) {
                let (_, bytes) = entry.map_err(db_error)?;
                let record: BlobRecord = json_from_slice("blobs", &bytes)?;
                totals.blobs += 1;
                totals.stored_bytes += record.stored_size;
            }
            self.totals.insert(project.name.as_bytes(), json_to_vec(&totals)).map_err(db_error)?;
        }
        Ok(self)
    }

    /// Every project, sorted by name.
    fn scan_projects(&self) -> Result<Vec<ProjectRecord>, Error> {
        self.projects
            .iter()
            .map(|entry| {
                let (_, bytes) = entry.map_err(db_error)?;
                json_from_slice("projects", &bytes)
            })
            .collect()
    }

    /// Every manifest of a project, sorted by service and branch.
    fn scan_manifests(&self, project: &str) -> Result<Vec<pb::Manifest>, Error> {
        self.manifests
            .scan_prefix(project_prefix(project))
            .map(|entry| {
                let (_, bytes) = entry.map_err(db_error)?;
                proto::v1::Manifest::decode(bytes.as_ref()).map_err(|error| Error::corrupt("manifests", error))
            })
            .collect()
    }

    /// Every digest the project's ledger records (referenced or not).
    fn scan_ledger_digests(&self, project: &str) -> Result<HashSet<String>, Error> {
        let prefix = project_prefix(project);
        self.blobs
            .scan_prefix(&prefix)
            .keys()
            .map(|key| {
                let key = key.map_err(db_error)?;
                Ok(String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
            })
            .collect()
    }
}

/// A transaction's result, its abort's error or its storage's.
fn transacted<T>(result: Result<T, TransactionError<Error>>) -> Result<T, Error> {
    match result {
        Ok(value) => Ok(value),
        Err(TransactionError::Abort(error)) => Err(error),
        Err(TransactionError::Storage(error)) => Err(db_error(error)),
    }
}

#[async_trait::async_trait]
impl super::Ephemeral for Database {
    async fn update_open_saves(
        &self,
        project: &str,
        change: &mut (dyn for<'a> FnMut(&'a mut super::OpenSaves) + Send),
    ) -> Result<(), Error> {
        self.ephemeral.update_open_saves(project, change).await
    }

    async fn read_open_saves(
        &self,
        project: Option<&str>,
        read: &mut (dyn for<'a> FnMut(&'a super::OpenSaves) + Send),
    ) -> Result<(), Error> {
        self.ephemeral.read_open_saves(project, read).await
    }

    async fn update_leases(
        &self,
        project: &str,
        change: &mut (dyn for<'a> FnMut(&'a mut super::Leases, &'a super::LeaseDemands) -> super::LeaseDemand + Send),
    ) -> Result<(), Error> {
        self.ephemeral.update_leases(project, change).await
    }

    async fn read_leases(
        &self,
        project: Option<&str>,
        read: &mut (dyn for<'a> FnMut(&'a super::Leases) + Send),
    ) -> Result<(), Error> {
        self.ephemeral.read_leases(project, read).await
    }
}

#[async_trait::async_trait]
impl State for Database {
    /// Returns once every write this caller made before the call is on disk: what an
    /// acknowledgement waits for. sled alone syncs only every 500 ms, so a crash (an OOM kill,
    /// a lost node) would lose writes already acknowledged. Callers that arrive while another
    /// one flushes share the next flush (group commit).
    async fn durable(&self) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        let ticket = self.group_commit.n_writes.fetch_add(1, Ordering::SeqCst) + 1;
        let _flushing = self.group_commit.flushing.lock().await;
        if self.group_commit.n_durable.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        // Every ticket taken before this load belongs to a write that already finished.
        let covered = self.group_commit.n_writes.load(Ordering::SeqCst);
        self.db.flush_async().await.map_err(db_error)?;
        self.group_commit.n_durable.fetch_max(covered, Ordering::SeqCst);
        Ok(())
    }

    /// Waits for a key's record to be durable: a key handed out must keep working after a
    /// crash, since its record is what admits it (and renews it). A read key is still handed
    /// out when the disk refuses (full, read-only), so restores go on working from the store;
    /// it lapses if the coordinator restarts.
    async fn key_durable(&self, access: KeyAccess) -> Result<(), Error> {
        match self.durable().await {
            Err(error) if access == KeyAccess::Read => {
                tracing::warn!(error = %error.line(), "a read key was issued without reaching the disk");
                Ok(())
            }
            result => result,
        }
    }

    /// Inserts a new project; [`Error::ProjectExists`] if the name is taken.
    async fn create_project(&self, record: &ProjectRecord) -> Result<(), Error> {
        let swapped = self
            .projects
            .compare_and_swap(record.name.as_bytes(), None as Option<&[u8]>, Some(json_to_vec(record)))
            .map_err(db_error)?;
        swapped.map_err(|_| Error::ProjectExists(record.name.clone()))?;
        self.totals.insert(record.name.as_bytes(), json_to_vec(&ProjectTotals::default())).map_err(db_error)?;
        Ok(())
    }

    async fn project(&self, name: &str) -> Result<Option<ProjectRecord>, Error> {
        match self.projects.get(name.as_bytes()).map_err(db_error)? {
            Some(bytes) => Ok(Some(json_from_slice("projects", &bytes)?)),
            None => Ok(None),
        }
    }

    /// Every project, sorted by name.
    async fn projects(&self) -> Result<Vec<ProjectRecord>, Error> {
        self.scan_projects()
    }

    /// Sets a project's byte quota (0: none).
    async fn set_quota(&self, project: &str, quota_bytes: u64) -> Result<ProjectRecord, Error> {
        let updated = self
            .projects
            .update_and_fetch(project.as_bytes(), |old| {
                let mut record: ProjectRecord = serde_json::from_slice(old?).ok()?;
                record.quota_bytes = quota_bytes;
                Some(json_to_vec(&record))
            })
            .map_err(db_error)?;
        match updated {
            Some(bytes) => json_from_slice("projects", &bytes),
            None => Err(Error::NoSuchProject(project.to_owned())),
        }
    }

    /// Replaces the project token (its hash); [`Error::NoSuchProject`] if there is no project.
    async fn set_project_token(&self, project: &str, sha256_hex: &str) -> Result<(), Error> {
        let updated = self
            .projects
            .fetch_and_update(project.as_bytes(), |old| {
                let mut record: ProjectRecord = serde_json::from_slice(old?).ok()?;
                record.token_sha256_hex = sha256_hex.to_owned();
                Some(json_to_vec(&record))
            })
            .map_err(db_error)?;
        updated.map(|_| ()).ok_or_else(|| Error::NoSuchProject(project.to_owned()))
    }

    /// Forgets what a flush leaves of a project: the record itself, its scoped tokens and its
    /// counters (its manifests, ledger and keys went with the flush).
    async fn remove_project(&self, project: &str) -> Result<(), Error> {
        self.remove_scoped_tokens(project, None).await?;
        for entry in self.counters.scan_prefix(project_prefix(project)) {
            let (key, _) = entry.map_err(db_error)?;
            self.counters.remove(key).map_err(db_error)?;
        }
        self.projects.remove(project.as_bytes()).map_err(db_error)?;
        self.totals.remove(project.as_bytes()).map_err(db_error)?;
        Ok(())
    }

    async fn insert_minted_key(&self, access_key_id: &str, record: &MintedKeyRecord) -> Result<(), Error> {
        self.minted_keys.insert(access_key_id.as_bytes(), json_to_vec(record)).map_err(db_error)?;
        Ok(())
    }

    async fn minted_key(&self, access_key_id: &str) -> Result<Option<MintedKeyRecord>, Error> {
        match self.minted_keys.get(access_key_id.as_bytes()).map_err(db_error)? {
            Some(bytes) => Ok(Some(json_from_slice("minted_keys", &bytes)?)),
            None => Ok(None),
        }
    }

    /// Forgets every key of `project` issued to `token_id` (empty: the project token), so the
    /// embedded endpoint admits none of them and nobody renews them; returns them.
    async fn revoke_keys(&self, project: &str, token_id: &str) -> Result<Vec<MintedKeyRecord>, Error> {
        let mut revoked = Vec::new();
        for entry in self.minted_keys.iter() {
            let (access_key_id, bytes) = entry.map_err(db_error)?;
            let record: MintedKeyRecord = json_from_slice("minted_keys", &bytes)?;
            if record.project == project && record.token_id == token_id {
                self.minted_keys.remove(access_key_id).map_err(db_error)?;
                revoked.push(record);
            }
        }
        Ok(revoked)
    }

    /// Forgets keys that expired before `now_unix`; returns how many.
    async fn remove_expired_keys(&self, now_unix: i64) -> Result<usize, Error> {
        let mut n_removed = 0;
        for entry in self.minted_keys.iter() {
            let (access_key_id, bytes) = entry.map_err(db_error)?;
            let record: MintedKeyRecord = json_from_slice("minted_keys", &bytes)?;
            if record.expires_unix < now_unix {
                self.minted_keys.remove(access_key_id).map_err(db_error)?;
                n_removed += 1;
            }
        }
        Ok(n_removed)
    }

    /// Projects whose post-flush sweep is due at `now_unix` ([`ledger::sweeps_due`]).
    async fn sweeps_due(&self, now_unix: i64) -> Result<Vec<(String, i64)>, Error> {
        Ok(ledger::sweeps_due(self.scan_projects()?, now_unix))
    }

    /// Marks a project's sweep done ([`ledger::sweep_done`]).
    async fn sweep_done(&self, project: &str, due_unix: i64) -> Result<(), Error> {
        self.projects
            .fetch_and_update(project.as_bytes(), |old| {
                let record: ProjectRecord = serde_json::from_slice(old?).ok()?;
                Some(json_to_vec(&ledger::sweep_done(&record, due_unix).unwrap_or(record)))
            })
            .map_err(db_error)?;
        Ok(())
    }

    async fn insert_scoped_token(&self, sha256_hex: &str, record: &ScopedTokenRecord) -> Result<(), Error> {
        self.scoped_tokens.insert(sha256_hex.as_bytes(), json_to_vec(record)).map_err(db_error)?;
        Ok(())
    }

    /// The scoped token whose SHA-256 is `sha256_hex`, if one is recorded.
    async fn scoped_token(&self, sha256_hex: &str) -> Result<Option<ScopedTokenRecord>, Error> {
        match self.scoped_tokens.get(sha256_hex.as_bytes()).map_err(db_error)? {
            Some(bytes) => Ok(Some(json_from_slice("scoped_tokens", &bytes)?)),
            None => Ok(None),
        }
    }

    /// A project's scoped tokens, by creation time.
    async fn scoped_tokens(&self, project: &str) -> Result<Vec<ScopedTokenRecord>, Error> {
        let mut records = Vec::new();
        for entry in self.scoped_tokens.iter() {
            let (_, bytes) = entry.map_err(db_error)?;
            let record: ScopedTokenRecord = json_from_slice("scoped_tokens", &bytes)?;
            if record.project == project {
                records.push(record);
            }
        }
        records.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        Ok(records)
    }

    /// Removes a project's scoped token by ID (every one, with `None`); returns the removed.
    async fn remove_scoped_tokens(&self, project: &str, id: Option<&str>) -> Result<Vec<ScopedTokenRecord>, Error> {
        let mut removed = Vec::new();
        for entry in self.scoped_tokens.iter() {
            let (key, bytes) = entry.map_err(db_error)?;
            let record: ScopedTokenRecord = json_from_slice("scoped_tokens", &bytes)?;
            if record.project == project && id.is_none_or(|id| id == record.id) {
                self.scoped_tokens.remove(key).map_err(db_error)?;
                removed.push(record);
            }
        }
        Ok(removed)
    }

    /// The manifest of one cache key, if any.
    async fn manifest(&self, project: &str, service: &str, branch: &str) -> Result<Option<pb::Manifest>, Error> {
        match self.manifests.get(composite_key(&[project, service, branch])).map_err(db_error)? {
            Some(bytes) => proto::v1::Manifest::decode(bytes.as_ref())
                .map(Some)
                .map_err(|error| Error::corrupt("manifests", error)),
            None => Ok(None),
        }
    }

    /// Every manifest of a project, sorted by service and branch.
    async fn manifests(&self, project: &str) -> Result<Vec<pb::Manifest>, Error> {
        self.scan_manifests(project)
    }

    /// Records that a manifest was used now ([`ledger::touched`]), unless another writer replaced it meanwhile.
    async fn touch_manifest(&self, project: &str, manifest: &pb::Manifest, now_unix: i64) -> Result<(), Error> {
        let Some(touched) = ledger::touched(manifest, now_unix) else { return Ok(()) };
        let key = manifest.key.clone().unwrap_or_default();
        let manifest_key = composite_key(&[project, &key.service, &key.branch]);
        let old = manifest.encode_to_vec();
        let touched = touched.encode_to_vec();
        // A lost race means a newer manifest is there: its own times are right.
        let _ = self.manifests.compare_and_swap(manifest_key, Some(old), Some(touched)).map_err(db_error)?;
        Ok(())
    }

    /// Makes `manifest` the manifest of its key, atomically with the ledger: the blobs it names
    /// gain a reference (new ones are recorded as `new_blobs` describes them), those of the
    /// manifest it replaces lose one. A key's manifest made by a save begun later than this one
    /// stays ([`Committed::KeptNewer`]). Refused with [`Error::SaveConflict`] when the project's
    /// generation is no longer `generation` (a flush happened since the save began).
    async fn commit_manifest(
        &self,
        project: &str,
        manifest: &pb::Manifest,
        generation: u64,
        new_blobs: &HashMap<String, BlobRecord>,
        now_unix: i64,
    ) -> Result<Committed, Error> {
        let key = manifest.key.clone().unwrap_or_default();
        let manifest_key = composite_key(&[project, &key.service, &key.branch]);
        let encoded = manifest.encode_to_vec();
        let trees = (&self.projects, &self.manifests, &self.blobs, &self.totals);
        let result = trees.transaction(|(projects, manifests, blobs, totals)| {
            let abort = |error: Error| ConflictableTransactionError::Abort(error);
            let record: ProjectRecord = match projects.get(project.as_bytes())? {
                Some(bytes) => json_from_slice("projects", &bytes).map_err(abort)?,
                None => return Err(abort(Error::NoSuchProject(project.to_owned()))),
            };
            let old = match manifests.get(manifest_key.as_slice())? {
                Some(bytes) => Some(
                    proto::v1::Manifest::decode(bytes.as_ref())
                        .map_err(|error| abort(Error::corrupt("manifests", error)))?,
                ),
                None => None,
            };
            let mut known = std::collections::HashMap::new();
            for digest in ledger::commit_digests(manifest, old.as_ref()) {
                if let Some(bytes) = blobs.get(composite_key(&[project, &digest]))? {
                    known.insert(digest, json_from_slice::<BlobRecord>("blobs", &bytes).map_err(abort)?);
                }
            }
            let view = ledger::CommitView { project: &record, old, known: &known };
            let (committed, change) = ledger::commit(view, manifest, generation, new_blobs, now_unix).map_err(abort)?;
            for (digest, blob) in &change.put_blobs {
                blobs.insert(composite_key(&[project, digest]), json_to_vec(blob))?;
            }
            if change.put_manifest.is_some() {
                manifests.insert(manifest_key.as_slice(), encoded.as_slice())?;
            }
            TotalsChange::of(&change).apply(totals, project)?;
            Ok(committed)
        });
        transacted(result)
    }

    /// Evicts one cache: its manifest goes and its blobs lose that reference, in one
    /// transaction. Returns the blobs left unreferenced, or `None` when there was no manifest.
    async fn remove_manifest(
        &self,
        project: &str,
        key: &pb::CacheKey,
        now_unix: i64,
    ) -> Result<Option<Vec<String>>, Error> {
        let manifest_key = composite_key(&[project, &key.service, &key.branch]);
        let result = (&self.manifests, &self.blobs, &self.totals).transaction(|(manifests, blobs, totals)| {
            let abort = |error: Error| ConflictableTransactionError::Abort(error);
            let Some(bytes) = manifests.get(manifest_key.as_slice())? else {
                return Ok(None);
            };
            let manifest = proto::v1::Manifest::decode(bytes.as_ref())
                .map_err(|error| abort(Error::corrupt("manifests", error)))?;
            let mut known = std::collections::HashMap::new();
            for digest in manifest_digests(&manifest) {
                if let Some(bytes) = blobs.get(composite_key(&[project, &digest]))? {
                    known.insert(digest, json_from_slice::<BlobRecord>("blobs", &bytes).map_err(abort)?);
                }
            }
            let (unreferenced, change) = ledger::evict(&manifest, &known, now_unix);
            manifests.remove(manifest_key.as_slice())?;
            for (digest, blob) in &change.put_blobs {
                blobs.insert(composite_key(&[project, digest]), json_to_vec(blob))?;
            }
            TotalsChange::of(&change).apply(totals, project)?;
            Ok(Some(unreferenced))
        });
        transacted(result)
    }

    /// A project's totals: what its ledger records, and how many manifests it has.
    async fn totals(&self, project: &str) -> Result<ProjectTotals, Error> {
        match self.totals.get(project.as_bytes()).map_err(db_error)? {
            Some(bytes) => json_from_slice("totals", &bytes),
            None => Ok(ProjectTotals::default()),
        }
    }

    /// Counters per service, for one project or (with `None`) every project.
    async fn service_counters(&self, project: Option<&str>) -> Result<Vec<(String, String, ServiceCounters)>, Error> {
        let entries = match project {
            Some(project) => self.counters.scan_prefix(project_prefix(project)),
            None => self.counters.iter(),
        };
        entries
            .map(|entry| {
                let (key, bytes) = entry.map_err(db_error)?;
                let key = String::from_utf8_lossy(&key).into_owned();
                let (project, service) = key.split_once('\0').unwrap_or((key.as_str(), ""));
                Ok((project.to_owned(), service.to_owned(), json_from_slice("counters", &bytes)?))
            })
            .collect()
    }

    /// Adds `change` to the counters of one service.
    async fn add_to_counters(&self, project: &str, service: &str, change: &ServiceCounters) -> Result<(), Error> {
        let key = composite_key(&[project, service]);
        self.counters
            .fetch_and_update(key, |old| {
                let mut counters: ServiceCounters =
                    old.and_then(|bytes| serde_json::from_slice(bytes).ok()).unwrap_or_default();
                counters.add(change);
                Some(json_to_vec(&counters))
            })
            .map_err(db_error)?;
        Ok(())
    }

    /// Flushes a project ([`ledger::flush`]): what it removes is scanned first (sled's
    /// transactions cannot scan; the caller holds the project's exclusive publish lock, so no
    /// commit interleaves), then the change set is applied in one transaction.
    async fn flush_project(&self, project: &str) -> Result<FlushedRecords, Error> {
        let prefix = project_prefix(project);
        let mut manifests = Vec::new();
        for key in self.manifests.scan_prefix(&prefix).keys() {
            let key = key.map_err(db_error)?;
            let key = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let (service, branch) = key.split_once('\0').unwrap_or((key.as_str(), ""));
            manifests.push(pb::CacheKey { service: service.to_owned(), branch: branch.to_owned() });
        }
        let blobs: Vec<String> = self.scan_ledger_digests(project)?.into_iter().collect();
        let mut keys = Vec::new();
        for entry in self.minted_keys.iter() {
            let (access_key_id, bytes) = entry.map_err(db_error)?;
            let record: MintedKeyRecord = json_from_slice("minted_keys", &bytes)?;
            if record.project == project {
                keys.push((String::from_utf8_lossy(&access_key_id).into_owned(), record));
            }
        }
        let trees = (&self.projects, &self.manifests, &self.blobs, &self.totals, &self.minted_keys);
        let result = trees.transaction(|(projects, manifests_tree, blobs_tree, totals, minted_keys)| {
            let abort = |error: Error| ConflictableTransactionError::Abort(error);
            let record: ProjectRecord = match projects.get(project.as_bytes())? {
                Some(bytes) => json_from_slice("projects", &bytes).map_err(abort)?,
                None => return Err(abort(Error::NoSuchProject(project.to_owned()))),
            };
            let view = ledger::FlushView {
                project: &record,
                manifests: manifests.clone(),
                blobs: blobs.clone(),
                keys: keys.clone(),
            };
            let (flushed, change) = ledger::flush(view);
            if let Some(record) = &change.put_project {
                projects.insert(project.as_bytes(), json_to_vec(record))?;
            }
            for key in &change.remove_manifests {
                manifests_tree.remove(composite_key(&[project, &key.service, &key.branch]))?;
            }
            for digest in &change.remove_blobs {
                blobs_tree.remove(composite_key(&[project, digest]))?;
            }
            for access_key_id in &change.remove_keys {
                minted_keys.remove(access_key_id.as_bytes())?;
            }
            if change.reset_totals {
                totals.insert(project.as_bytes(), json_to_vec(&ProjectTotals::default()))?;
            }
            TotalsChange::of(&change).apply(totals, project)?;
            Ok(flushed)
        });
        transacted(result)
    }

    /// The ledger's records of those of `digests` the project's store holds.
    async fn stored_blobs(&self, project: &str, digests: &[String]) -> Result<HashMap<String, BlobRecord>, Error> {
        let mut records = std::collections::HashMap::new();
        for digest in digests {
            if let Some(bytes) = self.blobs.get(composite_key(&[project, digest])).map_err(db_error)? {
                records.insert(digest.clone(), json_from_slice("blobs", &bytes)?);
            }
        }
        Ok(records)
    }

    /// Every digest the project's ledger records (referenced or not).
    async fn ledger_digests(&self, project: &str) -> Result<HashSet<String>, Error> {
        self.scan_ledger_digests(project)
    }

    /// Forgets a blob the store lost or holds corrupted: every manifest of the project naming it
    /// goes (its other blobs lose that reference), then the blob's record, so the next save
    /// uploads it again and no manifest names it meanwhile. Returns the manifests removed. The
    /// caller holds the project's publish lock, so no commit interleaves.
    async fn drop_blob(&self, project: &str, digest: &str, now_unix: i64) -> Result<u64, Error> {
        let mut naming = Vec::new();
        for entry in self.manifests.scan_prefix(project_prefix(project)) {
            let (_, bytes) = entry.map_err(db_error)?;
            let manifest =
                proto::v1::Manifest::decode(bytes.as_ref()).map_err(|error| Error::corrupt("manifests", error))?;
            if manifest_digests(&manifest).contains(digest) {
                naming.push(manifest);
            }
        }
        let digests = ledger::drop_digests(&naming, digest);
        let result = (&self.manifests, &self.blobs, &self.totals).transaction(|(manifests, blobs, totals)| {
            let mut known = std::collections::HashMap::new();
            for named in &digests {
                if let Some(bytes) = blobs.get(composite_key(&[project, named]))? {
                    let record =
                        json_from_slice::<BlobRecord>("blobs", &bytes).map_err(ConflictableTransactionError::Abort)?;
                    known.insert(named.clone(), record);
                }
            }
            let change = ledger::drop_blob(&naming, &known, digest, now_unix);
            for key in &change.remove_manifests {
                manifests.remove(composite_key(&[project, &key.service, &key.branch]))?;
            }
            for (named, blob) in &change.put_blobs {
                blobs.insert(composite_key(&[project, named]), json_to_vec(blob))?;
            }
            for named in &change.remove_blobs {
                blobs.remove(composite_key(&[project, named]))?;
            }
            TotalsChange::of(&change).apply(totals, project)?;
            Ok(naming.len() as u64)
        });
        transacted(result)
    }

    /// The project's blobs no manifest names, with their records ([`ledger::unreferenced`]);
    /// the grace of those that have none yet starts in one batch.
    async fn unreferenced_blobs(&self, project: &str, now_unix: i64) -> Result<Vec<(String, BlobRecord)>, Error> {
        let prefix = project_prefix(project);
        let mut records = Vec::new();
        for entry in self.blobs.scan_prefix(&prefix) {
            let (key, bytes) = entry.map_err(db_error)?;
            let record: BlobRecord = json_from_slice("blobs", &bytes)?;
            records.push((String::from_utf8_lossy(&key[prefix.len()..]).into_owned(), record));
        }
        let (unreferenced, change) = ledger::unreferenced(records, now_unix);
        let mut batch = sled::Batch::default();
        for (digest, blob) in &change.put_blobs {
            batch.insert(composite_key(&[project, digest]), json_to_vec(blob));
        }
        self.blobs.apply_batch(batch).map_err(db_error)?;
        Ok(unreferenced)
    }

    /// Forgets the blobs of `digests` that still have no reference ([`ledger::forget_unreferenced`]),
    /// in one transaction; returns those forgotten.
    async fn forget_unreferenced(&self, project: &str, digests: &[String]) -> Result<Vec<(String, BlobRecord)>, Error> {
        let result = (&self.blobs, &self.totals).transaction(|(blobs, totals)| {
            let mut known = HashMap::new();
            for digest in digests {
                if let Some(bytes) = blobs.get(composite_key(&[project, digest]))? {
                    let record =
                        json_from_slice::<BlobRecord>("blobs", &bytes).map_err(ConflictableTransactionError::Abort)?;
                    known.insert(digest.clone(), record);
                }
            }
            let (forgotten, change) = ledger::forget_unreferenced(&known, digests);
            for digest in &change.remove_blobs {
                blobs.remove(composite_key(&[project, digest]))?;
            }
            TotalsChange::of(&change).apply(totals, project)?;
            Ok(forgotten)
        });
        transacted(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(name: &str) -> ProjectRecord {
        ProjectRecord {
            name: name.to_owned(),
            token_sha256_hex: "00".repeat(32),
            created_unix: 1,
            generation: 0,
            quota_bytes: 0,
            sweep_after_unix: 0,
        }
    }

    /// Opens a database the same process just dropped: sled's flusher thread may hold the
    /// directory's lock for a moment after the drop (CI saw `DataDirLocked` once).
    fn reopen(dir: &Path) -> Database {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Database::open(dir) {
                Err(Error::DataDirLocked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                opened => return opened.unwrap(),
            }
        }
    }

    #[tokio::test]
    async fn projects_are_unique_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::open(dir.path()).unwrap();
            db.create_project(&project("web")).await.unwrap();
            assert!(
                matches!(db.create_project(&project("web")).await, Err(Error::ProjectExists(name)) if name == "web")
            );
            db.db.flush().unwrap();
        }
        let db = reopen(dir.path());
        assert_eq!(db.projects().await.unwrap(), vec![project("web")]);
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Database::open(dir.path()).unwrap();
        assert!(matches!(Database::open(dir.path()), Err(Error::DataDirLocked(_))));
    }

    #[tokio::test]
    async fn flush_removes_only_that_projects_records_and_bumps_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path()).unwrap();
        db.create_project(&project("a")).await.unwrap();
        db.create_project(&project("ab")).await.unwrap();
        let manifest = proto::v1::Manifest::default().encode_to_vec();
        let blob = json_to_vec(&BlobRecord { stored_size: 5, references: 1, ..Default::default() });
        for name in ["a", "ab"] {
            db.manifests.insert(composite_key(&[name, "web", ""]), manifest.clone()).unwrap();
            db.blobs.insert(composite_key(&[name, "sha256:00"]), blob.clone()).unwrap();
        }
        assert_eq!(db.flush_project("a").await.unwrap(), FlushedRecords { manifests_removed: 1, generation: 1 });
        assert_eq!(db.flush_project("a").await.unwrap(), FlushedRecords { manifests_removed: 0, generation: 2 });
        assert_eq!(db.manifests("a").await.unwrap().len(), 0);
        assert_eq!(db.manifests("ab").await.unwrap().len(), 1);
        // Written behind the totals' back here: counted the slow way.
        assert_eq!((scanned_totals(&db, "ab").await.blobs, scanned_totals(&db, "ab").await.stored_bytes), (1, 5));
        assert_eq!(db.totals("a").await.unwrap(), ProjectTotals::default());
        assert!(matches!(db.flush_project("nope").await, Err(Error::NoSuchProject(_))));
    }

    fn manifest_with(service: &str, digests: &[&str]) -> proto::v1::Manifest {
        proto::v1::Manifest {
            key: Some(proto::v1::CacheKey { service: service.into(), branch: String::new() }),
            images: vec![proto::v1::Image {
                id: digests[0].into(),
                layers: digests[1..]
                    .iter()
                    .map(|digest| proto::v1::Layer { digest: (*digest).into(), ..Default::default() })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Project `a` with caches `web` (c1, l1, l2) and `api` (c2, l1), every blob of 1 byte.
    async fn web_and_api_sharing_l1() -> (tempfile::TempDir, Database, std::collections::HashMap<String, BlobRecord>) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path()).unwrap();
        db.create_project(&project("a")).await.unwrap();
        let sizes: std::collections::HashMap<String, BlobRecord> = ["c1", "l1", "l2", "c2"]
            .iter()
            .map(|d| (d.to_string(), BlobRecord { stored_size: 1, size: 1, ..Default::default() }))
            .collect();
        db.commit_manifest("a", &manifest_with("web", &["c1", "l1", "l2"]), 0, &sizes, 400).await.unwrap();
        db.commit_manifest("a", &manifest_with("api", &["c2", "l1"]), 0, &sizes, 400).await.unwrap();
        (dir, db, sizes)
    }

    #[tokio::test]
    async fn a_lost_blob_takes_the_manifests_naming_it_with_it() {
        let (_dir, db, sizes) = web_and_api_sharing_l1().await;
        db.commit_manifest("a", &manifest_with("ops", &["c2"]), 0, &sizes, 400).await.unwrap();
        assert_eq!(db.drop_blob("a", "l1", 800).await.unwrap(), 2, "web and api named it");
        let services: Vec<String> =
            db.manifests("a").await.unwrap().iter().map(|m| m.key.clone().unwrap().service).collect();
        assert_eq!(services, ["ops"]);
        let known = db.stored_blobs("a", &["c1", "l1", "l2", "c2"].map(String::from)).await.unwrap();
        assert!(!known.contains_key("l1"), "the lost blob is forgotten, so a save uploads it again");
        assert_eq!((known["c1"].references, known["l2"].references, known["c2"].references), (0, 0, 1));
    }

    #[tokio::test]
    async fn an_evicted_cache_leaves_only_the_blobs_no_other_names_unreferenced() {
        let (_dir, db, _) = web_and_api_sharing_l1().await;
        let web = proto::v1::CacheKey { service: "web".into(), branch: String::new() };
        let mut left = db.remove_manifest("a", &web, 800).await.unwrap().expect("web had a manifest");
        left.sort();
        assert_eq!(left, ["c1", "l2"], "l1 is still api's");
        assert_eq!(db.remove_manifest("a", &web, 800).await.unwrap(), None, "evicting twice is a no-op");
        assert!(db.manifest("a", "web", "").await.unwrap().is_none());
        let unreferenced: Vec<String> =
            db.unreferenced_blobs("a", 1).await.unwrap().into_iter().map(|(d, _)| d).collect();
        assert_eq!(unreferenced, ["c1", "l2"]);
        assert_eq!(db.set_quota("a", 10 << 20).await.unwrap().quota_bytes, 10 << 20);
        assert_eq!(db.project("a").await.unwrap().unwrap().quota_bytes, 10 << 20);
        assert!(matches!(db.set_quota("b", 1).await, Err(Error::NoSuchProject(_))));
    }

    /// A project's totals counted the slow way, to check the kept ones against.
    async fn scanned_totals(db: &Database, project: &str) -> ProjectTotals {
        let mut totals =
            ProjectTotals { manifests: db.manifests(project).await.unwrap().len() as u64, ..Default::default() };
        for entry in db.blobs.scan_prefix(project_prefix(project)) {
            let record: BlobRecord = json_from_slice("blobs", &entry.unwrap().1).unwrap();
            totals.blobs += 1;
            totals.stored_bytes += record.stored_size;
        }
        totals
    }

    /// Checks both projects' kept totals against a count, after `step`.
    async fn check(db: &Database, step: &str) {
        for project in ["a", "b"] {
            assert_eq!(db.totals(project).await.unwrap(), scanned_totals(db, project).await, "{project} after {step}");
        }
    }

    #[tokio::test]
    async fn kept_totals_match_a_count_after_every_kind_of_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path()).unwrap();
        db.create_project(&project("a")).await.unwrap();
        db.create_project(&project("b")).await.unwrap();
        let sizes: std::collections::HashMap<String, BlobRecord> = [("c1", 1), ("l1", 10), ("l2", 20), ("c2", 2)]
            .iter()
            .map(|(d, s)| (d.to_string(), BlobRecord { stored_size: *s, size: *s, ..Default::default() }))
            .collect();
        check(&db, "creation").await;
        db.commit_manifest("a", &manifest_with("web", &["c1", "l1", "l2"]), 0, &sizes, 400).await.unwrap();
        db.commit_manifest("a", &manifest_with("api", &["c2", "l1"]), 0, &sizes, 400).await.unwrap();
        db.commit_manifest("b", &manifest_with("web", &["c1"]), 0, &sizes, 400).await.unwrap();
        check(&db, "commits").await;
        db.commit_manifest("a", &manifest_with("web", &["c2", "l1"]), 0, &sizes, 400).await.unwrap();
        check(&db, "a replacing commit").await;
        let forgotten = db.forget_unreferenced("a", &["c1".into(), "l2".into(), "l1".into()]).await.unwrap();
        assert_eq!(forgotten.len(), 2, "l1 is named");
        check(&db, "forgetting").await;
        db.remove_manifest("a", &proto::v1::CacheKey { service: "api".into(), branch: String::new() }, 800)
            .await
            .unwrap();
        check(&db, "an eviction").await;
        db.drop_blob("a", "l1", 800).await.unwrap();
        check(&db, "a lost blob").await;
        db.flush_project("a").await.unwrap();
        check(&db, "a flush").await;
        assert_eq!(db.totals("b").await.unwrap(), ProjectTotals { blobs: 1, stored_bytes: 1, manifests: 1 });
        // A data directory from before totals were kept gets them counted once at open.
        db.totals.clear().unwrap();
        drop(db);
        let db = reopen(dir.path());
        assert_eq!(db.totals("b").await.unwrap(), ProjectTotals { blobs: 1, stored_bytes: 1, manifests: 1 });
    }

    #[tokio::test]
    async fn commits_count_references_and_refuse_after_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path()).unwrap();
        db.create_project(&project("a")).await.unwrap();
        let sizes: std::collections::HashMap<String, BlobRecord> = [("c1", 1), ("l1", 10), ("l2", 20), ("c2", 2)]
            .iter()
            .map(|(d, s)| (d.to_string(), BlobRecord { stored_size: *s, size: *s, ..Default::default() }))
            .collect();
        db.commit_manifest("a", &manifest_with("web", &["c1", "l1", "l2"]), 0, &sizes, 400).await.unwrap();
        db.commit_manifest("a", &manifest_with("api", &["c2", "l1"]), 0, &sizes, 400).await.unwrap();
        let references = |digest: &str| {
            let bytes = db.blobs.get(composite_key(&["a", digest])).unwrap().unwrap();
            json_from_slice::<BlobRecord>("blobs", &bytes).unwrap().references
        };
        assert_eq!(references("l1"), 2);
        assert_eq!(db.totals("a").await.unwrap(), ProjectTotals { blobs: 4, stored_bytes: 33, manifests: 2 });
        // Replacing web's manifest drops its old blobs' references, keeps the shared one.
        db.commit_manifest("a", &manifest_with("web", &["c2", "l1"]), 0, &sizes, 400).await.unwrap();
        assert_eq!((references("c1"), references("l2"), references("l1"), references("c2")), (0, 0, 2, 2));
        assert_eq!(db.stored_blobs("a", &["l2".to_string(), "zz".to_string()]).await.unwrap().len(), 1);
        db.flush_project("a").await.unwrap();
        let stale = db.commit_manifest("a", &manifest_with("web", &["c1"]), 0, &sizes, 400).await;
        assert!(matches!(stale, Err(Error::SaveConflict(_))), "{stale:?}");
        assert!(db.manifests("a").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_manifest_never_goes_back_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path()).unwrap();
        db.create_project(&project("a")).await.unwrap();
        let sizes: std::collections::HashMap<String, BlobRecord> = [("c1", 1), ("c2", 2), ("c3", 3)]
            .iter()
            .map(|(d, s)| (d.to_string(), BlobRecord { stored_size: *s, size: *s, ..Default::default() }))
            .collect();
        let began = |digest: &str, began_unix_ms: i64| proto::v1::Manifest {
            origin: Some(proto::v1::SaveOrigin {
                save_id: format!("save-{began_unix_ms}"),
                began_unix_ms,
                ..Default::default()
            }),
            ..manifest_with("web", &[digest])
        };
        assert_eq!(
            db.commit_manifest("a", &began("c2", 200), 0, &sizes, 400).await.unwrap(),
            Committed::Stored { replaced: None }
        );
        // A save begun earlier that commits later keeps the newer manifest; its blob is
        // recorded without a reference.
        let kept = db.commit_manifest("a", &began("c1", 100), 0, &sizes, 400).await.unwrap();
        assert_eq!(kept, Committed::KeptNewer(began("c2", 200)));
        assert_eq!(db.manifest("a", "web", "").await.unwrap(), Some(began("c2", 200)));
        assert_eq!(db.stored_blobs("a", &["c1".to_string()]).await.unwrap()["c1"].references, 0);
        let Committed::Stored { replaced: Some(replaced) } =
            db.commit_manifest("a", &began("c3", 300), 0, &sizes, 400).await.unwrap()
        else {
            panic!("a later save replaces the manifest");
        };
        assert_eq!(replaced.save_id, "save-200");
        assert_eq!(db.stored_blobs("a", &["c2".to_string()]).await.unwrap()["c2"].references, 0);
    }

    #[tokio::test]
    async fn flush_revokes_the_projects_storage_keys() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path()).unwrap();
        db.create_project(&project("a")).await.unwrap();
        let record = |project: &str| MintedKeyRecord {
            project: project.into(),
            access: KeyAccess::Write,
            expires_unix: 1,
            token_id: String::new(),
        };
        db.insert_minted_key("KA", &record("a")).await.unwrap();
        db.insert_minted_key("KA2", &MintedKeyRecord { expires_unix: 50, ..record("a") }).await.unwrap();
        db.insert_minted_key("KB", &record("b")).await.unwrap();
        db.flush_project("a").await.unwrap();
        assert_eq!(db.minted_key("KA").await.unwrap(), None);
        assert_eq!(db.minted_key("KB").await.unwrap(), Some(record("b")));
        // The store is swept once the last revoked key has expired.
        assert!(db.sweeps_due(49).await.unwrap().is_empty());
        assert_eq!(db.sweeps_due(50).await.unwrap(), vec![("a".to_string(), 50)]);
        db.sweep_done("a", 50).await.unwrap();
        assert!(db.sweeps_due(1000).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn durable_writes_survive_a_crash() {
        // A child process writes, waits for durability, says so, then dies without a flush.
        let dir = tempfile::tempdir().unwrap();
        if let Some(path) = std::env::var_os("LAYER_CACHE_DURABILITY_CHILD") {
            let db = Database::open(std::path::Path::new(&path)).unwrap();
            db.create_project(&project("web")).await.unwrap();
            db.durable().await.unwrap();
            println!("durable");
            std::process::abort();
        }
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "state::sled::tests::durable_writes_survive_a_crash", "--nocapture"])
            .env("LAYER_CACHE_DURABILITY_CHILD", dir.path())
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&output.stdout).contains("durable"), "{output:?}");
        assert!(!output.status.success(), "the child dies without a clean shutdown");
        let db = Database::open(dir.path()).unwrap();
        assert_eq!(db.projects().await.unwrap(), vec![project("web")]);
    }

    #[tokio::test]
    async fn expired_keys_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path()).unwrap();
        let record = |expires_unix| MintedKeyRecord {
            project: "a".into(),
            access: KeyAccess::Read,
            expires_unix,
            token_id: String::new(),
        };
        db.insert_minted_key("OLD", &record(10)).await.unwrap();
        db.insert_minted_key("NEW", &record(30)).await.unwrap();
        assert_eq!(db.remove_expired_keys(20).await.unwrap(), 1);
        assert_eq!(db.minted_key("OLD").await.unwrap(), None);
        assert_eq!(db.minted_key("NEW").await.unwrap(), Some(record(30)));
    }
}
