//! The client against a real qemu-nbd, and against a scripted server for the replies a real
//! one never sends.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::thread;

use super::*;
use crate::proto::{Command, INFO_BLOCK_SIZE, OPT_GO, REP_ACK, REP_INFO, TRANS_HAS_FLAGS};
use crate::testutil::*;
use crate::Export;

const TIMEOUT: Duration = Duration::from_secs(5);
const DISK_LEN: usize = 16 * 1024 * 1024;
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A 16 MiB pattern disk served by qemu-nbd.
fn served_disk() -> (tempfile::NamedTempFile, Export) {
    let disk = pattern_disk(DISK_LEN);
    let export = Export::start(disk.path(), LOCALHOST, "disk").unwrap();
    (disk, export)
}

fn connect(export: &Export) -> NbdClient {
    NbdClient::connect(&export.addr().to_string(), export.export_name(), TIMEOUT).unwrap()
}

fn on_disk(disk: &tempfile::NamedTempFile, offset: u64, len: usize) -> Vec<u8> {
    let bytes = std::fs::read(disk.path()).unwrap();
    bytes[offset as usize..offset as usize + len].to_vec()
}

#[test]
fn reads_and_writes_round_trip_through_qemu_nbd() {
    if !qemu_nbd_or_skip("reads_and_writes_round_trip_through_qemu_nbd") {
        return;
    }
    let (disk, export) = served_disk();
    let client = connect(&export);
    assert_eq!(client.size(), DISK_LEN as u64);
    assert!(!client.read_only());

    let size = DISK_LEN as u64;
    for (offset, len) in [
        (0, 1),
        (1, 513),
        (4095, 4099),
        (1024 * 1024 + 7, 65_537),
        (3 * 1024 * 1024 + 1, 1024 * 1024 + 3),
        (size - 13, 13),
    ] {
        let mut buf = vec![0u8; len];
        client.read_at(offset, &mut buf).unwrap();
        assert!(buf == pattern(offset, len), "read at {offset} len {len}");
    }

    let writes: [(u64, Vec<u8>); 3] = [
        (3, b"godwit".to_vec()),
        (8191, vec![0xa5; 10_000]),
        (size - 5, b"tail!".to_vec()),
    ];
    for (offset, data) in &writes {
        client.write_at(*offset, data).unwrap();
    }
    client.flush().unwrap();
    for (offset, data) in &writes {
        assert_eq!(
            &on_disk(&disk, *offset, data.len()),
            data,
            "file at {offset}"
        );
        let mut back = vec![0u8; data.len()];
        client.read_at(*offset, &mut back).unwrap();
        assert_eq!(&back, data, "read back at {offset}");
    }
    // Bytes around the writes are untouched.
    assert_eq!(on_disk(&disk, 0, 3), pattern(0, 3));
    assert_eq!(on_disk(&disk, 9, 8182), pattern(9, 8182));
    client.disconnect();
}

#[test]
fn large_requests_are_split() {
    if !qemu_nbd_or_skip("large_requests_are_split") {
        return;
    }
    let (disk, export) = served_disk();
    let limit = 64 * 1024;
    let client = NbdClient::connect_with_limit(
        &export.addr().to_string(),
        export.export_name(),
        TIMEOUT,
        limit,
    )
    .unwrap();

    let offset = 12_345;
    let data = Rng::new(7).bytes(1024 * 1024 + 333);
    client.write_at(offset, &data).unwrap();
    let requests = data.len().div_ceil(limit as usize) as u64;
    assert_eq!(client.requests_sent(), requests);

    let mut back = vec![0u8; data.len()];
    client.read_at(offset, &mut back).unwrap();
    assert_eq!(client.requests_sent(), 2 * requests);
    assert!(back == data);

    client.flush().unwrap();
    assert!(on_disk(&disk, offset, data.len()) == data);
}

#[test]
fn out_of_range_requests_fail_locally_and_the_connection_survives() {
    if !qemu_nbd_or_skip("out_of_range_requests_fail_locally_and_the_connection_survives") {
        return;
    }
    let (_disk, export) = served_disk();
    let client = connect(&export);
    let size = client.size();

    let mut buf = [0u8; 20];
    let err = client.read_at(size - 10, &mut buf).unwrap_err();
    assert!(matches!(err, NbdError::OutOfRange { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "Cannot read 20 bytes at offset {}: the export is only {size} bytes",
            size - 10
        )
    );
    let err = client.read_at(u64::MAX, &mut buf[..1]).unwrap_err();
    assert!(matches!(err, NbdError::OutOfRange { .. }), "{err:?}");
    let err = client.write_at(size, b"x").unwrap_err();
    assert!(matches!(err, NbdError::OutOfRange { .. }), "{err:?}");
    assert_eq!(client.requests_sent(), 0);

    client.read_at(size - 20, &mut buf).unwrap();
    assert_eq!(buf.to_vec(), pattern(size - 20, 20));
}

#[test]
fn two_clients_and_shared_clients_work_at_once() {
    if !qemu_nbd_or_skip("two_clients_and_shared_clients_work_at_once") {
        return;
    }
    let (disk, export) = served_disk();
    let first = Arc::new(connect(&export));
    let second = connect(&export);

    first.write_at(100, b"from the first").unwrap();
    first.flush().unwrap();
    let mut seen = [0u8; 14];
    second.read_at(100, &mut seen).unwrap();
    assert_eq!(&seen, b"from the first");

    // Four threads share the first client while the second keeps reading.
    let writers: Vec<_> = (0..4u64)
        .map(|i| {
            let client = Arc::clone(&first);
            thread::spawn(move || {
                let offset = (i + 1) * 1024 * 1024;
                let data = Rng::new(i + 1).bytes(300_000);
                client.write_at(offset, &data).unwrap();
                let mut back = vec![0u8; data.len()];
                client.read_at(offset, &mut back).unwrap();
                assert!(back == data);
                (offset, data)
            })
        })
        .collect();
    for _ in 0..20 {
        let mut buf = vec![0u8; 4096];
        second.read_at(8 * 1024 * 1024, &mut buf).unwrap();
        assert!(buf == pattern(8 * 1024 * 1024, 4096));
    }
    first.flush().unwrap();
    for writer in writers {
        let (offset, data) = writer.join().unwrap();
        assert!(
            on_disk(&disk, offset, data.len()) == data,
            "file at {offset}"
        );
    }
}

#[test]
fn an_unknown_export_name_is_refused_by_qemu_nbd() {
    if !qemu_nbd_or_skip("an_unknown_export_name_is_refused_by_qemu_nbd") {
        return;
    }
    let (_disk, export) = served_disk();
    let err = NbdClient::connect(&export.addr().to_string(), "nope", TIMEOUT).unwrap_err();
    assert!(matches!(err, NbdError::Handshake(_)), "{err:?}");
    assert!(
        err.to_string().contains("no export named \"nope\""),
        "{err}"
    );
}

#[test]
fn connecting_to_a_closed_port_is_a_connect_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let err = NbdClient::connect(&addr, "disk", TIMEOUT).unwrap_err();
    assert!(matches!(err, NbdError::Connect { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("Cannot connect to the NBD server at {addr}")
    );
}

#[test]
fn a_server_errno_fails_one_request_only() {
    let (addr, server) = fake_server(|s| {
        serve_go(s, 1 << 20, TRANS_HAS_FLAGS | TRANS_SEND_FLUSH)?;
        let mut commands = Vec::new();
        let first = read_request(s)?;
        simple_reply(s, 5, first.cookie, &[])?;
        commands.push(first.command);
        let second = read_request(s)?;
        simple_reply(s, 0, second.cookie, &[7u8; 16])?;
        commands.push(second.command);
        let flush = read_request(s)?;
        simple_reply(s, 0, flush.cookie, &[])?;
        commands.push(flush.command);
        commands.push(read_request(s)?.command);
        Ok(commands)
    });
    let client = NbdClient::connect(&addr, "disk", TIMEOUT).unwrap();
    let mut buf = [0u8; 16];
    let err = client.read_at(4096, &mut buf).unwrap_err();
    assert_eq!(
        err.to_string(),
        "The NBD server failed read of 16 bytes at offset 4096 with EIO (5)"
    );
    client.read_at(4096, &mut buf).unwrap();
    assert_eq!(buf, [7u8; 16]);
    client.flush().unwrap();
    drop(client);
    let commands = server.join().unwrap().unwrap();
    let expected = [
        Command::Read,
        Command::Read,
        Command::Flush,
        Command::Disconnect,
    ];
    assert_eq!(commands, expected.map(|c| c as u16));
}

#[test]
fn a_reply_for_another_request_breaks_the_connection() {
    let (addr, server) = fake_server(|s| {
        serve_go(s, 1 << 20, TRANS_HAS_FLAGS)?;
        let request = read_request(s)?;
        simple_reply(s, 0, request.cookie + 1, &[0u8; 512])?;
        drain(s)
    });
    let client = NbdClient::connect(&addr, "disk", TIMEOUT).unwrap();
    let mut buf = [0u8; 512];
    let err = client.read_at(0, &mut buf).unwrap_err();
    assert!(matches!(err, NbdError::Protocol(_)), "{err:?}");
    assert!(err.to_string().contains("cookie"), "{err}");
    let err = client.read_at(0, &mut buf).unwrap_err();
    assert!(matches!(err, NbdError::Broken), "{err:?}");
    drop(client);
    server.join().unwrap().unwrap();
}

#[test]
fn garbage_instead_of_a_reply_is_a_protocol_error() {
    for seed in 1..=8 {
        let (addr, server) = fake_server(move |s| {
            serve_go(s, 1 << 20, TRANS_HAS_FLAGS)?;
            read_request(s)?;
            s.write_all(&Rng::new(seed).bytes(64))?;
            drain(s)
        });
        let client = NbdClient::connect(&addr, "disk", TIMEOUT).unwrap();
        let mut buf = [0u8; 32];
        let err = client.read_at(0, &mut buf).unwrap_err();
        assert!(matches!(err, NbdError::Protocol(_)), "{err:?}");
        drop(client);
        server.join().unwrap().unwrap();
    }
}

#[test]
fn the_servers_maximum_payload_is_honoured() {
    let (addr, server) = fake_server(|s| {
        crate::testutil::greet(s, crate::proto::FLAG_FIXED_NEWSTYLE)?;
        read_option(s)?;
        let mut block_size = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for value in [1u32, 4096, 4096] {
            block_size.extend_from_slice(&value.to_be_bytes());
        }
        option_reply(s, OPT_GO, REP_INFO, &block_size)?;
        option_reply(s, OPT_GO, REP_INFO, &info_export(1 << 20, TRANS_HAS_FLAGS))?;
        option_reply(s, OPT_GO, REP_ACK, &[])?;
        let mut lengths = Vec::new();
        loop {
            let request = read_request(s)?;
            if request.command == Command::Disconnect as u16 {
                return Ok(lengths);
            }
            lengths.push(request.len);
            simple_reply(s, 0, request.cookie, &[])?;
        }
    });
    let client = NbdClient::connect(&addr, "disk", TIMEOUT).unwrap();
    client.write_at(0, &[1u8; 10_000]).unwrap();
    client.disconnect();
    assert_eq!(server.join().unwrap().unwrap(), [4096, 4096, 1808]);
}

#[test]
fn the_client_is_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<NbdClient>();
}
