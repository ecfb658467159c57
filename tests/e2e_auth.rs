//! Logging in through the proxy: SCRAM, md5 and trust users, the errors for a wrong password,
//! an unknown user and an unknown database, SSL/GSS negotiation, startup parameters, hashed
//! secrets in the configuration, and the cancel key the client is given.

mod common;

use std::time::Duration;

use common::{
    raw::{RawConn, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE},
    sqlstate, target, DATABASE, MD5_PASSWORD, MD5_USER, SUPERUSER, SUPERUSER_PASSWORD, TRUST_USER,
};

/// Runs blocking raw-protocol code off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn current_user(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("current_user")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_user_logs_in() {
    let target = target("");
    let client = target.client().await;
    assert_eq!(current_user(&client).await, SUPERUSER);
    let port = target.port;
    let code =
        blocking(move || RawConn::connect(port).first_auth_request(SUPERUSER, DATABASE)).await;
    assert_eq!(code, 10, "expected AuthenticationSASL for {SUPERUSER}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_28p01() {
    let target = target("");
    let err = target
        .connect(SUPERUSER, Some("not-the-password"), DATABASE)
        .await
        .expect_err("wrong SCRAM password accepted");
    assert_eq!(sqlstate(&err), "28P01", "{err:?}");
    let err = target
        .connect(MD5_USER, Some("not-the-password"), DATABASE)
        .await
        .expect_err("wrong md5 password accepted");
    assert_eq!(sqlstate(&err), "28P01", "{err:?}");
    // Failed logins leave nothing behind that stops a good one.
    let client = target.client().await;
    assert_eq!(current_user(&client).await, SUPERUSER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_user_is_refused_like_a_wrong_password() {
    let target = target("");
    let err = target
        .connect("nosuchuser", Some("whatever"), DATABASE)
        .await
        .expect_err("unknown user accepted");
    // PostgreSQL hides whether a role exists behind a failed SCRAM exchange, and so does
    // the proxy: same SQLSTATE, same words as a wrong password.
    assert_eq!(sqlstate(&err), "28P01", "{err:?}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert_eq!(
        message, "password authentication failed for user \"nosuchuser\"",
        "{err:?}"
    );
    // The password is asked for (SASL) before anything is refused, with the same salt
    // on every attempt, as for a real user.
    let port = target.port;
    let salts = tokio::task::spawn_blocking(move || {
        (0..2)
            .map(|_| {
                let mut conn = common::RawConn::connect(port);
                assert_eq!(conn.first_auth_request("nosuchuser", DATABASE), 10, "SASL");
                conn.scram_salt("nosuchuser")
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("raw SCRAM");
    assert_eq!(salts[0], salts[1], "a stable salt for an unknown user");
}

/// Failed logins are counted by reason, and an address that keeps failing is answered
/// more and more slowly (bounded), without locking a right password out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_are_counted_by_reason_and_damped() {
    if common::proxy_only("auth damping", "the proxy's counters") {
        return;
    }
    let target = target("");
    for _ in 0..6 {
        let err = target
            .connect(SUPERUSER, Some("wrong"), DATABASE)
            .await
            .expect_err("wrong password accepted");
        assert_eq!(sqlstate(&err), "28P01");
    }
    let _ = target.connect("nosuchuser", Some("wrong"), DATABASE).await;
    let metrics = common::http::get(target.admin_port.expect("admin"), "/metrics").json();
    let by_reason = &metrics["auth_failures_by_reason"];
    assert!(by_reason["wrong_password"].as_u64() >= Some(6), "{metrics}");
    assert!(by_reason["unknown_user"].as_u64() >= Some(1), "{metrics}");
    assert!(metrics["auth_delayed"].as_u64() >= Some(1), "{metrics}");
    let client = target.client().await;
    assert_eq!(current_user(&client).await, SUPERUSER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_is_3d000() {
    let target = target("");
    let err = target
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), "nosuchdb")
        .await
        .expect_err("unknown database accepted");
    assert_eq!(sqlstate(&err), "3D000", "{err:?}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("nosuchdb"), "message: {message}");
    // The same user on a real database still works.
    let client = target.client().await;
    assert_eq!(current_user(&client).await, SUPERUSER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_user_logs_in() {
    let cluster = common::cluster();
    let stored = cluster.psql_admin(
        "postgres",
        &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{MD5_USER}'"),
    );
    assert!(
        stored.trim().starts_with("md5"),
        "md5user's password is not md5: {stored}"
    );

    let target = target("");
    let client = target
        .connect(MD5_USER, Some(MD5_PASSWORD), DATABASE)
        .await
        .expect("md5 login");
    assert_eq!(current_user(&client).await, MD5_USER);
    let port = target.port;
    let code =
        blocking(move || RawConn::connect(port).first_auth_request(MD5_USER, DATABASE)).await;
    assert_eq!(code, 5, "expected AuthenticationMD5Password for {MD5_USER}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_user_logs_in_without_password() {
    let target = target("");
    let client = target.trust_client().await;
    // Through the proxy the trust user is served as its server_user.
    let expected = if target.is_direct() {
        TRUST_USER
    } else {
        SUPERUSER
    };
    assert_eq!(current_user(&client).await, expected);
    let port = target.port;
    let startup =
        blocking(move || RawConn::connect(port).startup_trust(TRUST_USER, DATABASE)).await;
    assert!(startup.error.is_none(), "{:?}", startup.error);
    assert_eq!(startup.auth_codes, vec![0]);
    assert_eq!(startup.ready_status, Some(b'I'));
    for name in [
        "server_version",
        "client_encoding",
        "standard_conforming_strings",
    ] {
        assert!(
            startup.params.contains_key(name),
            "no ParameterStatus {name}: {:?}",
            startup.params
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_request_is_answered_n() {
    let target = target("");
    let port = target.port;
    blocking(move || {
        let mut conn = RawConn::connect(port);
        assert_eq!(conn.negotiate(SSL_REQUEST_CODE), b'N');
        // The client then carries on in plain text on the same socket.
        let startup = conn.startup_trust(TRUST_USER, DATABASE);
        assert!(startup.error.is_none(), "{:?}", startup.error);
        let r = conn.simple_query("SELECT 'plain'");
        assert_eq!(r.rows, vec![vec![Some("plain".to_string())]]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_request_is_answered_n() {
    if common::proxy_only(
        "gssenc_request_is_answered_n",
        "a PostgreSQL built with GSSAPI answers 'G'",
    ) {
        return;
    }
    let target = target("");
    let port = target.port;
    blocking(move || {
        let mut conn = RawConn::connect(port);
        assert_eq!(conn.negotiate(GSSENC_REQUEST_CODE), b'N');
        assert_eq!(conn.negotiate(SSL_REQUEST_CODE), b'N');
        let startup = conn.startup_trust(TRUST_USER, DATABASE);
        assert!(startup.error.is_none(), "{:?}", startup.error);
        let r = conn.simple_query("SELECT 1");
        assert_eq!(r.rows, vec![vec![Some("1".to_string())]]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_key_data_names_the_backend_in_session_mode() {
    // Session pooling (the default) gives the client its backend's real pid, as
    // PostgreSQL does; the cancel routing lives in the secret. (Pooled modes: see
    // e2e_wire_compat.)
    let target = target("");
    let port = target.port;
    blocking(move || {
        let mut conn = RawConn::connect(port);
        let startup = conn.startup_trust(TRUST_USER, DATABASE);
        assert!(startup.error.is_none(), "{:?}", startup.error);
        let (key_pid, _secret) = startup.backend_key.expect("BackendKeyData during startup");
        let r = conn.simple_query("SELECT pg_backend_pid()");
        let backend_pid: i32 = r.rows[0][0]
            .as_deref()
            .and_then(|v| v.parse().ok())
            .expect("pg_backend_pid value");
        assert_eq!(key_pid, backend_pid);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_reach_the_backend() {
    let target = target("");
    let port = target.port;
    blocking(move || {
        let mut conn = RawConn::connect(port);
        let startup = conn.startup_trust_with(
            TRUST_USER,
            DATABASE,
            &[
                ("application_name", "raw-app"),
                ("DateStyle", "German, DMY"),
                ("options", "-c search_path=pg_catalog -c work_mem=5MB"),
            ],
        );
        assert!(startup.error.is_none(), "{:?}", startup.error);
        assert_eq!(
            startup.params.get("application_name").map(String::as_str),
            Some("raw-app")
        );
        assert_eq!(
            startup.params.get("DateStyle").map(String::as_str),
            Some("German, DMY")
        );
        let r = conn.simple_query(
            "SELECT current_setting('application_name'), '2024-03-01'::date::text, \
             current_setting('search_path'), current_setting('work_mem')",
        );
        assert!(r.error.is_none(), "{:?}", r.error.map(|e| e.fields()));
        let expected = ["raw-app", "01.03.2024", "pg_catalog", "5MB"].map(|v| Some(v.to_string()));
        assert_eq!(r.rows, vec![expected.to_vec()]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashed_secrets_in_config_check_clients() {
    if common::proxy_only(
        "hashed_secrets_in_config_check_clients",
        "configures the proxy's [[users]]",
    ) {
        return;
    }
    let cluster = common::cluster();
    let verifier = cluster
        .psql_admin(
            "postgres",
            &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{SUPERUSER}'"),
        )
        .trim()
        .to_string();
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let md5_hash = cluster
        .psql_admin(
            "postgres",
            &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{MD5_USER}'"),
        )
        .trim()
        .to_string();
    let overrides = format!(
        r#"
[[users]]
name = "{SUPERUSER}"
password = "{verifier}"
server_password = "{SUPERUSER_PASSWORD}"

[[users]]
name = "{MD5_USER}"
password = "{md5_hash}"
auth_method = "md5"
server_password = "{MD5_PASSWORD}"
"#
    );
    let proxy = common::Proxy::start(cluster, &overrides);
    let client = proxy.client().await;
    assert_eq!(current_user(&client).await, SUPERUSER);
    let client = proxy
        .connect(MD5_USER, Some(MD5_PASSWORD), DATABASE)
        .await
        .expect("md5 login against a stored md5 hash");
    assert_eq!(current_user(&client).await, MD5_USER);
    for (user, method) in [(SUPERUSER, "SCRAM verifier"), (MD5_USER, "md5 hash")] {
        let err = proxy
            .connect(user, Some("wrong"), DATABASE)
            .await
            .expect_err("wrong password accepted");
        assert_eq!(sqlstate(&err), "28P01", "{method}: {err:?}");
    }
}

/// `[auth] auth_hba_file`: the first matching line decides the method, `reject` and "no
/// line" refuse with PostgreSQL's words, and the file is read again on reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hba_rules_decide_and_refuse_as_postgresql_and_reload() {
    if common::proxy_only("auth_hba_file", "the proxy's rules") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("helios-hba-")
        .tempdir()
        .expect("temp dir");
    let path = dir.path().join("pg_hba.conf");
    let write = |text: &str| std::fs::write(&path, text).expect("write hba");
    write(&format!(
        "# the proxy's rules\n\
         host all {MD5_USER} 127.0.0.1/32 reject\n\
         host \"{DATABASE}\" {TRUST_USER} 10.0.0.0/8 trust\n\
         host all {SUPERUSER},other 127.0.0.1 255.255.255.255 scram-sha-256\n"
    ));
    let target = target(&format!("[auth]\nauth_hba_file = \"{}\"\n", path.display()));
    // scram-sha-256 by the third line.
    let client = target.client().await;
    assert_eq!(current_user(&client).await, SUPERUSER);
    // reject.
    let err = target
        .connect(MD5_USER, Some(MD5_PASSWORD), DATABASE)
        .await
        .expect_err("rejected by the rules");
    assert_eq!(sqlstate(&err), "28000", "{err:?}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert_eq!(
        message,
        format!("pg_hba.conf rejects connection for host \"127.0.0.1\", user \"{MD5_USER}\", database \"{DATABASE}\", no encryption")
    );
    // No line for this address.
    let err = target
        .connect(TRUST_USER, None, DATABASE)
        .await
        .expect_err("no matching line");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert_eq!(
        message,
        format!("no pg_hba.conf entry for host \"127.0.0.1\", user \"{TRUST_USER}\", database \"{DATABASE}\", no encryption")
    );
    // A new file on reload: md5 for that user now.
    write(&format!(
        "host all {MD5_USER} 127.0.0.1/32 md5\nhost all all 127.0.0.1/32 scram-sha-256\n"
    ));
    let reload = common::http::post(target.admin_port.expect("admin"), "/config/reload");
    assert_eq!(reload.status, 200, "{}", reload.json());
    let reloaded = common::wait_until_async(Duration::from_secs(20), || async {
        target
            .connect(MD5_USER, Some(MD5_PASSWORD), DATABASE)
            .await
            .is_ok()
    })
    .await;
    assert!(reloaded, "the reloaded rules were not applied");
    // A file that does not parse is refused on reload, naming the key and the line.
    write("host all all 127.0.0.1/32 peer\n");
    let reload = common::http::post(target.admin_port.expect("admin"), "/config/reload");
    let body = reload.json().to_string();
    assert!(
        reload.status >= 400 && body.contains("auth.auth_hba_file") && body.contains("line 1"),
        "{} {body}",
        reload.status
    );
    let client = target.client().await;
    assert_eq!(current_user(&client).await, SUPERUSER, "the old rules stay");
}
