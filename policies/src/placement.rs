//! Placement of a new VM: which host should run it.
//!
//! Hard rules reject a host: it must be up and not cordoned, carry the VM's required labels, have at least as
//! many cores as the VM has vCPUs, have the memory free (less the reserve), be able to hold
//! the VM's resources, run no member of the VM's anti-affinity group, and stay at or under
//! the load ceiling with the VM's expected CPU use added. Every host left is scored by CPU
//! headroom and free memory after placing, plus a bonus when it already runs a member of the
//! VM's affinity group; the best score wins and ties go to the name that sorts first. The
//! result explains the choice and every host it did not make.
//!
//! A new VM's resources are created on its host: there is no source to leave them on, so
//! unlike a migration target ([`eligible`](crate::rebinding::eligible)) the host must offer
//! every device class the VM names and have free disk for all its disk and scratch data
//! together.

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::{self, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::Host;
use crate::params::Params;
use crate::rebinding::{Resource, ResourceKind};
use crate::units::Bytes;
use crate::view::{ClusterView, NONE};

/// Rejected hosts listed one by one in a summary before the rest are only counted.
const LISTED_REJECTIONS: usize = 5;

/// A VM to be placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRequest {
    /// Its name.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// CPU it is expected to use, cores; unknown means all its vCPUs busy.
    #[serde(default)]
    pub expected_cpu_cores: Option<f64>,
    /// Prefer hosts running this affinity group.
    #[serde(default)]
    pub affinity_group: Option<String>,
    /// Never share a host with this anti-affinity group.
    #[serde(default)]
    pub anti_affinity_group: Option<String>,
    /// Labels the host must carry.
    #[serde(default)]
    pub required_labels: BTreeMap<String, String>,
    /// Resources it uses, created on the chosen host.
    #[serde(default)]
    pub resources: Vec<Resource>,
}

impl VmRequest {
    /// A request with no groups, labels, resources or CPU estimate.
    pub fn new(name: impl Into<String>, vcpus: u32, memory_bytes: u64) -> Self {
        Self {
            name: name.into(),
            vcpus,
            memory_bytes,
            expected_cpu_cores: None,
            affinity_group: None,
            anti_affinity_group: None,
            required_labels: BTreeMap::new(),
            resources: Vec::new(),
        }
    }

    /// CPU the placement accounts for, cores.
    pub fn cpu_cores(&self) -> f64 {
        self.expected_cpu_cores.unwrap_or(f64::from(self.vcpus))
    }
}

/// Why a host cannot take the VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Rejection {
    /// The host is down.
    Down,
    /// The host is cordoned: it takes no VMs.
    Cordoned,
    /// The host lacks a required label, or has another value for it.
    MissingLabel {
        /// The label.
        key: String,
        /// The value required.
        want: String,
        /// The host's value, if it has the label.
        have: Option<String>,
    },
    /// The host has fewer cores than the VM has vCPUs.
    TooFewCores {
        /// The VM's vCPUs.
        vcpus: u32,
        /// The host's cores.
        cores: f64,
    },
    /// The host's free memory, less the reserve, is smaller than the VM.
    NotEnoughMemory {
        /// The VM's memory.
        need: u64,
        /// Free memory less the reserve.
        available: u64,
    },
    /// The host does not offer a device class one of the VM's devices needs.
    MissingDevice {
        /// The device resource, described (`device gpu0 (by type, fixed)`).
        resource: String,
        /// The class it needs.
        class: String,
        /// The classes the host offers.
        offered: Vec<String>,
    },
    /// The host's backend binds no VM resources, and the VM has some.
    NoResourceBinding,
    /// The host's free disk cannot hold the VM's disk and scratch data.
    NotEnoughDisk {
        /// Bytes of all the VM's disk and scratch data.
        need: u64,
        /// The host's free disk for resources.
        available: u64,
    },
    /// The host runs a member of the VM's anti-affinity group.
    AntiAffinity {
        /// The group.
        group: String,
        /// Members on the host.
        members: u32,
    },
    /// The host would exceed the load ceiling.
    OverLoadCeiling {
        /// Load with the VM.
        projected: f64,
        /// The ceiling.
        ceiling: f64,
    },
}

impl Rejection {
    /// A short name for counting rejections by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::Down => "down",
            Rejection::Cordoned => "cordoned",
            Rejection::MissingLabel { .. } => "missing a label",
            Rejection::TooFewCores { .. } => "too few cores",
            Rejection::NotEnoughMemory { .. } => "not enough memory",
            Rejection::MissingDevice { .. } => "missing a device",
            Rejection::NoResourceBinding => "binds no resources",
            Rejection::NotEnoughDisk { .. } => "not enough disk",
            Rejection::AntiAffinity { .. } => "anti-affinity",
            Rejection::OverLoadCeiling { .. } => "over the load ceiling",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Down => write!(f, "is down"),
            Rejection::Cordoned => write!(f, "is cordoned"),
            Rejection::MissingLabel {
                key,
                want,
                have: None,
            } => {
                write!(f, "lacks label {key}={want}")
            }
            Rejection::MissingLabel {
                key,
                want,
                have: Some(have),
            } => write!(f, "has label {key}={have}, not {key}={want}"),
            Rejection::TooFewCores { vcpus, cores } => {
                write!(f, "has {cores} cores, fewer than the VM's {vcpus} vCPUs")
            }
            Rejection::NotEnoughMemory { need, available } => write!(
                f,
                "has {} free beyond its reserve, the VM needs {}",
                Bytes(*available as f64),
                Bytes(*need as f64)
            ),
            Rejection::MissingDevice {
                resource,
                class,
                offered,
            } => write!(
                f,
                "has no {class:?} device for the VM's {resource}, it offers {}",
                if offered.is_empty() {
                    "none".to_string()
                } else {
                    offered.join(", ")
                }
            ),
            Rejection::NoResourceBinding => {
                write!(f, "has a backend that cannot bind the VM's resources")
            }
            Rejection::NotEnoughDisk { need, available } => write!(
                f,
                "has {} of disk free for resources, the VM's disk and scratch data need {}",
                Bytes(*available as f64),
                Bytes(*need as f64)
            ),
            Rejection::AntiAffinity { group, members } => write!(
                f,
                "already runs {members} member(s) of anti-affinity group {group}"
            ),
            Rejection::OverLoadCeiling { projected, ceiling } => write!(
                f,
                "would reach load {projected:.2}, over the ceiling {ceiling:.2}"
            ),
        }
    }
}

/// A host that could take the VM, and how well.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostScore {
    /// The host.
    pub host: String,
    /// Higher is better.
    pub score: f64,
    /// Load now.
    pub load: f64,
    /// Load with the VM.
    pub projected_load: f64,
    /// Free memory beyond the reserve after placing, bytes.
    pub memory_available_after: u64,
    /// Whether it runs a member of the VM's affinity group.
    pub runs_affinity_group: bool,
}

impl fmt::Display for HostScore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} scores {:.3} (load {:.2} -> {:.2}, {} free after",
            self.host,
            self.score,
            self.load,
            self.projected_load,
            Bytes(self.memory_available_after as f64)
        )?;
        if self.runs_affinity_group {
            write!(f, ", runs the affinity group")?;
        }
        write!(f, ")")
    }
}

/// A host that cannot take the VM, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostRejection {
    /// The host.
    pub host: String,
    /// Why.
    pub rejection: Rejection,
}

impl fmt::Display for HostRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.host, self.rejection)
    }
}

/// Where a new VM goes, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    /// The VM.
    pub vm: String,
    /// The chosen host.
    pub host: String,
    /// The chosen host's score.
    pub score: f64,
    /// Its load with the VM.
    pub projected_load: f64,
    /// The choice in a few sentences: the winner, the runner-up, the rejections.
    pub reason: String,
    /// Every feasible host, best first (the chosen one first).
    pub ranked: Vec<HostScore>,
    /// Every host rejected, in snapshot order.
    pub rejected: Vec<HostRejection>,
}

impl Placement {
    /// One line per host: the ranking, then the rejections.
    pub fn explain(&self) -> String {
        let mut out = format!("{} -> {}\n", self.vm, self.host);
        for (i, s) in self.ranked.iter().enumerate() {
            let _ = writeln!(out, "  #{} {s}", i + 1);
        }
        for r in &self.rejected {
            let _ = writeln!(out, "  rejected: {r}");
        }
        out
    }
}

/// Why no host was chosen.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PlacementError {
    /// The request itself cannot be placed anywhere.
    #[error("Request for VM {vm:?} is invalid: {why}")]
    InvalidRequest {
        /// The VM.
        vm: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Every host was rejected (or there are none).
    #[error("No host can run VM {vm:?}: {summary}")]
    NoHost {
        /// The VM.
        vm: String,
        /// The rejections, summarised.
        summary: String,
        /// Every rejection.
        rejected: Vec<HostRejection>,
    },
}

/// Chooses a host for a new VM.
pub fn place(
    view: &ClusterView,
    req: &VmRequest,
    params: &Params,
) -> Result<Placement, PlacementError> {
    let invalid = |why| PlacementError::InvalidRequest {
        vm: req.name.clone(),
        why,
    };
    if req.vcpus == 0 {
        return Err(invalid("it has no vCPUs"));
    }
    let cpu = req.cpu_cores();
    if !(cpu.is_finite() && cpu >= 0.0) {
        return Err(invalid(
            "its expected CPU use is not a finite, non-negative number",
        ));
    }
    if req
        .resources
        .iter()
        .any(|r| r.kind == ResourceKind::Device && r.device_class.is_none())
    {
        return Err(invalid("one of its devices names no device class"));
    }
    let p = &params.placement;
    let affinity = req
        .affinity_group
        .as_deref()
        .map_or(NONE, |g| view.group_id(g));
    let anti = req
        .anti_affinity_group
        .as_deref()
        .map_or(NONE, |g| view.group_id(g));

    let mut ranked = Vec::new();
    let mut rejected = Vec::new();
    for (h, host) in view.hosts().iter().enumerate() {
        let h = h as u32;
        let load = view.loads()[h as usize];
        match judge(view, host, h, load, req, cpu, anti, params) {
            Err(rejection) => rejected.push(HostRejection {
                host: host.name.clone(),
                rejection,
            }),
            Ok((projected_load, available_after)) => {
                let runs_affinity_group = view.affinity_members(affinity, h) > 0;
                let mem_fraction = available_after as f64 / host.memory_total_bytes.max(1) as f64;
                let score = p.cpu_weight * (1.0 - projected_load)
                    + p.memory_weight * mem_fraction
                    + if runs_affinity_group {
                        p.affinity_bonus
                    } else {
                        0.0
                    };
                ranked.push(HostScore {
                    host: host.name.clone(),
                    score,
                    load,
                    projected_load,
                    memory_available_after: available_after,
                    runs_affinity_group,
                });
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.host.cmp(&b.host))
    });

    let Some(best) = ranked.first() else {
        let summary = if rejected.is_empty() {
            "the cluster has no hosts".to_string()
        } else {
            summarize_rejections(&rejected)
        };
        return Err(PlacementError::NoHost {
            vm: req.name.clone(),
            summary,
            rejected,
        });
    };
    let mut reason = format!("{} -> {}: {best}", req.name, best.host);
    if let Some(next) = ranked.get(1) {
        let _ = write!(reason, "; next best {next}");
    }
    if !rejected.is_empty() {
        let _ = write!(reason, "; {}", summarize_rejections(&rejected));
    }
    Ok(Placement {
        vm: req.name.clone(),
        host: best.host.clone(),
        score: best.score,
        projected_load: best.projected_load,
        reason,
        ranked,
        rejected,
    })
}

/// The hard rules for one host: `Ok((projected load, memory available after))` or why not.
#[allow(clippy::too_many_arguments)]
fn judge(
    view: &ClusterView,
    host: &Host,
    h: u32,
    load: f64,
    req: &VmRequest,
    cpu: f64,
    anti: u32,
    params: &Params,
) -> Result<(f64, u64), Rejection> {
    if !host.up {
        return Err(Rejection::Down);
    }
    if host.cordoned {
        return Err(Rejection::Cordoned);
    }
    if let Some((key, want)) = req
        .required_labels
        .iter()
        .find(|(k, v)| host.labels.get(*k) != Some(*v))
    {
        return Err(Rejection::MissingLabel {
            key: key.clone(),
            want: want.clone(),
            have: host.labels.get(key).cloned(),
        });
    }
    if f64::from(req.vcpus) > host.cpu_cores {
        return Err(Rejection::TooFewCores {
            vcpus: req.vcpus,
            cores: host.cpu_cores,
        });
    }
    let available = host
        .memory_free_bytes
        .saturating_sub(params.placement.memory_reserve_bytes);
    if req.memory_bytes > available {
        return Err(Rejection::NotEnoughMemory {
            need: req.memory_bytes,
            available,
        });
    }
    can_hold(host, &req.resources)?;
    let members = view.anti_affinity_members(anti, h);
    if members > 0 {
        return Err(Rejection::AntiAffinity {
            group: req.anti_affinity_group.clone().unwrap_or_default(),
            members,
        });
    }
    let projected = load + cpu / host.cpu_cores;
    if projected > params.placement.max_load {
        return Err(Rejection::OverLoadCeiling {
            projected,
            ceiling: params.placement.max_load,
        });
    }
    Ok((projected, available - req.memory_bytes))
}

/// Whether `host` can hold `resources` created there: every device class offered, and the
/// disk and scratch data fitting its free disk together.
fn can_hold(host: &Host, resources: &[Resource]) -> Result<(), Rejection> {
    if !resources.is_empty() && !host.binds_resources {
        return Err(Rejection::NoResourceBinding);
    }
    for r in resources {
        let Some(class) = r
            .device_class
            .as_ref()
            .filter(|_| r.kind == ResourceKind::Device)
        else {
            continue;
        };
        if !host.device_classes.contains(class) {
            return Err(Rejection::MissingDevice {
                resource: r.describe(),
                class: class.clone(),
                offered: host.device_classes.iter().cloned().collect(),
            });
        }
    }
    let need = resources
        .iter()
        .map(|r| match r.kind {
            ResourceKind::Disk | ResourceKind::Scratch => r.size_bytes,
            ResourceKind::Endpoint | ResourceKind::Device => 0,
        })
        .fold(0u64, u64::saturating_add);
    if need > host.disk_free_bytes {
        return Err(Rejection::NotEnoughDisk {
            need,
            available: host.disk_free_bytes,
        });
    }
    Ok(())
}

/// "3 hosts rejected (2 down, 1 missing a label): h1 is down; ..." with the first few listed.
fn summarize_rejections(rejected: &[HostRejection]) -> String {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rejected {
        *kinds.entry(r.rejection.kind()).or_default() += 1;
    }
    let counts: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
    let mut out = format!(
        "{} host{} rejected ({}): ",
        rejected.len(),
        if rejected.len() == 1 { "" } else { "s" },
        counts.join(", ")
    );
    let listed: Vec<String> = rejected
        .iter()
        .take(LISTED_REJECTIONS)
        .map(ToString::to_string)
        .collect();
    out.push_str(&listed.join("; "));
    if rejected.len() > LISTED_REJECTIONS {
        let _ = write!(out, "; and {} more", rejected.len() - LISTED_REJECTIONS);
    }
    out
}
