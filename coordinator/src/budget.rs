//! The transfer planner: the part size and how many requests each worker may have in flight,
//! under a global budget shared fairly between projects, so a hundred build hosts saving at
//! once do not stampede one bucket.
//!
//! Each plan holds a lease on its share until the save commits, the restore reports, or the
//! lease lapses (a worker that died). A worker's share is decided when its transfer starts:
//! the budget split evenly between the projects transferring, each project's part split
//! between its workers, capped per worker and by what the budget has left, and never below one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proto::v1 as pb;

/// How long a lease holds without its save committing or its restore reporting.
const LEASE_LIFETIME: Duration = Duration::from_secs(10 * 60);

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

struct Lease {
    project: String,
    concurrency: u32,
    granted: Instant,
}

pub struct TransferBudget {
    settings: PlanSettings,
    leases: Mutex<HashMap<String, Lease>>,
}

impl TransferBudget {
    pub fn new(settings: PlanSettings) -> TransferBudget {
        TransferBudget { settings, leases: Mutex::new(HashMap::new()) }
    }

    /// A plan for one transfer of `project`, holding a share of the budget under `lease_id`.
    pub fn grant(&self, project: &str, lease_id: &str) -> pb::TransferPlan {
        let mut leases = self.leases.lock().expect("budget lock");
        leases.retain(|_, lease| lease.granted.elapsed() < LEASE_LIFETIME);
        leases.remove(lease_id);
        let mut projects: Vec<&str> = leases.values().map(|lease| lease.project.as_str()).collect();
        projects.push(project);
        projects.sort_unstable();
        projects.dedup();
        let workers_of_project = 1 + leases.values().filter(|lease| lease.project == project).count() as u32;
        let budget = self.settings.transfer_budget;
        let fair_share = budget / projects.len() as u32 / workers_of_project;
        let outstanding: u32 = leases.values().map(|lease| lease.concurrency).sum();
        let left = budget.saturating_sub(outstanding);
        let concurrency = fair_share.min(left).min(self.settings.worker_concurrency).max(1);
        leases.insert(lease_id.to_owned(), Lease { project: project.to_owned(), concurrency, granted: Instant::now() });
        pb::TransferPlan {
            part_size: self.settings.part_size,
            multipart_threshold: self.settings.multipart_threshold,
            max_concurrency: concurrency,
            lease_id: lease_id.to_owned(),
        }
    }

    /// Gives a lease's share back. Only the project that holds it can release it.
    pub fn release(&self, project: &str, lease_id: &str) {
        let mut leases = self.leases.lock().expect("budget lock");
        if leases.get(lease_id).is_some_and(|lease| lease.project == project) {
            leases.remove(lease_id);
        }
    }

    /// The global budget of requests in flight.
    pub fn total(&self) -> u32 {
        self.settings.transfer_budget
    }

    /// Requests in flight the live leases allow, for the metrics.
    pub fn granted(&self) -> u32 {
        let leases = self.leases.lock().expect("budget lock");
        leases.values().filter(|lease| lease.granted.elapsed() < LEASE_LIFETIME).map(|lease| lease.concurrency).sum()
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

    #[test]
    fn a_lone_worker_gets_the_per_worker_cap() {
        let budget = budget(8, 256);
        let plan = budget.grant("web", "a");
        assert_eq!((plan.max_concurrency, plan.part_size, plan.lease_id.as_str()), (8, 16 << 20, "a"));
    }

    #[test]
    fn projects_share_the_budget_fairly_and_never_exceed_it_beyond_one_each() {
        let budget = budget(8, 16);
        // Many workers of one project: the first ones take what is left, later ones one each.
        let shop: Vec<u32> = (0..20).map(|i| budget.grant("shop", &format!("shop{i}")).max_concurrency).collect();
        assert_eq!(shop[0], 8);
        assert!(shop.iter().all(|&c| c >= 1));
        assert!(shop.iter().skip(2).all(|&c| c == 1), "{shop:?}");
        // Another project arriving now still gets at least one, not a share of nothing.
        assert!(budget.grant("web", "web0").max_concurrency >= 1);
        // Once shop's workers finish, web's next worker gets the fair half of the budget.
        for i in 0..20 {
            budget.release("shop", &format!("shop{i}"));
        }
        budget.grant("shop", "shop-late");
        assert_eq!(budget.grant("web", "web1").max_concurrency, 16 / 2 / 2);
    }

    #[test]
    fn only_the_holder_releases_a_lease() {
        let budget = budget(8, 8);
        budget.grant("web", "a");
        budget.release("api", "a");
        assert_eq!(budget.granted(), 8);
        budget.release("web", "a");
        assert_eq!(budget.granted(), 0);
    }
}
