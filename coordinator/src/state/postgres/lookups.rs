//! A project's lookups on PostgreSQL, in batches (see `batches.rs`): one transaction of the
//! same statements however many lookups queued. The reads in one round trip: the token checks,
//! the locks (taken only when one of the batch's keys has a manifest, so a batch of misses
//! waits for no lock and writes nothing), the project's leases and the other projects'
//! demands, and the manifests of the batch's keys, read after the locks. Each hit's rule (the
//! service's `grant`) runs in its caller's task, one after another in the batch's order, each
//! on the leases the grants before it left; the writes and the commit in a second round trip.

use super::batches::{BatchRun, Batched, Holders, Params, SCOPED_TOKENS, Token, all_revoked, unanswered};
use super::*;

/// The manifests of keys (`$2` services, `$3` branches), one look-up of the primary key each.
const KEYS_MANIFESTS: &str = "SELECT m.service, m.branch, m.body
    FROM UNNEST($2::text[], $3::text[]) AS wanted (service, branch)
    CROSS JOIN LATERAL (SELECT service, branch, body FROM lc_manifests
        WHERE project = $1 AND service = wanted.service AND branch = wanted.branch OFFSET 0) m";

/// What a hit's rule sees and changes: the manifest found, the project's leases (given back
/// changed) and the other projects' demands.
type GrantView = (pb::Manifest, super::super::Leases, Arc<super::super::LeaseDemands>);

/// A lookup's channel to its caller: its grant run on a view gives back the leases with the
/// project's demand; the outcome is the manifest found, once the batch committed.
type Caller = batches::Caller<GrantView, (super::super::Leases, super::super::LeaseDemand), Option<pb::Manifest>>;

/// A lookup waiting for its project's next batch.
pub(super) struct QueuedLookup {
    token: Token,
    keys: Vec<pb::CacheKey>,
    now_unix: i64,
    caller: Caller,
}

impl Batched for QueuedLookup {
    type Outcome = Option<pb::Manifest>;

    fn answer(&self, outcome: Result<Option<pb::Manifest>, Error>) {
        self.caller.answer(outcome);
    }

    fn run<'a>(pool: &'a Pool, project: &'a str, batch: &'a [Self]) -> BatchRun<'a, Option<pb::Manifest>> {
        Box::pin(run_batch(pool, project, batch))
    }
}

/// Looks up through `project`'s next batch: `grant` runs on what it read, for a hit, as
/// [`State::look_up`]'s does.
pub(super) async fn look_up(
    queues: &Arc<batches::Queues<QueuedLookup>>,
    pool: &Pool,
    project: &str,
    holder: Holder<'_>,
    keys: &[pb::CacheKey],
    now_unix: i64,
    grant: &mut super::super::LookupGrant<'_>,
) -> Result<Option<pb::Manifest>, Error> {
    let (caller, waiting) = batches::channel();
    queues.queue(pool, project, QueuedLookup { token: Token::of(holder), keys: keys.to_vec(), now_unix, caller });
    waiting
        .outcome(|(manifest, mut leases, demands): GrantView| {
            let demand = grant(&manifest, &mut leases, &demands);
            (leases, demand)
        })
        .await
}

/// One batch: every lookup's outcome, in order, or the batch's failure (nothing granted).
async fn run_batch(
    pool: &Pool,
    project: &str,
    batch: &[QueuedLookup],
) -> Result<Vec<Result<Option<pb::Manifest>, Error>>, Error> {
    // All prepared before any is sent, so they run in this order.
    let tx = pipelined(pool, &[PROJECT_RECORD, SCOPED_TOKENS, LOOKUP_LOCKS, KEYS_MANIFESTS]).await?;
    let client = tx.client();
    let hashes: Vec<&str> = batch.iter().map(|queued| queued.token.sha256_hex.as_str()).collect();
    let keys: HashSet<(&str, &str)> = batch
        .iter()
        .flat_map(|queued| queued.keys.iter().map(|key| (key.service.as_str(), key.branch.as_str())))
        .collect();
    let (services, branches): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
    let lookup = LookupKeys { lock_key: lock_key(project), services: &services, branches: &branches };
    let (by_project, by_hashes): (Params, Params) = (&[&project], &[&project, &hashes]);
    let by_keys: Params = &[&project, &services, &branches];
    let (_, record, scoped, (locked, before, demands), found) = futures::try_join!(
        tx.begin(),
        client.cached_query_opt(PROJECT_RECORD, by_project).map_err(pg_error),
        client.cached_query(SCOPED_TOKENS, by_hashes).map_err(pg_error),
        locked_leases(client, project, Some(lookup)),
        client.cached_query(KEYS_MANIFESTS, by_keys).map_err(pg_error),
    )?;
    let Some(holders) = Holders::read(record, &scoped)? else { return Ok(all_revoked(batch.len())) };
    // A manifest committed between the locks' check and the read is read without them: a miss.
    let found: HashMap<(String, String), pb::Manifest> = match locked {
        false => HashMap::new(),
        true => found
            .iter()
            .map(|row| Ok(((row.get(0), row.get(1)), decode_manifest(row.get::<_, &[u8]>(2))?)))
            .collect::<Result<_, Error>>()?,
    };
    let demands = Arc::new(demands);
    let mut leases = before.clone();
    let mut demand = None;
    // The last use of each manifest found, by key.
    let mut used: HashMap<(String, String), (&pb::Manifest, i64)> = HashMap::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    for queued in batch {
        if !holders.live(&queued.token) {
            outcomes.push(Err(super::super::revoked()));
            continue;
        }
        let first = queued.keys.iter().find_map(|key| {
            let place = (key.service.clone(), key.branch.clone());
            found.get_key_value(&place)
        });
        let Some((place, manifest)) = first else {
            outcomes.push(Ok(None));
            continue;
        };
        let view = (manifest.clone(), leases.clone(), Arc::clone(&demands));
        // A caller gone before it answered is granted nothing.
        let Some((granted, demand_now)) = queued.caller.ask(view).await else {
            outcomes.push(Err(unanswered()));
            continue;
        };
        leases = granted;
        demand = Some(demand_now);
        let last = used.entry(place.clone()).or_insert((manifest, queued.now_unix));
        last.1 = last.1.max(queued.now_unix);
        outcomes.push(Ok(Some(manifest.clone())));
    }
    let Some(demand) = demand else {
        // No hit: nothing to write.
        tx.commit_with(&[]).await?;
        return Ok(outcomes);
    };
    let touched: Vec<(&pb::Manifest, pb::Manifest)> = used
        .into_values()
        .filter_map(|(manifest, now_unix)| Some((manifest, ledger::touched(manifest, now_unix)?)))
        .collect();
    let mut writes: Vec<Write> = touches_write(project, &touched).into_iter().collect();
    writes.extend(lease_writes(project, &before, &leases, demand));
    tx.commit_with(&writes).await?;
    Ok(outcomes)
}
