//! A VM's resources as bound on one host, and what the microVM and the API see of them.

use std::path::PathBuf;
use std::sync::Arc;

use godwit_api::{ResourceInfo, ResourceSpec};

use super::endpoint::Endpoint;
use crate::microvm::block::{BlockBackend, FileDisk};
use crate::microvm::devices::Attachments;
use crate::microvm::entropy::EntropySource;
use crate::microvm::stream::Stream;

/// One resource as bound on this host.
#[derive(Debug, Clone)]
pub struct Bound {
    pub spec: ResourceSpec,
    /// The host holding its data or device.
    pub host: String,
    pub state: BoundState,
}

#[derive(Debug, Clone)]
pub enum BoundState {
    Disk {
        /// The image file when the disk is on this host.
        local: Option<Arc<FileDisk>>,
        backend: Arc<dyn BlockBackend>,
        /// `HOST:PORT/EXPORT` when it stayed on another host.
        remote: Option<String>,
    },
    Endpoint {
        endpoint: Arc<Endpoint>,
        stream: Arc<Stream>,
        /// The published address (on the VM's home host).
        address: String,
    },
    Scratch {
        /// The directory, when its data is on this host.
        dir: Option<PathBuf>,
        /// `HOST:PATH` when it stayed on another host.
        remote: Option<String>,
    },
    Device {
        entropy: Option<Arc<dyn EntropySource>>,
        location: String,
    },
}

/// All of one VM's resources here.
#[derive(Debug, Clone, Default)]
pub struct VmResources {
    pub items: Vec<Bound>,
    /// API URLs of agents the VM ran on before that may still serve its resources.
    pub visited: Vec<String>,
}

impl VmResources {
    /// The devices the microVM is built with.
    pub fn attachments(&self) -> Attachments {
        let mut a = Attachments::default();
        for b in &self.items {
            match &b.state {
                BoundState::Disk { backend, .. } => a.disk = Some(backend.clone()),
                BoundState::Endpoint { stream, .. } => a.stream = Some(stream.clone()),
                BoundState::Device {
                    entropy: Some(e), ..
                } => a.entropy = Some(e.clone()),
                _ => {}
            }
        }
        a
    }

    pub fn info(&self) -> Vec<ResourceInfo> {
        self.items
            .iter()
            .map(|b| {
                let p = b.spec.to_policy();
                let (location, address, writes, connections) = match &b.state {
                    BoundState::Disk { backend, .. } => {
                        (backend.location(), None, backend.writes(), 0)
                    }
                    BoundState::Endpoint {
                        endpoint, address, ..
                    } => (
                        endpoint.location(),
                        Some(address.clone()),
                        0,
                        endpoint.connections(),
                    ),
                    BoundState::Scratch { dir, remote } => (
                        match (dir, remote) {
                            (Some(d), _) => format!("scratch {}", d.display()),
                            (None, Some(r)) => format!("scratch {r}"),
                            (None, None) => "scratch (none)".into(),
                        },
                        None,
                        0,
                        0,
                    ),
                    BoundState::Device { location, .. } => (location.clone(), None, 0, 0),
                };
                ResourceInfo {
                    spec: b.spec.clone(),
                    binding: p.binding,
                    attachment: p.attachment,
                    location,
                    host: b.host.clone(),
                    address,
                    writes,
                    connections,
                }
            })
            .collect()
    }

    pub fn stream(&self) -> Option<Arc<Stream>> {
        self.items.iter().find_map(|b| match &b.state {
            BoundState::Endpoint { stream, .. } => Some(stream.clone()),
            _ => None,
        })
    }
}
