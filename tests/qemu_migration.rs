// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live migration of a guest that is writing, both QEMUs on our backend.
//!
//! Source QEMU uses `vhost-user-blk` daemon A on socket SA; the destination
//! QEMU, started with `-incoming unix:mig.sock`, uses daemon B on socket SB;
//! both daemons serve the same image file (shared storage). The guest runs
//! `test-writeloop.sh` (two writers writing numbered 4 KiB records with
//! O_DIRECT and reading each back at once). The host migrates through QMP
//! with a small `max-bandwidth`, so the guest keeps running (and our daemon
//! keeps writing guest memory, which must reach the dirty log) during
//! pre-copy. After completion the source is quit; the destination guest
//! carries on, the host writes the stop block into the image, the guest
//! prints `VBK-RESULT migrate records=N errors=0 ...` on the destination's
//! serial, and the host checks every record in the image file.
//!
//! Summary line: `VBK-MIGRATION status=completed total_ms=N downtime_ms=N
//! setup_ms=N transferred=N dirty_sync_count=N ... lost=0 errors=0`.
//!
//! Without qemu-system-x86_64 the test FAILS unless VBK_ALLOW_SKIP_QEMU=1.
//! Run: `cargo build --release --workspace && cargo test --release --test qemu_migration -- --nocapture`.

mod guest_vm;
mod process;

use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use guest_vm::*;

const TAG: &str = "migrate";
/// Pre-copy bandwidth cap (bytes/s): long enough a pre-copy that the guest
/// (and the daemon writing its memory) runs through several dirty syncs.
const MAX_BANDWIDTH: u64 = 32 << 20;
/// Records (both writers) before migrating, and on the destination after.
const RECORDS_BEFORE: u64 = 16;
const RECORDS_AFTER: u64 = 24;

#[test]
fn live_migration_of_writing_guest_loses_no_request() {
    let Some(_lock) = lock_and_prepare() else {
        return;
    };
    let t_test = Instant::now();
    let mut m = Migration::start(TAG, RECORDS_BEFORE);
    println!(
        "guest loop running after {:.1}s",
        t_test.elapsed().as_secs_f64()
    );
    let mut dq = m.dst.qmp();
    let st = dq
        .execute("query-status", json!({}))
        .expect("dst query-status");
    println!("destination before migration: {st}");

    let mut sq = m.src.qmp();
    sq.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": 300}),
    )
    .expect("migrate-set-parameters");
    let before = progress(&m.src.console_text());
    let t_mig = Instant::now();
    m.migrate(&mut sq);
    let mut last;
    let mut polls = 0u32;
    let status = loop {
        let (s, q) = sq.migration_status();
        polls += 1;
        if polls.is_multiple_of(10) {
            println!(
                "migration {s}: {:.1}s transferred={:?} remaining={:?} dirty-sync-count={:?}",
                t_mig.elapsed().as_secs_f64(),
                json_u64(&q, &["ram", "transferred"]),
                json_u64(&q, &["ram", "remaining"]),
                json_u64(&q, &["ram", "dirty-sync-count"])
            );
        }
        last = q;
        if matches!(s.as_str(), "completed" | "failed" | "cancelled") {
            break s;
        }
        m.src.check_alive();
        assert!(
            t_mig.elapsed() < Duration::from_secs(120),
            "migration did not finish within 120s: {last}"
        );
        sleep(Duration::from_millis(200));
    };
    let mig_wall = t_mig.elapsed();
    let during = progress(&m.src.console_text());
    println!("query-migrate at the end: {last}");
    m.assert_completed(&status, &last);
    let src_state = sq.execute("query-status", json!({})).expect("src status");
    println!("source after migration: {src_state}");
    m.quit_source(&mut sq);

    // Destination runs the guest on: wait for records written there.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = dq.execute("query-status", json!({})).expect("dst status");
        if s.get("status").and_then(Value::as_str) == Some("running") {
            break;
        }
        assert!(Instant::now() < deadline, "destination not running: {s}");
        sleep(Duration::from_millis(100));
    }
    let (after, exited) = m.finish_on_destination(during, RECORDS_AFTER);

    let log_a = m.daemon_a.log_text();
    let log_b = m.daemon_b.log_text();
    print_tail("daemon A log", &log_a, 10);
    print_tail("daemon B log", &log_b, 10);
    let src_console = m.src.console_text();
    let dst_console = m.dst.console_text();
    print_vbk_lines("destination guest", &dst_console);
    assert!(
        exited,
        "destination QEMU did not power off after the stop marker\n{dst_console}"
    );
    let r = parse_result(&dst_console, TAG).unwrap_or_else(|| {
        panic!(
            "destination guest printed no VBK-RESULT {TAG} line\n---- src console ----\n\
             {src_console}\n---- dst console ----\n{dst_console}"
        )
    });
    let verified = verify_records(&m.img, TAG, &r.counts);
    let lost = r.records.saturating_sub(verified);
    let resubmitted = [&log_a, &log_b]
        .iter()
        .map(|l| l.matches("resubmitting").count())
        .sum::<usize>();
    let warnings = log_a.matches(" WARN ").count() + log_b.matches(" WARN ").count();
    let g = |p: &[&str]| json_u64(&last, p).map_or_else(|| "n/a".into(), |v| v.to_string());
    println!(
        "VBK-MIGRATION status={status} total_ms={} downtime_ms={} setup_ms={} wall_ms={} \
         transferred={} ram_total={} normal_pages={} duplicate_pages={} dirty_sync_count={} \
         dirty_pages_rate={} postcopy=0 max_bandwidth={MAX_BANDWIDTH} \
         {records} \
         resubmitted={resubmitted} lost={lost} records={} verified={verified} \
         errors={} guest_maxgap_ms={} stalls={} daemon_warnings={warnings} test_s={:.1}",
        g(&["total-time"]),
        g(&["downtime"]),
        g(&["setup-time"]),
        mig_wall.as_millis(),
        g(&["ram", "transferred"]),
        g(&["ram", "total"]),
        g(&["ram", "normal"]),
        g(&["ram", "duplicate"]),
        g(&["ram", "dirty-sync-count"]),
        g(&["ram", "dirty-pages-rate"]),
        r.records,
        r.errors,
        r.maxgap_ms,
        r.stalls.len(),
        t_test.elapsed().as_secs_f64(),
        records = migration_records(before, during, after),
    );
    assert_eq!(r.errors, 0, "guest saw errors: {}", r.line);
    assert_eq!(lost, 0);
    assert!(
        r.counts.len() == 2 && r.counts.iter().all(|&c| c > 0),
        "both writers must have written: {}",
        r.line
    );
    assert!(
        dst_console.contains("VBK-DONE status=ok"),
        "destination guest did not finish with VBK-DONE status=ok"
    );
}
