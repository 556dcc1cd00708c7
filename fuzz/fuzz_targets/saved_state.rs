//! The saved-state envelope (vmm/src/sealed.rs) and the VM state inside it
//! (vmm/src/microvm/state.rs), as a restore reads them from a snapshot file and a migration
//! target from the source's State message.
//!
//! Input: a mode byte, then bytes. Mode bit 0 clear: the bytes are the blob as it arrives.
//! Set: they are the payload, which the target seals first, so that mutations reach the
//! postcard decoder behind the envelope's checksums. Properties checked besides "no panic":
//! - an envelope that opens is the one `seal` makes of its payload, byte for byte;
//! - any payload comes back out of `seal`/`unseal` as it went in;
//! - a state that decodes encodes again, and that encoding decodes and encodes to itself;
//! - what restore does next with a decoded state does not panic either: parse the guest spec,
//!   rebuild the serial port from its registers (vm-superio refuses an overfull FIFO), preload
//!   the endpoint stream.
#![no_main]

use std::io;

use godwit_api::GuestSpec;
use godwit_vmm::microvm::state::{
    VmState, ACCEPTED_VERSIONS, MAX_STATE_BYTES, STATE_MAGIC, STATE_VERSION,
};
use godwit_vmm::microvm::stream::Stream;
use godwit_vmm::sealed::{seal, unseal};
use libfuzzer_sys::fuzz_target;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// An interrupt line that goes nowhere.
struct NoIrq;

impl Trigger for NoIrq {
    type E = ();

    fn trigger(&self) -> Result<(), ()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    if let Ok((version, payload)) = unseal(bytes, STATE_MAGIC, ACCEPTED_VERSIONS, MAX_STATE_BYTES) {
        assert_eq!(
            seal(STATE_MAGIC, version, payload),
            bytes,
            "not the canonical envelope"
        );
    }
    let sealed = seal(*b"FUZZ", 7, bytes);
    assert_eq!(unseal(&sealed, *b"FUZZ", &[7], bytes.len()), Ok((7, bytes)));

    let blob = if mode & 1 == 1 {
        seal(STATE_MAGIC, STATE_VERSION, bytes)
    } else {
        bytes.to_vec()
    };
    let Ok(state) = VmState::decode(&blob) else {
        return;
    };
    let encoded = state.encode().expect("a decoded state encodes");
    let again = VmState::decode(&encoded).expect("an encoded state decodes");
    assert_eq!(
        again.encode().expect("it encodes again"),
        encoded,
        "the state changed on a round trip"
    );

    let _ = serde_json::from_str::<GuestSpec>(&state.config.guest_json);
    let registers: SerialState = (&state.devices.serial).into();
    if let Ok(mut serial) = Serial::from_state(&registers, NoIrq, NoEvents, io::sink()) {
        for offset in 0..8 {
            serial.read(offset);
        }
    }
    Stream::new().preload(&state.devices.stream_unread);
});
