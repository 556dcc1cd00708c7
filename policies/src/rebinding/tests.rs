//! The table, its fallbacks, shared disk, reasons and serde forms.

use super::*;

const GIB: u64 = 1 << 30;

const BINDINGS: [Binding; 3] = [Binding::Identifier, Binding::Value, Binding::Type];
const ATTACHMENTS: [Attachment; 3] = [
    Attachment::Unattached,
    Attachment::Fastened,
    Attachment::Fixed,
];

fn res(name: &str, kind: ResourceKind, b: Binding, a: Attachment, size: u64) -> Resource {
    Resource {
        binding: b,
        attachment: a,
        size_bytes: size,
        ..Resource::new(name, kind)
    }
}

fn no_gr(r: Resource) -> Resource {
    Resource {
        allow_global_ref: false,
        ..r
    }
}

/// A target with `free` bytes of disk and the given device classes.
fn target(free: u64, classes: &[&str]) -> TargetCapabilities {
    TargetCapabilities {
        device_classes: classes.iter().map(|c| c.to_string()).collect(),
        ..TargetCapabilities::new(free)
    }
}

fn actions(choices: &[Choice]) -> Vec<Action> {
    choices.iter().map(|c| c.action).collect()
}

#[test]
fn table_matches_design() {
    use Action::{Copy as CP, GlobalRef as GR, Move as MV, Rebind as RB};
    let expected: [[&[Action]; 3]; 3] = [
        [&[MV, GR], &[GR, MV], &[GR]],
        [&[CP, MV, GR], &[GR, CP], &[GR]],
        [&[RB, GR, CP], &[RB, GR, CP], &[RB, GR]],
    ];
    for (b, row) in BINDINGS.iter().zip(expected) {
        for (a, cell) in ATTACHMENTS.iter().zip(row) {
            assert_eq!(table(*b, *a), cell, "{b}, {a}");
        }
    }
}

#[test]
fn every_cell_takes_its_first_choice_on_a_roomy_target() {
    let roomy = target(100 * GIB, &["gpu"]);
    for kind in ResourceKind::ALL {
        for b in BINDINGS {
            for a in ATTACHMENTS {
                let first = table(b, a)[0];
                let r = Resource {
                    device_class: Some("gpu".into()),
                    ..res("r", kind, b, a, 8 * GIB)
                };
                let got = choose(&r, &roomy);
                if kind == ResourceKind::Device && matches!(first, Action::Move | Action::Copy) {
                    // Host hardware is never moved or copied; the row's GR serves instead.
                    assert_eq!(got.unwrap().action, Action::GlobalRef, "{kind} {b}, {a}");
                    continue;
                }
                let c = got.unwrap();
                assert_eq!(c.action, first, "{kind} {b}, {a}");
                assert_eq!(c.first_choice, first);
                assert!(!c.fallback);
                assert!(c.refused.is_empty());
                let rank = if table(b, a).len() == 1 {
                    "the table's only choice"
                } else {
                    "the table's first choice"
                };
                assert_eq!(c.reason, format!("{kind} r ({b}, {a}): {first}, {rank}"));
            }
        }
    }
}

#[test]
fn defaults_per_kind_and_their_actions() {
    use Attachment::*;
    use Binding::*;
    let cases = [
        (ResourceKind::Disk, Identifier, Fastened, Action::GlobalRef),
        (ResourceKind::Endpoint, Identifier, Fixed, Action::GlobalRef),
        (ResourceKind::Scratch, Value, Unattached, Action::Copy),
        (ResourceKind::Device, Type, Fixed, Action::Rebind),
    ];
    let t = target(100 * GIB, &["entropy"]);
    for (kind, b, a, action) in cases {
        assert_eq!((kind.default_binding(), kind.default_attachment()), (b, a));
        let r = Resource {
            size_bytes: GIB,
            device_class: Some("entropy".into()),
            ..Resource::new("x", kind)
        };
        assert_eq!((r.binding, r.attachment), (b, a));
        assert!(r.allow_global_ref);
        assert_eq!(choose(&r, &t).unwrap().action, action, "{kind}");
    }
    assert_eq!(
        Resource::device("rng", "entropy").device_class.as_deref(),
        Some("entropy")
    );
}

#[test]
fn move_without_disk_space_falls_back_to_global_ref() {
    use Attachment::Unattached;
    let r = res(
        "root",
        ResourceKind::Disk,
        Binding::Identifier,
        Unattached,
        8 * GIB,
    );
    let c = choose(&r, &target(2 * GIB, &[])).unwrap();
    assert_eq!(
        (c.action, c.first_choice, c.fallback),
        (Action::GlobalRef, Action::Move, true)
    );
    assert_eq!(
        c.reason,
        "disk root (by identifier, unattached): MV impossible (needs 8 GiB, target has 2 GiB \
         free), so GR, the first alternative"
    );
    assert_eq!(
        c.refused,
        [Refusal {
            action: Action::Move,
            reason: "needs 8 GiB, target has 2 GiB free".into()
        }]
    );
    // Exactly enough is enough.
    assert_eq!(
        choose(&r, &target(8 * GIB, &[])).unwrap().action,
        Action::Move
    );
}

#[test]
fn fastened_disk_moves_when_no_global_ref_is_possible() {
    let r = Resource {
        size_bytes: 3 * GIB / 2,
        ..Resource::new("root", ResourceKind::Disk)
    };
    let unreachable = TargetCapabilities {
        can_reach_source: false,
        ..target(4 * GIB, &[])
    };
    let c = choose(&r, &unreachable).unwrap();
    assert_eq!((c.action, c.fallback), (Action::Move, true));
    assert_eq!(
        c.reason,
        "disk root (by identifier, fastened): GR impossible (the target cannot reach the \
         source), so MV, the first alternative"
    );

    let no_export = TargetCapabilities {
        source_can_export: false,
        ..target(GIB, &[])
    };
    let e = choose(&r, &no_export).unwrap_err();
    assert_eq!(e.resource, "root");
    assert_eq!(
        e.reason,
        "disk root (by identifier, fastened) cannot be bound on this target: GR impossible \
         (the source cannot export it), MV impossible (needs 1.5 GiB, target has 1 GiB free)"
    );
    assert_eq!(e.to_string(), e.reason);
    assert_eq!(
        e.refused.iter().map(|r| r.action).collect::<Vec<_>>(),
        [Action::GlobalRef, Action::Move]
    );
}

#[test]
fn fixed_endpoint_has_only_global_ref() {
    let r = Resource::new("web", ResourceKind::Endpoint);
    assert_eq!(
        choose(&r, &target(0, &[])).unwrap().action,
        Action::GlobalRef
    );
    let e = choose(&no_gr(r), &target(100 * GIB, &[])).unwrap_err();
    assert_eq!(
        e.reason,
        "endpoint web (by identifier, fixed) cannot be bound on this target: GR impossible \
         (the VM's spec forbids a global reference)"
    );
}

#[test]
fn missing_device_class_falls_back_to_global_ref_when_allowed() {
    let gpu = Resource::device("gpu0", "gpu");
    let t = target(100 * GIB, &["entropy", "clock"]);
    let c = choose(&gpu, &t).unwrap();
    assert_eq!(
        (c.action, c.first_choice, c.fallback),
        (Action::GlobalRef, Action::Rebind, true)
    );
    assert_eq!(
        c.reason,
        "device gpu0 (by type, fixed): RB impossible (target has no \"gpu\" device, it offers \
         clock, entropy), so GR, the first alternative"
    );

    let e = choose(&no_gr(gpu.clone()), &t).unwrap_err();
    assert_eq!(
        e.reason,
        "device gpu0 (by type, fixed) cannot be bound on this target: RB impossible (target has \
         no \"gpu\" device, it offers clock, entropy), GR impossible (the VM's spec forbids a \
         global reference)"
    );
    assert!(eligible(&[no_gr(gpu.clone())], &t).is_err());
    assert!(eligible(&[no_gr(gpu)], &target(0, &["gpu"])).is_ok());

    let bare = Resource::new("dev", ResourceKind::Device);
    assert_eq!(
        feasible(Action::Rebind, &bare, &target(0, &[])),
        Err("the device declares no class to find an equivalent by".into())
    );
    assert_eq!(
        feasible(Action::Rebind, &Resource::device("d", "x"), &target(0, &[])),
        Err("target has no \"x\" device, it offers none".into())
    );
}

#[test]
fn copy_impossible_follows_the_row() {
    use Attachment::{Fastened, Unattached};
    // By value, unattached: CP, then MV (which needs the same space), then GR.
    let cache = res(
        "cache",
        ResourceKind::Scratch,
        Binding::Value,
        Unattached,
        3 * GIB,
    );
    let small = target(GIB, &[]);
    let c = choose(&cache, &small).unwrap();
    assert_eq!(
        (c.action, c.first_choice),
        (Action::GlobalRef, Action::Copy)
    );
    assert_eq!(
        c.reason,
        "scratch cache (by value, unattached): CP impossible (needs 3 GiB, target has 1 GiB \
         free), MV impossible (needs 3 GiB, target has 1 GiB free), so GR, the second \
         alternative"
    );
    let e = choose(&no_gr(cache), &small).unwrap_err();
    assert_eq!(e.refused.len(), 3);
    assert!(e
        .reason
        .contains("GR impossible (the VM's spec forbids a global reference)"));

    // By value, fastened: GR, then CP.
    let data = res(
        "data",
        ResourceKind::Scratch,
        Binding::Value,
        Fastened,
        3 * GIB,
    );
    let no_export = TargetCapabilities {
        source_can_export: false,
        ..target(4 * GIB, &[])
    };
    let c = choose(&data, &no_export).unwrap();
    assert_eq!((c.action, c.fallback), (Action::Copy, true));
    assert!(
        c.reason.ends_with("so CP, the first alternative"),
        "{}",
        c.reason
    );

    // By type, unattached: a disk RB needs a fresh disk's space, then GR, then CP.
    let any = res(
        "any",
        ResourceKind::Disk,
        Binding::Type,
        Unattached,
        2 * GIB,
    );
    let c = choose(&any, &small).unwrap();
    assert_eq!(c.action, Action::GlobalRef);
    assert!(c
        .reason
        .contains("RB impossible (needs 2 GiB for a fresh disk, target has 1 GiB free)"));
    let e = choose(&no_gr(any.clone()), &small).unwrap_err();
    assert!(
        e.reason
            .ends_with("CP impossible (needs 2 GiB, target has 1 GiB free)"),
        "{}",
        e.reason
    );
    // A device's CP is never possible, whatever the space.
    let dev = Resource {
        attachment: Unattached,
        ..no_gr(Resource::device("dev", "gpu"))
    };
    let e = choose(&dev, &target(100 * GIB, &[])).unwrap_err();
    assert!(e
        .reason
        .ends_with("CP impossible (a device is host hardware and cannot be copied)"));
}

#[test]
fn rebind_of_scratch_and_endpoint_needs_nothing() {
    use Attachment::Fixed;
    let scratch = res("tmp", ResourceKind::Scratch, Binding::Type, Fixed, 50 * GIB);
    let ep = res("ep", ResourceKind::Endpoint, Binding::Type, Fixed, 0);
    let bare = TargetCapabilities {
        can_reach_source: false,
        source_can_export: false,
        ..target(0, &[])
    };
    assert_eq!(choose(&scratch, &bare).unwrap().action, Action::Rebind);
    assert_eq!(choose(&ep, &bare).unwrap().action, Action::Rebind);
}

#[test]
fn actions_outside_the_row_are_never_feasible() {
    let disk = Resource::new("root", ResourceKind::Disk); // by identifier, fastened
    let roomy = target(100 * GIB, &[]);
    assert_eq!(
        feasible(Action::Rebind, &disk, &roomy),
        Err("RB is not in the table for by identifier, fastened".into())
    );
    assert!(feasible(Action::Copy, &disk, &roomy).is_err());
    let ep = Resource::new("web", ResourceKind::Endpoint); // fixed
    assert_eq!(
        feasible(Action::Move, &ep, &roomy),
        Err("MV is not in the table for by identifier, fixed".into())
    );
    assert!(feasible(Action::GlobalRef, &ep, &roomy).is_ok());
}

#[test]
fn resources_share_the_targets_free_disk() {
    use Attachment::Unattached;
    let a = res(
        "a",
        ResourceKind::Disk,
        Binding::Identifier,
        Unattached,
        6 * GIB,
    );
    let b = res(
        "b",
        ResourceKind::Disk,
        Binding::Identifier,
        Unattached,
        6 * GIB,
    );
    let t = target(10 * GIB, &[]);
    let choices = choose_all(&[a, b], &t).unwrap();
    assert_eq!(actions(&choices), [Action::Move, Action::GlobalRef]);
    assert_eq!(
        choices[1].reason,
        "disk b (by identifier, unattached): MV impossible (needs 6 GiB, target has 4 GiB free \
         once the VM's other resources take 6 GiB), so GR, the first alternative"
    );
    assert_eq!(choose_all(&[], &t).unwrap(), []);
}

#[test]
fn must_have_data_is_placed_before_optional_moves() {
    use Attachment::Unattached;
    // `root` would rather move but can stay behind; `cache` can only be copied or moved.
    let root = res(
        "root",
        ResourceKind::Disk,
        Binding::Identifier,
        Unattached,
        6 * GIB,
    );
    let cache = no_gr(res(
        "cache",
        ResourceKind::Scratch,
        Binding::Value,
        Unattached,
        6 * GIB,
    ));
    let t = target(10 * GIB, &[]);
    let choices = choose_all(&[root.clone(), cache.clone()], &t).unwrap();
    assert_eq!(
        choices
            .iter()
            .map(|c| c.resource.as_str())
            .collect::<Vec<_>>(),
        ["root", "cache"]
    );
    assert_eq!(actions(&choices), [Action::GlobalRef, Action::Copy]);
    assert!(choices[0]
        .reason
        .contains("once the VM's other resources take 6 GiB"));
    assert!(eligible(&[root, cache.clone()], &t).is_ok());

    // Two must-haves that do not fit together: the second is unbindable.
    let other = Resource {
        name: "other".into(),
        ..cache.clone()
    };
    let e = eligible(&[cache, other], &t).unwrap_err();
    assert_eq!(e.resource, "other");
    assert!(
        e.reason.starts_with(
            "scratch other (by value, unattached) cannot be bound on this target: CP impossible \
             (needs 6 GiB, target has 4 GiB free once the VM's other resources take 6 GiB)"
        ),
        "{}",
        e.reason
    );
}

#[test]
fn a_resource_unbindable_on_its_own_is_reported_first() {
    let ok = Resource::new("web", ResourceKind::Endpoint);
    let gpu = no_gr(Resource::device("gpu0", "gpu"));
    let e = choose_all(&[ok, gpu], &target(100 * GIB, &[])).unwrap_err();
    assert_eq!(e.resource, "gpu0");
    assert_eq!(e.refused.len(), 2);
}

#[test]
fn codes_and_names() {
    let codes: Vec<String> = Action::ALL.iter().map(Action::to_string).collect();
    assert_eq!(codes, ["MV", "CP", "GR", "RB"]);
    for a in Action::ALL {
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            format!("\"{}\"", a.as_str())
        );
    }
    for k in ResourceKind::ALL {
        assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
    }
    assert_eq!(
        serde_json::to_string(&Action::GlobalRef).unwrap(),
        "\"global_ref\""
    );
    assert_eq!(
        serde_json::to_string(&Binding::Identifier).unwrap(),
        "\"identifier\""
    );
    assert_eq!(
        serde_json::to_string(&Attachment::Fastened).unwrap(),
        "\"fastened\""
    );
    assert_eq!(Binding::Type.to_string(), "by type");
}

#[test]
fn serde_round_trips() {
    fn round<T: Serialize + for<'de> Deserialize<'de> + PartialEq + fmt::Debug>(v: T) {
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<T>(&json).unwrap(), v, "{json}");
    }
    for b in BINDINGS {
        round(b);
    }
    for a in ATTACHMENTS {
        round(a);
    }
    for a in Action::ALL {
        round(a);
    }
    for k in ResourceKind::ALL {
        round(k);
    }
    let gpu = no_gr(Resource {
        attachment: Attachment::Fastened,
        ..Resource::device("gpu0", "gpu")
    });
    round(gpu.clone());
    round(Resource {
        size_bytes: 8 * GIB,
        ..Resource::new("root", ResourceKind::Disk)
    });
    let t = target(GIB, &["entropy"]);
    round(t.clone());
    round(choose(&Resource::device("rng", "gpu"), &t).unwrap());
    round(choose(&gpu, &t).unwrap_err());
}

#[test]
fn specs_may_omit_defaults_but_not_misspell_them() {
    let r: Resource = serde_json::from_str(r#"{"name": "cache", "kind": "scratch"}"#).unwrap();
    assert_eq!(r, Resource::new("cache", ResourceKind::Scratch));

    let r: Resource = toml::from_str(
        "name = \"root\"\nkind = \"disk\"\nattachment = \"unattached\"\nsize_bytes = 1024\n",
    )
    .unwrap();
    assert_eq!(
        (r.binding, r.attachment, r.size_bytes),
        (Binding::Identifier, Attachment::Unattached, 1024)
    );

    let err =
        serde_json::from_str::<Resource>(r#"{"name": "r", "kind": "disk", "atachment": "fixed"}"#)
            .unwrap_err();
    assert!(
        err.to_string().contains("unknown field `atachment`"),
        "{err}"
    );

    let t: TargetCapabilities = serde_json::from_str(r#"{"disk_free_bytes": 5}"#).unwrap();
    assert_eq!(t, TargetCapabilities::new(5));
}
