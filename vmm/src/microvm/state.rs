//! A microVM's saved state: every vCPU's registers and the VM-wide KVM and device state, in a
//! versioned, checksummed, size-capped encoding (postcard inside a `sealed` envelope).
//!
//! This blob is what a snapshot file stores next to memory, and what a migration sends at
//! switchover. Guest memory is not in it.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use super::devices::DevicesState;
use crate::sealed::{self, SealedError};

/// Envelope magic of a VM state blob.
pub const STATE_MAGIC: [u8; 4] = *b"GVMS";
/// Current encoding version; `ACCEPTED_VERSIONS` lists what this build can read.
/// Version 2 added the endpoint stream's unread bytes to the device state; version 1 blobs
/// (snapshots of the first release) are refused with a clear error.
pub const STATE_VERSION: u16 = 2;
pub const ACCEPTED_VERSIONS: &[u16] = &[2];
/// No honest state blob comes near this: 4 vCPUs of about 10 KiB each plus a few KiB of devices.
pub const MAX_STATE_BYTES: usize = 4 << 20;

/// Everything of one vCPU that KVM holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: u32,
}

/// VM-wide KVM state: the in-kernel PICs and IOAPIC, the PIT, the KVM clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// What a VM was created as; restored VMs keep it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmConfig {
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// The guest spec as JSON (postcard cannot carry serde's internally tagged enums).
    pub guest_json: String,
    pub tsc_khz: u32,
}

/// The whole saved state of a paused VM, less its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub config: VmConfig,
    pub vcpus: Vec<VcpuState>,
    pub vm: KvmVmState,
    pub devices: DevicesState,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("The VM state blob is damaged or of an unknown kind")]
    Envelope(#[source] SealedError),
    #[error("The VM state blob does not decode")]
    Decode(#[source] postcard::Error),
    #[error("Cannot encode the VM state")]
    Encode(#[source] postcard::Error),
    #[error("The VM state is inconsistent: {0}")]
    Inconsistent(String),
}

impl VmState {
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let payload = postcard::to_stdvec(self).map_err(StateError::Encode)?;
        Ok(sealed::seal(STATE_MAGIC, STATE_VERSION, &payload))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let (_version, payload) =
            sealed::unseal(bytes, STATE_MAGIC, ACCEPTED_VERSIONS, MAX_STATE_BYTES)
                .map_err(StateError::Envelope)?;
        let state: VmState = postcard::from_bytes(payload).map_err(StateError::Decode)?;
        state.check()?;
        Ok(state)
    }

    /// Checks what the encoding cannot: counts and ids agree.
    fn check(&self) -> Result<(), StateError> {
        let n = self.vcpus.len();
        if n == 0 || n != self.config.vcpus as usize {
            return Err(StateError::Inconsistent(format!(
                "{n} vCPU states for a VM of {} vCPUs",
                self.config.vcpus
            )));
        }
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            if vcpu.id as usize != i {
                return Err(StateError::Inconsistent(format!(
                    "vCPU state {i} carries id {}",
                    vcpu.id
                )));
            }
        }
        if self.vm.irqchips.len() != 3 {
            return Err(StateError::Inconsistent(format!(
                "{} irqchip states instead of 3",
                self.vm.irqchips.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::microvm::devices::SerialRegisters;

    fn sample() -> VmState {
        let vcpu = VcpuState {
            id: 0,
            cpuid: vec![kvm_cpuid_entry2::default(); 3],
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs {
                rip: 0x10_0000,
                rsp: 0x6_4000,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 12345,
                ..Default::default()
            }],
            events: kvm_vcpu_events::default(),
            tsc_khz: 2_000_000,
        };
        VmState {
            config: VmConfig {
                vcpus: 1,
                memory_bytes: 64 << 20,
                guest_json: r#"{"kind":"idle"}"#.into(),
                tsc_khz: 2_000_000,
            },
            vcpus: vec![vcpu],
            vm: KvmVmState {
                irqchips: vec![kvm_irqchip::default(); 3],
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data::default(),
            },
            devices: DevicesState {
                serial: SerialRegisters {
                    baud_divisor_low: 12,
                    baud_divisor_high: 0,
                    interrupt_enable: 0,
                    interrupt_identification: 1,
                    line_control: 3,
                    line_status: 0x60,
                    modem_control: 8,
                    modem_status: 0xb0,
                    scratch: 0,
                    in_buffer: vec![],
                },
                stream_unread: vec![1, 2, 3],
            },
        }
    }

    #[test]
    fn round_trips() {
        let state = sample();
        let bytes = state.encode().unwrap();
        let back = VmState::decode(&bytes).unwrap();
        assert_eq!(back.vcpus[0].regs.rip, 0x10_0000);
        assert_eq!(back.vcpus[0].msrs[0].data, 12345);
        assert_eq!(back.config, state.config);
        assert_eq!(back.devices, state.devices);
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let bytes = sample().encode().unwrap();
        for cut in 0..bytes.len() {
            assert!(VmState::decode(&bytes[..cut]).is_err());
        }
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(VmState::decode(&b).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn inconsistent_counts_are_rejected() {
        let mut state = sample();
        state.config.vcpus = 2;
        let bytes = state.encode().unwrap();
        let err = VmState::decode(&bytes).unwrap_err();
        assert!(err.to_string().contains("inconsistent"), "{err}");
    }
}
