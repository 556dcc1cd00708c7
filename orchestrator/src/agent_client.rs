//! A small blocking client for the agent's HTTP/JSON API (docs/agent-api.md).

use std::time::Duration;

use anyhow::Result;
use godwit_api::{
    CreateVm, DigestInfo, HostInfo, MigrationInfo, MigrationStarted, RestoreInfo, RestoreRequest,
    SnapshotInfo, SnapshotRequest, VmInfo,
};
use godwit_daemon::client::ClientAuth;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::http::JsonClient;

#[derive(Debug, Clone)]
pub struct AgentClient {
    http: JsonClient,
}

impl AgentClient {
    pub fn new(base: &str, auth: &ClientAuth) -> Result<Self> {
        Ok(AgentClient {
            http: JsonClient::new(base, "the agent", Duration::from_secs(300), auth)?,
        })
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.http.get(path)
    }

    fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.http.post(path, body)
    }

    pub fn host(&self) -> Result<HostInfo> {
        self.get("/v1/host")
    }

    pub fn create_vm(&self, req: &CreateVm) -> Result<VmInfo> {
        self.post("/v1/vms", req)
    }

    pub fn vm(&self, name: &str) -> Result<VmInfo> {
        self.get(&format!("/v1/vms/{name}"))
    }

    pub fn vms(&self) -> Result<Vec<VmInfo>> {
        self.get("/v1/vms")
    }

    pub fn delete_vm(&self, name: &str) -> Result<()> {
        self.http.delete(&format!("/v1/vms/{name}"))
    }

    pub fn pause(&self, name: &str) -> Result<VmInfo> {
        self.post(&format!("/v1/vms/{name}/pause"), &serde_json::json!({}))
    }

    pub fn resume(&self, name: &str) -> Result<VmInfo> {
        self.post(&format!("/v1/vms/{name}/resume"), &serde_json::json!({}))
    }

    pub fn digest(&self, name: &str) -> Result<DigestInfo> {
        self.get(&format!("/v1/vms/{name}/digest"))
    }

    pub fn snapshot(&self, name: &str, req: &SnapshotRequest) -> Result<SnapshotInfo> {
        self.post(&format!("/v1/vms/{name}/snapshot"), req)
    }

    pub fn restore(&self, req: &RestoreRequest) -> Result<RestoreInfo> {
        self.post("/v1/vms/restore", req)
    }

    /// Starts migrating `name`; `body` is a `MigrateRequest` as JSON. Returns the id.
    pub fn migrate(&self, name: &str, body: &serde_json::Value) -> Result<String> {
        let started: MigrationStarted = self.post(&format!("/v1/vms/{name}/migrate"), body)?;
        Ok(started.id)
    }

    pub fn migration(&self, id: &str) -> Result<MigrationInfo> {
        self.get(&format!("/v1/migrations/{id}"))
    }

    pub fn console(&self, name: &str) -> Result<String> {
        self.http.text(&format!("/v1/vms/{name}/console"))
    }
}
