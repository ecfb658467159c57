//! heliosdb-proxy: the process. Parses the command line, loads and validates the
//! configuration, checks the kernel can run the io_uring data plane, starts one shard per
//! worker, and stops them gracefully on SIGTERM/SIGINT.

mod cli;
mod preflight;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use helios_shard::runtime::Runtime;

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
    run(Arc::new(config))
}

fn run(config: Arc<helios_shard::config::Config>) -> ExitCode {
    let signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("heliosdb-proxy: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match Runtime::start(config.clone()) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("heliosdb-proxy: {e}");
            return ExitCode::from(1);
        }
    };
    log::info!(
        "heliosdb-proxy {} listening on {} with {} workers ({} pooling)",
        env!("CARGO_PKG_VERSION"),
        runtime.local_addr,
        config.effective_workers(),
        format!("{:?}", config.pool_mode.mode).to_lowercase(),
    );
    wait_for_signal(signals);
    log::info!(
        "shutting down: no new clients; waiting up to {} s for in-flight queries",
        config.timeouts.shutdown_timeout_secs
    );
    runtime.begin_shutdown();
    runtime.join();
    log::info!("stopped");
    ExitCode::SUCCESS
}

fn wait_for_signal(mut signals: signal_hook::iterator::Signals) {
    if let Some(sig) = signals.forever().next() {
        log::info!("received signal {sig}");
    }
}
