//! Upload sessions: each one a spool file under the view's spool folder and a running sha256 of
//! the bytes written to it, held in memory under a random id. Request bodies stream straight to
//! the file through the hasher (never a whole layer in memory); the final `PUT` compares the
//! digest and size before a backend sees the file, and a mismatch deletes it. The number of open
//! sessions is capped, and a session idle past the view's idle time is dropped with its file
//! (measured on the clock the view was given, so tests move it by hand).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use proto::clock::SharedClock;
use proto::digest::DigestHasher;
use tokio::io::AsyncWriteExt;

use crate::backend::{RegistryError, UploadedBlob};
use crate::names::shown;
use crate::response::Failure;

/// Writes to a spool file go through a buffer this large, so a body of small frames still
/// reaches the disk in large writes.
const SPOOL_WRITE_BUFFER: usize = 1024 * 1024;

/// How every spool file's name begins.
const SPOOL_PREFIX: &str = "upload-";

/// The bytes of one upload so far, in a file deleted when this is dropped.
pub struct Spool {
    file: tokio::fs::File,
    path: tempfile::TempPath,
    hasher: DigestHasher,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("path", &self.path).field("size", &self.size()).finish()
    }
}

/// Why an append stopped.
#[derive(Debug)]
pub enum AppendError {
    /// The request body broke off or stalled; what arrived before is kept and counted, so the
    /// client may ask where the upload stands and go on.
    Body(String),
    /// The spool file could not be written: the upload cannot go on.
    Spool(std::io::Error),
}

impl AppendError {
    /// The failure to answer with; `what` names the upload ("upload <id>").
    pub fn into_failure(self, what: &str) -> Failure {
        match self {
            AppendError::Body(reason) => Failure::UploadInvalid(format!("{what} broke off: {reason}")),
            AppendError::Spool(err) => Failure::Registry(RegistryError::Internal(format!(
                "{what} could not be spooled on the build host: {err}"
            ))),
        }
    }
}

impl Spool {
    /// An empty spool file in `dir`.
    pub fn create(dir: &Path) -> std::io::Result<Spool> {
        let (file, path) = tempfile::Builder::new().prefix(SPOOL_PREFIX).tempfile_in(dir)?.into_parts();
        Ok(Spool { file: tokio::fs::File::from_std(file), path, hasher: DigestHasher::new() })
    }

    /// How many bytes the upload holds.
    pub fn size(&self) -> u64 {
        self.hasher.size()
    }

    /// Appends a request body as it streams. A frame that does not come within `stall_timeout`
    /// ends the append as a broken-off body. Only bytes written to the file are hashed and
    /// counted, so the file and the hash never disagree.
    pub async fn append<B>(&mut self, mut body: B, stall_timeout: Duration) -> Result<u64, AppendError>
    where
        B: HttpBody<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut appended = 0u64;
        let mut writer = tokio::io::BufWriter::with_capacity(SPOOL_WRITE_BUFFER, &mut self.file);
        let mut outcome = Ok(());
        loop {
            let frame = match tokio::time::timeout(stall_timeout, body.frame()).await {
                Err(_) => {
                    outcome = Err(AppendError::Body(format!("no bytes for {}s", stall_timeout.as_secs())));
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(err))) => {
                    outcome = Err(AppendError::Body(err.to_string()));
                    break;
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else { continue };
            if let Err(err) = writer.write_all(&data).await {
                return Err(AppendError::Spool(err));
            }
            self.hasher.update(&data);
            appended += data.len() as u64;
        }
        writer.flush().await.map_err(AppendError::Spool)?;
        outcome.map(|()| appended)
    }

    /// The finished upload when its bytes are `expected_digest` (and `expected_size`, when the
    /// client said); otherwise `DIGEST_INVALID` (or `SIZE_INVALID`), and the file is deleted.
    pub async fn finish(mut self, expected_digest: &str, expected_size: Option<u64>) -> Result<UploadedBlob, Failure> {
        let size = self.size();
        let digest = self.hasher.clone().finish();
        if digest != expected_digest {
            return Err(Failure::Registry(RegistryError::DigestInvalid(format!(
                "the uploaded bytes ({size} bytes) have digest {digest}, not {}: nothing was stored",
                shown(expected_digest)
            ))));
        }
        if let Some(expected) = expected_size
            && expected != size
        {
            return Err(Failure::Registry(RegistryError::SizeInvalid(format!(
                "the upload of {digest} holds {size} bytes, not the {expected} it was declared with: nothing was stored"
            ))));
        }
        self.file.flush().await.map_err(|err| {
            Failure::Registry(RegistryError::Internal(format!("the upload of {digest} could not be spooled: {err}")))
        })?;
        drop(self.file);
        Ok(UploadedBlob { digest, size, path: self.path })
    }
}

/// One open session.
#[derive(Debug)]
pub struct Session {
    pub repository: String,
    last_used_ms: AtomicI64,
    /// `None` once the session was finished, cancelled or dropped while a request still held it.
    pub spool: tokio::sync::Mutex<Option<Spool>>,
}

impl Session {
    /// Marks the session as used now.
    pub fn touch(&self, now_ms: i64) {
        self.last_used_ms.store(now_ms, Ordering::SeqCst);
    }
}

/// The open sessions of one view.
#[derive(Debug)]
pub struct Uploads {
    spool_dir: PathBuf,
    max_sessions: usize,
    idle: Duration,
    clock: SharedClock,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

impl Uploads {
    pub fn new(spool_dir: PathBuf, max_sessions: usize, idle: Duration, clock: SharedClock) -> Uploads {
        Uploads { spool_dir, max_sessions, idle, clock, sessions: Mutex::new(HashMap::new()) }
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_unix_ms()
    }

    /// A spool file outside any session (a monolithic upload).
    pub fn spool(&self) -> Result<Spool, Failure> {
        Spool::create(&self.spool_dir).map_err(|err| {
            Failure::Registry(RegistryError::Internal(format!(
                "cannot create an upload file in {}: {err}",
                self.spool_dir.display()
            )))
        })
    }

    /// Opens a session for `repository` and returns its id; refused when `max_sessions` are open
    /// (after dropping the idle ones).
    pub fn start(&self, repository: &str) -> Result<String, Failure> {
        self.drop_idle();
        if self.len() >= self.max_sessions {
            return Err(Failure::TooMany(format!(
                "too many uploads in progress on this view ({}): finish or cancel one first",
                self.max_sessions
            )));
        }
        let spool = self.spool()?;
        let id = format!("{:032x}", rand::random::<u128>());
        let session = Arc::new(Session {
            repository: repository.to_owned(),
            last_used_ms: AtomicI64::new(self.now_ms()),
            spool: tokio::sync::Mutex::new(Some(spool)),
        });
        self.lock().insert(id.clone(), session);
        Ok(id)
    }

    /// The session `id` of `repository` (a session is reachable only under the name it was
    /// started for).
    pub fn get(&self, repository: &str, id: &str) -> Result<Arc<Session>, Failure> {
        let session = self.lock().get(id).cloned().filter(|session| session.repository == repository);
        match session {
            Some(session) => {
                session.touch(self.now_ms());
                Ok(session)
            }
            None => Err(unknown(id)),
        }
    }

    /// Forgets session `id`; its file goes once no request holds it.
    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().remove(id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Drops every session unused for longer than the idle time, with its file. A session a
    /// request is writing is in use, whatever its time says.
    pub fn drop_idle(&self) -> usize {
        let now_ms = self.now_ms();
        let idle_ms = self.idle.as_millis() as i64;
        let mut sessions = self.lock();
        let mut n_dropped = 0;
        sessions.retain(|_, session| {
            let idle = now_ms - session.last_used_ms.load(Ordering::SeqCst) > idle_ms;
            if !idle {
                return true;
            }
            match session.spool.try_lock() {
                Ok(mut spool) => {
                    spool.take();
                    n_dropped += 1;
                    false
                }
                Err(_) => true,
            }
        });
        n_dropped
    }

    /// Drops every session (the view is stopping).
    pub fn clear(&self) {
        let sessions: Vec<Arc<Session>> = self.lock().drain().map(|(_, session)| session).collect();
        for session in sessions {
            if let Ok(mut spool) = session.spool.try_lock() {
                spool.take();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Deletes the spool files in `dir` last written more than `idle` before `now_ms`: uploads of a
/// view that was killed (a view that is alive drops its own idle sessions, and writes its live
/// ones). Returns how many went.
pub fn remove_stale_spool_files(dir: &Path, idle: Duration, now_ms: i64) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut n_removed = 0;
    for entry in entries.flatten() {
        let is_spool_file = entry.file_name().to_str().is_some_and(|name| name.starts_with(SPOOL_PREFIX));
        let written_ms = entry
            .metadata()
            .ok()
            .filter(|metadata| metadata.is_file())
            .and_then(|metadata| metadata.modified().ok())
            .and_then(|modified| modified.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|since_epoch| since_epoch.as_millis() as i64);
        if is_spool_file
            && written_ms.is_some_and(|written_ms| now_ms - written_ms > idle.as_millis() as i64)
            && std::fs::remove_file(entry.path()).is_ok()
        {
            n_removed += 1;
        }
    }
    n_removed
}

/// The answer for an id this view does not hold.
pub fn unknown(id: &str) -> Failure {
    Failure::UploadUnknown(format!("upload {} is unknown: it finished, was cancelled or expired", shown(id)))
}

#[cfg(test)]
mod tests {
    use http_body_util::{Full, StreamBody};
    use proto::clock::{Clock, ManualClock};
    use proto::digest::sha256_digest;

    use super::*;

    fn uploads(dir: &Path, max: usize) -> (Uploads, Arc<ManualClock>) {
        let clock = ManualClock::at(1_000_000);
        (Uploads::new(dir.to_owned(), max, Duration::from_secs(60), clock.clone()), clock)
    }

    fn n_files(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[tokio::test]
    async fn chunks_append_in_order_and_a_matching_digest_hands_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(dir.path()).unwrap();
        assert_eq!(spool.append(Full::new(Bytes::from_static(b"hello ")), Duration::from_secs(5)).await.unwrap(), 6);
        assert_eq!(spool.append(Full::new(Bytes::from_static(b"world")), Duration::from_secs(5)).await.unwrap(), 5);
        assert_eq!(spool.size(), 11);
        let blob = spool.finish(&sha256_digest(b"hello world"), Some(11)).await.unwrap();
        assert_eq!((blob.digest.as_str(), blob.size), (sha256_digest(b"hello world").as_str(), 11));
        assert_eq!(std::fs::read(&blob.path).unwrap(), b"hello world");
        drop(blob);
        assert_eq!(n_files(dir.path()), 0, "the file goes with the blob");
    }

    #[tokio::test]
    async fn a_digest_or_size_mismatch_deletes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(dir.path()).unwrap();
        spool.append(Full::new(Bytes::from_static(b"bytes")), Duration::from_secs(5)).await.unwrap();
        let Err(failure) = spool.finish(&sha256_digest(b"other"), None).await else { panic!("a mismatch was taken") };
        assert_eq!(failure.code(), "DIGEST_INVALID");
        assert!(failure.message().contains("nothing was stored"), "{}", failure.message());
        assert_eq!(n_files(dir.path()), 0);

        let mut spool = Spool::create(dir.path()).unwrap();
        spool.append(Full::new(Bytes::from_static(b"bytes")), Duration::from_secs(5)).await.unwrap();
        let Err(failure) = spool.finish(&sha256_digest(b"bytes"), Some(6)).await else {
            panic!("a bad size was taken")
        };
        assert_eq!(failure.code(), "SIZE_INVALID");
        assert_eq!(n_files(dir.path()), 0);
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_keeps_what_arrived() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(dir.path()).unwrap();
        let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"abc"))),
            Err(std::io::Error::other("connection reset")),
        ];
        let body = StreamBody::new(futures::stream::iter(frames));
        let Err(AppendError::Body(reason)) = spool.append(body, Duration::from_secs(5)).await else {
            panic!("a broken body was taken")
        };
        assert!(reason.contains("connection reset"), "{reason}");
        assert_eq!(spool.size(), 3);
        spool.append(Full::new(Bytes::from_static(b"def")), Duration::from_secs(5)).await.unwrap();
        let blob = spool.finish(&sha256_digest(b"abcdef"), None).await.unwrap();
        assert_eq!(std::fs::read(&blob.path).unwrap(), b"abcdef");
    }

    #[test]
    fn spool_files_left_by_a_killed_view_are_removed_and_recent_ones_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let kept = Spool::create(dir.path()).unwrap();
        std::fs::write(dir.path().join("upload-left"), b"x").unwrap();
        std::fs::write(dir.path().join("view.log"), b"x").unwrap();
        let now_ms = proto::clock::SystemClock.now_unix_ms();
        assert_eq!(remove_stale_spool_files(dir.path(), Duration::from_secs(300), now_ms), 0);
        let later_ms = now_ms + 301_000;
        assert_eq!(remove_stale_spool_files(dir.path(), Duration::from_secs(300), later_ms), 2);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        assert_eq!(left, ["view.log"]);
        drop(kept);
    }

    #[tokio::test]
    async fn sessions_are_capped_and_reachable_only_under_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let (uploads, _clock) = uploads(dir.path(), 2);
        let first = uploads.start("app").unwrap();
        uploads.start("app").unwrap();
        let Err(failure) = uploads.start("app") else { panic!("a third session was opened") };
        assert_eq!((failure.code(), failure.status().as_u16()), ("TOOMANYREQUESTS", 429));
        assert!(uploads.get("app", &first).is_ok());
        assert_eq!(uploads.get("other", &first).unwrap_err().code(), "BLOB_UPLOAD_UNKNOWN");
        assert_eq!(uploads.get("app", "0".repeat(32).as_str()).unwrap_err().code(), "BLOB_UPLOAD_UNKNOWN");
        uploads.remove(&first);
        uploads.start("app").unwrap();
        uploads.clear();
        assert_eq!(uploads.len(), 0);
        assert_eq!(n_files(dir.path()), 0);
    }

    #[tokio::test]
    async fn an_idle_session_is_dropped_with_its_file_and_a_busy_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (uploads, clock) = uploads(dir.path(), 8);
        let idle = uploads.start("app").unwrap();
        let busy = uploads.start("app").unwrap();
        let used = uploads.start("app").unwrap();
        clock.advance(Duration::from_secs(50));
        uploads.get("app", &used).unwrap();
        clock.advance(Duration::from_secs(11));
        let busy_session = uploads.get("app", &busy).unwrap();
        clock.advance(Duration::from_secs(61));
        // The session a request is writing stays, whatever its time says.
        let guard = busy_session.spool.lock().await;
        assert_eq!(uploads.drop_idle(), 2);
        assert_eq!(uploads.get("app", &idle).unwrap_err().code(), "BLOB_UPLOAD_UNKNOWN");
        assert_eq!(uploads.get("app", &used).unwrap_err().code(), "BLOB_UPLOAD_UNKNOWN");
        assert_eq!(n_files(dir.path()), 1);
        drop(guard);
        assert!(uploads.get("app", &busy).is_ok());
        assert_eq!(uploads.drop_idle(), 0, "touched by the get just now");
        clock.advance(Duration::from_secs(61));
        assert_eq!(uploads.drop_idle(), 1);
        assert_eq!(n_files(dir.path()), 0);
    }
}
