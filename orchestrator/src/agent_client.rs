//! A small blocking client for the agent's HTTP/JSON API (docs/agent-api.md).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use godwit_api::{
    CreateVm, DigestInfo, ErrorBody, HostInfo, MigrationInfo, MigrationStarted, RestoreInfo,
    RestoreRequest, SnapshotInfo, SnapshotRequest, VmInfo,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct AgentClient {
    base: String,
    http: reqwest::blocking::Client,
}

impl AgentClient {
    pub fn new(base: &str) -> Result<Self> {
        Ok(AgentClient {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()?,
        })
    }

    fn send<T: DeserializeOwned>(&self, req: reqwest::blocking::RequestBuilder) -> Result<T> {
        let resp = req
            .send()
            .with_context(|| format!("Cannot reach the agent at {}", self.base))?;
        let status = resp.status();
        let text = resp.text()?;
        if !status.is_success() {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            bail!("{message} (HTTP {})", status.as_u16());
        }
        if text.is_empty() {
            return Ok(serde_json::from_str("null")?);
        }
        serde_json::from_str(&text)
            .with_context(|| format!("Unexpected answer from the agent: {text}"))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
    }

    fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
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
        let _: serde_json::Value =
            self.send(self.http.delete(format!("{}/v1/vms/{name}", self.base)))?;
        Ok(())
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
        let resp = self
            .http
            .get(format!("{}/v1/vms/{name}/console", self.base))
            .send()?
            .error_for_status()?;
        Ok(resp.text()?)
    }
}
