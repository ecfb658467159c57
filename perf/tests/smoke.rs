//! Smoke test of the benchmark harness itself: one short workload and a few idle clients
//! against all three targets, then checks that the report is well formed and that every
//! process the harness started is gone. It never asserts a speed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The proxy binary cargo built next to this package's binary (same profile, same target
/// directory), since `cargo test --workspace` builds every workspace binary.
fn proxy_bin() -> PathBuf {
    let harness = PathBuf::from(env!("CARGO_BIN_EXE_helios-perf"));
    let bin = harness.with_file_name("heliosdb-proxy");
    assert!(
        bin.exists(),
        "{} missing: build the workspace (cargo test --workspace) first",
        bin.display()
    );
    bin
}

/// A fresh output directory under the target directory, readable by the harness's
/// service account.
fn out_dir() -> PathBuf {
    let harness = PathBuf::from(env!("CARGO_BIN_EXE_helios-perf"));
    let dir = harness
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("perf-smoke");
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn harness_writes_a_well_formed_report_and_stops_everything() {
    let out = out_dir();
    let output = Command::new(env!("CARGO_BIN_EXE_helios-perf"))
        .arg("--proxy-bin")
        .arg(proxy_bin())
        .arg("--out")
        .arg(&out)
        .args(["--only", "select-simple-c1,idle-clients"])
        .args([
            "--duration",
            "1",
            "--reps",
            "1",
            "--scale",
            "1",
            "--idle",
            "20",
        ])
        .output()
        .expect("run helios-perf");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "helios-perf failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );

    // Every service it started was stopped by PID, and is gone.
    let started: Vec<u64> = stderr
        .lines()
        .filter_map(|l| l.split("(pid ").nth(1))
        .filter_map(|rest| rest.split(')').next()?.parse().ok())
        .collect();
    assert_eq!(
        started.len(),
        8,
        "four services (PostgreSQL, PgBouncer, the proxy, the idle-clients proxy) started and stopped: {stderr}"
    );
    for pid in started {
        assert!(!pid_alive(pid), "pid {pid} still running");
    }

    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report.json")).expect("report.json"),
    )
    .expect("report.json parses");
    assert_eq!(json["complete"], true, "{json:#}");
    assert_eq!(json["mode"], "quick");
    assert!(json["postgres"]["settings"].is_object(), "{json:#}");
    assert!(json["pgbouncer"]["version"].is_string(), "{json:#}");
    assert!(json["proxy"]["port"].is_u64(), "{json:#}");

    let workloads = json["workloads"].as_array().expect("workloads");
    assert_eq!(workloads.len(), 1, "only the picked workload ran");
    let w = &workloads[0];
    assert_eq!(w["workload"]["name"], "select-simple-c1");
    let cells = w["cells"].as_array().expect("cells");
    let targets: Vec<&str> = cells.iter().filter_map(|c| c["target"].as_str()).collect();
    assert_eq!(targets, ["direct", "pgbouncer", "proxy"]);
    for c in cells {
        assert_eq!(c["status"], "ok", "{c:#}");
        let run = &c["runs"][0];
        assert_eq!(run["ok"], true, "{c:#}");
        assert_eq!(run["failed"], 0, "{c:#}");
        assert!(run["processed"].as_u64().unwrap_or(0) > 0, "{c:#}");
        assert!(c["median_tps"].as_f64().unwrap_or(0.0) > 0.0, "{c:#}");
        let (p50, p99) = (
            c["latency_p50_ms"].as_f64().expect("p50"),
            c["latency_p99_ms"].as_f64().expect("p99"),
        );
        assert!(p50 > 0.0 && p99 >= p50, "{c:#}");
    }

    let idle = json["idle_clients"].as_array().expect("idle_clients");
    let idle_targets: Vec<&str> = idle.iter().filter_map(|c| c["target"].as_str()).collect();
    assert_eq!(idle_targets, ["pgbouncer", "proxy"]);
    for c in idle {
        assert!(c["error"].is_null(), "{c:#}");
        assert_eq!(c["clients_held"], 20, "{c:#}");
        assert!(c["rss_after_kib"].as_u64().unwrap_or(0) > 0, "{c:#}");
        assert!(c["bytes_per_client"].is_number(), "{c:#}");
    }
    // The proxy's own heap count says what its idle clients hold.
    assert!(
        idle[1]["heap_bytes_per_client"].as_f64().unwrap_or(0.0) > 0.0,
        "{:#}",
        idle[1]
    );

    // The terminal table and the Markdown report carry the same workload with both ratios.
    assert!(stdout.contains("proxy/direct"), "{stdout}");
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(
        md.contains("| workload | direct | pgbouncer | proxy | proxy/direct | proxy/pgbouncer |"),
        "{md}"
    );
    assert!(md.contains("| select-simple-c1 |"), "{md}");
    let _ = std::fs::remove_dir_all(&out);
}

/// The read-mostly workload (the two-node one) and the failover workload are listed in
/// both modes; they start standbys, so the harness test above leaves them out.
#[test]
fn list_has_the_read_mostly_and_failover_workloads_in_both_modes() {
    let output = Command::new(env!("CARGO_BIN_EXE_helios-perf"))
        .arg("--list")
        .output()
        .expect("run helios-perf --list");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    for mode in ["quick", "full"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{mode}:")))
            .unwrap_or_else(|| panic!("no {mode} line: {stdout}"));
        for name in ["read-mostly-c64", "failover"] {
            assert!(line.split_whitespace().any(|n| n == name), "{line}");
        }
    }
}
