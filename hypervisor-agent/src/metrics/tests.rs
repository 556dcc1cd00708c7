//! The registry's own tests: names, HELP, exact values, and every family moved by a path.

use std::collections::BTreeMap;

use super::*;
use godwit_api::{FaultStats, MigrationStatus, PageCounts};

fn info(vm: &str, mode: MigrationMode, phase: MigrationPhase) -> MigrationInfo {
    MigrationInfo {
        id: "0".repeat(32),
        vm: vm.into(),
        source: "a".into(),
        target: "b".into(),
        mode,
        status: MigrationStatus::Running,
        phase,
        error: None,
        switched_to_postcopy: false,
        postcopy_pauses: 0,
        orphaned: false,
        started_unix_ms: 0,
        setup_ms: 1.0,
        total_ms: 1500.0,
        downtime_ms: Some(40.0),
        downtime: Default::default(),
        memory_bytes: 1 << 20,
        rounds: 3,
        pages: PageCounts {
            zero_pages: 200,
            raw_pages: 50,
            compressed_pages: 6,
            raw_bytes: 50 * 4096,
            compressed_bytes: 900,
            wire_bytes: 300_000,
        },
        precopy_bytes: 250_000,
        downtime_bytes: 50_000,
        postcopy_bytes: 0,
        dirty_rate_bytes_s: 1e6,
        throughput_bytes_s: 2e5,
        remaining_bytes: 8192,
        faults: FaultStats::default(),
        outcome: None,
        source_digest: None,
        target_digest: None,
        resources: Vec::new(),
        encrypted: false,
    }
}

/// One value per sample line, keyed `name{labels}` with the labels sorted by name.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((key(k), v.parse().ok()?))
        })
        .collect()
}

/// `name{b="1",a="2"}` as `name{a="2",b="1"}`.
fn key(series: &str) -> String {
    match series.split_once('{') {
        Some((name, labels)) => {
            let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
            labels.sort();
            format!("{name}{{{}}}", labels.join(","))
        }
        None => series.to_owned(),
    }
}

/// Metric families (HELP lines) and, per family, whether any sample is non-zero.
fn families(text: &str) -> BTreeMap<String, bool> {
    let mut out: BTreeMap<String, bool> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .map(|l| (l.split(' ').next().unwrap_or("").to_owned(), false))
        .collect();
    for (series, v) in samples(text) {
        let name = series.split('{').next().unwrap_or("");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| out.contains_key(*f)))
            .unwrap_or(name);
        if v != 0.0 {
            out.insert(family.to_owned(), true);
        }
    }
    out
}

#[test]
fn renders_with_help_prefix_and_host() {
    let m = Metrics::new("h1");
    m.vm_cpu_seconds.with_label_values(&["a"]).inc_by(1.5);
    let text = m.render();
    assert!(text.contains("# HELP godwit_vm_cpu_seconds_total"));
    assert!(text.contains("godwit_vm_cpu_seconds_total{vm=\"a\",host=\"h1\"} 1.5"));
    assert!(text.contains("godwit_agent_up{host=\"h1\"} 1"));
    m.forget_vm("a");
    assert!(!m.render().contains("vm=\"a\""));
}

#[test]
fn names_follow_prometheus_practice() {
    let m = Metrics::new("h");
    m.set_vm("v", VmState::Running, 1, 0.0, false);
    m.migration_started("x", "v", Role::Source, MigrationMode::Precopy);
    m.migration_ended(
        "x",
        &info("v", MigrationMode::Precopy, MigrationPhase::Done),
        Outcome::Failed("timeout"),
    );
    let text = m.render();
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = line.split_once(' ').unwrap();
        assert!(name.starts_with("godwit_"), "{name}");
        assert_eq!(
            kind == "counter",
            name.ends_with("_total"),
            "{name} is a {kind}: counters and only counters end in _total"
        );
        for unit in ["_ms", "milliseconds", "_mib", "kilobytes", "_percent"] {
            assert!(!name.contains(unit), "{name} is not in base units");
        }
        let help = format!("# HELP {name} ");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&help) && l.len() > help.len() + 10),
            "{name} has no HELP text"
        );
    }
    assert!(!text.contains("migration_id") && !text.contains(&"0".repeat(32)));
}

/// Every family this registry exports is moved by an update path the agent calls: after
/// the paths have run, each family has a non-zero sample. (The end-to-end test checks
/// the same on a real agent.)
#[test]
fn every_family_is_updated_by_some_path() {
    let m = Metrics::new("h");
    // Manager::new, insert, sample.
    m.vms.set(1.0);
    m.host_cores.set(4.0);
    m.host_memory_bytes.set(1e9);
    m.host_vm_memory_bytes.set(1e8);
    m.host_vms_cpu_load.set(0.25);
    m.host_cpu_busy.set(0.3);
    m.vm_cpu_seconds.with_label_values(&["v"]).inc_by(2.0);
    m.vm_memory_bytes.with_label_values(&["v"]).set(1e8);
    m.set_vm("v", VmState::Running, 2, 4096.0, true);
    m.snapshots.with_label_values(&["snapshot", "ok"]).inc();
    m.api_requests.with_label_values(&["GET", "2xx"]).inc();
    // Migration hooks: a source that runs a sample and completes, a target that completes
    // with faults, one that fails.
    m.migration_started("s", "v", Role::Source, MigrationMode::Precopy);
    let mut counts = InProgress::default();
    counts.count(Role::Source, MigrationPhase::Precopy);
    m.set_in_progress(&counts);
    let running = info("v", MigrationMode::Precopy, MigrationPhase::Precopy);
    std::thread::sleep(std::time::Duration::from_millis(250));
    m.migration_progress("s", &running);
    let before_end = m.render();
    assert!(
        before_end.contains(
            "godwit_migration_phase{phase=\"precopy\",role=\"source\",vm=\"v\",host=\"h\"} 1"
        ),
        "{before_end}"
    );
    let live = families(&before_end);
    m.migration_ended("s", &running, Outcome::Completed);
    m.migration_started("t", "w", Role::Target, MigrationMode::Postcopy);
    let mut done = info("w", MigrationMode::Postcopy, MigrationPhase::Done);
    let bounds = page_transfer::progress::LATENCY_BOUNDS_US;
    let mut counts = vec![0; bounds.len() + 1];
    counts[2] = 3;
    counts[bounds.len()] = 1;
    done.faults = FaultStats {
        faults: 4,
        requests: 4,
        latency_buckets_us: bounds.to_vec(),
        latency_counts: counts,
        latency_sum_us: 400_150.0,
        ..Default::default()
    };
    m.migration_ended("t", &done, Outcome::Completed);
    m.migration_started("f", "v", Role::Source, MigrationMode::Auto);
    m.migration_ended("f", &running, Outcome::Failed("not_converged"));
    // A migration's resource actions (source side, once they ended).
    m.resource_actions(&[godwit_api::ResourceMigration {
        name: "root".into(),
        kind: godwit_api::ResourceKind::Disk,
        action: godwit_api::ResourceAction::Move,
        first_choice: godwit_api::ResourceAction::Move,
        fallback: false,
        reason: String::new(),
        status: godwit_api::ResourceStatus::Done,
        detail: String::new(),
        bytes: 4096,
        duration_ms: 12.0,
        error: None,
    }]);
    let text = m.render();
    let mut fams = families(&text);
    // The live gauges of a running migration are dropped when it ends.
    for live_only in [
        "godwit_migration_phase",
        "godwit_migration_remaining_bytes",
        "godwit_migration_throughput_bytes_per_second",
        "godwit_migrations_in_progress",
    ] {
        assert_eq!(
            live.get(live_only),
            Some(&true),
            "{live_only} not set while running"
        );
        fams.insert(live_only.into(), true);
    }
    let idle: Vec<_> = fams.iter().filter(|(_, moved)| !**moved).collect();
    assert!(
        idle.is_empty(),
        "families no path updated: {idle:?}\n{text}"
    );

    let s = samples(&text);
    let get = |k: &str| s.get(&key(k)).copied().unwrap_or(f64::NAN);
    assert_eq!(
        get("godwit_migration_pages_total{kind=\"zero\",mode=\"precopy\",host=\"h\"}"),
        200.0
    );
    assert_eq!(
        get("godwit_migration_wire_bytes_total{mode=\"precopy\",stage=\"downtime\",host=\"h\"}"),
        50_000.0
    );
    // The failed migration sent the same counters again, under auto.
    assert_eq!(
        get("godwit_migration_payload_bytes_total{kind=\"compressed\",mode=\"auto\",host=\"h\"}"),
        900.0
    );
    assert_eq!(
        get("godwit_migration_downtime_seconds_sum{mode=\"precopy\",host=\"h\"}"),
        0.04
    );
    assert_eq!(
        get("godwit_migration_duration_seconds_count{mode=\"precopy\",host=\"h\"}"),
        1.0
    );
    assert_eq!(
        get("godwit_migration_duration_seconds_count{mode=\"auto\",host=\"h\"}"),
        0.0
    );
    assert_eq!(
        get("godwit_migrations_total{mode=\"auto\",outcome=\"failed\",role=\"source\",host=\"h\"}"),
        1.0
    );
    assert_eq!(get("godwit_migration_failures_total{mode=\"auto\",reason=\"not_converged\",role=\"source\",host=\"h\"}"), 1.0);
    assert_eq!(
        get("godwit_migration_postcopy_faults_total{mode=\"postcopy\",host=\"h\"}"),
        4.0
    );
    assert_eq!(get("godwit_migration_postcopy_fault_latency_seconds_bucket{mode=\"postcopy\",le=\"0.0001\",host=\"h\"}"), 3.0);
    assert_eq!(get("godwit_migration_postcopy_fault_latency_seconds_bucket{mode=\"postcopy\",le=\"0.25\",host=\"h\"}"), 3.0);
    assert_eq!(get("godwit_migration_postcopy_fault_latency_seconds_bucket{mode=\"postcopy\",le=\"+Inf\",host=\"h\"}"), 4.0);
    assert_eq!(
        get("godwit_migration_postcopy_fault_latency_seconds_count{mode=\"postcopy\",host=\"h\"}"),
        4.0
    );
    assert!(
        (get("godwit_migration_postcopy_fault_latency_seconds_sum{mode=\"postcopy\",host=\"h\"}")
            - 0.40015)
            .abs()
            < 1e-9
    );
    assert_eq!(
        get("godwit_vm_state{state=\"running\",vm=\"v\",host=\"h\"}"),
        1.0
    );
    assert_eq!(
        get("godwit_vm_state{state=\"paused\",vm=\"v\",host=\"h\"}"),
        0.0
    );
    // Ending twice, or a sample after the end, changes nothing.
    m.migration_ended("s", &running, Outcome::Completed);
    m.migration_progress("s", &running);
    assert_eq!(m.render(), text);
}
