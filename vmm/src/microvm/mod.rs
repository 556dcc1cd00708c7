//! The KVM microVM monitor: one VM fd, guest memory, a thread per vCPU, COM1 and the guest
//! ports. It creates VMs running a built-in guest, pauses and resumes them, saves their whole
//! state, and restores a saved state into a fresh VM.
//!
//! This module and its children own every KVM ioctl of the agent.

pub mod block;
pub mod cpu_time;
pub mod devices;
pub mod dirty_log;
pub mod entropy;
pub mod layout;
pub mod memory;
pub mod postcopy;
pub mod state;
pub mod stream;
pub mod uffd;
pub mod vcpu;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use godwit_api::GuestSpec;
use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_segment, CpuId, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::guest;
use devices::{DeviceError, Devices, IrqLine, COM1_IRQ};
use layout::{MAX_MEMORY_BYTES, MAX_VCPUS};
use memory::{GuestMemory, MemoryError};
use state::{KvmVmState, StateError, VmConfig, VmState};
use vcpu::{VcpuError, VcpuHandle, VcpuStatus};

/// How long a pause may take before it is an error (a kick answers in well under 1 ms).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The TSS KVM needs on Intel hosts for real-mode emulation: three pages just below 4 GiB.
/// Only real-mode code uses it, which the built-in guests never run, so overlapping the RAM of
/// a VM above 4 GiB does no harm.
const TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM is not available at {}", path.display())]
    KvmUnavailable {
        path: PathBuf,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM call {call} failed")]
    Kvm {
        call: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Invalid VM: {0}")]
    Invalid(String),
    #[error(transparent)]
    Guest(#[from] guest::InvalidGuest),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("Cannot write the guest into memory")]
    Load(#[source] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("The VM must be paused first")]
    NotPaused,
}

fn kvm_err(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { call, source }
}

/// This host's KVM: the open device and what it supports, probed once.
#[derive(Debug)]
pub struct KvmHost {
    kvm: Kvm,
    cpuid: CpuId,
    msr_indices: Arc<Vec<u32>>,
    tsc_khz: u32,
    pub huge_pages: bool,
}

impl KvmHost {
    /// Opens the KVM device and probes the MSRs a vCPU can save and restore.
    pub fn open(path: &Path, huge_pages: bool) -> Result<Self, VmError> {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            VmError::Invalid(format!("KVM device path {} has a NUL", path.display()))
        })?;
        let kvm = Kvm::new_with_path(&c_path).map_err(|source| VmError::KvmUnavailable {
            path: path.to_owned(),
            source,
        })?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let listed = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        // Keep only MSRs a vCPU really lets us read and write back: a restore must not fail on
        // an MSR the kernel lists but refuses.
        let probe_vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let probe = probe_vm
            .create_vcpu(0)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        probe
            .set_cpuid2(&cpuid)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        let msr_indices: Vec<u32> = listed
            .as_slice()
            .iter()
            .copied()
            .filter(|&index| msr_round_trips(&probe, index))
            .collect();
        let tsc_khz = probe.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
        tracing::info!(
            msrs = msr_indices.len(),
            listed = listed.as_slice().len(),
            tsc_khz,
            "KVM opened"
        );
        Ok(KvmHost {
            kvm,
            cpuid,
            msr_indices: Arc::new(msr_indices),
            tsc_khz,
            huge_pages,
        })
    }

    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    fn cpuid_for(&self, vcpu: u32) -> CpuId {
        let mut cpuid = self.cpuid.clone();
        for entry in cpuid.as_mut_slice() {
            match entry.function {
                // Initial APIC id in EBX[31:24]; x2APIC id in EDX of the topology leaves.
                1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (vcpu << 24),
                0xb | 0x1f => entry.edx = vcpu,
                _ => {}
            }
        }
        cpuid
    }
}

fn msr_round_trips(vcpu: &VcpuFd, index: u32) -> bool {
    let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }]) else {
        return false;
    };
    matches!(vcpu.get_msrs(&mut msrs), Ok(1)) && matches!(vcpu.set_msrs(&msrs), Ok(1))
}

/// Where a VM writes its console and what it is called.
#[derive(Debug, Clone)]
pub struct VmPlacement {
    pub name: String,
    pub console_path: PathBuf,
    /// The resource devices it is built with.
    pub attachments: devices::Attachments,
}

/// A VM built ahead of its state: KVM VM with memory slots and vCPUs that have not run.
#[derive(Debug)]
pub struct PreparedVm {
    vm: VmFd,
    memory: GuestMemory,
    fds: Vec<VcpuFd>,
}

/// A running (or paused, or crashed) microVM.
///
/// Field order is drop order: vCPU threads end before the VM fd closes, and the VM fd closes
/// before its memory is unmapped.
#[derive(Debug)]
pub struct MicroVm {
    vcpus: Vec<VcpuHandle>,
    devices: Arc<Devices>,
    vm: VmFd,
    memory: GuestMemory,
    name: String,
    config: VmConfig,
    guest: GuestSpec,
    paused: bool,
}

impl MicroVm {
    /// Checks a VM shape and workload without touching KVM or memory.
    pub fn validate(vcpus: u32, memory_bytes: u64, guest: &GuestSpec) -> Result<(), VmError> {
        check_shape(vcpus, memory_bytes)?;
        guest::params(guest, vcpus, memory_bytes, 1, 0)?;
        Ok(())
    }

    /// Creates a VM running the built-in guest `guest`.
    pub fn create(
        host: &KvmHost,
        placement: &VmPlacement,
        vcpus: u32,
        memory_bytes: u64,
        guest: &GuestSpec,
        start_paused: bool,
    ) -> Result<Self, VmError> {
        check_shape(vcpus, memory_bytes)?;
        let seed = u64::from_le_bytes(
            blake3::hash(placement.name.as_bytes()).as_bytes()[..8]
                .try_into()
                .unwrap_or_default(),
        );
        let params = guest::params(guest, vcpus, memory_bytes, host.tsc_khz, seed)?;
        let memory = memory::allocate(memory_bytes, host.huge_pages)?;
        layout::write_boot_structures(&memory, memory_bytes).map_err(VmError::Load)?;
        guest::load(&memory, &params).map_err(VmError::Load)?;

        let vm = create_kvm_vm(host, &memory)?;
        let devices = Arc::new(create_devices(&vm, placement, &memory, None)?);
        let config = VmConfig {
            vcpus,
            memory_bytes,
            guest_json: serde_json::to_string(guest)
                .map_err(|e| VmError::Invalid(format!("guest spec does not serialize: {e}")))?,
            tsc_khz: host.tsc_khz,
        };
        let mut fds = Vec::with_capacity(vcpus as usize);
        for id in 0..vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&host.cpuid_for(id))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            configure_boot_vcpu(&fd, id)?;
            if id > 0 {
                vcpu::make_runnable(&fd, id)?;
            }
            fds.push(fd);
        }
        let vcpus = spawn_vcpus(fds, host, &placement.name, &devices, start_paused)?;
        Ok(MicroVm {
            vcpus,
            devices,
            vm,
            memory,
            name: placement.name.clone(),
            config,
            guest: guest.clone(),
            paused: start_paused,
        })
    }

    /// Builds a VM from saved state and memory that already holds the saved contents. The
    /// vCPUs are fresh (a PVM vCPU's privilege level can only be set before its first run).
    pub fn restore(
        host: &KvmHost,
        placement: &VmPlacement,
        state: &VmState,
        memory: GuestMemory,
        start_paused: bool,
    ) -> Result<Self, VmError> {
        let prepared = Self::prepare(host, memory, state.config.vcpus)?;
        Self::restore_prepared(host, placement, state, prepared, start_paused)
    }

    /// The part of a restore that needs no state: the KVM VM, its memory slots and vCPUs.
    /// A migration target does this before the switchover, so the guest's downtime only
    /// covers loading the state.
    pub fn prepare(host: &KvmHost, memory: GuestMemory, vcpus: u32) -> Result<PreparedVm, VmError> {
        check_shape(vcpus, memory::size(&memory))?;
        let vm = create_kvm_vm(host, &memory)?;
        let fds = (0..vcpus)
            .map(|id| {
                vm.create_vcpu(u64::from(id))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PreparedVm { vm, memory, fds })
    }

    /// Loads saved state into a prepared VM and starts its vCPU threads.
    pub fn restore_prepared(
        host: &KvmHost,
        placement: &VmPlacement,
        state: &VmState,
        prepared: PreparedVm,
        start_paused: bool,
    ) -> Result<Self, VmError> {
        let PreparedVm { vm, memory, fds } = prepared;
        check_shape(state.config.vcpus, state.config.memory_bytes)?;
        if memory::size(&memory) != state.config.memory_bytes || fds.len() != state.vcpus.len() {
            return Err(VmError::Invalid(format!(
                "a VM of {} bytes and {} vCPUs cannot take the state of one of {} bytes and {} vCPUs",
                memory::size(&memory),
                fds.len(),
                state.config.memory_bytes,
                state.vcpus.len()
            )));
        }
        let guest: GuestSpec = serde_json::from_str(&state.config.guest_json)
            .map_err(|e| VmError::Invalid(format!("saved guest spec does not parse: {e}")))?;
        restore_kvm_vm_state(&vm, &state.vm)?;
        let devices = Arc::new(create_devices(
            &vm,
            placement,
            &memory,
            Some(&state.devices),
        )?);
        for (fd, saved) in fds.iter().zip(&state.vcpus) {
            vcpu::restore_vcpu(fd, saved)?;
        }
        let vcpus = spawn_vcpus(fds, host, &placement.name, &devices, start_paused)?;
        Ok(MicroVm {
            vcpus,
            devices,
            vm,
            memory,
            name: placement.name.clone(),
            config: state.config.clone(),
            guest,
            paused: start_paused,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn guest(&self) -> &GuestSpec {
        &self.guest
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Why the guest crashed, if any vCPU did.
    pub fn crash_reason(&self) -> Option<String> {
        self.vcpus.iter().find_map(|v| {
            (v.status() == VcpuStatus::Crashed).then(|| v.crash_reason().unwrap_or_default())
        })
    }

    /// Stops every vCPU and waits until all are parked.
    pub fn pause(&mut self) -> Result<(), VmError> {
        for vcpu in &self.vcpus {
            vcpu.request_pause();
        }
        for vcpu in &self.vcpus {
            vcpu.wait_parked(PAUSE_TIMEOUT)?;
        }
        self.paused = true;
        Ok(())
    }

    pub fn resume(&mut self) {
        for vcpu in &self.vcpus {
            vcpu.resume();
        }
        self.paused = false;
    }

    /// Saves vCPU, VM and device state. The VM must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        if !self.paused {
            return Err(VmError::NotPaused);
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| v.save())
            .collect::<Result<Vec<_>, _>>()?;
        let mut irqchips = Vec::with_capacity(3);
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut chip)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        let vm = KvmVmState {
            irqchips,
            pit: self.vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: self.vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        };
        Ok(VmState {
            config: self.config.clone(),
            vcpus,
            vm,
            devices: self.devices.state(),
        })
    }

    /// CPU time of each vCPU thread, seconds.
    pub fn vcpu_cpu_seconds(&self) -> Vec<f64> {
        self.vcpus.iter().map(|v| v.cpu_seconds()).collect()
    }

    /// What the guest reports about its devices, when it has any.
    pub fn guest_devices(&self) -> Option<godwit_api::GuestDevices> {
        let a = self.devices.attachments();
        if a.disk.is_none() && a.entropy.is_none() && a.stream.is_none() {
            return None;
        }
        guest::read_devices(&self.memory).ok()
    }

    pub fn guest_status(&self) -> Result<Vec<guest::VcpuGuestStatus>, VmError> {
        guest::read_status(&self.memory, self.config.vcpus).map_err(VmError::Load)
    }

    pub fn digest(&self) -> Result<String, VmError> {
        Ok(memory::digest(&self.memory)?)
    }

    /// Starts recording dirty pages (KVM's log and the monitor's own writes).
    pub fn start_dirty_log(&self) -> Result<(), dirty_log::DirtyLogError> {
        dirty_log::start(&self.vm, &self.memory)
    }

    /// Dirty pages since the last harvest, as bitmap words per memory region.
    pub fn harvest_dirty(&self) -> Result<Vec<Vec<u64>>, dirty_log::DirtyLogError> {
        dirty_log::harvest(&self.vm, &self.memory)
    }

    pub fn stop_dirty_log(&self) -> Result<(), dirty_log::DirtyLogError> {
        dirty_log::stop(&self.vm, &self.memory)
    }
}

fn check_shape(vcpus: u32, memory_bytes: u64) -> Result<(), VmError> {
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(VmError::Invalid(format!(
            "vcpus must be 1-{MAX_VCPUS}, not {vcpus}"
        )));
    }
    if memory_bytes == 0 || memory_bytes % (2 << 20) != 0 || memory_bytes > MAX_MEMORY_BYTES {
        return Err(VmError::Invalid(format!(
            "memory must be a multiple of 2 MiB between 2 MiB and {} GiB, not {memory_bytes} bytes",
            MAX_MEMORY_BYTES >> 30
        )));
    }
    Ok(())
}

fn create_kvm_vm(host: &KvmHost, memory: &GuestMemory) -> Result<VmFd, VmError> {
    let vm = host.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    memory::register(&vm, memory, false)?;
    Ok(vm)
}

fn restore_kvm_vm_state(vm: &VmFd, state: &KvmVmState) -> Result<(), VmError> {
    vm.set_pit2(&state.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    let mut clock = state.clock;
    // Flags such as KVM_CLOCK_TSC_STABLE describe the source; KVM refuses them on input.
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    for chip in &state.irqchips {
        vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

fn create_devices(
    vm: &VmFd,
    placement: &VmPlacement,
    memory: &GuestMemory,
    state: Option<&devices::DevicesState>,
) -> Result<Devices, VmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Kvm {
        call: "eventfd",
        source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD"))?;
    Ok(Devices::new(
        &placement.name,
        &placement.console_path,
        IrqLine(irq),
        memory.clone(),
        placement.attachments.clone(),
        state,
    )?)
}

/// Puts a fresh vCPU at the guest entry point in 64-bit mode at CPL3 (docs/guest-abi.md).
fn configure_boot_vcpu(fd: &VcpuFd, id: u32) -> Result<(), VmError> {
    let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let segment = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = segment(layout::USER_CODE_SELECTOR, 0xb, 1, 0);
    let data = segment(layout::USER_DATA_SELECTOR, 0x3, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = layout::GDT_LIMIT;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8000_0011; // PG, ET, PE
    sregs.efer = 0x500; // LMA, LME
    fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: layout::IMAGE_ADDR,
        rsp: layout::stack_top(id),
        rdi: u64::from(id),
        rsi: layout::ABI_ADDR,
        rflags: 0x2,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(())
}

fn spawn_vcpus(
    fds: Vec<VcpuFd>,
    host: &KvmHost,
    name: &str,
    devices: &Arc<Devices>,
    start_paused: bool,
) -> Result<Vec<VcpuHandle>, VmError> {
    let mut handles = Vec::with_capacity(fds.len());
    for (id, fd) in fds.into_iter().enumerate() {
        handles.push(VcpuHandle::spawn(
            fd,
            id as u32,
            name,
            devices.clone(),
            host.msr_indices.clone(),
            start_paused,
        )?);
    }
    if start_paused {
        // A VM reported paused must be paused: state can be saved right away.
        for vcpu in &handles {
            vcpu.wait_parked(PAUSE_TIMEOUT)?;
        }
    }
    Ok(handles)
}
