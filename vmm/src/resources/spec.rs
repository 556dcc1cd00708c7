//! Validation of the resources a VM declares.

use std::collections::{BTreeSet, HashMap};

use godwit_api::{Attachment, Binding, ResourceKind, ResourceSpec};

use super::{MAX_RESOURCES, MAX_SIZE_MIB};
use crate::error::VmmError;

/// Checks a VM's resource specs: names, sizes, and only combinations of kind, binding and
/// attachment whose every action the agent can carry out (docs/resources.md).
pub fn validate(specs: &[ResourceSpec]) -> Result<(), VmmError> {
    let bad = |m: String| Err(VmmError::Invalid(m));
    if specs.len() > MAX_RESOURCES {
        return bad(format!(
            "a VM may declare at most {MAX_RESOURCES} resources, not {}",
            specs.len()
        ));
    }
    let mut names = BTreeSet::new();
    let mut count = HashMap::new();
    for s in specs {
        if s.name.is_empty()
            || s.name.len() > 32
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return bad(format!(
                "resource name {:?} must be 1-32 characters of [A-Za-z0-9_-]",
                s.name
            ));
        }
        if !names.insert(s.name.clone()) {
            return bad(format!("resource name {:?} is used twice", s.name));
        }
        let p = s.to_policy();
        if let Some(mib) = s.size_mib {
            if !(1..=MAX_SIZE_MIB).contains(&mib) {
                return bad(format!(
                    "resource {}: size_mib must be 1-{MAX_SIZE_MIB}, not {mib}",
                    s.name
                ));
            }
            if !matches!(s.kind, ResourceKind::Disk | ResourceKind::Scratch) {
                return bad(format!(
                    "resource {}: size_mib is for disks and scratch",
                    s.name
                ));
            }
        }
        if s.port.is_some() && s.kind != ResourceKind::Endpoint {
            return bad(format!("resource {}: port is for endpoints", s.name));
        }
        if s.class.is_some() != (s.kind == ResourceKind::Device) {
            return bad(format!(
                "resource {}: a device needs a class, and only a device has one",
                s.name
            ));
        }
        // Only combinations whose every action this agent can carry out.
        match s.kind {
            ResourceKind::Disk if p.binding == Binding::Type => {
                return bad(format!(
                    "resource {}: a disk bound by type would be replaced by an empty one, \
                     and the guest verifies what it wrote; bind it by identifier or value",
                    s.name
                ));
            }
            ResourceKind::Endpoint
                if p.binding != Binding::Identifier || p.attachment == Attachment::Unattached =>
            {
                return bad(format!(
                    "resource {}: an endpoint keeps its published address, so it is bound \
                     by identifier and fixed or fastened (GR); {} and {} are not supported",
                    s.name, p.binding, p.attachment
                ));
            }
            ResourceKind::Device if p.binding != Binding::Type => {
                return bad(format!(
                    "resource {}: a device is bound by type (any equivalent device will do)",
                    s.name
                ));
            }
            _ => {}
        }
        let kind_key = match (s.kind, s.class.as_deref()) {
            (ResourceKind::Device, Some("entropy")) => "entropy device",
            (ResourceKind::Device, _) => "",
            (ResourceKind::Disk, _) => "disk",
            (ResourceKind::Endpoint, _) => "endpoint",
            (ResourceKind::Scratch, _) => "",
        };
        if !kind_key.is_empty() {
            let n = count.entry(kind_key).or_insert(0);
            *n += 1;
            if *n > 1 {
                return bad(format!("a VM may have at most one {kind_key}"));
            }
        }
    }
    Ok(())
}
