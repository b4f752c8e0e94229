//! One test suite for every [`State`] implementation: what the cache's protocol relies on, run
//! against sled (a temporary folder) and PostgreSQL (a new database on the server
//! `CACHE_TEST_POSTGRES_URL` names, which `.ci/run` starts; in CI its absence fails).

use std::collections::HashMap;

use proto::v1 as pb;

use super::*;

/// The hash of every test project's token.
const PROJECT_TOKEN_HASH: &str = "hash-of-the-project-token";

/// The project token, as a step checks it.
const OWNER: Holder<'static> = Holder { token_sha256_hex: PROJECT_TOKEN_HASH, token_id: "" };

fn project(name: &str) -> ProjectRecord {
    ProjectRecord {
        name: name.into(),
        token_sha256_hex: PROJECT_TOKEN_HASH.into(),
        created_unix: 1,
        generation: 0,
        quota_bytes: 0,
        sweep_after_unix: 0,
    }
}

fn manifest(service: &str, digests: &[&str], began_unix_ms: i64) -> pb::Manifest {
    pb::Manifest {
        key: Some(pb::CacheKey { service: service.into(), branch: String::new() }),
        images: vec![pb::Image {
            id: digests[0].into(),
            layers: digests[1..]
                .iter()
                .map(|digest| pb::Layer { digest: (*digest).into(), ..Default::default() })
                .collect(),
            ..Default::default()
        }],
        origin: Some(pb::SaveOrigin { began_unix_ms, save_id: format!("save-{began_unix_ms}"), ..Default::default() }),
        ..Default::default()
    }
}

fn sizes() -> HashMap<String, BlobRecord> {
    [("c1", 1), ("l1", 10), ("l2", 20), ("c2", 2), ("l9", 90)]
        .iter()
        .map(|(digest, size)| {
            (digest.to_string(), BlobRecord { stored_size: *size, size: *size, ..Default::default() })
        })
        .collect()
}

fn key(service: &str) -> pb::CacheKey {
    pb::CacheKey { service: service.into(), branch: String::new() }
}

async fn references(state: &dyn State, project: &str, digest: &str) -> Option<u64> {
    state.stored_blobs(project, &[digest.to_owned()]).await.unwrap().get(digest).map(|record| record.references)
}

async fn projects_and_tokens(state: &dyn State) {
    state.create_project(&project("b")).await.unwrap();
    state.create_project(&project("a")).await.unwrap();
    assert!(matches!(state.create_project(&project("a")).await, Err(Error::ProjectExists(_))));
    let names: Vec<String> = state.projects().await.unwrap().into_iter().map(|record| record.name).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(state.project("a").await.unwrap(), Some(project("a")));
    assert_eq!(state.project("zz").await.unwrap(), None);
    assert_eq!(state.set_quota("a", 5 << 20).await.unwrap().quota_bytes, 5 << 20);
    state.set_project_token("a", "new-hash").await.unwrap();
    let record = state.project("a").await.unwrap().unwrap();
    assert_eq!((record.quota_bytes, record.token_sha256_hex.as_str()), (5 << 20, "new-hash"));
    assert!(matches!(state.set_quota("zz", 1).await, Err(Error::NoSuchProject(_))));
    assert!(matches!(state.set_project_token("zz", "x").await, Err(Error::NoSuchProject(_))));

    let scoped = |id: &str, created_unix: i64| ScopedTokenRecord {
        id: id.into(),
        project: "a".into(),
        scope: crate::tokens::BranchScope { read: vec!["*".into()], write: vec!["pr-*".into()] },
        created_unix,
        expires_unix: 0,
    };
    state.insert_scoped_token("h2", &scoped("tok_2", 20)).await.unwrap();
    state.insert_scoped_token("h1", &scoped("tok_1", 10)).await.unwrap();
    assert_eq!(state.scoped_token("h1").await.unwrap(), Some(scoped("tok_1", 10)));
    let ids: Vec<String> = state.scoped_tokens("a").await.unwrap().into_iter().map(|token| token.id).collect();
    assert_eq!(ids, ["tok_1", "tok_2"], "by creation time");
    assert!(state.scoped_tokens("b").await.unwrap().is_empty());
    assert_eq!(state.remove_scoped_tokens("a", Some("tok_2")).await.unwrap(), vec![scoped("tok_2", 20)]);
    assert_eq!(state.remove_scoped_tokens("a", None).await.unwrap().len(), 1);
    assert_eq!(state.scoped_token("h1").await.unwrap(), None);
}

async fn minted_keys(state: &dyn State) {
    state.create_project(&project("k")).await.unwrap();
    let key = |token_id: &str, expires_unix: i64| MintedKeyRecord {
        project: "k".into(),
        access: KeyAccess::Write,
        expires_unix,
        token_id: token_id.into(),
    };
    state.insert_minted_key("K1", &key("", 100)).await.unwrap();
    state.insert_minted_key("K2", &key("tok_9", 200)).await.unwrap();
    state.insert_minted_key("K3", &key("", 50)).await.unwrap();
    assert_eq!(state.minted_key("K2").await.unwrap(), Some(key("tok_9", 200)));
    assert_eq!(state.revoke_keys("k", "tok_9").await.unwrap(), vec![key("tok_9", 200)]);
    assert_eq!(state.minted_key("K2").await.unwrap(), None);
    assert_eq!(state.remove_expired_keys(60).await.unwrap(), 1, "K3 expired");
    assert_eq!(state.minted_key("K1").await.unwrap(), Some(key("", 100)));
    // A flush revokes the rest and makes a sweep due once the last of them has expired.
    state.flush_project("k").await.unwrap();
    assert_eq!(state.minted_key("K1").await.unwrap(), None);
    assert!(state.sweeps_due(99).await.unwrap().is_empty());
    assert_eq!(state.sweeps_due(100).await.unwrap(), vec![("k".to_owned(), 100)]);
    state.sweep_done("k", 99).await.unwrap();
    assert_eq!(state.sweeps_due(100).await.unwrap().len(), 1, "a sweep of another flush is not this one");
    state.sweep_done("k", 100).await.unwrap();
    assert!(state.sweeps_due(1000).await.unwrap().is_empty());
}

async fn manifests_and_the_ledger(state: &dyn State) {
    state.create_project(&project("m")).await.unwrap();
    state.create_project(&project("other")).await.unwrap();
    let sizes = sizes();
    let web = manifest("web", &["c1", "l1", "l2"], 10);
    assert!(matches!(
        state.commit_manifest("m", &web, 0, &sizes, 400).await.unwrap(),
        Committed::Stored { replaced: None }
    ));
    state.commit_manifest("m", &manifest("api", &["c2", "l1"], 11), 0, &sizes, 400).await.unwrap();
    state.commit_manifest("other", &manifest("web", &["c1"], 12), 0, &sizes, 400).await.unwrap();
    assert_eq!(references(state, "m", "l1").await, Some(2));
    assert_eq!(state.totals("m").await.unwrap(), ProjectTotals { blobs: 4, stored_bytes: 33, manifests: 2 });
    assert_eq!(state.manifest("m", "web", "").await.unwrap(), Some(web.clone()));
    let services: Vec<String> =
        state.manifests("m").await.unwrap().into_iter().map(|m| m.key.unwrap().service).collect();
    assert_eq!(services, ["api", "web"]);

    // A later save replaces web: its old blobs lose their reference, the shared one keeps one.
    let newer = manifest("web", &["c2", "l1"], 20);
    let replaced = state.commit_manifest("m", &newer, 0, &sizes, 400).await.unwrap();
    assert!(matches!(replaced, Committed::Stored { replaced: Some(origin) } if origin.began_unix_ms == 10));
    assert_eq!(
        (references(state, "m", "c1").await, references(state, "m", "l2").await, references(state, "m", "c2").await),
        (Some(0), Some(0), Some(2))
    );
    // One begun earlier than the key's manifest is not stored; its new blobs are recorded.
    let stale = manifest("web", &["c1", "l9"], 15);
    assert!(
        matches!(state.commit_manifest("m", &stale, 0, &sizes, 400).await.unwrap(), Committed::KeptNewer(kept) if kept == newer)
    );
    assert_eq!(references(state, "m", "l9").await, Some(0));
    assert_eq!(state.totals("m").await.unwrap(), ProjectTotals { blobs: 5, stored_bytes: 123, manifests: 2 });

    // Use is recorded, unless the manifest changed meanwhile.
    state.touch_manifest("m", &newer, 500).await.unwrap();
    assert_eq!(state.manifest("m", "web", "").await.unwrap().unwrap().last_used_unix, 500);
    state.touch_manifest("m", &newer, 600).await.unwrap();
    assert_eq!(
        state.manifest("m", "web", "").await.unwrap().unwrap().last_used_unix,
        500,
        "newer was replaced by its touch"
    );

    // Collection: unreferenced blobs get their grace started, then are forgotten if still so.
    let mut unreferenced: Vec<String> =
        state.unreferenced_blobs("m", 700).await.unwrap().into_iter().map(|(digest, _)| digest).collect();
    unreferenced.sort();
    assert_eq!(unreferenced, ["c1", "l2", "l9"]);
    let forgotten = state.forget_unreferenced("m", &["c1".into(), "l1".into(), "l9".into()]).await.unwrap();
    let mut forgotten: Vec<String> = forgotten.into_iter().map(|(digest, _)| digest).collect();
    forgotten.sort();
    assert_eq!(forgotten, ["c1", "l9"], "l1 is named");
    let ledger = state.ledger_digests("m").await.unwrap();
    assert_eq!(ledger, ["c2", "l1", "l2"].iter().map(|d| d.to_string()).collect());

    // Eviction: the manifest goes, its blobs lose that reference.
    assert_eq!(state.remove_manifest("m", &key("api"), 800).await.unwrap(), Some(vec![]), "web still names c2 and l1");
    assert_eq!(state.remove_manifest("m", &key("api"), 800).await.unwrap(), None);
    // A lost blob takes the manifests naming it.
    assert_eq!(state.drop_blob("m", "l1", 800).await.unwrap(), 1);
    let c2 = state.stored_blobs("m", &["c2".into()]).await.unwrap();
    assert_eq!(c2["c2"].unreferenced_since_unix, 800, "its last reference went at the time passed in");
    assert!(state.manifests("m").await.unwrap().is_empty());
    assert_eq!(references(state, "m", "l1").await, None);
    let totals = state.totals("m").await.unwrap();
    assert_eq!((totals.blobs, totals.manifests), (2, 0), "c2 and l2 stay recorded, unreferenced");
    assert_eq!(totals.stored_bytes, 2 + 20);

    // A flush empties the project and fences saves begun before it.
    let flushed = state.flush_project("m").await.unwrap();
    assert_eq!(flushed.generation, 1);
    assert_eq!(state.totals("m").await.unwrap(), ProjectTotals::default());
    let late = state.commit_manifest("m", &manifest("web", &["c1"], 30), 0, &sizes, 400).await;
    assert!(matches!(late, Err(Error::SaveConflict(_))), "{late:?}");
    state.commit_manifest("m", &manifest("web", &["c1"], 30), 1, &sizes, 400).await.unwrap();
    assert!(matches!(state.flush_project("zz").await, Err(Error::NoSuchProject(_))));
    // The other project is untouched by all of it.
    assert_eq!(state.totals("other").await.unwrap(), ProjectTotals { blobs: 1, stored_bytes: 1, manifests: 1 });
}

async fn counters_and_removal(state: &dyn State) {
    state.create_project(&project("c")).await.unwrap();
    let hit = ServiceCounters { restores_hit: 1, bytes_found: 5, ..Default::default() };
    state.add_to_counters("c", "web", &hit).await.unwrap();
    state.add_to_counters("c", "web", &hit).await.unwrap();
    state.add_to_counters("c", "api", &ServiceCounters { saves: 1, ..Default::default() }).await.unwrap();
    let counters = state.service_counters(Some("c")).await.unwrap();
    assert_eq!(counters.len(), 2);
    let web = counters.iter().find(|(_, service, _)| service == "web").unwrap();
    assert_eq!((web.0.as_str(), web.2.restores_hit, web.2.bytes_found), ("c", 2, 10));
    assert!(state.service_counters(None).await.unwrap().len() >= 2);
    state.flush_project("c").await.unwrap();
    state.remove_project("c").await.unwrap();
    assert_eq!(state.project("c").await.unwrap(), None);
    assert!(state.service_counters(Some("c")).await.unwrap().is_empty());
    assert_eq!(state.totals("c").await.unwrap(), ProjectTotals::default());
}

/// The whole suite against one implementation.
pub(crate) async fn run(state: &dyn State) {
    projects_and_tokens(state).await;
    minted_keys(state).await;
    manifests_and_the_ledger(state).await;
    counters_and_removal(state).await;
    state.durable().await.unwrap();
}

/// Open saves and transfer leases, seen through two handles on one state (the same one on
/// sled; two replicas' on PostgreSQL): single flight and one budget hold across them.
pub(crate) async fn ephemeral_records_are_shared(a: std::sync::Arc<dyn State>, b: std::sync::Arc<dyn State>) {
    let (a_state, b_state) = (a.clone(), b.clone());
    let ttl = std::time::Duration::from_secs(15);
    let (saves_a, saves_b) =
        (crate::claims::PendingSaves::new(ttl, a.clone()), crate::claims::PendingSaves::new(ttl, b.clone()));
    crate::claims::tests::single_flight_holds(&saves_a, &saves_b, "shared").await;
    let settings = crate::budget::PlanSettings {
        part_size: 1 << 20,
        multipart_threshold: 1 << 20,
        worker_concurrency: 8,
        transfer_budget: 16,
    };
    let (budget_a, budget_b) =
        (crate::budget::TransferBudget::new(settings, a), crate::budget::TransferBudget::new(settings, b));
    let now = 1_800_000_000_000;
    let save = crate::budget::LeaseKind::Save;
    assert_eq!(budget_a.grant("p1", "x", save, now).await.unwrap().max_concurrency, 8);
    assert_eq!(budget_b.grant("p2", "y", save, now).await.unwrap().max_concurrency, 8);
    assert_eq!(budget_a.renew("p1", "x", now).await.unwrap().map(|plan| plan.max_concurrency), Some(8));
    let reads = ["sha256:r".to_string()].into_iter().collect();
    assert_eq!(budget_b.grant_restore("p2", "", "z", reads, now).await.unwrap().max_concurrency, 8);
    // The fair shares are recomputed for every lease, whichever handle granted it: p2's
    // restore took its save's share.
    assert_eq!(budget_a.renew("p2", "y", now).await.unwrap().map(|plan| plan.max_concurrency), Some(0));
    assert_eq!(budget_b.granted(now).await.unwrap(), 16);
    assert!(budget_a.read_by_restores("p2", now).await.unwrap().contains("sha256:r"));
    budget_a.release("p2", "z", now).await.unwrap();
    assert!(budget_b.read_by_restores("p2", now).await.unwrap().is_empty());
    assert_eq!(budget_b.renew("p2", "y", now).await.unwrap().map(|plan| plan.max_concurrency), Some(8));
    // A lease not renewed for its lifetime lapses, and its share goes back.
    let later = now + 10 * 60 * 1000;
    assert_eq!(budget_b.granted(later).await.unwrap(), 0);
    assert_eq!(budget_a.grant("p2", "w", save, later).await.unwrap().max_concurrency, 8);
    look_up_grants_with_the_manifest(a_state.as_ref(), b_state.as_ref()).await;
    a_commit_of_known_blobs_is_one_step(a_state.as_ref(), b_state.as_ref()).await;
    a_commit_of_known_blobs_releases_those_of_the_manifest_it_replaces(a_state.as_ref(), b_state.as_ref()).await;
    a_begin_is_one_step(a_state.as_ref(), b_state.as_ref()).await;
    every_step_checks_its_token_live(a_state.as_ref(), b_state.as_ref()).await;
    commits_made_at_once_store_what_they_would_one_after_another(a_state.as_ref(), b_state.as_ref()).await;
    begins_made_at_once_register_what_they_would_one_after_another(a_state.as_ref(), b_state.as_ref()).await;
    lookups_made_at_once_grant_what_they_would_one_after_another(a_state.as_ref(), b_state.as_ref()).await;
}

/// Lookups of one project made at once (on PostgreSQL, a replica's batch) each find the first
/// of its own keys with a manifest, and each hit's grant runs on the leases the grants before
/// it left, as one after another would; a miss grants nothing; a revoked `pr-*` token's
/// lookup finds nothing and grants nothing; the last use of each manifest found is recorded.
async fn lookups_made_at_once_grant_what_they_would_one_after_another(a: &dyn State, b: &dyn State) {
    a.create_project(&project("read")).await.unwrap();
    a.commit_manifest("read", &manifest("web", &["c1", "l1"], 5), 0, &sizes(), 1).await.unwrap();
    a.commit_manifest("read", &manifest("api", &["c2", "l2"], 5), 0, &sizes(), 1).await.unwrap();
    let revoked = revoked_pr_token(a, "read", "old-hash", "tok_old").await;
    let seen = std::sync::Mutex::new(Vec::new());
    // i % 3: 0 finds web (its first key), 1 finds api behind a key with none, 2 misses.
    let keys_of = |i: usize| match i % 3 {
        0 => vec![key("web"), key("api")],
        1 => vec![key("none"), key("api")],
        _ => vec![key("none"), key("nothing")],
    };
    let lookups = (0..10).map(|i| {
        let (seen, keys) = (&seen, keys_of(i));
        async move {
            let holder = if i == 6 { revoked } else { OWNER };
            let mut grant = |manifest: &pb::Manifest, leases: &mut Leases, _: &LeaseDemands| {
                seen.lock().unwrap().push(leases.len());
                let lease = Lease {
                    project: "read".into(),
                    kind: LeaseKind::Restore,
                    fixed: 1,
                    concurrency: 1,
                    order: leases.len() as u64,
                    renewed_unix_ms: 9,
                    reads: manifest_digests(manifest),
                    holder: String::new(),
                };
                leases.insert(format!("read-{i}"), lease);
                LeaseDemand { demand: leases.len() as u32, lapses_unix_ms: 10 }
            };
            b.look_up("read", holder, &keys, 20 + i as i64, &mut grant).await
        }
    });
    let outcomes = futures::future::join_all(lookups).await;
    let mut hits = Vec::new();
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let found = match i {
            6 => {
                assert!(matches!(outcome, Err(Error::Unauthenticated(_))), "{i}: {outcome:?}");
                continue;
            }
            _ => outcome.unwrap().and_then(|manifest| manifest.key).map(|key| key.service),
        };
        let wanted = [Some("web"), Some("api"), None][i % 3].map(str::to_owned);
        assert_eq!(found, wanted, "{i}");
        if found.is_some() {
            hits.push(format!("read-{i}"));
        }
    }
    let mut seen = seen.into_inner().unwrap();
    seen.sort();
    assert_eq!(seen, (0..hits.len()).collect::<Vec<usize>>(), "each grant saw the leases of those before it");
    let mut granted: Vec<String> = Vec::new();
    a.read_leases(Some("read"), &mut |leases| granted = leases.keys().cloned().collect()).await.unwrap();
    granted.sort();
    hits.sort();
    assert_eq!(granted, hits);
    // web: found by 0, 3, 9 (6 revoked); api: by 1, 4, 7.
    assert_eq!(a.manifest("read", "web", "").await.unwrap().unwrap().last_used_unix, 29);
    assert_eq!(a.manifest("read", "api", "").await.unwrap().unwrap().last_used_unix, 27);
}

/// Begins of one project made at once (on PostgreSQL, a replica's batch) each register on the
/// open saves the ones before it left, as one after another would; a refused begin keeps what
/// its rule changed; a revoked `pr-*` token's registers nothing.
async fn begins_made_at_once_register_what_they_would_one_after_another(a: &dyn State, b: &dyn State) {
    a.create_project(&project("busy")).await.unwrap();
    a.commit_manifest("busy", &manifest("base", &["c1", "l1"], 1), 0, &sizes(), 1).await.unwrap();
    let revoked = revoked_pr_token(a, "busy", "gone-hash", "tok_gone").await;
    let seen = std::sync::Mutex::new(Vec::new());
    let begins = (0..10).map(|i| {
        let seen = &seen;
        async move {
            let holder = if i == 7 { revoked } else { OWNER };
            let named = [if i % 2 == 0 { "c1" } else { "zz" }.to_string()];
            let mut register = |_: &ProjectRecord,
                                stored: &HashMap<String, BlobRecord>,
                                manifests: &[pb::Manifest],
                                saves: &mut OpenSaves| {
                assert_eq!(stored.len(), usize::from(i % 2 == 0), "a begin sees the records of its own blobs");
                assert_eq!(manifests.len(), 1);
                seen.lock().unwrap().push(saves.len());
                saves.insert(format!("b{i}"), crate::claims::tests::pending("busy", "web", 10 + i as i64));
                if i == 3 { Err(Error::TooMany("refused, its change kept".into())) } else { Ok(()) }
            };
            b.begin_save("busy", holder, &named, &mut register).await
        }
    });
    let outcomes = futures::future::join_all(begins).await;
    for (i, outcome) in outcomes.iter().enumerate() {
        match i {
            3 => assert!(matches!(outcome, Err(Error::TooMany(_))), "{i}: {outcome:?}"),
            7 => assert!(matches!(outcome, Err(Error::Unauthenticated(_))), "{i}: {outcome:?}"),
            _ => assert!(outcome.is_ok(), "{i}: {outcome:?}"),
        }
    }
    let mut seen = seen.into_inner().unwrap();
    seen.sort();
    // (A state may show other projects' open saves beside this one's: counted from the first.)
    let first = seen[0];
    assert_eq!(seen, (first..first + 9).collect::<Vec<usize>>(), "each saw those before it; the revoked ran no rule");
    let mut open: Vec<String> = Vec::new();
    a.read_open_saves(Some("busy"), &mut |saves| {
        open = saves.iter().filter(|(_, save)| save.project == "busy").map(|(id, _)| id.clone()).collect();
    })
    .await
    .unwrap();
    open.sort();
    assert_eq!(open, ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b8", "b9"]);
}

/// A `pr-*` token of `project` made and revoked: its holder, as a caller still presents it.
async fn revoked_pr_token(state: &dyn State, project: &str, hash: &'static str, id: &'static str) -> Holder<'static> {
    let pr = ScopedTokenRecord {
        id: id.into(),
        project: project.into(),
        scope: crate::tokens::BranchScope { read: vec!["*".into()], write: vec!["pr-*".into()] },
        created_unix: 1,
        expires_unix: 0,
    };
    state.insert_scoped_token(hash, &pr).await.unwrap();
    state.remove_scoped_tokens(project, Some(id)).await.unwrap();
    Holder { token_sha256_hex: hash, token_id: id }
}

/// Commits of known blobs of one project made at once (on PostgreSQL, a replica's batch) each
/// store what they would have one after another, two of one key included (the save begun
/// later stands); those that fail (a revoked `pr-*` token, a save not open, a refusing check)
/// change nothing, and the others commit.
async fn commits_made_at_once_store_what_they_would_one_after_another(a: &dyn State, b: &dyn State) {
    a.create_project(&project("many")).await.unwrap();
    a.commit_manifest("many", &manifest("base", &["c1", "l1"], 1), 0, &sizes(), 1).await.unwrap();
    a.commit_manifest("many", &manifest("other", &["c2", "l2"], 1), 0, &sizes(), 1).await.unwrap();
    let revoked = revoked_pr_token(a, "many", "pr-hash", "tok_pr").await;
    // (save, key, blobs, began, who): s0 and s6 both save k0, s6 begun later; "ghost" was never open.
    let commits: Vec<(&str, String, [&str; 2], i64, Holder<'static>)> = (0..6)
        .map(|i| {
            (
                ["s0", "s1", "s2", "s3", "s4", "s5"][i],
                format!("k{i}"),
                if i % 2 == 1 { ["c1", "l1"] } else { ["c2", "l2"] },
                10 + i as i64,
                OWNER,
            )
        })
        .chain([
            ("s6", "k0".to_string(), ["c1", "l1"], 20, OWNER),
            ("s7", "k7".to_string(), ["c1", "l1"], 10, revoked),
            ("ghost", "k8".to_string(), ["c1", "l1"], 10, OWNER),
            ("s9", "k9".to_string(), ["c1", "l1"], 10, OWNER),
        ])
        .collect();
    a.update_open_saves("many", &mut |saves| {
        for (save, key, _, began, _) in commits.iter().filter(|(save, ..)| *save != "ghost") {
            saves.insert(save.to_string(), crate::claims::tests::pending("many", key, *began));
        }
    })
    .await
    .unwrap();
    let outcomes = futures::future::join_all(commits.iter().map(|(save, key, blobs, began, holder)| async move {
        let named: HashMap<String, BlobRecord> =
            blobs.iter().map(|digest| (digest.to_string(), sizes()[*digest].clone())).collect();
        let saved = manifest(key, blobs, *began);
        let mut check = |_: &ProjectRecord, known: &HashMap<String, BlobRecord>| {
            assert!(blobs.iter().all(|digest| known.contains_key(*digest)), "a check sees its blobs' records");
            Ok(*save != "s9")
        };
        b.commit_known("many", *holder, &saved, 0, &named, 30, &mut check, save).await
    }))
    .await;
    for ((save, ..), outcome) in commits.iter().zip(&outcomes) {
        match *save {
            "s7" => assert!(matches!(outcome, Err(Error::Unauthenticated(_))), "{save}: {outcome:?}"),
            "ghost" => assert!(matches!(outcome, Err(Error::NoSuchSave(_))), "{save}: {outcome:?}"),
            "s9" => assert!(matches!(outcome, Ok(None)), "{save}: {outcome:?}"),
            "s0" => assert!(matches!(outcome, Ok(Some(_))), "{save}: {outcome:?}"),
            _ => assert!(matches!(outcome, Ok(Some(Committed::Stored { .. }))), "{save}: {outcome:?}"),
        }
    }
    let stored = a.manifest("many", "k0", "").await.unwrap().unwrap();
    assert_eq!(stored.origin.map(|origin| origin.began_unix_ms), Some(20), "the save begun later stands");
    // c1 and l1: base, k1, k3, k5, k0 (s6); c2 and l2: other, k2, k4 (k0's s0 replaced or kept out).
    for (digest, references_now) in [("c1", 5), ("l1", 5), ("c2", 3), ("l2", 3)] {
        assert_eq!(references(a, "many", digest).await, Some(references_now), "{digest}");
    }
    assert_eq!(a.totals("many").await.unwrap().manifests, 8);
    let mut open: Vec<String> = Vec::new();
    a.read_open_saves(Some("many"), &mut |saves| open = saves.keys().cloned().collect()).await.unwrap();
    open.sort();
    assert_eq!(open, ["s7", "s9"], "the failed commits' saves stay open");
    let counted = a.service_counters(Some("many")).await.unwrap();
    assert_eq!(counted.iter().map(|(_, _, counters)| counters.saves).sum::<u64>(), 7);
}

/// A begin, a commit and a lookup each check inside their step that the token is still live,
/// whichever replica revoked it (a replica reuses a token check for a while), and a begin and a
/// commit see the project's record as it is then.
async fn every_step_checks_its_token_live(a: &dyn State, b: &dyn State) {
    a.create_project(&project("held")).await.unwrap();
    a.commit_manifest("held", &manifest("web", &["c1", "l1"], 5), 0, &sizes(), 1).await.unwrap();
    let scoped = ScopedTokenRecord {
        id: "tok_1".into(),
        project: "held".into(),
        scope: crate::tokens::BranchScope { read: vec!["*".into()], write: vec!["pr-*".into()] },
        created_unix: 1,
        expires_unix: 0,
    };
    a.insert_scoped_token("scoped-hash", &scoped).await.unwrap();
    let pr = Holder { token_sha256_hex: "scoped-hash", token_id: "tok_1" };
    let strangers = [
        Holder { token_sha256_hex: "another-hash", token_id: "" },
        Holder { token_sha256_hex: PROJECT_TOKEN_HASH, token_id: "tok_1" },
        Holder { token_sha256_hex: "scoped-hash", token_id: "" },
        Holder { token_sha256_hex: "scoped-hash", token_id: "tok_2" },
    ];
    let digests = ["c1".to_string()];
    let blobs: HashMap<String, BlobRecord> =
        sizes().into_iter().filter(|(digest, _)| ["c1", "l1"].contains(&digest.as_str())).collect();
    let saved = manifest("web", &["c1", "l1"], 6);
    let quota_seen = std::sync::atomic::AtomicU64::new(u64::MAX);
    let mut register =
        |record: &ProjectRecord, _: &HashMap<String, BlobRecord>, _: &[pb::Manifest], _: &mut OpenSaves| {
            quota_seen.store(record.quota_bytes, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        };
    let mut grant = |_: &pb::Manifest, _: &mut Leases, _: &LeaseDemands| LeaseDemand::default();
    let passes = &mut |_: &ProjectRecord, _: &HashMap<String, BlobRecord>| Ok(true);
    let refused = |result: Result<(), Error>| matches!(result, Err(Error::Unauthenticated(_)));
    for holder in strangers {
        assert!(refused(b.begin_save("held", holder, &digests, &mut register).await), "{holder:?}");
        assert!(refused(b.look_up("held", holder, &[key("web")], 2, &mut grant).await.map(|_| ())), "{holder:?}");
        assert!(refused(b.look_up("held", holder, &[key("none")], 2, &mut grant).await.map(|_| ())), "a miss too");
        let commit = b.commit_known("held", holder, &saved, 0, &blobs, 2, passes, "s9").await;
        assert!(refused(commit.map(|_| ())), "{holder:?}");
    }
    assert_eq!(quota_seen.load(std::sync::atomic::Ordering::Relaxed), u64::MAX, "a refused begin registers nothing");
    a.set_quota("held", 1234).await.unwrap();
    b.begin_save("held", pr, &digests, &mut register).await.unwrap();
    assert_eq!(quota_seen.load(std::sync::atomic::Ordering::Relaxed), 1234, "a begin sees the record as it is then");
    assert!(b.look_up("held", pr, &[key("web")], 2, &mut grant).await.unwrap().is_some());
    a.remove_scoped_tokens("held", Some("tok_1")).await.unwrap();
    assert!(refused(b.begin_save("held", pr, &digests, &mut register).await), "revoked");
    assert!(refused(b.look_up("held", pr, &[key("web")], 2, &mut grant).await.map(|_| ())), "revoked");
    assert!(b.look_up("held", OWNER, &[key("web")], 2, &mut grant).await.unwrap().is_some());
    a.set_project_token("held", "rotated-hash").await.unwrap();
    assert!(refused(b.look_up("held", OWNER, &[key("web")], 2, &mut grant).await.map(|_| ())), "rotated away");
    let commit = b.commit_known("held", OWNER, &saved, 0, &blobs, 2, passes, "s9").await;
    assert!(refused(commit.map(|_| ())), "rotated away");
    let rotated = Holder { token_sha256_hex: "rotated-hash", token_id: "" };
    assert_eq!(a.holders_project("held", rotated).await.unwrap().quota_bytes, 1234);
    assert!(refused(a.holders_project("held", OWNER).await.map(|_| ())));
    assert!(refused(b.holders_project("nobody", rotated).await.map(|_| ())), "a project gone");
}

/// A begin sees the ledger's records of the blobs it names and the project's manifests, and
/// registers its save, in one step; its refusal is the step's.
async fn a_begin_is_one_step(a: &dyn State, b: &dyn State) {
    let named = ["c1".to_string(), "zz".to_string()];
    let mut register =
        |_: &ProjectRecord, stored: &HashMap<String, BlobRecord>, manifests: &[pb::Manifest], saves: &mut OpenSaves| {
            assert_eq!(stored.keys().collect::<Vec<_>>(), ["c1"]);
            assert_eq!(manifests.len(), 1);
            saves.insert("s2".into(), crate::claims::tests::pending("known", "web", 9));
            Ok(())
        };
    b.begin_save("known", OWNER, &named, &mut register).await.unwrap();
    let mut open = false;
    a.read_open_saves(Some("known"), &mut |saves| open = saves.contains_key("s2")).await.unwrap();
    assert!(open);
    let mut refuse = |_: &ProjectRecord, _: &HashMap<String, BlobRecord>, _: &[pb::Manifest], _: &mut OpenSaves| {
        Err(Error::TooMany("too many".into()))
    };
    assert!(matches!(b.begin_save("known", OWNER, &named, &mut refuse).await, Err(Error::TooMany(_))));
}

/// Whether save `s1` of project `known` is open.
async fn save_is_open(state: &dyn State) -> bool {
    let mut open = false;
    state.read_open_saves(Some("known"), &mut |saves| open = saves.contains_key("s1")).await.unwrap();
    open
}

/// A commit naming only blobs the ledger records is checked, takes its save and is recorded in
/// one step; one naming a blob the ledger lacks, or refused by its check, changes nothing.
async fn a_commit_of_known_blobs_is_one_step(a: &dyn State, b: &dyn State) {
    a.create_project(&project("known")).await.unwrap();
    let first = manifest("web", &["c1", "l1"], 5);
    a.commit_manifest("known", &first, 0, &sizes(), 1).await.unwrap();
    let open = crate::claims::tests::pending("known", "web", 6);
    a.update_open_saves("known", &mut |saves| {
        saves.insert("s1".into(), open.clone());
    })
    .await
    .unwrap();
    let named = |digests: &[&str]| -> HashMap<String, BlobRecord> {
        digests.iter().map(|digest| (digest.to_string(), sizes()[*digest].clone())).collect()
    };
    let take = "s1";
    let unknown = manifest("web", &["c1", "l1", "l2"], 7);
    let passes = &mut |_: &ProjectRecord, _: &HashMap<String, BlobRecord>| Ok(true);
    assert_eq!(
        b.commit_known("known", OWNER, &unknown, 0, &named(&["c1", "l1", "l2"]), 8, passes, take).await.unwrap(),
        None
    );
    assert!(save_is_open(a).await, "nothing changed");
    let second = manifest("web", &["c1", "l1"], 7);
    let refuses = &mut |_: &ProjectRecord, known: &HashMap<String, BlobRecord>| {
        assert_eq!(known.len(), 2);
        Err(Error::BlobNotStored("no".into()))
    };
    let refused = b.commit_known("known", OWNER, &second, 0, &named(&["c1", "l1"]), 8, refuses, take).await;
    assert!(matches!(refused, Err(Error::BlobNotStored(_))));
    assert!(save_is_open(a).await, "nothing changed");
    let committed = b.commit_known("known", OWNER, &second, 0, &named(&["c1", "l1"]), 8, passes, take).await.unwrap();
    assert!(matches!(committed, Some(Committed::Stored { replaced: Some(_) })), "{committed:?}");
    assert!(!save_is_open(a).await, "the save is taken");
    let stored = a.manifest("known", "web", "").await.unwrap().unwrap();
    assert_eq!(stored.origin.map(|origin| origin.began_unix_ms), Some(7));
    assert_eq!(references(a, "known", "l1").await, Some(1));
    let counted = a.service_counters(Some("known")).await.unwrap();
    assert_eq!(counted.iter().map(|(_, _, counters)| counters.saves).sum::<u64>(), 1);
    let again = b.commit_known("known", OWNER, &second, 0, &named(&["c1", "l1"]), 9, passes, take).await;
    assert!(matches!(again, Err(Error::NoSuchSave(_))), "a save commits once");
}

/// Replaces project `swap`'s manifest of `web` by one naming `digests` (all recorded), through a
/// save opened for it.
async fn commit_known_in_swap(a: &dyn State, b: &dyn State, digests: &[&str], began_unix_ms: i64) {
    let open = crate::claims::tests::pending("swap", "web", began_unix_ms);
    a.update_open_saves("swap", &mut |saves| {
        saves.insert("swapping".into(), open.clone());
    })
    .await
    .unwrap();
    let named: HashMap<String, BlobRecord> =
        digests.iter().map(|digest| (digest.to_string(), sizes()[*digest].clone())).collect();
    let passes = &mut |_: &ProjectRecord, _: &HashMap<String, BlobRecord>| Ok(true);
    let saved = manifest("web", digests, began_unix_ms);
    let committed = b.commit_known("swap", OWNER, &saved, 0, &named, 9, passes, "swapping").await.unwrap();
    assert!(matches!(committed, Some(Committed::Stored { replaced: Some(_) })), "{committed:?}");
}

/// A commit of known blobs that replaces a manifest naming other blobs takes their references
/// away in the same step.
async fn a_commit_of_known_blobs_releases_those_of_the_manifest_it_replaces(a: &dyn State, b: &dyn State) {
    a.create_project(&project("swap")).await.unwrap();
    a.commit_manifest("swap", &manifest("web", &["c1", "l1"], 5), 0, &sizes(), 1).await.unwrap();
    a.commit_manifest("swap", &manifest("api", &["c2", "l2"], 5), 0, &sizes(), 1).await.unwrap();
    commit_known_in_swap(a, b, &["c2", "l2"], 6).await;
    assert_eq!(references(a, "swap", "l1").await, Some(0));
    assert_eq!(references(a, "swap", "l2").await, Some(2));
    commit_known_in_swap(a, b, &["c1", "l1"], 7).await;
    assert_eq!(references(a, "swap", "l1").await, Some(1));
    assert_eq!(references(a, "swap", "l2").await, Some(1));
}

/// A lookup reads the first key's manifest that exists, marks it used and runs its grant in
/// the same step; a miss changes nothing.
async fn look_up_grants_with_the_manifest(a: &dyn State, b: &dyn State) {
    a.create_project(&project("look")).await.unwrap();
    let saved = manifest("web", &["c1", "l1"], 5);
    a.commit_manifest("look", &saved, 0, &sizes(), 1).await.unwrap();
    let mut granted = 0;
    let mut grant = |manifest: &pb::Manifest, leases: &mut Leases, _: &LeaseDemands| {
        granted += 1;
        let lease = Lease {
            project: "look".into(),
            kind: LeaseKind::Restore,
            fixed: 1,
            concurrency: 1,
            order: 0,
            renewed_unix_ms: 9,
            reads: manifest_digests(manifest),
            holder: String::new(),
        };
        leases.insert("r1".into(), lease);
        LeaseDemand { demand: 1, lapses_unix_ms: 10 }
    };
    assert_eq!(b.look_up("look", OWNER, &[key("none")], 7, &mut grant).await.unwrap(), None);
    let found = b.look_up("look", OWNER, &[key("none"), key("web"), key("web2")], 7, &mut grant).await.unwrap();
    assert_eq!(found.and_then(|manifest| manifest.key), Some(key("web")));
    assert_eq!(granted, 1, "the grant runs on a hit only");
    assert_eq!(a.manifest("look", "web", "").await.unwrap().unwrap().last_used_unix, 7);
    let mut reads = Vec::new();
    a.read_leases(Some("look"), &mut |leases| reads.extend(leases["r1"].reads.iter().cloned())).await.unwrap();
    assert_eq!(reads, ["c1", "l1"]);
    // The first of the keys that has a manifest, in the caller's order.
    a.commit_manifest("look", &manifest("web2", &["c2", "l2"], 6), 0, &sizes(), 1).await.unwrap();
    let mut grant = |_: &pb::Manifest, _: &mut Leases, _: &LeaseDemands| LeaseDemand::default();
    let found = b.look_up("look", OWNER, &[key("web2"), key("web")], 8, &mut grant).await.unwrap();
    assert_eq!(found.and_then(|manifest| manifest.key), Some(key("web2")));
    let found = b.look_up("look", OWNER, &[key("none"), key("web"), key("web2")], 8, &mut grant).await.unwrap();
    assert_eq!(found.and_then(|manifest| manifest.key), Some(key("web")));
}

#[tokio::test]
async fn the_suite_passes_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let database = sled::Database::open(dir.path()).unwrap();
    run(&database).await;
    assert!(database.lead_background_work().await.unwrap().is_some(), "one process leads its own work");
    ephemeral_records_are_shared(std::sync::Arc::new(database.clone()), std::sync::Arc::new(database)).await;
}

/// The PostgreSQL server of the tests, or `None` (outside CI) when there is none.
fn postgres_server() -> Option<String> {
    let Some(server) = std::env::var_os("CACHE_TEST_POSTGRES_URL") else {
        let in_ci = std::env::var("CI").is_ok_and(|value| value == "true" || value == "1");
        assert!(!in_ci, "CACHE_TEST_POSTGRES_URL is not set: .ci/run starts PostgreSQL and sets it");
        eprintln!("skipping: CACHE_TEST_POSTGRES_URL is not set");
        return None;
    };
    Some(server.into_string().unwrap())
}

/// While one project's records are held mid-change (its publish lock taken exclusively, as a
/// flush does, and a change of its leases open), two other projects' saves begin, take and
/// give back their budget shares, commit, and their restores are granted, through two
/// replicas, while more of its begins than a replica has connections wait for its locks: no
/// project waits for another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_projects_save_and_restore_while_a_third_holds_its_locks() {
    let Some(server) = postgres_server() else { return };
    let url = postgres::new_test_database(&server).await;
    let replicas = [
        std::sync::Arc::new(postgres::Postgres::connect(&url).await.unwrap()),
        std::sync::Arc::new(postgres::Postgres::connect(&url).await.unwrap()),
    ];
    for name in ["a", "b", "c"] {
        replicas[0].create_project(&project(name)).await.unwrap();
    }
    // Project C's holder, on a thread and runtime of its own, blocked inside its change.
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder_url = url.clone();
    let holder = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let state = postgres::Postgres::connect(&holder_url).await.unwrap();
            let _flushing = state.project_lock("c", true).await.unwrap();
            state
                .update_leases("c", &mut move |_, _| {
                    held_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    LeaseDemand::default()
                })
                .await
                .unwrap();
        });
    });
    held_rx.recv_timeout(std::time::Duration::from_secs(30)).expect("project C's holder holds its locks");
    // Project C's begins waiting for its locks through replica A, more of them than the
    // replica's pool has connections: they queue in the replica and go in one batch, one
    // transaction in the database, so projects A and B still find connections there.
    let waiting: Vec<_> = (0..40)
        .map(|_| {
            let state = replicas[0].clone();
            tokio::spawn(async move {
                let mut register =
                    |_: &ProjectRecord, _: &HashMap<String, BlobRecord>, _: &[pb::Manifest], _: &mut OpenSaves| Ok(());
                state.begin_save("c", OWNER, &["c1".to_string()], &mut register).await
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let settings = crate::budget::PlanSettings {
        part_size: 1 << 20,
        multipart_threshold: 1 << 20,
        worker_concurrency: 8,
        transfer_budget: 64,
    };
    let now = 1_800_000_000_000;
    let rounds = ["a", "b"].into_iter().zip(replicas.clone()).map(|(project, state)| async move {
        let ttl = std::time::Duration::from_secs(15);
        let saves = crate::claims::PendingSaves::new(ttl, state.clone());
        let budget = crate::budget::TransferBudget::new(settings, state.clone());
        // The first save's blobs are new (its commit the way through the store, the session
        // lock across it); the next ones' the ledger records (one step each).
        for round in 0..4 {
            let save_id = format!("{project}-save-{round}");
            let pending = crate::claims::tests::pending(project, "web", now);
            let named = ["c1".to_string(), "l1".to_string()];
            let mut register =
                |_: &ProjectRecord, stored: &HashMap<String, BlobRecord>, _: &[pb::Manifest], open: &mut OpenSaves| {
                    let missing = named.iter().filter(|digest| !stored.contains_key(*digest)).cloned().collect();
                    saves.begin_in(open, save_id.clone(), pending.clone(), missing, now).map(|_| ())
                };
            state.begin_save(project, OWNER, &named, &mut register).await.unwrap();
            assert!(budget.grant_save(project, "", &save_id, now).await.unwrap().max_concurrency > 0);
            assert!(budget.renew(project, &save_id, now).await.unwrap().is_some());
            budget.release(project, &save_id, now).await.unwrap();
            let saved = manifest("web", &["c1", "l1"], round);
            let blobs: HashMap<String, BlobRecord> =
                named.iter().map(|digest| (digest.clone(), sizes()[digest].clone())).collect();
            let committed = if round == 0 {
                let _checking = state.project_lock(project, false).await.unwrap();
                saves.take(&save_id, project).await.unwrap();
                state.commit_manifest(project, &saved, 0, &blobs, 1).await.unwrap()
            } else {
                let passes = &mut |_: &ProjectRecord, _: &HashMap<String, BlobRecord>| Ok(true);
                let committed =
                    state.commit_known(project, OWNER, &saved, 0, &blobs, 1, passes, &save_id).await.unwrap();
                committed.expect("the ledger records every blob")
            };
            assert!(matches!(committed, Committed::Stored { .. }));
            let lease_id = format!("{project}-restore-{round}");
            let mut plan = None;
            let mut grant = |manifest: &pb::Manifest, leases: &mut Leases, demands: &LeaseDemands| {
                let reads = manifest_digests(manifest);
                let restore = crate::budget::LeaseKind::Restore;
                let (granted, demand) = budget.grant_in(project, "", &lease_id, restore, reads, now, leases, demands);
                plan = Some(granted);
                demand
            };
            assert!(state.look_up(project, OWNER, &[key("web")], 2, &mut grant).await.unwrap().is_some());
            assert!(plan.is_some_and(|plan| plan.max_concurrency > 0));
        }
    });
    let done = tokio::time::timeout(std::time::Duration::from_secs(20), futures::future::join_all(rounds)).await;
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    done.expect("projects A and B waited for project C's locks");
    assert_eq!(replicas[1].totals("b").await.unwrap().manifests, 1);
    for begin in waiting {
        let begun = tokio::time::timeout(std::time::Duration::from_secs(30), begin).await;
        begun.expect("project C's begins run once its locks are free").unwrap().unwrap();
    }
}

/// A commit through the store holds its project's lock shared across its steps (a session lock)
/// and takes its save, gives back its share and records its manifest under it, while a flush
/// through another replica waits for the lock exclusively and a begin, a commit and a lookup
/// of the project queue behind the flush, each in its batch: the steps under the lock go in no
/// batch, so nothing waits in a circle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_under_a_project_s_lock_never_wait_for_calls_queued_behind_a_flush() {
    let Some(server) = postgres_server() else { return };
    let url = postgres::new_test_database(&server).await;
    let a = std::sync::Arc::new(postgres::Postgres::connect(&url).await.unwrap());
    let b = postgres::Postgres::connect(&url).await.unwrap();
    a.create_project(&project("p")).await.unwrap();
    a.commit_manifest("p", &manifest("web", &["c1", "l1"], 1), 0, &sizes(), 1).await.unwrap();
    let committing = a.project_lock("p", false).await.unwrap();
    let flush = tokio::spawn(async move { drop(b.project_lock("p", true).await.unwrap()) });
    let settle = std::time::Duration::from_millis(300);
    tokio::time::sleep(settle).await;
    assert!(!flush.is_finished(), "the flush waits for the commit's lock");
    let queued_begin = a.clone();
    let begin = tokio::spawn(async move {
        let mut register =
            |_: &ProjectRecord, _: &HashMap<String, BlobRecord>, _: &[pb::Manifest], _: &mut OpenSaves| Ok(());
        queued_begin.begin_save("p", OWNER, &["c1".to_string()], &mut register).await
    });
    let queued_lookup = a.clone();
    let lookup = tokio::spawn(async move {
        let mut grant = |_: &pb::Manifest, _: &mut Leases, _: &LeaseDemands| LeaseDemand::default();
        queued_lookup.look_up("p", OWNER, &[key("web")], 2, &mut grant).await
    });
    let queued_commit = a.clone();
    let commit = tokio::spawn(async move {
        let passes = &mut |_: &ProjectRecord, _: &HashMap<String, BlobRecord>| Ok(true);
        let saved = manifest("web", &["c1", "l1"], 3);
        queued_commit.commit_known("p", OWNER, &saved, 0, &sizes(), 3, passes, "no-such-save").await
    });
    tokio::time::sleep(settle).await;
    assert!(!begin.is_finished() && !lookup.is_finished() && !commit.is_finished(), "queued behind the flush");
    let steps = async {
        a.update_open_saves("p", &mut |_| {}).await.unwrap();
        a.update_leases("p", &mut |_, _| LeaseDemand::default()).await.unwrap();
        a.commit_manifest("p", &manifest("web", &["c1", "l1"], 2), 0, &sizes(), 2).await.unwrap();
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), steps)
        .await
        .expect("the commit's steps under its lock waited for calls queued behind the flush");
    drop(committing);
    let wait = std::time::Duration::from_secs(10);
    tokio::time::timeout(wait, flush).await.expect("the flush gets the lock").unwrap();
    tokio::time::timeout(wait, begin).await.expect("the begin runs after the flush").unwrap().unwrap();
    assert!(tokio::time::timeout(wait, lookup).await.expect("the lookup runs").unwrap().unwrap().is_some());
    // A commit of a save no one began: it changes nothing, whatever it finds.
    let nothing = tokio::time::timeout(wait, commit).await.expect("the commit runs").unwrap();
    assert!(matches!(nothing, Ok(None) | Err(crate::error::Error::NoSuchSave(_))), "{nothing:?}");
}

/// A new database on `server` holding project `p` with one manifest, of `service`, naming `c1`
/// and `l1`: its URL and a replica's state on it.
async fn new_project_p(server: &str, service: &str) -> (String, postgres::Postgres) {
    let url = postgres::new_test_database(server).await;
    let state = postgres::Postgres::connect(&url).await.unwrap();
    state.create_project(&project("p")).await.unwrap();
    state.commit_manifest("p", &manifest(service, &["c1", "l1"], 1), 0, &sizes(), 1).await.unwrap();
    (url, state)
}

/// A caller that goes away while its commit waits in a batch (its client hung up) takes none
/// of the others' commits with it: the batch runs in a task of its own, and commits nothing of
/// the caller that never answered its check.
#[tokio::test]
async fn a_caller_gone_from_a_batch_takes_nothing_of_the_others_with_it() {
    let Some(server) = postgres_server() else { return };
    let (_, state) = new_project_p(&server, "base").await;
    state
        .update_open_saves("p", &mut |saves| {
            for i in 0..4 {
                saves.insert(format!("s{i}"), crate::claims::tests::pending("p", &format!("k{i}"), 10 + i));
            }
        })
        .await
        .unwrap();
    let named: HashMap<String, BlobRecord> =
        ["c1", "l1"].iter().map(|digest| (digest.to_string(), sizes()[*digest].clone())).collect();
    let commits = (0..4).map(|i| {
        let (state, named) = (&state, &named);
        async move {
            let saved = manifest(&format!("k{i}"), &["c1", "l1"], 10 + i);
            let mut check = |_: &ProjectRecord, _: &HashMap<String, BlobRecord>| Ok(true);
            let save_id = format!("s{i}");
            let commit = state.commit_known("p", OWNER, &saved, 0, named, 20, &mut check, &save_id);
            if i == 1 {
                // Polled once (queued in the batch), then dropped, as when the client hangs up.
                let gone = futures::future::select(commit, futures::future::ready(())).await;
                assert!(matches!(gone, futures::future::Either::Right(_)), "answered at its first poll");
                return None;
            }
            Some(commit.await)
        }
    });
    let outcomes = futures::future::join_all(commits).await;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match i {
            1 => assert!(outcome.is_none()),
            _ => assert!(matches!(outcome, Some(Ok(Some(Committed::Stored { .. })))), "{i}: {outcome:?}"),
        }
    }
    assert!(state.manifest("p", "k1", "").await.unwrap().is_none(), "the gone caller's commit made nothing");
    assert_eq!(references(&state, "p", "l1").await, Some(4), "base, k0, k2 and k3");
    let mut open: Vec<String> = Vec::new();
    state.read_open_saves(Some("p"), &mut |saves| open = saves.keys().cloned().collect()).await.unwrap();
    assert_eq!(open, ["s1"], "its save stays open, to be abandoned or to lapse");
}

/// A commit takes its save by its row alone, without the project's open-saves lock: a change
/// of the open saves that read the save before never writes it back once it went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_taken_during_a_change_of_the_open_saves_stays_taken() {
    let Some(server) = postgres_server() else { return };
    let (url, state) = new_project_p(&server, "web").await;
    let open = crate::claims::tests::pending("p", "web", 2);
    state
        .update_open_saves("p", &mut |saves| {
            saves.insert("s1".into(), open.clone());
        })
        .await
        .unwrap();
    let committing_url = url.clone();
    state
        .update_open_saves("p", &mut move |saves| {
            // Meanwhile, another replica commits s1 (on a thread of its own: this change holds
            // the lock it does not take).
            let url = committing_url.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async {
                    let other = postgres::Postgres::connect(&url).await.unwrap();
                    let passes = &mut |_: &ProjectRecord, _: &HashMap<String, BlobRecord>| Ok(true);
                    let saved = manifest("web", &["c1", "l1"], 3);
                    let blobs: HashMap<String, BlobRecord> =
                        sizes().into_iter().filter(|(digest, _)| ["c1", "l1"].contains(&digest.as_str())).collect();
                    let committed = other.commit_known("p", OWNER, &saved, 0, &blobs, 4, passes, "s1").await.unwrap();
                    assert!(committed.is_some());
                });
            })
            .join()
            .unwrap();
            saves.get_mut("s1").expect("read before the commit").silence_noted = true;
        })
        .await
        .unwrap();
    let mut open = true;
    state.read_open_saves(Some("p"), &mut |saves| open = saves.contains_key("s1")).await.unwrap();
    assert!(!open, "the committed save was written back");
}

#[tokio::test]
async fn the_suite_passes_on_postgres() {
    let Some(server) = postgres_server() else { return };
    let url = postgres::new_test_database(&server).await;
    let state = postgres::Postgres::connect(&url).await.unwrap();
    run(&state).await;
    // A second coordinator on the same database finds the schema in place.
    let again = postgres::Postgres::connect(&url).await.unwrap();
    assert_eq!(again.project("a").await.unwrap().map(|record| record.quota_bytes), Some(5 << 20));
    // A project's lock holds across them: shared with shared, exclusive alone.
    let wait = std::time::Duration::from_millis(300);
    let shared = state.project_lock("a", false).await.unwrap();
    let also_shared = tokio::time::timeout(wait, again.project_lock("a", false)).await;
    assert!(also_shared.is_ok_and(|lock| lock.is_ok()), "shared locks do not exclude each other");
    assert!(tokio::time::timeout(wait, again.project_lock("a", true)).await.is_err(), "exclusive waits for shared");
    assert!(tokio::time::timeout(wait, again.project_lock("b", true)).await.is_ok(), "another project is free");
    drop(shared);
    let exclusive = tokio::time::timeout(std::time::Duration::from_secs(5), again.project_lock("a", true)).await;
    let exclusive = exclusive.expect("granted once the shared locks went").unwrap();
    assert!(tokio::time::timeout(wait, state.project_lock("a", false)).await.is_err(), "shared waits for exclusive");
    drop(exclusive);
    assert!(tokio::time::timeout(std::time::Duration::from_secs(5), state.project_lock("a", false)).await.is_ok());
    // One replica leads the background work; another takes the lead once it goes.
    let lead = state.lead_background_work().await.unwrap();
    assert!(lead.is_some());
    assert!(again.lead_background_work().await.unwrap().is_none(), "one leader at a time");
    drop(lead);
    let mut taken = None;
    for _ in 0..50 {
        taken = again.lead_background_work().await.unwrap();
        if taken.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(taken.is_some(), "the lead is free once its holder lets go");
    let again = std::sync::Arc::new(again);
    ephemeral_records_are_shared(std::sync::Arc::new(state), again.clone()).await;
    // A lookup's hit holds the publish lock shared for its step: it waits for a flush's
    // (exclusive) lock; a miss takes none.
    let flushing = again.project_lock("look", true).await.unwrap();
    let mut grant = |_: &pb::Manifest, _: &mut Leases, _: &LeaseDemands| LeaseDemand::default();
    let miss = tokio::time::timeout(wait, again.look_up("look", OWNER, &[key("none")], 8, &mut grant)).await;
    assert!(miss.is_ok_and(|found| found.unwrap().is_none()), "a miss waits for no lock");
    let mut grant = |_: &pb::Manifest, _: &mut Leases, _: &LeaseDemands| LeaseDemand::default();
    let hit = tokio::time::timeout(wait, again.look_up("look", OWNER, &[key("web")], 8, &mut grant)).await;
    assert!(hit.is_err(), "a hit waits for the exclusive lock");
    let mut register =
        |_: &ProjectRecord, _: &HashMap<String, BlobRecord>, _: &[pb::Manifest], _: &mut OpenSaves| Ok(());
    let begin = tokio::time::timeout(wait, again.begin_save("look", OWNER, &["c1".to_string()], &mut register)).await;
    assert!(begin.is_err(), "a begin waits for the exclusive lock");
    let passes = &mut |_: &ProjectRecord, _: &HashMap<String, BlobRecord>| Ok(true);
    let saved = manifest("web", &["c1", "l1"], 6);
    let commit =
        tokio::time::timeout(wait, again.commit_known("look", OWNER, &saved, 0, &sizes(), 9, passes, "s")).await;
    assert!(commit.is_err(), "a commit waits for the exclusive lock");
    drop(flushing);

    // A manifest written before schema version 4 has no list of its blobs beside it: a commit
    // replacing it reads them from its body.
    let config: tokio_postgres::Config = url.parse().unwrap();
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("UPDATE lc_manifests SET digests = NULL WHERE project = 'swap'").await.unwrap();
    commit_known_in_swap(again.as_ref(), again.as_ref(), &["c2", "l2"], 8).await;
    assert_eq!(references(again.as_ref(), "swap", "l1").await, Some(0));
    assert_eq!(references(again.as_ref(), "swap", "l2").await, Some(2));
    let listed: Vec<String> = client
        .query_one("SELECT digests FROM lc_manifests WHERE project = 'swap' AND service = 'web'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listed, ["c2", "l2"]);

    // A database of schema version 1 is migrated; one newer than this coordinator's refused.
    client
        .batch_execute(
            "DROP TABLE lc_open_saves, lc_leases, lc_lease_demand; ALTER TABLE lc_manifests DROP COLUMN digests;
             UPDATE lc_schema SET version = 1",
        )
        .await
        .unwrap();
    let migrated = postgres::Postgres::connect(&url).await.unwrap();
    assert_eq!(migrated.project("a").await.unwrap().map(|record| record.quota_bytes), Some(5 << 20));
    let version: i32 = client.query_one("SELECT version FROM lc_schema", &[]).await.unwrap().get(0);
    assert_eq!(version, 4);
    migrated
        .update_leases("p", &mut |leases, _| {
            assert!(leases.is_empty());
            LeaseDemand::default()
        })
        .await
        .unwrap();
    // One of version 2 keeps its leases, a restore's reads moved apart from its record.
    let lease = r#"{"project":"p","kind":"Restore","fixed":1,"order":0,"renewed_unix_ms":9,"reads":["sha256:r"]}"#;
    client
        .batch_execute(&format!(
            "DROP TABLE lc_lease_demand; DROP INDEX lc_leases_project; ALTER TABLE lc_leases DROP COLUMN reads;
             ALTER TABLE lc_manifests DROP COLUMN digests;
             INSERT INTO lc_leases (id, project, record) VALUES ('r', 'p', '{lease}');
             UPDATE lc_schema SET version = 2"
        ))
        .await
        .unwrap();
    let migrated = postgres::Postgres::connect(&url).await.unwrap();
    let mut seen = Vec::new();
    migrated.read_leases(Some("p"), &mut |leases| seen.extend(leases["r"].reads.iter().cloned())).await.unwrap();
    assert_eq!(seen, ["sha256:r"]);
    let record: String = client.query_one("SELECT record FROM lc_leases", &[]).await.unwrap().get(0);
    assert!(!record.contains("sha256:r"), "{record}");
    client.batch_execute("UPDATE lc_schema SET version = 99").await.unwrap();
    let refused = postgres::Postgres::connect(&url).await.err().expect("a newer schema is refused").to_string();
    assert!(refused.contains("schema is version 99, newer than this coordinator's 4"), "{refused}");
    assert_eq!(refused.lines().count(), 1, "{refused}");
}
