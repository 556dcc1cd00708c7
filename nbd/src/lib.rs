//! Remote disks over NBD: how a VM keeps using a disk that stayed on another host.
//!
//! After a migration the VM's disk image may stay on the source host instead of being copied.
//! The source then serves that raw file with `qemu-nbd` ([`Export`]) and the target agent's
//! block device reads and writes it through [`NbdClient`]. Nothing here knows about KVM or
//! migrations: the agent decides when to export and where to connect.
//!
//! # Protocol subset
//!
//! The client speaks the NBD protocol
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>) as follows:
//!
//! - Fixed newstyle negotiation only (oldstyle and plain newstyle servers are refused), with
//!   `NBD_FLAG_C_NO_ZEROES` when the server offers it.
//! - `NBD_OPT_GO` selects the export; if the server answers `NBD_REP_ERR_UNSUP` the client
//!   falls back to `NBD_OPT_EXPORT_NAME`. No TLS, no structured replies, no metadata contexts.
//! - Commands: `NBD_CMD_READ`, `NBD_CMD_WRITE`, `NBD_CMD_FLUSH` (only when the server
//!   advertises `NBD_FLAG_SEND_FLUSH`) and `NBD_CMD_DISC`. Simple replies only.
//!
//! # Limits
//!
//! - One request is in flight per connection; concurrent callers take turns on a mutex. Open
//!   several clients for parallelism (an [`Export`] accepts 8 at once).
//! - Reads and writes larger than 32 MiB are split into several requests (fewer if the server
//!   announces a smaller maximum payload); requests beyond the export size are refused locally.
//! - Option replies longer than 64 KiB and export names longer than 4096 bytes are refused
//!   before anything is allocated or sent.
//! - A transport error or a reply that breaks the protocol leaves the stream out of step, so
//!   the client refuses further requests ([`NbdError::Broken`]); reconnect to continue. An
//!   error the server reports for one request (an errno) leaves the connection usable.
//! - The connection has a 30 s read and write timeout once negotiated.

#![forbid(unsafe_code)]

mod client;
mod error;
mod export;
mod handshake;
mod proto;

pub use client::NbdClient;
pub use error::NbdError;
pub use export::{qemu_nbd_available, start_process_thread, Export};

#[cfg(test)]
mod testutil;
