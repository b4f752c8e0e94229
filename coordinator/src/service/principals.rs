//! Who a worker's token is (its [`Principal`]), and the admin API's commands over tokens and
//! projects (create, list and revoke scoped tokens, rotate a project's token, delete a project
//! with everything it holds).

use proto::v1 as pb;

use super::CacheService;
use crate::error::Error;
use crate::state::{ScopedTokenRecord, revoked};
use crate::tokens::{self, BranchScope, Principal};

/// The longest a scoped token may live.
const MOST_TOKEN_LIFETIME_SECONDS: u64 = 400 * 24 * 3600;

fn token_message(record: &ScopedTokenRecord) -> pb::ScopedToken {
    pb::ScopedToken {
        id: record.id.clone(),
        read_branches: record.scope.read.clone(),
        write_branches: record.scope.write.clone(),
        created_unix: record.created_unix,
        expires_unix: record.expires_unix,
    }
}

impl CacheService {
    /// The principal a worker token stands for: the project token, or a live scoped token.
    /// A check made lately is reused (see [`tokens::RecentTokens`]).
    pub async fn authenticate_worker(&self, token: Option<&str>) -> Result<Principal, Error> {
        let token = token.ok_or(Error::Unauthenticated("missing project token: pass --token or set CACHE_TOKEN"))?;
        if tokens::token_matches(token, &self.admin_token_sha256_hex) {
            return Err(Error::PermissionDenied("the admin token cannot be used by a worker: use a project token"));
        }
        let project = tokens::project_of_token(token).ok_or_else(revoked)?;
        let token_sha256_hex = tokens::sha256_hex(token);
        let reused = |recent: &tokens::RecentTokens| recent.get(&token_sha256_hex, self.clock.now_unix_ms());
        if let Some((principal, expires_unix)) = reused(&self.recent_tokens) {
            self.check_unexpired(expires_unix)?;
            return Ok(principal);
        }
        let _one_check_at_a_time = self.recent_tokens.checking(&token_sha256_hex).await;
        if let Some((principal, expires_unix)) = reused(&self.recent_tokens) {
            self.check_unexpired(expires_unix)?;
            return Ok(principal);
        }
        let now_unix_ms = self.clock.now_unix_ms();
        let record = self.db.project(project).await?.ok_or_else(revoked)?;
        let (principal, expires_unix) = if tokens::token_matches_hash(&token_sha256_hex, &record.token_sha256_hex) {
            (Principal { project: record.name, token_id: String::new(), scope: None, token_sha256_hex }, 0)
        } else {
            // The lookup is by the token's hash: what it reveals (whether a hash is recorded)
            // is worth nothing without the 256-bit secret.
            let scoped = self.db.scoped_token(&token_sha256_hex).await?;
            let scoped = scoped.filter(|scoped| scoped.project == record.name).ok_or_else(revoked)?;
            self.check_unexpired(scoped.expires_unix)?;
            let (project, token_id, scope) = (scoped.project, scoped.id, Some(scoped.scope));
            (Principal { project, token_id, scope, token_sha256_hex }, scoped.expires_unix)
        };
        self.recent_tokens.put(principal.clone(), expires_unix, now_unix_ms);
        Ok(principal)
    }

    /// Refuses a token past its expiry (unix seconds; 0: none).
    fn check_unexpired(&self, expires_unix: i64) -> Result<(), Error> {
        if expires_unix != 0 && expires_unix <= self.clock.now_unix() {
            return Err(Error::Unauthenticated("the token has expired: ask the operator for a new one"));
        }
        Ok(())
    }

    /// Refuses a principal whose token was revoked (or rotated away) since it was
    /// authenticated: asked under the project's publish lock before a key is minted for it.
    pub(super) async fn check_still_live(&self, principal: &Principal) -> Result<(), Error> {
        self.db.holders_project(&principal.project, principal.holder()).await.map(|_| ())
    }

    /// A new token of `project` that may read and write only the branches of `scope`, for
    /// `expires_seconds` (0: no expiry). Returns it with the token itself, shown once.
    pub async fn create_token(
        &self,
        project: &str,
        scope: BranchScope,
        expires_seconds: u64,
    ) -> Result<(pb::ScopedToken, String), Error> {
        self.existing_project(project).await?;
        scope.validate()?;
        if expires_seconds > MOST_TOKEN_LIFETIME_SECONDS {
            return Err(Error::InvalidArgument("a token expires within 400 days at most".into()));
        }
        let token = tokens::new_project_token(project);
        let now = self.clock.now_unix();
        let record = ScopedTokenRecord {
            id: format!("tok_{}", &tokens::random_hex_32()[..16]),
            project: project.to_owned(),
            scope,
            created_unix: now,
            expires_unix: if expires_seconds == 0 { 0 } else { now + expires_seconds as i64 },
        };
        self.db.insert_scoped_token(&tokens::sha256_hex(&token), &record).await?;
        // The token is printed once: it must outlive a crash right after.
        self.db.durable().await?;
        tracing::info!(project, token_id = record.id, read = ?record.scope.read, write = ?record.scope.write, "scoped token created");
        Ok((token_message(&record), token))
    }

    pub async fn list_tokens(&self, project: &str) -> Result<Vec<pb::ScopedToken>, Error> {
        self.existing_project(project).await?;
        Ok(self.db.scoped_tokens(project).await?.iter().map(token_message).collect())
    }

    /// Revokes a scoped token and the storage keys issued to it. Revoking one that is gone
    /// is refused, so a typo is not mistaken for success.
    pub async fn revoke_token(&self, project: &str, token_id: &str) -> Result<(), Error> {
        self.existing_project(project).await?;
        {
            let _no_minting = self.lock_project(project, super::Lock::Exclusive).await?;
            if self.db.remove_scoped_tokens(project, Some(token_id)).await?.is_empty() {
                return Err(Error::InvalidArgument(format!("project {project:?} has no token {token_id:?}")));
            }
            self.db.revoke_keys(project, token_id).await?;
        }
        self.recent_tokens.forget_project(project);
        self.db.durable().await?;
        tracing::info!(project, token_id, "scoped token revoked");
        Ok(())
    }

    /// Replaces the project token; the old one, and the storage keys issued to it, stop
    /// working at once (a save running with it fails and is not committed). Scoped tokens stay.
    pub async fn rotate_project_token(&self, project: &str) -> Result<String, Error> {
        self.existing_project(project).await?;
        let token = tokens::new_project_token(project);
        {
            // Under the project's publish lock, as a flush: an upload signed by one of the old
            // token's keys lands before (and stays: it was verified) or finds its key gone, and
            // a key minted for the old token is either revoked here or refused (see
            // `CacheService::issue_credentials`).
            let _no_minting = self.lock_project(project, super::Lock::Exclusive).await?;
            self.db.set_project_token(project, &tokens::sha256_hex(&token)).await?;
            self.db.revoke_keys(project, "").await?;
        }
        self.recent_tokens.forget_project(project);
        self.db.durable().await?;
        tracing::info!(project, "project token rotated");
        Ok(token)
    }

    /// Deletes a project: a flush (manifests, ledger, keys, every stored object), then its
    /// tokens, counters and record. With STS, a session issued before lives until it
    /// expires; what it writes meanwhile is swept then (while this process runs).
    pub async fn delete_project(&self, project: &str) -> Result<pb::FlushProjectResponse, Error> {
        let flushed = self.flush_project(project).await?;
        let sweep_due = self.db.project(project).await?.map_or(0, |record| record.sweep_after_unix);
        let reported: Vec<String> =
            self.db.service_counters(Some(project)).await?.into_iter().map(|(_, service, _)| service).collect();
        {
            // A key minted since the flush (its token was still live) is revoked with the
            // tokens; none is minted after them.
            let _no_minting = self.lock_project(project, super::Lock::Exclusive).await?;
            let scoped = self.db.scoped_tokens(project).await?;
            self.db.remove_project(project).await?;
            for token_id in std::iter::once(String::new()).chain(scoped.into_iter().map(|token| token.id)) {
                self.db.revoke_keys(project, &token_id).await?;
            }
        }
        self.recent_tokens.forget_project(project);
        self.db.durable().await?;
        self.metrics.forget_project(project, &reported);
        if sweep_due > self.clock.now_unix() {
            let (store, db) = (self.store.clone(), self.db.clone());
            let (project, prefix) =
                (project.to_owned(), proto::object_keys::project_prefix(&self.store_prefix, project));
            let wait = std::time::Duration::from_secs((sweep_due - self.clock.now_unix()) as u64 + 1);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                // A project created again under the name owns the prefix now.
                if !matches!(db.project(&project).await, Ok(None)) {
                    return;
                }
                if let Err(error) = store.delete_prefix(&prefix, &crate::store::keep_nothing).await {
                    tracing::warn!(error = %error.line(), "sweeping a deleted project's store failed");
                }
            });
        }
        tracing::info!(project, "project deleted");
        Ok(flushed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::credentials::{CredentialBroker, EmbeddedBroker, IssuedCredentials};
    use crate::state::{KeyAccess, State};

    /// The embedded broker, paused inside `issue` until the test lets it go: the moment a key
    /// is being minted.
    struct PausedBroker {
        inner: EmbeddedBroker,
        entered: tokio::sync::Notify,
        go_on: tokio::sync::Notify,
    }

    #[async_trait::async_trait]
    impl CredentialBroker for PausedBroker {
        async fn issue(&self, project: &str, access: KeyAccess, token_id: &str) -> Result<IssuedCredentials, Error> {
            self.entered.notify_one();
            self.go_on.notified().await;
            self.inner.issue(project, access, token_id).await
        }

        fn records_keys(&self) -> bool {
            true
        }
    }

    /// What takes a token's keys away.
    #[derive(Clone, Copy, Debug)]
    enum Revoke {
        ScopedToken,
        Rotation,
        Deletion,
    }

    /// Mints a key for a token and, while the broker is inside the mint, revokes the token as
    /// `revoke` says: the key must then be refused or revoked, never left live.
    async fn mint_while(revoke: Revoke) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::state::Database::open(dir.path()).unwrap();
        let inner = crate::service::tests::embedded_broker(dir.path(), &db);
        let broker = Arc::new(PausedBroker { inner, entered: Default::default(), go_on: Default::default() });
        let service = crate::service::tests::service(dir.path(), db.clone(), Some(broker.clone()));
        let (_, project_token) = service.create_project("web", None).await.unwrap();
        let scope = BranchScope { read: vec!["main".into()], write: vec!["pr-*".into()] };
        let (_, pr_token) = service.create_token("web", scope, 0).await.unwrap();
        let token = if matches!(revoke, Revoke::Rotation) { project_token } else { pr_token };
        let principal = service.authenticate_worker(Some(&token)).await.unwrap();

        let minting = {
            let (service, principal) = (service.clone(), principal.clone());
            tokio::spawn(async move { service.issue_credentials("web", pb::Access::Write, "", Some(&principal)).await })
        };
        broker.entered.notified().await;
        let mut revoking = {
            let service = service.clone();
            tokio::spawn(async move {
                match revoke {
                    Revoke::ScopedToken => {
                        let id = service.db.scoped_tokens("web").await?.remove(0).id;
                        service.revoke_token("web", &id).await
                    }
                    Revoke::Rotation => service.rotate_project_token("web").await.map(|_| ()),
                    Revoke::Deletion => service.delete_project("web").await.map(|_| ()),
                }
            })
        };
        // Today the revoke waits for the mint to finish; before, it ran to its end meanwhile
        // (given the time to), and the key minted next was left live. Either way the outcome
        // below must hold.
        let revoked_first = tokio::time::timeout(Duration::from_millis(500), &mut revoking).await.is_ok();
        broker.go_on.notify_one();
        let minted = minting.await.unwrap();
        if !revoked_first {
            revoking.await.unwrap().unwrap();
        }
        match minted {
            Ok(credentials) => {
                let record = db.minted_key(&credentials.access_key_id).await.unwrap();
                assert_eq!(record, None, "{revoke:?}: a key minted meanwhile is still live");
            }
            Err(error) => assert!(matches!(error, Error::Unauthenticated(_)), "{revoke:?}: {error:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_minted_while_its_token_is_revoked_never_outlives_the_revoke() {
        for revoke in [Revoke::ScopedToken, Revoke::Rotation, Revoke::Deletion] {
            mint_while(revoke).await;
        }
    }
}
