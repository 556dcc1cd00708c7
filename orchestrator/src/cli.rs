//! A small blocking client for the orchestrator's REST API, for the `godwit` CLI.

use std::time::Duration;

use anyhow::Result;
use godwit_api::{
    BalancerState, ClusterCreateVm, ClusterHost, ClusterMigrate, ClusterMigration, ClusterVm,
    ClusterVmCreated, Decision, PlanView,
};
use godwit_daemon::client::ClientAuth;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::http::JsonClient;

#[derive(Debug, Clone)]
pub struct Client {
    http: JsonClient,
}

impl Client {
    pub fn new(base: &str, auth: &ClientAuth) -> Result<Self> {
        Ok(Client {
            http: JsonClient::new(base, "the orchestrator", Duration::from_secs(120), auth)?,
        })
    }

    pub fn base(&self) -> &str {
        self.http.base()
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.http.get(path)
    }

    fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.http.post(path, body)
    }

    pub fn hosts(&self) -> Result<Vec<ClusterHost>> {
        self.get("/v1/hosts")
    }

    pub fn vms(&self) -> Result<Vec<ClusterVm>> {
        self.get("/v1/vms")
    }

    pub fn vm(&self, name: &str) -> Result<ClusterVm> {
        self.get(&format!("/v1/vms/{name}"))
    }

    pub fn create_vm(&self, spec: &ClusterCreateVm) -> Result<ClusterVmCreated> {
        self.post("/v1/vms", spec)
    }

    pub fn delete_vm(&self, name: &str) -> Result<()> {
        self.http.delete(&format!("/v1/vms/{name}"))
    }

    pub fn migrate(&self, vm: &str, req: &ClusterMigrate) -> Result<ClusterMigration> {
        self.post(&format!("/v1/vms/{vm}/migrate"), req)
    }

    pub fn migrations(&self) -> Result<Vec<ClusterMigration>> {
        self.get("/v1/migrations")
    }

    pub fn migration(&self, id: &str) -> Result<ClusterMigration> {
        self.get(&format!("/v1/migrations/{id}"))
    }

    /// Asks a paused post-copy to reconnect now; the source agent's record of it.
    pub fn resume_migration(&self, id: &str) -> Result<godwit_api::MigrationInfo> {
        self.post(
            &format!("/v1/migrations/{id}/resume"),
            &serde_json::json!({}),
        )
    }

    pub fn plan(&self) -> Result<PlanView> {
        self.get("/v1/plan")
    }

    pub fn decisions(&self, limit: usize) -> Result<Vec<Decision>> {
        self.get(&format!("/v1/decisions?limit={limit}"))
    }

    pub fn balancer(&self) -> Result<BalancerState> {
        self.get("/v1/balancer")
    }

    pub fn host(&self, name: &str) -> Result<ClusterHost> {
        self.get(&format!("/v1/hosts/{name}"))
    }

    /// Cordons (`true`) or uncordons a host.
    pub fn cordon(&self, name: &str, cordoned: bool) -> Result<ClusterHost> {
        let verb = if cordoned { "cordon" } else { "uncordon" };
        self.post(&format!("/v1/hosts/{name}/{verb}"), &serde_json::json!({}))
    }

    pub fn drain(&self, name: &str) -> Result<godwit_api::DrainStatus> {
        self.post(&format!("/v1/hosts/{name}/drain"), &serde_json::json!({}))
    }

    pub fn drain_status(&self, name: &str) -> Result<godwit_api::DrainStatus> {
        self.get(&format!("/v1/hosts/{name}/drain"))
    }

    pub fn forget_host(&self, name: &str) -> Result<()> {
        self.http.delete(&format!("/v1/hosts/{name}"))
    }

    pub fn set_balancer(&self, mode: godwit_api::BalancerMode) -> Result<BalancerState> {
        self.http
            .put("/v1/balancer", &serde_json::json!({ "mode": mode }))
    }
}
