//! The Godwit migration engine.
//!
//! It moves a VM's memory and state between two hosts over TCP: the wire protocol
//! ([`protocol`]), the page codec that sends each page as zero, raw or zstd ([`codec`]), the
//! stop-and-copy, pre-copy and post-copy modes on both sides, the multi-channel transport and the
//! migration statistics. It knows nothing about KVM or HTTP: the agent hands it a VM through
//! source and target traits and drives it from its own API.

#![forbid(unsafe_code)]

pub mod bitmap;
pub mod channel;
pub mod codec;
pub mod digest;
pub mod error;
pub mod limiter;
pub mod progress;
pub mod protocol;
pub mod source;
pub mod target;
pub mod testing;
pub mod transport;
pub mod vm;

pub use error::MigrationError;
