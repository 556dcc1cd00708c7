//! Sealed envelopes for state blobs.
//!
//! vCPU and device state is saved as an opaque blob that later travels to another process,
//! another host or another build of the agent: inside a snapshot file, or over the network
//! during a migration. A sealed envelope makes such a blob safe to accept from outside: the
//! caller's magic says what kind of blob it is, the version says which format the payload is
//! in, both checksums catch corruption, and the payload length is checked against a cap
//! before anything is sliced or allocated, so a hostile or damaged blob is an error and
//! never a panic.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! offset  size  field
//!      0     4  magic, chosen by the caller (e.g. b"GVMS")
//!      4     2  payload format version
//!      6     2  reserved, must be 0
//!      8     8  payload length in bytes
//!     16     4  crc32 of the payload
//!     20     4  crc32 of bytes 0..20
//!     24     n  payload
//! ```
#![deny(unsafe_code)]

/// Length of the envelope header that precedes the payload.
pub const HEADER_LEN: usize = 24;

/// The header bytes covered by the header checksum.
const HEADER_CRC_COVERS: usize = 20;

/// Why a blob could not be unsealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealedError {
    /// The blob ends before its header or payload does.
    #[error("Sealed blob is truncated: expected {expected} bytes, got {actual}")]
    Truncated { expected: u64, actual: u64 },
    /// The blob is not of the kind the caller expects.
    #[error(
        "Sealed blob has the wrong magic: expected \"{}\", found \"{}\"",
        expected.escape_ascii(),
        found.escape_ascii()
    )]
    WrongMagic { expected: [u8; 4], found: [u8; 4] },
    /// The payload is in a format version this build does not read.
    #[error("Sealed blob has unsupported version {found} (accepted: {accepted:?})")]
    UnsupportedVersion { found: u16, accepted: Vec<u16> },
    /// The reserved header field is not zero.
    #[error("Sealed blob has a non-zero reserved field ({0:#06x})")]
    NonZeroReserved(u16),
    /// The header is damaged.
    #[error(
        "Sealed blob header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
    )]
    HeaderChecksumMismatch { stored: u32, computed: u32 },
    /// The payload length field is above the caller's cap.
    #[error("Sealed blob payload of {length} bytes is larger than the limit of {limit} bytes")]
    PayloadTooLarge { length: u64, limit: usize },
    /// The payload is damaged.
    #[error(
        "Sealed blob payload checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
    )]
    PayloadChecksumMismatch { stored: u32, computed: u32 },
    /// The blob continues after the payload.
    #[error("Sealed blob has {0} trailing bytes after the payload")]
    TrailingBytes(usize),
}

/// Wraps `payload` in an envelope with the given magic and format version.
pub fn seal(magic: [u8; 4], version: u16, payload: &[u8]) -> Vec<u8> {
    let mut sealed = Vec::with_capacity(HEADER_LEN + payload.len());
    sealed.extend_from_slice(&magic);
    sealed.extend_from_slice(&version.to_le_bytes());
    sealed.extend_from_slice(&0u16.to_le_bytes());
    sealed.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    sealed.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let header_crc = crc32fast::hash(&sealed[..HEADER_CRC_COVERS]);
    sealed.extend_from_slice(&header_crc.to_le_bytes());
    sealed.extend_from_slice(payload);
    sealed
}

/// Checks an envelope made by [`seal`] and returns its version and payload.
///
/// `bytes` must be exactly one envelope, with the given `magic`, a version listed in
/// `accepted_versions` and a payload of at most `max_payload` bytes.
///
/// # Errors
///
/// Returns the first problem found, checking the header before the payload; see
/// [`SealedError`].
pub fn unseal<'a>(
    bytes: &'a [u8],
    magic: [u8; 4],
    accepted_versions: &[u16],
    max_payload: usize,
) -> Result<(u16, &'a [u8]), SealedError> {
    let Some((header, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(SealedError::Truncated {
            expected: HEADER_LEN as u64,
            actual: bytes.len() as u64,
        });
    };
    let header = Header::parse(header);

    if header.magic != magic {
        return Err(SealedError::WrongMagic {
            expected: magic,
            found: header.magic,
        });
    }
    let computed = crc32fast::hash(&bytes[..HEADER_CRC_COVERS]);
    if header.header_crc != computed {
        return Err(SealedError::HeaderChecksumMismatch {
            stored: header.header_crc,
            computed,
        });
    }
    if header.reserved != 0 {
        return Err(SealedError::NonZeroReserved(header.reserved));
    }
    if !accepted_versions.contains(&header.version) {
        return Err(SealedError::UnsupportedVersion {
            found: header.version,
            accepted: accepted_versions.to_vec(),
        });
    }
    // The cap is checked on the raw field, before it becomes a slice bound.
    let length = match usize::try_from(header.payload_len) {
        Ok(length) if length <= max_payload => length,
        _ => {
            return Err(SealedError::PayloadTooLarge {
                length: header.payload_len,
                limit: max_payload,
            })
        }
    };
    let Some((payload, trailing)) = rest.split_at_checked(length) else {
        return Err(SealedError::Truncated {
            expected: header.payload_len.saturating_add(HEADER_LEN as u64),
            actual: bytes.len() as u64,
        });
    };
    if !trailing.is_empty() {
        return Err(SealedError::TrailingBytes(trailing.len()));
    }
    let computed = crc32fast::hash(payload);
    if header.payload_crc != computed {
        return Err(SealedError::PayloadChecksumMismatch {
            stored: header.payload_crc,
            computed,
        });
    }
    Ok((header.version, payload))
}

/// The decoded header fields, not yet validated.
struct Header {
    magic: [u8; 4],
    version: u16,
    reserved: u16,
    payload_len: u64,
    payload_crc: u32,
    header_crc: u32,
}

impl Header {
    /// Constant indices into a fixed-size array are bounds-checked at compile time.
    fn parse(h: &[u8; HEADER_LEN]) -> Self {
        Header {
            magic: [h[0], h[1], h[2], h[3]],
            version: u16::from_le_bytes([h[4], h[5]]),
            reserved: u16::from_le_bytes([h[6], h[7]]),
            payload_len: u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
            payload_crc: u32::from_le_bytes([h[16], h[17], h[18], h[19]]),
            header_crc: u32::from_le_bytes([h[20], h[21], h[22], h[23]]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use page_transfer::testing::XorShift;

    const MAGIC: [u8; 4] = *b"GVMS";
    const LIMIT: usize = 1 << 20;

    fn sample() -> Vec<u8> {
        seal(MAGIC, 2, b"vcpu registers and device state")
    }

    #[test]
    fn round_trip() {
        for payload in [&b""[..], b"x", &[0xa5; 4096]] {
            let sealed = seal(MAGIC, 7, payload);
            assert_eq!(sealed.len(), HEADER_LEN + payload.len());
            assert_eq!(unseal(&sealed, MAGIC, &[7], LIMIT), Ok((7, payload)));
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let sealed = sample();
        for length in 0..sealed.len() {
            let error = unseal(&sealed[..length], MAGIC, &[2], LIMIT).unwrap_err();
            assert_eq!(
                error,
                SealedError::Truncated {
                    expected: if length < HEADER_LEN {
                        HEADER_LEN as u64
                    } else {
                        sealed.len() as u64
                    },
                    actual: length as u64,
                }
            );
        }
    }

    #[test]
    fn every_bit_flip_is_an_error() {
        let sealed = sample();
        for bit in 0..sealed.len() * 8 {
            let mut flipped = sealed.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                unseal(&flipped, MAGIC, &[2], LIMIT).is_err(),
                "flipping bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut sealed = sample();
        sealed.push(0);
        assert_eq!(
            unseal(&sealed, MAGIC, &[2], LIMIT),
            Err(SealedError::TrailingBytes(1))
        );
    }

    #[test]
    fn oversized_length_is_rejected_before_slicing() {
        // A consistent header that claims far more payload than the cap, with no payload.
        let mut sealed = seal(MAGIC, 2, b"");
        sealed[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let header_crc = crc32fast::hash(&sealed[..HEADER_CRC_COVERS]);
        sealed[20..24].copy_from_slice(&header_crc.to_le_bytes());
        assert_eq!(
            unseal(&sealed, MAGIC, &[2], LIMIT),
            Err(SealedError::PayloadTooLarge {
                length: u64::MAX,
                limit: LIMIT
            })
        );

        let sealed = seal(MAGIC, 2, &[1; 100]);
        assert_eq!(
            unseal(&sealed, MAGIC, &[2], 99),
            Err(SealedError::PayloadTooLarge {
                length: 100,
                limit: 99
            })
        );
        assert!(unseal(&sealed, MAGIC, &[2], 100).is_ok());
    }

    #[test]
    fn wrong_magic_is_rejected() {
        let error = unseal(&sample(), *b"GDEV", &[2], LIMIT).unwrap_err();
        assert_eq!(
            error,
            SealedError::WrongMagic {
                expected: *b"GDEV",
                found: MAGIC
            }
        );
        assert_eq!(
            error.to_string(),
            "Sealed blob has the wrong magic: expected \"GDEV\", found \"GVMS\""
        );
    }

    #[test]
    fn versions_are_accepted_only_when_listed() {
        let old = seal(MAGIC, 1, b"old format");
        assert_eq!(
            unseal(&old, MAGIC, &[2, 1], LIMIT),
            Ok((1, &b"old format"[..]))
        );
        let error = unseal(&old, MAGIC, &[2], LIMIT).unwrap_err();
        assert_eq!(
            error.to_string(),
            "Sealed blob has unsupported version 1 (accepted: [2])"
        );
    }

    #[test]
    fn non_zero_reserved_is_rejected() {
        let mut sealed = sample();
        sealed[6] = 1;
        let header_crc = crc32fast::hash(&sealed[..HEADER_CRC_COVERS]);
        sealed[20..24].copy_from_slice(&header_crc.to_le_bytes());
        assert_eq!(
            unseal(&sealed, MAGIC, &[2], LIMIT),
            Err(SealedError::NonZeroReserved(1))
        );
    }

    #[test]
    fn fuzzed_input_never_panics() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let original = seal(MAGIC, 2, &[0x5a; 64]);
        for _ in 0..20_000 {
            // Random bytes, sometimes behind a valid magic so later checks are reached.
            let mut noise: Vec<u8> = (0..rng.below(80)).map(|_| rng.next_u64() as u8).collect();
            if noise.len() >= 4 && rng.below(2) == 0 {
                noise[..4].copy_from_slice(&MAGIC);
            }
            let _ = unseal(&noise, MAGIC, &[2], LIMIT);

            let mut mutated = original.clone();
            for _ in 0..=rng.below(4) {
                match rng.below(4) {
                    0 if !mutated.is_empty() => {
                        let bit = rng.below(mutated.len() * 8);
                        mutated[bit / 8] ^= 1 << (bit % 8);
                    }
                    1 if !mutated.is_empty() => {
                        let at = rng.below(mutated.len());
                        mutated[at] = rng.next_u64() as u8;
                    }
                    2 => mutated.truncate(rng.below(mutated.len() + 1)),
                    _ => mutated.extend((0..=rng.below(8)).map(|_| rng.next_u64() as u8)),
                }
            }
            let result = unseal(&mutated, MAGIC, &[2], LIMIT);
            if mutated != original {
                assert!(result.is_err(), "mutation went unnoticed: {mutated:02x?}");
            }
        }
    }
}
