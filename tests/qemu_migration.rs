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

use std::fs::File;
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

fn num(v: &Value, path: &[&str]) -> Option<u64> {
    let mut v = v;
    for p in path {
        v = v.get(p)?;
    }
    v.as_u64()
}

#[test]
fn live_migration_of_writing_guest_loses_no_request() {
    let _lock = machine_lock();
    if let Err(e) = prepare_guest() {
        if skip_or_fail(&e) {
            return;
        }
    }
    let t_test = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    let sock_a = dir.path().join("blk-a.sock");
    let sock_b = dir.path().join("blk-b.sock");
    let mig = dir.path().join("mig.sock");
    File::create(&img)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("create image");

    let mut daemon_a = spawn_daemon("vhost-user-blk A", &sock_a, &img, dir.path().join("a.log"));
    // Shared storage: the source holds the image lock, the destination
    // opens the image unlocked while both run.
    let mut daemon_b = spawn_daemon_with(
        "vhost-user-blk B",
        &sock_b,
        &img,
        dir.path().join("b.log"),
        &["--no-lock"],
    );
    let mut src = Qemu::spawn(QemuOpts {
        name: "src",
        dir: dir.path(),
        sock: &sock_a,
        tag: TAG,
        secs: 150,
        incoming: None,
    });
    let mut dst = Qemu::spawn(QemuOpts {
        name: "dst",
        dir: dir.path(),
        sock: &sock_b,
        tag: TAG,
        secs: 150,
        incoming: Some(&mig),
    });
    wait_console(&mut src, Duration::from_secs(90), "the write loop", |c| {
        let p = progress(c);
        p[0] + p[1] >= RECORDS_BEFORE
    });
    println!(
        "guest loop running after {:.1}s",
        t_test.elapsed().as_secs_f64()
    );
    let mut dq = dst.qmp();
    let st = dq
        .execute("query-status", json!({}))
        .expect("dst query-status");
    println!("destination before migration: {st}");

    let mut sq = src.qmp();
    sq.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": 300}),
    )
    .expect("migrate-set-parameters");
    let before = progress(&src.console_text());
    let t_mig = Instant::now();
    sq.execute("migrate", json!({"uri": format!("unix:{}", mig.display())}))
        .expect("migrate");
    let mut last;
    let mut polls = 0u32;
    let status = loop {
        let q = sq
            .execute("query-migrate", json!({}))
            .expect("query-migrate");
        let s = q
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        polls += 1;
        if polls.is_multiple_of(10) {
            println!(
                "migration {s}: {:.1}s transferred={:?} remaining={:?} dirty-sync-count={:?}",
                t_mig.elapsed().as_secs_f64(),
                num(&q, &["ram", "transferred"]),
                num(&q, &["ram", "remaining"]),
                num(&q, &["ram", "dirty-sync-count"])
            );
        }
        last = q;
        if matches!(s.as_str(), "completed" | "failed" | "cancelled") {
            break s;
        }
        src.check_alive();
        assert!(
            t_mig.elapsed() < Duration::from_secs(120),
            "migration did not finish within 120s: {last}"
        );
        sleep(Duration::from_millis(200));
    };
    let mig_wall = t_mig.elapsed();
    let during = progress(&src.console_text());
    println!("query-migrate at the end: {last}");
    assert_eq!(
        status,
        "completed",
        "migration {status}: {last}\n---- src qemu ----\n{}\n---- dst qemu ----\n{}\n---- daemon A ----\n{}\n---- daemon B ----\n{}",
        src.qemu_log(),
        dst.qemu_log(),
        daemon_a.log_text(),
        daemon_b.log_text()
    );
    let src_state = sq.execute("query-status", json!({})).expect("src status");
    println!("source after migration: {src_state}");
    src.quit_after_migration(&mut sq);
    daemon_a.stop(Duration::from_secs(5));

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
    wait_console(
        &mut dst,
        Duration::from_secs(90),
        "records on the destination",
        |c| {
            let p = progress(c);
            p[0] + p[1] >= during[0] + during[1] + RECORDS_AFTER
        },
    );
    let after = progress(&dst.console_text());
    write_stop_marker(&img);
    let exited = dst.wait_exit(Duration::from_secs(90));
    daemon_b.stop(Duration::from_secs(5));

    let log_a = daemon_a.log_text();
    let log_b = daemon_b.log_text();
    print_tail("daemon A log", &log_a, 10);
    print_tail("daemon B log", &log_b, 10);
    let src_console = src.console_text();
    let dst_console = dst.console_text();
    println!("---- destination guest VBK lines (progress omitted) ----");
    for l in vbk_lines(&dst_console) {
        if !l.starts_with("VBK-WL progress") {
            println!("{l}");
        }
    }
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
    let verified = verify_records(&img, TAG, &r.counts);
    let lost = r.records.saturating_sub(verified);
    let resubmitted = [&log_a, &log_b]
        .iter()
        .map(|l| l.matches("resubmitting").count())
        .sum::<usize>();
    let warnings = log_a.matches(" WARN ").count() + log_b.matches(" WARN ").count();
    let g = |p: &[&str]| {
        num(&last, p)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "n/a".into())
    };
    println!(
        "VBK-MIGRATION status={status} total_ms={} downtime_ms={} setup_ms={} wall_ms={} \
         transferred={} ram_total={} normal_pages={} duplicate_pages={} dirty_sync_count={} \
         dirty_pages_rate={} postcopy=0 max_bandwidth={MAX_BANDWIDTH} \
         records_before={} records_during={} records_after={} \
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
        before[0] + before[1],
        (during[0] + during[1]).saturating_sub(before[0] + before[1]),
        (after[0] + after[1]).saturating_sub(during[0] + during[1]),
        r.records,
        r.errors,
        r.maxgap_ms,
        r.stalls.len(),
        t_test.elapsed().as_secs_f64()
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
