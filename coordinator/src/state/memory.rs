//! Ephemeral records held in this process's memory: what one coordinator alone needs (a
//! restart forgets them, and its workers save again). The sled state keeps them here; so do
//! unit tests of the rules that use them.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Ephemeral, LeaseDemand, LeaseDemands, Leases, OpenSaves};
use crate::error::Error;

#[derive(Default)]
pub struct InMemory {
    open_saves: Mutex<OpenSaves>,
    leases: Mutex<LeaseRecords>,
}

/// Leases by project, and each project's demand as its last change left it.
#[derive(Default)]
struct LeaseRecords {
    by_project: HashMap<String, Leases>,
    demands: LeaseDemands,
}

#[async_trait::async_trait]
impl Ephemeral for InMemory {
    async fn update_open_saves(
        &self,
        _project: &str,
        change: &mut (dyn for<'a> FnMut(&'a mut OpenSaves) + Send),
    ) -> Result<(), Error> {
        change(&mut self.open_saves.lock().expect("open saves lock"));
        Ok(())
    }

    async fn read_open_saves(
        &self,
        _project: Option<&str>,
        read: &mut (dyn for<'a> FnMut(&'a OpenSaves) + Send),
    ) -> Result<(), Error> {
        read(&self.open_saves.lock().expect("open saves lock"));
        Ok(())
    }

    async fn update_leases(
        &self,
        project: &str,
        change: &mut (dyn for<'a> FnMut(&'a mut Leases, &'a LeaseDemands) -> LeaseDemand + Send),
    ) -> Result<(), Error> {
        let mut records = self.leases.lock().expect("leases lock");
        let LeaseRecords { by_project, demands } = &mut *records;
        let mut leases = by_project.remove(project).unwrap_or_default();
        let demand = change(&mut leases, demands);
        if leases.is_empty() {
            demands.remove(project);
        } else {
            by_project.insert(project.to_owned(), leases);
            demands.insert(project.to_owned(), demand);
        }
        Ok(())
    }

    async fn read_leases(
        &self,
        project: Option<&str>,
        read: &mut (dyn for<'a> FnMut(&'a Leases) + Send),
    ) -> Result<(), Error> {
        let records = self.leases.lock().expect("leases lock");
        match project {
            Some(project) => read(records.by_project.get(project).unwrap_or(&Leases::new())),
            None => {
                read(&records.by_project.values().flatten().map(|(id, lease)| (id.clone(), lease.clone())).collect())
            }
        }
        Ok(())
    }
}
