//! What becomes of each resource a VM uses when it migrates (DESIGN.md section 4).
//!
//! A VM declares its resources: a disk image, a published endpoint, scratch data, a host
//! device. Each has a process-to-resource [`Binding`] and a resource-to-machine
//! [`Attachment`]; together they select a row of the classic table, which lists a first
//! choice of [`Action`] and the alternatives to take, in order, when the first is impossible
//! on the chosen target:
//!
//! | binding \ attachment | unattached | fastened | fixed |
//! |---|---|---|---|
//! | by identifier | MV (or GR) | GR (or MV) | GR |
//! | by value | CP (or MV, GR) | GR (or CP) | GR |
//! | by type | RB (or GR, CP) | RB (or GR, CP) | RB (or GR) |
//!
//! [`choose`] walks one resource's row against the target's [`TargetCapabilities`] and returns
//! the first feasible action with a sentence saying why; [`choose_all`] does it for all of a
//! VM's resources, sharing the target's free disk between them; [`eligible`] is the yes/no
//! that placement and balancing ask of each candidate target. Only actions in the table are
//! ever considered. What makes an action impossible is [`feasible`]'s business:
//!
//! - MV and CP put the resource's data on the target: they need `size_bytes` of its free disk.
//!   A device is host hardware; it is never moved or copied.
//! - GR needs the spec to allow it, the source to be able to export, and the target to reach
//!   the source.
//! - RB binds to the target's own instance of the kind: a device of the same class (which the
//!   target must offer), a fresh disk of the same size (which needs the free disk), a fresh
//!   empty scratch directory or a fresh endpoint address (always possible).
//!
//! ```
//! use policies::rebinding::{choose_all, Action, Resource, ResourceKind, TargetCapabilities};
//!
//! const GIB: u64 = 1 << 30;
//! let resources = [
//!     Resource { size_bytes: 8 * GIB, ..Resource::new("root", ResourceKind::Disk) },
//!     Resource::new("web", ResourceKind::Endpoint),
//!     Resource { size_bytes: 3 * GIB, ..Resource::new("cache", ResourceKind::Scratch) },
//!     Resource::device("rng", "entropy"),
//! ];
//! // The target has 2 GiB free and an entropy device.
//! let mut target = TargetCapabilities::new(2 * GIB);
//! target.device_classes.insert("entropy".into());
//!
//! let choices = choose_all(&resources, &target).unwrap();
//! let actions: Vec<Action> = choices.iter().map(|c| c.action).collect();
//! assert_eq!(actions, [Action::GlobalRef, Action::GlobalRef, Action::GlobalRef, Action::Rebind]);
//! assert_eq!(
//!     choices[2].reason,
//!     "scratch cache (by value, unattached): CP impossible (needs 3 GiB, target has 2 GiB \
//!      free), MV impossible (needs 3 GiB, target has 2 GiB free), so GR, the second alternative"
//! );
//! ```

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::units::Bytes;

/// What a resource is; it sets the defaults and what RB means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    /// A file-backed block device.
    Disk,
    /// A TCP address published for the VM.
    Endpoint,
    /// A host directory of data the workload uses by value.
    Scratch,
    /// A class of host device (`entropy`, `gpu`), which hosts advertise.
    Device,
}

impl ResourceKind {
    /// Every kind, in declaration order.
    pub const ALL: [ResourceKind; 4] = [
        ResourceKind::Disk,
        ResourceKind::Endpoint,
        ResourceKind::Scratch,
        ResourceKind::Device,
    ];

    /// The binding a resource of this kind has unless its spec says otherwise.
    pub fn default_binding(self) -> Binding {
        match self {
            ResourceKind::Disk | ResourceKind::Endpoint => Binding::Identifier,
            ResourceKind::Scratch => Binding::Value,
            ResourceKind::Device => Binding::Type,
        }
    }

    /// The attachment a resource of this kind has unless its spec says otherwise.
    pub fn default_attachment(self) -> Attachment {
        match self {
            ResourceKind::Disk => Attachment::Fastened,
            ResourceKind::Endpoint | ResourceKind::Device => Attachment::Fixed,
            ResourceKind::Scratch => Attachment::Unattached,
        }
    }

    /// The snake_case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Disk => "disk",
            ResourceKind::Endpoint => "endpoint",
            ResourceKind::Scratch => "scratch",
            ResourceKind::Device => "device",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the VM refers to the resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Binding {
    /// This very resource and no other (a disk image, a published address).
    Identifier,
    /// Its contents: any resource holding the same value will do.
    Value,
    /// Any resource of the same type will do (an entropy source).
    Type,
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Binding::Identifier => "by identifier",
            Binding::Value => "by value",
            Binding::Type => "by type",
        })
    }
}

/// How firmly the resource belongs to its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attachment {
    /// It can move freely.
    Unattached,
    /// It can move, at a cost worth avoiding (a large disk image).
    Fastened,
    /// It cannot leave its host.
    Fixed,
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attachment::Unattached => "unattached",
            Attachment::Fastened => "fastened",
            Attachment::Fixed => "fixed",
        })
    }
}

/// What the agents do with a resource when its VM migrates. Displays as the table's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// MV: move the resource to the target; the source's copy is removed.
    Move,
    /// CP: copy its value to the target; the source keeps its own.
    Copy,
    /// GR: leave it on the source and give the VM a global reference to it (a block export,
    /// a forwarder).
    GlobalRef,
    /// RB: rebind the VM to an equivalent resource of the target's own.
    Rebind,
}

impl Action {
    /// Every action, in declaration order.
    pub const ALL: [Action; 4] = [
        Action::Move,
        Action::Copy,
        Action::GlobalRef,
        Action::Rebind,
    ];

    /// The table's two-letter code: `MV`, `CP`, `GR`, `RB`.
    pub fn code(self) -> &'static str {
        match self {
            Action::Move => "MV",
            Action::Copy => "CP",
            Action::GlobalRef => "GR",
            Action::Rebind => "RB",
        }
    }

    /// The snake_case name, as serialized (for metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Move => "move",
            Action::Copy => "copy",
            Action::GlobalRef => "global_ref",
            Action::Rebind => "rebind",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// The table: the first choice for a binding and attachment, then the alternatives in order.
pub fn table(binding: Binding, attachment: Attachment) -> &'static [Action] {
    use Action::{Copy, GlobalRef, Move, Rebind};
    match (binding, attachment) {
        (Binding::Identifier, Attachment::Unattached) => &[Move, GlobalRef],
        (Binding::Identifier, Attachment::Fastened) => &[GlobalRef, Move],
        (Binding::Identifier, Attachment::Fixed) => &[GlobalRef],
        (Binding::Value, Attachment::Unattached) => &[Copy, Move, GlobalRef],
        (Binding::Value, Attachment::Fastened) => &[GlobalRef, Copy],
        (Binding::Value, Attachment::Fixed) => &[GlobalRef],
        (Binding::Type, Attachment::Unattached | Attachment::Fastened) => {
            &[Rebind, GlobalRef, Copy]
        }
        (Binding::Type, Attachment::Fixed) => &[Rebind, GlobalRef],
    }
}

/// One resource a VM declares.
///
/// When deserialized, `binding` and `attachment` default to the kind's, `size_bytes` to 0,
/// `device_class` to none and `allow_global_ref` to true; unknown fields are an error, so a
/// misspelt override is not silently replaced by the default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ResourceDecl")]
pub struct Resource {
    /// Its name, unique within the VM (`root`, `web`).
    pub name: String,
    /// What it is.
    pub kind: ResourceKind,
    /// How the VM refers to it.
    pub binding: Binding,
    /// How firmly it belongs to its host.
    pub attachment: Attachment,
    /// Bytes of data a disk or scratch directory holds (what MV and CP send, and what they or
    /// a fresh disk need free on the target); 0 for other kinds.
    pub size_bytes: u64,
    /// For a device, the class an equivalent must have on the target (`entropy`, `gpu`).
    pub device_class: Option<String>,
    /// Whether GR is acceptable; false for, say, a device the spec says must be local.
    pub allow_global_ref: bool,
}

impl Resource {
    /// A resource with its kind's defaults, no data, no device class, GR allowed.
    pub fn new(name: impl Into<String>, kind: ResourceKind) -> Self {
        Self {
            name: name.into(),
            kind,
            binding: kind.default_binding(),
            attachment: kind.default_attachment(),
            size_bytes: 0,
            device_class: None,
            allow_global_ref: true,
        }
    }

    /// A device of `class` with the device defaults (by type, fixed).
    pub fn device(name: impl Into<String>, class: impl Into<String>) -> Self {
        Self {
            device_class: Some(class.into()),
            ..Self::new(name, ResourceKind::Device)
        }
    }

    /// Its row of the table.
    pub fn row(&self) -> &'static [Action] {
        table(self.binding, self.attachment)
    }

    /// `disk root (by identifier, fastened)`, as reasons name it.
    pub fn describe(&self) -> String {
        format!(
            "{} {} ({}, {})",
            self.kind, self.name, self.binding, self.attachment
        )
    }
}

/// A resource as a VM spec writes it: only the name and kind are required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceDecl {
    name: String,
    kind: ResourceKind,
    #[serde(default)]
    binding: Option<Binding>,
    #[serde(default)]
    attachment: Option<Attachment>,
    #[serde(default)]
    size_bytes: u64,
    #[serde(default)]
    device_class: Option<String>,
    #[serde(default = "yes")]
    allow_global_ref: bool,
}

impl From<ResourceDecl> for Resource {
    fn from(d: ResourceDecl) -> Self {
        Self {
            binding: d.binding.unwrap_or(d.kind.default_binding()),
            attachment: d.attachment.unwrap_or(d.kind.default_attachment()),
            size_bytes: d.size_bytes,
            device_class: d.device_class,
            allow_global_ref: d.allow_global_ref,
            ..Resource::new(d.name, d.kind)
        }
    }
}

fn yes() -> bool {
    true
}

/// What the chosen target host offers the migrating VM's resources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetCapabilities {
    /// Disk space free on the target for moved, copied or fresh data, bytes.
    pub disk_free_bytes: u64,
    /// Device classes the target advertises (`entropy`, `gpu`); matched exactly.
    #[serde(default)]
    pub device_classes: BTreeSet<String>,
    /// Whether the target can reach the source for global references (default true).
    #[serde(default = "yes")]
    pub can_reach_source: bool,
    /// Whether the source can export its resources (block export, forwarder; default true).
    #[serde(default = "yes")]
    pub source_can_export: bool,
    /// Whether the target's backend binds VM resources at all (default true); a backend
    /// that cannot takes no VM that has any.
    #[serde(default = "yes")]
    pub binds_resources: bool,
}

impl TargetCapabilities {
    /// A target with `disk_free_bytes` free, no devices, reachable by an exporting source.
    pub fn new(disk_free_bytes: u64) -> Self {
        Self {
            disk_free_bytes,
            device_classes: BTreeSet::new(),
            can_reach_source: true,
            source_can_export: true,
            binds_resources: true,
        }
    }
}

/// The action taken for one resource, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    /// The resource's name.
    pub resource: String,
    /// The action chosen.
    pub action: Action,
    /// The first choice of the resource's row of the table.
    pub first_choice: Action,
    /// Whether `action` is an alternative because the first choice was impossible.
    pub fallback: bool,
    /// The choice in one sentence, with what made earlier actions of the row impossible.
    pub reason: String,
    /// The actions of the row tried before `action`, each with why it was impossible.
    pub refused: Vec<Refusal>,
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// An action of the table that is impossible for a resource on a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The action.
    pub action: Action,
    /// Why it is impossible (`needs 8 GiB, target has 2 GiB free`).
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} impossible ({})", self.action, self.reason)
    }
}

/// No action of a resource's row is possible on the target: the target is not eligible.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[error("{reason}")]
pub struct Unbindable {
    /// The resource's name.
    pub resource: String,
    /// One sentence listing why each action of the row is impossible.
    pub reason: String,
    /// Every action of the row, each with why it is impossible.
    pub refused: Vec<Refusal>,
}

/// Whether `action` is possible for `resource` on `target`, else why not in a phrase.
///
/// An action outside the resource's row of the table is never possible.
pub fn feasible(
    action: Action,
    resource: &Resource,
    target: &TargetCapabilities,
) -> Result<(), String> {
    check(action, resource, target, 0)
}

/// [`feasible`], with `committed` bytes of the target's free disk already promised to the
/// VM's other resources.
fn check(
    action: Action,
    r: &Resource,
    target: &TargetCapabilities,
    committed: u64,
) -> Result<(), String> {
    if !r.row().contains(&action) {
        return Err(format!(
            "{action} is not in the table for {}, {}",
            r.binding, r.attachment
        ));
    }
    if !target.binds_resources {
        return Err("the target's backend cannot bind VM resources".into());
    }
    match action {
        Action::Move | Action::Copy if r.kind == ResourceKind::Device => {
            let verb = if action == Action::Move {
                "moved"
            } else {
                "copied"
            };
            Err(format!("a device is host hardware and cannot be {verb}"))
        }
        Action::Move | Action::Copy => fits(r.size_bytes, "", target, committed),
        Action::GlobalRef if !r.allow_global_ref => {
            Err("the VM's spec forbids a global reference".into())
        }
        Action::GlobalRef if !target.source_can_export => Err("the source cannot export it".into()),
        Action::GlobalRef if !target.can_reach_source => {
            Err("the target cannot reach the source".into())
        }
        Action::GlobalRef => Ok(()),
        Action::Rebind => match r.kind {
            ResourceKind::Device => match &r.device_class {
                None => Err("the device declares no class to find an equivalent by".into()),
                Some(class) if target.device_classes.contains(class) => Ok(()),
                Some(class) => Err(format!(
                    "target has no {class:?} device, it offers {}",
                    offered(&target.device_classes)
                )),
            },
            ResourceKind::Disk => fits(r.size_bytes, " for a fresh disk", target, committed),
            // A fresh empty directory, a fresh address: nothing to run out of.
            ResourceKind::Scratch | ResourceKind::Endpoint => Ok(()),
        },
    }
}

fn fits(size: u64, what: &str, target: &TargetCapabilities, committed: u64) -> Result<(), String> {
    let free = target.disk_free_bytes.saturating_sub(committed);
    if size <= free {
        return Ok(());
    }
    let (size, free) = (Bytes(size as f64), Bytes(free as f64));
    if committed == 0 {
        Err(format!("needs {size}{what}, target has {free} free"))
    } else {
        Err(format!(
            "needs {size}{what}, target has {free} free once the VM's other resources take {}",
            Bytes(committed as f64)
        ))
    }
}

fn offered(classes: &BTreeSet<String>) -> String {
    if classes.is_empty() {
        "none".into()
    } else {
        classes
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Target disk an action takes for a resource: its data for MV and CP, a fresh disk for RB,
/// nothing for GR (what planners subtract from a target's free disk after a move).
pub fn disk_taken(action: Action, r: &Resource) -> u64 {
    match (action, r.kind) {
        (_, ResourceKind::Device) | (Action::GlobalRef, _) => 0,
        (Action::Move | Action::Copy, _) | (Action::Rebind, ResourceKind::Disk) => r.size_bytes,
        (Action::Rebind, _) => 0,
    }
}

/// The first feasible action of the resource's row on `target`, or why none is.
pub fn choose(resource: &Resource, target: &TargetCapabilities) -> Result<Choice, Unbindable> {
    choose_within(resource, target, 0)
}

fn choose_within(
    r: &Resource,
    target: &TargetCapabilities,
    committed: u64,
) -> Result<Choice, Unbindable> {
    let row = r.row();
    let mut refused = Vec::new();
    for (i, &action) in row.iter().enumerate() {
        match check(action, r, target, committed) {
            Ok(()) => {
                let rank = match (i, row.len()) {
                    (0, 1) => "the table's only choice",
                    (0, _) => "the table's first choice",
                    (1, _) => "the first alternative",
                    _ => "the second alternative",
                };
                let reason = if refused.is_empty() {
                    format!("{}: {action}, {rank}", r.describe())
                } else {
                    format!("{}: {}, so {action}, {rank}", r.describe(), list(&refused))
                };
                return Ok(Choice {
                    resource: r.name.clone(),
                    action,
                    first_choice: row[0],
                    fallback: i > 0,
                    reason,
                    refused,
                });
            }
            Err(reason) => refused.push(Refusal { action, reason }),
        }
    }
    Err(Unbindable {
        resource: r.name.clone(),
        reason: format!(
            "{} cannot be bound on this target: {}",
            r.describe(),
            list(&refused)
        ),
        refused,
    })
}

fn list(refused: &[Refusal]) -> String {
    refused
        .iter()
        .map(Refusal::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A choice for every resource, in the order given, or the first resource that cannot be
/// bound on `target`.
///
/// The resources share the target's free disk. Resources that can only be bound by putting
/// data on the target (every feasible action of their row needs disk) are served first, in
/// the order given; the others then take their first feasible action, in the order given,
/// with what is left. So a VM is refused only when its must-have data does not fit, never
/// because an optional MV or CP took the space first.
pub fn choose_all(
    resources: &[Resource],
    target: &TargetCapabilities,
) -> Result<Vec<Choice>, Unbindable> {
    let mut needs_disk = Vec::with_capacity(resources.len());
    for r in resources {
        // Fails when no action of the row is possible even with all the free disk.
        choose(r, target)?;
        needs_disk.push(
            r.row()
                .iter()
                .filter(|&&a| feasible(a, r, target).is_ok())
                .all(|&a| disk_taken(a, r) > 0),
        );
    }
    let mut choices: Vec<Option<Choice>> = vec![None; resources.len()];
    let mut committed = 0u64;
    for must in [true, false] {
        for (i, r) in resources.iter().enumerate() {
            if needs_disk[i] != must {
                continue;
            }
            let choice = choose_within(r, target, committed)?;
            committed = committed.saturating_add(disk_taken(choice.action, r));
            choices[i] = Some(choice);
        }
    }
    Ok(choices.into_iter().flatten().collect())
}

/// Whether every resource can be bound on `target`: the test placement and balancing apply
/// to each candidate target of a VM with resources.
pub fn eligible(resources: &[Resource], target: &TargetCapabilities) -> Result<(), Unbindable> {
    choose_all(resources, target).map(|_| ())
}
