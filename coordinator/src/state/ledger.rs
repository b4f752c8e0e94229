//! The ledger's rules, written once: pure functions over a project's view (the records a rule
//! needs, loaded by a backend under the project's lock) that return a change set the backend
//! applies in one transaction. The time is the caller's.

use std::collections::{BTreeSet, HashMap};

use proto::v1 as pb;

use super::{BlobRecord, Committed, FlushedRecords, MintedKeyRecord, ProjectRecord, began_later, manifest_digests};
use crate::error::Error;

/// What a commit needs to see of its project, loaded under the project's lock.
pub struct CommitView<'a> {
    pub project: &'a ProjectRecord,
    /// The key's manifest now, if any.
    pub old: Option<pb::Manifest>,
    /// The ledger's records of the blobs the new and the old manifest name (those it has).
    pub known: &'a HashMap<String, BlobRecord>,
}

/// What a rule changes: the project's record to write, blob records to write or forget, the
/// manifest to store, the manifests to remove (by key), the storage keys to revoke (by access
/// key ID), the totals' change (or their reset to zero, applied before the change).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChangeSet {
    pub put_project: Option<ProjectRecord>,
    pub put_blobs: Vec<(String, BlobRecord)>,
    pub remove_blobs: Vec<String>,
    pub put_manifest: Option<pb::Manifest>,
    pub remove_manifests: Vec<pb::CacheKey>,
    pub remove_keys: Vec<String>,
    pub reset_totals: bool,
    pub blobs_delta: i64,
    pub stored_bytes_delta: i64,
    pub manifests_delta: i64,
}

impl ChangeSet {
    fn new_blob(&mut self, digest: &str, record: BlobRecord) {
        self.blobs_delta += 1;
        self.stored_bytes_delta += record.stored_size as i64;
        self.put_blobs.push((digest.to_owned(), record));
    }
}

/// Every digest a commit's view must hold the records of: those the new manifest and the
/// key's old one name.
pub fn commit_digests(manifest: &pb::Manifest, old: Option<&pb::Manifest>) -> BTreeSet<String> {
    let mut digests = manifest_digests(manifest);
    digests.extend(old.map(manifest_digests).unwrap_or_default());
    digests
}

/// Makes `manifest` its key's at `now_unix`: the blobs it names gain a reference (new ones
/// recorded as `new_blobs` describes them), those of the manifest it replaces lose one. A key's
/// manifest made by a save begun later stays ([`Committed::KeptNewer`]), the commit's new blobs
/// recorded unreferenced so a collection finds them. Refused with [`Error::SaveConflict`] when
/// the project's generation is no longer `generation` (a flush happened since the save began).
pub fn commit(
    view: CommitView<'_>,
    manifest: &pb::Manifest,
    generation: u64,
    new_blobs: &HashMap<String, BlobRecord>,
    now_unix: i64,
) -> Result<(Committed, ChangeSet), Error> {
    let name = &view.project.name;
    if view.project.generation != generation {
        return Err(Error::SaveConflict(format!("project {name:?} was flushed while the save ran: save again")));
    }
    let described = |digest: &str| new_blobs.get(digest).cloned().unwrap_or_default();
    let new_digests = manifest_digests(manifest);
    let mut change = ChangeSet::default();
    if let Some(old) = view.old.as_ref().filter(|old| began_later(old.origin.as_ref(), manifest.origin.as_ref())) {
        for digest in new_digests.iter().filter(|digest| !view.known.contains_key(*digest)) {
            let blob = BlobRecord { references: 0, unreferenced_since_unix: now_unix, ..described(digest) };
            change.new_blob(digest, blob);
        }
        return Ok((Committed::KeptNewer(old.clone()), change));
    }
    let old_digests = view.old.as_ref().map(manifest_digests).unwrap_or_default();
    for digest in new_digests.difference(&old_digests) {
        match view.known.get(digest) {
            Some(blob) => change.put_blobs.push((digest.clone(), blob.clone().referenced())),
            None => {
                let blob = BlobRecord { references: 0, ..described(digest) };
                change.blobs_delta += 1;
                change.stored_bytes_delta += blob.stored_size as i64;
                change.put_blobs.push((digest.clone(), blob.referenced()));
            }
        }
    }
    for digest in old_digests.difference(&new_digests) {
        // Unreferenced blobs stay stored and recorded until a collection or eviction.
        if let Some(blob) = view.known.get(digest) {
            change.put_blobs.push((digest.clone(), blob.clone().unreferenced(now_unix)));
        }
    }
    change.manifests_delta = i64::from(view.old.is_none());
    change.put_manifest = Some(manifest.clone());
    let replaced = view.old.map(|old| old.origin.unwrap_or_default());
    Ok((Committed::Stored { replaced }, change))
}

/// Evicts one cache at `now_unix`: its manifest (`manifest`) goes and its blobs lose that
/// reference; `known` holds the ledger's records of the blobs it names. Returns the blobs left
/// unreferenced (sorted), which stay recorded until a collection or eviction deletes them.
pub fn evict(manifest: &pb::Manifest, known: &HashMap<String, BlobRecord>, now_unix: i64) -> (Vec<String>, ChangeSet) {
    let mut change = ChangeSet { manifests_delta: -1, ..Default::default() };
    change.remove_manifests.push(manifest.key.clone().unwrap_or_default());
    let mut unreferenced = Vec::new();
    for digest in manifest_digests(manifest) {
        if let Some(record) = known.get(&digest) {
            let record = record.clone().unreferenced(now_unix);
            if record.references == 0 {
                unreferenced.push(digest.clone());
            }
            change.put_blobs.push((digest, record));
        }
    }
    (unreferenced, change)
}

/// Every digest a drop's view must hold the records of: the lost blob's, and those the
/// manifests naming it name.
pub fn drop_digests(naming: &[pb::Manifest], digest: &str) -> BTreeSet<String> {
    let mut digests: BTreeSet<String> = naming.iter().flat_map(manifest_digests).collect();
    digests.insert(digest.to_owned());
    digests
}

/// Forgets a blob the store lost or holds corrupted, at `now_unix`: every manifest naming it
/// (`naming`) goes and its other blobs lose that reference, then the blob's record goes, so the
/// next save uploads it again and no manifest names it meanwhile. `known`: the ledger's records
/// of [`drop_digests`].
pub fn drop_blob(
    naming: &[pb::Manifest],
    known: &HashMap<String, BlobRecord>,
    digest: &str,
    now_unix: i64,
) -> ChangeSet {
    let mut records = known.clone();
    let mut touched = BTreeSet::new();
    let mut change = ChangeSet::default();
    for manifest in naming {
        change.remove_manifests.push(manifest.key.clone().unwrap_or_default());
        for named in manifest_digests(manifest) {
            if let Some(record) = records.get_mut(&named) {
                *record = record.clone().unreferenced(now_unix);
                touched.insert(named);
            }
        }
    }
    change.manifests_delta = -(naming.len() as i64);
    if let Some(record) = records.get(digest) {
        change.blobs_delta = -1;
        change.stored_bytes_delta = -(record.stored_size as i64);
        change.remove_blobs.push(digest.to_owned());
    }
    change.put_blobs = touched
        .into_iter()
        .filter(|named| named != digest)
        .map(|named| {
            let record = records[&named].clone();
            (named, record)
        })
        .collect();
    change
}

/// The latest expiry among `keys`, or 0.
fn latest_expiry<'a>(keys: impl IntoIterator<Item = &'a MintedKeyRecord>) -> i64 {
    keys.into_iter().map(|record| record.expires_unix).max().unwrap_or(0)
}

/// What a flush needs to see of its project, loaded under the project's exclusive lock.
pub struct FlushView<'a> {
    pub project: &'a ProjectRecord,
    /// The keys of the project's manifests.
    pub manifests: Vec<pb::CacheKey>,
    /// Every digest the project's ledger records.
    pub blobs: Vec<String>,
    /// The storage keys issued for the project, by access key ID.
    pub keys: Vec<(String, MintedKeyRecord)>,
}

/// Flushes a project: its manifests, ledger and totals go, its generation is bumped (so a save
/// begun before the flush cannot commit after it), and its storage keys die with the
/// generation: a save begun before the flush can write nothing after it (the embedded endpoint
/// admits only recorded keys, and nobody renews an unrecorded one). Where a key outlives its
/// record (an STS session), the store is swept once the last one has expired
/// ([`ProjectRecord::sweep_after_unix`]).
pub fn flush(view: FlushView<'_>) -> (FlushedRecords, ChangeSet) {
    let mut record = view.project.clone();
    record.generation += 1;
    let revoked: Vec<(String, MintedKeyRecord)> =
        view.keys.into_iter().filter(|(_, key)| key.project == record.name).collect();
    record.sweep_after_unix = record.sweep_after_unix.max(latest_expiry(revoked.iter().map(|(_, key)| key)));
    let flushed = FlushedRecords { manifests_removed: view.manifests.len() as u64, generation: record.generation };
    let change = ChangeSet {
        put_project: Some(record),
        remove_blobs: view.blobs,
        remove_manifests: view.manifests,
        remove_keys: revoked.into_iter().map(|(id, _)| id).collect(),
        reset_totals: true,
        ..Default::default()
    };
    (flushed, change)
}

/// Starts the grace of the project's blobs no manifest names, at `now_unix`: `records` holds
/// (at least) the unreferenced ones of its ledger. Returns them (those recorded before garbage
/// collection existed with their grace started now), and the change that starts it.
pub fn unreferenced(records: Vec<(String, BlobRecord)>, now_unix: i64) -> (Vec<(String, BlobRecord)>, ChangeSet) {
    let mut change = ChangeSet::default();
    let mut unreferenced = Vec::new();
    for (digest, mut record) in records.into_iter().filter(|(_, record)| record.references == 0) {
        if record.unreferenced_since_unix == 0 {
            record.unreferenced_since_unix = now_unix;
            change.put_blobs.push((digest.clone(), record.clone()));
        }
        unreferenced.push((digest, record));
    }
    (unreferenced, change)
}

/// Forgets those of `digests` that still have no reference (`known`: the ledger's records of
/// them); returns them, in the order of `digests`. The caller deletes their objects after,
/// holding the publish lock, so a commit that names one again finds it unknown.
pub fn forget_unreferenced(
    known: &HashMap<String, BlobRecord>,
    digests: &[String],
) -> (Vec<(String, BlobRecord)>, ChangeSet) {
    let mut change = ChangeSet::default();
    let mut forgotten: Vec<(String, BlobRecord)> = Vec::new();
    for digest in digests {
        let Some(record) = known.get(digest).filter(|record| record.references == 0) else { continue };
        if forgotten.iter().any(|(done, _)| done == digest) {
            continue;
        }
        change.blobs_delta -= 1;
        change.stored_bytes_delta -= record.stored_size as i64;
        change.remove_blobs.push(digest.clone());
        forgotten.push((digest.clone(), record.clone()));
    }
    (forgotten, change)
}

/// Projects whose post-flush sweep is due at `now_unix`, with the time it was due.
pub fn sweeps_due(projects: Vec<ProjectRecord>, now_unix: i64) -> Vec<(String, i64)> {
    projects
        .into_iter()
        .filter(|record| record.sweep_after_unix > 0 && record.sweep_after_unix <= now_unix)
        .map(|record| (record.name, record.sweep_after_unix))
        .collect()
}

/// Marks a project's post-flush sweep (due at `due_unix`) done: its record to write, or `None`
/// when a later flush made another due meanwhile.
pub fn sweep_done(project: &ProjectRecord, due_unix: i64) -> Option<ProjectRecord> {
    (project.sweep_after_unix == due_unix).then(|| ProjectRecord { sweep_after_unix: 0, ..project.clone() })
}

/// A manifest as used at `now_unix` (stored only if it is still its key's); `None` when it
/// already says so (a use in the same second, or a later one: a use never moves it back), so
/// a key restored many times a second is written once that second.
pub fn touched(manifest: &pb::Manifest, now_unix: i64) -> Option<pb::Manifest> {
    (manifest.last_used_unix < now_unix).then(|| pb::Manifest { last_used_unix: now_unix, ..manifest.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(generation: u64) -> ProjectRecord {
        ProjectRecord {
            name: "m".into(),
            token_sha256_hex: String::new(),
            created_unix: 0,
            generation,
            quota_bytes: 0,
            sweep_after_unix: 0,
        }
    }

    fn manifest(digests: &[&str], began_unix_ms: i64) -> pb::Manifest {
        pb::Manifest {
            key: Some(pb::CacheKey { service: "web".into(), branch: String::new() }),
            images: vec![pb::Image {
                id: digests[0].into(),
                layers: digests[1..].iter().map(|d| pb::Layer { digest: (*d).into(), ..Default::default() }).collect(),
                ..Default::default()
            }],
            origin: Some(pb::SaveOrigin { began_unix_ms, save_id: format!("s{began_unix_ms}"), ..Default::default() }),
            ..Default::default()
        }
    }

    fn sized(digests: &[&str]) -> HashMap<String, BlobRecord> {
        digests
            .iter()
            .map(|d| (d.to_string(), BlobRecord { stored_size: 10, size: 10, ..Default::default() }))
            .collect()
    }

    #[test]
    fn a_commit_references_its_blobs_and_unreferences_the_replaced_ones_at_the_time_passed_in() {
        let record = project(0);
        let old = manifest(&["c1", "l1"], 100);
        let known: HashMap<String, BlobRecord> = [("c1", 1), ("l1", 1)]
            .into_iter()
            .map(|(d, references)| (d.to_string(), BlobRecord { stored_size: 10, references, ..Default::default() }))
            .collect();
        let newer = manifest(&["c2", "l1"], 200);
        let view = CommitView { project: &record, old: Some(old), known: &known };
        let (committed, change) = commit(view, &newer, 0, &sized(&["c2"]), 4_000).unwrap();
        assert!(matches!(committed, Committed::Stored { replaced: Some(_) }));
        let put: HashMap<_, _> = change.put_blobs.iter().cloned().collect();
        assert_eq!((put["c2"].references, put["c2"].unreferenced_since_unix), (1, 0));
        assert_eq!((put["c1"].references, put["c1"].unreferenced_since_unix), (0, 4_000));
        assert!(!put.contains_key("l1"), "named by both: unchanged");
        assert_eq!((change.blobs_delta, change.stored_bytes_delta, change.manifests_delta), (1, 10, 0));
    }

    #[test]
    fn a_manifest_never_goes_back_in_time_and_a_flush_fences_the_commit() {
        let record = project(1);
        let known = HashMap::new();
        let newer = manifest(&["c2"], 200);
        let view = CommitView { project: &record, old: Some(newer.clone()), known: &known };
        let (committed, change) = commit(view, &manifest(&["c1"], 100), 1, &sized(&["c1"]), 4_000).unwrap();
        assert_eq!(committed, Committed::KeptNewer(newer));
        assert_eq!(change.put_manifest, None);
        assert_eq!(
            change.put_blobs,
            [(
                "c1".to_string(),
                BlobRecord { stored_size: 10, size: 10, unreferenced_since_unix: 4_000, ..Default::default() }
            )]
        );
        let view = CommitView { project: &record, old: None, known: &known };
        assert!(matches!(
            commit(view, &manifest(&["c1"], 300), 0, &HashMap::new(), 4_000),
            Err(Error::SaveConflict(_))
        ));
    }

    #[test]
    fn a_dropped_blob_takes_the_manifests_naming_it_and_their_references() {
        let web = manifest(&["c1", "l1"], 100);
        let api = pb::Manifest {
            key: Some(pb::CacheKey { service: "api".into(), branch: String::new() }),
            ..manifest(&["c2", "l1"], 100)
        };
        let known: HashMap<String, BlobRecord> = [("c1", 1), ("c2", 2), ("l1", 2)]
            .into_iter()
            .map(|(d, references)| (d.to_string(), BlobRecord { stored_size: 10, references, ..Default::default() }))
            .collect();
        let naming = [web, api];
        assert_eq!(drop_digests(&naming, "l1"), ["c1", "c2", "l1"].iter().map(|d| d.to_string()).collect());
        let change = drop_blob(&naming, &known, "l1", 5_000);
        assert_eq!(change.remove_blobs, ["l1"]);
        assert_eq!(change.remove_manifests.len(), 2);
        let put: HashMap<_, _> = change.put_blobs.iter().cloned().collect();
        assert_eq!((put["c1"].references, put["c1"].unreferenced_since_unix), (0, 5_000));
        assert_eq!((put["c2"].references, put["c2"].unreferenced_since_unix), (1, 0), "another manifest names it");
        assert!(!put.contains_key("l1"));
        assert_eq!((change.blobs_delta, change.stored_bytes_delta, change.manifests_delta), (-1, -10, -2));
    }

    #[test]
    fn an_evicted_cache_leaves_only_the_blobs_no_other_names_unreferenced() {
        let known: HashMap<String, BlobRecord> = [("c1", 1), ("l1", 2)]
            .into_iter()
            .map(|(d, references)| (d.to_string(), BlobRecord { stored_size: 10, references, ..Default::default() }))
            .collect();
        let (unreferenced, change) = evict(&manifest(&["c1", "l1"], 100), &known, 6_000);
        assert_eq!(unreferenced, ["c1"]);
        let put: HashMap<_, _> = change.put_blobs.iter().cloned().collect();
        assert_eq!((put["c1"].references, put["c1"].unreferenced_since_unix), (0, 6_000));
        assert_eq!((put["l1"].references, put["l1"].unreferenced_since_unix), (1, 0));
        assert_eq!((change.blobs_delta, change.manifests_delta, change.remove_manifests.len()), (0, -1, 1));
    }

    #[test]
    fn a_flush_empties_the_project_bumps_its_generation_and_revokes_its_keys() {
        let key = |project: &str, expires_unix| MintedKeyRecord {
            project: project.into(),
            access: super::super::KeyAccess::Write,
            expires_unix,
            token_id: String::new(),
        };
        let record = ProjectRecord { sweep_after_unix: 30, ..project(2) };
        let view = FlushView {
            project: &record,
            manifests: vec![pb::CacheKey { service: "web".into(), branch: String::new() }],
            blobs: vec!["c1".into(), "l1".into()],
            keys: vec![("KA".into(), key("m", 50)), ("KB".into(), key("m", 20)), ("KO".into(), key("other", 90))],
        };
        let (flushed, change) = flush(view);
        assert_eq!(flushed, FlushedRecords { manifests_removed: 1, generation: 3 });
        let put = change.put_project.unwrap();
        assert_eq!((put.generation, put.sweep_after_unix), (3, 50), "swept once the last revoked key expired");
        assert_eq!(change.remove_keys, ["KA", "KB"], "another project's key stays");
        assert_eq!(change.remove_blobs, ["c1", "l1"]);
        assert_eq!(change.remove_manifests.len(), 1);
        assert!(change.reset_totals);
        let record = ProjectRecord { sweep_after_unix: 0, ..project(0) };
        let view = FlushView { project: &record, manifests: vec![], blobs: vec![], keys: vec![] };
        let (flushed, change) = flush(view);
        assert_eq!((flushed.generation, change.put_project.unwrap().sweep_after_unix), (1, 0), "no key: no sweep");
    }

    #[test]
    fn the_grace_of_an_unreferenced_blob_starts_once_and_only_unreferenced_blobs_are_forgotten() {
        let blob = |references, unreferenced_since_unix| BlobRecord {
            stored_size: 10,
            references,
            unreferenced_since_unix,
            ..Default::default()
        };
        let records = vec![("a".to_string(), blob(0, 0)), ("b".into(), blob(0, 300)), ("c".into(), blob(1, 0))];
        let (unreferenced, change) = unreferenced(records, 700);
        assert_eq!(unreferenced, [("a".to_string(), blob(0, 700)), ("b".into(), blob(0, 300))]);
        assert_eq!(change.put_blobs, [("a".to_string(), blob(0, 700))], "a grace already started stays");
        let known: HashMap<String, BlobRecord> =
            [("a".to_string(), blob(0, 700)), ("c".into(), blob(1, 0))].into_iter().collect();
        let asked = ["c", "a", "zz", "a"].map(String::from);
        let (forgotten, change) = forget_unreferenced(&known, &asked);
        assert_eq!(forgotten, [("a".to_string(), blob(0, 700))], "c is named, zz unknown");
        assert_eq!(change.remove_blobs, ["a"]);
        assert_eq!((change.blobs_delta, change.stored_bytes_delta), (-1, -10));
    }

    #[test]
    fn a_sweep_is_due_once_the_last_key_expired_and_done_unless_a_later_flush_moved_it() {
        let at = |name: &str, sweep_after_unix| ProjectRecord { name: name.into(), sweep_after_unix, ..project(0) };
        let projects = vec![at("a", 50), at("b", 0), at("c", 90)];
        assert_eq!(sweeps_due(projects.clone(), 49), []);
        assert_eq!(sweeps_due(projects, 50), [("a".to_string(), 50)]);
        assert_eq!(sweep_done(&at("a", 50), 50), Some(at("a", 0)));
        assert_eq!(sweep_done(&at("a", 80), 50), None, "a later flush made another due");
        let manifest = manifest(&["c1"], 100);
        let used = touched(&manifest, 900).unwrap();
        assert_eq!(used, pb::Manifest { last_used_unix: 900, ..manifest });
        assert_eq!(touched(&used, 900), None, "used again in the same second: nothing to write");
        assert_eq!(touched(&used, 899), None, "a clock stepped back never moves it back");
    }
}
