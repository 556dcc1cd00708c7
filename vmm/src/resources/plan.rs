//! Choosing and finishing what happens to each resource when a VM migrates: the source asks
//! the target what it offers, `policies::rebinding` picks an action per resource, and after
//! the move the source puts its side in order (removes what moved, keeps exports and
//! forwarders for what stayed).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use godwit_api::{
    HostInfo, IncomingResource, ResourceAction, ResourceKind, ResourceMigration, ResourceStatus,
};
use godwit_daemon::client::ClientAuth;
use policies::rebinding::{self, Choice, TargetCapabilities};

use super::transfer::Planned;
use super::{BoundState, HostResources, VmResources};
use crate::error::VmmError;

/// What the source decided for a migrating VM's resources.
#[derive(Debug, Default)]
pub struct MigrationPlan {
    pub planned: Vec<Planned>,
    pub incoming: Vec<IncomingResource>,
    pub records: Vec<ResourceMigration>,
}

/// Asks the target agent at `target` (HOST:PORT) what it offers VM resources.
pub fn target_info(auth: &ClientAuth, target: &str) -> Result<HostInfo, VmmError> {
    let unreachable = |source| VmmError::TargetUnreachable {
        target: target.to_owned(),
        source,
    };
    let client = auth
        .blocking_client(Duration::from_secs(10))
        .map_err(unreachable)?;
    client
        .get(format!("{}/v1/host", auth.url(target)))
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.json::<HostInfo>())
        .map_err(unreachable)
}

fn remote_of(state: &BoundState) -> Option<String> {
    match state {
        BoundState::Disk { remote, .. } | BoundState::Scratch { remote, .. } => remote.clone(),
        _ => None,
    }
}

/// Chooses an action per resource for a move to a host offering `target`, and prepares what
/// the target needs to bind each (exports for disks that stay, addresses of devices and
/// endpoints). `advertise` is the host name or IP the target reaches this host at.
pub fn plan(
    host: &HostResources,
    vm: &str,
    resources: &VmResources,
    target: &HostInfo,
    advertise: &str,
    api_url: &str,
) -> Result<MigrationPlan, VmmError> {
    let caps = TargetCapabilities {
        disk_free_bytes: target.disk_free_bytes,
        device_classes: target
            .device_classes
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>(),
        can_reach_source: true,
        source_can_export: godwit_nbd::qemu_nbd_available(),
        // An agent that reports no backends (an older one) is not second-guessed.
        binds_resources: target.backends.is_empty() || target.backends.iter().any(|b| b.resources),
    };
    // Data already elsewhere (a disk or scratch kept on another host) stays there: the target
    // reaches it where it is, so it takes no disk on the target and needs no export here.
    let policy: Vec<rebinding::Resource> = resources
        .items
        .iter()
        .map(|b| {
            let mut r = b.spec.to_policy();
            if remote_of(&b.state).is_some() {
                r.size_bytes = 0;
            }
            r
        })
        .collect();
    let choices = rebinding::choose_all(&policy, &caps).map_err(|u| VmmError::Unplaceable {
        host: target.name.clone(),
        vm: vm.to_owned(),
        reason: u.reason.to_string(),
    })?;
    let mut out = MigrationPlan::default();
    for (i, (b, choice)) in resources.items.iter().zip(choices).enumerate() {
        let Choice {
            mut action,
            first_choice,
            fallback,
            mut reason,
            ..
        } = choice;
        let mut inc = IncomingResource {
            spec: b.spec.clone(),
            action,
            remote: None,
            remote_host: None,
            address: None,
        };
        if let Some(remote) = remote_of(&b.state) {
            // Only a global reference makes sense for data that is not here.
            action = ResourceAction::GlobalRef;
            reason = format!(
                "{} {} already stays on {} behind a global reference; the target uses it there",
                b.spec.kind, b.spec.name, b.host
            );
            inc.action = action;
            inc.remote = Some(remote);
            inc.remote_host = Some(b.host.clone());
        } else {
            match (&b.state, action) {
                (
                    BoundState::Disk {
                        local: Some(disk), ..
                    },
                    ResourceAction::GlobalRef,
                ) => {
                    inc.remote =
                        Some(host.export_disk(vm, &b.spec.name, disk.path(), advertise)?);
                    inc.remote_host = Some(b.host.clone());
                }
                (BoundState::Scratch { dir: Some(d), .. }, ResourceAction::GlobalRef) => {
                    inc.remote = Some(format!("{}:{}", b.host, d.display()));
                    inc.remote_host = Some(b.host.clone());
                }
                (BoundState::Device { location, .. }, ResourceAction::GlobalRef) => {
                    // A device this VM already reaches remotely keeps that reference.
                    let url = location
                        .split_once(" via ")
                        .map_or(api_url.to_owned(), |(_, u)| u.to_owned());
                    let holder = if location.contains(" via ") {
                        b.host.clone()
                    } else {
                        host.host().to_owned()
                    };
                    inc.remote = Some(url);
                    inc.remote_host = Some(holder);
                }
                (BoundState::Endpoint { address, .. }, _) => {
                    inc.address = Some(address.clone());
                    inc.remote_host = Some(b.host.clone());
                }
                _ => {}
            }
        }
        out.records.push(ResourceMigration {
            name: b.spec.name.clone(),
            kind: b.spec.kind,
            action,
            first_choice,
            fallback,
            reason,
            status: ResourceStatus::Pending,
            detail: String::new(),
            bytes: 0,
            duration_ms: 0.0,
            error: None,
        });
        out.planned.push(Planned {
            bound: b.clone(),
            action,
            record: i,
        });
        out.incoming.push(inc);
    }
    Ok(out)
}

/// Stops the exports a failed migration started (disks that would have stayed here).
pub fn undo_exports(host: &HostResources, vm: &str, plan: &[Planned]) {
    for p in plan {
        if let (BoundState::Disk { local: Some(_), .. }, ResourceAction::GlobalRef) =
            (&p.bound.state, p.action)
        {
            host.unexport(vm, &p.bound.spec.name);
        }
    }
}

/// The VM runs on the target now (`SourceVm::target_running`, which post-copy reaches long
/// before the migration ends): its endpoint forwards there.
pub fn hand_over_endpoint(plan: &[Planned], link: SocketAddr) -> Option<String> {
    for p in plan {
        if let BoundState::Endpoint {
            endpoint, stream, ..
        } = &p.bound.state
        {
            let held = stream.detach();
            let n = held.len();
            endpoint.moved_to(link, held);
            return Some(format!(
                "published address kept; live sessions and new connections forwarded to {link} \
                 ({n} client bytes held during the switchover handed over)"
            ));
        }
    }
    None
}

/// After a completed move: removes data that moved, keeps what stays, and returns a detail
/// sentence per resource record.
pub fn finish_source(
    host: &HostResources,
    vm: &str,
    plan: &[Planned],
    target: &str,
) -> BTreeMap<usize, String> {
    let mut details = BTreeMap::new();
    let mut removed: Vec<PathBuf> = Vec::new();
    let mut kept = 0u64;
    for p in plan {
        let name = &p.bound.spec.name;
        let dir = host.vm_dir(vm).join(name);
        let detail = match (p.bound.spec.kind, p.action) {
            (ResourceKind::Disk | ResourceKind::Scratch, ResourceAction::Move) => {
                removed.push(dir.clone());
                format!("source copy {} removed", dir.display())
            }
            (ResourceKind::Disk | ResourceKind::Scratch, ResourceAction::Copy) => {
                kept += p.bound.spec.size_bytes();
                format!("source copy kept at {}", dir.display())
            }
            (ResourceKind::Disk, ResourceAction::GlobalRef) => {
                if remote_of(&p.bound.state).is_none() {
                    kept += p.bound.spec.size_bytes();
                }
                format!(
                    "stays on {}; {target} reads and writes it through NBD",
                    p.bound.host
                )
            }
            (ResourceKind::Scratch, ResourceAction::GlobalRef) => {
                if remote_of(&p.bound.state).is_none() {
                    kept += p.bound.spec.size_bytes();
                }
                format!("stays on {}", p.bound.host)
            }
            (ResourceKind::Scratch, ResourceAction::Rebind) => {
                removed.push(dir.clone());
                format!("{target} starts a fresh empty directory")
            }
            (ResourceKind::Device, ResourceAction::Rebind) => format!(
                "rebound to {target}'s own {} device",
                p.bound.spec.class.as_deref().unwrap_or("?")
            ),
            (ResourceKind::Device, _) => format!(
                "{target} uses the {} device of {} remotely",
                p.bound.spec.class.as_deref().unwrap_or("?"),
                p.bound.host
            ),
            _ => continue,
        };
        details.insert(p.record, detail);
    }
    host.moved_away(vm, &removed, kept);
    details
}

/// The target's records of an incoming VM's resources, as the source chose them.
pub fn target_records(resources: &[IncomingResource]) -> Vec<ResourceMigration> {
    resources
        .iter()
        .map(|r| ResourceMigration {
            name: r.spec.name.clone(),
            kind: r.spec.kind,
            action: r.action,
            first_choice: r.action,
            fallback: false,
            reason: "chosen by the source".into(),
            status: ResourceStatus::Pending,
            detail: String::new(),
            bytes: 0,
            duration_ms: 0.0,
            error: None,
        })
        .collect()
}

/// The target's records once the incoming migration ended: where each resource is bound now.
pub fn finish_target_records(
    bound: Option<&[godwit_api::ResourceInfo]>,
    progress: &page_transfer::progress::Progress,
    ok: bool,
    received: u64,
) {
    progress.update(|i| {
        for r in &mut i.resources {
            r.status = if ok {
                ResourceStatus::Done
            } else {
                ResourceStatus::Failed
            };
            if let Some(b) = bound
                .unwrap_or_default()
                .iter()
                .find(|b| b.spec.name == r.name)
            {
                r.detail = format!("bound here as {} (on {})", b.location, b.host);
            }
        }
        if let Some(r) = i
            .resources
            .iter_mut()
            .find(|r| super::transfer::carries_data(r.kind, r.action))
        {
            r.bytes = received;
        }
    });
}
