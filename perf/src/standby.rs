//! Streaming standbys of a perf PostgreSQL: for the read-mostly workload on two nodes, and
//! the synchronous standby each failover run promotes.
//!
//! A `pg_basebackup -R` copy of the primary (taken after the tables exist), on its own
//! free port, waited for until it has replayed everything the primary had written, so
//! reads routed to it see the tables.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::{
    command, free_port, interrupted, log, psql, run_logged, service_dir, start_service, wait_ready,
    PgTools, Res, RunAs, Services, DB_NAME, DB_USER,
};

/// How long the standby may take to replay up to the primary's WAL position.
const REPLAY_LIMIT: Duration = Duration::from_secs(120);

/// Settings appended to the standby's copy of the primary's postgresql.conf (the last
/// line wins), besides its port and socket directory.
const STANDBY_SETTINGS: [(&str, &str); 2] = [
    ("hot_standby", "on"),
    // Without it, vacuum cleanup from simple-update on the primary can cancel the
    // standby's SELECTs (a replay conflict), which would fail pgbench runs.
    ("hot_standby_feedback", "on"),
];

/// Which standby to make.
pub(crate) struct StandbySpec<'a> {
    /// Where its data directory goes (`<dir>/data`, or a /tmp stand-in).
    pub dir: PathBuf,
    /// Its service name, also the label of a /tmp stand-in directory.
    pub name: &'a str,
    /// `cluster_name`, which is also the `application_name` the primary's
    /// `synchronous_standby_names` refers to.
    pub cluster_name: Option<&'a str>,
    pub logs: PathBuf,
}

/// Creates, starts and catches up the standby; returns its port and report entry, whose
/// settings are the primary's (`primary`, its report entry) with the standby's own added.
pub(crate) fn setup_standby(
    pg: &PgTools,
    run_as: Option<RunAs>,
    services: &mut Services,
    primary_port: u16,
    primary: &serde_json::Value,
    spec: &StandbySpec,
) -> Res<(u16, serde_json::Value)> {
    let logs = &spec.logs;
    let dir = service_dir(&spec.dir, run_as, spec.name)?;
    let data = dir.join("data");
    let port = free_port()?;
    log(format!("pg_basebackup -R into {}", data.display()));
    let mut c = command(pg.tool("pg_basebackup"), run_as);
    c.current_dir(&dir)
        .args(["-h", "127.0.0.1", "-p", &primary_port.to_string()])
        .args(["-U", DB_USER, "-D"])
        .arg(&data)
        .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
    let f = run_logged(
        &mut c,
        &logs.join(format!("{}-basebackup", spec.name)),
        Duration::from_secs(600),
    )?;
    if !f.status.success() {
        return Err(format!("pg_basebackup failed: {}", f.stderr.trim()));
    }
    let mut conf = String::from("\n# helios-perf standby\n");
    let _ = writeln!(conf, "port = {port}");
    let _ = writeln!(conf, "unix_socket_directories = '{}'", dir.display());
    for (k, v) in STANDBY_SETTINGS {
        let _ = writeln!(conf, "{k} = {v}");
    }
    if let Some(n) = spec.cluster_name {
        let _ = writeln!(conf, "cluster_name = '{n}'");
    }
    fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .and_then(|mut f| f.write_all(conf.as_bytes()))
        .map_err(|e| format!("standby postgresql.conf: {e}"))?;
    let mut c = command(pg.tool("postgres"), run_as);
    c.current_dir(&dir).arg("-D").arg(&data);
    start_service(
        services,
        spec.name,
        &mut c,
        &dir.join("postgres.log"),
        libc::SIGINT,
    )?;
    wait_ready(pg, spec.name, port, "postgres", services, logs)?;
    let in_recovery = psql(
        pg,
        port,
        "postgres",
        "SELECT pg_is_in_recovery()",
        &logs.join(format!("{}-recovery", spec.name)),
    )?;
    if in_recovery != "t" {
        return Err(format!(
            "the standby on port {port} is not in recovery (pg_is_in_recovery = {in_recovery})"
        ));
    }
    let lsn = wait_replayed(pg, services, primary_port, port, logs)?;
    log(format!("standby on port {port} replayed up to {lsn}"));
    let mut s = serde_json::Map::new();
    s.insert("version".into(), primary["version"].clone());
    s.insert("port".into(), port.into());
    s.insert("data".into(), data.display().to_string().into());
    s.insert("replayed_lsn_at_start".into(), lsn.into());
    let mut set = primary["settings"].as_object().cloned().unwrap_or_default();
    set.remove("pg_hba");
    set.insert(
        "source".into(),
        "pg_basebackup -R -X stream -c fast from the primary".into(),
    );
    for (k, v) in STANDBY_SETTINGS {
        set.insert(k.into(), v.into());
    }
    if let Some(n) = spec.cluster_name {
        set.insert("cluster_name".into(), n.into());
    }
    s.insert("settings".into(), set.into());
    Ok((port, s.into()))
}

/// Polls until the standby's replay position reaches the primary's current WAL position
/// (taken once, after `pgbench -i`); returns that position.
fn wait_replayed(
    pg: &PgTools,
    services: &mut Services,
    primary_port: u16,
    standby_port: u16,
    logs: &Path,
) -> Res<String> {
    let target = psql(
        pg,
        primary_port,
        DB_NAME,
        "SELECT pg_current_wal_lsn()",
        &logs.join("primary-lsn"),
    )?;
    let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn");
    let start = Instant::now();
    loop {
        services.check_alive()?;
        if interrupted() {
            return Err("interrupted".into());
        }
        let caught_up = psql(pg, standby_port, DB_NAME, &sql, &logs.join("standby-lsn"))?;
        if caught_up == "t" {
            return Ok(target);
        }
        if start.elapsed() > REPLAY_LIMIT {
            return Err(format!(
                "the standby did not replay up to {target} within {REPLAY_LIMIT:?}"
            ));
        }
        sleep(Duration::from_millis(200));
    }
}
