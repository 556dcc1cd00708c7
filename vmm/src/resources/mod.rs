//! A VM's resources on this host (docs/resources.md): the disk, the published endpoint, scratch
//! directories and devices it declares, bound to real things here, and what carries them
//! across a migration (the rebinding table of DESIGN.md section 4, chosen by
//! `policies::rebinding` and carried out by [`transfer`] and [`endpoint`]).
//!
//! Layout under the agent's data directory: `resources/<vm>/<resource>/disk.img` for a disk,
//! `resources/<vm>/<resource>/` for a scratch directory's files.

mod bound;
pub mod endpoint;
pub mod link;
pub mod plan;
mod spec;
pub mod transfer;

pub use spec::validate as validate_specs;

pub use bound::{Bound, BoundState, VmResources};

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use godwit_api::{IncomingMigration, ResourceKind, ResourceSpec};
use godwit_daemon::client::ClientAuth;
use link::LinkSecurity;

use crate::error::VmmError;
use crate::microvm::block::{FileDisk, NbdDisk};
use crate::microvm::entropy::{EntropySource, LocalEntropy, RemoteEntropy};
use crate::microvm::stream::Stream;
use endpoint::Endpoint;

const MIB: u64 = 1 << 20;
/// Most resources one VM may declare.
pub const MAX_RESOURCES: usize = 8;
/// Largest disk or scratch directory, MiB.
pub const MAX_SIZE_MIB: u64 = 1024;
/// Scratch data is written in files of this size.
const SCRATCH_FILE_BYTES: u64 = MIB;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This host's side of every VM's resources: where they live, the devices it offers, the
/// endpoints and exports it keeps (also for VMs that moved away), and the resource listener.
#[derive(Debug)]
pub struct HostResources {
    host: String,
    root: PathBuf,
    capacity_bytes: u64,
    device_classes: BTreeSet<String>,
    entropy: Option<Arc<LocalEntropy>>,
    endpoint_ip: IpAddr,
    /// This agent's API URL as peers reach it (for remote devices).
    pub(crate) api_url: Mutex<Option<String>>,
    endpoints: Mutex<HashMap<(String, String), Arc<Endpoint>>>,
    exports: Mutex<HashMap<(String, String), godwit_nbd::Export>>,
    pub(crate) incoming: Mutex<HashMap<String, Arc<transfer::Incoming>>>,
    /// Bytes of disk and scratch data on this host, by VM.
    used: Mutex<HashMap<String, u64>>,
    listener_addr: SocketAddr,
    /// How this VMM calls other hosts' agents (their devices, release of moved resources).
    pub(crate) client: ClientAuth,
    /// How resource connections to and from other hosts' VMMs are secured.
    pub(crate) links: LinkSecurity,
}

/// Resource connections (links, resource data, NBD tunnels) a VMM serves at once.
pub const MAX_RESOURCE_CONNECTIONS: usize = 256;

impl HostResources {
    /// Creates `data_dir/resources` and starts the resource listener on `ip`.
    pub fn start(
        host: &str,
        data_dir: &Path,
        capacity_bytes: u64,
        device_classes: BTreeSet<String>,
        ip: IpAddr,
        client: ClientAuth,
        links: LinkSecurity,
    ) -> Result<Arc<Self>, VmmError> {
        let root = data_dir.join("resources");
        std::fs::create_dir_all(&root)
            .map_err(|e| VmmError::io(format!("create {}", root.display()), e))?;
        let entropy = if device_classes.contains("entropy") {
            Some(Arc::new(
                LocalEntropy::open(host).map_err(|e| VmmError::io("open the entropy device", e))?,
            ))
        } else {
            None
        };
        let listener =
            TcpListener::bind((ip, 0)).map_err(|e| VmmError::io("listen for resource links", e))?;
        let listener_addr = listener
            .local_addr()
            .map_err(|e| VmmError::io("read the resource listener's address", e))?;
        let me = Arc::new(HostResources {
            host: host.to_owned(),
            root,
            capacity_bytes,
            device_classes,
            entropy,
            endpoint_ip: ip,
            api_url: Mutex::new(None),
            endpoints: Mutex::new(HashMap::new()),
            exports: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            used: Mutex::new(HashMap::new()),
            listener_addr,
            client,
            links,
        });
        let weak = Arc::downgrade(&me);
        thread::Builder::new()
            .name("resource-listener".into())
            .spawn(move || {
                let live = Arc::new(AtomicUsize::new(0));
                for conn in listener.incoming() {
                    let Some(me) = weak.upgrade() else { return };
                    let Ok(conn) = conn else { continue };
                    // One thread per connection, so their number is bounded: a flood (even
                    // of handshakes that never finish) cannot take the VMM's threads.
                    if live.load(Ordering::Acquire) >= MAX_RESOURCE_CONNECTIONS {
                        tracing::warn!(peer = ?conn.peer_addr().ok(), "resource listener: too many connections; refused");
                        continue;
                    }
                    live.fetch_add(1, Ordering::AcqRel);
                    let counted = live.clone();
                    let spawned = thread::Builder::new()
                        .name("resource-conn".into())
                        .spawn(move || {
                            me.serve_conn(conn);
                            counted.fetch_sub(1, Ordering::AcqRel);
                        });
                    if spawned.is_err() {
                        // The closure (and its decrement) never ran.
                        live.fetch_sub(1, Ordering::AcqRel);
                        tracing::warn!("resource listener: cannot start a connection thread");
                    }
                }
            })
            .map_err(|e| VmmError::io("start the resource listener thread", e))?;
        Ok(me)
    }

    pub fn listener_port(&self) -> u16 {
        self.listener_addr.port()
    }

    pub fn device_classes(&self) -> Vec<String> {
        self.device_classes.iter().cloned().collect()
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Space left for resource data here.
    pub fn disk_free_bytes(&self) -> u64 {
        let used: u64 = lock(&self.used).values().sum();
        self.capacity_bytes.saturating_sub(used)
    }

    pub(crate) fn add_used(&self, vm: &str, bytes: u64) {
        *lock(&self.used).entry(vm.to_owned()).or_default() += bytes;
    }

    pub(crate) fn vm_dir(&self, vm: &str) -> PathBuf {
        self.root.join(vm)
    }

    /// This host's entropy device, for a peer's remote device.
    pub fn local_entropy(&self) -> Option<&Arc<LocalEntropy>> {
        self.entropy.as_ref()
    }

    fn serve_conn(self: Arc<Self>, conn: TcpStream) {
        let peer = conn.peer_addr().ok();
        let conn = match self.links.accept(conn) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(?peer, error = %e, "resource listener: connection refused");
                return;
            }
        };
        let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(10)));
        let header = match endpoint::read_header_line(&conn, 200) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "resource listener: bad header");
                return;
            }
        };
        let _ = conn.set_read_timeout(None);
        let (kind, rest) = header.split_once(' ').unwrap_or((header.as_str(), ""));
        match kind {
            endpoint::LINK_PREFIX => {
                let Some((vm, res)) = endpoint::read_link_header(rest) else {
                    tracing::warn!(header, "resource listener: bad link header");
                    return;
                };
                let ep = lock(&self.endpoints)
                    .get(&(vm.clone(), res.clone()))
                    .cloned();
                match ep {
                    Some(ep) => ep.serve(conn),
                    None => {
                        tracing::warn!(%vm, %res, "link for an endpoint this host does not have")
                    }
                }
            }
            link::NBD_PREFIX => {
                let name = rest.trim();
                let export = lock(&self.exports)
                    .values_mut()
                    .find(|x| x.export_name() == name)
                    .and_then(|x| x.is_running().then(|| x.addr()));
                match export {
                    Some(addr) => match TcpStream::connect(addr) {
                        Ok(nbd) => {
                            let _ = nbd.set_nodelay(true);
                            endpoint::splice(conn, page_transfer::channel::Channel::plain(nbd));
                        }
                        Err(e) => {
                            tracing::warn!(export = name, error = %e, "cannot reach the local qemu-nbd")
                        }
                    },
                    None => tracing::warn!(
                        ?peer,
                        export = name,
                        "NBD link for an export this host does not have"
                    ),
                }
            }
            transfer::RESOURCES_PREFIX => {
                let incoming = lock(&self.incoming).get(rest.trim()).cloned();
                match incoming {
                    Some(inc) => match link::from_source(&conn, &inc.source) {
                        Ok(()) => inc.receive(conn),
                        Err(why) => {
                            tracing::warn!(?peer, id = rest, %why, "resource listener: connection refused")
                        }
                    },
                    None => {
                        tracing::warn!(id = rest, "resource data for an unknown migration");
                    }
                }
            }
            _ => tracing::warn!(header, "resource listener: unknown header"),
        }
    }

    /// Checks a VM's resource specs against what this agent can carry out.
    pub fn validate(&self, specs: &[ResourceSpec]) -> Result<(), VmmError> {
        spec::validate(specs)
    }

    /// Binds fresh resources for a VM created here.
    pub fn create(&self, vm: &str, specs: &[ResourceSpec]) -> Result<VmResources, VmmError> {
        self.validate(specs)?;
        let needed: u64 = specs.iter().map(|s| s.size_bytes()).sum();
        if needed > self.disk_free_bytes() {
            return Err(VmmError::OutOfDisk {
                what: "disks and scratch data",
                need_mib: needed / MIB,
                free_mib: self.disk_free_bytes() / MIB,
            });
        }
        for s in specs {
            if let Some(class) = &s.class {
                if !self.device_classes.contains(class) {
                    return Err(VmmError::NoDevice {
                        class: class.clone(),
                        offers: if self.device_classes.is_empty() {
                            "none".to_owned()
                        } else {
                            self.device_classes().join(", ")
                        },
                    });
                }
            }
        }
        if self.serves_moved(vm) {
            return Err(VmmError::ServesMoved {
                name: vm.to_owned(),
            });
        }
        let dir = self.vm_dir(vm);
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let result = specs
            .iter()
            .map(|s| self.bind_new(vm, s))
            .collect::<Result<Vec<_>, _>>();
        match result {
            Ok(items) => {
                self.add_used(vm, needed);
                Ok(VmResources {
                    items,
                    visited: Vec::new(),
                })
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn bind_new(&self, vm: &str, s: &ResourceSpec) -> Result<Bound, VmmError> {
        let internal = |what: &str, e: std::io::Error| {
            VmmError::io(format!("create {what} for resource {}", s.name), e)
        };
        let dir = self.vm_dir(vm).join(&s.name);
        let state = match s.kind {
            ResourceKind::Disk => {
                std::fs::create_dir_all(&dir).map_err(|e| internal("its directory", e))?;
                let disk = Arc::new(
                    FileDisk::create(&dir.join("disk.img"), s.size_bytes())
                        .map_err(|e| internal("the disk image", e))?,
                );
                BoundState::Disk {
                    local: Some(disk.clone()),
                    backend: disk,
                    remote: None,
                }
            }
            ResourceKind::Scratch => {
                std::fs::create_dir_all(&dir).map_err(|e| internal("its directory", e))?;
                fill_scratch(&dir, vm, &s.name, s.size_bytes())
                    .map_err(|e| internal("its data", e))?;
                BoundState::Scratch {
                    dir: Some(dir),
                    remote: None,
                }
            }
            ResourceKind::Endpoint => {
                let listener = TcpListener::bind((self.endpoint_ip, s.port.unwrap_or(0))).map_err(
                    |source| VmmError::Publish {
                        resource: s.name.clone(),
                        addr: format!("{}:{}", self.endpoint_ip, s.port.unwrap_or(0)),
                        source,
                    },
                )?;
                let stream = Arc::new(Stream::new());
                let endpoint = Endpoint::start(
                    vm,
                    &s.name,
                    stream.clone(),
                    Some(listener),
                    self.links.clone(),
                )
                .map_err(|e| internal("the endpoint", e))?;
                let address = endpoint
                    .published()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                lock(&self.endpoints).insert((vm.to_owned(), s.name.clone()), endpoint.clone());
                BoundState::Endpoint {
                    endpoint,
                    stream,
                    address,
                }
            }
            ResourceKind::Device => self.bind_device(s.class.as_deref().unwrap_or_default()),
        };
        Ok(Bound {
            spec: s.clone(),
            host: self.host.clone(),
            state,
        })
    }

    /// This host's device of `class` (RB, or a new VM).
    pub(crate) fn bind_device(&self, class: &str) -> BoundState {
        match (class, &self.entropy) {
            ("entropy", Some(e)) => BoundState::Device {
                entropy: Some(e.clone() as Arc<dyn EntropySource>),
                location: e.location(),
            },
            _ => BoundState::Device {
                entropy: None,
                location: format!(
                    "{class} {}#{:08x}",
                    self.host,
                    crate::microvm::entropy::device_id(&self.host, class)
                ),
            },
        }
    }

    /// A device on another host, reached through its agent (GR).
    pub(crate) fn remote_device(&self, class: &str, url: &str, host: &str) -> BoundState {
        if class == "entropy" {
            match RemoteEntropy::new(url, host, &self.client) {
                Ok(e) => {
                    let location = e.location();
                    return BoundState::Device {
                        entropy: Some(Arc::new(e)),
                        location,
                    };
                }
                Err(e) => tracing::warn!(error = %e, "cannot set up a remote entropy device"),
            }
        }
        BoundState::Device {
            entropy: None,
            location: format!("{class} on {host} via {url}"),
        }
    }

    /// A disk on another host, through its NBD export (GR), reached over a resource link to
    /// that host (`remote` is `HOST:PORT/EXPORT`, PORT its resource listener's).
    pub(crate) fn remote_disk(&self, remote: &str) -> Result<BoundState, std::io::Error> {
        let disk = Arc::new(NbdDisk::connect(remote, |addr, export| {
            link::nbd_tunnel(&self.links, addr, export)
        })?);
        Ok(BoundState::Disk {
            local: None,
            backend: disk,
            remote: Some(remote.to_owned()),
        })
    }

    /// Exports a local disk for a VM moving away with its disk left here (GR); returns
    /// `HOST:PORT/EXPORT`, PORT being this VMM's resource listener: qemu-nbd listens on
    /// loopback only, and other hosts reach it through a resource link (`GODWIT-NBD EXPORT`),
    /// mutual TLS like the others. An existing export of the same disk is reused.
    pub(crate) fn export_disk(
        &self,
        vm: &str,
        resource: &str,
        path: &Path,
        advertise: &str,
    ) -> Result<String, VmmError> {
        let key = (vm.to_owned(), resource.to_owned());
        let mut exports = lock(&self.exports);
        if let Some(x) = exports.get_mut(&key) {
            if x.is_running() {
                return Ok(format!(
                    "{advertise}:{}/{}",
                    self.listener_port(),
                    x.export_name()
                ));
            }
        }
        let name = format!("{vm}-{resource}");
        let export = godwit_nbd::Export::start(path, Ipv4Addr::LOCALHOST.into(), &name).map_err(
            |source| VmmError::Export {
                vm: vm.to_owned(),
                resource: resource.to_owned(),
                source,
            },
        )?;
        let remote = format!(
            "{advertise}:{}/{}",
            self.listener_port(),
            export.export_name()
        );
        exports.insert(key, export);
        Ok(remote)
    }

    /// Stops the export of a VM's disk (a failed migration, or the VM came back).
    pub(crate) fn unexport(&self, vm: &str, resource: &str) {
        if let Some(x) = lock(&self.exports).remove(&(vm.to_owned(), resource.to_owned())) {
            x.stop();
        }
    }

    /// The endpoint of a VM arriving here: the one this host already has for it (it was
    /// here before and forwards its published address) rebound to the VM's new stream, or a
    /// fresh one reached only through links.
    pub(crate) fn arriving_endpoint(
        &self,
        vm: &str,
        resource: &str,
        stream: Arc<Stream>,
    ) -> std::io::Result<Arc<Endpoint>> {
        let key = (vm.to_owned(), resource.to_owned());
        let mut endpoints = lock(&self.endpoints);
        if let Some(ep) = endpoints.get(&key) {
            ep.rebind_local(stream);
            return Ok(ep.clone());
        }
        let ep = Endpoint::start(vm, resource, stream, None, self.links.clone())?;
        endpoints.insert(key, ep.clone());
        Ok(ep)
    }

    /// What this host keeps for VMs that are not running here (forwarders, exports, data
    /// kept after a copy), one line each.
    pub fn kept(&self) -> Vec<String> {
        let mut out: Vec<String> = lock(&self.endpoints)
            .iter()
            .filter(|(_, ep)| !ep.is_local())
            .map(|((vm, r), ep)| format!("{vm}: endpoint {r} ({})", ep.location()))
            .collect();
        out.extend(
            lock(&self.exports)
                .keys()
                .map(|(vm, r)| format!("{vm}: export of {r}")),
        );
        out.sort();
        out
    }

    /// Bytes of resource data this process accounts for (its VM's, or what it keeps).
    pub fn disk_used_bytes(&self) -> u64 {
        lock(&self.used).values().sum()
    }

    /// Whether exports or endpoints of a VM named `vm` are still kept here.
    fn serves_moved(&self, vm: &str) -> bool {
        lock(&self.exports).keys().any(|(v, _)| v == vm)
            || lock(&self.endpoints).keys().any(|(v, _)| v == vm)
    }

    /// A VM that moved away from here was deleted where it ran: stops its exports and
    /// forwarders and removes the data kept for it. Returns what was released.
    pub fn release_moved(&self, vm: &str) -> Vec<String> {
        let released = self.release(vm);
        if !released.is_empty() {
            tracing::info!(%vm, ?released, "released the resources of a VM deleted elsewhere");
        }
        released
    }

    /// A VM is deleted here: its local data goes, its endpoints stop, and the agents it ran on
    /// before are told to release what they keep for it.
    pub fn delete_vm(&self, vm: &str, res: &VmResources) {
        for url in &res.visited {
            let (url, vm, client) = (url.clone(), vm.to_owned(), self.client.clone());
            let _ = thread::Builder::new()
                .name("release-moved".into())
                .spawn(move || notify_deleted(&client, &url, &vm));
        }
        self.release(vm);
    }

    /// Everything this host holds for `vm`: its endpoints (serving or forwarding), exports,
    /// data directory and space accounting. Returns what was released.
    fn release(&self, vm: &str) -> Vec<String> {
        let mut released = Vec::new();
        let endpoints: Vec<(String, Arc<Endpoint>)> = {
            let mut map = lock(&self.endpoints);
            let keys: Vec<_> = map.keys().filter(|(v, _)| v == vm).cloned().collect();
            keys.into_iter()
                .filter_map(|k| map.remove(&k).map(|e| (k.1, e)))
                .collect()
        };
        for (name, ep) in endpoints {
            ep.stop();
            released.push(format!("endpoint {name} ({})", ep.location()));
        }
        let exported: Vec<String> = lock(&self.exports)
            .keys()
            .filter(|(v, _)| v == vm)
            .map(|(_, r)| r.clone())
            .collect();
        for r in exported {
            self.unexport(vm, &r);
            released.push(format!("export of {r}"));
        }
        let dir = self.vm_dir(vm);
        if dir.exists() {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => released.push(format!("data {}", dir.display())),
                Err(e) => tracing::warn!(%vm, error = %e, "cannot remove resource data"),
            }
        }
        lock(&self.used).remove(vm);
        released
    }

    /// After a VM moved away: its data that moved is removed here (`dirs`), its endpoint
    /// forwards, its GR'd resources stay.
    pub(crate) fn moved_away(&self, vm: &str, removed: &[PathBuf], kept_bytes: u64) {
        for d in removed {
            if let Err(e) = std::fs::remove_dir_all(d) {
                tracing::warn!(%vm, dir = %d.display(), error = %e, "cannot remove moved resource data");
            }
        }
        let mut used = lock(&self.used);
        if kept_bytes == 0 {
            used.remove(vm);
        } else {
            used.insert(vm.to_owned(), kept_bytes);
        }
    }

    pub fn shutdown(&self) {
        for (_, ep) in lock(&self.endpoints).drain() {
            ep.stop();
        }
        for (_, x) in lock(&self.exports).drain() {
            x.stop();
        }
    }
}

impl HostResources {
    /// Refuses an incoming VM whose resources cannot be bound here as the source planned.
    pub(crate) fn check_incoming_resources(&self, req: &IncomingMigration) -> Result<(), VmmError> {
        use godwit_api::{ResourceAction, ResourceKind};
        let specs: Vec<_> = req.resources.iter().map(|r| r.spec.clone()).collect();
        self.validate(&specs)?;
        let mut needed = 0u64;
        for r in &req.resources {
            match (r.spec.kind, r.action) {
                (ResourceKind::Device, ResourceAction::Rebind) => {
                    let class = r.spec.class.as_deref().unwrap_or_default();
                    if !self.device_classes().iter().any(|c| c == class) {
                        return Err(VmmError::NoDevice {
                            class: class.to_owned(),
                            offers: format!(
                                "{}; resource {} needs one",
                                if self.device_classes.is_empty() {
                                    "none".to_owned()
                                } else {
                                    self.device_classes().join(", ")
                                },
                                r.spec.name
                            ),
                        });
                    }
                }
                (kind, ResourceAction::Move | ResourceAction::Copy)
                    if transfer::carries_data(kind, r.action) =>
                {
                    needed += r.spec.size_bytes();
                }
                (ResourceKind::Disk | ResourceKind::Device, ResourceAction::GlobalRef)
                    if r.remote.is_none() =>
                {
                    return Err(VmmError::Invalid(format!(
                        "resource {} is kept on the source but no address to reach it was sent",
                        r.spec.name
                    )));
                }
                _ => {}
            }
        }
        let free = self.disk_free_bytes();
        if needed > free {
            return Err(VmmError::OutOfDisk {
                what: "moved and copied resources",
                need_mib: needed / MIB,
                free_mib: free / MIB,
            });
        }
        Ok(())
    }

    /// The host name or IP peers reach this host's exports at.
    pub(crate) fn advertise_host(&self) -> String {
        let ip = self.endpoint_ip;
        if !ip.is_unspecified() {
            return ip.to_string();
        }
        let url = self.api_url();
        url.trim_start_matches("http://")
            .rsplit_once(':')
            .map_or("127.0.0.1".to_owned(), |(h, _)| h.to_owned())
    }

    /// This host's agent API URL as peers reach it.
    pub(crate) fn api_url(&self) -> String {
        lock(&self.api_url)
            .clone()
            .unwrap_or_else(|| "http://127.0.0.1:7070".into())
    }
}

/// Tells the agent at `url` that `vm`, which once ran there, was deleted (best effort).
fn notify_deleted(client: &ClientAuth, url: &str, vm: &str) {
    let result = client
        .blocking_client(std::time::Duration::from_secs(10))
        .and_then(|c| c.delete(format!("{url}/v1/resources/{vm}")).send());
    match result {
        Ok(r) if r.status().is_success() || r.status().as_u16() == 409 => {}
        Ok(r) => {
            tracing::warn!(%url, %vm, status = %r.status(), "a previous host did not release the VM's resources")
        }
        Err(e) => {
            tracing::warn!(%url, %vm, error = %e, "cannot tell a previous host to release the VM's resources")
        }
    }
}

/// Writes `bytes` of deterministic data into `dir` as 1 MiB files `data-NNN.bin`.
fn fill_scratch(dir: &Path, vm: &str, name: &str, bytes: u64) -> std::io::Result<()> {
    let mut xof = blake3::Hasher::new()
        .update(format!("scratch\0{vm}\0{name}").as_bytes())
        .finalize_xof();
    let mut left = bytes;
    let mut i = 0;
    let mut buf = vec![0u8; SCRATCH_FILE_BYTES as usize];
    while left > 0 {
        let n = left.min(SCRATCH_FILE_BYTES) as usize;
        std::io::Read::read_exact(&mut xof, &mut buf[..n])?;
        let mut f = std::fs::File::create(dir.join(format!("data-{i:03}.bin")))?;
        f.write_all(&buf[..n])?;
        left -= n as u64;
        i += 1;
    }
    Ok(())
}

/// The files of a scratch directory, sorted (regular files only, no subdirectories).
pub(crate) fn scratch_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            files.push(e.path());
        }
    }
    files.sort();
    Ok(files)
}
