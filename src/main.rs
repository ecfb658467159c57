//! heliosdb-proxy: the process. Parses the command line, loads and validates the
//! configuration, checks the kernel can run the io_uring data plane, starts one shard per
//! worker and the control threads (admin API, metrics, health checks, SQL admin
//! console), reloads on SIGHUP, and stops
//! gracefully on SIGTERM/SIGINT.

mod alloc_count;
mod cli;
mod control;
mod preflight;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use helios_shard::runtime::Runtime;

#[global_allocator]
static ALLOCATOR: alloc_count::Counting = alloc_count::Counting;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = cli::Args::parse();
    let config = match args.load_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("heliosdb-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    if let Err(problem) = preflight::check() {
        eprintln!("heliosdb-proxy: {problem}");
        return ExitCode::from(1);
    }
    run(Arc::new(config), args)
}

fn run(config: Arc<helios_shard::config::Config>, args: cli::Args) -> ExitCode {
    let signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("heliosdb-proxy: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    // The admin port is bound before the shards start, so a busy port fails cleanly.
    let admin_listener = match control::http::bind(&config.admin_address) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "heliosdb-proxy: cannot listen on admin_address {}: {e}",
                config.admin_address
            );
            return ExitCode::from(1);
        }
    };
    let (console_tx, console_rx) = crossbeam_channel::unbounded();
    // Shards report nodes they saw fail; the health checker probes them at once.
    let (suspects_tx, suspects_rx) = crossbeam_channel::unbounded();
    let runtime = match Runtime::start(config.clone(), Some(console_tx), Some(suspects_tx.clone()))
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("heliosdb-proxy: {e}");
            return ExitCode::from(1);
        }
    };
    let loader: control::ConfigLoader = Box::new(move || args.load_config());
    let control = match control::Control::new(
        config.clone(),
        runtime.links.clone(),
        runtime.epochs.clone(),
        Some(loader),
    ) {
        Ok(control) => control,
        Err(e) => {
            eprintln!("heliosdb-proxy: {e}");
            return ExitCode::from(1);
        }
    };
    control.set_wake(suspects_tx);
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let spawned = (|| -> std::io::Result<()> {
        threads.push(control::http::spawn(
            control.clone(),
            admin_listener,
            stop.clone(),
        )?);
        threads.push(control::console::spawn(
            control.clone(),
            console_rx,
            stop.clone(),
        )?);
        threads.push(control::metrics::spawn_sync_loop(
            control.clone(),
            stop.clone(),
        )?);
        threads.push(control::health::spawn(
            control.clone(),
            stop.clone(),
            suspects_rx,
        )?);
        threads.push(control::wal::spawn(control.clone(), stop.clone())?);
        Ok(())
    })();
    if let Err(e) = spawned {
        eprintln!("heliosdb-proxy: cannot start the control threads: {e}");
        runtime.begin_shutdown();
        runtime.join();
        return ExitCode::from(1);
    }
    log::info!(
        "heliosdb-proxy {} listening on {} with {} workers ({} pooling); admin API on {}",
        env!("CARGO_PKG_VERSION"),
        runtime.local_addr,
        config.effective_workers(),
        format!("{:?}", config.pool_mode.mode).to_lowercase(),
        config.admin_address,
    );
    wait_for_stop(signals, &control);
    log::info!(
        "shutting down: no new clients; waiting up to {} s for in-flight queries",
        control.config().timeouts.shutdown_timeout_secs
    );
    runtime.begin_shutdown();
    runtime.join();
    stop.store(true, Ordering::Release);
    for t in threads {
        let _ = t.join();
    }
    log::info!("stopped");
    ExitCode::SUCCESS
}

/// Reloads on SIGHUP; returns on SIGTERM or SIGINT.
fn wait_for_stop(mut signals: signal_hook::iterator::Signals, control: &control::Control) {
    for sig in signals.forever() {
        if sig == signal_hook::consts::SIGHUP {
            log::info!("received SIGHUP: reloading the configuration");
            if let Err(e) = control.reload() {
                log::error!("configuration reload refused, running configuration kept: {e}");
            }
            continue;
        }
        log::info!("received signal {sig}");
        return;
    }
}
