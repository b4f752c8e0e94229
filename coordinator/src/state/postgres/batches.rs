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

/// A batch's failure as each of its callers hears it: the same kind of error (an outage stays
/// one, a corrupt record one), saying the same line with its causes.
fn each_callers(error: &Error) -> Error {
    let cause =
        |source: &(dyn std::error::Error + 'static)| -> crate::error::Cause { crate::error::chain_line(source).into() };
    match error {
        Error::DatabaseUnavailable { what, source } => Error::DatabaseUnavailable { what, source: cause(&**source) },
        Error::Database { what, source } => {
            Error::Database { what: what.clone(), source: source.as_ref().map(|source| cause(&**source)) }
        }
        Error::CorruptState { record, source } => {
            Error::CorruptState { record: record.clone(), source: cause(&**source) }
        }
        other => Error::database("PostgreSQL", other.line()),
    }
}

/// The refusal a caller hears when its batch's task ended without answering it.
pub(super) fn unanswered() -> Error {
    Error::DatabaseUnavailable { what: "PostgreSQL", source: "the batch ended without an answer".into() }
}

/// What a batch says to a queued call's caller: run your rule on this view (`V`) and give
/// back its answer (`A`), or here is your call's outcome (`O`).
enum ToCaller<V, A, O> {
    Rule(V, tokio::sync::oneshot::Sender<A>),
    Done(Result<O, Error>),
}

/// The batch's end of a queued call's channel to its caller (see [`channel`]).
pub(super) struct Caller<V, A, O>(tokio::sync::mpsc::UnboundedSender<ToCaller<V, A, O>>);

impl<V, A, O> Caller<V, A, O> {
    /// Asks the caller to run its rule on `view`, at once; the answer, once given, or `None`
    /// when the caller went away first.
    pub(super) fn ask(&self, view: V) -> impl std::future::Future<Output = Option<A>> + use<V, A, O> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let sent = self.0.send(ToCaller::Rule(view, answer)).is_ok();
        async move { if sent { answered.await.ok() } else { None } }
    }

    /// Gives the caller its outcome.
    pub(super) fn answer(&self, outcome: Result<O, Error>) {
        let _ = self.0.send(ToCaller::Done(outcome));
    }
}

/// The caller's end (see [`channel`]).
pub(super) struct Waiting<V, A, O>(tokio::sync::mpsc::UnboundedReceiver<ToCaller<V, A, O>>);

impl<V, A, O> Waiting<V, A, O> {
    /// Runs `rule` on each view the batch sends, until the outcome comes.
    pub(super) async fn outcome(mut self, mut rule: impl FnMut(V) -> A) -> Result<O, Error> {
        while let Some(said) = self.0.recv().await {
            match said {
                ToCaller::Rule(view, answer) => {
                    let _ = answer.send(rule(view));
                }
                ToCaller::Done(outcome) => return outcome,
            }
        }
        Err(unanswered())
    }
}

/// A queued call's channel: the batch's end goes in the queue, the caller waits on the other.
pub(super) fn channel<V, A, O>() -> (Caller<V, A, O>, Waiting<V, A, O>) {
    let (caller, waiting) = tokio::sync::mpsc::unbounded_channel();
    (Caller(caller), Waiting(waiting))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_of_a_failed_batch_hears_its_kind_of_error_and_its_whole_line() {
        let refused = || std::io::Error::other("connection refused");
        let kept = [
            Error::database("PostgreSQL", refused()),
            Error::DatabaseUnavailable { what: "PostgreSQL", source: refused().into() },
            Error::corrupt("lc_projects", refused()),
        ];
        for failure in &kept {
            let heard = each_callers(failure);
            assert_eq!(std::mem::discriminant(&heard), std::mem::discriminant(failure), "{}", failure.line());
            assert_eq!(heard.line(), failure.line());
        }
        assert_eq!(each_callers(&kept[0]).line(), "database error: PostgreSQL: connection refused");
        let other = each_callers(&Error::NoSuchProject("p".into()));
        assert_eq!(other.line(), format!("database error: PostgreSQL: {}", Error::NoSuchProject("p".into()).line()));
    }
}
