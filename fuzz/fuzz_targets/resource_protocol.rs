//! The resource listener and the resource stream (vmm/src/resources/), on what a peer agent
//! could send on a connection to this host's resource listener.
//!
//! Input: the bytes of one connection, read as `HostResources::serve_conn` reads them: a
//! header line (`read_header_line`, at most 200 bytes) dispatched on its first word.
//! `GODWIT-LINK <vm> <resource>` goes through `read_link_header`; `GODWIT-RES id` starts the
//! resource stream of migration `id`, served by the real `Incoming::receive` (version hello,
//! JSON items, disk chunks, scratch files, commit) into this process's directory in /dev/shm,
//! for a target that expects disk `root` (1 MiB, moved), scratch `cache` (copied) and endpoint
//! `web` (rebound, no data). Properties checked besides "no panic":
//! - a link header that parses, written as `open_link` writes it, parses to the same names;
//! - the target answers only with HelloAck and Ack frames of JSON;
//! - nothing is left but what a commit put in place: the staging directory is gone, and the
//!   directory holds exactly `cache` and `root` after a commit and nothing otherwise (no name
//!   from the stream got a file placed elsewhere in it);
//! - after a commit, the digest the target reports for the disk is the digest of its image.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use godwit_api::{IncomingResource, ResourceAction, ResourceKind, ResourceSpec};
use godwit_fuzz::{Duplex, T_ACK, T_HELLO_ACK};
use godwit_vmm::microvm::block::{image_digest, FileDisk};
use godwit_vmm::resources::endpoint::{read_header_line, read_link_header, LINK_PREFIX};
use godwit_vmm::resources::transfer::{Incoming, RESOURCES_PREFIX};
use libfuzzer_sys::fuzz_target;

/// The longest header line the resource listener reads.
const MAX_HEADER: usize = 200;

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| godwit_fuzz::scratch_dir("resource_protocol"))
}

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let Ok(header) = read_header_line(&mut input, MAX_HEADER) else {
        return;
    };
    let (kind, rest) = header.split_once(' ').unwrap_or((header.as_str(), ""));
    match kind {
        LINK_PREFIX => link(rest),
        RESOURCES_PREFIX if rest.trim() == "id" => transfer(input),
        _ => {}
    }
});

fn link(rest: &str) {
    let Some((vm, resource)) = read_link_header(rest) else {
        return;
    };
    let line = format!("{LINK_PREFIX} {vm} {resource}\n");
    let again = read_header_line(line.as_bytes(), MAX_HEADER).expect("a link header reads");
    let (_, rest) = again.split_once(' ').expect("a link header has a space");
    assert_eq!(read_link_header(rest), Some((vm, resource)));
}

fn resources() -> Vec<IncomingResource> {
    let resource = |name: &str, kind, size_mib, action| {
        let mut spec = ResourceSpec::new(name, kind);
        spec.size_mib = size_mib;
        IncomingResource {
            spec,
            action,
            remote: None,
            remote_host: None,
            address: None,
        }
    };
    vec![
        resource("root", ResourceKind::Disk, Some(1), ResourceAction::Move),
        resource(
            "cache",
            ResourceKind::Scratch,
            Some(1),
            ResourceAction::Copy,
        ),
        resource("web", ResourceKind::Endpoint, None, ResourceAction::Rebind),
    ]
}

fn transfer(stream: &[u8]) {
    let dir = dir();
    let incoming = Incoming::new("id", "vm", "a", resources(), Vec::new(), dir.to_owned());
    let mut conn = Duplex::new(stream);
    incoming.receive(&mut conn);
    let answers = answers(&conn.output);

    let mut left: Vec<String> = std::fs::read_dir(dir)
        .expect("the scratch directory lists")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    left.sort();
    if incoming.committed() {
        assert_eq!(left, ["cache", "root"], "not what a commit places");
        let ack = answers
            .iter()
            .find(|a| a["ok"] == true)
            .expect("a commit answered ok");
        let digest = ack["digests"]["root"]
            .as_str()
            .expect("the disk's digest in the answer");
        let disk = FileDisk::open(&dir.join("root/disk.img")).expect("the committed disk opens");
        assert_eq!(image_digest(&disk).expect("the disk reads"), digest);
    } else {
        assert!(left.is_empty(), "left behind without a commit: {left:?}");
    }
    for name in left {
        std::fs::remove_dir_all(dir.join(name)).expect("a committed resource is removed");
    }
}

/// The target's answers: each a HelloAck or an Ack frame of JSON.
fn answers(mut output: &[u8]) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    while let Some((&ty, rest)) = output.split_first() {
        let (len, rest) = rest.split_first_chunk::<4>().expect("a whole frame header");
        let (payload, rest) = rest
            .split_at_checked(u32::from_le_bytes(*len) as usize)
            .expect("a whole frame");
        assert!(
            ty == T_ACK || ty == T_HELLO_ACK,
            "the target sent frame type {ty}"
        );
        all.push(serde_json::from_slice(payload).expect("an answer of JSON"));
        output = rest;
    }
    all
}
