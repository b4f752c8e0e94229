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
//!   together never exceed the budget;
//! - a restore cannot be slowed once started (it has no keep-alive), so it keeps what it was
//!   granted: at least one request, at most what its project's share leaves, a project's
//!   restores together at most half the budget and at most [`MOST_RESTORES_PER_PROJECT`] of
//!   them (beyond, its oldest lapses), so a project arriving later always finds its share.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proto::v1 as pb;

/// How long a lease holds without its save committing or saying it is alive, or its restore
/// reporting.
const LEASE_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Restore leases one project holds at once.
pub const MOST_RESTORES_PER_PROJECT: usize = 16;

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

/// What a lease is for: a save's share follows the budget while it runs, a restore's is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    Save,
    Restore,
}

struct Lease {
    project: String,
    kind: LeaseKind,
    concurrency: u32,
    granted: Instant,
    /// Its grant, or the save's last keep-alive.
    renewed: Instant,
    /// A restore's: the blobs of the manifest it reads, which no eviction or collection
    /// deletes while the lease lives.
    reads: BTreeSet<String>,
}

pub struct TransferBudget {
    settings: PlanSettings,
    leases: Mutex<HashMap<String, Lease>>,
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

impl TransferBudget {
    pub fn new(settings: PlanSettings) -> TransferBudget {
        TransferBudget { settings, leases: Mutex::new(HashMap::new()) }
    }

    /// The live leases; when some lapsed, the others' shares are recomputed.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        let mut leases = self.leases.lock().expect("budget lock");
        let before = leases.len();
        leases.retain(|_, lease| lease.renewed.elapsed() < LEASE_LIFETIME);
        if leases.len() != before {
            self.rebalance(&mut leases);
        }
        leases
    }

    /// A plan for one transfer of `project`, holding a share of the budget under `lease_id`.
    pub fn grant(&self, project: &str, lease_id: &str, kind: LeaseKind) -> pb::TransferPlan {
        self.grant_reading(project, lease_id, kind, BTreeSet::new())
    }

    /// A restore's plan, its lease also keeping the blobs it `reads` from deletion until its
    /// report releases it (or it lapses).
    pub fn grant_restore(&self, project: &str, lease_id: &str, reads: BTreeSet<String>) -> pb::TransferPlan {
        self.grant_reading(project, lease_id, LeaseKind::Restore, reads)
    }

    /// The blobs the live restores of `project` read.
    pub fn read_by_restores(&self, project: &str) -> HashSet<String> {
        let leases = self.lock();
        leases.values().filter(|lease| lease.project == project).flat_map(|lease| lease.reads.iter().cloned()).collect()
    }

    fn grant_reading(
        &self,
        project: &str,
        lease_id: &str,
        kind: LeaseKind,
        reads: BTreeSet<String>,
    ) -> pb::TransferPlan {
        let mut leases = self.lock();
        leases.remove(lease_id);
        let now = Instant::now();
        let concurrency = match kind {
            LeaseKind::Save => 0,
            LeaseKind::Restore => {
                let mut restores: Vec<(Instant, String)> = leases
                    .iter()
                    .filter(|(_, lease)| lease.project == project && lease.kind == LeaseKind::Restore)
                    .map(|(id, lease)| (lease.granted, id.clone()))
                    .collect();
                restores.sort();
                for (_, oldest) in restores.iter().take((restores.len() + 1).saturating_sub(MOST_RESTORES_PER_PROJECT))
                {
                    leases.remove(oldest);
                }
                self.restore_share(&leases, project)
            }
        };
        let lease = Lease { project: project.to_owned(), kind, concurrency, granted: now, renewed: now, reads };
        leases.insert(lease_id.to_owned(), lease);
        self.rebalance(&mut leases);
        self.plan(lease_id, leases[lease_id].concurrency)
    }

    fn plan(&self, lease_id: &str, concurrency: u32) -> pb::TransferPlan {
        pb::TransferPlan {
            part_size: self.settings.part_size,
            multipart_threshold: self.settings.multipart_threshold,
            max_concurrency: concurrency,
            lease_id: lease_id.to_owned(),
        }
    }

    /// Each project's demand: its restores' fixed shares, and a full worker's cap for each save.
    fn demands<'a>(&self, leases: &'a HashMap<String, Lease>) -> BTreeMap<&'a str, u32> {
        let mut demands: BTreeMap<&str, u32> = BTreeMap::new();
        for lease in leases.values() {
            let demand = match lease.kind {
                LeaseKind::Save => self.settings.worker_concurrency,
                LeaseKind::Restore => lease.concurrency,
            };
            *demands.entry(lease.project.as_str()).or_default() += demand;
        }
        demands
    }

    /// What a new restore of `project` gets: what its fair share (as if it asked a worker's
    /// cap more) leaves beside its restores, within half the budget for all its restores, and
    /// never below one.
    fn restore_share(&self, leases: &HashMap<String, Lease>, project: &str) -> u32 {
        let cap = self.settings.worker_concurrency;
        let mut demands = self.demands(leases);
        *demands.entry(project).or_default() += cap;
        let share = fair_shares(self.settings.transfer_budget, &demands)[project];
        let restoring: u32 = leases
            .values()
            .filter(|lease| lease.project == project && lease.kind == LeaseKind::Restore)
            .map(|lease| lease.concurrency)
            .sum();
        let half = (self.settings.transfer_budget / 2).saturating_sub(restoring);
        share.saturating_sub(restoring).min(half).min(cap).max(1)
    }

    /// Gives every save its part of its project's fair share, oldest first: an equal part
    /// within the worker's cap, or, when the project holds more saves than its share has
    /// requests, one each for the oldest and none for the rest.
    fn rebalance(&self, leases: &mut HashMap<String, Lease>) {
        let shares = fair_shares(self.settings.transfer_budget, &self.demands(leases));
        let mut saves: BTreeMap<String, Vec<(Instant, String)>> = BTreeMap::new();
        let mut restoring: HashMap<String, u32> = HashMap::new();
        for (id, lease) in leases.iter() {
            match lease.kind {
                LeaseKind::Save => saves.entry(lease.project.clone()).or_default().push((lease.granted, id.clone())),
                LeaseKind::Restore => *restoring.entry(lease.project.clone()).or_default() += lease.concurrency,
            }
        }
        for (project, mut ids) in saves {
            ids.sort();
            let share = shares[&project].saturating_sub(restoring.get(&project).copied().unwrap_or(0));
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
    pub fn renew(&self, project: &str, lease_id: &str) -> Option<pb::TransferPlan> {
        let mut leases = self.lock();
        let lease = leases.get_mut(lease_id).filter(|lease| lease.project == project)?;
        lease.renewed = Instant::now();
        let concurrency = lease.concurrency;
        Some(self.plan(lease_id, concurrency))
    }

    /// Gives a lease's share back. Only the project that holds it can release it.
    pub fn release(&self, project: &str, lease_id: &str) {
        let mut leases = self.lock();
        if leases.get(lease_id).is_some_and(|lease| lease.project == project) {
            leases.remove(lease_id);
            self.rebalance(&mut leases);
        }
    }

    /// The global budget of requests in flight.
    pub fn total(&self) -> u32 {
        self.settings.transfer_budget
    }

    /// Requests in flight the live leases allow, for the metrics.
    pub fn granted(&self) -> u32 {
        self.lock().values().map(|lease| lease.concurrency).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(worker_concurrency: u32, transfer_budget: u32) -> TransferBudget {
        TransferBudget::new(PlanSettings {
            part_size: 16 << 20,
            multipart_threshold: 16 << 20,
            worker_concurrency,
            transfer_budget,
        })
    }

    fn save(budget: &TransferBudget, project: &str, lease: &str) -> u32 {
        budget.grant(project, lease, LeaseKind::Save).max_concurrency
    }

    fn now(budget: &TransferBudget, project: &str, lease: &str) -> u32 {
        budget.renew(project, lease).expect("a live lease").max_concurrency
    }

    #[test]
    fn a_lone_worker_gets_the_per_worker_cap() {
        let budget = budget(8, 256);
        let plan = budget.grant("web", "a", LeaseKind::Save);
        assert_eq!((plan.max_concurrency, plan.part_size, plan.lease_id.as_str()), (8, 16 << 20, "a"));
        assert_eq!(budget.grant("web", "r", LeaseKind::Restore).max_concurrency, 8);
    }

    #[test]
    fn hundreds_of_open_saves_of_one_project_leave_anothers_share_whole_and_the_budget_unexceeded() {
        let budget = budget(8, 256);
        for i in 0..300 {
            save(&budget, "hoarder", &format!("h{i}"));
        }
        assert_eq!(budget.granted(), 256, "the saves beyond the budget wait");
        // Another project's save gets a full worker's cap, its restore too; the hoarder's
        // saves shrink to make room.
        assert_eq!(save(&budget, "web", "w0"), 8);
        assert_eq!(budget.grant("web", "wr", LeaseKind::Restore).max_concurrency, 8);
        assert!(budget.granted() <= 256, "{}", budget.granted());
        // Many saves of the other project: it holds half the budget, the hoarder the rest.
        for i in 1..40 {
            save(&budget, "web", &format!("w{i}"));
        }
        let web: u32 = (0..40).map(|i| now(&budget, "web", &format!("w{i}"))).sum::<u32>() + 8;
        let hoarder: u32 = (0..300).map(|i| now(&budget, "hoarder", &format!("h{i}"))).sum();
        assert_eq!((web, hoarder, budget.granted()), (128, 128, 256));
        // The oldest of the hoarder's saves hold one request each, the newest wait.
        assert_eq!((now(&budget, "hoarder", "h0"), now(&budget, "hoarder", "h299")), (1, 0));
        // Once the other project is done, the hoarder's saves get the budget back.
        for i in 0..40 {
            budget.release("web", &format!("w{i}"));
        }
        budget.release("web", "wr");
        assert_eq!(budget.granted(), 256);
        assert_eq!(now(&budget, "hoarder", "h255"), 1);
    }

    #[test]
    fn restores_hold_at_most_half_the_budget_and_a_bounded_number_of_leases() {
        let budget = budget(8, 64);
        let restores: Vec<u32> =
            (0..40).map(|i| budget.grant("flood", &format!("r{i}"), LeaseKind::Restore).max_concurrency).collect();
        assert_eq!(&restores[..4], &[8, 8, 8, 8], "{restores:?}");
        assert!(restores.iter().all(|&c| c >= 1), "a restore always gets a request");
        let held: u32 =
            (24..40).map(|i| budget.renew("flood", &format!("r{i}")).map_or(0, |p| p.max_concurrency)).sum();
        assert_eq!(budget.granted(), held, "only the newest {MOST_RESTORES_PER_PROJECT} restores hold leases");
        assert!(budget.renew("flood", "r0").is_none(), "the oldest lapsed");
        assert!(budget.granted() <= 32 + MOST_RESTORES_PER_PROJECT as u32, "{}", budget.granted());
        // A project arriving after the flood finds its share.
        assert_eq!(save(&budget, "web", "w"), 8);
        assert!(budget.granted() <= 64, "{}", budget.granted());
    }

    #[test]
    fn only_the_holder_releases_or_renews_a_lease() {
        let budget = budget(8, 8);
        save(&budget, "web", "a");
        budget.release("api", "a");
        assert!(budget.renew("api", "a").is_none());
        assert_eq!(budget.granted(), 8);
        budget.release("web", "a");
        assert_eq!(budget.granted(), 0);
    }

    #[test]
    fn fair_shares_are_max_min_fair_and_spend_the_whole_budget() {
        let demands: BTreeMap<&str, u32> = [("a", 2), ("b", 100), ("c", 100)].into_iter().collect();
        let shares = fair_shares(16, &demands);
        assert_eq!((shares["a"], shares["b"], shares["c"]), (2, 7, 7));
        let demands: BTreeMap<&str, u32> = [("a", 100), ("b", 100), ("c", 100)].into_iter().collect();
        assert_eq!(fair_shares(16, &demands).values().sum::<u32>(), 16);
    }

    #[test]
    fn a_restores_blobs_are_kept_until_its_lease_goes() {
        let budget = budget(8, 64);
        let reads = |digests: &[&str]| digests.iter().map(|d| d.to_string()).collect::<BTreeSet<String>>();
        budget.grant_restore("web", "r1", reads(&["sha256:a", "sha256:b"]));
        budget.grant_restore("web", "r2", reads(&["sha256:b", "sha256:c"]));
        budget.grant_restore("api", "r3", reads(&["sha256:d"]));
        let read = budget.read_by_restores("web");
        assert_eq!(read, ["sha256:a", "sha256:b", "sha256:c"].iter().map(|d| d.to_string()).collect());
        budget.release("web", "r1");
        assert!(!budget.read_by_restores("web").contains("sha256:a"));
        assert!(budget.read_by_restores("web").contains("sha256:b"));
        assert_eq!(budget.read_by_restores("api").len(), 1, "another project's restores are its own");
    }
}
