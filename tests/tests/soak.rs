//! The soak in CI: two self-verifying guests moved back and forth between two real agents,
//! 50 migrations, each guest cycling through every mode, with and without compression, every
//! fifth move under a bandwidth cap; every migration is checked (completed, digests equal, the
//! VM on exactly one host, its guest's verifier at 0 errors and going on). `godwit-bench soak`
//! runs the same loop 1,000 times.

use std::time::Instant;

use godwit_tests::soak::{self, Host};
use godwit_tests::{kvm_available, Agent};

const MIGRATIONS: usize = 50;
const MEMORY_MIB: u64 = 128;
const RATE_MIB_S: f64 = 16.0;

#[test]
fn fifty_checked_migrations_in_every_mode() {
    if !kvm_available("fifty_checked_migrations_in_every_mode") {
        return;
    }
    let a = Agent::start("soak-a").unwrap();
    let b = Agent::start("soak-b").unwrap();
    let hosts = [
        Host {
            name: &a.name,
            api: &a,
        },
        Host {
            name: &b.name,
            api: &b,
        },
    ];
    let vms: Vec<String> = (0..2).map(|k| format!("soak-{k}")).collect();
    for (k, name) in vms.iter().enumerate() {
        soak::create(hosts[0], &soak::dirty_vm(name, MEMORY_MIB, RATE_MIB_S, k)).unwrap();
    }
    let t = Instant::now();
    let records = soak::run(hosts, &vms, MIGRATIONS, |r| {
        eprintln!(
            "migration {} of {} to {} ({}): {:.0} ms, downtime {:.1} ms",
            r.n,
            r.vm,
            r.to,
            r.step,
            r.info.total_ms,
            r.info.downtime_ms.unwrap_or_default()
        );
    })
    .unwrap_or_else(|v| panic!("{v}"));
    eprintln!(
        "{MIGRATIONS} migrations in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(records.len(), MIGRATIONS);
    for name in &vms {
        for mode in soak::MODES {
            assert!(
                records.iter().any(|r| &r.vm == name && r.step.mode == mode),
                "{name} never moved by {mode:?}"
            );
        }
    }
    // Each VM ends where its moves took it (25 each: on b), and only there.
    for name in &vms {
        let moves = records.iter().filter(|r| &r.vm == name).count();
        let (here, there) = if moves % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let vm = here.vm(name).unwrap();
        assert_eq!(vm.guest.verify_errors, 0, "{vm:?}");
        let (status, body) = there
            .request(reqwest::Method::GET, &format!("/v1/vms/{name}"), None)
            .unwrap();
        assert_eq!(status, 404, "{name} on {}: {body}", there.name);
    }
}
