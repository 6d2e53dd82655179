// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`decode`] on wire bytes alone: sizes, ranges and fd counts.

use super::*;

fn fd() -> File {
    File::open("/dev/null").expect("/dev/null")
}

fn fds(n: usize) -> Vec<File> {
    (0..n).map(|_| fd()).collect()
}

fn words32(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decode `req` with a payload of 32-bit `words` and no fds.
fn decode_words(req: FrontendReq, words: &[u32]) -> Result<Request, RequestError> {
    decode(req, &words32(words), vec![])
}

fn words64(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn ok(r: Result<Request, RequestError>) -> Request {
    match r {
        Ok(r) => r,
        Err(e) => panic!("refused: {e}"),
    }
}

fn refused(r: Result<Request, RequestError>) -> RequestError {
    match r {
        Ok(_) => panic!("decoded a request that should be refused"),
        Err(e) => e,
    }
}

fn is_bad_payload(e: &RequestError) -> bool {
    matches!(e, RequestError::BadPayload { .. })
}

#[test]
fn u64_requests_need_exactly_eight_bytes() {
    let r = ok(decode(
        FrontendReq::SET_FEATURES,
        &words64(&[0x1234]),
        vec![],
    ));
    assert!(matches!(r, Request::SetFeatures(0x1234)));
    for len in [0, 4, 7, 9, 16] {
        let e = refused(decode(FrontendReq::SET_FEATURES, &vec![0; len], vec![]));
        assert!(is_bad_payload(&e), "{len} bytes: {e}");
    }
}

#[test]
fn requests_without_payload_decode_from_nothing() {
    for (req, want) in [
        (FrontendReq::GET_FEATURES, "GetFeatures"),
        (FrontendReq::RESET_OWNER, "Reset"),
        (FrontendReq::RESET_DEVICE, "Reset"),
        (FrontendReq::GET_QUEUE_NUM, "GetQueueNum"),
        (FrontendReq::CHECK_DEVICE_STATE, "CheckDeviceState"),
    ] {
        let got = match ok(decode(req, &[], vec![])) {
            Request::GetFeatures => "GetFeatures",
            Request::Reset => "Reset",
            Request::GetQueueNum => "GetQueueNum",
            Request::CheckDeviceState => "CheckDeviceState",
            _ => "something else",
        };
        assert_eq!(got, want, "{req:?}");
    }
}

#[test]
fn vring_base_and_enable_values_are_range_checked() {
    let r = ok(decode_words(FrontendReq::SET_VRING_BASE, &[1, 0xffff]));
    assert!(matches!(
        r,
        Request::SetVringBase {
            index: 1,
            base: 0xffff
        }
    ));
    let e = refused(decode_words(FrontendReq::SET_VRING_BASE, &[1, 0x1_0000]));
    assert!(is_bad_payload(&e), "{e}");
    let r = ok(decode_words(FrontendReq::SET_VRING_ENABLE, &[3, 1]));
    assert!(matches!(
        r,
        Request::SetVringEnable {
            index: 3,
            enable: true
        }
    ));
    let e = refused(decode_words(FrontendReq::SET_VRING_ENABLE, &[3, 2]));
    assert!(is_bad_payload(&e), "{e}");
}

#[test]
fn vring_fds_follow_the_no_fd_flag() {
    let r = ok(decode(FrontendReq::SET_VRING_CALL, &words64(&[2]), fds(1)));
    assert!(matches!(
        r,
        Request::SetVringFd {
            kind: VringFdKind::Call,
            index: 2,
            file: Some(_)
        }
    ));
    let r = ok(decode(
        FrontendReq::SET_VRING_ERR,
        &words64(&[0x102]),
        vec![],
    ));
    assert!(matches!(
        r,
        Request::SetVringFd {
            kind: VringFdKind::Err,
            index: 2,
            file: None
        }
    ));
    // An fd is needed without the flag, exactly one.
    for n in [0, 2] {
        let e = refused(decode(FrontendReq::SET_VRING_KICK, &words64(&[0]), fds(n)));
        assert!(
            matches!(e, RequestError::BadFds { got, .. } if got == n),
            "{e}"
        );
    }
    // Bits beyond the index and the flag are refused.
    let e = refused(decode(
        FrontendReq::SET_VRING_KICK,
        &words64(&[0x200]),
        fds(1),
    ));
    assert!(
        matches!(e, RequestError::Core(CoreError::QueueIndex(0))),
        "{e}"
    );
}

#[test]
fn a_memory_table_has_one_to_thirty_two_regions_and_one_fd_each() {
    let region = |gpa: u64| words64(&[gpa, 0x1000, 0x7f00_0000_0000 + gpa, 0]);
    let table = |n: u32| {
        let mut p = words32(&[n, 0]);
        for i in 0..u64::from(n) {
            p.extend(region(i << 20));
        }
        p
    };
    match ok(decode(FrontendReq::SET_MEM_TABLE, &table(2), fds(2))) {
        Request::SetMemTable { header, regions } => {
            assert_eq!({ header.num_regions }, 2);
            let gpas: Vec<u64> = regions.iter().map(|(r, _)| r.guest_phys_addr).collect();
            assert_eq!(gpas, [0, 1 << 20]);
        }
        _ => panic!("not a memory table"),
    }
    assert_eq!(MAX_ATTACHED_FD_ENTRIES, 32);
    for n in [0, 33] {
        let e = refused(decode(
            FrontendReq::SET_MEM_TABLE,
            &table(n),
            fds(n as usize),
        ));
        assert!(is_bad_payload(&e), "{n} regions: {e}");
    }
    // The count in the header must match the regions sent...
    let mut short = table(2);
    short.truncate(short.len() - 8);
    assert!(is_bad_payload(&refused(decode(
        FrontendReq::SET_MEM_TABLE,
        &short,
        fds(2)
    ))));
    // ... and the fds.
    let e = refused(decode(FrontendReq::SET_MEM_TABLE, &table(2), fds(1)));
    assert!(
        matches!(
            e,
            RequestError::BadFds {
                expected: 2,
                got: 1,
                ..
            }
        ),
        "{e}"
    );
    // A header cut short is not read past its end.
    assert!(is_bad_payload(&refused(decode(
        FrontendReq::SET_MEM_TABLE,
        &[1, 0, 0],
        vec![]
    ))));
}

#[test]
fn config_accesses_stay_inside_the_config_space() {
    let mut p = words32(&[8, 4, 0]);
    p.extend([1, 2, 3, 4]);
    match ok(decode(FrontendReq::SET_CONFIG, &p, vec![])) {
        Request::SetConfig { offset, data } => {
            assert_eq!((offset, data.as_slice()), (8, &[1u8, 2, 3, 4][..]));
        }
        _ => panic!("not SET_CONFIG"),
    }
    let cases: [(&[u32], usize); 4] = [
        (&[0, 4, 0], 3),                          // fewer bytes than the size says
        (&[0, 4, 0], 5),                          // more
        (&[VHOST_USER_CONFIG_SIZE - 2, 4, 0], 4), // past the end
        (&[u32::MAX, 4, 0], 4),                   // offset + size overflows
    ];
    for (hdr, data_len) in cases {
        let mut p = words32(hdr);
        p.extend(vec![0u8; data_len]);
        for req in [FrontendReq::GET_CONFIG, FrontendReq::SET_CONFIG] {
            let e = refused(decode(req, &p, vec![]));
            assert!(is_bad_payload(&e), "{req:?} {hdr:?}+{data_len}: {e}");
        }
    }
    assert!(is_bad_payload(&refused(decode(
        FrontendReq::GET_CONFIG,
        &[0; 11],
        vec![]
    ))));
}

#[test]
fn device_state_transfers_are_stopped_phase_saves_or_loads() {
    for (direction, want) in [(0, StateDirection::Save), (1, StateDirection::Load)] {
        match ok(decode(
            FrontendReq::SET_DEVICE_STATE_FD,
            &words32(&[direction, 0]),
            fds(1),
        )) {
            Request::SetDeviceStateFd(got, _) => assert_eq!(got, want),
            _ => panic!("not SET_DEVICE_STATE_FD"),
        }
    }
    for bad in [[2, 0], [0, 1]] {
        let e = refused(decode(
            FrontendReq::SET_DEVICE_STATE_FD,
            &words32(&bad),
            fds(1),
        ));
        assert!(is_bad_payload(&e), "{bad:?}: {e}");
    }
    let e = refused(decode_words(FrontendReq::SET_DEVICE_STATE_FD, &[0, 0]));
    assert!(matches!(e, RequestError::BadFds { .. }), "{e}");
}

#[test]
fn status_is_one_byte() {
    let r = ok(decode(FrontendReq::SET_STATUS, &words64(&[0x0f]), vec![]));
    assert!(matches!(r, Request::SetStatus(0x0f)));
    let e = refused(decode(FrontendReq::SET_STATUS, &words64(&[0x100]), vec![]));
    assert!(is_bad_payload(&e), "{e}");
}

#[test]
fn requests_the_kit_does_not_implement_are_unsupported() {
    for req in [
        FrontendReq::GET_SHARED_OBJECT,
        FrontendReq::SEND_RARP,
        FrontendReq::NET_SET_MTU,
    ] {
        let e = refused(decode(req, &[], vec![]));
        assert!(matches!(e, RequestError::Unsupported(_)), "{req:?}: {e}");
    }
}

#[test]
fn only_a_blocked_worker_ends_the_session() {
    let stuck = RequestError::Core(CoreError::WorkerStuck {
        index: 0,
        waited: std::time::Duration::from_secs(10),
    });
    assert!(stuck.ends_session());
    let refused = [
        RequestError::BadHeader(0),
        RequestError::Unsupported(99),
        RequestError::Core(CoreError::QueueIndex(7)),
        RequestError::Core(CoreError::WorkerGone(0)),
        RequestError::NoSuchRegion(0),
    ];
    for e in refused {
        assert!(!e.ends_session(), "{e}");
    }
}
