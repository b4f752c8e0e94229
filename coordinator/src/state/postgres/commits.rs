//! A project's commits of recorded blobs on PostgreSQL, in batches (see `batches.rs`): one
//! transaction of the same statements however many commits queued (the locks and reads in one
//! round trip, the writes and the commit in another). Each commit's rule runs on what the
//! commits before it in the batch left, so a batch stores what they would have stored one
//! after another; one that fails (its token revoked, its save gone, the project flushed, its
//! check refused) changes nothing and leaves the others to commit.

use super::batches::{BatchRun, Batched, Holders, Params, SCOPED_TOKENS, Token, all_revoked, distinct};
use super::*;

/// A batch's locks and reads, in its first round trip, in this order (each its own statement,
/// so each reads after the locks before it): the publish lock (shared), the project's row,
/// the scoped tokens of the callers' hashes, the manifests of their keys (locked), the ledger's
/// records of their blobs and of those the manifests they replace list (locked), and their
/// open saves (locked, deleted with the writes for those that commit).
const KEYS_MANIFESTS_LOCKED: &str = "SELECT m.service, m.branch, m.body
    FROM UNNEST($2::text[], $3::text[]) AS wanted (service, branch)
    CROSS JOIN LATERAL (SELECT service, branch, body FROM lc_manifests
        WHERE project = $1 AND service = wanted.service AND branch = wanted.branch OFFSET 0 FOR UPDATE) m";
const BLOBS_LOCKED: &str =
    "SELECT digest, record FROM lc_blobs WHERE project = $1 AND digest = ANY($2::text[] || ARRAY(
        SELECT UNNEST(m.digests) FROM UNNEST($3::text[], $4::text[]) AS wanted (service, branch)
        CROSS JOIN LATERAL (SELECT digests FROM lc_manifests
            WHERE project = $1 AND service = wanted.service AND branch = wanted.branch OFFSET 0) m))
    FOR UPDATE";
const SAVES_LOCKED: &str = "SELECT id FROM lc_open_saves WHERE project = $1 AND id = ANY($2) FOR UPDATE";

/// What a commit's check sees: the project's record and the ledger's records the batch read.
type CheckView = (ProjectRecord, Arc<HashMap<String, BlobRecord>>);

/// A commit's channel to its caller: its check run on a view answers whether it passed; the
/// outcome is the commit's.
type Caller = batches::Caller<CheckView, Result<bool, Error>, Option<Committed>>;

/// A commit waiting for its project's next batch.
pub(super) struct QueuedCommit {
    token: Token,
    manifest: pb::Manifest,
    generation: u64,
    new_blobs: HashMap<String, BlobRecord>,
    now_unix: i64,
    save_id: String,
    caller: Caller,
}

impl Batched for QueuedCommit {
    type Outcome = Option<Committed>;

    fn answer(&self, outcome: Result<Option<Committed>, Error>) {
        self.caller.answer(outcome);
    }

    fn run<'a>(pool: &'a Pool, project: &'a str, batch: &'a [Self]) -> BatchRun<'a, Option<Committed>> {
        Box::pin(run_batch(pool, project, batch))
    }
}

/// Commits through `project`'s next batch: `check` runs on the records it read, as
/// [`State::commit_known`]'s does.
#[allow(clippy::too_many_arguments)]
pub(super) async fn commit(
    queues: &Arc<batches::Queues<QueuedCommit>>,
    pool: &Pool,
    project: &str,
    holder: Holder<'_>,
    manifest: &pb::Manifest,
    generation: u64,
    new_blobs: &HashMap<String, BlobRecord>,
    now_unix: i64,
    check: &mut super::super::CommitCheck<'_>,
    save_id: &str,
) -> Result<Option<Committed>, Error> {
    let (caller, waiting) = batches::channel();
    let queued = QueuedCommit {
        token: Token::of(holder),
        manifest: manifest.clone(),
        generation,
        new_blobs: new_blobs.clone(),
        now_unix,
        save_id: save_id.to_owned(),
        caller,
    };
    queues.queue(pool, project, queued);
    waiting.outcome(|(record, known): CheckView| check(&record, &known)).await
}

/// One batch: every commit's outcome, in order, or the batch's failure (nothing committed).
async fn run_batch(
    pool: &Pool,
    project: &str,
    batch: &[QueuedCommit],
) -> Result<Vec<Result<Option<Committed>, Error>>, Error> {
    let reads = [COMMIT_LOCK, PROJECT_RECORD_LOCKED, SCOPED_TOKENS, KEYS_MANIFESTS_LOCKED, BLOBS_LOCKED, SAVES_LOCKED];
    // All prepared before any is sent, so they run in this order.
    let tx = pipelined(pool, &reads).await?;
    let client = tx.client();
    let lock = lock_key(project);
    let hashes: Vec<&str> = batch.iter().map(|queued| queued.token.sha256_hex.as_str()).collect();
    let keys: Vec<pb::CacheKey> = batch.iter().map(|queued| queued.manifest.key.clone().unwrap_or_default()).collect();
    let services: Vec<&str> = keys.iter().map(|key| key.service.as_str()).collect();
    let branches: Vec<&str> = keys.iter().map(|key| key.branch.as_str()).collect();
    let digests = distinct(batch.iter().flat_map(|queued| queued.new_blobs.keys().map(String::as_str)));
    let save_ids: Vec<&str> = batch.iter().map(|queued| queued.save_id.as_str()).collect();
    let (by_lock, by_project): (Params, Params) = (&[&lock], &[&project]);
    let (by_hashes, by_keys): (Params, Params) = (&[&project, &hashes], &[&project, &services, &branches]);
    let (by_blobs, by_saves): (Params, Params) = (&[&project, &digests, &services, &branches], &[&project, &save_ids]);
    let (_, _, record, scoped, manifests, known, saves) = futures::try_join!(
        tx.begin(),
        client.cached_execute(COMMIT_LOCK, by_lock).map_err(pg_error),
        client.cached_query_opt(PROJECT_RECORD_LOCKED, by_project).map_err(pg_error),
        client.cached_query(SCOPED_TOKENS, by_hashes).map_err(pg_error),
        client.cached_query(KEYS_MANIFESTS_LOCKED, by_keys).map_err(pg_error),
        client.cached_query(BLOBS_LOCKED, by_blobs).map_err(pg_error),
        client.cached_query(SAVES_LOCKED, by_saves).map_err(pg_error),
    )?;
    let Some(holders) = Holders::read(record, &scoped)? else { return Ok(all_revoked(batch.len())) };
    let record = &holders.record;
    let mut current: HashMap<(String, String), pb::Manifest> = manifests
        .iter()
        .map(|row| Ok(((row.get(0), row.get(1)), decode_manifest(row.get::<_, &[u8]>(2))?)))
        .collect::<Result<_, Error>>()?;
    let mut known: HashMap<String, BlobRecord> = blob_records(&known)?;
    let mut open: HashSet<String> = saves.iter().map(|row| row.get(0)).collect();
    // A round trip more for a replaced manifest whose blobs were not listed beside it (one
    // written before schema version 4, or by an older replica since).
    let unlisted: Vec<String> =
        current.values().flat_map(manifest_digests).filter(|digest| !known.contains_key(digest)).collect();
    if !unlisted.is_empty() {
        known.extend(lock_blobs(client, project, &unlisted).await?);
    }
    // Each live caller whose blobs are all recorded checks them, all at once.
    let shared = Arc::new(known.clone());
    let asked: Vec<_> = batch
        .iter()
        .map(|queued| {
            let live = holders.live(&queued.token);
            let recorded = queued.new_blobs.keys().all(|digest| known.contains_key(digest));
            (live && recorded).then(|| queued.caller.ask((record.clone(), Arc::clone(&shared))))
        })
        .collect();
    let mut outcomes = Vec::with_capacity(batch.len());
    let (mut changes, mut counters, mut taken) = (Vec::new(), HashMap::<String, ServiceCounters>::new(), Vec::new());
    for ((queued, key), asked) in batch.iter().zip(&keys).zip(asked) {
        let outcome = match asked {
            None if !holders.live(&queued.token) => Err(super::super::revoked()),
            // Its open save stays: the caller checks the store and commits again.
            None => Ok(None),
            // A caller gone before it answered commits nothing.
            Some(answered) => match answered.await.unwrap_or(Ok(false)) {
                Err(error) => Err(error),
                Ok(false) => Ok(None),
                Ok(true) if !open.remove(&queued.save_id) => Err(Error::NoSuchSave(queued.save_id.clone())),
                Ok(true) => {
                    let place = (key.service.clone(), key.branch.clone());
                    let view = ledger::CommitView { project: record, old: current.get(&place).cloned(), known: &known };
                    match ledger::commit(view, &queued.manifest, queued.generation, &queued.new_blobs, queued.now_unix)
                    {
                        Err(error) => {
                            open.insert(queued.save_id.clone());
                            Err(error)
                        }
                        Ok((committed, change)) => {
                            known.extend(change.put_blobs.iter().cloned());
                            if let Some(manifest) = &change.put_manifest {
                                current.insert(place, manifest.clone());
                            }
                            let saves = ServiceCounters { saves: 1, ..Default::default() };
                            counters.entry(key.service.clone()).or_default().add(&saves);
                            taken.push(queued.save_id.clone());
                            changes.push(change);
                            Ok(Some(committed))
                        }
                    }
                }
            },
        };
        outcomes.push(outcome);
    }
    if changes.is_empty() {
        tx.rollback().await?;
        return Ok(outcomes);
    }
    let mut writes = batch_writes(project, changes);
    writes.push(Write::new(
        "DELETE FROM lc_open_saves WHERE project = $1 AND id = ANY($2)",
        vec![Box::new(project.to_owned()), Box::new(taken)],
    ));
    let counters: Vec<(String, ServiceCounters)> = counters.into_iter().collect();
    writes.push(counters_write(project, &counters));
    tx.commit_with(&writes).await?;
    Ok(outcomes)
}

/// The writes that apply the change sets of a batch's commits, in their order: a blob's last
/// record stands, as does a key's last manifest.
fn batch_writes(project: &str, changes: Vec<ledger::ChangeSet>) -> Vec<Write> {
    let mut merged = ledger::ChangeSet::default();
    let mut manifests: Vec<pb::Manifest> = Vec::new();
    for change in changes {
        debug_assert!(change.put_project.is_none() && change.remove_manifests.is_empty(), "a commit's change");
        debug_assert!(change.remove_blobs.is_empty() && change.remove_keys.is_empty() && !change.reset_totals);
        merged.put_blobs.extend(change.put_blobs);
        if let Some(manifest) = change.put_manifest {
            manifests.retain(|earlier| earlier.key != manifest.key);
            manifests.push(manifest);
        }
        merged.blobs_delta += change.blobs_delta;
        merged.stored_bytes_delta += change.stored_bytes_delta;
        merged.manifests_delta += change.manifests_delta;
    }
    let mut writes = change_writes(project, &merged);
    writes.extend(manifests_write(project, &manifests));
    writes
}
