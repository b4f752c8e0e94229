//! Ephemeral records held in this process's memory: what one coordinator alone needs (a
//! restart forgets them, and its workers save again). The sled state keeps them here; so do
//! unit tests of the rules that use them.

use std::sync::Mutex;

use super::{Ephemeral, Leases, OpenSaves};
use crate::error::Error;

#[derive(Default)]
pub struct InMemory {
    open_saves: Mutex<OpenSaves>,
    leases: Mutex<Leases>,
}

#[async_trait::async_trait]
impl Ephemeral for InMemory {
    async fn update_open_saves(
        &self,
        _project: Option<&str>,
        change: &mut (dyn for<'a> FnMut(&'a mut OpenSaves) + Send),
    ) -> Result<(), Error> {
        change(&mut self.open_saves.lock().expect("open saves lock"));
        Ok(())
    }

    async fn read_open_saves(
        &self,
        _project: &str,
        read: &mut (dyn for<'a> FnMut(&'a OpenSaves) + Send),
    ) -> Result<(), Error> {
        read(&self.open_saves.lock().expect("open saves lock"));
        Ok(())
    }

    async fn update_leases(&self, change: &mut (dyn for<'a> FnMut(&'a mut Leases) + Send)) -> Result<(), Error> {
        change(&mut self.leases.lock().expect("leases lock"));
        Ok(())
    }

    async fn read_leases(&self, read: &mut (dyn for<'a> FnMut(&'a Leases) + Send)) -> Result<(), Error> {
        read(&self.leases.lock().expect("leases lock"));
        Ok(())
    }
}
