//! Single flight: begun saves, and the claims that make a blob two saves of a project need
//! uploaded once. The records live in the state's ephemeral part (this process's memory on
//! sled, the database replicas share on PostgreSQL); every rule here runs on one consistent
//! view of a project's open saves, at a time (unix milliseconds) its caller passes in.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proto::v1 as pb;

use crate::error::Error;
use crate::state::{Ephemeral, OpenSave, OpenSaves};

/// How long a begun save may take before its commit is refused.
const SAVE_LIFETIME: Duration = Duration::from_secs(6 * 3600);
/// Saves one token of a project holds at once (each kept alive by its worker, or silent for
/// less than [`SILENT_SAVE_CLAIM_TTLS`] claim lifetimes): a build matrix saves in parallel, a
/// token cannot pile up saves without end. Counted per token, so a less trusted token (a
/// fork's pull requests) that holds its all never keeps the default branch's from saving.
pub(crate) const MOST_SAVES_PER_TOKEN: usize = 64;
/// Blob and image names the saves of one token may hold in memory together (about 10 MB).
const MOST_HELD_NAMES_PER_TOKEN: usize = 100_000;
/// How long after its save began a claim still holds up another save of the same token: a
/// claimant alive but stuck (its keep-alive runs, its upload does not) delays the others this
/// long at most, then they upload the blob themselves (commit verifies it either way).
const CLAIM_HOLDS_UP_FOR: Duration = Duration::from_secs(10 * 60);
/// A save whose worker is silent for this many claim lifetimes (10 minutes by default) is
/// forgotten: its worker, should it come back, hears that the save is unknown and begins again.
const SILENT_SAVE_CLAIM_TTLS: u32 = 40;

/// Begun saves and their single-flight claims, kept in the state's ephemeral records (this
/// process's memory on sled, the database replicas share on PostgreSQL). Every rule below runs
/// on one consistent view of the project's open saves, at a time (unix milliseconds) its
/// caller passes in.
pub struct PendingSaves {
    saves: Arc<dyn Ephemeral>,
    /// How long a claim outlives its worker's last sign of life.
    claim_ttl: Duration,
    /// What a commit needs of the saves begun through this process, by save ID: facts fixed at
    /// the begin, so a commit through this process reads none of them from the state (one
    /// transaction on PostgreSQL). Whether the save is still open is the commit's own step's
    /// to check: it takes the save's record.
    begun_here: std::sync::Mutex<HashMap<String, SaveFacts>>,
}

/// Saves whose facts this process keeps at most; beyond, the ones too old to commit are
/// forgotten, then all (a commit then reads them from the state).
const MOST_SAVES_BEGUN_HERE: usize = 10_000;

/// What registering a save answered.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Begun {
    /// The missing blobs this save claimed: it uploads them.
    pub to_upload: Vec<String>,
    /// The missing blobs another live save of the project is uploading.
    pub in_flight: Vec<String>,
    /// (project, save ID) of the project's saves that fell silent.
    pub silent: Vec<(String, String)>,
}

fn millis(duration: Duration) -> i64 {
    duration.as_millis() as i64
}

/// The names a save holds (`claimed` is a part of `named`).
fn held_names(save: &OpenSave) -> usize {
    save.named.len() + save.image_ids.len()
}

/// Whether a save was begun too long ago to commit.
fn too_old(began_unix_ms: i64, now: i64) -> bool {
    now.saturating_sub(began_unix_ms) >= millis(SAVE_LIFETIME)
}

impl PendingSaves {
    pub fn new(claim_ttl: Duration, saves: Arc<dyn Ephemeral>) -> PendingSaves {
        PendingSaves { saves, claim_ttl, begun_here: Default::default() }
    }

    /// How often a worker says it is alive: a claim survives two missed calls.
    pub fn keep_alive_interval(&self) -> Duration {
        (self.claim_ttl / 3).max(Duration::from_secs(1))
    }

    fn claims(&self, save: &OpenSave, project: &str, digest: &str, now: i64) -> bool {
        save.project == project
            && now.saturating_sub(save.last_alive_unix_ms) < millis(self.claim_ttl)
            && save.claimed.contains(digest)
    }

    /// Whether a save of `token_id` waits for `claimant`'s upload of `digest`: only for a
    /// live claim of a save of the same token, begun less than [`CLAIM_HOLDS_UP_FOR`] ago.
    /// A claim of another token (another scope: a pull request's, or simply another) never
    /// holds a save up: the save uploads the blob itself, and commit verifies what is stored.
    fn holds_up(&self, claimant: &OpenSave, token_id: &str, project: &str, digest: &str, now: i64) -> bool {
        claimant.token_id == token_id
            && now.saturating_sub(claimant.began_unix_ms) < millis(CLAIM_HOLDS_UP_FOR)
            && self.claims(claimant, project, digest, now)
    }

    /// Runs `change` on the open saves of `project`.
    async fn change<R: Send>(
        &self,
        project: &str,
        change: impl FnOnce(&mut OpenSaves) -> R + Send,
    ) -> Result<R, Error> {
        let (mut change, mut result) = (Some(change), None);
        self.saves
            .update_open_saves(project, &mut |saves| {
                if let Some(change) = change.take() {
                    result = Some(change(saves));
                }
            })
            .await?;
        Ok(result.expect("the change ran"))
    }

    /// Answers `read` of the open saves of `project`.
    async fn read<R: Send>(&self, project: &str, read: impl Fn(&OpenSaves) -> R + Send + Sync) -> Result<R, Error> {
        let mut result = None;
        self.saves.read_open_saves(Some(project), &mut |saves| result = Some(read(saves))).await?;
        Ok(result.expect("the read ran"))
    }

    /// Registers a save. Of the `missing` blobs it claims those no other save holds it up for
    /// (see [`PendingSaves::holds_up`]), and returns (claimed: upload these, in flight: another
    /// save of its token does). A blob claimed only by an earlier save of the same cache key is
    /// taken over: that is a retry of a save that failed or was killed, or a save it replaces
    /// anyway, and a retry must never wait for the save it repeats.
    /// Refused while its token holds [`MOST_SAVES_PER_TOKEN`] saves or
    /// [`MOST_HELD_NAMES_PER_TOKEN`] names. Also answers the project's saves that fell
    /// silent (see [`PendingSaves::newly_silent`]), in the same step.
    /// (The service registers a save inside its begin's step: see [`PendingSaves::begin_in`].)
    #[cfg(test)]
    pub(crate) async fn begin(
        &self,
        save_id: String,
        save: OpenSave,
        missing: Vec<String>,
        now: i64,
    ) -> Result<Begun, Error> {
        let project = save.project.clone();
        self.change(&project, move |saves| self.begin_in(saves, save_id, save, missing, now)).await?
    }

    /// [`PendingSaves::begin`] inside a step its caller runs on the project's open `saves`.
    pub(crate) fn begin_in(
        &self,
        saves: &mut OpenSaves,
        save_id: String,
        mut save: OpenSave,
        missing: Vec<String>,
        now: i64,
    ) -> Result<Begun, Error> {
        {
            let silent = self.note_silent(saves, &save.project, now);
            save.named.extend(missing.iter().cloned());
            let of_token =
                || saves.values().filter(|other| other.project == save.project && other.token_id == save.token_id);
            let whose = if save.token_id.is_empty() {
                format!("project {:?}'s token", save.project)
            } else {
                format!("token {} of project {:?}", save.token_id, save.project)
            };
            if of_token().count() >= MOST_SAVES_PER_TOKEN {
                return Err(Error::TooMany(format!(
                    "{whose} has {MOST_SAVES_PER_TOKEN} saves in progress, the most it may: save again once some have committed"
                )));
            }
            let held: usize = of_token().map(held_names).sum();
            if held + held_names(&save) > MOST_HELD_NAMES_PER_TOKEN {
                return Err(Error::TooMany(format!(
                    "{whose}'s saves in progress name {held} blobs and images, and this one would take them over \
                     {MOST_HELD_NAMES_PER_TOKEN}: save again once some have committed"
                )));
            }
            let same_key = |other: &OpenSave| other.service == save.service && other.branch == save.branch;
            let (in_flight, to_upload): (Vec<String>, Vec<String>) = missing.into_iter().partition(|digest| {
                saves
                    .values()
                    .any(|other| !same_key(other) && self.holds_up(other, &save.token_id, &save.project, digest, now))
            });
            for other in saves.values_mut().filter(|other| other.project == save.project && same_key(other)) {
                for digest in &to_upload {
                    other.claimed.remove(digest);
                }
            }
            save.claimed = to_upload.iter().cloned().collect();
            saves.insert(save_id, save);
            Ok(Begun { to_upload, in_flight, silent })
        }
    }

    /// The blobs open saves of `project` name (a garbage collection keeps them).
    pub(crate) async fn named(&self, project: &str) -> Result<HashSet<String>, Error> {
        self.read(project, |saves| {
            saves.values().filter(|save| save.project == project).flat_map(|save| save.named.iter().cloned()).collect()
        })
        .await
    }

    /// The blobs live saves of `project` are uploading (the post-flush sweep keeps them).
    pub(crate) async fn in_flight(&self, project: &str, now: i64) -> Result<HashSet<String>, Error> {
        self.read(project, |saves| {
            let live = saves.values().filter(|save| {
                save.project == project && now.saturating_sub(save.last_alive_unix_ms) < millis(self.claim_ttl)
            });
            live.flat_map(|save| save.claimed.iter().cloned()).collect()
        })
        .await
    }

    /// Whether a save of `project` other than `waiting_save_id` is uploading `digest` and
    /// holds the waiting save up (see [`PendingSaves::holds_up`]): a save never waits for its
    /// own claims (what it did not upload is simply not there), nor for another token's.
    pub(crate) async fn in_flight_for(
        &self,
        project: &str,
        digest: &str,
        waiting_save_id: &str,
        now: i64,
    ) -> Result<bool, Error> {
        self.read(project, |saves| {
            let Some(waiting) = saves.get(waiting_save_id).filter(|waiting| waiting.project == project) else {
                return false;
            };
            saves.iter().any(|(save_id, save)| {
                save_id != waiting_save_id && self.holds_up(save, &waiting.token_id, project, digest, now)
            })
        })
        .await
    }

    /// Records a sign of life of a save's worker.
    pub(crate) async fn keep_alive(&self, save_id: &str, project: &str, now: i64) -> Result<(), Error> {
        self.change(project, |saves| match saves.get_mut(save_id) {
            Some(save) if save.project == project && !too_old(save.began_unix_ms, now) => {
                save.last_alive_unix_ms = now;
                save.silence_noted = false;
                Ok(())
            }
            _ => Err(Error::NoSuchSave(save_id.to_owned())),
        })
        .await?
    }

    /// Saves of every project whose worker has been silent for the claim lifetime (killed,
    /// most likely): their claims have lapsed, and their shares of the transfer budget should
    /// too. Each is named once; the save itself stays begun, should its worker come back and
    /// commit. Saves silent for [`SILENT_SAVE_CLAIM_TTLS`] claim lifetimes, or begun too long
    /// ago, are forgotten. A look at every project's saves, taking no lock, finds the projects
    /// with one to name or forget; each of those is then changed under its own lock alone, so
    /// no begin or commit ever waits for this beyond its own project's.
    pub(crate) async fn newly_silent(&self, now: i64) -> Result<Vec<(String, String)>, Error> {
        let mut due = std::collections::BTreeSet::new();
        self.saves
            .read_open_saves(None, &mut |saves| {
                due = saves
                    .values()
                    .filter(|save| self.silence_due(save, now))
                    .map(|save| save.project.clone())
                    .collect();
            })
            .await?;
        let mut silent = Vec::new();
        for project in due {
            silent.extend(self.change(&project, |saves| self.note_silent(saves, &project, now)).await?);
        }
        silent.sort();
        Ok(silent)
    }

    /// Whether a save is to be forgotten at `now` (silent too long, or begun too long ago).
    fn forgotten(&self, save: &OpenSave, now: i64) -> bool {
        let forget_silent = millis(self.claim_ttl * SILENT_SAVE_CLAIM_TTLS);
        too_old(save.began_unix_ms, now) || now.saturating_sub(save.last_alive_unix_ms) >= forget_silent
    }

    /// Whether a save's silence is to be named at `now`.
    fn newly_silent_at(&self, save: &OpenSave, now: i64) -> bool {
        !save.silence_noted && now.saturating_sub(save.last_alive_unix_ms) >= millis(self.claim_ttl)
    }

    /// Whether [`PendingSaves::note_silent`] has anything to do with a save at `now`.
    fn silence_due(&self, save: &OpenSave, now: i64) -> bool {
        self.forgotten(save, now) || self.newly_silent_at(save, now)
    }

    /// [`PendingSaves::newly_silent`] on `project`'s saves among `saves`.
    fn note_silent(&self, saves: &mut OpenSaves, project: &str, now: i64) -> Vec<(String, String)> {
        saves.retain(|_, save| save.project != project || !self.forgotten(save, now));
        let mut silent = Vec::new();
        for (save_id, save) in saves.iter_mut().filter(|(_, save)| save.project == project) {
            if self.newly_silent_at(save, now) {
                save.silence_noted = true;
                silent.push((save.project.clone(), save_id.clone()));
            }
        }
        silent.sort();
        silent
    }

    /// Forgets a save (and its claims); whether it was there.
    pub(crate) async fn abandon(&self, save_id: &str, project: &str) -> Result<bool, Error> {
        self.forget_here(save_id);
        self.change(project, |saves| forget(saves, save_id, project)).await
    }

    /// Forgets every save of a project (a flush: none of them can commit).
    pub(crate) async fn abandon_project(&self, project: &str) -> Result<(), Error> {
        self.begun_here.lock().expect("saves begun here").retain(|_, facts| facts.project != project);
        self.change(project, |saves| saves.retain(|_, save| save.project != project)).await
    }

    /// Keeps what a commit needs of `save`, just begun through this process as `save_id`.
    pub(crate) fn begun_here(&self, save_id: &str, save: &OpenSave, now: i64) {
        let mut begun = self.begun_here.lock().expect("saves begun here");
        if begun.len() >= MOST_SAVES_BEGUN_HERE {
            begun.retain(|_, facts| !too_old(facts.began_unix_ms, now));
        }
        if begun.len() >= MOST_SAVES_BEGUN_HERE {
            begun.clear();
        }
        begun.insert(save_id.to_owned(), SaveFacts::of(save));
    }

    /// Forgets the facts of a save begun through this process (committed or abandoned).
    pub(crate) fn forget_here(&self, save_id: &str) {
        self.begun_here.lock().expect("saves begun here").remove(save_id);
    }

    /// What a commit needs of a begun save, which stays begun until [`PendingSaves::take`]: kept
    /// since its begin when that was through this process (the commit's step then finds
    /// whether it is still open), read from the state otherwise.
    pub(crate) async fn describe(&self, save_id: &str, project: &str, now: i64) -> Result<SaveFacts, Error> {
        let kept = self.begun_here.lock().expect("saves begun here").get(save_id).cloned();
        match kept {
            Some(facts) if facts.project == project && !too_old(facts.began_unix_ms, now) => Ok(facts),
            Some(_) => Err(Error::NoSuchSave(save_id.to_owned())),
            None => self.describe_open(save_id, project, now).await,
        }
    }

    /// What a commit needs of a begun save, read from the state: [`Error::NoSuchSave`] when it
    /// is no longer open.
    pub(crate) async fn describe_open(&self, save_id: &str, project: &str, now: i64) -> Result<SaveFacts, Error> {
        self.read(project, |saves| match saves.get(save_id) {
            Some(save) if save.project == project && !too_old(save.began_unix_ms, now) => Ok(SaveFacts::of(save)),
            _ => Err(Error::NoSuchSave(save_id.to_owned())),
        })
        .await?
    }

    pub(crate) async fn take(&self, save_id: &str, project: &str) -> Result<(), Error> {
        if self.abandon(save_id, project).await? { Ok(()) } else { Err(Error::NoSuchSave(save_id.to_owned())) }
    }
}

/// Forgets the save `save_id` of `project` from `saves` (and its claims), inside a step its
/// caller runs on the project's open saves; whether it was there.
pub(crate) fn forget(saves: &mut OpenSaves, save_id: &str, project: &str) -> bool {
    if saves.get(save_id).is_some_and(|save| save.project == project) {
        saves.remove(save_id);
        return true;
    }
    false
}

/// A begun save, as its commit sees it: what its begin fixed.
#[derive(Debug, Clone)]
pub(crate) struct SaveFacts {
    pub project: String,
    pub key: pb::CacheKey,
    pub generation: u64,
    pub image_ids: Vec<String>,
    pub engine_version: String,
    pub began_unix_ms: i64,
    pub host: String,
    /// Its begin granted it a share of the transfer budget.
    pub leased: bool,
}

impl SaveFacts {
    fn of(save: &OpenSave) -> SaveFacts {
        SaveFacts {
            project: save.project.clone(),
            key: pb::CacheKey { service: save.service.clone(), branch: save.branch.clone() },
            generation: save.generation,
            image_ids: save.image_ids.clone(),
            engine_version: save.engine_version.clone(),
            began_unix_ms: save.began_unix_ms,
            host: save.host.clone(),
            leased: save.leased,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;

    use super::*;

    pub(crate) fn pending(project: &str, service: &str, now: i64) -> OpenSave {
        OpenSave {
            project: project.into(),
            token_id: String::new(),
            service: service.into(),
            branch: String::new(),
            generation: 0,
            image_ids: Vec::new(),
            engine_version: String::new(),
            began_unix_ms: now,
            host: String::new(),
            last_alive_unix_ms: now,
            claimed: BTreeSet::new(),
            named: BTreeSet::new(),
            silence_noted: false,
            leased: false,
        }
    }

    fn digests(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    fn set(names: &[&str]) -> HashSet<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    const TTL: Duration = Duration::from_secs(15);
    /// The clock of these tests, in unix milliseconds.
    const START: i64 = 1_800_000_000_000;

    fn saves() -> PendingSaves {
        PendingSaves::new(TTL, Arc::new(crate::state::InMemory::default()))
    }

    /// The rules of single flight on `saves`, which two replicas may share: `other` sees what
    /// `saves` registered (the same saves, on sled; another replica, on PostgreSQL).
    pub(crate) async fn single_flight_holds(saves: &PendingSaves, other: &PendingSaves, project: &str) {
        let now = START;
        let Begun { to_upload: upload, in_flight, .. } =
            saves.begin("s1".into(), pending(project, "one", now), digests(&["a", "b"]), now).await.unwrap();
        assert_eq!((upload, in_flight), (digests(&["a", "b"]), digests(&[])));
        let Begun { to_upload: upload, in_flight, .. } =
            other.begin("s2".into(), pending(project, "two", now), digests(&["b", "c"]), now).await.unwrap();
        assert_eq!((upload, in_flight), (digests(&["c"]), digests(&["b"])));
        // Another project never waits for this one's uploads.
        let elsewhere = format!("{project}-other");
        let Begun { to_upload: upload, in_flight, .. } =
            other.begin("s3".into(), pending(&elsewhere, "one", now), digests(&["a"]), now).await.unwrap();
        assert_eq!((upload, in_flight), (digests(&["a"]), digests(&[])));
        assert_eq!(other.in_flight(project, now).await.unwrap(), set(&["a", "b", "c"]));
        assert!(!other.in_flight_for(project, "b", "s1", now).await.unwrap(), "a save never waits for its own claim");
        assert!(other.in_flight_for(project, "b", "s2", now).await.unwrap());
        assert_eq!(other.named(project).await.unwrap(), set(&["a", "b", "c"]));
        let facts = other.describe("s1", project, now).await.unwrap();
        assert_eq!(facts.key.service, "one");
        // The claimant's commit (or its abandoning the save) ends the claim.
        other.take("s1", project).await.unwrap();
        assert!(!saves.in_flight_for(project, "b", "s2", now).await.unwrap());
        assert_eq!(saves.in_flight(project, now).await.unwrap(), set(&["c"]));
        assert!(saves.take("s1", project).await.is_err(), "a save commits once");
        // A flush forgets the project's saves, and only its.
        saves.abandon_project(project).await.unwrap();
        assert!(other.named(project).await.unwrap().is_empty());
        assert_eq!(other.named(&elsewhere).await.unwrap(), set(&["a"]));
    }

    #[tokio::test]
    async fn a_blob_another_save_uploads_is_uploaded_once() {
        let saves = saves();
        single_flight_holds(&saves, &saves, "web").await;
    }

    #[tokio::test]
    async fn a_retry_of_the_same_cache_key_takes_the_claims_over() {
        let saves = saves();
        let now = START;
        saves.begin("killed".into(), pending("web", "one", now), digests(&["a", "b"]), now).await.unwrap();
        // The retry (same key) uploads both itself, at once; another key waits for the retry.
        let Begun { to_upload: upload, in_flight, .. } =
            saves.begin("retry".into(), pending("web", "one", now), digests(&["a", "b"]), now).await.unwrap();
        assert_eq!((upload, in_flight), (digests(&["a", "b"]), digests(&[])));
        saves.abandon("retry", "web").await.unwrap();
        assert!(
            saves.in_flight("web", now).await.unwrap().is_empty(),
            "the killed save no longer claims what its retry took over"
        );
    }

    #[tokio::test]
    async fn a_claim_lapses_after_its_workers_last_sign_of_life() {
        let saves = saves();
        let start = START;
        saves.begin("s1".into(), pending("web", "one", start), digests(&["a"]), start).await.unwrap();
        let later = start + 10_000;
        assert!(saves.in_flight("web", later).await.unwrap().contains("a"));
        saves.keep_alive("s1", "web", later).await.unwrap();
        assert!(saves.in_flight("web", later + 14_000).await.unwrap().contains("a"));
        let lapsed = later + millis(TTL);
        assert!(saves.in_flight("web", lapsed).await.unwrap().is_empty(), "no sign of life for the claim's lifetime");
        let begun = saves.begin("s2".into(), pending("web", "two", lapsed), digests(&["a"]), lapsed).await.unwrap();
        assert_eq!(
            (begun.to_upload, begun.in_flight),
            (digests(&["a"]), digests(&[])),
            "a lapsed claim is uploaded again"
        );
        assert_eq!(begun.silent, vec![("web".to_string(), "s1".to_string())], "the begin names the silent save");
        assert!(saves.newly_silent(lapsed).await.unwrap().is_empty(), "each silent save is named once");
        assert!(saves.keep_alive("s1", "api", lapsed).await.is_err(), "another project's save is not found");
        assert!(saves.abandon("s2", "web").await.unwrap() && !saves.abandon("s2", "web").await.unwrap());
        assert!(saves.keep_alive("s2", "web", lapsed).await.is_err());
        assert_eq!(saves.keep_alive_interval(), Duration::from_secs(5));
        // Silent again, once more named, now by the look over every project, with another
        // project's silent save.
        let later = lapsed + millis(TTL);
        saves.keep_alive("s1", "web", lapsed).await.unwrap();
        saves.begin("s3".into(), pending("api", "one", lapsed), digests(&["b"]), lapsed).await.unwrap();
        let both = vec![("api".to_string(), "s3".to_string()), ("web".to_string(), "s1".to_string())];
        assert_eq!(saves.newly_silent(later).await.unwrap(), both);
        assert!(saves.newly_silent(later).await.unwrap().is_empty(), "each silent save is named once");
        let forgotten = later + millis(TTL * SILENT_SAVE_CLAIM_TTLS);
        assert!(saves.newly_silent(forgotten).await.unwrap().is_empty());
        assert!(saves.keep_alive("s3", "api", forgotten).await.is_err(), "silent that long, it is forgotten");
    }

    #[tokio::test]
    async fn a_project_holds_a_bounded_number_of_saves_and_names_and_silent_ones_are_forgotten() {
        let saves = saves();
        let start = START;
        for i in 0..MOST_SAVES_PER_TOKEN {
            let save = pending("web", &format!("svc{i}"), start);
            saves.begin(format!("s{i}"), save, digests(&["a"]), start).await.unwrap();
        }
        let refused =
            saves.begin("over".into(), pending("web", "over", start), digests(&["a"]), start).await.unwrap_err();
        assert!(refused.to_string().contains("project \"web\"'s token has 64 saves in progress"), "{refused}");
        // Another project is not held up by this one's saves.
        saves.begin("api".into(), pending("api", "one", start), digests(&["a"]), start).await.unwrap();
        // Saves silent for 40 claim lifetimes are forgotten; one kept alive stays.
        let later = start + millis(TTL * SILENT_SAVE_CLAIM_TTLS) - 1_000;
        saves.keep_alive("s0", "web", later).await.unwrap();
        let forgotten = later + 2_000;
        saves.begin("next".into(), pending("web", "next", forgotten), digests(&["a"]), forgotten).await.unwrap();
        assert!(saves.keep_alive("s0", "web", forgotten).await.is_ok());
        assert!(saves.keep_alive("s1", "web", forgotten).await.is_err(), "a silent save was forgotten");
        // Names held: a save that would take the project over the bound is refused.
        let many: Vec<String> = (0..MOST_HELD_NAMES_PER_TOKEN - 10).map(|i| format!("d{i}")).collect();
        saves.begin("big".into(), pending("web", "big", forgotten), many, forgotten).await.unwrap();
        let more = (0..20).map(|i| format!("x{i}")).collect();
        let refused = saves.begin("more".into(), pending("web", "more", forgotten), more, forgotten).await.unwrap_err();
        assert!(refused.to_string().contains("blobs and images"), "{refused}");
    }

    fn of_token(token_id: &str, service: &str, branch: &str, now: i64) -> OpenSave {
        OpenSave { token_id: token_id.into(), branch: branch.into(), ..pending("web", service, now) }
    }

    #[tokio::test]
    async fn a_claim_of_another_token_never_holds_a_save_up() {
        let saves = saves();
        let start = START;
        // A pull request's save names the default branch's next layer and keeps itself alive.
        let pr = of_token("tok_pr", "app", "pr-1", start);
        saves.begin("pr".into(), pr, digests(&["next"]), start).await.unwrap();
        let later = start + 10_000;
        saves.keep_alive("pr", "web", later).await.unwrap();
        // The project token's save uploads it itself, and its commit never waits for the claim.
        let main = of_token("", "app", "main", later);
        let begun = saves.begin("main".into(), main, digests(&["next"]), later).await.unwrap();
        assert_eq!((begun.to_upload, begun.in_flight), (digests(&["next"]), digests(&[])));
        assert!(!saves.in_flight_for("web", "next", "main", later).await.unwrap());
        // Another save of the same token still waits for the claim (single flight)...
        let sibling = of_token("tok_pr", "api", "pr-2", later);
        let begun = saves.begin("sibling".into(), sibling, digests(&["next"]), later).await.unwrap();
        assert_eq!((begun.to_upload, begun.in_flight), (digests(&[]), digests(&["next"])));
        assert!(saves.in_flight_for("web", "next", "sibling", later).await.unwrap());
        // ...for a while: a claimant alive but stuck holds it up 10 minutes of its save at most.
        let stuck = start + millis(CLAIM_HOLDS_UP_FOR);
        saves.keep_alive("pr", "web", stuck).await.unwrap();
        saves.keep_alive("sibling", "web", stuck).await.unwrap();
        assert!(!saves.in_flight_for("web", "next", "sibling", stuck).await.unwrap());
        let retry = of_token("tok_pr", "api", "pr-3", stuck);
        let begun = saves.begin("retry".into(), retry, digests(&["next"]), stuck).await.unwrap();
        assert_eq!((begun.to_upload, begun.in_flight), (digests(&["next"]), digests(&[])));
    }

    #[tokio::test]
    async fn a_token_holding_its_most_saves_never_keeps_another_token_from_saving() {
        let saves = saves();
        let now = START;
        for i in 0..MOST_SAVES_PER_TOKEN {
            let save = of_token("tok_pr", &format!("svc{i}"), "pr-1", now);
            saves.begin(format!("pr{i}"), save, digests(&["a"]), now).await.unwrap();
        }
        let over = of_token("tok_pr", "over", "pr-1", now);
        let refused = saves.begin("over".into(), over, digests(&["a"]), now).await.unwrap_err();
        assert!(refused.to_string().contains("token tok_pr of project \"web\" has 64 saves in progress"), "{refused}");
        // The project token's save of the default branch, and another scoped token's, go on.
        saves.begin("main".into(), of_token("", "app", "main", now), digests(&["a"]), now).await.unwrap();
        saves.begin("rel".into(), of_token("tok_rel", "app", "release-1", now), digests(&["a"]), now).await.unwrap();
        // Names are counted per token too.
        let many: Vec<String> = (0..MOST_HELD_NAMES_PER_TOKEN - 70).map(|i| format!("d{i}")).collect();
        let filled = saves.begin("big".into(), of_token("tok_big", "big", "pr-2", now), many, now).await;
        assert!(filled.is_ok(), "another token's names are not this one's");
        let more = (0..100).map(|i| format!("x{i}")).collect();
        let refused = saves.begin("more".into(), of_token("tok_big", "more", "pr-3", now), more, now).await;
        assert!(refused.unwrap_err().to_string().contains("blobs and images"));
        let more = (0..100).map(|i| format!("y{i}")).collect();
        saves.begin("main2".into(), of_token("", "app2", "main", now), more, now).await.unwrap();
    }
}
