//! The orchestrator's durable record: VMs it placed, migrations it drove, decisions it took,
//! and a few settings, in an embedded redb database that survives restarts. Values are JSON
//! so a record written by one version reads in the next.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

const VMS: TableDefinition<&str, &str> = TableDefinition::new("vms");
const MIGRATIONS: TableDefinition<&str, &str> = TableDefinition::new("migrations");
const DECISIONS: TableDefinition<u64, &str> = TableDefinition::new("decisions");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// Decisions kept; older ones are dropped as new ones arrive.
pub const MAX_DECISIONS: u64 = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Cannot open the orchestrator database {path}")]
    Open {
        path: String,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("The orchestrator database failed")]
    Db(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("A stored record does not parse")]
    Json(#[source] serde_json::Error),
}

fn db<E: std::error::Error + Send + Sync + 'static>(e: E) -> StoreError {
    StoreError::Db(Box::new(e))
}

/// Runs a write (a commit syncs to disk) so that it does not stall a tokio worker: the store
/// is written from API handlers and the control loops, so inside the multi-threaded runtime
/// the worker hands its other tasks off first; elsewhere (start-up, tests) it just runs.
fn off_worker<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let database = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        // Create the tables so reads never meet a missing one.
        let tx = database.begin_write().map_err(db_err)?;
        tx.open_table(VMS).map_err(db)?;
        tx.open_table(MIGRATIONS).map_err(db)?;
        tx.open_table(DECISIONS).map_err(db)?;
        tx.open_table(META).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(Store { db: database })
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &str>,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(value).map_err(StoreError::Json)?;
        off_worker(|| {
            let tx = self.db.begin_write().map_err(db_err)?;
            tx.open_table(table)
                .map_err(db)?
                .insert(key, json.as_str())
                .map_err(db)?;
            tx.commit().map_err(db)
        })
    }

    fn remove(&self, table: TableDefinition<&str, &str>, key: &str) -> Result<(), StoreError> {
        off_worker(|| {
            let tx = self.db.begin_write().map_err(db_err)?;
            tx.open_table(table).map_err(db)?.remove(key).map_err(db)?;
            tx.commit().map_err(db)
        })
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &str>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(table).map_err(db)?;
        match t.get(key).map_err(db)? {
            Some(v) => Ok(Some(
                serde_json::from_str(v.value()).map_err(StoreError::Json)?,
            )),
            None => Ok(None),
        }
    }

    fn all<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &str>,
    ) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(table).map_err(db)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db)? {
            let (_, v) = item.map_err(db)?;
            out.push(serde_json::from_str(v.value()).map_err(StoreError::Json)?);
        }
        Ok(out)
    }

    pub fn put_vm<T: Serialize>(&self, name: &str, vm: &T) -> Result<(), StoreError> {
        self.put(VMS, name, vm)
    }

    pub fn remove_vm(&self, name: &str) -> Result<(), StoreError> {
        self.remove(VMS, name)
    }

    pub fn vm<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        self.get(VMS, name)
    }

    pub fn vms<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        self.all(VMS)
    }

    pub fn put_migration<T: Serialize>(&self, id: &str, m: &T) -> Result<(), StoreError> {
        self.put(MIGRATIONS, id, m)
    }

    pub fn migrations<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        self.all(MIGRATIONS)
    }

    pub fn set_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.put(META, key, value)
    }

    pub fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.get(META, key)
    }

    /// Appends decisions, dropping the oldest beyond `MAX_DECISIONS`.
    pub fn append_decisions<T: Serialize>(&self, items: &[T]) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        off_worker(|| self.append_decisions_now(items))
    }

    fn append_decisions_now<T: Serialize>(&self, items: &[T]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(DECISIONS).map_err(db)?;
            let mut next = t
                .last()
                .map_err(db)?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(0);
            for item in items {
                let json = serde_json::to_string(item).map_err(StoreError::Json)?;
                t.insert(next, json.as_str()).map_err(db)?;
                next += 1;
            }
            let first = t.first().map_err(db)?.map(|(k, _)| k.value()).unwrap_or(0);
            if next - first > MAX_DECISIONS {
                let cut = next - MAX_DECISIONS;
                t.retain_in(first..cut, |_, _| false).map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    /// The newest `limit` decisions, oldest first.
    pub fn decisions<T: DeserializeOwned>(&self, limit: usize) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(DECISIONS).map_err(db)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db)?.rev().take(limit) {
            let (_, v) = item.map_err(db)?;
            out.push(serde_json::from_str(v.value()).map_err(StoreError::Json)?);
        }
        out.reverse();
        Ok(out)
    }
}

fn db_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> StoreError {
    db(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_prunes_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.redb");
        {
            let s = Store::open(&path).unwrap();
            s.put_vm("a", &serde_json::json!({"host": "h1"})).unwrap();
            s.put_vm("b", &serde_json::json!({"host": "h2"})).unwrap();
            s.remove_vm("b").unwrap();
            s.put_migration("m1", &serde_json::json!({"status": "running"}))
                .unwrap();
            s.append_decisions(&[1, 2, 3]).unwrap();
            s.set_meta("mode", &"automatic").unwrap();
        }
        let s = Store::open(&path).unwrap();
        let vms: Vec<serde_json::Value> = s.vms().unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!(vms[0]["host"], "h1");
        let vm: Option<serde_json::Value> = s.vm("a").unwrap();
        assert!(vm.is_some());
        let ms: Vec<serde_json::Value> = s.migrations().unwrap();
        assert_eq!(ms.len(), 1);
        assert_eq!(s.decisions::<u32>(2).unwrap(), vec![2, 3]);
        assert_eq!(
            s.meta::<String>("mode").unwrap().as_deref(),
            Some("automatic")
        );
        let many: Vec<u64> = (0..MAX_DECISIONS + 10).collect();
        s.append_decisions(&many).unwrap();
        let all: Vec<u64> = s.decisions(usize::MAX).unwrap();
        assert_eq!(all.len() as u64, MAX_DECISIONS);
        assert_eq!(*all.last().unwrap(), MAX_DECISIONS + 9);
    }
}
