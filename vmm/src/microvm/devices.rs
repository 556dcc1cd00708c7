//! The microVM's port I/O devices: COM1 (a 16550 UART from vm-superio whose output goes to the
//! VM's console log), the guest/monitor ports of `docs/guest-abi.md`, and the resource devices
//! a VM may have: a paravirtual block device, an entropy device and the endpoint stream.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::block::{BlockBackend, BLOCK_SIZE};
use super::entropy::EntropySource;
use super::memory::GuestMemory;
use super::stream::Stream;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const PORT_SLEEP: u16 = 0x500;
pub const PORT_VERIFY_ERROR: u16 = 0x504;
pub const PORT_PANIC: u16 = 0x508;
pub const PORT_BLOCK: u16 = 0x510;
pub const PORT_BLOCK_BLOCKS: u16 = 0x514;
pub const PORT_ENTROPY: u16 = 0x520;
pub const PORT_ENTROPY_ID: u16 = 0x524;
pub const PORT_STREAM: u16 = 0x530;
pub const PORT_STREAM_PRESENT: u16 = 0x534;
/// Most blocks one request may move.
pub const MAX_REQUEST_BLOCKS: u32 = 64;

/// Block request status codes (docs/guest-abi.md).
const BLK_OK: u32 = 0;
const BLK_IO_ERROR: u32 = 1;
const BLK_BAD_REQUEST: u32 = 2;
const BLK_NO_DISK: u32 = 3;

/// The resource devices a VM is built with; the agent owns their backends.
#[derive(Debug, Clone, Default)]
pub struct Attachments {
    pub disk: Option<Arc<dyn BlockBackend>>,
    pub entropy: Option<Arc<dyn EntropySource>>,
    pub stream: Option<Arc<Stream>>,
}
/// Sleep value meaning "until woken by a pause or stop".
pub const SLEEP_FOREVER: u32 = u32::MAX;

/// What the vCPU loop must do after a port write.
#[derive(Debug, PartialEq, Eq)]
pub enum PortAction {
    Continue,
    /// Park the vCPU for this long (`None`: until woken).
    Sleep(Option<Duration>),
    /// The guest reported an impossible state.
    Crash(String),
}

/// Raises the serial interrupt line through an irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Appends console output to the VM's log file and counts it.
#[derive(Debug)]
pub struct ConsoleLog {
    file: File,
    bytes: Arc<AtomicU64>,
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Device state saved with the VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevicesState {
    pub serial: SerialRegisters,
    /// Endpoint stream bytes the guest had not read when the state was saved.
    pub stream_unread: Vec<u8>,
}

/// The 16550's registers and receive buffer (vm-superio's `SerialState`, made serializable).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialRegisters {
    fn from(s: SerialState) -> Self {
        SerialRegisters {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegisters> for SerialState {
    fn from(s: &SerialRegisters) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("Cannot open console log {}", path.display())]
    ConsoleLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot restore the serial port state")]
    SerialRestore,
}

#[derive(Debug)]
pub struct Devices {
    serial: Mutex<Serial<IrqLine, NoEvents, ConsoleLog>>,
    console_path: PathBuf,
    console_bytes: Arc<AtomicU64>,
    verify_errors_reported: AtomicU64,
    name: String,
    memory: GuestMemory,
    attachments: Attachments,
    io_errors_reported: AtomicU64,
}

impl Devices {
    /// Creates the devices; console output is appended to `console_path`.
    pub fn new(
        name: &str,
        console_path: &Path,
        irq: IrqLine,
        memory: GuestMemory,
        attachments: Attachments,
        state: Option<&DevicesState>,
    ) -> Result<Self, DeviceError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(console_path)
            .map_err(|source| DeviceError::ConsoleLog {
                path: console_path.to_owned(),
                source,
            })?;
        let existing = file.metadata().map(|m| m.len()).unwrap_or(0);
        let console_bytes = Arc::new(AtomicU64::new(existing));
        let log = ConsoleLog {
            file,
            bytes: console_bytes.clone(),
        };
        let serial = match state {
            None => Serial::new(irq, log),
            Some(state) => Serial::from_state(&(&state.serial).into(), irq, NoEvents, log)
                .map_err(|_| DeviceError::SerialRestore)?,
        };
        if let (Some(stream), Some(state)) = (&attachments.stream, state) {
            stream.preload(&state.stream_unread);
        }
        Ok(Devices {
            serial: Mutex::new(serial),
            console_path: console_path.to_owned(),
            console_bytes,
            verify_errors_reported: AtomicU64::new(0),
            name: name.to_owned(),
            memory,
            attachments,
            io_errors_reported: AtomicU64::new(0),
        })
    }

    pub fn io_out(&self, port: u16, data: &[u8]) -> PortAction {
        match port {
            COM1_BASE..=0x3ff => {
                let offset = (port - COM1_BASE) as u8;
                if let Some(&byte) = data.first() {
                    let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(e) = serial.write(offset, byte) {
                        tracing::warn!(vm = %self.name, error = ?e, "serial write failed");
                    }
                }
                PortAction::Continue
            }
            PORT_SLEEP => match read_u32(data) {
                SLEEP_FOREVER => PortAction::Sleep(None),
                us => PortAction::Sleep(Some(Duration::from_micros(u64::from(us)))),
            },
            PORT_VERIFY_ERROR => {
                let page = read_u32(data);
                let n = self.verify_errors_reported.fetch_add(1, Ordering::Relaxed);
                if n < 16 {
                    tracing::error!(vm = %self.name, page, "guest memory verification failed");
                }
                PortAction::Continue
            }
            PORT_PANIC => PortAction::Crash(format!(
                "the guest program panicked with code {:#x}",
                read_u32(data)
            )),
            PORT_BLOCK => {
                self.block_request(u64::from(read_u32(data)));
                PortAction::Continue
            }
            PORT_STREAM => {
                if let (Some(stream), Some(&b)) = (&self.attachments.stream, data.first()) {
                    stream.guest_write(b);
                }
                PortAction::Continue
            }
            _ => PortAction::Continue,
        }
    }

    /// Serves the block request whose descriptor is at `gpa` (docs/guest-abi.md): the vCPU
    /// waits for it, which keeps the device simple and the guest's view consistent.
    fn block_request(&self, gpa: u64) {
        let status = match self.try_block_request(gpa) {
            Ok(()) => BLK_OK,
            Err((code, why)) => {
                if self.io_errors_reported.fetch_add(1, Ordering::Relaxed) < 16 {
                    tracing::warn!(vm = %self.name, error = %why, "block request failed");
                }
                code
            }
        };
        // A descriptor we cannot write back is a guest bug; nothing more to tell it.
        let _ = self.memory.write_obj(status, GuestAddress(gpa + 4));
    }

    fn try_block_request(&self, gpa: u64) -> Result<(), (u32, String)> {
        let bad = |why: String| (BLK_BAD_REQUEST, why);
        let field = |off: u64| self.memory.read_obj::<u64>(GuestAddress(gpa + off));
        let op = self
            .memory
            .read_obj::<u32>(GuestAddress(gpa))
            .map_err(|e| bad(format!("descriptor at {gpa:#x} is unreadable: {e}")))?;
        let block = field(8).map_err(|e| bad(e.to_string()))?;
        let buf = field(16).map_err(|e| bad(e.to_string()))?;
        let count = self
            .memory
            .read_obj::<u32>(GuestAddress(gpa + 24))
            .map_err(|e| bad(e.to_string()))?;
        let Some(disk) = &self.attachments.disk else {
            return Err((BLK_NO_DISK, "the VM has no disk".into()));
        };
        if op == 3 {
            return disk
                .flush()
                .map_err(|e| (BLK_IO_ERROR, format!("flush: {e}")));
        }
        if !(1..=MAX_REQUEST_BLOCKS).contains(&count) {
            return Err(bad(format!("count {count} is not 1-{MAX_REQUEST_BLOCKS}")));
        }
        let len = u64::from(count) * BLOCK_SIZE;
        if block
            .checked_add(u64::from(count))
            .is_none_or(|e| e > disk.blocks())
        {
            return Err(bad(format!(
                "blocks {block}+{count} are outside a disk of {}",
                disk.blocks()
            )));
        }
        let mut data = vec![0u8; len as usize];
        match op {
            1 => {
                disk.read(block, &mut data)
                    .map_err(|e| (BLK_IO_ERROR, format!("read of block {block}: {e}")))?;
                self.memory
                    .write_slice(&data, GuestAddress(buf))
                    .map_err(|e| bad(format!("buffer at {buf:#x}: {e}")))
            }
            2 => {
                self.memory
                    .read_slice(&mut data, GuestAddress(buf))
                    .map_err(|e| bad(format!("buffer at {buf:#x}: {e}")))?;
                disk.write(block, &data)
                    .map_err(|e| (BLK_IO_ERROR, format!("write of block {block}: {e}")))
            }
            _ => Err(bad(format!("unknown operation {op}"))),
        }
    }

    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            COM1_BASE..=0x3ff => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                serial.read((port - COM1_BASE) as u8)
            }
            PORT_BLOCK_BLOCKS => {
                let blocks = self.attachments.disk.as_ref().map_or(0, |d| d.blocks());
                return write_u32(data, u32::try_from(blocks).unwrap_or(u32::MAX));
            }
            PORT_ENTROPY => {
                let word = match &self.attachments.entropy {
                    Some(e) => e.next_u32().unwrap_or_else(|err| {
                        if self.io_errors_reported.fetch_add(1, Ordering::Relaxed) < 16 {
                            tracing::warn!(vm = %self.name, error = %err, "entropy read failed");
                        }
                        0
                    }),
                    None => 0,
                };
                return write_u32(data, word);
            }
            PORT_ENTROPY_ID => {
                let id = self
                    .attachments
                    .entropy
                    .as_ref()
                    .map_or(0, |e| e.device_id());
                return write_u32(data, id);
            }
            PORT_STREAM => {
                let v = match self
                    .attachments
                    .stream
                    .as_ref()
                    .and_then(|s| s.guest_read())
                {
                    Some(b) => 0x100 | u32::from(b),
                    None => 0,
                };
                return write_u32(data, v);
            }
            PORT_STREAM_PRESENT => {
                return write_u32(data, u32::from(self.attachments.stream.is_some()));
            }
            _ => 0xff,
        };
        data.fill(value);
    }

    /// The resource devices this VM was built with.
    pub fn attachments(&self) -> &Attachments {
        &self.attachments
    }

    pub fn state(&self) -> DevicesState {
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        DevicesState {
            serial: serial.state().into(),
            stream_unread: self
                .attachments
                .stream
                .as_ref()
                .map(|s| s.unread())
                .unwrap_or_default(),
        }
    }

    pub fn console_path(&self) -> &Path {
        &self.console_path
    }

    pub fn console_bytes(&self) -> u64 {
        self.console_bytes.load(Ordering::Relaxed)
    }
}

fn write_u32(data: &mut [u8], v: u32) {
    let bytes = v.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&bytes[..n]);
}

fn read_u32(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(dir: &Path) -> Devices {
        let irq = IrqLine(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let memory = super::super::memory::allocate(1 << 20, false).unwrap();
        Devices::new(
            "t",
            &dir.join("console.log"),
            irq,
            memory,
            Attachments::default(),
            None,
        )
        .unwrap()
    }

    #[test]
    fn serial_output_reaches_the_console_log() {
        let dir = tempfile::tempdir().unwrap();
        let d = devices(dir.path());
        for b in b"tick 1\n" {
            assert_eq!(d.io_out(COM1_BASE, &[*b]), PortAction::Continue);
        }
        assert_eq!(std::fs::read(d.console_path()).unwrap(), b"tick 1\n");
        assert_eq!(d.console_bytes(), 7);
    }

    #[test]
    fn guest_ports_decode() {
        let dir = tempfile::tempdir().unwrap();
        let d = devices(dir.path());
        assert_eq!(
            d.io_out(PORT_SLEEP, &1500u32.to_le_bytes()),
            PortAction::Sleep(Some(Duration::from_micros(1500)))
        );
        assert_eq!(
            d.io_out(PORT_SLEEP, &u32::MAX.to_le_bytes()),
            PortAction::Sleep(None)
        );
        assert!(matches!(
            d.io_out(PORT_PANIC, &7u32.to_le_bytes()),
            PortAction::Crash(_)
        ));
        assert_eq!(d.io_out(0x80, &[1]), PortAction::Continue);
        let mut lsr = [0u8];
        d.io_in(COM1_BASE + 5, &mut lsr);
        assert_ne!(
            lsr[0] & 0x20,
            0,
            "transmitter holding register should be empty"
        );
    }

    #[test]
    fn serial_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let d = devices(dir.path());
        d.io_out(COM1_BASE + 7, &[0x5a]); // scratch register
        let state = d.state();
        let irq = IrqLine(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let memory = super::super::memory::allocate(1 << 20, false).unwrap();
        let restored = Devices::new(
            "t2",
            &dir.path().join("c2.log"),
            irq,
            memory,
            Attachments::default(),
            Some(&state),
        )
        .unwrap();
        assert_eq!(restored.state(), state);
        assert_eq!(state.serial.scratch, 0x5a);
    }
}
