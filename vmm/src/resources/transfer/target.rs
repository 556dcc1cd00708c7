//! The target side of a migration's resource data: staging, verifying and committing what
//! the source sends, and binding the arriving VM's resources on this host.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use godwit_api::{IncomingResource, ResourceAction, ResourceKind};

use super::*;
use crate::microvm::block::{self, BlockBackend, FileDisk};
use crate::microvm::stream::Stream;
use crate::resources::{Bound, BoundState, HostResources, VmResources};
/// What the target knows of an incoming migration's resources.
#[derive(Debug)]
pub struct Incoming {
    pub id: String,
    pub vm: String,
    /// The host the migration was announced from: the only one whose resource data is taken.
    pub source: String,
    pub resources: Vec<IncomingResource>,
    /// Agents the VM ran on before (API URLs).
    pub previous_hosts: Vec<String>,
    dir: PathBuf,
    staging: PathBuf,
    state: Mutex<IncomingState>,
}

#[derive(Debug, Default)]
struct IncomingState {
    committed: bool,
    /// Directories moved into place at commit (removed again if the VM never starts here).
    placed: Vec<PathBuf>,
    bytes: u64,
}

impl Incoming {
    pub fn new(
        id: &str,
        vm: &str,
        source: &str,
        resources: Vec<IncomingResource>,
        previous_hosts: Vec<String>,
        dir: PathBuf,
    ) -> Self {
        let staging = dir.join(format!(".incoming-{id}"));
        Incoming {
            id: id.to_owned(),
            vm: vm.to_owned(),
            source: source.to_owned(),
            resources,
            previous_hosts,
            dir,
            staging,
            state: Mutex::new(IncomingState::default()),
        }
    }

    /// Whether any resource's data comes over the resource connection.
    pub fn expects_data(&self) -> bool {
        self.resources
            .iter()
            .any(|r| carries_data(r.spec.kind, r.action))
    }

    pub fn committed(&self) -> bool {
        lock(&self.state).committed
    }

    /// Serves the source's resource connection to the end. `conn` is any byte stream: the
    /// resource listener hands over a [`Channel`](page_transfer::channel::Channel), set to
    /// TCP_NODELAY when it was accepted; the fuzz target (`fuzz/`) an in-memory one.
    pub fn receive(&self, mut conn: impl Read + Write) {
        let result = self.receive_inner(&mut conn).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(e.kind(), "the source closed the resource connection early")
            } else {
                e
            }
        });
        if let Err(e) = &result {
            tracing::warn!(vm = %self.vm, error = %e, "incoming resource data failed");
            let _ = write_json(
                &mut conn,
                T_ACK,
                &Ack {
                    ok: false,
                    error: Some(e.to_string()),
                    digests: BTreeMap::new(),
                },
            );
        }
        let _ = std::fs::remove_dir_all(&self.staging);
    }

    fn receive_inner(&self, conn: &mut (impl Read + Write)) -> io::Result<()> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
        let (ty, payload) = read_frame(conn)?;
        if ty != T_HELLO {
            return Err(bad(format!(
                "the resource stream starts with frame type {ty}, not a hello"
            )));
        }
        let hello: Hello = parse(&payload, "hello")?;
        let version = negotiate(hello.min_version, hello.version).map_err(bad)?;
        write_json(conn, T_HELLO_ACK, &HelloAck { version })?;
        std::fs::create_dir_all(&self.staging)?;
        let mut disks: BTreeMap<String, (FileDisk, Vec<u64>)> = BTreeMap::new();
        let mut file: Option<(std::fs::File, blake3::Hasher, String, u64, u64)> = None;
        let mut mismatches = Vec::new();
        loop {
            let (ty, payload) = read_frame(conn)?;
            match ty {
                T_ITEM => {
                    let item: ItemBegin = parse(&payload, "item")?;
                    let expected = self
                        .resources
                        .iter()
                        .find(|r| {
                            r.spec.name == item.name
                                && r.spec.kind == item.kind
                                && carries_data(r.spec.kind, r.action)
                        })
                        .ok_or_else(|| bad(format!("unexpected resource {:?}", item.name)))?;
                    let dir = self.staging.join(&item.name);
                    std::fs::create_dir_all(&dir)?;
                    if item.kind == ResourceKind::Disk {
                        if item.bytes != expected.spec.size_bytes() {
                            return Err(bad(format!(
                                "disk {} is {} bytes, {} were announced",
                                item.name,
                                item.bytes,
                                expected.spec.size_bytes()
                            )));
                        }
                        let disk = FileDisk::create(&dir.join("disk.img"), item.bytes)?;
                        let zero = block::block_hash(&[0u8; BLOCK_SIZE as usize]);
                        let hashes = vec![zero; disk.blocks() as usize];
                        disks.insert(item.name, (disk, hashes));
                    }
                }
                T_CHUNK => {
                    let c = parse_chunk(&payload)?;
                    let (disk, hashes) = disks
                        .get_mut(c.name)
                        .ok_or_else(|| bad(format!("chunk for unknown disk {:?}", c.name)))?;
                    let end = c.block.checked_add(u64::from(c.count));
                    if end.is_none_or(|end| end > disk.blocks()) {
                        return Err(bad(format!("chunk past the end of disk {}", c.name)));
                    }
                    let zeros;
                    let data = match c.data {
                        Some(d) => d,
                        None => {
                            zeros = vec![0u8; (u64::from(c.count) * BLOCK_SIZE) as usize];
                            &zeros
                        }
                    };
                    disk.write_raw(c.block, data)?;
                    for (i, b) in data.chunks(BLOCK_SIZE as usize).enumerate() {
                        hashes[c.block as usize + i] = block::block_hash(b);
                    }
                    lock(&self.state).bytes += data.len() as u64;
                }
                T_FILE_BEGIN => {
                    let fb: FileBegin = parse(&payload, "file")?;
                    if fb.file.contains('/') || fb.file.starts_with('.') || fb.file.is_empty() {
                        return Err(bad(format!("bad scratch file name {:?}", fb.file)));
                    }
                    // Only into a scratch directory this stream staged: the name is joined
                    // to a path, so "..", "/" or a disk's name must not get that far.
                    let staged = self.resources.iter().any(|r| {
                        r.spec.name == fb.name
                            && r.spec.kind == ResourceKind::Scratch
                            && carries_data(r.spec.kind, r.action)
                    });
                    let dir = self.staging.join(&fb.name);
                    if !staged || !dir.is_dir() {
                        return Err(bad(format!("file for unknown scratch {:?}", fb.name)));
                    }
                    let f = std::fs::File::create(dir.join(&fb.file))?;
                    file = Some((f, blake3::Hasher::new(), fb.file, fb.size, 0));
                }
                T_FILE_DATA => {
                    let (f, h, _, size, got) = file
                        .as_mut()
                        .ok_or_else(|| bad("file data outside a file".into()))?;
                    *got += payload.len() as u64;
                    if *got > *size {
                        return Err(bad("more file data than announced".into()));
                    }
                    f.write_all(&payload)?;
                    h.update(&payload);
                    lock(&self.state).bytes += payload.len() as u64;
                }
                T_FILE_END => {
                    let end: FileEnd = parse(&payload, "file end")?;
                    let (f, h, name, size, got) = file
                        .take()
                        .ok_or_else(|| bad("file end outside a file".into()))?;
                    f.sync_all()?;
                    let digest = h.finalize().to_hex().to_string();
                    if digest != end.blake3 || got != size {
                        mismatches.push(format!(
                            "{name}: received {got} of {size} bytes, blake3 {digest} vs {}",
                            end.blake3
                        ));
                    }
                }
                T_COMMIT => {
                    let ack = self.commit(&disks, &mismatches);
                    let ok = ack.ok;
                    write_json(conn, T_ACK, &ack)?;
                    if ok {
                        // The connection ends with the migration.
                        let _ = read_frame(conn);
                    }
                    return Ok(());
                }
                T_ABORT => {
                    tracing::info!(vm = %self.vm, "the source aborted the resource transfer");
                    return Ok(());
                }
                other => return Err(bad(format!("unknown resource frame type {other}"))),
            }
        }
    }

    fn commit(&self, disks: &BTreeMap<String, (FileDisk, Vec<u64>)>, mismatches: &[String]) -> Ack {
        let fail = |e: String| Ack {
            ok: false,
            error: Some(e),
            digests: BTreeMap::new(),
        };
        if !mismatches.is_empty() {
            return fail(format!("scratch files differ: {}", mismatches.join(", ")));
        }
        let mut digests = BTreeMap::new();
        // No fsync here: the image is as durable as the VM's memory, which is only on this
        // host from now on either way; the guest's own flushes sync it.
        for (name, (_, hashes)) in disks {
            digests.insert(name.clone(), block::fold_digest(hashes));
        }
        let mut placed = Vec::new();
        for r in &self.resources {
            if !carries_data(r.spec.kind, r.action) {
                continue;
            }
            let from = self.staging.join(&r.spec.name);
            let to = self.dir.join(&r.spec.name);
            if to.exists() {
                let _ = std::fs::remove_dir_all(&to);
            }
            if let Err(e) = std::fs::rename(&from, &to) {
                for p in &placed {
                    let _ = std::fs::remove_dir_all(p);
                }
                return fail(format!(
                    "cannot move resource {} into {}: {e}",
                    r.spec.name,
                    to.display()
                ));
            }
            placed.push(to);
        }
        let mut st = lock(&self.state);
        st.committed = true;
        st.placed = placed;
        Ack {
            ok: true,
            error: None,
            digests,
        }
    }

    /// The VM never started here: removes what the commit put in place.
    pub fn discard(&self) {
        let st = lock(&self.state);
        for p in &st.placed {
            let _ = std::fs::remove_dir_all(p);
        }
        let _ = std::fs::remove_dir_all(&self.staging);
    }

    pub fn bytes(&self) -> u64 {
        lock(&self.state).bytes
    }

    /// Binds the arriving VM's resources on this host, per the actions chosen.
    pub fn bind(&self, host: &HostResources) -> io::Result<VmResources> {
        if self.expects_data() && !self.committed() {
            return Err(io::Error::other(
                "the VM's resource data never arrived (no commit)",
            ));
        }
        let mut items = Vec::new();
        let mut local_bytes = 0u64;
        for r in &self.resources {
            let name = &r.spec.name;
            let dir = self.dir.join(name);
            let remote_host = r.remote_host.clone().unwrap_or_default();
            let (state, holder) = match (r.spec.kind, r.action) {
                (ResourceKind::Disk, ResourceAction::Move | ResourceAction::Copy) => {
                    let disk = Arc::new(FileDisk::open(&dir.join("disk.img"))?);
                    local_bytes += r.spec.size_bytes();
                    (
                        BoundState::Disk {
                            local: Some(disk.clone()),
                            backend: disk,
                            remote: None,
                        },
                        host.host().to_owned(),
                    )
                }
                (ResourceKind::Disk, _) => {
                    let remote = r.remote.as_deref().ok_or_else(|| {
                        io::Error::other(format!("disk {name} kept remote has no address"))
                    })?;
                    (host.remote_disk(remote)?, remote_host)
                }
                (ResourceKind::Scratch, ResourceAction::Move | ResourceAction::Copy) => {
                    local_bytes += r.spec.size_bytes();
                    (
                        BoundState::Scratch {
                            dir: Some(dir),
                            remote: None,
                        },
                        host.host().to_owned(),
                    )
                }
                (ResourceKind::Scratch, ResourceAction::Rebind) => {
                    std::fs::create_dir_all(&dir)?;
                    (
                        BoundState::Scratch {
                            dir: Some(dir),
                            remote: None,
                        },
                        host.host().to_owned(),
                    )
                }
                (ResourceKind::Scratch, _) => (
                    BoundState::Scratch {
                        dir: None,
                        remote: r.remote.clone(),
                    },
                    remote_host,
                ),
                (ResourceKind::Endpoint, _) => {
                    let stream = Arc::new(Stream::new());
                    let endpoint = host.arriving_endpoint(&self.vm, name, stream.clone())?;
                    (
                        BoundState::Endpoint {
                            endpoint,
                            stream,
                            address: r.address.clone().unwrap_or_default(),
                        },
                        r.remote_host.clone().unwrap_or_default(),
                    )
                }
                (ResourceKind::Device, ResourceAction::Rebind) => (
                    host.bind_device(r.spec.class.as_deref().unwrap_or_default()),
                    host.host().to_owned(),
                ),
                (ResourceKind::Device, _) => {
                    let url = r.remote.as_deref().unwrap_or_default();
                    (
                        host.remote_device(
                            r.spec.class.as_deref().unwrap_or_default(),
                            url,
                            &remote_host,
                        ),
                        remote_host,
                    )
                }
            };
            items.push(Bound {
                spec: r.spec.clone(),
                host: holder,
                state,
            });
        }
        host.add_used(&self.vm, local_bytes);
        let me = host.api_url.lock().map(|u| u.clone()).unwrap_or_default();
        let visited = self
            .previous_hosts
            .iter()
            .filter(|u| Some(*u) != me.as_ref())
            .cloned()
            .collect();
        Ok(VmResources { items, visited })
    }
}
