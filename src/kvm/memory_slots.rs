// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory as KVM memory slots, with KVM's dirty-page logging for a
//! live migration.

use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use log::warn;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{KvmError, Result};
use crate::memory::GuestMemoryLog;

/// The page size KVM's dirty log counts in (x86-64).
const PAGE_SIZE: u64 = 4096;

/// Guest memory registered as KVM memory slots, one slot per region.
///
/// The slots hold a clone of the memory (its regions are reference counted),
/// so the host mappings outlive the slots: dropping this removes the slots
/// first and only then lets go of the mappings. If KVM refuses to remove a
/// slot, the mappings are leaked rather than unmapped under the guest.
#[derive(Debug)]
pub struct KvmMemorySlots {
    vm: Arc<VmFd>,
    memory: Option<GuestMemoryLog>,
    slots: Vec<kvm_userspace_memory_region>,
}

impl KvmMemorySlots {
    /// Register every region of `memory` with the VM, in slots numbered
    /// from `first_slot`, without dirty-page logging (see
    /// [`KvmMemorySlots::set_dirty_logging`]).
    pub fn register(vm: Arc<VmFd>, memory: &GuestMemoryLog, first_slot: u32) -> Result<Self> {
        let mut slots = KvmMemorySlots {
            vm,
            memory: Some(memory.clone()),
            slots: Vec::with_capacity(memory.num_regions()),
        };
        for (slot, region) in (first_slot..).zip(memory.iter()) {
            let entry = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the range [userspace_addr, userspace_addr + size) is
            // the live mapping of `region`, which `slots.memory` keeps alive
            // until `Drop` has removed the slot again (or leaks it if KVM
            // refuses). Guest writes through the slot are ordinary writes to
            // shared guest memory, which the kit always accesses through
            // `vm-memory`'s volatile accessors.
            unsafe { slots.vm.set_user_memory_region(entry) }.map_err(|source| {
                KvmError::MemorySlot {
                    slot,
                    gpa: entry.guest_phys_addr,
                    size: entry.memory_size,
                    source,
                }
            })?;
            slots.slots.push(entry);
        }
        Ok(slots)
    }

    /// The slot numbers in use.
    pub fn slots(&self) -> Vec<u32> {
        self.slots.iter().map(|s| s.slot).collect()
    }

    /// Turn KVM's dirty-page logging of the guest's own writes on or off
    /// for every slot (`KVM_MEM_LOG_DIRTY_PAGES`). Turning it on starts
    /// with every page clean; [`KvmMemorySlots::take_dirty_pages`] then
    /// reports what the vCPUs wrote. (Writes the host makes through its
    /// own mapping, a device's, are not seen by KVM: log those with the
    /// kit's [`DirtyLog`](crate::memory::DirtyLog).)
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<()> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for entry in &mut self.slots {
            let updated = kvm_userspace_memory_region { flags, ..*entry };
            // SAFETY: the same slot, host range and size as registered in
            // `register` (still mapped, see there); only the flags change.
            unsafe { self.vm.set_user_memory_region(updated) }.map_err(|source| {
                KvmError::MemorySlot {
                    slot: entry.slot,
                    gpa: entry.guest_phys_addr,
                    size: entry.memory_size,
                    source,
                }
            })?;
            *entry = updated;
        }
        Ok(())
    }

    /// Whether dirty-page logging is on.
    pub fn is_dirty_logging(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.flags & KVM_MEM_LOG_DIRTY_PAGES != 0)
    }

    /// The guest pages (guest physical address / 4096) the vCPUs wrote
    /// since logging was turned on or since the last call, in ascending
    /// order per slot (`KVM_GET_DIRTY_LOG`, which clears what it returns).
    /// Empty while logging is off.
    pub fn take_dirty_pages(&self) -> Result<Vec<u64>> {
        let mut pages = Vec::new();
        for entry in self
            .slots
            .iter()
            .filter(|s| s.flags & KVM_MEM_LOG_DIRTY_PAGES != 0)
        {
            let bitmap = self
                .vm
                .get_dirty_log(entry.slot, entry.memory_size as usize)
                .map_err(|source| KvmError::DirtyLog {
                    slot: entry.slot,
                    source,
                })?;
            let first = entry.guest_phys_addr / PAGE_SIZE;
            for (word_index, word) in bitmap.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    pages.push(first + word_index as u64 * 64 + bit);
                    bits &= bits - 1;
                }
            }
        }
        Ok(pages)
    }
}

impl Drop for KvmMemorySlots {
    fn drop(&mut self) {
        let mut leak = false;
        for entry in self.slots.drain(..) {
            let removal = kvm_userspace_memory_region {
                memory_size: 0,
                ..entry
            };
            // SAFETY: a zero-sized region deletes the slot; KVM stops using
            // the host range, which is still mapped at this point.
            if let Err(source) = unsafe { self.vm.set_user_memory_region(removal) } {
                warn!(
                    "{}",
                    KvmError::MemorySlot {
                        slot: entry.slot,
                        gpa: entry.guest_phys_addr,
                        size: 0,
                        source,
                    }
                );
                leak = true;
            }
        }
        if leak {
            // KVM may still reach these pages: never unmap them.
            std::mem::forget(self.memory.take());
        }
    }
}
