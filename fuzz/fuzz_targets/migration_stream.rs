// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A live-migration stream as `vmm-example --migrate-from` reads it,
//! untrusted: the header, every record (RAM, STATE, END) with its checksum
//! and bounds, and the VM state's JSON. Nothing may panic; every RAM record
//! the reader hands out lies inside the RAM the header announced; the
//! reader stops at END.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_example::vmm::migration::stream::{Record, StreamReader, PAGE_SIZE};
use vmm_example::vmm::snapshot::VmState;

/// The most RAM this target accepts (the VMM's limit is 3 GiB; the bound
/// checks are the same).
const MAX_RAM: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = StreamReader::new(data, MAX_RAM) else {
        return;
    };
    let ram_len = reader.ram_len();
    assert!(ram_len > 0 && ram_len <= MAX_RAM && ram_len % PAGE_SIZE == 0);
    loop {
        match reader.next_record() {
            Ok(Record::Ram { gpa, data }) => {
                assert_eq!(gpa % PAGE_SIZE, 0);
                assert_eq!(data.len() as u64 % PAGE_SIZE, 0);
                assert!(gpa + data.len() as u64 <= ram_len);
            }
            Ok(Record::State(json)) => {
                let _ = serde_json::from_slice::<VmState>(json);
            }
            Ok(Record::End) => {
                assert!(reader.next_record().is_err(), "a record after END");
                return;
            }
            Err(_) => return,
        }
    }
});
