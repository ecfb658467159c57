//! Queries through the proxy: simple and extended protocol, many types, multi-statement
//! strings, errors and recovery, unicode, NULLs, bytea, large results, COPY, psql, many
//! concurrent sessions and cancellation.

mod common;

use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{guarded, raw::RawConn, sqlstate, target, HANG_GUARD};
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::SimpleQueryMessage;

/// Rows and CommandComplete counts of a simple-query response, in order.
fn split_simple(messages: &[SimpleQueryMessage]) -> (Vec<Vec<Option<String>>>, Vec<u64>) {
    let mut rows = Vec::new();
    let mut counts = Vec::new();
    for m in messages {
        match m {
            SimpleQueryMessage::Row(row) => rows.push(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            SimpleQueryMessage::CommandComplete(n) => counts.push(*n),
            _ => {}
        }
    }
    (rows, counts)
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_query_returns_rows_and_counts() {
    let target = target("");
    let client = target.client().await;
    let messages = client
        .simple_query("SELECT 1 AS one, 'two' AS two, 3.5::float8 AS three")
        .await
        .expect("simple query");
    let (rows, counts) = split_simple(&messages);
    assert_eq!(rows, vec![vec![s("1"), s("two"), s("3.5")]]);
    assert_eq!(counts, vec![1]);

    let messages = client
        .simple_query("SELECT g FROM generate_series(1, 5) g")
        .await
        .expect("generate_series");
    let (rows, counts) = split_simple(&messages);
    let values: Vec<Option<String>> = rows.into_iter().map(|mut r| r.remove(0)).collect();
    assert_eq!(values, ["1", "2", "3", "4", "5"].map(s).to_vec());
    assert_eq!(counts, vec![5]);

    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("current_user")
        .get(0);
    assert_eq!(user, common::SUPERUSER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_query_round_trips_many_types() {
    let target = target("");
    let client = target.client().await;
    let stmt = client
        .prepare(
            "SELECT $1::bool, $2::int2, $3::int4, $4::int8, $5::float4, $6::float8, $7::text, \
             $8::bytea, $9::\"char\", $10::oid, $11::int4[], $12::text[], $13::inet, \
             $14::timestamptz, $15::varchar, $16::int4, $17::text::numeric::text",
        )
        .await
        .expect("prepare typed statement");
    let when = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    let ip: IpAddr = "192.0.2.17".parse().expect("ip literal");
    let ints = vec![1i32, -2, i32::MAX];
    let texts = vec![
        "a".to_string(),
        "b,c".to_string(),
        "\"quoted\" {x}".to_string(),
    ];
    let none: Option<i32> = None;
    let row = client
        .query_one(
            &stmt,
            &[
                &true,
                &i16::MIN,
                &i32::MAX,
                &i64::MIN,
                &1.5f32,
                &std::f64::consts::PI,
                &"héllo",
                &vec![0u8, 1, 255],
                &(b'x' as i8),
                &4_000_000_000u32,
                &ints,
                &texts,
                &ip,
                &when,
                &"varchar value",
                &none,
                &"123.456789",
            ],
        )
        .await
        .expect("execute typed statement");
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i16>(1), i16::MIN);
    assert_eq!(row.get::<_, i32>(2), i32::MAX);
    assert_eq!(row.get::<_, i64>(3), i64::MIN);
    assert_eq!(row.get::<_, f32>(4), 1.5);
    assert_eq!(row.get::<_, f64>(5), std::f64::consts::PI);
    assert_eq!(row.get::<_, &str>(6), "héllo");
    assert_eq!(row.get::<_, Vec<u8>>(7), vec![0u8, 1, 255]);
    assert_eq!(row.get::<_, i8>(8), b'x' as i8);
    assert_eq!(row.get::<_, u32>(9), 4_000_000_000);
    assert_eq!(row.get::<_, Vec<i32>>(10), ints);
    assert_eq!(row.get::<_, Vec<String>>(11), texts);
    assert_eq!(row.get::<_, IpAddr>(12), ip);
    assert_eq!(row.get::<_, SystemTime>(13), when);
    assert_eq!(row.get::<_, &str>(14), "varchar value");
    assert_eq!(row.get::<_, Option<i32>>(15), None);
    assert_eq!(row.get::<_, &str>(16), "123.456789");

    // One prepared statement executed many times.
    let add = client
        .prepare("SELECT $1::int8 + $2::int8")
        .await
        .expect("prepare add");
    for i in 0..200i64 {
        let sum: i64 = client
            .query_one(&add, &[&i, &(i * 3)])
            .await
            .expect("execute add")
            .get(0);
        assert_eq!(sum, 4 * i);
    }

    // Pipelined: many queries in flight on one connection, answered in order.
    let futures = (0..50i32).map(|i| {
        let client = &client;
        async move {
            let v: i32 = client
                .query_one("SELECT $1::int4 * 10", &[&i])
                .await
                .expect("pipelined query")
                .get(0);
            (i, v)
        }
    });
    for (i, v) in futures_util::future::join_all(futures).await {
        assert_eq!(v, i * 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portals_fetch_in_batches() {
    let target = target("");
    let mut client = target.client().await;
    let tx = client.transaction().await.expect("begin");
    let stmt = tx
        .prepare("SELECT g FROM generate_series(1, $1::int4) g")
        .await
        .expect("prepare");
    let portal = tx.bind(&stmt, &[&1000i32]).await.expect("bind portal");
    let mut seen = Vec::new();
    let mut batches = 0;
    loop {
        let rows = tx.query_portal(&portal, 128).await.expect("execute portal");
        if rows.is_empty() {
            break;
        }
        batches += 1;
        assert!(rows.len() <= 128, "a batch exceeded max_rows");
        seen.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
        assert!(batches <= 20, "portal never ran dry");
    }
    assert_eq!(seen, (1..=1000).collect::<Vec<i32>>());
    assert_eq!(batches, 8);
    tx.commit().await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_statement_simple_query() {
    let target = target("");
    let client = target.client().await;
    let messages = client
        .simple_query(
            "CREATE TEMP TABLE ms (i int); INSERT INTO ms VALUES (1), (2), (3); \
             SELECT sum(i) FROM ms; SELECT 'x' AS a, NULL AS b; UPDATE ms SET i = i * 2; \
             SELECT sum(i) FROM ms; DROP TABLE ms",
        )
        .await
        .expect("multi-statement query");
    let (rows, counts) = split_simple(&messages);
    assert_eq!(rows, vec![vec![s("6")], vec![s("x"), None], vec![s("12")]]);
    assert_eq!(counts, vec![0, 3, 1, 1, 3, 1, 0]);

    // An error part-way stops the string; the connection stays usable.
    let err = client
        .simple_query("SELECT 1; SELECT 1/0; SELECT 3")
        .await
        .expect_err("division by zero");
    assert_eq!(sqlstate(&err), "22012");
    let (rows, _) = split_simple(&client.simple_query("SELECT 4").await.expect("after error"));
    assert_eq!(rows, vec![vec![s("4")]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_leave_the_connection_usable() {
    let target = target("");
    let client = target.client().await;

    let err = client
        .simple_query("SELEC 1")
        .await
        .expect_err("syntax error");
    assert_eq!(sqlstate(&err), "42601");
    let err = client
        .query_one("SELECT 1/0", &[])
        .await
        .expect_err("division by zero");
    assert_eq!(sqlstate(&err), "22012");
    let err = client
        .prepare("SELECT * FROM no_such_table")
        .await
        .expect_err("undefined table at Parse");
    assert_eq!(sqlstate(&err), "42P01");
    for i in 0..5i32 {
        let v: i32 = client
            .query_one("SELECT $1::int4", &[&i])
            .await
            .expect("query after errors")
            .get(0);
        assert_eq!(v, i);
    }

    // Inside a transaction: the error aborts it until ROLLBACK.
    client.batch_execute("BEGIN").await.expect("begin");
    let err = client
        .query("SELECT 1/0", &[])
        .await
        .expect_err("error in tx");
    assert_eq!(sqlstate(&err), "22012");
    let err = client
        .query("SELECT 1", &[])
        .await
        .expect_err("aborted transaction");
    assert_eq!(sqlstate(&err), "25P02");
    client.batch_execute("ROLLBACK").await.expect("rollback");
    let v: i32 = client
        .query_one("SELECT 7", &[])
        .await
        .expect("after rollback")
        .get(0);
    assert_eq!(v, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_status_bytes_follow_errors_and_rollback() {
    let target = target("");
    let port = target.port;
    tokio::task::spawn_blocking(move || {
        let mut conn = RawConn::connect(port);
        let startup = conn.startup_trust(common::TRUST_USER, common::DATABASE);
        assert!(startup.error.is_none(), "login failed: {:?}", startup.error);
        assert_eq!(startup.ready_status, Some(b'I'));

        let r = conn.simple_query("BEGIN");
        assert!(r.error.is_none());
        assert_eq!(r.status, b'T');
        let r = conn.simple_query("SELECT 1/0");
        assert_eq!(r.error.as_ref().map(|e| e.sqlstate()), Some("22012".into()));
        assert_eq!(r.status, b'E');
        let r = conn.simple_query("SELECT 1");
        assert_eq!(r.error.as_ref().map(|e| e.sqlstate()), Some("25P02".into()));
        assert_eq!(r.status, b'E');
        let r = conn.simple_query("ROLLBACK");
        assert!(r.error.is_none());
        assert_eq!(r.tags, vec!["ROLLBACK".to_string()]);
        assert_eq!(r.status, b'I');
        let r = conn.simple_query("SELECT 1");
        assert_eq!(r.rows, vec![vec![s("1")]]);
        assert_eq!(r.status, b'I');
    })
    .await
    .expect("raw client task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_and_nulls_round_trip() {
    let target = target("");
    let client = target.client().await;
    let samples = [
        "héllo wörld",
        "日本語のテキスト",
        "emoji 🚀🎉 family 👩‍👩‍👧",
        "עברית ومرحبا",
        "combining a\u{0301} e\u{0308}",
        "tab\tnewline\nquote' dq\" backslash\\",
        "",
    ];
    for sample in samples {
        let row = client
            .query_one(
                "SELECT $1::text, char_length($1::text), octet_length($1::text)",
                &[&sample],
            )
            .await
            .expect("unicode param");
        assert_eq!(row.get::<_, &str>(0), sample);
        assert_eq!(row.get::<_, i32>(1), sample.chars().count() as i32);
        assert_eq!(row.get::<_, i32>(2), sample.len() as i32);

        let literal = format!("SELECT '{}'", sample.replace('\'', "''"));
        let (rows, _) = split_simple(&client.simple_query(&literal).await.expect("literal"));
        assert_eq!(rows, vec![vec![s(sample)]]);
    }

    let none_i: Option<i32> = None;
    let none_t: Option<&str> = None;
    let row = client
        .query_one(
            "SELECT NULL::int4, NULL::text, NULL::bytea, $1::int4, $2::text, ARRAY[1, NULL, 3]::int4[]",
            &[&none_i, &none_t],
        )
        .await
        .expect("nulls");
    assert_eq!(row.get::<_, Option<i32>>(0), None);
    assert_eq!(row.get::<_, Option<String>>(1), None);
    assert_eq!(row.get::<_, Option<Vec<u8>>>(2), None);
    assert_eq!(row.get::<_, Option<i32>>(3), None);
    assert_eq!(row.get::<_, Option<String>>(4), None);
    assert_eq!(
        row.get::<_, Vec<Option<i32>>>(5),
        vec![Some(1), None, Some(3)]
    );
    let (rows, _) = split_simple(
        &client
            .simple_query("SELECT NULL, '', 'NULL'")
            .await
            .expect("simple nulls"),
    );
    assert_eq!(rows, vec![vec![None, s(""), s("NULL")]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytea_values_up_to_megabytes() {
    let target = target("");
    let client = target.client().await;
    let payload = common::pseudo_random_bytes(4 << 20, 42);
    let row = client
        .query_one("SELECT $1::bytea, length($1::bytea)", &[&payload])
        .await
        .expect("4 MiB bytea round trip");
    assert_eq!(row.get::<_, i32>(1), payload.len() as i32);
    assert!(
        row.get::<_, &[u8]>(0) == payload.as_slice(),
        "bytea came back altered"
    );

    // Generated by the server, checked byte for byte here.
    let row = client
        .query_one("SELECT decode(repeat('00ff7f', 1000000), 'hex')", &[])
        .await
        .expect("server-generated bytea");
    let bytes: &[u8] = row.get(0);
    assert_eq!(bytes.len(), 3_000_000);
    assert!(bytes.chunks(3).all(|c| c == [0x00, 0xff, 0x7f]));

    // Stored and read back, also as text (hex output) through the simple protocol.
    client
        .batch_execute("CREATE TEMP TABLE blobs (id int, data bytea)")
        .await
        .expect("temp table");
    client
        .execute("INSERT INTO blobs VALUES (1, $1)", &[&payload])
        .await
        .expect("insert bytea");
    let same: bool = client
        .query_one("SELECT data = $1 FROM blobs WHERE id = 1", &[&payload])
        .await
        .expect("compare stored")
        .get(0);
    assert!(same);
    let (rows, _) = split_simple(
        &client
            .simple_query("SELECT data FROM blobs WHERE id = 1")
            .await
            .expect("hex output"),
    );
    let hex = rows[0][0].clone().expect("non-null bytea");
    assert_eq!(hex.len(), 2 + 2 * payload.len());
    let expected: String = payload
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(&hex[2..34], expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_result_matches_server_checksum() {
    let target = target("");
    let client = target.client().await;
    const N: i32 = 100_000;
    let rows = guarded(
        HANG_GUARD,
        "100k-row query",
        client.query(
            "SELECT g, md5(g::text) FROM generate_series(1, $1::int4) g ORDER BY g",
            &[&N],
        ),
    )
    .await
    .expect("100k rows");
    assert_eq!(rows.len(), N as usize);
    let mut sum = 0i64;
    let mut joined = String::with_capacity(rows.len() * 33);
    for (i, row) in rows.iter().enumerate() {
        let g: i32 = row.get(0);
        assert_eq!(g, i as i32 + 1, "rows out of order or missing");
        sum += i64::from(g);
        if i > 0 {
            joined.push('\n');
        }
        joined.push_str(row.get::<_, &str>(1));
    }
    assert_eq!(sum, i64::from(N) * i64::from(N + 1) / 2);
    let server: String = client
        .query_one(
            "SELECT md5(string_agg(md5(g::text), E'\\n' ORDER BY g)) FROM generate_series(1, $1::int4) g",
            &[&N],
        )
        .await
        .expect("server checksum")
        .get(0);
    // The server hashes the bytes this client received: any corruption changes the digest.
    let received: String = client
        .query_one("SELECT md5($1::text)", &[&joined])
        .await
        .expect("checksum of received rows")
        .get(0);
    assert_eq!(received, server);

    // The same rows in text format through the simple protocol.
    let messages = client
        .simple_query("SELECT g, md5(g::text) FROM generate_series(1, 100000) g ORDER BY g")
        .await
        .expect("100k rows, simple");
    let (rows, counts) = split_simple(&messages);
    assert_eq!(counts, vec![N as u64]);
    assert_eq!(rows.len(), N as usize);
    assert_eq!(rows[N as usize - 1][0].as_deref(), Some("100000"));
    let simple_joined = rows
        .iter()
        .map(|r| r[1].as_deref().unwrap_or("NULL"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(simple_joined == joined, "simple-protocol rows differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_copy_out() {
    let target = target("");
    let client = target.client().await;
    client
        .batch_execute("CREATE TEMP TABLE copy_t (id int, name text, data bytea, note text)")
        .await
        .expect("temp table");
    let mut csv = String::new();
    for i in 1..=20_000 {
        let note = if i % 7 == 0 {
            String::new()
        } else {
            format!("ü{i}")
        };
        csv.push_str(&format!(
            "{i},\"name {i}, with comma\",\\x{:04x},{note}\n",
            i % 65536
        ));
    }
    let sink = client
        .copy_in("COPY copy_t FROM STDIN (FORMAT csv)")
        .await
        .expect("start COPY FROM STDIN");
    let mut sink = std::pin::pin!(sink);
    for chunk in csv.as_bytes().chunks(50_000) {
        sink.send(VecDeque::from(chunk.to_vec()))
            .await
            .expect("send CopyData");
    }
    let copied = sink.finish().await.expect("finish COPY");
    assert_eq!(copied, 20_000);
    let row = client
        .query_one(
            "SELECT count(*), sum(id), count(*) FILTER (WHERE note IS NULL), \
             sum(length(data)) FROM copy_t",
            &[],
        )
        .await
        .expect("check copied rows");
    assert_eq!(row.get::<_, i64>(0), 20_000);
    assert_eq!(row.get::<_, i64>(1), 20_000 * 20_001 / 2);
    assert_eq!(row.get::<_, i64>(2), 20_000 / 7);
    assert_eq!(row.get::<_, i64>(3), 2 * 20_000);

    let stream = client
        .copy_out("COPY (SELECT * FROM copy_t ORDER BY id) TO STDOUT (FORMAT csv)")
        .await
        .expect("start COPY TO STDOUT");
    let mut stream = std::pin::pin!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("CopyData"));
    }
    assert!(
        out == csv.as_bytes(),
        "COPY TO output differs from what COPY FROM loaded"
    );

    let stream = client
        .copy_out("COPY (SELECT g FROM generate_series(1, 1000) g) TO STDOUT (FORMAT binary)")
        .await
        .expect("binary COPY");
    let mut stream = std::pin::pin!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("binary CopyData"));
    }
    assert!(out.starts_with(b"PGCOPY\n\xff\r\n\0"));
    // header 19 bytes, 1000 tuples of 2 + 4 + 4 bytes, trailer 2 bytes
    assert_eq!(out.len(), 19 + 1000 * 10 + 2);

    // Bad data fails the COPY; the connection carries on.
    let sink = client
        .copy_in("COPY copy_t (id) FROM STDIN")
        .await
        .expect("start second COPY");
    let mut sink = std::pin::pin!(sink);
    let sent = sink
        .send(VecDeque::from(b"1\nnot-a-number\n".to_vec()))
        .await;
    let err = match sent {
        Ok(()) => sink.finish().await.expect_err("bad COPY data"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&err), "22P02");
    let n: i64 = client
        .query_one("SELECT count(*) FROM copy_t", &[])
        .await
        .expect("after failed COPY")
        .get(0);
    assert_eq!(n, 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_queries_and_copy() {
    let target = Arc::new(target(""));
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in.csv");
    let output = dir.path().join("out.csv");
    let mut csv = String::new();
    for i in 1..=5000 {
        csv.push_str(&format!("{i},\"text, {i}\",ünï{i}\n"));
    }
    std::fs::write(&input, &csv).expect("write csv");
    let script = format!(
        "CREATE TEMP TABLE p (id int, a text, b text);\n\
         \\copy p from '{}' csv\n\
         SELECT count(*), sum(id) FROM p;\n\
         \\copy (SELECT * FROM p ORDER BY id) to '{}' csv\n\
         SELECT 'ü' || 'ñ';\n",
        input.display(),
        output.display()
    );
    let t = target.clone();
    let out = tokio::task::spawn_blocking(move || {
        common::psql(
            &t,
            common::SUPERUSER,
            Some(common::SUPERUSER_PASSWORD),
            &["-At", "-f", "-"],
            Some(script.as_bytes()),
        )
    })
    .await
    .expect("psql task");
    assert!(out.status.success(), "psql script failed:\n{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines.contains(&"5000|12502500"),
        "unexpected psql output:\n{out}"
    );
    assert!(lines.contains(&"üñ"), "unexpected psql output:\n{out}");
    let copied = std::fs::read_to_string(&output).expect("read \\copy output");
    assert_eq!(copied, csv);

    // 100k rows through psql, checked against the server's own checksum.
    let t = target.clone();
    let out = tokio::task::spawn_blocking(move || {
        common::psql(
            &t,
            common::MD5_USER,
            Some(common::MD5_PASSWORD),
            &[
                "-At",
                "-c",
                "SELECT g, md5(g::text) FROM generate_series(1, 100000) g ORDER BY g",
                "-c",
                "SELECT md5(string_agg(g || '|' || md5(g::text), E'\\n' ORDER BY g)) \
                 FROM generate_series(1, 100000) g",
            ],
            None,
        )
    })
    .await
    .expect("psql task");
    assert!(out.status.success(), "psql 100k failed:\n{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 100_001);
    let digest = lines[100_000];
    let client = target.client().await;
    let received: String = client
        .query_one("SELECT md5($1::text)", &[&lines[..100_000].join("\n")])
        .await
        .expect("checksum of psql output")
        .get(0);
    assert_eq!(received, digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_clients_keep_their_own_state() {
    const CLIENTS: usize = 50;
    const ROUNDS: i32 = 20;
    // Logins are not what this test measures: a debug-build proxy doing dozens of SCRAM
    // exchanges at once on a loaded machine may need more than the default 10 s.
    let target = Arc::new(target(
        "[pool_mode]\nmax_pool_size = 120\n[timeouts]\nstartup_timeout_ms = 60000\n",
    ));
    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let target = target.clone();
        let barrier = barrier.clone();
        tasks.spawn(async move {
            // All three login methods at once, so sessions of different pools interleave.
            let (user, password) = match i % 3 {
                0 => (common::SUPERUSER, Some(common::SUPERUSER_PASSWORD)),
                1 => (common::MD5_USER, Some(common::MD5_PASSWORD)),
                _ => (common::TRUST_USER, None),
            };
            let mut cfg = target.pg_config(user, password, common::DATABASE);
            cfg.application_name(format!("client-{i}"))
                .options(format!("-c helios.startup_tag=start-{i}"));
            let (client, _driver) = common::Proxy::connect_with(&cfg)
                .await
                .unwrap_or_else(|e| panic!("client {i} login: {e:?}"));
            client
                .batch_execute(&format!(
                    "SET helios.tag = 'tag-{i}'; CREATE TEMP TABLE mine (v int); \
                     INSERT INTO mine VALUES ({i})"
                ))
                .await
                .expect("per-client setup");
            // Every session is open at once before any checks run.
            barrier.wait().await;
            let mut pid = None;
            for round in 0..ROUNDS {
                let row = client
                    .query_one(
                        "SELECT current_setting('helios.tag'), current_setting('application_name'), \
                         current_setting('helios.startup_tag'), (SELECT v FROM mine), \
                         pg_backend_pid(), $1::int4",
                        &[&round],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("client {i} round {round}: {e:?}"));
                assert_eq!(row.get::<_, &str>(0), format!("tag-{i}"));
                assert_eq!(row.get::<_, &str>(1), format!("client-{i}"));
                assert_eq!(row.get::<_, &str>(2), format!("start-{i}"));
                assert_eq!(row.get::<_, i32>(3), i as i32);
                assert_eq!(row.get::<_, i32>(5), round);
                let this_pid: i32 = row.get(4);
                assert_eq!(*pid.get_or_insert(this_pid), this_pid, "backend changed mid-session");
                tokio::task::yield_now().await;
            }
            barrier.wait().await;
            pid.expect("at least one round")
        });
    }
    let pids: Vec<i32> = guarded(HANG_GUARD, "50 concurrent clients", async {
        let mut pids = Vec::new();
        while let Some(result) = tasks.join_next().await {
            pids.push(result.expect("client task"));
        }
        pids
    })
    .await;
    let distinct: HashSet<i32> = pids.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        CLIENTS,
        "sessions shared a backend: {pids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_long_query() {
    let target = target("");
    let client = target.client().await;
    common::cancel_stops_a_long_query(client, common::cluster(), "helios-cancel-test", String::new)
        .await;
}
