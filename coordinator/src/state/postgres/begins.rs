//! A project's begins on PostgreSQL, in batches (see `batches.rs`): one transaction of the same
//! statements however many begins queued (the locks and reads in one round trip, the open
//! saves' writes and the commit in another). Each begin's rule (the service's `register`) runs
//! in its caller's task, one after another in the batch's order, each on the open saves as the
//! ones before it left them, so a batch registers what the begins would have one after
//! another; a refused begin keeps what its rule changed (the silent saves it noted), as it
//! does alone.

use super::batches::{BatchRun, Batched, Holders, Params, SCOPED_TOKENS, Token, all_revoked, distinct, unanswered};
use super::*;

/// The statement [`ephemeral_records`] sends for a project's open saves: the last of a batch's
/// reads, which go in its first round trip in this order: the locks (see [`BEGIN_LOCKS`]), the
/// project's row, the scoped tokens of the callers' hashes, the ledger's records of the blobs
/// they name, the project's manifests and its open saves.
const OPEN_SAVES: &str = "SELECT id, record FROM lc_open_saves WHERE project = $1";

/// What a begin's rule sees and changes: the project's record, the ledger's records of the
/// blobs the begin names, the project's manifests, and its open saves (given back changed).
type RegisterView = (ProjectRecord, HashMap<String, BlobRecord>, Arc<Vec<pb::Manifest>>, super::super::OpenSaves);

/// A begin's channel to its caller: its rule run on a view gives back the open saves with its
/// result; the outcome is that result once the batch committed.
type Caller = batches::Caller<RegisterView, (super::super::OpenSaves, Result<(), Error>), ()>;

/// A begin waiting for its project's next batch.
pub(super) struct QueuedBegin {
    token: Token,
    digests: Vec<String>,
    caller: Caller,
}

impl Batched for QueuedBegin {
    type Outcome = ();

    fn answer(&self, outcome: Result<(), Error>) {
        self.caller.answer(outcome);
    }

    fn run<'a>(pool: &'a Pool, project: &'a str, batch: &'a [Self]) -> BatchRun<'a, ()> {
        Box::pin(run_batch(pool, project, batch))
    }
}

/// Begins through `project`'s next batch: `register` runs on what it read, as
/// [`State::begin_save`]'s does.
pub(super) async fn begin(
    queues: &Arc<batches::Queues<QueuedBegin>>,
    pool: &Pool,
    project: &str,
    holder: Holder<'_>,
    digests: &[String],
    register: &mut super::super::BeginRegister<'_>,
) -> Result<(), Error> {
    let (caller, waiting) = batches::channel();
    queues.queue(pool, project, QueuedBegin { token: Token::of(holder), digests: digests.to_vec(), caller });
    waiting
        .outcome(|(record, stored, manifests, mut saves): RegisterView| {
            let registered = register(&record, &stored, &manifests, &mut saves);
            (saves, registered)
        })
        .await
}

/// One batch: every begin's outcome, in order, or the batch's failure (nothing registered).
async fn run_batch(pool: &Pool, project: &str, batch: &[QueuedBegin]) -> Result<Vec<Result<(), Error>>, Error> {
    // All prepared before any is sent, so they run in this order.
    let tx =
        pipelined(pool, &[BEGIN_LOCKS, PROJECT_RECORD, SCOPED_TOKENS, BLOBS_OF, PROJECT_MANIFESTS, OPEN_SAVES]).await?;
    let client = tx.client();
    let lock = lock_key(project);
    let hashes: Vec<&str> = batch.iter().map(|queued| queued.token.sha256_hex.as_str()).collect();
    let digests = distinct(batch.iter().flat_map(|queued| queued.digests.iter().map(String::as_str)));
    let (by_locks, by_project): (Params, Params) = (&[&lock, &project], &[&project]);
    let (by_hashes, by_digests): (Params, Params) = (&[&project, &hashes], &[&project, &digests]);
    let (_, _, record, scoped, stored, manifests, before) = futures::try_join!(
        tx.begin(),
        client.cached_execute(BEGIN_LOCKS, by_locks).map_err(pg_error),
        client.cached_query_opt(PROJECT_RECORD, by_project).map_err(pg_error),
        client.cached_query(SCOPED_TOKENS, by_hashes).map_err(pg_error),
        client.cached_query(BLOBS_OF, by_digests).map_err(pg_error),
        client.cached_query(PROJECT_MANIFESTS, by_project).map_err(pg_error),
        ephemeral_records::<super::super::OpenSave>(client, "lc_open_saves", Some(project)),
    )?;
    let Some(holders) = Holders::read(record, &scoped)? else { return Ok(all_revoked(batch.len())) };
    let stored: HashMap<String, BlobRecord> = blob_records(&stored)?;
    let manifests: Arc<Vec<pb::Manifest>> =
        Arc::new(manifests.iter().map(|row| decode_manifest(row.get::<_, &[u8]>(0))).collect::<Result<_, _>>()?);
    let mut saves = before.clone();
    let mut outcomes = Vec::with_capacity(batch.len());
    for queued in batch {
        if !holders.live(&queued.token) {
            outcomes.push(Err(super::super::revoked()));
            continue;
        }
        let named = queued.digests.iter().filter_map(|digest| Some((digest.clone(), stored.get(digest)?.clone())));
        let view = (holders.record.clone(), named.collect(), Arc::clone(&manifests), saves.clone());
        // A caller gone before it answered registers nothing.
        let outcome = match queued.caller.ask(view).await {
            Some((changed, registered)) => {
                // What the rule changed stands even when it refuses (the silent saves it noted).
                saves = changed;
                registered
            }
            None => Err(unanswered()),
        };
        outcomes.push(outcome);
    }
    // Only the open saves are written, an unlogged table: the commit has no WAL to wait for.
    tx.commit_with(&ephemeral_writes("lc_open_saves", Some(project), &before, &saves, |save| &save.project)).await?;
    Ok(outcomes)
}
