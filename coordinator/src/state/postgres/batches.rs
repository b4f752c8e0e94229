//! A project's calls of one kind on PostgreSQL, in batches: the calls that queue in a replica
//! while one batch of the project's is in the database go in together next, as one
//! transaction of the same few statements whatever their number. Each kind says how a batch
//! runs ([`Batched`]); `begins.rs`, `commits.rs` and `lookups.rs` are the kinds. A batch runs in
//! a task of its own, so a caller that goes away never takes the others' calls with it; each
//! caller runs its own rule (the service's closure) on what the batch read, and hears its
//! outcome, over a channel its queued call carries.
//!
//! The calls of a kind wait here, not in the database: the database would run them one at a
//! time anyway (each kind behind a lock of the project's), and a transaction waiting there
//! holds a pool slot other projects could use and costs a server process woken at every
//! release (with up to 24 of a replica's waiting there, a fifth of the server's CPU at 100
//! simulated workers). Here a project has one batch of each kind in the database per replica,
//! and a project whose calls all wait (on a flush's lock, say) holds at most three
//! connections. A lookup waits behind the project's batch of lookups, a miss too: while a
//! flush holds the project's lock, a miss queued behind a hit waiting for it waits as long.
//!
//! No batch is made under the project's lock held across steps (`project_lock`), and the
//! steps a commit through the store makes under that lock (taking its save, giving back its
//! share, recording the manifest) go in no batch: behind a flush waiting for that lock,
//! batches wait for the flush, and a step waiting behind them would wait for itself.

use super::*;

/// The most calls one batch takes; the rest wait for the next.
const MOST_PER_BATCH: usize = 64;

/// The scoped tokens of the callers' hashes (`$2`) of project `$1`.
pub(super) const SCOPED_TOKENS: &str =
    "SELECT sha256, record FROM lc_scoped_tokens WHERE project = $1 AND sha256 = ANY($2)";

/// A kind of call that goes in batches.
pub(super) trait Batched: Send + Sized + 'static {
    /// What a call answers.
    type Outcome: Send;
    /// Gives the caller its outcome.
    fn answer(&self, outcome: Result<Self::Outcome, Error>);
    /// Runs one batch of `project`'s calls: each call's outcome, in order, or the batch's
    /// failure (nothing of it done).
    fn run<'a>(pool: &'a Pool, project: &'a str, batch: &'a [Self]) -> BatchRun<'a, Self::Outcome>;
}

/// A statement's parameters, as a batch's reads name them.
pub(super) type Params<'a> = &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)];

/// Each of `items` once.
pub(super) fn distinct<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    items.collect::<HashSet<_>>().into_iter().collect()
}

/// The outcomes of a batch of `n` calls whose project is gone: no token of it is live.
pub(super) fn all_revoked<T>(n: usize) -> Vec<Result<T, Error>> {
    (0..n).map(|_| Err(super::super::revoked())).collect()
}

/// A running batch (see [`Batched::run`]).
pub(super) type BatchRun<'a, T> = futures::future::BoxFuture<'a, Result<Vec<Result<T, Error>>, Error>>;

/// The calls of one kind waiting in this replica, by project. A project has an entry while its
/// batches' task runs (one per project: one batch of a project's in the database at a time
/// per replica), and the task ends when it finds none waiting.
pub(super) struct Queues<Q>(std::sync::Mutex<HashMap<String, Vec<Q>>>);

impl<Q> Default for Queues<Q> {
    fn default() -> Self {
        Queues(std::sync::Mutex::default())
    }
}

impl<Q: Batched> Queues<Q> {
    /// Queues `call` for `project`'s next batch, starting the project's task if none runs.
    pub(super) fn queue(self: &Arc<Self>, pool: &Pool, project: &str, call: Q) {
        let start = {
            let mut queues = self.0.lock().expect("batch queues");
            match queues.get_mut(project) {
                Some(waiting) => {
                    waiting.push(call);
                    false
                }
                None => {
                    queues.insert(project.to_owned(), vec![call]);
                    true
                }
            }
        };
        if start {
            tokio::spawn(Arc::clone(self).run(pool.clone(), project.to_owned()));
        }
    }

    /// Runs `project`'s batches until none waits.
    async fn run(self: Arc<Self>, pool: Pool, project: String) {
        // Should a batch panic, the project's entry goes with it (its waiting callers hear an
        // error), so its next call starts a task again.
        struct Running<'a, Q>(&'a Queues<Q>, &'a str, bool);
        impl<Q> Drop for Running<'_, Q> {
            fn drop(&mut self) {
                if self.2
                    && let Ok(mut queues) = self.0.0.lock()
                {
                    queues.remove(self.1);
                }
            }
        }
        let mut running = Running(&self, &project, true);
        loop {
            let batch: Vec<Q> = {
                let mut queues = self.0.lock().expect("batch queues");
                let waiting = queues.get_mut(&project).expect("a running project's queue");
                if waiting.is_empty() {
                    queues.remove(&project);
                    running.2 = false;
                    return;
                }
                let rest = waiting.split_off(waiting.len().min(MOST_PER_BATCH));
                std::mem::replace(waiting, rest)
            };
            match Q::run(&pool, &project, &batch).await {
                Ok(outcomes) => batch.iter().zip(outcomes).for_each(|(call, outcome)| call.answer(outcome)),
                Err(error) => batch.iter().for_each(|call| call.answer(Err(each_callers(&error)))),
            }
        }
    }
}

/// A batch's failure as each of its callers hears it: an outage stays one.
fn each_callers(error: &Error) -> Error {
    match error {
        Error::DatabaseUnavailable { what, source } => {
            Error::DatabaseUnavailable { what, source: source.to_string().into() }
        }
        other => Error::database("PostgreSQL", other.to_string()),
    }
}

/// The refusal a caller hears when its batch's task ended without answering it.
pub(super) fn unanswered() -> Error {
    Error::DatabaseUnavailable { what: "PostgreSQL", source: "the batch ended without an answer".into() }
}

/// A caller's token, owned, as a queued call carries it.
pub(super) struct Token {
    pub sha256_hex: String,
    pub id: String,
}

impl Token {
    pub(super) fn of(holder: Holder<'_>) -> Token {
        Token { sha256_hex: holder.token_sha256_hex.to_owned(), id: holder.token_id.to_owned() }
    }
}

/// The project's record and the scoped tokens of a batch's callers, as the batch read them.
pub(super) struct Holders {
    pub record: ProjectRecord,
    scoped: HashMap<String, ScopedTokenRecord>,
}

impl Holders {
    /// Decodes the project's row (none: no project) and the rows of [`SCOPED_TOKENS`].
    pub(super) fn read(
        record: Option<tokio_postgres::Row>,
        scoped: &[tokio_postgres::Row],
    ) -> Result<Option<Holders>, Error> {
        let Some(record) = record else { return Ok(None) };
        let record: ProjectRecord = from_json("lc_projects", record.get::<_, &str>(0))?;
        let scoped = scoped
            .iter()
            .map(|row| Ok((row.get::<_, String>(0), from_json("lc_scoped_tokens", row.get::<_, &str>(1))?)))
            .collect::<Result<_, Error>>()?;
        Ok(Some(Holders { record, scoped }))
    }

    /// Whether `token` is one of the project's live tokens.
    pub(super) fn live(&self, token: &Token) -> bool {
        let holder = Holder { token_sha256_hex: &token.sha256_hex, token_id: &token.id };
        holder.is_live(&self.record, self.scoped.get(&token.sha256_hex))
    }
}
