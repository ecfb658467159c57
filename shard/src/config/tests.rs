use std::path::Path;

use super::*;

const SCRAM_VERIFIER: &str = "SCRAM-SHA-256$4096:zz+LOEr8xAKHRDFIrlmI/g==$WZasJerWkNRi/hGAFc9gpEPOGIrahgxaVAMC5eFA02o=:2QMY4GdOqI+Hqe3yQg8whRgLqi7z+ynYO7gKCoG9mEE=";
const MD5_HASH: &str = "md53175bce1d3201d16594cebf9d7eb3f9d";

/// Two nodes and two users: enough structure for path and index tests.
const BASE: &str = r#"
[[users]]
name = "app"
password = "secret"

[[users]]
name = "report"
password = "secret2"

[[nodes]]
host = "127.0.0.1"

[[nodes]]
host = "127.0.0.2"
role = "replica"
"#;

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(text, no_env())
}

fn base() -> Config {
    parse(BASE).expect("base config is valid")
}

/// Asserts `config` fails validation and that the error names `key`.
fn rejects(config: Config, key: &str) {
    let error = config.validate().expect_err("must be rejected");
    assert_eq!(error.key, key, "{error}");
}

mod defaults {
    use super::*;

    #[test]
    fn top_level() {
        let config = Config::default();
        assert_eq!(config.listen_address, "127.0.0.1:6432");
        assert_eq!(config.admin_address, "127.0.0.1:9090");
        assert_eq!(config.workers, 0);
        assert_eq!(config.auth.method, AuthMethod::ScramSha256);
        assert!(config.users.is_empty());
        assert!(config.nodes.is_empty());
    }

    #[test]
    fn pool() {
        let pool = PoolConfig::default();
        assert_eq!(pool.mode, PoolMode::Session);
        assert_eq!(pool.max_pool_size, 20);
        assert_eq!(pool.min_idle, 0);
        assert_eq!(pool.idle_timeout_secs, 600);
        assert_eq!(pool.max_lifetime_secs, 3600);
        assert_eq!(pool.acquire_timeout_ms, 5000);
        assert_eq!(pool.reset_query, "DISCARD ALL");
    }

    #[test]
    fn limits_and_timeouts() {
        let limits = LimitsConfig::default();
        assert_eq!(limits.max_message_size, 64 * 1024 * 1024);
        assert_eq!(limits.max_client_connections, 10_000);
        assert_eq!(limits.buffer_size, 16384);
        assert_eq!(limits.buffered_message_size, 1024 * 1024);
        assert_eq!(limits.message_memory, 128 * 1024 * 1024);
        let timeouts = TimeoutsConfig::default();
        assert_eq!(timeouts.connect_timeout_ms, 5000);
        assert_eq!(
            timeouts.startup_timeout_ms, 60_000,
            "as long as PostgreSQL's authentication_timeout"
        );
        assert_eq!(timeouts.server_login_timeout_ms, 60_000);
        assert_eq!(timeouts.shutdown_timeout_secs, 30);
        assert_eq!(timeouts.dirty_release_timeout_ms, 5000);
        assert_eq!(timeouts.client_stall_timeout_ms, 15_000);
        assert_eq!(
            (
                timeouts.client_idle_timeout_ms,
                timeouts.idle_transaction_timeout_ms,
                timeouts.query_timeout_ms
            ),
            (0, 0, 0),
            "off by default, as in PgBouncer"
        );
    }

    #[test]
    fn node_and_user() {
        let config = parse("[[nodes]]\nhost = \"db\"\n[[users]]\nname = \"u\"\npassword = \"p\"")
            .expect("valid");
        let node = &config.nodes[0];
        assert_eq!(node.name, None);
        assert_eq!(node.port, 5432);
        assert_eq!(node.role, NodeRole::Primary);
        assert_eq!(node.weight, 100);
        assert!(node.enabled);
        let user = &config.users[0];
        assert_eq!(user.auth_method, None);
        assert_eq!(user.server_user, None);
        assert_eq!(user.server_password, None);
    }

    #[test]
    fn omitted_sections_take_defaults() {
        let config = base();
        assert_eq!(config.pool_mode, PoolConfig::default());
        assert_eq!(config.limits, LimitsConfig::default());
        assert_eq!(config.timeouts, TimeoutsConfig::default());
    }

    #[test]
    fn default_config_round_trips_through_toml() {
        let mut config = base();
        config.users[0].auth_method = Some(AuthMethod::Md5);
        let text = toml::to_string(&config).expect("serialises");
        assert_eq!(parse(&text), Ok(config));
    }
}

mod loading {
    use super::*;

    #[test]
    fn every_field_is_read() {
        let text = r#"
            listen_address = "0.0.0.0:7432"
            admin_address = "[::1]:9191"
            workers = 3
            [pool_mode]
            mode = "session"
            max_pool_size = 7
            min_idle = 2
            idle_timeout_secs = 11
            max_lifetime_secs = 12
            acquire_timeout_ms = 13
            reset_query = ""
            [auth]
            method = "md5"
            [[users]]
            name = "u"
            password = "p"
            auth_method = "password"
            server_user = "su"
            server_password = "sp"
            [[nodes]]
            name = "main"
            host = "db"
            port = 6543
            role = "primary"
            weight = 5
            enabled = true
            [[nodes]]
            host = "db2"
            role = "standby"
            enabled = false
            [limits]
            max_message_size = 2048
            max_client_connections = 9
            buffer_size = 8192
            buffered_message_size = 4096
            message_memory = 65536
            [timeouts]
            connect_timeout_ms = 1
            startup_timeout_ms = 2
            shutdown_timeout_secs = 3
            dirty_release_timeout_ms = 4
            client_stall_timeout_ms = 5
            client_idle_timeout_ms = 6
            idle_transaction_timeout_ms = 7
            query_timeout_ms = 8
        "#;
        let config = parse(text).expect("valid");
        assert_eq!(config.listen_address, "0.0.0.0:7432");
        assert_eq!(config.admin_address, "[::1]:9191");
        assert_eq!(config.workers, 3);
        assert_eq!(config.effective_workers(), 3);
        assert_eq!(config.pool_mode.mode, PoolMode::Session);
        assert_eq!(config.pool_mode.max_pool_size, 7);
        assert_eq!(config.pool_mode.min_idle, 2);
        assert_eq!(config.pool_mode.idle_timeout_secs, 11);
        assert_eq!(config.pool_mode.max_lifetime_secs, 12);
        assert_eq!(config.pool_mode.acquire_timeout_ms, 13);
        assert_eq!(config.pool_mode.reset_query, "");
        assert_eq!(config.auth.method, AuthMethod::Md5);
        let user = &config.users[0];
        assert_eq!(user.method(config.auth.method), AuthMethod::Password);
        assert_eq!(user.backend_user(), "su");
        assert_eq!(user.backend_password(), Some("sp"));
        assert_eq!(config.nodes[0].label(), "main");
        assert_eq!(config.nodes[0].address(), "db:6543");
        assert_eq!(config.nodes[1].role, NodeRole::Standby);
        assert!(!config.nodes[1].enabled);
        assert_eq!(config.limits.max_message_size, 2048);
        assert_eq!(config.limits.max_client_connections, 9);
        assert_eq!(config.limits.buffer_size, 8192);
        assert_eq!(config.timeouts.connect_timeout_ms, 1);
        assert_eq!(config.timeouts.startup_timeout_ms, 2);
        assert_eq!(config.timeouts.shutdown_timeout_secs, 3);
        assert_eq!(config.timeouts.dirty_release_timeout_ms, 4);
        assert_eq!(config.limits.buffered_message_size, 4096);
        assert_eq!(config.limits.message_memory, 65536);
        assert_eq!(config.timeouts.client_stall_timeout_ms, 5);
        assert_eq!(config.timeouts.client_idle_timeout_ms, 6);
        assert_eq!(config.timeouts.idle_transaction_timeout_ms, 7);
        assert_eq!(config.timeouts.query_timeout_ms, 8);
    }

    /// Cases go before BASE so top-level keys stay top-level; an array element a case
    /// defines is then element 0, ahead of BASE's entries.
    #[test]
    fn unknown_keys_name_their_path() {
        let cases = [
            ("listen_adress = \"x\"", "listen_adress"),
            ("[pool_mode]\nmax_pool = 5", "pool_mode.max_pool"),
            ("[limits]\nbuffer = 5", "limits.buffer"),
            ("[[nodes]]\nhost = \"h0\"\nprot = 1", "nodes[0].prot"),
            (
                "[[users]]\nname = \"x\"\npasword = \"p\"",
                "users[0].pasword",
            ),
        ];
        for (extra, key) in cases {
            let error = parse(&format!("{extra}\n{BASE}")).expect_err(extra);
            assert_eq!(error.key, key, "{error}");
            assert!(error.problem.contains("unknown field"), "{error}");
        }
    }

    #[test]
    fn wrong_types_name_their_path() {
        let cases = [
            ("workers = \"many\"", "workers"),
            (
                "[pool_mode]\nmax_pool_size = \"x\"",
                "pool_mode.max_pool_size",
            ),
            ("[pool_mode]\nmode = \"batch\"", "pool_mode.mode"),
            ("[pool_mode]\nmin_idle = -1", "pool_mode.min_idle"),
            ("[auth]\nmethod = \"kerberos\"", "auth.method"),
            ("[[nodes]]\nhost = \"h\"\nport = 70000", "nodes[0].port"),
            (
                "[[nodes]]\nhost = \"h\"\nenabled = \"yes\"",
                "nodes[0].enabled",
            ),
            ("[[users]]\nname = \"x\"\npassword = 5", "users[0].password"),
            ("pool_mode = 5", "pool_mode"),
        ];
        for (extra, key) in cases {
            let error = parse(&format!("{extra}\n{BASE}")).expect_err(extra);
            assert_eq!(error.key, key, "{error}");
        }
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let error = parse("workers = 1\nlisten_address = \n").expect_err("invalid");
        assert_eq!(error.key, "config");
        assert!(error.problem.contains("line 2"), "{error}");
        let error = parse("workers = 1\nworkers = 2\n").expect_err("duplicate key");
        assert_eq!(error.key, "config");
    }

    #[test]
    fn missing_file_is_a_config_error() {
        let error = Config::load(Path::new("/nonexistent/helios.toml"), no_env())
            .expect_err("missing file");
        assert_eq!(error.key, "config");
        assert!(
            error.problem.contains("/nonexistent/helios.toml"),
            "{error}"
        );
    }

    #[test]
    fn error_display_names_key() {
        let error = ConfigError::new("nodes[0].port", "must be greater than 0");
        assert_eq!(
            error.to_string(),
            "config error: `nodes[0].port`: must be greater than 0"
        );
    }

    /// Every example shipped in config/ must load and validate as it is.
    #[test]
    fn shipped_examples_are_valid() {
        let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut checked = 0;
        for entry in std::fs::read_dir(&directory).expect("config/ exists") {
            let path = entry.expect("readable entry").path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                if let Err(error) = Config::load(&path, no_env()) {
                    panic!("{}: {error}", path.display());
                }
                checked += 1;
            }
        }
        assert!(
            checked >= 2,
            "expected the example configs in {}",
            directory.display()
        );
    }
}

mod env_overrides {
    use super::*;

    fn with_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_str(BASE, env(pairs))
    }

    #[test]
    fn scalars() {
        let config = with_env(&[
            ("HELIOS_LISTEN_ADDRESS", "0.0.0.0:7000"),
            ("HELIOS_WORKERS", "4"),
        ])
        .expect("valid");
        assert_eq!(config.listen_address, "0.0.0.0:7000");
        assert_eq!(config.workers, 4);
    }

    #[test]
    fn nested_keys_even_in_sections_the_file_omits() {
        let config = with_env(&[
            ("HELIOS_POOL_MODE__MAX_POOL_SIZE", "50"),
            ("HELIOS_POOL_MODE__MODE", "session"),
            ("HELIOS_AUTH__METHOD", "md5"),
            ("HELIOS_TIMEOUTS__CONNECT_TIMEOUT_MS", "250"),
        ])
        .expect("valid");
        assert_eq!(config.pool_mode.max_pool_size, 50);
        assert_eq!(config.pool_mode.mode, PoolMode::Session);
        assert_eq!(config.auth.method, AuthMethod::Md5);
        assert_eq!(config.timeouts.connect_timeout_ms, 250);
    }

    #[test]
    fn array_elements_by_index() {
        let config = with_env(&[
            ("HELIOS_NODES__0__PORT", "5433"),
            ("HELIOS_NODES__1__ENABLED", "false"),
            ("HELIOS_USERS__1__PASSWORD", "12345"),
            ("HELIOS_USERS__0__SERVER_USER", "owner"),
        ])
        .expect("valid");
        assert_eq!(config.nodes[0].port, 5433);
        assert!(!config.nodes[1].enabled);
        assert_eq!(config.users[1].password.as_deref(), Some("12345"));
        assert_eq!(config.users[0].backend_user(), "owner");
    }

    #[test]
    fn next_element_is_appended_in_numeric_order() {
        let config = with_env(&[
            ("HELIOS_NODES__3__HOST", "10.0.0.4"),
            ("HELIOS_NODES__2__HOST", "10.0.0.3"),
            ("HELIOS_NODES__3__ROLE", "standby"),
            ("HELIOS_NODES__2__ROLE", "replica"),
        ])
        .expect("valid");
        assert_eq!(config.nodes.len(), 4);
        assert_eq!(config.nodes[2].host, "10.0.0.3");
        assert_eq!(config.nodes[3].role, NodeRole::Standby);
        assert_eq!(
            config.nodes[3].port, 5432,
            "appended elements take defaults"
        );
    }

    #[test]
    fn environment_alone_can_configure_the_proxy() {
        let vars = env(&[
            ("HELIOS_USERS__0__PASSWORD", "pw"),
            ("HELIOS_USERS__0__NAME", "app"),
            ("HELIOS_NODES__0__HOST", "127.0.0.1"),
        ]);
        let config = Config::from_toml_str("", vars).expect("valid");
        assert_eq!(config.users[0].name, "app");
        assert_eq!(config.nodes[0].address(), "127.0.0.1:5432");
    }

    #[test]
    fn appended_elements_are_validated() {
        let error = with_env(&[("HELIOS_NODES__2__PORT", "6000")]).expect_err("no host");
        assert_eq!(error.key, "nodes[2].host");
    }

    #[test]
    fn quoted_values_are_toml_strings() {
        let config = with_env(&[("HELIOS_POOL_MODE__RESET_QUERY", "\"\"")]).expect("valid");
        assert_eq!(config.pool_mode.reset_query, "");
    }

    #[test]
    fn other_variables_are_ignored() {
        let config = with_env(&[("PATH", "/bin"), ("HELIOSX", "1"), ("helios_workers", "9")])
            .expect("valid");
        assert_eq!(config, base());
    }

    #[test]
    fn unknown_keys_name_the_variable() {
        for name in [
            "HELIOS_POOL_MODE__MAX_POOLSIZE",
            "HELIOS_LISTEN",
            "HELIOS_NODES__0__PROT",
            "HELIOS_WORKERS__COUNT",
            "HELIOS_",
            "HELIOS_POOL_MODE____MODE",
        ] {
            let error = with_env(&[(name, "1")]).expect_err(name);
            assert_eq!(error.key, name, "{error}");
            assert!(error.problem.contains("no configuration key"), "{error}");
        }
    }

    #[test]
    fn bad_indices_and_sections_name_the_variable() {
        for name in [
            "HELIOS_NODES__3__PORT",
            "HELIOS_NODES__X__PORT",
            "HELIOS_NODES__0",
            "HELIOS_NODES",
            "HELIOS_POOL_MODE",
        ] {
            let error = with_env(&[(name, "1")]).expect_err(name);
            assert_eq!(error.key, name, "{error}");
        }
    }

    #[test]
    fn overridden_values_are_type_checked_and_validated() {
        let error = with_env(&[("HELIOS_POOL_MODE__MAX_POOL_SIZE", "lots")]).expect_err("type");
        assert_eq!(error.key, "pool_mode.max_pool_size");
        let error = with_env(&[("HELIOS_POOL_MODE__MAX_POOL_SIZE", "0")]).expect_err("rule");
        assert_eq!(error.key, "pool_mode.max_pool_size");
        let error = with_env(&[("HELIOS_NODES__1__PORT", "99999")]).expect_err("range");
        assert_eq!(error.key, "nodes[1].port");
    }
}

mod validation {
    use crate::config::SslMode;

    #[test]
    fn tls_needs_loadable_certificates_and_a_ca_to_verify_clients() {
        let mut config = base();
        config.tls.client_sslmode = SslMode::Require;
        rejects(config.clone(), "tls.client_cert_file");
        config.tls.client_cert_file = Some("/nonexistent/server.pem".into());
        config.tls.client_key_file = Some("/nonexistent/server.key".into());
        rejects(config.clone(), "tls.client_cert_file");
        let dir = std::env::temp_dir().join(format!("helios-tls-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "not a certificate").expect("write");
        config.tls.client_cert_file = Some(not_pem.display().to_string());
        rejects(config.clone(), "tls.client_cert_file");
        config.tls.client_sslmode = SslMode::VerifyCa;
        config.tls.client_cert_file = None;
        rejects(config.clone(), "tls.client_cert_file");
        std::fs::remove_dir_all(&dir).ok();
        // Disabled, nothing is read.
        config.tls.client_sslmode = SslMode::Disable;
        assert_eq!(config.validate(), Ok(()));
        // cert logins need verified certificates.
        config.auth.method = AuthMethod::Cert;
        config.users.iter_mut().for_each(|u| u.auth_method = None);
        rejects(config, "auth.method");
    }

    #[test]
    fn sslmode_names_parse() {
        for (name, mode) in [
            ("disable", SslMode::Disable),
            ("allow", SslMode::Allow),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let config = parse(&format!("[tls]\nclient_sslmode = \"{name}\"\nclient_cert_file = \"c\"\nclient_key_file = \"k\"\nclient_ca_file = \"a\"\n{BASE}"));
            // The files do not exist: parsing worked when the error is about them.
            match config {
                Ok(c) => assert_eq!(c.tls.client_sslmode, mode),
                Err(e) => assert!(e.key.starts_with("tls.client_"), "{name}: {e}"),
            }
        }
        assert!(parse(&format!("[tls]\nclient_sslmode = \"sometimes\"\n{BASE}")).is_err());
    }
    use super::*;

    #[test]
    fn a_unix_socket_directory_is_a_node_host() {
        let mut config = base();
        config.nodes[0].host = "/var/run/postgresql".into();
        config
            .validate()
            .expect("an absolute socket directory is a host");
        assert!(config.nodes[0].is_unix());
        assert_eq!(
            config.nodes[0].address(),
            "/var/run/postgresql/.s.PGSQL.5432"
        );
        assert_eq!(config.nodes[0].label(), "/var/run/postgresql/.s.PGSQL.5432");
        let topology = crate::topology::Topology::configured(&config).unwrap();
        assert_eq!(
            topology.nodes[0].addr.to_string(),
            "/var/run/postgresql/.s.PGSQL.5432"
        );
        // TLS that may be declined is simply not used over the socket.
        config.tls.server_sslmode = SslMode::Prefer;
        config
            .validate()
            .expect("prefer is plain over a Unix socket");
    }

    #[test]
    fn a_relative_or_too_long_socket_directory_is_refused() {
        let mut config = base();
        config.nodes[1].host = "run/pg".into();
        rejects(config.clone(), "nodes[1].host");
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("absolute path"), "{error}");
        config.nodes[1].host = format!("/{}", "d".repeat(100));
        rejects(config, "nodes[1].host");
    }

    #[test]
    fn tls_that_must_be_used_is_refused_with_a_unix_socket_node() {
        let mut config = base();
        config.nodes[1].host = "/tmp".into();
        config.tls.server_sslmode = SslMode::Require;
        rejects(config.clone(), "tls.server_sslmode");
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("nodes[1]") && error.contains("/tmp/.s.PGSQL.5432"),
            "{error}"
        );
    }

    #[test]
    fn base_is_valid() {
        assert_eq!(base().validate(), Ok(()));
    }

    #[test]
    fn addresses_must_be_socket_addresses() {
        let mut config = base();
        config.listen_address = "localhost:6432".into();
        rejects(config, "listen_address");
        let mut config = base();
        config.admin_address = "127.0.0.1".into();
        rejects(config, "admin_address");
        let mut config = base();
        config.admin_address = config.listen_address.clone();
        rejects(config, "admin_address");
    }

    #[test]
    fn at_least_one_node() {
        let mut config = base();
        config.nodes.clear();
        rejects(config, "nodes");
    }

    #[test]
    fn node_host_port_and_name() {
        let mut config = base();
        config.nodes[1].host = " ".into();
        rejects(config, "nodes[1].host");
        let mut config = base();
        config.nodes[1].port = 0;
        rejects(config, "nodes[1].port");
        let mut config = base();
        config.nodes[0].name = Some(String::new());
        rejects(config, "nodes[0].name");
    }

    #[test]
    fn exactly_one_enabled_primary() {
        let mut config = base();
        config.nodes[1].role = NodeRole::Primary;
        rejects(config.clone(), "nodes[1].role");
        config.nodes[1].enabled = false;
        assert_eq!(
            config.validate(),
            Ok(()),
            "a disabled second primary is fine"
        );
        let mut config = base();
        config.nodes[0].enabled = false;
        rejects(config, "nodes");
        let mut config = base();
        config.nodes[0].role = NodeRole::Standby;
        rejects(config, "nodes");
    }

    #[test]
    fn user_names_non_empty_and_unique() {
        let mut config = base();
        config.users[1].name = String::new();
        rejects(config, "users[1].name");
        let mut config = base();
        config.users[1].name = "app".into();
        rejects(config, "users[1].name");
    }

    #[test]
    fn password_required_unless_trust() {
        for method in [
            AuthMethod::Password,
            AuthMethod::Md5,
            AuthMethod::ScramSha256,
        ] {
            let mut config = base();
            config.users[0].password = None;
            config.users[0].auth_method = Some(method);
            rejects(config, "users[0].password");
        }
        let mut config = base();
        config.users[0].password = None;
        config.users[0].auth_method = Some(AuthMethod::Trust);
        assert_eq!(config.validate(), Ok(()));
        let mut config = base();
        config.auth.method = AuthMethod::Trust;
        config.users[1].password = None;
        assert_eq!(config.validate(), Ok(()), "trust inherited from [auth]");
    }

    #[test]
    fn password_must_parse() {
        for bad in [
            "",
            "SCRAM-SHA-256$4096:bad",
            "md53175BCE1D3201D16594CEBF9D7EB3F9D",
        ] {
            let mut config = base();
            config.users[1].password = Some(bad.into());
            rejects(config, "users[1].password");
        }
    }

    #[test]
    fn md5_method_cannot_use_scram_verifier() {
        let mut config = base();
        config.users[0].password = Some(SCRAM_VERIFIER.into());
        config.users[0].auth_method = Some(AuthMethod::Md5);
        rejects(config.clone(), "users[0].password");
        config.users[0].auth_method = Some(AuthMethod::ScramSha256);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn scram_method_cannot_use_md5_hash() {
        let mut config = base();
        config.users[0].password = Some(MD5_HASH.into());
        rejects(config.clone(), "users[0].password");
        config.users[0].auth_method = Some(AuthMethod::Md5);
        assert_eq!(config.validate(), Ok(()));
        config.users[0].auth_method = Some(AuthMethod::Password);
        assert_eq!(
            config.validate(),
            Ok(()),
            "cleartext can be checked against a hash"
        );
    }

    #[test]
    fn backend_login_settings() {
        let mut config = base();
        config.users[0].server_user = Some(String::new());
        rejects(config, "users[0].server_user");
        for bad in ["", MD5_HASH, SCRAM_VERIFIER] {
            let mut config = base();
            config.users[0].server_password = Some(bad.into());
            rejects(config, "users[0].server_password");
        }
    }

    #[test]
    fn pool_rules() {
        let mut config = base();
        config.pool_mode.max_pool_size = 0;
        rejects(config, "pool_mode.max_pool_size");
        let mut config = base();
        config.pool_mode.min_idle = 21;
        rejects(config.clone(), "pool_mode.min_idle");
        config.pool_mode.min_idle = 20;
        assert_eq!(config.validate(), Ok(()));
        for (field, set) in [
            (
                "acquire_timeout_ms",
                (|p: &mut PoolConfig| p.acquire_timeout_ms = 0) as fn(&mut _),
            ),
            ("idle_timeout_secs", |p| p.idle_timeout_secs = 0),
            ("max_lifetime_secs", |p| p.max_lifetime_secs = 0),
        ] {
            let mut config = base();
            set(&mut config.pool_mode);
            rejects(config, &format!("pool_mode.{field}"));
        }
    }

    #[test]
    fn buffer_size_bounds() {
        for (size, valid) in [
            (4095, false),
            (4096, true),
            (1 << 20, true),
            ((1 << 20) + 1, false),
        ] {
            let mut config = base();
            config.limits.buffer_size = size;
            if valid {
                assert_eq!(config.validate(), Ok(()), "{size}");
            } else {
                rejects(config, "limits.buffer_size");
            }
        }
    }

    #[test]
    fn message_size_and_client_limits() {
        let mut config = base();
        config.limits.max_message_size = 1023;
        rejects(config.clone(), "limits.max_message_size");
        config.limits.max_message_size = 1024;
        assert_eq!(config.validate(), Ok(()));
        config.limits.max_client_connections = 0;
        rejects(config.clone(), "limits.max_client_connections");
        config.limits.max_client_connections = 1;
        config.limits.buffered_message_size = 1023;
        rejects(config.clone(), "limits.buffered_message_size");
        config.limits.buffered_message_size = 4096;
        config.limits.max_message_size = 65536;
        config.limits.message_memory = 4095;
        rejects(config.clone(), "limits.message_memory");
        config.limits.message_memory = 4096;
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn timeouts_must_be_positive() {
        for (field, set) in [
            (
                "connect_timeout_ms",
                (|t: &mut TimeoutsConfig| t.connect_timeout_ms = 0) as fn(&mut _),
            ),
            ("startup_timeout_ms", |t| t.startup_timeout_ms = 0),
            ("server_login_timeout_ms", |t| t.server_login_timeout_ms = 0),
            ("shutdown_timeout_secs", |t| t.shutdown_timeout_secs = 0),
            ("dirty_release_timeout_ms", |t| {
                t.dirty_release_timeout_ms = 0
            }),
            ("client_stall_timeout_ms", |t| t.client_stall_timeout_ms = 0),
        ] {
            let mut config = base();
            set(&mut config.timeouts);
            rejects(config, &format!("timeouts.{field}"));
        }
    }
}

mod accessors {
    use super::*;

    #[test]
    fn user_lookup() {
        let config = base();
        assert_eq!(
            config.user("report").map(|u| u.name.as_str()),
            Some("report")
        );
        assert!(config.user("nobody").is_none());
    }

    #[test]
    fn secret_and_method() {
        let mut user = base().users[0].clone();
        assert_eq!(user.secret(), Some(Secret::Plain("secret".into())));
        assert_eq!(user.method(AuthMethod::Md5), AuthMethod::Md5);
        user.auth_method = Some(AuthMethod::Trust);
        assert_eq!(user.method(AuthMethod::Md5), AuthMethod::Trust);
        user.password = None;
        assert_eq!(user.secret(), None);
    }

    #[test]
    fn backend_credentials() {
        let mut user = base().users[0].clone();
        assert_eq!(user.backend_user(), "app");
        assert_eq!(user.backend_password(), Some("secret"));
        user.password = Some(MD5_HASH.into());
        assert_eq!(user.backend_password(), None, "a hash is not a password");
        user.server_password = Some("backend".into());
        user.server_user = Some("owner".into());
        assert_eq!(user.backend_password(), Some("backend"));
        assert_eq!(user.backend_user(), "owner");
    }

    #[test]
    fn node_address_and_label() {
        let mut node = NodeConfig {
            host: "db.local".into(),
            ..NodeConfig::default()
        };
        assert_eq!(node.address(), "db.local:5432");
        assert_eq!(node.label(), "db.local:5432");
        node.host = "::1".into();
        assert_eq!(node.address(), "[::1]:5432");
        node.name = Some("main".into());
        assert_eq!(node.label(), "main");
    }

    #[test]
    fn effective_workers_defaults_to_half_the_cores() {
        let mut config = base();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(config.effective_workers(), (cores / 2).max(1));
        config.workers = 2;
        assert_eq!(config.effective_workers(), 2);
    }

    #[test]
    fn debug_hides_passwords() {
        let mut user = base().users[0].clone();
        user.server_password = Some("backend-secret".into());
        let shown = format!("{user:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("app"));
    }

    #[test]
    fn every_pooling_mode_is_accepted_with_per_user_and_database_overrides() {
        for mode in ["session", "transaction", "statement"] {
            let config =
                Config::from_toml_str(BASE, env(&[("HELIOS_POOL_MODE__MODE", mode)])).expect(mode);
            assert_eq!(
                config.pool_mode_for("nobody", "app"),
                config.pool_mode.mode,
                "{mode}"
            );
        }
        let text =
            format!("{BASE}\n[[databases]]\nname = \"reports\"\npool_mode = \"statement\"\n");
        let mut config = Config::from_toml_str(&text, env(&[])).expect("databases");
        assert_eq!(config.pool_mode_for("app", "reports"), PoolMode::Statement);
        assert_eq!(config.pool_mode_for("app", "other"), PoolMode::Session);
        config.users[0].pool_mode = Some(PoolMode::Transaction);
        let user = config.users[0].name.clone();
        assert_eq!(
            config.pool_mode_for(&user, "reports"),
            PoolMode::Transaction
        );
    }

    #[test]
    fn unknown_pool_mode_is_refused_by_key() {
        let err = Config::from_toml_str(BASE, env(&[("HELIOS_POOL_MODE__MODE", "sometimes")]))
            .expect_err("bad mode");
        assert!(err.key.contains("pool_mode"), "{err}");
        let err = Config::from_toml_str(
            BASE,
            env(&[("HELIOS_POOL_MODE__MAX_PREPARED_STATEMENTS", "0")]),
        )
        .expect_err("zero statements");
        assert_eq!(err.key, "pool_mode.max_prepared_statements");
    }
}

mod control_plane {
    use super::*;

    #[test]
    fn health_settings_are_checked() {
        let mut config = base();
        config.health.check_interval_secs = 0.0;
        rejects(config, "health.check_interval_secs");
        let mut config = base();
        config.health.check_interval_secs = f64::NAN;
        rejects(config, "health.check_interval_secs");
        let mut config = base();
        config.health.timeout_ms = 0;
        rejects(config, "health.timeout_ms");
        let mut config = base();
        config.health.failure_threshold = 0;
        rejects(config, "health.failure_threshold");
        let mut config = base();
        config.health.success_threshold = 0;
        rejects(config, "health.success_threshold");
        let mut config = base();
        config.health.query = "  ".into();
        rejects(config, "health.query");
        let mut config = base();
        config.health.user = Some(String::new());
        rejects(config, "health.user");
    }

    #[test]
    fn fractional_and_integer_intervals_parse() {
        let text = "[health]\ncheck_interval_secs = 0.25\n[[nodes]]\nhost = \"db\"\n";
        let config = Config::from_toml_str(text, []).expect("valid");
        assert_eq!(
            config.health.interval(),
            std::time::Duration::from_millis(250)
        );
        let text = "[health]\ncheck_interval_secs = 2\n[[nodes]]\nhost = \"db\"\n";
        let config = Config::from_toml_str(text, []).expect("an integer is fine");
        assert_eq!(config.health.interval(), std::time::Duration::from_secs(2));
    }

    #[test]
    fn admin_token_and_console_users_are_checked() {
        let mut config = base();
        config.admin_token = Some("short".into());
        rejects(config, "admin_token");
        let mut config = base();
        config.admin_token = Some("has a space in it".into());
        rejects(config, "admin_token");
        let mut config = base();
        config.admin_users = vec!["nobody".into()];
        rejects(config, "admin_users[0]");
        let mut config = base();
        config.stats_users = vec![config.users[0].name.clone(), "ghost".into()];
        rejects(config, "stats_users[1]");
    }

    #[test]
    fn console_access_and_health_credentials() {
        let mut config = base();
        let first = config.users[0].name.clone();
        config.admin_users = vec![first.clone()];
        assert_eq!(config.console_access(&first), Some(true));
        assert_eq!(config.console_access("someone-else"), None);
        let (user, _) = config.health_credentials();
        assert_eq!(user, config.users[0].backend_user());
        config.health.user = Some("monitor".into());
        config.health.password = Some("pw".into());
        assert_eq!(
            config.health_credentials(),
            ("monitor".to_string(), Some("pw".to_string()))
        );
    }
}

mod admin_api {
    use super::*;

    #[test]
    fn defaults() {
        let api = AdminApiConfig::default();
        assert_eq!(api.workers, 2);
        assert_eq!(api.queue_depth, 32);
        assert_eq!(api.max_connections, 256);
        assert_eq!(api.read_timeout_ms, 5000);
        assert_eq!(api.idle_timeout_ms, 30_000);
        assert_eq!(api.queue_timeout_ms, 5000);
        assert_eq!(base().admin_api, api);
    }

    #[test]
    fn read_from_the_file_and_the_environment() {
        let text = format!(
            "{BASE}\n[admin_api]\nworkers = 4\nqueue_depth = 8\nmax_connections = 100\n\
             read_timeout_ms = 750\nidle_timeout_ms = 2000\nqueue_timeout_ms = 900\n"
        );
        let config = parse(&text).expect("valid");
        assert_eq!(
            config.admin_api,
            AdminApiConfig {
                workers: 4,
                queue_depth: 8,
                max_connections: 100,
                read_timeout_ms: 750,
                idle_timeout_ms: 2000,
                queue_timeout_ms: 900,
            }
        );
        let config =
            Config::from_toml_str(BASE, env(&[("HELIOS_ADMIN_API__MAX_CONNECTIONS", "12")]))
                .expect("valid");
        assert_eq!(config.admin_api.max_connections, 12);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = parse(&format!("{BASE}\n[admin_api]\nthreads = 4\n")).expect_err("typo");
        assert!(error.to_string().contains("threads"), "{error}");
    }

    #[test]
    fn bad_values_name_their_key() {
        type Spoil = fn(&mut AdminApiConfig);
        let cases: [(&str, Spoil); 9] = [
            ("admin_api.workers", |a| a.workers = 0),
            ("admin_api.workers", |a| a.workers = 65),
            ("admin_api.queue_depth", |a| a.queue_depth = 0),
            ("admin_api.queue_depth", |a| a.queue_depth = 4095),
            ("admin_api.max_connections", |a| a.max_connections = 0),
            ("admin_api.read_timeout_ms", |a| a.read_timeout_ms = 0),
            ("admin_api.idle_timeout_ms", |a| a.idle_timeout_ms = 0),
            ("admin_api.queue_timeout_ms", |a| a.queue_timeout_ms = 0),
            ("admin_api.read_timeout_ms", |a| {
                a.read_timeout_ms = 3_600_001
            }),
        ];
        for (key, spoil) in cases {
            let mut config = base();
            spoil(&mut config.admin_api);
            rejects(config, key);
        }
        let error = parse(&format!("{BASE}\n[admin_api]\nworkers = 0\n")).expect_err("zero");
        assert!(error.to_string().contains("admin_api.workers"), "{error}");
    }
}

mod auth_query {
    use super::*;

    #[test]
    fn off_by_default_and_on_with_auth_user() {
        let config = base();
        assert_eq!(config.auth.query(), None);
        assert_eq!(config.auth.auth_query_cache_secs, 10);
        let config = parse(&format!("{BASE}\n[auth]\nauth_user = \"pgbouncer\"\n")).unwrap();
        assert_eq!(config.auth.query(), Some(DEFAULT_AUTH_QUERY));
        let custom = "SELECT * FROM public.lookup($1)";
        let config = parse(&format!(
            "{BASE}\n[auth]\nauth_user = \"a\"\nauth_query = \"{custom}\"\nauth_dbname = \"postgres\"\n"
        ))
        .unwrap();
        assert_eq!(config.auth.query(), Some(custom));
    }

    #[test]
    fn the_default_query_leaves_nothing_to_a_search_path() {
        // Every relation, function and operator is named with its schema.
        for needle in [
            "pg_catalog.pg_authid",
            "pg_catalog.date_part",
            "OPERATOR(pg_catalog.=)",
            "rolvaliduntil",
        ] {
            assert!(DEFAULT_AUTH_QUERY.contains(needle), "{needle}");
        }
    }

    #[test]
    fn companions_need_auth_user_and_the_query_needs_its_parameter() {
        let cases = [
            ("auth_password = \"x\"", "auth.auth_password"),
            ("auth_query = \"SELECT 1 WHERE $1 = ''\"", "auth.auth_query"),
            ("auth_dbname = \"postgres\"", "auth.auth_dbname"),
            ("auth_user = \"\"", "auth.auth_user"),
            (
                "auth_user = \"a\"\nauth_query = \"SELECT 1\"",
                "auth.auth_query",
            ),
            ("auth_user = \"a\"\nauth_dbname = \"\"", "auth.auth_dbname"),
        ];
        for (lines, key) in cases {
            let error = parse(&format!("{BASE}\n[auth]\n{lines}\n")).expect_err(lines);
            assert_eq!(error.key, key, "{error}");
        }
    }

    #[test]
    fn the_password_stays_out_of_debug_output() {
        let config = parse(&format!(
            "{BASE}\n[auth]\nauth_user = \"a\"\nauth_password = \"hunter2\"\n"
        ))
        .unwrap();
        assert!(!format!("{:?}", config.auth).contains("hunter2"));
    }
}

mod proxy_table {
    use super::*;

    #[test]
    fn the_product_docs_minimal_configuration_loads() {
        let text = r#"
[proxy]
listen_address = "0.0.0.0:6432"
admin_address = "0.0.0.0:9090"
[[nodes]]
host = "127.0.0.1"
port = 5432
role = "primary"
[[nodes]]
host = "127.0.0.2"
port = 5432
role = "standby"
"#;
        let config = parse(text).expect("loads");
        assert_eq!(config.listen_address, "0.0.0.0:6432");
        assert_eq!(config.admin_address, "0.0.0.0:9090");
        assert_eq!(config.nodes.len(), 2);
    }

    #[test]
    fn a_key_twice_or_out_of_place_is_named() {
        let twice = "listen_address = \"127.0.0.1:1\"\n[proxy]\nlisten_address = \"127.0.0.1:2\"\n";
        assert_eq!(parse(twice).unwrap_err().key, "proxy.listen_address");
        let stray = "[proxy]\nmax_pool_size = 3\n";
        assert_eq!(parse(stray).unwrap_err().key, "proxy.max_pool_size");
        assert_eq!(parse("proxy = 3\n").unwrap_err().key, "proxy");
    }
}

mod cache {
    use super::*;

    #[test]
    fn defaults_and_a_full_section() {
        let config = base();
        assert!(!config.cache.enabled);
        assert_eq!(config.cache.max_memory_mb, 64);
        assert_eq!(config.cache.default_ttl_secs, 60);
        assert_eq!(config.cache.invalidation, CacheInvalidation::Proxy);
        let config = parse(&format!(
            "{BASE}\n[cache]\nenabled = true\ninvalidation = \"wal\"\nwal_user = \"app\"\n\
             [[cache.tables]]\nname = \"public.rates\"\nttl_secs = 5\n\
             [[cache.tables]]\nname = \"audit\"\ncache = false\n"
        ))
        .expect("valid");
        assert_eq!(config.cache.invalidation, CacheInvalidation::Wal);
        assert_eq!(config.cache.tables.len(), 2);
        assert!(config.cache.tables[0].cache);
        assert!(!config.cache.tables[1].cache);
        // The WAL follower logs in as wal_user, with that user's server password.
        assert_eq!(config.wal_credentials().0, "app");
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut c = base();
        c.cache.max_memory_mb = 0;
        rejects(c, "cache.max_memory_mb");
        let mut c = base();
        c.cache.max_result_bytes = 10;
        rejects(c, "cache.max_result_bytes");
        let mut c = base();
        c.cache.tables.push(CacheTableConfig {
            name: "a.b.c".into(),
            ..CacheTableConfig::default()
        });
        rejects(c, "cache.tables[0].name");
        let error = parse(&format!("{BASE}\n[cache]\ninvalidation = \"trigger\"\n"))
            .expect_err("unknown invalidation");
        assert!(
            error.key.contains("cache") || error.problem.contains("invalidation"),
            "{error}"
        );
        let error = parse(&format!("{BASE}\n[cache]\nsize = 3\n")).expect_err("unknown key");
        assert!(error.to_string().contains("size"), "{error}");
    }
}
