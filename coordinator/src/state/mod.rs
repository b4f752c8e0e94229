//! The coordinator's state behind one seam: the record types, and the [`State`] trait shaped
//! around the cache's operations (projects and tokens, minted keys, manifests with the ledger,
//! counters, flush), with [`Ephemeral`] beneath it for what lives only as long as a transfer
//! (open saves with their single-flight claims, transfer leases). `sled.rs` is the
//! single-machine implementation (the default, its ephemeral records in memory); `postgres.rs`
//! the one replicas share, every record in the database.

use std::collections::{BTreeSet, HashMap, HashSet};

use proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::error::Error;

pub mod ledger;
mod memory;
pub mod postgres;
pub mod sled;
#[cfg(test)]
mod suite;

pub use self::memory::InMemory;
pub use self::sled::Database;

/// The token a worker's step is called with, checked inside the step (the state's own
/// transaction on a shared database): a token revoked or rotated away meanwhile, through any
/// replica, begins, commits and looks up nothing, even where the service reuses a recent check
/// of it (see `service/principals.rs`).
#[derive(Debug, Clone, Copy)]
pub struct Holder<'a> {
    /// The SHA-256 of the token presented.
    pub token_sha256_hex: &'a str,
    /// Its scoped token's ID; empty for the project token.
    pub token_id: &'a str,
}

impl Holder<'_> {
    /// Whether the token is still one of `project`'s: the project token now, or the scoped
    /// token recorded under its hash (`scoped`) still there.
    pub fn is_live(&self, project: &ProjectRecord, scoped: Option<&ScopedTokenRecord>) -> bool {
        if self.token_id.is_empty() {
            return crate::tokens::token_matches_hash(self.token_sha256_hex, &project.token_sha256_hex);
        }
        scoped.is_some_and(|scoped| scoped.project == project.name && scoped.id == self.token_id)
    }
}

/// The refusal of a token no longer live.
pub(crate) fn revoked() -> Error {
    Error::Unauthenticated("unknown or revoked project token")
}

/// A tenant. The token is kept only as its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectRecord {
    pub name: String,
    pub token_sha256_hex: String,
    pub created_unix: i64,
    /// Bumped by every flush, so a save begun before a flush cannot commit after it.
    pub generation: u64,
    /// 0 means no quota.
    pub quota_bytes: u64,
    /// After a flush: when the last storage key issued before it expires (unix seconds). Then
    /// the project's store is swept once of objects no manifest names, which a save begun
    /// before the flush may still have written with a key nobody can revoke (an STS session).
    /// 0: no sweep due.
    #[serde(default)]
    pub sweep_after_unix: i64,
}

/// What a minted storage key may do; the secret and session token are derived, never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyAccess {
    Read,
    Write,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintedKeyRecord {
    pub project: String,
    pub access: KeyAccess,
    pub expires_unix: i64,
    /// The scoped token it was issued to; empty: the project token. Revoking the token (or
    /// rotating the project token) revokes its keys.
    #[serde(default)]
    pub token_id: String,
}

/// A token scoped to branches (`cachectl token create`), kept under the SHA-256 of the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopedTokenRecord {
    /// `tok_` and 16 hex digits: how operators name it (`cachectl token ls / revoke`).
    pub id: String,
    pub project: String,
    pub scope: crate::tokens::BranchScope,
    pub created_unix: i64,
    /// 0: it does not expire.
    pub expires_unix: i64,
}

/// One blob of a project's store, as the ledger knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    pub stored_size: u64,
    /// How many manifests of the project name this blob.
    pub references: u64,
    /// Uncompressed size (equals `stored_size` when `encoding` is empty).
    #[serde(default)]
    pub size: u64,
    /// "" for a plain blob, "gzip" or "zstd" for a compressed one.
    #[serde(default)]
    pub encoding: String,
    /// sha256 of the stored bytes when they differ from the blob's digest.
    #[serde(default)]
    pub stored_digest: String,
    /// When its last reference went (unix seconds), while it has none; 0 while it has some,
    /// and in records from before garbage collection (a collection then starts its grace).
    #[serde(default)]
    pub unreferenced_since_unix: i64,
}

impl BlobRecord {
    /// The record of a blob stored as the bytes of its digest, `size` bytes, not yet referenced.
    pub(crate) fn plain(size: u64) -> BlobRecord {
        BlobRecord { stored_size: size, size, ..Default::default() }
    }

    /// Adds one reference.
    pub(crate) fn referenced(mut self) -> BlobRecord {
        self.references += 1;
        self.unreferenced_since_unix = 0;
        self
    }

    /// Drops one reference, noting when the last went.
    pub(crate) fn unreferenced(mut self, now_unix: i64) -> BlobRecord {
        self.references = self.references.saturating_sub(1);
        if self.references == 0 && self.unreferenced_since_unix == 0 {
            self.unreferenced_since_unix = now_unix;
        }
        self
    }
}

/// What a project's ledger and manifests add up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectTotals {
    /// Blobs the ledger records, referenced or not, and their stored bytes.
    pub blobs: u64,
    pub stored_bytes: u64,
    pub manifests: u64,
}

/// Counters of one service of one project, fed by the workers' metric reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCounters {
    pub restores_hit: u64,
    pub restores_partial: u64,
    pub restores_miss: u64,
    pub restores_error: u64,
    pub saves: u64,
    pub layers_found: u64,
    pub layers_transferred: u64,
    pub bytes_found: u64,
    pub bytes_transferred: u64,
    /// Build steps of saved images the build reused, and rebuilt.
    #[serde(default)]
    pub steps_reused: u64,
    #[serde(default)]
    pub steps_rebuilt: u64,
}

impl ServiceCounters {
    /// Adds `change` to these counters; each stops at `u64::MAX` rather than wrap.
    pub fn add(&mut self, change: &ServiceCounters) {
        self.restores_hit = self.restores_hit.saturating_add(change.restores_hit);
        self.restores_partial = self.restores_partial.saturating_add(change.restores_partial);
        self.restores_miss = self.restores_miss.saturating_add(change.restores_miss);
        self.restores_error = self.restores_error.saturating_add(change.restores_error);
        self.saves = self.saves.saturating_add(change.saves);
        self.layers_found = self.layers_found.saturating_add(change.layers_found);
        self.layers_transferred = self.layers_transferred.saturating_add(change.layers_transferred);
        self.bytes_found = self.bytes_found.saturating_add(change.bytes_found);
        self.bytes_transferred = self.bytes_transferred.saturating_add(change.bytes_transferred);
        self.steps_reused = self.steps_reused.saturating_add(change.steps_reused);
        self.steps_rebuilt = self.steps_rebuilt.saturating_add(change.steps_rebuilt);
    }
}

/// What a commit did to its cache key.
#[derive(Debug, Clone, PartialEq)]
pub enum Committed {
    /// The manifest is the key's now; it replaced the manifest of this save, if any.
    Stored { replaced: Option<proto::v1::SaveOrigin> },
    /// The key's manifest came from a save begun later, so it stays (a manifest never goes
    /// back in time); the commit's new blobs are recorded, unreferenced.
    KeptNewer(proto::v1::Manifest),
}

/// Which of two saves of one key began later: by the coordinator's clock, then by save ID.
pub(crate) fn began_later(a: Option<&proto::v1::SaveOrigin>, b: Option<&proto::v1::SaveOrigin>) -> bool {
    let order = |origin: Option<&proto::v1::SaveOrigin>| origin.map(|o| (o.began_unix_ms, o.save_id.clone()));
    order(a) > order(b)
}

/// What a flush removed from the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushedRecords {
    pub manifests_removed: u64,
    pub generation: u64,
}

/// Every blob digest a manifest names (configs and layers), each once.
pub fn manifest_digests(manifest: &proto::v1::Manifest) -> std::collections::BTreeSet<String> {
    let mut digests = std::collections::BTreeSet::new();
    for image in &manifest.images {
        digests.insert(image.id.clone());
        digests.extend(image.layers.iter().map(|layer| layer.digest.clone()));
        digests.extend(image.oci_blobs.iter().map(|blob| blob.digest.clone()));
    }
    digests
}

/// A save between `BeginSave` and `CommitSave` (see `saves.rs`). Times are unix milliseconds
/// of the caller's clock, passed in with each operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSave {
    pub project: String,
    /// The scoped token that began it; empty: the project token. Its claims hold up only saves
    /// of the same token, and its allowances are that token's.
    #[serde(default)]
    pub token_id: String,
    pub service: String,
    pub branch: String,
    pub generation: u64,
    pub image_ids: Vec<String>,
    pub engine_version: String,
    pub began_unix_ms: i64,
    pub host: String,
    /// The worker's last sign of life (its begin or a `KeepSaveAlive`): its claims lapse a
    /// claim lifetime after it.
    pub last_alive_unix_ms: i64,
    /// The missing blobs this save uploads; no other save of the project uploads them meanwhile.
    pub claimed: BTreeSet<String>,
    /// Every blob its images name: none is collected as garbage while the save is open.
    pub named: BTreeSet<String>,
    /// Its worker fell silent for the claim lifetime and its budget share was given back.
    pub silence_noted: bool,
    /// It holds a share of the transfer budget (it had blobs to move), which its commit gives back.
    #[serde(default)]
    pub leased: bool,
}

/// Open saves by save ID.
pub type OpenSaves = HashMap<String, OpenSave>;

/// What a transfer lease is for: a save's share follows the budget while it runs, a restore's is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseKind {
    Save,
    Restore,
}

/// A share of the global transfer budget (see `budget.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub project: String,
    pub kind: LeaseKind,
    /// A restore's grant, fixed for its life (0 for a save).
    #[serde(default)]
    pub fixed: u32,
    /// The requests it may have in flight now: a restore's fixed grant, a save's part of its
    /// project's fair share. Derived from the other leases, so never stored: a change of one
    /// lease rewrites that lease alone.
    #[serde(skip)]
    pub concurrency: u32,
    /// Its place in the order of grants (older first), as the shares and the restores' bound
    /// count it: one more than any lease held at its grant.
    pub order: u64,
    /// Its grant, or the save's last keep-alive.
    pub renewed_unix_ms: i64,
    /// A restore's: the blobs of the manifest it reads, which no eviction or collection
    /// deletes while the lease lives. Kept apart from the rest on PostgreSQL: a change of
    /// leases never reads it, only [`Ephemeral::read_leases`] of one project does.
    #[serde(default)]
    pub reads: BTreeSet<String>,
    /// The token that began the save or looked the restore up (its scoped token's ID; empty
    /// for the project token). A project's save share is split between tokens first, and the
    /// bound on its restores counts each token's own, so lookups with another token never end
    /// this lease, nor the protection of what it reads.
    #[serde(default)]
    pub holder: String,
}

/// Transfer leases by lease ID.
pub type Leases = HashMap<String, Lease>;

/// A project's demand on the transfer budget, as the last change of its leases left it: what
/// every other project's change reads of it (see `budget.rs`), so no change reads, or waits
/// for, another project's leases.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseDemand {
    /// Requests in flight its leases ask for.
    pub demand: u32,
    /// When its last lease lapses (unix milliseconds): from then on it counts 0.
    pub lapses_unix_ms: i64,
}

/// Projects' demands by project.
pub type LeaseDemands = HashMap<String, LeaseDemand>;

/// What lives only as long as a transfer: open saves (with their claims) and transfer leases.
/// Each `update_` runs its `change` atomically with respect to every other replica's: the rules
/// (claims, fair shares) live in `saves.rs` and `budget.rs`, which see one consistent map.
#[async_trait::async_trait]
pub trait Ephemeral: Send + Sync {
    /// Runs `change` on at least `project`'s open saves (it must change no other's). Changes of
    /// one project's run one at a time across replicas; of different projects', never wait
    /// for each other.
    async fn update_open_saves(
        &self,
        project: &str,
        change: &mut (dyn for<'a> FnMut(&'a mut OpenSaves) + Send),
    ) -> Result<(), Error>;
    /// Lets `read` see at least `project`'s open saves as they are now; with `None`, every
    /// project's (a snapshot, taking no lock: each project's may change meanwhile).
    async fn read_open_saves(
        &self,
        project: Option<&str>,
        read: &mut (dyn for<'a> FnMut(&'a OpenSaves) + Send),
    ) -> Result<(), Error>;
    /// Runs `change` on `project`'s transfer leases (`reads` left empty, and kept as they are
    /// for the leases it keeps), beside every project's demand as its last change left it (a
    /// snapshot: another project's may change meanwhile); `change` answers `project`'s demand
    /// now, which is recorded with its leases. Changes of one project's leases run one at a
    /// time across replicas; changes of different projects never wait for each other.
    async fn update_leases(
        &self,
        project: &str,
        change: &mut (dyn for<'a> FnMut(&'a mut Leases, &'a LeaseDemands) -> LeaseDemand + Send),
    ) -> Result<(), Error>;
    /// Lets `read` see the transfer leases as they are now: with a project, that project's,
    /// with what their restores read; with `None`, every project's, `reads` left empty.
    async fn read_leases(
        &self,
        project: Option<&str>,
        read: &mut (dyn for<'a> FnMut(&'a Leases) + Send),
    ) -> Result<(), Error>;
}

/// What a begin registers inside its step (see [`State::begin_save`]).
pub type BeginRegister<'c> = dyn for<'a> FnMut(
        &'a ProjectRecord,
        &'a HashMap<String, BlobRecord>,
        &'a [pb::Manifest],
        &'a mut OpenSaves,
    ) -> Result<(), Error>
    + Send
    + 'c;

/// What a lookup that finds a manifest grants inside its step (see [`State::look_up`]).
pub type LookupGrant<'c> =
    dyn for<'a> FnMut(&'a pb::Manifest, &'a mut Leases, &'a LeaseDemands) -> LeaseDemand + Send + 'c;

/// What a commit of known blobs checks inside its step (see [`State::commit_known`]).
pub type CommitCheck<'c> =
    dyn for<'a> FnMut(&'a ProjectRecord, &'a HashMap<String, BlobRecord>) -> Result<bool, Error> + Send + 'c;

/// The coordinator's durable state, as the cache's operations use it. Every method is one
/// atomic step of the protocol its caller follows (see ARCHITECTURE.md's invariants); an
/// implementation shared by several replicas must keep each atomic across them.
#[async_trait::async_trait]
pub trait State: Ephemeral {
    /// Holds `project`'s publish lock across replicas until the returned guard drops: shared
    /// by saves (begin, commit) and lookups, exclusive for flushes, evictions and collections
    /// (see ARCHITECTURE.md's invariants). `None`: this implementation serves one process,
    /// whose own lock suffices.
    async fn project_lock(&self, project: &str, exclusive: bool) -> Result<Option<Box<dyn Send + Sync>>, Error> {
        let _ = (project, exclusive);
        Ok(None)
    }
    /// Takes the lead of the background work (collections, post-flush sweeps, expired keys)
    /// across replicas, until the returned guard drops; `None`: another replica leads. One
    /// process always leads its own.
    async fn lead_background_work(&self) -> Result<Option<Box<dyn Send + Sync>>, Error> {
        Ok(Some(Box::new(())))
    }
    /// `Ok` when the state answers now (`/readyz`, the `state_up` gauge), with its epoch: a
    /// number that changes when the state dropped what it held for this process's sessions (a
    /// database's restart releases their locks, the lead among them). A shared database also
    /// samples its clock (see [`State::shared_clock`]).
    async fn probe(&self) -> Result<i64, Error> {
        self.project("").await.map(|_| 0)
    }
    /// The clock every replica sharing this state reads (the database's); `None`: this state
    /// serves one process, which reads its own.
    fn shared_clock(&self) -> Option<proto::clock::SharedClock> {
        None
    }
    /// Returns once every write this caller made before the call is durable: what an acknowledgement waits for.
    async fn durable(&self) -> Result<(), Error>;
    /// Waits for a storage key's record to be durable (a read key is handed out even when the disk refuses).
    async fn key_durable(&self, access: KeyAccess) -> Result<(), Error>;
    /// Inserts a new project; [`Error::ProjectExists`] if the name is taken.
    async fn create_project(&self, record: &ProjectRecord) -> Result<(), Error>;
    async fn project(&self, name: &str) -> Result<Option<ProjectRecord>, Error>;
    /// `project`'s record, while `holder` is one of its live tokens; refused as revoked otherwise.
    async fn holders_project(&self, project: &str, holder: Holder<'_>) -> Result<ProjectRecord, Error> {
        let record = self.project(project).await?.ok_or_else(revoked)?;
        let scoped = match holder.token_id.is_empty() {
            true => None,
            false => self.scoped_token(holder.token_sha256_hex).await?,
        };
        if holder.is_live(&record, scoped.as_ref()) { Ok(record) } else { Err(revoked()) }
    }
    /// Every project, sorted by name.
    async fn projects(&self) -> Result<Vec<ProjectRecord>, Error>;
    /// Sets a project's byte quota (0: none).
    async fn set_quota(&self, project: &str, quota_bytes: u64) -> Result<ProjectRecord, Error>;
    /// Replaces a project's token (its SHA-256).
    async fn set_project_token(&self, project: &str, sha256_hex: &str) -> Result<(), Error>;
    /// Removes a project's record, scoped tokens, counters and totals (its caches are flushed first).
    async fn remove_project(&self, project: &str) -> Result<(), Error>;
    async fn insert_minted_key(&self, access_key_id: &str, record: &MintedKeyRecord) -> Result<(), Error>;
    async fn minted_key(&self, access_key_id: &str) -> Result<Option<MintedKeyRecord>, Error>;
    /// Forgets the project's storage keys issued to `token_id` (empty: the project token); returns them.
    async fn revoke_keys(&self, project: &str, token_id: &str) -> Result<Vec<MintedKeyRecord>, Error>;
    /// Forgets keys that expired before `now_unix`; returns how many.
    async fn remove_expired_keys(&self, now_unix: i64) -> Result<usize, Error>;
    /// Projects whose post-flush sweep is due at `now_unix`, with the time it was due.
    async fn sweeps_due(&self, now_unix: i64) -> Result<Vec<(String, i64)>, Error>;
    /// Marks a post-flush sweep done, unless a later flush made another due.
    async fn sweep_done(&self, project: &str, due_unix: i64) -> Result<(), Error>;
    async fn insert_scoped_token(&self, sha256_hex: &str, record: &ScopedTokenRecord) -> Result<(), Error>;
    async fn scoped_token(&self, sha256_hex: &str) -> Result<Option<ScopedTokenRecord>, Error>;
    async fn scoped_tokens(&self, project: &str) -> Result<Vec<ScopedTokenRecord>, Error>;
    /// Removes one scoped token of a project (`id`), or all of them; returns those removed.
    async fn remove_scoped_tokens(&self, project: &str, id: Option<&str>) -> Result<Vec<ScopedTokenRecord>, Error>;
    async fn manifest(&self, project: &str, service: &str, branch: &str) -> Result<Option<pb::Manifest>, Error>;
    /// Every manifest of a project, sorted by service and branch.
    async fn manifests(&self, project: &str) -> Result<Vec<pb::Manifest>, Error>;
    /// Records that a manifest was used now, unless another writer replaced it meanwhile.
    async fn touch_manifest(&self, project: &str, manifest: &pb::Manifest, now_unix: i64) -> Result<(), Error>;
    /// A restore's lookup as one atomic step, refused when `holder` is no longer live: the
    /// manifest of the first of `keys` the project holds, recorded as used at `now_unix`, with `grant` run on the project's transfer leases
    /// (as [`Ephemeral::update_leases`] runs a change) for it, while the project's publish lock
    /// is held shared across replicas, so no eviction or collection runs between the read and
    /// the lease that protects what the restore reads. A miss takes no lock and changes
    /// nothing. The caller holds the lock in this process; this default, for one process,
    /// composes the steps above.
    async fn look_up(
        &self,
        project: &str,
        holder: Holder<'_>,
        keys: &[pb::CacheKey],
        now_unix: i64,
        grant: &mut LookupGrant<'_>,
    ) -> Result<Option<pb::Manifest>, Error> {
        self.holders_project(project, holder).await?;
        for key in keys {
            if let Some(manifest) = self.manifest(project, &key.service, &key.branch).await? {
                self.touch_manifest(project, &manifest, now_unix).await?;
                self.update_leases(project, &mut |leases, demands| grant(&manifest, leases, demands)).await?;
                return Ok(Some(manifest));
            }
        }
        Ok(None)
    }
    /// Makes `manifest` its key's at `now_unix`, atomically with the ledger (see [`Committed`]); refused with [`Error::SaveConflict`] when the project's generation is no longer `generation`.
    async fn commit_manifest(
        &self,
        project: &str,
        manifest: &pb::Manifest,
        generation: u64,
        new_blobs: &HashMap<String, BlobRecord>,
        now_unix: i64,
    ) -> Result<Committed, Error>;
    /// A save's begin as one atomic step, while the project's publish lock is held shared
    /// across replicas (so a collection either ran before and the save sees what it left, or
    /// runs after and keeps every blob the save names), refused when `holder` is no longer
    /// live: `register` sees the project's record (its generation and quota as they are now),
    /// the ledger's records of those of `digests` the store holds and every manifest of the
    /// project, and runs on
    /// the project's open saves (as [`Ephemeral::update_open_saves`] runs a change); its
    /// answer is this step's. The caller holds the lock in this process; this default, for
    /// one process, composes the steps above.
    async fn begin_save(
        &self,
        project: &str,
        holder: Holder<'_>,
        digests: &[String],
        register: &mut BeginRegister<'_>,
    ) -> Result<(), Error> {
        let record = self.holders_project(project, holder).await?;
        let stored = self.stored_blobs(project, digests).await?;
        let manifests = self.manifests(project).await?;
        let mut registered = Ok(());
        self.update_open_saves(project, &mut |saves| registered = register(&record, &stored, &manifests, saves))
            .await?;
        registered
    }
    /// A commit whose every blob the ledger already records, as one atomic step while the
    /// project's publish lock is held shared across replicas, refused when `holder` is no
    /// longer live: `check` sees the project's record and the ledger's records of `new_blobs`
    /// (every blob the commit names), and may refuse, or decline (`false`: nothing changes,
    /// and the answer is `Ok(None)`); the open save `save_id` of
    /// the project is forgotten ([`Error::NoSuchSave`] when it is not there); then the
    /// manifest is committed as [`State::commit_manifest`] commits it, and one save counted for
    /// its service. `Ok(None)`: the ledger lacks one of the blobs, or `check` declined, and
    /// nothing changed (the caller checks the store). The caller holds the lock in this process; this default, for
    /// one process, composes the steps above.
    #[allow(clippy::too_many_arguments)]
    async fn commit_known(
        &self,
        project: &str,
        holder: Holder<'_>,
        manifest: &pb::Manifest,
        generation: u64,
        new_blobs: &HashMap<String, BlobRecord>,
        now_unix: i64,
        check: &mut CommitCheck<'_>,
        save_id: &str,
    ) -> Result<Option<Committed>, Error> {
        let record = self.holders_project(project, holder).await?;
        let digests: Vec<String> = new_blobs.keys().cloned().collect();
        let known = self.stored_blobs(project, &digests).await?;
        if known.len() < digests.len() || !check(&record, &known)? {
            return Ok(None);
        }
        let mut taken = false;
        self.update_open_saves(project, &mut |saves| taken = crate::claims::forget(saves, save_id, project)).await?;
        if !taken {
            return Err(Error::NoSuchSave(save_id.to_owned()));
        }
        let committed = self.commit_manifest(project, manifest, generation, new_blobs, now_unix).await?;
        let service = manifest.key.as_ref().map(|key| key.service.as_str()).unwrap_or_default();
        self.add_to_counters(project, service, &ServiceCounters { saves: 1, ..Default::default() }).await?;
        Ok(Some(committed))
    }
    /// Evicts one cache at `now_unix`; returns the blobs it left unreferenced, or `None` when there was none.
    async fn remove_manifest(
        &self,
        project: &str,
        key: &pb::CacheKey,
        now_unix: i64,
    ) -> Result<Option<Vec<String>>, Error>;
    /// A project's totals, kept in step by every write (never counted).
    async fn totals(&self, project: &str) -> Result<ProjectTotals, Error>;
    /// Counters per service, for one project or (with `None`) every project.
    async fn service_counters(&self, project: Option<&str>) -> Result<Vec<(String, String, ServiceCounters)>, Error>;
    async fn add_to_counters(&self, project: &str, service: &str, change: &ServiceCounters) -> Result<(), Error>;
    /// Removes a project's manifests, ledger and storage keys and bumps its generation.
    async fn flush_project(&self, project: &str) -> Result<FlushedRecords, Error>;
    /// The ledger's records of those of `digests` the project's store holds.
    async fn stored_blobs(&self, project: &str, digests: &[String]) -> Result<HashMap<String, BlobRecord>, Error>;
    /// Every digest the project's ledger records.
    async fn ledger_digests(&self, project: &str) -> Result<HashSet<String>, Error>;
    /// Forgets a lost blob with every manifest naming it; returns the manifests removed.
    async fn drop_blob(&self, project: &str, digest: &str, now_unix: i64) -> Result<u64, Error>;
    /// The project's blobs no manifest names, with their records.
    async fn unreferenced_blobs(&self, project: &str, now_unix: i64) -> Result<Vec<(String, BlobRecord)>, Error>;
    /// Forgets those of `digests` that still have no reference; returns them.
    async fn forget_unreferenced(&self, project: &str, digests: &[String]) -> Result<Vec<(String, BlobRecord)>, Error>;
}
