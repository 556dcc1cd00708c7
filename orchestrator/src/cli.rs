//! A small blocking client for the orchestrator's REST API, for the `godwit` CLI.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use godwit_api::{
    BalancerState, ClusterCreateVm, ClusterHost, ClusterMigrate, ClusterMigration, ClusterVm,
    ClusterVmCreated, Decision, ErrorBody, PlanView,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::blocking::Client,
}

impl Client {
    pub fn new(base: &str) -> Result<Self> {
        Ok(Client {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()?,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn send<T: DeserializeOwned>(&self, req: reqwest::blocking::RequestBuilder) -> Result<T> {
        let resp = req
            .send()
            .with_context(|| format!("Cannot reach the orchestrator at {}", self.base))?;
        let status = resp.status();
        let text = resp.text()?;
        if !status.is_success() {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            bail!("{message}");
        }
        let text = if text.is_empty() { "null".into() } else { text };
        serde_json::from_str(&text).with_context(|| "Unexpected answer from the orchestrator")
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
    }

    fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
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
        let _: serde_json::Value =
            self.send(self.http.delete(format!("{}/v1/vms/{name}", self.base)))?;
        Ok(())
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

    pub fn plan(&self) -> Result<PlanView> {
        self.get("/v1/plan")
    }

    pub fn decisions(&self, limit: usize) -> Result<Vec<Decision>> {
        self.get(&format!("/v1/decisions?limit={limit}"))
    }

    pub fn balancer(&self) -> Result<BalancerState> {
        self.get("/v1/balancer")
    }

    pub fn set_balancer(&self, mode: godwit_api::BalancerMode) -> Result<BalancerState> {
        self.send(
            self.http
                .put(format!("{}/v1/balancer", self.base))
                .json(&serde_json::json!({ "mode": mode })),
        )
    }
}
