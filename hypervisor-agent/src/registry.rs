//! The agent's VMs by name, and the host memory and resource space they take. A slot is one
//! VM's process (running it, receiving it, or keeping things for it after it moved away);
//! reservations hold a name and its memory while a VM is being started, so two requests can
//! never take the same name or the same memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use godwit_api::{VmInfo, VmState, VmmStatus};

use crate::backend::{Exit, VmHandle};
use crate::error::Error;

const MIB: u64 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One VM's process and what the agent last learnt of it.
#[derive(Debug)]
pub struct Slot {
    pub name: String,
    pub handle: Arc<dyn VmHandle>,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    status: Option<VmmStatus>,
    info: Option<VmInfo>,
    /// Memory the slot takes until its status says otherwise (the request's).
    memory_bytes: u64,
}

impl Slot {
    pub fn new(name: &str, handle: Arc<dyn VmHandle>, memory_bytes: u64) -> Self {
        Slot {
            name: name.to_owned(),
            handle,
            seen: Mutex::new(Seen {
                memory_bytes,
                ..Seen::default()
            }),
        }
    }

    pub fn set_status(&self, status: VmmStatus) {
        let mut seen = lock(&self.seen);
        seen.memory_bytes = status.memory_bytes;
        seen.status = Some(status);
    }

    pub fn status(&self) -> Option<VmmStatus> {
        lock(&self.seen).status.clone()
    }

    pub fn set_info(&self, info: VmInfo) {
        lock(&self.seen).info = Some(info);
    }

    pub fn last_info(&self) -> Option<VmInfo> {
        lock(&self.seen).info.clone()
    }

    /// Host memory the slot's process holds.
    pub fn memory_bytes(&self) -> u64 {
        if self.handle.exited().is_some() {
            return 0;
        }
        lock(&self.seen).memory_bytes
    }

    /// Resource space it uses.
    pub fn disk_used_bytes(&self) -> u64 {
        lock(&self.seen)
            .status
            .as_ref()
            .map_or(0, |s| s.disk_used_bytes)
    }

    /// The slot holds a VM that is (or was, if it crashed) running here.
    pub fn has_vm(&self) -> bool {
        let seen = lock(&self.seen);
        match &seen.status {
            Some(s) => s.vm.is_some(),
            None => seen.info.is_some(),
        }
    }

    /// The VM as it is now, if its process died: crashed, with how.
    pub fn crashed_info(&self) -> Option<VmInfo> {
        let Some(Exit::Crashed(how)) = self.handle.exited() else {
            return None;
        };
        let mut info = self.last_info()?;
        info.state = VmState::Crashed;
        info.crash_reason = Some(how);
        info.cpu_usage_cores = 0.0;
        info.migrating = false;
        Some(info)
    }
}

#[derive(Debug, Default)]
struct Inner {
    slots: HashMap<String, Arc<Slot>>,
    /// Names being started, with their memory and resource space.
    reserved: HashMap<String, (u64, u64)>,
}

/// The VMs of this host.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    /// Host memory VMs may use, bytes (total minus what is kept back).
    memory_limit: u64,
    /// Space for VM resource data, bytes.
    disk_capacity: u64,
}

/// A name and its memory held while a VM starts; released on drop.
#[derive(Debug)]
pub struct Reservation<'a> {
    registry: &'a Registry,
    name: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(&self.registry.inner).reserved.remove(&self.name);
    }
}

impl Registry {
    pub fn new(memory_limit: u64, disk_capacity: u64) -> Self {
        Registry {
            inner: Mutex::new(Inner::default()),
            memory_limit,
            disk_capacity,
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Slot>> {
        lock(&self.inner).slots.get(name).cloned()
    }

    pub fn slots(&self) -> Vec<Arc<Slot>> {
        let mut v: Vec<_> = lock(&self.inner).slots.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn insert(&self, slot: Slot) -> Arc<Slot> {
        let slot = Arc::new(slot);
        lock(&self.inner)
            .slots
            .insert(slot.name.clone(), slot.clone());
        slot
    }

    /// Forgets a slot (its process ended), unless it was replaced meanwhile.
    pub fn remove(&self, slot: &Arc<Slot>) {
        let mut inner = lock(&self.inner);
        if inner
            .slots
            .get(&slot.name)
            .is_some_and(|s| Arc::ptr_eq(s, slot))
        {
            inner.slots.remove(&slot.name);
        }
    }

    fn memory_in_use(inner: &Inner) -> u64 {
        inner.slots.values().map(|s| s.memory_bytes()).sum::<u64>()
            + inner.reserved.values().map(|r| r.0).sum::<u64>()
    }

    fn disk_in_use(inner: &Inner) -> u64 {
        inner
            .slots
            .values()
            .map(|s| s.disk_used_bytes())
            .sum::<u64>()
            + inner.reserved.values().map(|r| r.1).sum::<u64>()
    }

    /// Guest memory of this host's VMs (and those starting), bytes.
    pub fn memory_used(&self) -> u64 {
        Self::memory_in_use(&lock(&self.inner))
    }

    /// Resource space left, bytes.
    pub fn disk_free(&self) -> u64 {
        self.disk_capacity
            .saturating_sub(Self::disk_in_use(&lock(&self.inner)))
    }

    /// Holds `name` with `memory_bytes` and `disk_bytes` while a VM starts. With `reuse`, the
    /// name may belong to a slot that keeps things for a VM that moved away (it comes back).
    pub fn reserve(
        &self,
        name: &str,
        memory_bytes: u64,
        disk_bytes: u64,
        reuse: bool,
    ) -> Result<Reservation<'_>, Error> {
        let mut inner = lock(&self.inner);
        let taken = inner.reserved.contains_key(name)
            || inner.slots.get(name).is_some_and(|s| !reuse || s.has_vm());
        if taken {
            return Err(Error::NameTaken { name: name.into() });
        }
        let in_use = Self::memory_in_use(&inner);
        if in_use + memory_bytes > self.memory_limit {
            return Err(Error::OutOfMemory {
                want_mib: memory_bytes / MIB,
                used_mib: in_use / MIB,
                limit_mib: self.memory_limit / MIB,
            });
        }
        let disk_free = self.disk_capacity.saturating_sub(Self::disk_in_use(&inner));
        if disk_bytes > disk_free {
            return Err(Error::OutOfDisk {
                need_mib: disk_bytes.div_ceil(MIB),
                free_mib: disk_free / MIB,
            });
        }
        inner
            .reserved
            .insert(name.to_owned(), (memory_bytes, disk_bytes));
        Ok(Reservation {
            registry: self,
            name: name.to_owned(),
        })
    }

    /// A name some request is starting a VM under.
    pub fn is_reserved(&self, name: &str) -> bool {
        lock(&self.inner).reserved.contains_key(name)
    }
}
