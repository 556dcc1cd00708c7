//! The built-in guest programs as one flat x86-64 image, built from `guest/` by `build.rs`.
//!
//! Load it at guest physical address `0x10_0000` and start every vCPU at its first byte; the
//! layout, entry state and the ABI block it expects are in docs/guest-abi.md.

/// The flat guest image (smaller than 1 MiB), entry point at offset 0.
pub const GUEST_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));

#[cfg(test)]
mod tests {
    use super::GUEST_IMAGE;

    #[test]
    fn image_is_non_empty_and_fits_its_slot() {
        assert!(!GUEST_IMAGE.is_empty());
        // It lives at 0x10_0000, below the generation table at 0x20_0000.
        assert!(GUEST_IMAGE.len() < 1 << 20, "{} bytes", GUEST_IMAGE.len());
    }
}
