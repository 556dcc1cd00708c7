//! NBD client and qemu-nbd export supervisor (being written).
#![forbid(unsafe_code)]
