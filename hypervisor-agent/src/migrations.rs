//! The agent's migration records. The migrations themselves run inside VMM processes (both
//! ends); the agent learns of them from the VMMs while they run and from the record each VMM
//! writes to `DATA_DIR/migrations/<id>.json` when one ends, so a record outlives its VMM and
//! survives an agent restart. The metrics of a migration are counted here, once, from what
//! the records say.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use godwit_api::{MigrationInfo, MigrationStatus};

use crate::metrics::{InProgress, Metrics, Outcome, Role};

/// Most records kept, in memory and in `DATA_DIR/migrations` (the oldest finished ones are
/// forgotten first).
const MAX_RECORDS: usize = 1000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone)]
struct Known {
    info: MigrationInfo,
    /// The VM (and so the VMM slot) it belongs to.
    vm: String,
    /// Counted as started / as ended in the metrics.
    metered: bool,
    ended_metered: bool,
}

/// Every migration this agent's VMMs ran or run.
#[derive(Debug)]
pub struct MigrationBook {
    dir: PathBuf,
    host: String,
    known: Mutex<HashMap<String, Known>>,
}

impl MigrationBook {
    /// Loads the records kept in `data_dir/migrations` (ended migrations are not counted
    /// again in the metrics).
    pub fn load(data_dir: &std::path::Path, host: &str) -> Self {
        let dir = data_dir.join("migrations");
        let mut known = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_none_or(|x| x != "json") {
                    continue;
                }
                if let Some(info) = std::fs::read(&path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<MigrationInfo>(&b).ok())
                {
                    let ended = info.status != MigrationStatus::Running;
                    known.insert(
                        info.id.clone(),
                        Known {
                            vm: info.vm.clone(),
                            info,
                            metered: ended,
                            ended_metered: ended,
                        },
                    );
                }
            }
        }
        let book = MigrationBook {
            dir,
            host: host.to_owned(),
            known: Mutex::new(known),
        };
        book.trim();
        book
    }

    fn role(&self, info: &MigrationInfo) -> Role {
        if info.source == self.host {
            Role::Source
        } else {
            Role::Target
        }
    }

    /// A migration just started for `vm` (so its id routes to the VM's process at once).
    pub fn started(&self, id: &str, vm: &str) {
        lock(&self.known).entry(id.to_owned()).or_insert(Known {
            info: placeholder(id, vm),
            vm: vm.to_owned(),
            metered: false,
            ended_metered: false,
        });
    }

    /// What a VMM (or its record on disk) says of a migration: stored, and metered.
    pub fn observe(&self, info: MigrationInfo, metrics: &Metrics) {
        let role = self.role(&info);
        let mut known = lock(&self.known);
        let k = known.entry(info.id.clone()).or_insert_with(|| Known {
            info: info.clone(),
            vm: info.vm.clone(),
            metered: false,
            ended_metered: false,
        });
        if k.ended_metered {
            k.info = info;
            return;
        }
        if !k.metered {
            metrics.migration_started(&info.id, &info.vm, role, info.mode);
            k.metered = true;
        }
        if info.status == MigrationStatus::Running {
            metrics.migration_progress(&info.id, &info);
        } else {
            metrics.migration_ended(&info.id, &info, Outcome::of(&info));
            if role == Role::Source {
                metrics.resource_actions(&info.resources);
            }
            k.ended_metered = true;
        }
        k.info = info;
        drop(known);
        self.trim();
    }

    /// The records of VM `vm` still running by our last look.
    pub fn running_of(&self, vm: &str) -> Vec<String> {
        lock(&self.known)
            .iter()
            .filter(|(_, k)| k.vm == vm && k.info.status == MigrationStatus::Running)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The record a VMM wrote when migration `id` ended, if there is one.
    pub fn read_record(&self, id: &str) -> Option<MigrationInfo> {
        let bytes = std::fs::read(self.dir.join(format!("{id}.json"))).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Ends a migration whose VMM died before it wrote a record: failed, with why, and kept on
    /// disk like any other record.
    pub fn fail_orphan(&self, id: &str, why: &str, metrics: &Metrics) {
        let Some(mut info) = lock(&self.known).get(id).map(|k| k.info.clone()) else {
            return;
        };
        if info.status != MigrationStatus::Running {
            return;
        }
        info.status = MigrationStatus::Failed;
        info.error = Some(why.to_owned());
        info.outcome = Some("vm".to_owned());
        info.orphaned = true;
        let _ = std::fs::create_dir_all(&self.dir);
        if let Ok(bytes) = serde_json::to_vec_pretty(&info) {
            let _ = std::fs::write(self.dir.join(format!("{id}.json")), bytes);
        }
        self.observe(info, metrics);
    }

    /// The VM a migration belongs to, and its last known record.
    pub fn get(&self, id: &str) -> Option<(String, MigrationInfo)> {
        lock(&self.known)
            .get(id)
            .map(|k| (k.vm.clone(), k.info.clone()))
    }

    /// Every record, oldest first.
    pub fn all(&self) -> Vec<MigrationInfo> {
        let mut v: Vec<MigrationInfo> =
            lock(&self.known).values().map(|k| k.info.clone()).collect();
        v.sort_by(|a, b| (a.started_unix_ms, &a.id).cmp(&(b.started_unix_ms, &b.id)));
        v
    }

    /// Running migrations (either side), and the count by role and phase for the gauges.
    pub fn in_progress(&self) -> (u32, InProgress) {
        let mut counts = InProgress::default();
        let mut n = 0;
        for k in lock(&self.known).values() {
            if k.info.status == MigrationStatus::Running && k.metered {
                counts.count(self.role(&k.info), k.info.phase);
                n += 1;
            }
        }
        (n, counts)
    }

    fn trim(&self) {
        let mut known = lock(&self.known);
        while known.len() > MAX_RECORDS {
            let oldest = known
                .iter()
                .filter(|(_, k)| k.info.status != MigrationStatus::Running)
                .min_by_key(|(_, k)| k.info.started_unix_ms)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => {
                    known.remove(&id);
                    // The record files are bounded like the records.
                    let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
                }
                None => break,
            }
        }
    }
}

/// A record for a migration the agent knows of only by id (until its VMM reports it).
fn placeholder(id: &str, vm: &str) -> MigrationInfo {
    MigrationInfo {
        id: id.to_owned(),
        vm: vm.to_owned(),
        source: String::new(),
        target: String::new(),
        mode: Default::default(),
        status: MigrationStatus::Running,
        phase: godwit_api::MigrationPhase::Setup,
        error: None,
        switched_to_postcopy: false,
        postcopy_pauses: 0,
        orphaned: false,
        started_unix_ms: 0,
        setup_ms: 0.0,
        total_ms: 0.0,
        downtime_ms: None,
        downtime: Default::default(),
        memory_bytes: 0,
        rounds: 0,
        pages: Default::default(),
        precopy_bytes: 0,
        downtime_bytes: 0,
        postcopy_bytes: 0,
        dirty_rate_bytes_s: 0.0,
        throughput_bytes_s: 0.0,
        remaining_bytes: 0,
        faults: Default::default(),
        source_digest: None,
        target_digest: None,
        resources: Vec::new(),
        encrypted: false,
        outcome: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_on_disk_are_found_and_not_counted_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut info = placeholder(&"a".repeat(32), "web");
        info.source = "h1".into();
        info.status = MigrationStatus::Completed;
        info.outcome = Some("completed".into());
        std::fs::create_dir_all(dir.path().join("migrations")).unwrap();
        std::fs::write(
            dir.path()
                .join("migrations")
                .join(format!("{}.json", info.id)),
            serde_json::to_vec(&info).unwrap(),
        )
        .unwrap();
        let book = MigrationBook::load(dir.path(), "h1");
        assert_eq!(book.all().len(), 1);
        let metrics = Metrics::new("h1");
        let series = "godwit_migrations_total{mode=\"precopy\",outcome=\"completed\",role=\"source\",host=\"h1\"}";
        book.observe(info.clone(), &metrics);
        let text = metrics.render();
        assert!(text.contains(&format!("{series} 0")), "{text}");
        // A migration the book had not seen ends: counted once.
        info.id = "c".repeat(32);
        book.observe(info.clone(), &metrics);
        book.observe(info, &metrics);
        assert!(metrics.render().contains(&format!("{series} 1")));
    }

    #[test]
    fn an_orphaned_migration_fails_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let book = MigrationBook::load(dir.path(), "h1");
        let metrics = Metrics::new("h1");
        let id = "b".repeat(32);
        book.started(&id, "web");
        let mut info = placeholder(&id, "web");
        info.source = "h1".into();
        book.observe(info, &metrics);
        assert_eq!(book.running_of("web"), vec![id.clone()]);
        book.fail_orphan(&id, "the VMM died", &metrics);
        let (_, info) = book.get(&id).unwrap();
        assert_eq!(info.status, MigrationStatus::Failed);
        assert_eq!(
            book.read_record(&id).unwrap().error.as_deref(),
            Some("the VMM died")
        );
        assert!(book.running_of("web").is_empty());
    }
}
