//! TLS between clients and the proxy, with certificates this test makes (a CA, the
//! proxy's certificate for localhost and 127.0.0.1, a client certificate whose CN is a
//! user): psql and psycopg verify the proxy (`sslmode=verify-full`), `client_sslmode =
//! require` refuses plain logins as PostgreSQL's `hostssl` does, `verify-ca` demands a
//! client certificate, and `disable` answers an `SSLRequest` with `N`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::certs::Certs;
use common::tools::{run_tool, tool_command, ToolOutput};
use common::{proxy_only, Proxy, SUPERUSER, SUPERUSER_PASSWORD};

/// psql with a connection string (host name `localhost` for verification, address
/// 127.0.0.1 to reach the proxy).
fn psql(proxy: &Proxy, conninfo: &str, sql: &str) -> ToolOutput {
    let mut cmd = tool_command("psql");
    cmd.env("PGPASSWORD", SUPERUSER_PASSWORD).args([
        "-X",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        &format!(
            "host=localhost hostaddr=127.0.0.1 port={} user={SUPERUSER} dbname={} {conninfo}",
            proxy.port,
            common::DATABASE
        ),
        "-c",
        sql,
    ]);
    run_tool(cmd, None, Duration::from_secs(60))
}

#[test]
fn psql_verifies_the_proxy_and_plain_logins_are_refused_under_require() {
    if proxy_only("tls require", "the proxy's TLS") {
        return;
    }
    let certs = Certs::make(SUPERUSER);
    let proxy = Proxy::start(common::cluster(), &certs.config("require", false));
    let full = format!("sslmode=verify-full sslrootcert={}", certs.file("ca.pem"));
    let out = psql(&proxy, &full, "SELECT 40 + 2");
    assert!(out.status.success() && out.stdout.trim() == "42", "{out}");
    // The session really is encrypted, seen from psql.
    let out = psql(&proxy, &full, "\\conninfo");
    assert!(out.stdout.contains("SSL connection"), "{out}");
    // A CA that did not sign the proxy's certificate: libpq refuses the proxy.
    let wrong = format!(
        "sslmode=verify-full sslrootcert={}",
        certs.file("other-ca.pem")
    );
    let out = psql(&proxy, &wrong, "SELECT 1");
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("certificate verify failed"), "{out}");
    // Plain TCP under client_sslmode = require: PostgreSQL's hostssl refusal.
    let out = psql(&proxy, "sslmode=disable", "SELECT 1");
    assert!(!out.status.success(), "{out}");
    assert!(
        out.stderr.contains("no pg_hba.conf entry") && out.stderr.contains("no encryption"),
        "{out}"
    );
    // Transaction pooling works over TLS too (large results cross many TLS records).
    let proxy = Proxy::start(
        common::cluster(),
        &format!(
            "[pool_mode]\nmode = \"transaction\"\n{}",
            certs.config("prefer", false)
        ),
    );
    let out = psql(
        &proxy,
        &full,
        "SELECT sum(length(repeat('x', 1000) || g::text)) FROM generate_series(1, 2000) g",
    );
    assert!(out.status.success(), "{out}");
    let out = psql(
        &proxy,
        &full,
        "SELECT string_agg(repeat('y', 100), '') FROM generate_series(1, 5000)",
    );
    assert!(
        out.status.success() && out.stdout.trim().len() == 500_000,
        "{}",
        out.stderr
    );
}

#[test]
fn verify_ca_demands_a_client_certificate() {
    if proxy_only("tls verify-ca", "the proxy's TLS") {
        return;
    }
    let certs = Certs::make(SUPERUSER);
    let proxy = Proxy::start(common::cluster(), &certs.config("verify-ca", true));
    let base = format!("sslmode=verify-full sslrootcert={}", certs.file("ca.pem"));
    let with_cert = format!(
        "{base} sslcert={} sslkey={}",
        certs.file("client.pem"),
        certs.file("client.key")
    );
    let out = psql(&proxy, &with_cert, "SELECT 'with a certificate'");
    assert!(
        out.status.success() && out.stdout.trim() == "with a certificate",
        "{out}"
    );
    // No certificate: the handshake fails.
    let out = psql(
        &proxy,
        &format!("{base} sslcert=/nonexistent sslkey=/nonexistent"),
        "SELECT 1",
    );
    assert!(!out.status.success(), "{out}");
}

#[test]
fn disable_answers_ssl_requests_with_n() {
    if proxy_only("tls disable", "the proxy's TLS") {
        return;
    }
    let proxy = Proxy::start(common::cluster(), "");
    // sslmode=require against a server without TLS fails in libpq, as with PostgreSQL.
    let out = psql(&proxy, "sslmode=require", "SELECT 1");
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("does not support SSL"), "{out}");
    let out = psql(&proxy, "sslmode=prefer", "SELECT 7");
    assert!(out.status.success() && out.stdout.trim() == "7", "{out}");
}

#[test]
fn psycopg_verifies_the_proxy() {
    if proxy_only("tls psycopg", "the proxy's TLS") {
        return;
    }
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/drivers/venv/bin/python");
    assert!(
        python.exists(),
        "the Python venv ({}) is missing: run scripts/test.sh",
        python.display()
    );
    let certs = Certs::make(SUPERUSER);
    // verify-ca: the proxy demands the client certificate psycopg presents.
    let proxy = Proxy::start(common::cluster(), &certs.config("verify-ca", true));
    let script = format!(
        "import psycopg\n\
         with psycopg.connect(host='localhost', hostaddr='127.0.0.1', port={port}, user='{SUPERUSER}', \
         password='{SUPERUSER_PASSWORD}', dbname='{db}', sslmode='verify-full', sslrootcert='{ca}', \
         sslcert='{cert}', sslkey='{key}') as c:\n\
         \x20   assert c.pgconn.ssl_in_use\n\
         \x20   print(c.execute('SELECT %s::int * 2', (21,)).fetchone()[0])\n",
        port = proxy.port,
        db = common::DATABASE,
        ca = certs.file("ca.pem"),
        cert = certs.file("client.pem"),
        key = certs.file("client.key"),
    );
    let mut cmd = Command::new(python);
    cmd.args(["-c", &script]);
    let out = run_tool(cmd, None, Duration::from_secs(60));
    assert!(out.status.success() && out.stdout.trim() == "42", "{out}");
}

/// `auth_method = "cert"`: the verified client certificate's CN is the user; no password.
#[test]
fn cert_login_maps_the_certificate_cn_to_the_user() {
    if proxy_only("tls cert auth", "the proxy's users") {
        return;
    }
    let run = |certs: &Certs, client_cert: bool| {
        let users = format!(
            "[[users]]\nname = \"certuser\"\nauth_method = \"cert\"\nserver_user = \"{SUPERUSER}\"\nserver_password = \"{SUPERUSER_PASSWORD}\"\n"
        );
        let proxy = Proxy::start(
            common::cluster(),
            &format!("{}{users}", certs.config("prefer", true)),
        );
        let mut conninfo = format!(
            "sslmode=verify-full sslrootcert={} user=certuser",
            certs.file("ca.pem")
        );
        if client_cert {
            conninfo.push_str(&format!(
                " sslcert={} sslkey={}",
                certs.file("client.pem"),
                certs.file("client.key")
            ));
        } else {
            conninfo.push_str(" sslcert=/nonexistent sslkey=/nonexistent");
        }
        psql(&proxy, &conninfo, "SELECT current_user")
    };
    let own = Certs::make("certuser");
    let out = run(&own, true);
    assert!(
        out.status.success() && out.stdout.trim() == SUPERUSER,
        "{out}"
    );
    let out = run(&own, false);
    assert!(
        !out.status.success() && out.stderr.contains("requires a valid client certificate"),
        "{out}"
    );
    let intruder = Certs::make("intruder");
    let out = run(&intruder, true);
    assert!(
        !out.status.success()
            && out
                .stderr
                .contains("certificate authentication failed for user \"certuser\""),
        "{out}"
    );
}

/// PostgreSQL 17's direct TLS (`sslnegotiation=direct`): the handshake comes first, with
/// ALPN `postgresql`, and the startup packet follows inside TLS. Spoken here with rustls,
/// as psql 15 cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_logs_in() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;

    if proxy_only("direct tls", "the proxy's TLS") {
        return;
    }
    let certs = Certs::make(SUPERUSER);
    let proxy = Proxy::start(common::cluster(), &certs.config("require", false));
    let connect = |alpn: Vec<Vec<u8>>| {
        let ca = certs.path("ca.pem");
        let port = proxy.port;
        async move {
            let mut roots = rustls::RootCertStore::empty();
            let pem = std::fs::read(ca).expect("CA file");
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots.add(cert.expect("PEM")).expect("CA cert");
            }
            #[allow(deprecated)]
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = alpn;
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            connector.connect(name, tcp).await.expect("TLS handshake")
        }
    };
    // Startup for the trusted user, then read up to ReadyForQuery (or an error).
    async fn startup_reply<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        tls: &mut S,
    ) -> Vec<u8> {
        let mut params = Vec::new();
        for (k, v) in [("user", common::TRUST_USER), ("database", common::DATABASE)] {
            params.extend_from_slice(k.as_bytes());
            params.push(0);
            params.extend_from_slice(v.as_bytes());
            params.push(0);
        }
        params.push(0);
        let mut packet = ((params.len() + 8) as i32).to_be_bytes().to_vec();
        packet.extend_from_slice(&196608i32.to_be_bytes());
        packet.extend_from_slice(&params);
        tls.write_all(&packet).await.expect("startup");
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while !reply.windows(6).any(|w| w == b"Z\0\0\0\x05I") && !reply.starts_with(b"E") {
            let n = tls.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        reply
    }
    let mut tls = connect(vec![b"postgresql".to_vec()]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    let reply = startup_reply(&mut tls).await;
    assert!(
        reply.windows(6).any(|w| w == b"Z\0\0\0\x05I"),
        "no ReadyForQuery over direct TLS: {:?}",
        String::from_utf8_lossy(&reply)
    );
    // Without ALPN, PostgreSQL 17 refuses a direct TLS connection.
    let mut tls = connect(Vec::new()).await;
    let reply = startup_reply(&mut tls).await;
    let text = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with(b"E") && text.contains("08P01") && text.contains("ALPN"),
        "{text}"
    );
}

/// A server with `ssl = on` that accepts only `hostssl` connections: reached with
/// `server_sslmode = verify-full` (the shards and the health checker), refused with
/// `disable`, and not trusted under a CA that did not sign its certificate.
#[test]
fn servers_that_demand_tls_are_reached_and_verified() {
    if proxy_only("server tls", "the proxy's server side") {
        return;
    }
    let certs = Certs::make(SUPERUSER);
    let pg = common::PgCluster::start();
    pg.require_ssl(
        &std::fs::read_to_string(certs.path("server.pem")).expect("cert"),
        &std::fs::read_to_string(certs.path("server.key")).expect("key"),
    );
    let server_tls = |mode: &str, ca: &str| {
        format!(
            "[health]\ncheck_interval_secs = 0.2\n[tls]\nserver_sslmode = \"{mode}\"\nserver_ca_file = \"{}\"\n",
            certs.file(ca)
        )
    };
    let proxy = Proxy::start(&pg, &server_tls("verify-full", "ca.pem"));
    let out = common::psql(
        &proxy,
        SUPERUSER,
        Some(SUPERUSER_PASSWORD),
        &[
            "-Atc",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ],
        None,
    );
    assert!(out.status.success() && out.stdout.trim() == "t", "{out}");
    // The health checker logs in over TLS too.
    let admin = proxy.admin_port.expect("admin port");
    let healthy = common::wait_until(Duration::from_secs(20), || {
        let nodes = common::http::get(admin, "/nodes").json();
        nodes[0]["healthy"] == true && nodes[0]["last_check"].is_string()
    });
    assert!(healthy, "{}", common::http::get(admin, "/nodes").json());

    // Plain connections are refused by the server's hostssl-only rules.
    let plain = Proxy::start(&pg, "[health]\nenabled = false\n");
    let out = common::psql(
        &plain,
        SUPERUSER,
        Some(SUPERUSER_PASSWORD),
        &["-Atc", "SELECT 1"],
        None,
    );
    assert!(
        !out.status.success() && out.stderr.contains("no encryption"),
        "{out}"
    );

    // A CA that did not sign the server's certificate: no connection.
    let wrong = Proxy::start(&pg, &server_tls("verify-full", "other-ca.pem"));
    let out = common::psql(
        &wrong,
        SUPERUSER,
        Some(SUPERUSER_PASSWORD),
        &["-Atc", "SELECT 1"],
        None,
    );
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("TLS with server"), "{out}");

    // require encrypts without checking who the server is.
    let require = Proxy::start(&pg, &server_tls("require", "other-ca.pem"));
    let out = common::psql(
        &require,
        SUPERUSER,
        Some(SUPERUSER_PASSWORD),
        &[
            "-Atc",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ],
        None,
    );
    assert!(out.status.success() && out.stdout.trim() == "t", "{out}");
}

#[test]
fn node_postgres_verifies_the_proxy() {
    if proxy_only("tls node-postgres", "the proxy's TLS") {
        return;
    }
    let modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/node/node_modules");
    assert!(
        modules.join("pg").exists(),
        "node-postgres is missing ({}): run scripts/test.sh",
        modules.display()
    );
    let certs = Certs::make(SUPERUSER);
    // verify-ca: the proxy demands the client certificate node-postgres presents.
    let proxy = Proxy::start(common::cluster(), &certs.config("verify-ca", true));
    let script = format!(
        "const fs = require('fs'); const {{ Client }} = require('pg');\n\
         const c = new Client({{ host: '127.0.0.1', port: {port}, user: '{SUPERUSER}', \
         password: '{SUPERUSER_PASSWORD}', database: '{db}', \
         ssl: {{ ca: fs.readFileSync('{ca}'), cert: fs.readFileSync('{cert}'), \
         key: fs.readFileSync('{key}'), rejectUnauthorized: true }} }});\n\
         c.connect().then(() => c.query('SELECT $1::int * 2 AS v', [21]))\
         .then(r => {{ console.log(r.rows[0].v); return c.end(); }})\
         .catch(e => {{ console.error(e); process.exit(1); }});\n",
        port = proxy.port,
        db = common::DATABASE,
        ca = certs.file("ca.pem"),
        cert = certs.file("client.pem"),
        key = certs.file("client.key"),
    );
    let mut cmd = Command::new("node");
    cmd.env("NODE_PATH", &modules).args(["-e", &script]);
    let out = run_tool(cmd, None, Duration::from_secs(60));
    assert!(out.status.success() && out.stdout.trim() == "42", "{out}");
}
