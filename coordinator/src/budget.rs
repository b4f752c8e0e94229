//! The transfer planner: the part size and how many requests each worker may have in flight,
//! under a global budget shared fairly between projects, so a hundred build hosts saving at
//! once do not stampede one bucket, and no project, however many transfers it holds open,
//! takes another's share.
//!
//! Each plan holds a lease on its share until the save commits, the restore reports, or the
//! lease lapses (a worker that died). Shares are max-min fair between projects (a project that
//! needs less than an equal part leaves the rest to the others) and recomputed at every grant
//! and release:
//! - a save's share can change while it runs: its worker learns the current one from each
//!   keep-alive answer, and a save beyond its project's share gets 0 (it waits), so the saves
//!   together never exceed the budget; a project's share goes max-min fairly to the tokens
//!   saving first, then evenly to each token's saves, so no token's saves starve another's;
//! - a restore cannot be slowed once started (it has no keep-alive), so it keeps what it was
//!   granted: at least one request, at most what its project's share leaves, a project's
//!   restores together at most half the budget and at most [`MOST_RESTORES_PER_TOKEN`] of
//!   them per token (beyond, that token's oldest lapses), so a project arriving later always
//!   finds its share.
//!
//! Leases are partitioned by project: a change (grant, keep-alive, release) sees its own
//! project's leases in full and, of the others, only each project's demand as that project's
//! last change recorded it, so no project ever waits for another's. Across replicas that
//! snapshot may be one concurrent change old, so the budget is a soft bound there: two
//! projects granting at once may each count the other's demand from just before, and
//! together exceed their shares until their saves' next keep-alive (every save learns its
//! current share from each) or their restores end. A project whose leases all lapsed counts
//! 0 (its demand carries when its last lease lapses); the next change of its leases drops them.
//!
//! A restore's lease also protects the blobs it reads from eviction and collection. The bound
//! counts each token's restores apart, so no token (a pull request's, looking up its own
//! branches) can end the lease, and the protection, of a restore another token runs.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proto::v1 as pb;

use crate::error::Error;
pub use crate::state::LeaseKind;
use crate::state::{Ephemeral, Lease, LeaseDemand, Leases};

/// Other projects' demands (requests in flight their live leases ask for), by project.
type Demands = BTreeMap<String, u32>;

/// How long a lease holds without its save committing or saying it is alive, or its restore
/// reporting.
const LEASE_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Restore leases one token of a project (the project token, or one scoped token) holds at once.
pub const MOST_RESTORES_PER_TOKEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanSettings {
    /// The smallest part of a multipart upload or a ranged GET, in bytes.
    pub part_size: u64,
    /// Blobs this big or bigger are uploaded in parts, in bytes.
    pub multipart_threshold: u64,
    /// Requests in flight for one worker, at most.
    pub worker_concurrency: u32,
    /// Requests in flight for all workers together.
    pub transfer_budget: u32,
}

/// The planner. Its leases live in the state's ephemeral records, so replicas sharing a
/// database share one budget; every change runs on one consistent view of its project's
/// leases, beside the other projects' demands.
pub struct TransferBudget {
    settings: PlanSettings,
    leases: Arc<dyn Ephemeral>,
}

/// Max-min fair shares of `budget` between demands: each gets its demand or an equal part of
/// what the smaller demands left, whichever is less.
fn fair_shares(budget: u32, demands: &BTreeMap<&str, u32>) -> BTreeMap<String, u32> {
    let mut by_demand: Vec<(&str, u32)> = demands.iter().map(|(project, demand)| (*project, *demand)).collect();
    by_demand.sort_by_key(|(project, demand)| (*demand, *project));
    let (mut left, mut shares) = (budget, BTreeMap::new());
    let n = by_demand.len() as u32;
    for (i, (project, demand)) in by_demand.into_iter().enumerate() {
        let share = demand.min(left / (n - i as u32));
        left -= share;
        shares.insert(project.to_owned(), share);
    }
    shares
}

/// Whether a lease renewed at `renewed` has lapsed at `now` (unix milliseconds).
fn lapsed(renewed: i64, now: i64) -> bool {
    now.saturating_sub(renewed) >= LEASE_LIFETIME.as_millis() as i64
}

impl TransferBudget {
    pub fn new(settings: PlanSettings, leases: Arc<dyn Ephemeral>) -> TransferBudget {
        TransferBudget { settings, leases }
    }

    /// Runs `change` on `project`'s live leases at `now`, beside the other projects' live
    /// demands; when some of its leases lapsed, the others' shares are recomputed first.
    async fn change<R: Send>(
        &self,
        project: &str,
        now: i64,
        change: impl FnOnce(&mut Leases, &Demands) -> R + Send,
    ) -> Result<R, Error> {
        let mut change = Some(change);
        let mut result = None;
        self.leases
            .update_leases(project, &mut |leases, demands| {
                let change = change.take().expect("a change runs once");
                let (changed, demand) = self.run_change(project, now, leases, demands, change);
                result = Some(changed);
                demand
            })
            .await?;
        Ok(result.expect("the change ran"))
    }

    /// Runs `change` on `project`'s `leases` at `now` (those lapsed dropped first), beside the
    /// live ones of the other projects' `demands`; answers what `change` did and the project's
    /// demand after it, as [`Ephemeral::update_leases`] records it.
    fn run_change<R>(
        &self,
        project: &str,
        now: i64,
        leases: &mut Leases,
        demands: &crate::state::LeaseDemands,
        change: impl FnOnce(&mut Leases, &Demands) -> R,
    ) -> (R, LeaseDemand) {
        leases.retain(|_, lease| lease.project == project && !lapsed(lease.renewed_unix_ms, now));
        let others: Demands = demands
            .iter()
            .filter(|(other, demand)| *other != project && demand.lapses_unix_ms > now)
            .map(|(other, demand)| (other.clone(), demand.demand))
            .collect();
        self.rebalance(project, leases, &others);
        let changed = change(leases, &others);
        let lapses_unix_ms = leases
            .values()
            .map(|lease| lease.renewed_unix_ms.saturating_add(LEASE_LIFETIME.as_millis() as i64))
            .max()
            .unwrap_or(now);
        (changed, LeaseDemand { demand: self.demand(leases.values()), lapses_unix_ms })
    }

    /// Answers `read` of every project's live leases at `now`, each project's shares computed
    /// from all of them.
    async fn read<R: Send>(
        &self,
        now: i64,
        read: impl Fn(&mut dyn Iterator<Item = &Lease>) -> R + Send + Sync,
    ) -> Result<R, Error> {
        let mut result = None;
        self.leases
            .read_leases(None, &mut |leases| {
                let mut by_project: BTreeMap<String, Leases> = BTreeMap::new();
                for (id, lease) in leases.iter().filter(|(_, lease)| !lapsed(lease.renewed_unix_ms, now)) {
                    by_project.entry(lease.project.clone()).or_default().insert(id.clone(), lease.clone());
                }
                let demands: Demands = by_project
                    .iter()
                    .map(|(project, leases)| (project.clone(), self.demand(leases.values())))
                    .collect();
                for (project, leases) in by_project.iter_mut() {
                    let mut others = demands.clone();
                    others.remove(project);
                    self.rebalance(project, leases, &others);
                }
                result = Some(read(&mut by_project.values().flat_map(|leases| leases.values())));
            })
            .await?;
        Ok(result.expect("the read ran"))
    }

    /// A plan for one transfer of `project`, holding a share of the budget under `lease_id`.
    pub async fn grant(
        &self,
        project: &str,
        lease_id: &str,
        kind: LeaseKind,
        now: i64,
    ) -> Result<pb::TransferPlan, Error> {
        self.grant_reading(project, "", lease_id, kind, BTreeSet::new(), now).await
    }

    /// A save's plan for the token `holder` (a scoped token's ID; empty for the project
    /// token): its project's share is split between the tokens saving first, so one token's
    /// many saves never leave another's at 0.
    pub async fn grant_save(
        &self,
        project: &str,
        holder: &str,
        lease_id: &str,
        now: i64,
    ) -> Result<pb::TransferPlan, Error> {
        self.grant_reading(project, holder, lease_id, LeaseKind::Save, BTreeSet::new(), now).await
    }

    /// A restore's plan for the token `holder` (a scoped token's ID; empty for the project
    /// token), its lease also keeping the blobs it `reads` from deletion until its report
    /// releases it (or it lapses).
    pub async fn grant_restore(
        &self,
        project: &str,
        holder: &str,
        lease_id: &str,
        reads: BTreeSet<String>,
        now: i64,
    ) -> Result<pb::TransferPlan, Error> {
        self.grant_reading(project, holder, lease_id, LeaseKind::Restore, reads, now).await
    }

    /// The blobs the live restores of `project` read.
    pub async fn read_by_restores(&self, project: &str, now: i64) -> Result<HashSet<String>, Error> {
        let mut reads = HashSet::new();
        self.leases
            .read_leases(Some(project), &mut |leases| {
                let live =
                    leases.values().filter(|lease| lease.project == project && !lapsed(lease.renewed_unix_ms, now));
                reads = live.flat_map(|lease| lease.reads.iter().cloned()).collect();
            })
            .await?;
        Ok(reads)
    }

    async fn grant_reading(
        &self,
        project: &str,
        holder: &str,
        lease_id: &str,
        kind: LeaseKind,
        reads: BTreeSet<String>,
        now: i64,
    ) -> Result<pb::TransferPlan, Error> {
        let mut reads = Some(reads);
        let mut plan = None;
        self.leases
            .update_leases(project, &mut |leases, demands| {
                let reads = reads.take().expect("a grant runs once");
                let (granted, demand) = self.grant_in(project, holder, lease_id, kind, reads, now, leases, demands);
                plan = Some(granted);
                demand
            })
            .await?;
        Ok(plan.expect("the grant ran"))
    }

    /// Grants `project` a lease (see [`TransferBudget::grant_restore`]) inside a step its
    /// caller runs on the project's `leases` and the others' `demands` (as
    /// [`Ephemeral::update_leases`] does): the plan, and the demand to record.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn grant_in(
        &self,
        project: &str,
        holder: &str,
        lease_id: &str,
        kind: LeaseKind,
        reads: BTreeSet<String>,
        now: i64,
        leases: &mut Leases,
        demands: &crate::state::LeaseDemands,
    ) -> (pb::TransferPlan, LeaseDemand) {
        let (concurrency, demand) = self.run_change(project, now, leases, demands, |leases, others| {
            leases.remove(lease_id);
            let concurrency = match kind {
                LeaseKind::Save => 0,
                LeaseKind::Restore => {
                    // Only the holder's own restores make room: another token's lookups
                    // never end a lease, nor the protection of the blobs it reads.
                    let mut restores: Vec<(u64, String)> = leases
                        .iter()
                        .filter(|(_, lease)| {
                            lease.project == project && lease.kind == LeaseKind::Restore && lease.holder == holder
                        })
                        .map(|(id, lease)| (lease.order, id.clone()))
                        .collect();
                    restores.sort();
                    let beyond = (restores.len() + 1).saturating_sub(MOST_RESTORES_PER_TOKEN);
                    for (_, oldest) in restores.iter().take(beyond) {
                        leases.remove(oldest);
                    }
                    self.restore_share(leases, others, project)
                }
            };
            let order = leases.values().map(|lease| lease.order + 1).max().unwrap_or(0);
            let lease = Lease {
                project: project.to_owned(),
                kind,
                fixed: concurrency,
                concurrency,
                order,
                renewed_unix_ms: now,
                reads,
                holder: holder.to_owned(),
            };
            leases.insert(lease_id.to_owned(), lease);
            self.rebalance(project, leases, others);
            leases[lease_id].concurrency
        });
        (self.plan(lease_id, concurrency), demand)
    }

    fn plan(&self, lease_id: &str, concurrency: u32) -> pb::TransferPlan {
        pb::TransferPlan {
            part_size: self.settings.part_size,
            multipart_threshold: self.settings.multipart_threshold,
            max_concurrency: concurrency,
            lease_id: lease_id.to_owned(),
        }
    }

    /// A project's demand, from its leases: its restores' fixed shares, and a full worker's
    /// cap for each save.
    fn demand<'a>(&self, leases: impl Iterator<Item = &'a Lease>) -> u32 {
        leases
            .map(|lease| match lease.kind {
                LeaseKind::Save => self.settings.worker_concurrency,
                LeaseKind::Restore => lease.fixed,
            })
            .fold(0u32, u32::saturating_add)
    }

    /// Every project's demand: the others' as given, `project`'s from its `leases`, plus `more`.
    fn demands<'a>(&self, project: &'a str, leases: &Leases, others: &'a Demands, more: u32) -> BTreeMap<&'a str, u32> {
        let mut demands: BTreeMap<&str, u32> =
            others.iter().filter(|(_, demand)| **demand > 0).map(|(other, demand)| (other.as_str(), *demand)).collect();
        let own = self.demand(leases.values()).saturating_add(more);
        if own > 0 {
            demands.insert(project, own);
        }
        demands
    }

    /// What a new restore of `project` gets: what its fair share (as if it asked a worker's
    /// cap more) leaves beside its restores, within half the budget for all its restores, and
    /// never below one.
    fn restore_share(&self, leases: &Leases, others: &Demands, project: &str) -> u32 {
        let cap = self.settings.worker_concurrency;
        let demands = self.demands(project, leases, others, cap);
        let share = fair_shares(self.settings.transfer_budget, &demands)[project];
        let restoring: u32 =
            leases.values().filter(|lease| lease.kind == LeaseKind::Restore).map(|lease| lease.fixed).sum();
        let half = (self.settings.transfer_budget / 2).saturating_sub(restoring);
        share.saturating_sub(restoring).min(half).min(cap).max(1)
    }

    /// Gives every save of `project` (its `leases`) its part of the project's fair share beside
    /// the `others`' demands, oldest first: an equal part within the worker's cap, or, when the
    /// project holds more saves than its share has requests, one each for the oldest and none
    /// for the rest.
    fn rebalance(&self, project: &str, leases: &mut Leases, others: &Demands) {
        for lease in leases.values_mut().filter(|lease| lease.kind == LeaseKind::Restore) {
            lease.concurrency = lease.fixed;
        }
        let demands = self.demands(project, leases, others, 0);
        let Some(share) = fair_shares(self.settings.transfer_budget, &demands).get(project).copied() else { return };
        // The project's saves by the token that began them.
        let mut by_token: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
        let mut restoring = 0u32;
        for (id, lease) in leases.iter() {
            match lease.kind {
                LeaseKind::Save => by_token.entry(lease.holder.clone()).or_default().push((lease.order, id.clone())),
                LeaseKind::Restore => restoring += lease.fixed,
            }
        }
        let share = share.saturating_sub(restoring);
        // Max-min fair between the project's tokens, then evenly between a token's saves
        // (the older first when the share does not divide).
        let token_demands: BTreeMap<&str, u32> = by_token
            .iter()
            .map(|(token, ids)| (token.as_str(), (ids.len() as u32).saturating_mul(self.settings.worker_concurrency)))
            .collect();
        let token_shares = fair_shares(share, &token_demands);
        for (token, mut ids) in by_token {
            ids.sort();
            let share = token_shares[&token];
            let n = ids.len() as u32;
            for (i, (_, id)) in ids.iter().enumerate() {
                let i = i as u32;
                let part = share / n + u32::from(i < share % n);
                leases.get_mut(id).expect("listed").concurrency = part.min(self.settings.worker_concurrency);
            }
        }
    }

    /// A save's lease renewed by its keep-alive: the share it holds now (it may have changed
    /// since the last answer), or `None` when the lease has lapsed or is another project's.
    pub async fn renew(&self, project: &str, lease_id: &str, now: i64) -> Result<Option<pb::TransferPlan>, Error> {
        let concurrency = self
            .change(project, now, |leases, _| {
                let lease = leases.get_mut(lease_id).filter(|lease| lease.project == project)?;
                lease.renewed_unix_ms = now;
                Some(lease.concurrency)
            })
            .await?;
        Ok(concurrency.map(|concurrency| self.plan(lease_id, concurrency)))
    }

    /// Gives a lease's share back. Only the project that holds it can release it.
    pub async fn release(&self, project: &str, lease_id: &str, now: i64) -> Result<(), Error> {
        self.change(project, now, |leases, others| {
            if leases.remove(lease_id).is_some() {
                self.rebalance(project, leases, others);
            }
        })
        .await
    }

    /// The global budget of requests in flight.
    pub fn total(&self) -> u32 {
        self.settings.transfer_budget
    }

    /// Requests in flight the live leases allow, for the metrics.
    pub async fn granted(&self, now: i64) -> Result<u32, Error> {
        self.read(now, |leases| leases.map(|lease| lease.concurrency).sum()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clock of these tests, in unix milliseconds.
    const NOW: i64 = 1_800_000_000_000;

    fn budget(worker_concurrency: u32, transfer_budget: u32) -> TransferBudget {
        let settings =
            PlanSettings { part_size: 16 << 20, multipart_threshold: 16 << 20, worker_concurrency, transfer_budget };
        TransferBudget::new(settings, Arc::new(crate::state::InMemory::default()))
    }

    async fn save(budget: &TransferBudget, project: &str, lease: &str) -> u32 {
        budget.grant(project, lease, LeaseKind::Save, NOW).await.unwrap().max_concurrency
    }

    async fn now(budget: &TransferBudget, project: &str, lease: &str) -> u32 {
        budget.renew(project, lease, NOW).await.unwrap().expect("a live lease").max_concurrency
    }

    async fn restore(budget: &TransferBudget, project: &str, lease: &str) -> u32 {
        budget.grant(project, lease, LeaseKind::Restore, NOW).await.unwrap().max_concurrency
    }

    #[tokio::test]
    async fn one_tokens_many_saves_never_leave_another_tokens_save_waiting() {
        let budget = budget(8, 16);
        for i in 0..64 {
            budget.grant_save("web", "tok_pr", &format!("pr{i}"), NOW).await.unwrap();
        }
        // The project token's save, begun last, gets half the project's share at once...
        assert_eq!(budget.grant_save("web", "", "main", NOW).await.unwrap().max_concurrency, 8);
        // ...and the pull request's 64 saves share the other half, the budget kept.
        let mut pr = 0;
        for i in 0..64 {
            pr += now(&budget, "web", &format!("pr{i}")).await;
        }
        assert_eq!(pr, 8);
        assert_eq!(budget.granted(NOW).await.unwrap(), 16);
    }

    #[tokio::test]
    async fn a_lone_worker_gets_the_per_worker_cap() {
        let budget = budget(8, 256);
        let plan = budget.grant("web", "a", LeaseKind::Save, NOW).await.unwrap();
        assert_eq!((plan.max_concurrency, plan.part_size, plan.lease_id.as_str()), (8, 16 << 20, "a"));
        assert_eq!(restore(&budget, "web", "r").await, 8);
    }

    #[tokio::test]
    async fn hundreds_of_open_saves_of_one_project_leave_anothers_share_whole_and_the_budget_unexceeded() {
        let budget = budget(8, 256);
        for i in 0..300 {
            save(&budget, "hoarder", &format!("h{i}")).await;
        }
        assert_eq!(budget.granted(NOW).await.unwrap(), 256, "the saves beyond the budget wait");
        // Another project's save gets a full worker's cap, its restore too; the hoarder's
        // saves shrink to make room.
        assert_eq!(save(&budget, "web", "w0").await, 8);
        assert_eq!(restore(&budget, "web", "wr").await, 8);
        assert!(budget.granted(NOW).await.unwrap() <= 256, "{}", budget.granted(NOW).await.unwrap());
        // Many saves of the other project: it holds half the budget, the hoarder the rest.
        for i in 1..40 {
            save(&budget, "web", &format!("w{i}")).await;
        }
        let (mut web, mut hoarder) = (8, 0);
        for i in 0..40 {
            web += now(&budget, "web", &format!("w{i}")).await;
        }
        for i in 0..300 {
            hoarder += now(&budget, "hoarder", &format!("h{i}")).await;
        }
        assert_eq!((web, hoarder, budget.granted(NOW).await.unwrap()), (128, 128, 256));
        // The oldest of the hoarder's saves hold one request each, the newest wait.
        assert_eq!((now(&budget, "hoarder", "h0").await, now(&budget, "hoarder", "h299").await), (1, 0));
        // Once the other project is done, the hoarder's saves get the budget back.
        for i in 0..40 {
            budget.release("web", &format!("w{i}"), NOW).await.unwrap();
        }
        budget.release("web", "wr", NOW).await.unwrap();
        assert_eq!(budget.granted(NOW).await.unwrap(), 256);
        assert_eq!(now(&budget, "hoarder", "h255").await, 1);
    }

    #[tokio::test]
    async fn restores_hold_at_most_half_the_budget_and_a_bounded_number_of_leases() {
        let budget = budget(8, 64);
        let mut restores = Vec::new();
        for i in 0..40 {
            restores.push(restore(&budget, "flood", &format!("r{i}")).await);
        }
        assert_eq!(&restores[..4], &[8, 8, 8, 8], "{restores:?}");
        assert!(restores.iter().all(|&c| c >= 1), "a restore always gets a request");
        let mut held = 0;
        for i in 24..40 {
            held += budget.renew("flood", &format!("r{i}"), NOW).await.unwrap().map_or(0, |p| p.max_concurrency);
        }
        assert_eq!(
            budget.granted(NOW).await.unwrap(),
            held,
            "only the newest {MOST_RESTORES_PER_TOKEN} restores hold leases"
        );
        assert!(budget.renew("flood", "r0", NOW).await.unwrap().is_none(), "the oldest lapsed");
        assert!(
            budget.granted(NOW).await.unwrap() <= 32 + MOST_RESTORES_PER_TOKEN as u32,
            "{}",
            budget.granted(NOW).await.unwrap()
        );
        // A project arriving after the flood finds its share.
        assert_eq!(save(&budget, "web", "w").await, 8);
        assert!(budget.granted(NOW).await.unwrap() <= 64, "{}", budget.granted(NOW).await.unwrap());
    }

    #[tokio::test]
    async fn only_the_holder_releases_or_renews_a_lease() {
        let budget = budget(8, 8);
        save(&budget, "web", "a").await;
        budget.release("api", "a", NOW).await.unwrap();
        assert!(budget.renew("api", "a", NOW).await.unwrap().is_none());
        assert_eq!(budget.granted(NOW).await.unwrap(), 8);
        budget.release("web", "a", NOW).await.unwrap();
        assert_eq!(budget.granted(NOW).await.unwrap(), 0);
    }

    #[test]
    fn fair_shares_are_max_min_fair_and_spend_the_whole_budget() {
        let demands: BTreeMap<&str, u32> = [("a", 2), ("b", 100), ("c", 100)].into_iter().collect();
        let shares = fair_shares(16, &demands);
        assert_eq!((shares["a"], shares["b"], shares["c"]), (2, 7, 7));
        let demands: BTreeMap<&str, u32> = [("a", 100), ("b", 100), ("c", 100)].into_iter().collect();
        assert_eq!(fair_shares(16, &demands).values().sum::<u32>(), 16);
    }

    #[tokio::test]
    async fn another_tokens_lookups_never_end_a_restores_lease_or_its_protection() {
        let budget = budget(8, 64);
        let main_reads: BTreeSet<String> = ["sha256:main".to_string()].into();
        budget.grant_restore("web", "", "main", main_reads, NOW).await.unwrap();
        for i in 0..3 * MOST_RESTORES_PER_TOKEN {
            let reads: BTreeSet<String> = [format!("sha256:pr{i}")].into();
            budget.grant_restore("web", "pr-token", &format!("pr{i}"), reads, NOW).await.unwrap();
        }
        let read = budget.read_by_restores("web", NOW).await.unwrap();
        assert!(read.contains("sha256:main"), "another token's lookups never unprotect main's restore");
        let n_pr = read.iter().filter(|digest| digest.starts_with("sha256:pr")).count();
        assert_eq!(n_pr, MOST_RESTORES_PER_TOKEN, "the pull request's own oldest make room");
        assert!(budget.granted(NOW).await.unwrap() <= 64, "{}", budget.granted(NOW).await.unwrap());
        // The same token's own restores beyond the bound still end its oldest.
        for i in 0..MOST_RESTORES_PER_TOKEN {
            budget.grant_restore("web", "", &format!("m{i}"), BTreeSet::new(), NOW).await.unwrap();
        }
        assert!(!budget.read_by_restores("web", NOW).await.unwrap().contains("sha256:main"));
    }

    #[tokio::test]
    async fn a_restores_blobs_are_kept_until_its_lease_goes() {
        let budget = budget(8, 64);
        let reads = |digests: &[&str]| digests.iter().map(|d| d.to_string()).collect::<BTreeSet<String>>();
        budget.grant_restore("web", "", "r1", reads(&["sha256:a", "sha256:b"]), NOW).await.unwrap();
        budget.grant_restore("web", "", "r2", reads(&["sha256:b", "sha256:c"]), NOW).await.unwrap();
        budget.grant_restore("api", "", "r3", reads(&["sha256:d"]), NOW).await.unwrap();
        let read = budget.read_by_restores("web", NOW).await.unwrap();
        assert_eq!(read, ["sha256:a", "sha256:b", "sha256:c"].iter().map(|d| d.to_string()).collect());
        budget.release("web", "r1", NOW).await.unwrap();
        assert!(!budget.read_by_restores("web", NOW).await.unwrap().contains("sha256:a"));
        assert!(budget.read_by_restores("web", NOW).await.unwrap().contains("sha256:b"));
        assert_eq!(
            budget.read_by_restores("api", NOW).await.unwrap().len(),
            1,
            "another project's restores are its own"
        );
    }
}
