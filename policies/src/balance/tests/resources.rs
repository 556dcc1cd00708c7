//! Targets must be able to bind every resource of the VM they take (DESIGN.md section 4).

use super::{hot_h1, moved, note_texts, Scenario};
use crate::plan::ReasonClass;
use crate::rebinding::{Resource, ResourceKind};

const GIB: u64 = 1 << 30;

/// `hot_h1` with `f` applied to every VM on h1 (w0..w7).
fn hot_h1_with(f: impl Fn(&mut crate::model::Vm)) -> Scenario {
    let mut s = hot_h1();
    for v in s.vms.iter_mut().filter(|v| v.host == "h1") {
        f(v);
    }
    s
}

fn gpu(allow_global_ref: bool) -> Resource {
    Resource {
        allow_global_ref,
        ..Resource::device("accel", "gpu")
    }
}

fn disk(gib: u64, allow_global_ref: bool) -> Resource {
    Resource {
        size_bytes: gib * GIB,
        allow_global_ref,
        ..Resource::new("root", ResourceKind::Disk)
    }
}

#[test]
fn a_target_lacking_the_device_class_is_never_chosen() {
    // Without the table's GR, only h3 (which offers a gpu) can take the VMs, though h2 is
    // as cool.
    let p = hot_h1_with(|v| v.resources = vec![gpu(false)])
        .edit_host("h3", |h| {
            h.device_classes.insert("gpu".into());
        })
        .plan();
    assert_eq!(moved(&p), [("w0", "h1", "h3"), ("w1", "h1", "h3")]);
    assert!(
        p.moves[0].reason.ends_with("; resources: accel RB"),
        "{}",
        p.moves[0].reason
    );

    // No host offers one: nothing moves, and the note says why, host by host.
    let p = hot_h1_with(|v| v.resources = vec![gpu(false)]).plan();
    assert!(p.is_empty(), "{p}");
    let notes = note_texts(&p, ReasonClass::NoTarget);
    assert_eq!(
        notes[0],
        "w0 has no target among 2 host(s) examined: 2 cannot bind its resources (h2: device \
         accel (by type, fixed) cannot be bound on this target: RB impossible (target has no \
         \"gpu\" device, it offers none), GR impossible (the VM's spec forbids a global \
         reference))"
    );
    assert!(notes
        .last()
        .unwrap()
        .starts_with("h1 stays hot at 0.90: none of its VMs"));

    // When the spec allows GR, the device stays on the source behind a global reference.
    let p = hot_h1_with(|v| v.resources = vec![gpu(true)]).plan();
    assert_eq!(moved(&p), [("w0", "h1", "h2"), ("w1", "h1", "h3")]);
    assert!(p.moves[0]
        .reason
        .ends_with("; resources: accel GR (fallback)"));
}

#[test]
fn disk_space_matters_only_when_the_disk_cannot_stay_behind() {
    // By identifier and fastened, a disk's first choice is GR: targets without free disk
    // qualify.
    let p = hot_h1_with(|v| v.resources = vec![disk(8, true)]).plan();
    assert_eq!(moved(&p), [("w0", "h1", "h2"), ("w1", "h1", "h3")]);
    assert!(p.moves[0].reason.ends_with("; resources: root GR"));

    // GR forbidden: MV needs 8 GiB on the target, and neither has it.
    let s = hot_h1_with(|v| v.resources = vec![disk(8, false)])
        .edit_host("h2", |h| h.disk_free_bytes = 2 * GIB);
    let p = s.plan();
    assert!(p.is_empty(), "{p}");
    let note = note_texts(&p, ReasonClass::NoTarget)[0];
    assert!(
        note.contains(
            "2 cannot bind its resources (h2: disk root (by identifier, fastened) cannot be \
             bound on this target: GR impossible (the VM's spec forbids a global reference), MV \
             impossible (needs 8 GiB, target has 2 GiB free))"
        ),
        "{note}"
    );

    // h3 has room for one disk: w0 moves there, and the disk it takes leaves too little for
    // the next, so the plan stops at one move.
    let p = s.edit_host("h3", |h| h.disk_free_bytes = 12 * GIB).plan();
    assert_eq!(moved(&p), [("w0", "h1", "h3")]);
    assert!(p.moves[0]
        .reason
        .ends_with("; resources: root MV (fallback)"));
    assert!(
        note_texts(&p, ReasonClass::NoTarget)[0].contains("(h2: disk root"),
        "{p}"
    );
}

#[test]
fn a_vm_without_resources_ignores_disk_and_devices() {
    // Hosts with no free disk and no devices (Host::new's defaults) take VMs without
    // resources as before.
    let p = hot_h1().plan();
    assert_eq!(moved(&p), [("w0", "h1", "h2"), ("w1", "h1", "h3")]);
    assert!(!p.moves[0].reason.contains("resources:"));
}
