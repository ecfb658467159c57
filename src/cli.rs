//! Command line: where the configuration comes from and what flags override.

use std::path::PathBuf;

use clap::Parser;
use helios_shard::config::{Config, ConfigError};

#[derive(Parser, Debug)]
#[command(
    name = "heliosdb-proxy",
    version,
    about = "PostgreSQL wire-protocol connection router: pooling, routing, failover, caching"
)]
pub struct Args {
    /// Configuration file (TOML). Without it, built-in defaults plus HELIOS_* variables.
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Client listen address, overrides `listen_address`.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin API address, overrides `admin_address`.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Number of worker shards, overrides `workers` (0 = one per two cores).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Validate the configuration and exit (0 when valid, 2 when not).
    #[arg(long)]
    pub check_config: bool,
}

impl Args {
    /// Loads the file (or defaults), applies HELIOS_* environment overrides, then the
    /// command-line flags, and validates the result.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let env = std::env::vars().filter(|(k, _)| k.starts_with("HELIOS_"));
        let mut config = match &self.config {
            Some(path) => Config::load(path, env)?,
            None => Config::from_toml_str("", env)?,
        };
        if let Some(listen) = &self.listen {
            config.listen_address = listen.clone();
        }
        if let Some(admin) = &self.admin {
            config.admin_address = admin.clone();
        }
        if let Some(workers) = self.workers {
            config.workers = workers;
        }
        config.validate()?;
        Ok(config)
    }
}
