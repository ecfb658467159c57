//! Logins for roles the proxy was never told about: `[auth] auth_user` looks the password
//! up on the server (`auth_query`), the client is checked against it (SCRAM or md5), and
//! the proxy logs in to the servers as that role with what the client proved (SCRAM
//! pass-through, the md5 hash) — no password of theirs in the configuration. Every pool
//! mode; wrong passwords, expired roles and hba rejects refused; a hostile search_path
//! cannot take the lookup over; and the product docs' minimal configuration, with
//! auth_query and TLS added, lets a role log in with its own password.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::certs::Certs;
use common::http::get;
use common::tools::{run_tool, tool_command};
use common::{
    cluster, proxy_only, sqlstate, Proxy, RawConn, DATABASE, MD5_PASSWORD, MD5_USER, SUPERUSER,
    SUPERUSER_PASSWORD,
};

const SCRAM_ROLE: &str = "aq_scram";
const SCRAM_PASSWORD: &str = "scram-Pa55";
const EXPIRED_ROLE: &str = "aq_expired";
const FUTURE_ROLE: &str = "aq_future";
const NOLOGIN_ROLE: &str = "aq_nologin";
/// A least-privilege lookup role: it may only call the README's function.
const LOOKUP_ROLE: &str = "aq_lookup";
const LOOKUP_PASSWORD: &str = "lookup-Pa55";
const EVIL_DB: &str = "aq_evil";
/// Only the burst test logs in here, so its lookup connections can be counted.
const BURST_DB: &str = "aq_burst";

/// The README's function for a least-privilege `auth_user`, verbatim in spirit: a
/// SECURITY DEFINER with its own pinned search_path, returning no row for no role.
fn lookup_function_sql() -> String {
    format!(
        "CREATE SCHEMA helios_auth;\n\
         CREATE FUNCTION helios_auth.user_lookup(i_username text)\n\
         RETURNS TABLE (usename name, passwd text, valid_until float8)\n\
         LANGUAGE sql SECURITY DEFINER\n\
         SET search_path = pg_catalog, pg_temp\n\
         AS $$\n\
           SELECT rolname, rolpassword, date_part('epoch', rolvaliduntil)\n\
           FROM pg_authid WHERE rolname = i_username\n\
         $$;\n\
         REVOKE ALL ON FUNCTION helios_auth.user_lookup(text) FROM PUBLIC;\n\
         GRANT USAGE ON SCHEMA helios_auth TO {LOOKUP_ROLE};\n\
         GRANT EXECUTE ON FUNCTION helios_auth.user_lookup(text) TO {LOOKUP_ROLE};\n"
    )
}

/// Roles that exist only in PostgreSQL, made once per test binary.
fn roles() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let c = cluster();
        c.psql_admin(
            "postgres",
            &format!(
                "CREATE ROLE {SCRAM_ROLE} LOGIN PASSWORD '{SCRAM_PASSWORD}';\n\
                 CREATE ROLE {EXPIRED_ROLE} LOGIN PASSWORD 'expired-Pa55' VALID UNTIL '2001-01-01';\n\
                 CREATE ROLE {FUTURE_ROLE} LOGIN PASSWORD 'future-Pa55' VALID UNTIL '2999-01-01';\n\
                 CREATE ROLE {NOLOGIN_ROLE} NOLOGIN PASSWORD 'nologin-Pa55';\n\
                 CREATE ROLE {LOOKUP_ROLE} LOGIN PASSWORD '{LOOKUP_PASSWORD}';\n\
                 CREATE DATABASE {EVIL_DB};\n\
                 CREATE DATABASE {BURST_DB};\n"
            ),
        );
        c.psql_admin(
            DATABASE,
            &format!(
                "GRANT ALL ON SCHEMA public TO {SCRAM_ROLE};\n{}",
                lookup_function_sql()
            ),
        );
    });
}

/// `[auth]` turning auth_query on with the superuser (the default query reads pg_authid),
/// and no `[[users]]` at all: the seed configuration.
fn seed(mode: &str, extra_auth: &str) -> String {
    format!(
        "users = []\n[pool_mode]\nmode = \"{mode}\"\n\
         [auth]\nauth_user = \"{SUPERUSER}\"\nauth_password = \"{SUPERUSER_PASSWORD}\"\n{extra_auth}"
    )
}

async fn who(client: &tokio_postgres::Client) -> (String, String) {
    let row = client
        .query_one("SELECT current_user::text, session_user::text", &[])
        .await
        .expect("who am I");
    (row.get(0), row.get(1))
}

fn metrics(proxy: &Proxy) -> serde_json::Value {
    get(proxy.admin_port.unwrap(), "/metrics").json()
}

fn first_auth_request(proxy: &Proxy, user: &str) -> i32 {
    RawConn::connect(proxy.port).first_auth_request(user, DATABASE)
}

async fn refused(proxy: &Proxy, user: &str, password: &str, db: &str) -> tokio_postgres::Error {
    proxy
        .connect(user, Some(password), db)
        .await
        .err()
        .unwrap_or_else(|| panic!("{user} logged in with {password:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_made_only_in_postgres_log_in_in_every_pool_mode() {
    if proxy_only("auth_query logins", "auth_query is the proxy's") {
        return;
    }
    roles();
    for mode in ["session", "transaction", "statement"] {
        // md5 as PostgreSQL means it: md5 for an md5 hash, SCRAM for a SCRAM verifier.
        let proxy = Proxy::start(cluster(), &seed(mode, "method = \"md5\"\n"));
        assert_eq!(first_auth_request(&proxy, SCRAM_ROLE), 10, "{mode}: SASL");
        assert_eq!(first_auth_request(&proxy, MD5_USER), 5, "{mode}: md5");
        for (user, password) in [(SCRAM_ROLE, SCRAM_PASSWORD), (MD5_USER, MD5_PASSWORD)] {
            // Several clients at once: pooled server connections open with what the
            // clients proved, on both workers.
            let mut clients = Vec::new();
            for _ in 0..4 {
                let client = proxy
                    .connect(user, Some(password), DATABASE)
                    .await
                    .unwrap_or_else(|e| panic!("{mode}: {user}: {e:?}\n{}", proxy.log()));
                clients.push(client);
            }
            for client in &clients {
                // The server itself says who logged in: the role, not the auth_user.
                assert_eq!(
                    who(client).await,
                    (user.to_string(), user.to_string()),
                    "{mode}"
                );
            }
            if mode != "statement" {
                let client = &clients[0];
                client
                    .batch_execute(&format!(
                        "BEGIN; CREATE TEMP TABLE IF NOT EXISTS t_{mode} (v int); \
                         INSERT INTO t_{mode} VALUES (1); COMMIT"
                    ))
                    .await
                    .unwrap_or_else(|e| panic!("{mode}: {user}: {e:?}"));
            }
        }
        let lookups = &metrics(&proxy)["auth_query"];
        let answered =
            lookups["lookups"].as_u64().unwrap() + lookups["cache_hits"].as_u64().unwrap();
        assert!(answered >= 8, "{mode}: {lookups}");
        assert!(
            lookups["cache_hits"].as_u64().unwrap() >= 1,
            "{mode}: {lookups}"
        );
        assert_eq!(lookups["errors"], 0, "{mode}: {lookups}");
        proxy.stop();
    }
    // The default method (scram-sha-256), as a seed configuration has it.
    let proxy = Proxy::start(cluster(), &seed("transaction", ""));
    let client = proxy
        .connect(SCRAM_ROLE, Some(SCRAM_PASSWORD), DATABASE)
        .await
        .expect("SCRAM role under the default method");
    assert_eq!(who(&client).await.0, SCRAM_ROLE);
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_expired_roles_and_hba_rejects_are_refused() {
    if proxy_only("auth_query refusals", "auth_query is the proxy's") {
        return;
    }
    roles();
    let proxy = Proxy::start(cluster(), &seed("transaction", "method = \"md5\"\n"));
    let cases = [
        (SCRAM_ROLE, "not-the-password"),
        (MD5_USER, "not-the-password"),
        (EXPIRED_ROLE, "expired-Pa55"),
        (NOLOGIN_ROLE, "not-the-password"),
        ("aq_nobody", "whatever"),
        // The right password of a NOLOGIN role: PostgreSQL says so after checking it.
        (NOLOGIN_ROLE, "nologin-Pa55"),
    ];
    // PostgreSQL itself is asked the same, and the proxy must answer as it does.
    let direct = Proxy::direct(cluster());
    for (user, password) in cases {
        let err = refused(&proxy, user, password, DATABASE).await;
        let expected = refused(&direct, user, password, DATABASE).await;
        let expected = expected.as_db_error().unwrap();
        assert_eq!(sqlstate(&err), expected.code().code(), "{user}: {err:?}");
        assert_eq!(
            err.as_db_error().unwrap().message(),
            expected.message(),
            "{user}"
        );
    }
    let client = proxy
        .connect(FUTURE_ROLE, Some("future-Pa55"), DATABASE)
        .await
        .expect("VALID UNTIL in the future logs in");
    assert_eq!(who(&client).await.0, FUTURE_ROLE);
    let reasons = &metrics(&proxy)["auth_failures_by_reason"];
    assert!(reasons["wrong_password"].as_u64() >= Some(3), "{reasons}");
    assert!(reasons["password_expired"].as_u64() >= Some(1), "{reasons}");
    assert!(reasons["unknown_user"].as_u64() >= Some(1), "{reasons}");
    let log = proxy.log();
    assert!(log.contains("password_expired"), "{log}");
    proxy.stop();

    // An hba `reject` line stops a role auth_query would have admitted.
    let dir = tempfile::tempdir().unwrap();
    let hba = dir.path().join("hba.conf");
    std::fs::write(
        &hba,
        format!(
            "host all {SCRAM_ROLE} 127.0.0.1/32 reject\nhost all all 127.0.0.1/32 scram-sha-256\n"
        ),
    )
    .unwrap();
    let proxy = Proxy::start(
        cluster(),
        &seed(
            "session",
            &format!("auth_hba_file = \"{}\"\n", hba.display()),
        ),
    );
    let err = refused(&proxy, SCRAM_ROLE, SCRAM_PASSWORD, DATABASE).await;
    assert_eq!(sqlstate(&err), "28000", "{err:?}");
    let client = proxy
        .connect(FUTURE_ROLE, Some("future-Pa55"), DATABASE)
        .await
        .expect("another role passes the same rules");
    assert_eq!(who(&client).await.0, FUTURE_ROLE);
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_password_changes_reach_cached_lookups() {
    if proxy_only("auth_query cache", "auth_query is the proxy's") {
        return;
    }
    roles();
    let c = cluster();
    c.psql_admin(
        "postgres",
        "CREATE ROLE aq_soon LOGIN PASSWORD 'soon-Pa55';\n\
         DO $$ BEGIN EXECUTE format('ALTER ROLE aq_soon VALID UNTIL %L', now() + interval '3 seconds'); END $$;\n\
         CREATE ROLE aq_change LOGIN PASSWORD 'old-Pa55';\n",
    );
    let expires = std::time::Instant::now() + Duration::from_secs(3);
    // One worker, so every login meets the same cache.
    let proxy = Proxy::start(
        c,
        &format!(
            "workers = 1\n{}",
            seed("transaction", "auth_query_cache_secs = 600\n")
        ),
    );
    proxy
        .connect("aq_soon", Some("soon-Pa55"), DATABASE)
        .await
        .expect("login before VALID UNTIL");
    let looked_up = metrics(&proxy)["auth_query"]["lookups"].as_u64().unwrap();
    tokio::time::sleep(expires.saturating_duration_since(std::time::Instant::now())).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // VALID UNTIL has passed; the lookup is still cached, and its expiry still counts.
    let err = refused(&proxy, "aq_soon", "soon-Pa55", DATABASE).await;
    assert_eq!(sqlstate(&err), "28P01", "{err:?}");
    let auth_query = &metrics(&proxy)["auth_query"];
    assert_eq!(
        auth_query["lookups"].as_u64().unwrap(),
        looked_up,
        "{auth_query}"
    );
    assert!(auth_query["cache_hits"].as_u64() >= Some(1), "{auth_query}");

    // A new password: a failed login drops the cached lookup, so the next one sees it.
    proxy
        .connect("aq_change", Some("old-Pa55"), DATABASE)
        .await
        .expect("old password before the change");
    c.psql_admin("postgres", "ALTER ROLE aq_change PASSWORD 'new-Pa55';\n");
    let mut logged_in = None;
    for _ in 0..2 {
        if let Ok(client) = proxy.connect("aq_change", Some("new-Pa55"), DATABASE).await {
            logged_in = Some(client);
            break;
        }
    }
    let client = logged_in.expect("the new password works by the second attempt");
    // The server connection logs in with the new proof.
    assert_eq!(who(&client).await.0, "aq_change");
    // A reload empties the cache: the server's word counts at once.
    c.psql_admin(
        "postgres",
        "ALTER ROLE aq_change VALID UNTIL '2001-01-01';\n",
    );
    let reload = common::http::request(
        proxy.admin_port.unwrap(),
        "POST",
        "/config/reload",
        &[],
        b"",
    );
    assert_eq!(reload.status, 200, "{}", reload.body);
    let err = refused(&proxy, "aq_change", "new-Pa55", DATABASE).await;
    assert_eq!(sqlstate(&err), "28P01", "{err:?}");
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_logins_shares_a_few_lookup_connections() {
    if proxy_only("auth_query burst", "auth_query is the proxy's") {
        return;
    }
    roles();
    // No cache: every login looks up; 60 at once still use at most 4 per worker.
    let proxy = Proxy::start(
        cluster(),
        &seed("transaction", "auth_query_cache_secs = 0\n"),
    );
    let logins = (0..60).map(|_| proxy.connect(SCRAM_ROLE, Some(SCRAM_PASSWORD), BURST_DB));
    for result in futures_util::future::join_all(logins).await {
        let client = result.unwrap_or_else(|e| panic!("{e:?}\n{}", proxy.log()));
        drop(client);
    }
    let lookup_connections = cluster()
        .admin_i64(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'heliosdb-proxy auth_query' AND datname = 'aq_burst'",
        )
        .await;
    assert!(
        (1..=8).contains(&lookup_connections),
        "{lookup_connections} lookup connections"
    );
    assert_eq!(metrics(&proxy)["auth_query"]["errors"], 0);
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malicious_search_path_cannot_hijack_auth_query() {
    if proxy_only("auth_query search_path", "auth_query is the proxy's") {
        return;
    }
    roles();
    let c = cluster();
    // A database where every search path leads to an attacker's schema first: a fake
    // pg_authid that gives the victim the attacker's password, an `=` that matches
    // anything and a date_part that reports being called.
    c.psql_admin(
        EVIL_DB,
        &format!(
            "CREATE SCHEMA evil;\n\
             CREATE TABLE evil.hits (what text);\n\
             GRANT USAGE ON SCHEMA evil TO PUBLIC;\n\
             GRANT INSERT, SELECT ON evil.hits TO PUBLIC;\n\
             CREATE FUNCTION evil.name_eq(name, name) RETURNS boolean LANGUAGE plpgsql AS\n\
               $$ BEGIN INSERT INTO evil.hits VALUES ('operator'); RETURN true; END $$;\n\
             CREATE OPERATOR evil.= (LEFTARG = name, RIGHTARG = name, FUNCTION = evil.name_eq);\n\
             CREATE FUNCTION evil.date_part(text, timestamptz) RETURNS float8 LANGUAGE plpgsql AS\n\
               $$ BEGIN INSERT INTO evil.hits VALUES ('date_part'); RETURN NULL; END $$;\n\
             CREATE VIEW evil.pg_authid AS SELECT '{SCRAM_ROLE}'::name AS rolname,\n\
               'md5' || md5('attacker{SCRAM_ROLE}') AS rolpassword, NULL::timestamptz AS rolvaliduntil,\n\
               true AS rolcanlogin;\n\
             GRANT SELECT ON evil.pg_authid TO PUBLIC;\n\
             {}\
             ALTER DATABASE {EVIL_DB} SET search_path = evil, pg_catalog;\n\
             ALTER ROLE {SUPERUSER} IN DATABASE {EVIL_DB} SET search_path = evil, pg_catalog;\n\
             ALTER ROLE {LOOKUP_ROLE} IN DATABASE {EVIL_DB} SET search_path = evil, pg_catalog;\n",
            lookup_function_sql()
        ),
    );
    // The trap works: an unqualified lookup in that database falls into it.
    let trapped = c.psql_admin(
        EVIL_DB,
        &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{SCRAM_ROLE}';\n"),
    );
    assert!(trapped.trim().starts_with("md5"), "{trapped}");
    c.psql_admin(EVIL_DB, "TRUNCATE evil.hits;\n");

    let lookups = [
        // The default query, as the superuser.
        seed("transaction", "method = \"md5\"\n"),
        // The README's function, as a role that may do nothing else.
        format!(
            "users = []\n[pool_mode]\nmode = \"transaction\"\n[auth]\nmethod = \"md5\"\n\
             auth_user = \"{LOOKUP_ROLE}\"\nauth_password = \"{LOOKUP_PASSWORD}\"\n\
             auth_query = \"SELECT usename, passwd, valid_until FROM helios_auth.user_lookup($1)\"\n"
        ),
    ];
    for config in lookups {
        let proxy = Proxy::start(c, &config);
        // The attacker also asks for the path in its own startup packet.
        let mut cfg = proxy.pg_config(SCRAM_ROLE, Some("attacker"), EVIL_DB);
        cfg.options("-c search_path=evil,pg_catalog");
        let Err(err) = Proxy::connect_with(&cfg).await else {
            panic!("the attacker's password must not work");
        };
        assert_eq!(sqlstate(&err), "28P01", "{err:?}\n{}", proxy.log());
        // The real password does, in that same database.
        let client = proxy
            .connect(SCRAM_ROLE, Some(SCRAM_PASSWORD), EVIL_DB)
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", proxy.log()));
        assert_eq!(who(&client).await.0, SCRAM_ROLE);
        let hits = c.psql_admin(EVIL_DB, "SELECT count(*) FROM evil.hits;\n");
        assert_eq!(hits.trim(), "0", "the lookup ran the attacker's objects");
        proxy.stop();
    }
}

#[test]
fn the_minimal_configuration_with_auth_query_logs_a_role_in_over_tls() {
    if proxy_only("minimal config", "the proxy's configuration") {
        return;
    }
    roles();
    let c = cluster();
    let standby = c.start_standby();
    let certs = Certs::make(SCRAM_ROLE);
    // The overview's "Minimal Configuration", on this machine's ports, plus [auth] and [tls].
    let proxy = Proxy::start_exact(|port, admin_port| {
        format!(
            "[proxy]\n\
             listen_address = \"127.0.0.1:{port}\"\n\
             admin_address = \"127.0.0.1:{admin_port}\"\n\
             [[nodes]]\nhost = \"127.0.0.1\"\nport = {}\nrole = \"primary\"\n\
             [[nodes]]\nhost = \"127.0.0.1\"\nport = {}\nrole = \"standby\"\n\
             [auth]\nauth_user = \"{SUPERUSER}\"\nauth_password = \"{SUPERUSER_PASSWORD}\"\n\
             [tls]\nclient_sslmode = \"require\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            c.port,
            standby.port,
            certs.file("server.pem"),
            certs.file("server.key"),
        )
    });
    let psql = |sql: &str| {
        let mut cmd = tool_command("psql");
        cmd.env("PGPASSWORD", SCRAM_PASSWORD).args([
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &format!(
                "host=localhost hostaddr=127.0.0.1 port={} user={SCRAM_ROLE} dbname={DATABASE} \
                 sslmode=verify-full sslrootcert={}",
                proxy.port,
                certs.file("ca.pem")
            ),
            "-c",
            sql,
        ]);
        run_tool(cmd, None, Duration::from_secs(60))
    };
    let out = psql("SELECT current_user");
    assert!(
        out.status.success() && out.stdout.trim() == SCRAM_ROLE,
        "{out}\n{}",
        proxy.log()
    );
    let out = psql("\\conninfo");
    assert!(out.stdout.contains("SSL connection"), "{out}");
    // Reads and writes both work, wherever they are routed.
    let out = psql("CREATE TEMP TABLE t (v int); INSERT INTO t VALUES (7); SELECT v FROM t");
    assert!(
        out.status.success() && out.stdout.trim().ends_with('7'),
        "{out}"
    );
    proxy.stop();
    drop(standby);
}
