//! Eight migrations at once across four real agents: two self-verifying guests on each agent,
//! all eight asked to move at the same moment (each to another agent, every mode twice, with
//! and without compression), and every one checked as the soak checks a migration (completed,
//! digests equal, the VM on exactly one host, its guest's verifier at 0 errors and going on).

use godwit_tests::soak::{self, Host, Move, Step};
use godwit_tests::{kvm_available, Agent};
use reqwest::Method;

const AGENTS: usize = 4;
const VMS: usize = 8;
const MEMORY_MIB: u64 = 64;
const RATE_MIB_S: f64 = 8.0;

#[test]
fn eight_migrations_at_once_across_four_agents() {
    if !kvm_available("eight_migrations_at_once_across_four_agents") {
        return;
    }
    let agents: Vec<Agent> = (0..AGENTS)
        .map(|i| Agent::start(&format!("many-{i}")).unwrap())
        .collect();
    let hosts: Vec<Host> = agents
        .iter()
        .map(|a| Host {
            name: &a.name,
            api: a,
        })
        .collect();
    // VM k starts on agent k % 4 and moves 1 (k < 4) or 2 (k >= 4) agents on: every agent is
    // the source of two migrations and the target of two.
    let placement: Vec<(String, usize, usize)> = (0..VMS)
        .map(|k| {
            let from = k % AGENTS;
            (format!("many-{k}"), from, (from + 1 + k / AGENTS) % AGENTS)
        })
        .collect();
    for (k, (name, from, _)) in placement.iter().enumerate() {
        soak::create(
            hosts[*from],
            &soak::dirty_vm(name, MEMORY_MIB, RATE_MIB_S, k),
        )
        .unwrap();
    }

    // Each migration is asked for by a thread of its own, all released together.
    let go = std::sync::Barrier::new(VMS);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = placement
            .iter()
            .enumerate()
            .map(|(k, (name, from, to))| {
                let m = Move {
                    n: k,
                    vm: name.clone(),
                    src: hosts[*from],
                    dst: hosts[*to],
                    step: Step::nth(k),
                };
                let go = &go;
                s.spawn(move || {
                    go.wait();
                    m.start()?.check()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut failed = Vec::new();
    for result in results {
        match result {
            Ok(r) => eprintln!(
                "{} {} -> {} ({}): {:.0} ms, downtime {:.1} ms",
                r.vm,
                r.from,
                r.to,
                r.step,
                r.info.total_ms,
                r.info.downtime_ms.unwrap_or_default()
            ),
            Err(v) => failed.push(v.to_string()),
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));

    // Each VM is on its target and on no other agent.
    for (name, _, to) in &placement {
        for (i, agent) in agents.iter().enumerate() {
            let (status, body) = agent
                .request(Method::GET, &format!("/v1/vms/{name}"), None)
                .unwrap();
            let want = if i == *to { 200 } else { 404 };
            assert_eq!(status, want, "{name} on {}: {body}", agent.name);
        }
        let vm = agents[*to].vm(name).unwrap();
        assert_eq!(vm.guest.verify_errors, 0, "{vm:?}");
    }
}
