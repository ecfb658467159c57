//! The `overhead` figures: system calls and heap allocations per query, for PgBouncer
//! and the proxy, over a fixed number of select-only queries, so a regression in either
//! shows as a number rather than as a few percent of noisy TPS.
//!
//! System calls are counted by `perf stat` on the `syscalls:sys_enter_*` tracepoints of
//! the pooler's process (every thread), or by `strace -c -f` where perf cannot; the
//! proxy's allocations come from its `/metrics` (`allocations`), read before and after;
//! inter-processor interrupts (rescheduling and function-call, every CPU: the pooler's,
//! PostgreSQL's and pgbench's together) from `/proc/interrupts`, before and after.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Serialize;

pub const NAME: &str = "overhead";

/// Client counts measured, and the transactions each client runs at that count.
const SHAPES: [(u32, u32); 3] = [(1, 5000), (16, 600), (64, 200)];

/// What is measured: a pooler listening on `port`, running as `pid`.
pub struct Subject {
    pub name: &'static str,
    pub port: u16,
    pub pid: libc::pid_t,
    /// The proxy's admin API, for its allocation counter.
    pub admin_port: Option<u16>,
}

#[derive(Serialize)]
pub struct OverheadResult {
    pub target: &'static str,
    pub clients: u32,
    pub queries: Option<u64>,
    /// `perf` or `strace`.
    pub counted_by: Option<&'static str>,
    pub syscalls_per_query: Option<f64>,
    /// The most frequent system calls, per query, largest first.
    pub top_syscalls: Vec<(String, f64)>,
    pub allocations_per_query: Option<f64>,
    pub allocated_bytes_per_query: Option<f64>,
    /// Rescheduling and function-call interrupts on the whole machine, per query.
    pub ipis_per_query: Option<f64>,
    pub error: Option<String>,
}

/// Runs every shape against every subject, one at a time.
pub fn measure(
    pgbench: &Path,
    subjects: &[Subject],
    dir: &Path,
    admin: impl Fn(u16) -> Result<serde_json::Value, String>,
) -> Vec<OverheadResult> {
    let mut results = Vec::new();
    for subject in subjects {
        for (clients, per_client) in SHAPES {
            let r = measure_one(pgbench, subject, clients, per_client, dir, &admin);
            results.push(r);
        }
    }
    results
}

fn measure_one(
    pgbench: &Path,
    s: &Subject,
    clients: u32,
    per_client: u32,
    dir: &Path,
    admin: &impl Fn(u16) -> Result<serde_json::Value, String>,
) -> OverheadResult {
    let mut r = OverheadResult {
        target: s.name,
        clients,
        queries: None,
        counted_by: None,
        syscalls_per_query: None,
        top_syscalls: Vec::new(),
        allocations_per_query: None,
        allocated_bytes_per_query: None,
        ipis_per_query: None,
        error: None,
    };
    let allocations = |port| -> Option<(f64, f64)> {
        let m = admin(port).ok()?;
        Some((
            m["allocations"]["count"].as_f64()?,
            m["allocations"]["bytes"].as_f64()?,
        ))
    };
    let before = s.admin_port.and_then(allocations);
    let ipis_before = interprocessor_interrupts();
    let out = dir.join(format!("{}-{}-c{clients}", NAME, s.name));
    let counted = if perf_usable() {
        count_with_perf(pgbench, s, clients, per_client, &out).map(|c| ("perf", c))
    } else {
        count_with_strace(pgbench, s, clients, per_client, &out).map(|c| ("strace", c))
    };
    let after = s.admin_port.and_then(allocations);
    let ipis_after = interprocessor_interrupts();
    let (tool, (queries, calls)) = match counted {
        Ok(c) => c,
        Err(e) => {
            r.error = Some(e);
            return r;
        }
    };
    r.queries = Some(queries);
    r.counted_by = Some(tool);
    let per = |n: f64| n / queries.max(1) as f64;
    r.syscalls_per_query = Some(per(calls.iter().map(|(_, n)| *n as f64).sum()));
    r.top_syscalls = calls
        .iter()
        .take(6)
        .map(|(name, n)| (name.clone(), per(*n as f64)))
        .collect();
    if let (Some(b), Some(a)) = (before, after) {
        r.allocations_per_query = Some(per(a.0 - b.0));
        r.allocated_bytes_per_query = Some(per(a.1 - b.1));
    }
    if let (Some(b), Some(a)) = (ipis_before, ipis_after) {
        r.ipis_per_query = Some(per(a.saturating_sub(b) as f64));
    }
    r
}

/// Rescheduling (`RES`) and function-call (`CAL`) interrupts so far, summed over CPUs.
fn interprocessor_interrupts() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/interrupts").ok()?;
    Some(count_ipis(&text))
}

fn count_ipis(text: &str) -> u64 {
    let cpus = text
        .lines()
        .next()
        .map_or(0, |l| l.split_whitespace().count());
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.trim_start().split_once(':')?;
            matches!(name, "RES" | "CAL").then(|| {
                rest.split_whitespace()
                    .take(cpus)
                    .map_while(|n| n.parse::<u64>().ok())
                    .sum::<u64>()
            })
        })
        .sum()
}

/// pgbench's select-only script, simple protocol, a fixed number of transactions.
fn pgbench_command(pgbench: &Path, s: &Subject, clients: u32, per_client: u32) -> Command {
    let mut c = Command::new(pgbench);
    c.args([
        "-n",
        "-S",
        "-M",
        "simple",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
    ])
    .args(["-p", &s.port.to_string()])
    .args(["-c", &clients.to_string()])
    .args(["-j", &clients.min(16).to_string()])
    .args(["-t", &per_client.to_string(), "bench"]);
    c
}

/// Transactions pgbench says it processed.
fn processed(stdout: &str) -> Option<u64> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())
}

fn run_pgbench(mut c: Command, out: &Path) -> Result<u64, String> {
    let o = c
        .output()
        .map_err(|e| format!("pgbench could not start: {e}"))?;
    let stdout = String::from_utf8_lossy(&o.stdout);
    let _ = std::fs::write(out.with_extension("pgbench.out"), &*stdout);
    if !o.status.success() {
        return Err(format!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    processed(&stdout).ok_or_else(|| "pgbench reported no transactions".into())
}

/// Can `perf stat` read the syscall tracepoints here?
fn perf_usable() -> bool {
    Command::new("perf")
        .args([
            "stat",
            "-x,",
            "-e",
            "syscalls:sys_enter_getpid",
            "--",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// (transactions, [(syscall, calls)] largest first) under `perf stat -p`.
fn count_with_perf(
    pgbench: &Path,
    s: &Subject,
    clients: u32,
    per_client: u32,
    out: &Path,
) -> Result<(u64, Vec<(String, u64)>), String> {
    let stat = out.with_extension("perf-stat.csv");
    let bench = pgbench_command(pgbench, s, clients, per_client);
    let mut c = Command::new("perf");
    c.args(["stat", "-x,", "-e", "syscalls:sys_enter_*", "-p"])
        .arg(s.pid.to_string())
        .arg("-o")
        .arg(&stat)
        .arg("--")
        .arg(bench.get_program())
        .args(bench.get_args());
    let queries = run_pgbench(c, out)?;
    let text = std::fs::read_to_string(&stat).map_err(|e| format!("{}: {e}", stat.display()))?;
    Ok((queries, parse_perf_csv(&text)))
}

/// `count,unit,event,…` lines; events counted zero (or not counted) are left out.
fn parse_perf_csv(text: &str) -> Vec<(String, u64)> {
    let mut calls: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split(',');
            let n: u64 = f.next()?.trim().parse().ok()?;
            let event = f.nth(1)?;
            let name = event.strip_prefix("syscalls:sys_enter_")?;
            (n > 0).then(|| (name.to_string(), n))
        })
        .collect();
    calls.sort_by_key(|c| std::cmp::Reverse(c.1));
    calls
}

/// The same with `strace -c -f` attached for the run (slower: only the counts matter).
fn count_with_strace(
    pgbench: &Path,
    s: &Subject,
    clients: u32,
    per_client: u32,
    out: &Path,
) -> Result<(u64, Vec<(String, u64)>), String> {
    let summary: PathBuf = out.with_extension("strace.txt");
    let mut tracer: Child = Command::new("strace")
        .args(["-c", "-f", "-p"])
        .arg(s.pid.to_string())
        .arg("-o")
        .arg(&summary)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("neither perf nor strace can count system calls here: {e}"))?;
    // strace attaches to every thread before it starts counting.
    std::thread::sleep(Duration::from_millis(500));
    let queries = run_pgbench(pgbench_command(pgbench, s, clients, per_client), out);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as libc::pid_t, libc::SIGINT) };
    let _ = tracer.wait();
    let queries = queries?;
    let text =
        std::fs::read_to_string(&summary).map_err(|e| format!("{}: {e}", summary.display()))?;
    Ok((queries, parse_strace_summary(&text)))
}

/// strace -c's table: `% time  seconds  usecs/call  calls  [errors]  syscall`.
fn parse_strace_summary(text: &str) -> Vec<(String, u64)> {
    let mut calls: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = *f.last()?;
            if f.len() < 5 || name == "total" || name == "syscall" {
                return None;
            }
            Some((name.to_string(), f[3].parse().ok()?))
        })
        .collect();
    calls.sort_by_key(|c| std::cmp::Reverse(c.1));
    calls
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

/// One result as a line of the terminal log.
pub fn line(r: &OverheadResult) -> String {
    match &r.error {
        Some(e) => format!("{} c{}: not measured ({e})", r.target, r.clients),
        None => format!(
            "{} c{}: {} system calls per query ({}), {} allocations ({} bytes) per query, {} interprocessor interrupts per query",
            r.target,
            r.clients,
            fmt(r.syscalls_per_query),
            top(r),
            fmt(r.allocations_per_query),
            r.allocated_bytes_per_query
                .map_or("-".into(), |v| format!("{v:.0}")),
            r.ipis_per_query.map_or("-".into(), |v| format!("{v:.2}")),
        ),
    }
}

fn top(r: &OverheadResult) -> String {
    r.top_syscalls
        .iter()
        .map(|(name, n)| format!("{name} {n:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report's section (markdown or terminal text).
pub fn section(results: &[OverheadResult], md: bool) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if results.is_empty() {
        return s;
    }
    let counted_by = results.iter().find_map(|r| r.counted_by).unwrap_or("-");
    let _ = writeln!(
        s,
        "\nSystem calls and heap allocations per query (pgbench -S -M simple, a fixed \
         number of transactions; system calls of every thread counted by {counted_by}, \
         logins included; allocations from the proxy's /metrics; rescheduling and \
         function-call interrupts of the whole machine from /proc/interrupts):\n"
    );
    if md {
        let _ = writeln!(
            s,
            "| pooler | clients | syscalls/query | most frequent (per query) | allocations/query | bytes allocated/query | IPIs/query |\n| --- | ---: | ---: | --- | ---: | ---: | ---: |"
        );
    }
    for r in results {
        if md {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.target,
                r.clients,
                fmt(r.syscalls_per_query),
                r.error.clone().unwrap_or_else(|| top(r)),
                fmt(r.allocations_per_query),
                r.allocated_bytes_per_query
                    .map_or("-".into(), |v| format!("{v:.0}")),
                r.ipis_per_query.map_or("-".into(), |v| format!("{v:.2}")),
            );
        } else {
            let _ = writeln!(s, "  {}", line(r));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perf_and_strace_counts() {
        let perf = "\n# started on x\n\n17,,syscalls:sys_enter_sendto,100.00,,\n\
                    0,,syscalls:sys_enter_read,100.00,,\n\
                    <not counted>,,syscalls:sys_enter_write,0,,\n\
                    90,,syscalls:sys_enter_io_uring_enter,100.00,,\n";
        assert_eq!(
            parse_perf_csv(perf),
            vec![("io_uring_enter".into(), 90), ("sendto".into(), 17)]
        );
        let strace = "% time     seconds  usecs/call     calls    errors syscall\n\
                      ------ ----------- ----------- --------- --------- ----------------\n\
                       60.00    0.000600           3       200           sendto\n\
                       40.00    0.000400           1       300       100 recvfrom\n\
                      ------ ----------- ----------- --------- --------- ----------------\n\
                      100.00    0.001000           2       500       100 total\n";
        assert_eq!(
            parse_strace_summary(strace),
            vec![("recvfrom".into(), 300), ("sendto".into(), 200)]
        );
        assert_eq!(
            processed("number of transactions actually processed: 5000/5000\n"),
            Some(5000)
        );
    }

    #[test]
    fn counts_rescheduling_and_function_call_interrupts_of_every_cpu() {
        let text = "           CPU0       CPU1       \n\
                      LOC:    2816570    2816680   Local timer interrupts\n\
                      RES:        100         23   Rescheduling interrupts\n\
                      CAL:          7         10   Function call interrupts\n\
                      TLB:          5          5   TLB shootdowns\n";
        assert_eq!(count_ipis(text), 140);
    }
}
