//! The query result cache through the running proxy (two shards, transaction pooling):
//! repeated reads are answered without a server and byte for byte as PostgreSQL
//! answered them; every kind of write through the proxy, from any connection, makes the
//! next read see it; volatile functions, session-dependent names and hints are honoured;
//! the memory bound holds; and readers racing writers never see a value older than an
//! acknowledged write.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{proxy_only, Proxy};
use serde_json::Value;
use tokio_postgres::SimpleQueryMessage;

const DATABASE: &str = common::DATABASE;

fn start(extra: &str) -> Proxy {
    Proxy::start(
        common::cluster(),
        &format!(
            "workers = 2\n[pool_mode]\nmode = \"transaction\"\nmax_pool_size = 8\n\
             [cache]\nenabled = true\n{extra}"
        ),
    )
}

fn cache_stats(proxy: &Proxy) -> Value {
    common::http::get(proxy.admin_port.expect("admin port"), "/cache").json()
}

fn hits(proxy: &Proxy) -> u64 {
    cache_stats(proxy)["hits"].as_u64().expect("hits in /cache")
}

/// The rows of a simple query as text.
async fn rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

async fn one(client: &tokio_postgres::Client, sql: &str) -> String {
    rows(client, sql).await[0][0].clone().unwrap_or_default()
}

/// Runs `sql` on PostgreSQL directly (setup, and writes the proxy does not see).
async fn admin(sql: &str) {
    common::cluster()
        .admin(DATABASE)
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// Reads `sql` until a result comes from the cache (a shape is resolved on first sight
/// and filled on the next read), returning the cached answer.
async fn read_until_hit(proxy: &Proxy, client: &tokio_postgres::Client, sql: &str) -> String {
    let before = hits(proxy);
    for _ in 0..5 {
        let value = one(client, sql).await;
        if hits(proxy) > before {
            return value;
        }
    }
    panic!(
        "{sql} was never answered from the cache: {}",
        cache_stats(proxy)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_reads_are_answered_from_the_cache_byte_for_byte() {
    if proxy_only("cache hits", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP TABLE IF EXISTS cache_hits_t; \
         CREATE TABLE cache_hits_t (id int PRIMARY KEY, name text, price numeric, seen timestamptz); \
         INSERT INTO cache_hits_t SELECT g, 'item ' || g, g * 1.5, '2024-01-01'::timestamptz + g * interval '1 day' \
         FROM generate_series(1, 50) g;",
    )
    .await;
    let proxy = start("");
    let client = proxy.client().await;
    let sql = "SELECT id, name, price, seen FROM cache_hits_t WHERE id <= 20 ORDER BY id";
    let direct = common::cluster().admin(DATABASE).await;
    let expected = {
        let rows: Vec<Vec<Option<String>>> = direct
            .simple_query(sql)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect();
        rows
    };
    read_until_hit(&proxy, &client, sql).await;
    let before = cache_stats(&proxy);
    for _ in 0..10 {
        assert_eq!(rows(&client, sql).await, expected);
    }
    let after = cache_stats(&proxy);
    assert!(
        after["hits"].as_u64() >= Some(before["hits"].as_u64().unwrap() + 10),
        "{after}"
    );
    assert_eq!(after["misses"], before["misses"], "{after}");
    assert!(after["entries"].as_u64() >= Some(1), "{after}");
    assert!(after["bytes"].as_u64() > Some(0), "{after}");
    assert_eq!(after["l1"]["hits"], after["hits"], "{after}");
    // The command tag and an empty result come back exactly too.
    let empty = "SELECT id FROM cache_hits_t WHERE id < 0";
    read_until_hit(&proxy, &client, &format!("{empty} UNION ALL SELECT 1")).await;
    assert!(rows(&client, empty).await.is_empty());
    // Metrics and the console show the same counters.
    let prometheus = common::http::get(proxy.admin_port.unwrap(), "/metrics/prometheus").body;
    assert!(
        prometheus.contains("heliosdb_proxy_cache_hits_total{tier=\"l1\"}"),
        "{prometheus}"
    );
    proxy.stop();
}

/// A reader caches `SELECT v FROM t WHERE id = 1`, another connection writes with `write`,
/// and the reader must see `expect` at once.
async fn write_is_seen(
    proxy: &Proxy,
    reader: &tokio_postgres::Client,
    writer: &tokio_postgres::Client,
    read: &str,
    write: &str,
    expect: &str,
) {
    read_until_hit(proxy, reader, read).await;
    writer
        .batch_execute(write)
        .await
        .unwrap_or_else(|e| panic!("{write}: {e:?}"));
    assert_eq!(one(reader, read).await, expect, "after {write}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_write_through_the_proxy_invalidates() {
    if proxy_only("cache invalidation", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP TABLE IF EXISTS cache_w_child, cache_w_t, cache_w_src CASCADE; \
         DROP FUNCTION IF EXISTS cache_w_bump(); \
         CREATE TABLE cache_w_t (id int PRIMARY KEY, v int NOT NULL); \
         CREATE TABLE cache_w_child (id int REFERENCES cache_w_t ON DELETE CASCADE); \
         CREATE TABLE cache_w_src (id int, v int); \
         CREATE FUNCTION cache_w_bump() RETURNS void LANGUAGE sql AS \
           'UPDATE cache_w_t SET v = v + 1000'; \
         INSERT INTO cache_w_t VALUES (1, 1);",
    )
    .await;
    let proxy = start("");
    let reader = proxy.client().await;
    // Several writers: with two shards, some land on the reader's and some on the other.
    let mut writers = Vec::new();
    for _ in 0..4 {
        writers.push(proxy.client().await);
    }
    let read = "SELECT coalesce(sum(v), 0) FROM cache_w_t";
    let steps: &[(&str, &str)] = &[
        ("UPDATE cache_w_t SET v = 2 WHERE id = 1", "2"),
        ("INSERT INTO cache_w_t VALUES (2, 10)", "12"),
        ("DELETE FROM cache_w_t WHERE id = 2", "2"),
        (
            "MERGE INTO cache_w_t t USING (SELECT 1 AS id) s ON t.id = s.id \
             WHEN MATCHED THEN UPDATE SET v = 5",
            "5",
        ),
        ("BEGIN; UPDATE cache_w_t SET v = 6; COMMIT", "6"),
        ("SELECT cache_w_bump()", "1006"),
        ("TRUNCATE cache_w_t CASCADE", "0"),
        ("INSERT INTO cache_w_t SELECT 3, 7", "7"),
        ("ALTER TABLE cache_w_t ADD COLUMN extra int", "7"),
        ("INSERT INTO cache_w_src VALUES (4, 8); INSERT INTO cache_w_t SELECT * FROM cache_w_src", "15"),
    ];
    for (i, (write, expect)) in steps.iter().enumerate() {
        let writer = &writers[i % writers.len()];
        write_is_seen(&proxy, &reader, writer, read, write, expect).await;
    }
    // COPY FROM, in the extended protocol's own way.
    read_until_hit(&proxy, &reader, read).await;
    let sink = writers[1]
        .copy_in("COPY cache_w_t (id, v) FROM STDIN")
        .await
        .unwrap();
    use futures_util::SinkExt;
    let mut sink = Box::pin(sink);
    sink.send(bytes::Bytes::from_static(b"5\t100\n"))
        .await
        .unwrap();
    sink.as_mut().finish().await.unwrap();
    assert_eq!(one(&reader, read).await, "115");
    // A prepared (extended-protocol) write.
    read_until_hit(&proxy, &reader, read).await;
    writers[2]
        .execute("UPDATE cache_w_t SET v = v + $1 WHERE id = 5", &[&1i32])
        .await
        .unwrap();
    assert_eq!(one(&reader, read).await, "116");
    // A prepared write run again and again (Bind, Execute, Sync: the shape of a cached
    // read's request) runs every time.
    let bump = writers[3]
        .prepare("UPDATE cache_w_t SET v = v + 1 WHERE id = 5")
        .await
        .unwrap();
    for _ in 0..6 {
        assert_eq!(writers[3].execute(&bump, &[]).await.unwrap(), 1);
        read_until_hit(&proxy, &reader, read).await;
    }
    assert_eq!(one(&reader, read).await, "122");
    let stats = cache_stats(&proxy);
    assert!(stats["invalidations"].as_u64() > Some(0), "{stats}");
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_functions_are_never_cached() {
    if proxy_only("cache volatility", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP FUNCTION IF EXISTS cache_v_counter(), cache_v_double(int); \
         DROP SEQUENCE IF EXISTS cache_v_seq; \
         CREATE SEQUENCE cache_v_seq; \
         CREATE FUNCTION cache_v_counter() RETURNS bigint LANGUAGE sql VOLATILE AS \
           'SELECT nextval(''cache_v_seq'')'; \
         CREATE FUNCTION cache_v_double(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 * 2';",
    )
    .await;
    let proxy = start("");
    let client = proxy.client().await;
    for sql in [
        "SELECT random()",
        "SELECT now()",
        "SELECT CURRENT_TIMESTAMP",
        "SELECT clock_timestamp()",
        "SELECT cache_v_counter()",
        "SELECT public.cache_v_counter()",
    ] {
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(one(&client, sql).await);
            if sql.contains("counter") {
                continue;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seen.dedup();
        assert_eq!(seen.len(), 4, "{sql} gave a repeated answer: {seen:?}");
    }
    assert_eq!(hits(&proxy), 0, "{}", cache_stats(&proxy));
    assert!(
        cache_stats(&proxy)["uncacheable"].as_u64() > Some(0),
        "{}",
        cache_stats(&proxy)
    );
    // A user's immutable function is cached.
    assert_eq!(
        read_until_hit(&proxy, &client, "SELECT cache_v_double(21)").await,
        "42"
    );
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_and_role_keep_separate_entries() {
    if proxy_only("cache keys", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP SCHEMA IF EXISTS cache_s1 CASCADE; DROP SCHEMA IF EXISTS cache_s2 CASCADE; \
         CREATE SCHEMA cache_s1; CREATE SCHEMA cache_s2; \
         CREATE TABLE cache_s1.t (v text); CREATE TABLE cache_s2.t (v text); \
         INSERT INTO cache_s1.t VALUES ('one'); INSERT INTO cache_s2.t VALUES ('two'); \
         GRANT USAGE ON SCHEMA cache_s1, cache_s2 TO PUBLIC; \
         GRANT SELECT ON cache_s1.t, cache_s2.t TO PUBLIC;",
    )
    .await;
    let proxy = start("");
    let first = proxy.client().await;
    let second = proxy.client().await;
    first
        .batch_execute("SET search_path = cache_s1")
        .await
        .unwrap();
    second
        .batch_execute("SET search_path = cache_s2")
        .await
        .unwrap();
    assert_eq!(
        read_until_hit(&proxy, &first, "SELECT v FROM t").await,
        "one"
    );
    assert_eq!(
        read_until_hit(&proxy, &second, "SELECT v FROM t").await,
        "two"
    );
    assert_eq!(one(&first, "SELECT v FROM t").await, "one");
    // The role changes the key too (current_user is not cached at all).
    let role = "SELECT v || ':' || (SELECT count(*) FROM cache_s1.t) FROM cache_s2.t";
    read_until_hit(&proxy, &first, role).await;
    let trust = proxy.trust_client().await;
    let before = cache_stats(&proxy)["misses"].as_u64().unwrap();
    assert_eq!(one(&trust, role).await, "two:1");
    assert!(
        cache_stats(&proxy)["misses"].as_u64().unwrap() > before,
        "another user was served the first user's entry"
    );
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_and_ttl_hints_are_honoured() {
    if proxy_only("cache hints", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP TABLE IF EXISTS cache_h_t; CREATE TABLE cache_h_t (v int); \
         INSERT INTO cache_h_t VALUES (1);",
    )
    .await;
    let proxy = start("");
    let client = proxy.client().await;
    let skip = "SELECT /* helios:cache=skip */ v FROM cache_h_t";
    for _ in 0..4 {
        one(&client, skip).await;
    }
    assert_eq!(hits(&proxy), 0, "{}", cache_stats(&proxy));
    // A one-second TTL: a direct write (which the proxy does not see) shows after it.
    let ttl = "SELECT /* helios:cache=ttl:1 */ v FROM cache_h_t";
    assert_eq!(read_until_hit(&proxy, &client, ttl).await, "1");
    admin("UPDATE cache_h_t SET v = 2").await;
    assert_eq!(
        one(&client, ttl).await,
        "1",
        "served from the cache within its TTL"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(one(&client, ttl).await, "2");
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_invalidation_by_table_and_all() {
    if proxy_only("cache admin", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP TABLE IF EXISTS cache_a_t; CREATE TABLE cache_a_t (v int); \
         INSERT INTO cache_a_t VALUES (1);",
    )
    .await;
    let proxy = start("");
    let port = proxy.admin_port.unwrap();
    let client = proxy.client().await;
    let read = "SELECT v FROM cache_a_t";
    read_until_hit(&proxy, &client, read).await;
    admin("UPDATE cache_a_t SET v = 2").await;
    assert_eq!(one(&client, read).await, "1");
    let post =
        |body: &str| common::http::request(port, "POST", "/cache/invalidate", &[], body.as_bytes());
    let answer = post(r#"{"table": "public.cache_a_t"}"#);
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["tables_matched"], 1, "{}", answer.body);
    assert_eq!(one(&client, read).await, "2");
    read_until_hit(&proxy, &client, read).await;
    admin("UPDATE cache_a_t SET v = 3").await;
    assert_eq!(post(r#"{"all": true}"#).status, 200);
    assert_eq!(one(&client, read).await, "3");
    for bad in [
        r#"{"all": false}"#,
        r#"{"table": 5}"#,
        "nope",
        r#"{"table": "a.b.c"}"#,
    ] {
        let answer = post(bad);
        assert_eq!(answer.status, 400, "{bad}: {}", answer.body);
        assert!(answer.json()["error"].is_string(), "{}", answer.body);
    }
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_bound_holds_under_large_results() {
    if proxy_only("cache memory", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP TABLE IF EXISTS cache_m_t; CREATE TABLE cache_m_t (id int, pad text); \
         INSERT INTO cache_m_t SELECT g, repeat('x', 1000) FROM generate_series(1, 2000) g;",
    )
    .await;
    let proxy = start("max_memory_mb = 1\nmax_result_bytes = 65536\n");
    let client = proxy.client().await;
    // Larger than max_result_bytes: streamed, never stored.
    for _ in 0..3 {
        assert_eq!(rows(&client, "SELECT * FROM cache_m_t").await.len(), 2000);
    }
    // Many results that fit one by one but not all together.
    for id in 0..200 {
        let sql = format!(
            "SELECT * FROM cache_m_t WHERE id BETWEEN {} AND {}",
            id * 10,
            id * 10 + 9
        );
        for _ in 0..2 {
            rows(&client, &sql).await;
        }
    }
    let stats = cache_stats(&proxy);
    assert!(stats["bytes"].as_u64() <= Some(1024 * 1024), "{stats}");
    assert!(stats["evictions"].as_u64() > Some(0), "{stats}");
    assert!(stats["fills"].as_u64() > Some(0), "{stats}");
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_racing_writers_never_see_an_older_value() {
    if proxy_only("cache race", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP TABLE IF EXISTS cache_r_t; CREATE TABLE cache_r_t (id int PRIMARY KEY, v bigint); \
         INSERT INTO cache_r_t VALUES (1, 0);",
    )
    .await;
    let proxy = start("");
    // The highest value a writer's UPDATE was acknowledged for.
    let acked = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..2 {
        let client = proxy.client().await;
        let (acked, stop) = (acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 300 {
                n += 1;
                let sql = if w == 0 {
                    "UPDATE cache_r_t SET v = v + 1 WHERE id = 1 RETURNING v"
                } else {
                    "BEGIN; UPDATE cache_r_t SET v = v + 1 WHERE id = 1 RETURNING v; COMMIT"
                };
                let value: i64 = one(&client, sql).await.parse().unwrap();
                acked.fetch_max(value, Ordering::SeqCst);
            }
            0u64
        }));
    }
    for _ in 0..4 {
        let client = proxy.client().await;
        let (acked, stop) = (acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut stale = 0u64;
            for _ in 0..600 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let floor = acked.load(Ordering::SeqCst);
                let seen: i64 = one(&client, "SELECT v FROM cache_r_t WHERE id = 1")
                    .await
                    .parse()
                    .unwrap();
                if seen < floor {
                    stale += 1;
                    eprintln!("stale read: {seen} after {floor} was acknowledged");
                }
            }
            stale
        }));
    }
    let mut stale = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let n = task.await.unwrap();
        if i == 1 {
            stop.store(true, Ordering::Relaxed);
        }
        stale += n;
    }
    let stats = cache_stats(&proxy);
    assert_eq!(stale, 0, "stale reads: {stats}");
    assert!(
        stats["hits"].as_u64() > Some(0),
        "the race never hit the cache: {stats}"
    );
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_executions_are_answered_from_the_cache() {
    if proxy_only("cache extended protocol", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP TABLE IF EXISTS cache_x_t; CREATE TABLE cache_x_t (id int PRIMARY KEY, name text); \
         INSERT INTO cache_x_t SELECT g, 'n' || g FROM generate_series(1, 10) g;",
    )
    .await;
    let proxy = start("");
    let client = proxy.client().await;
    let statement = client
        .prepare("SELECT name FROM cache_x_t WHERE id = $1")
        .await
        .unwrap();
    let name = |id: i32| {
        let client = &client;
        let statement = statement.clone();
        async move {
            let row = client.query_one(&statement, &[&id]).await.unwrap();
            row.get::<_, String>(0)
        }
    };
    let before = hits(&proxy);
    for _ in 0..4 {
        assert_eq!(name(3).await, "n3");
        assert_eq!(name(4).await, "n4");
    }
    assert!(hits(&proxy) >= before + 4, "{}", cache_stats(&proxy));
    // Parameters are part of the key, and a write through the proxy is seen.
    let writer = proxy.client().await;
    writer
        .execute(
            "UPDATE cache_x_t SET name = 'changed' WHERE id = $1",
            &[&3i32],
        )
        .await
        .unwrap();
    assert_eq!(name(3).await, "changed");
    assert_eq!(name(4).await, "n4");
    // Unprepared statements (Parse, Bind, Execute each time) too.
    let before = hits(&proxy);
    for _ in 0..4 {
        let rows = client
            .query(
                "SELECT id FROM cache_x_t WHERE id <= $1 ORDER BY id",
                &[&5i32],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 5);
    }
    // (tokio-postgres prepares a named statement for each of those: a hit needs the
    // statement to be known, which it is from the second execution on.)
    assert!(hits(&proxy) > before, "{}", cache_stats(&proxy));
    proxy.stop();
}

#[test]
fn psycopg_and_asyncpg_see_hits_writes_volatility_and_no_stale_reads() {
    if proxy_only("cache drivers", "the result cache is the proxy's") {
        return;
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = repo.join("target/drivers/venv/bin/python");
    assert!(
        python.is_file(),
        "the Python venv ({}) is not installed: run scripts/test.sh",
        python.display()
    );
    let proxy = start("");
    let mut cmd = std::process::Command::new(python);
    cmd.arg(repo.join("tests/drivers/python/cache_scenarios.py"))
        .current_dir(repo)
        .env("HELIOS_HOST", &proxy.host)
        .env("HELIOS_PORT", proxy.port.to_string())
        .env("HELIOS_ADMIN_PORT", proxy.admin_port.unwrap().to_string())
        .env("HELIOS_USER", common::SUPERUSER)
        .env("HELIOS_PASSWORD", common::SUPERUSER_PASSWORD)
        .env("HELIOS_DB", DATABASE)
        .env("HELIOS_TAG", "cache")
        .env("HELIOS_TIMEOUT_SECS", "120")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let out = common::run_tool(cmd, None, Duration::from_secs(180));
    println!("{out}");
    assert!(
        out.status.success() && !out.stdout.contains("FAIL"),
        "cache scenarios failed:\n{out}\n{}",
        proxy.log()
    );
    proxy.stop();
}

#[test]
fn pgbench_reads_hit_and_writes_stay_consistent() {
    if proxy_only("cache pgbench", "the result cache is the proxy's") {
        return;
    }
    let proxy = start("");
    let limit = Duration::from_secs(120);
    let init = common::pgbench(&proxy, &["-i", "-q", "-s", "1"], limit);
    assert!(init.status.success(), "pgbench -i:\n{init}");
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        script.path(),
        "\\set aid random(1, 200)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n",
    )
    .unwrap();
    let script_path = script.path().to_str().unwrap();
    let before = hits(&proxy);
    for mode in ["simple", "extended", "prepared"] {
        let run = common::pgbench(
            &proxy,
            &["-n", "-M", mode, "-c", "4", "-t", "300", "-f", script_path],
            limit,
        );
        assert!(
            run.status.success() && run.stdout.contains("number of failed transactions: 0"),
            "pgbench -M {mode}:\n{run}"
        );
    }
    assert!(hits(&proxy) > before + 1000, "{}", cache_stats(&proxy));
    // Writes and cached reads together: the books still balance, and a cached read
    // agrees with PostgreSQL afterwards.
    let run = common::pgbench(
        &proxy,
        &["-n", "-M", "prepared", "-c", "4", "-t", "150"],
        limit,
    );
    assert!(
        run.status.success() && run.stdout.contains("number of failed transactions: 0"),
        "pgbench tpcb:\n{run}"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = proxy.client().await;
        let direct = common::cluster().admin(DATABASE).await;
        for sql in [
            "SELECT sum(abalance)::text FROM pgbench_accounts",
            "SELECT sum(bbalance)::text FROM pgbench_branches",
            "SELECT sum(delta)::text FROM pgbench_history",
        ] {
            let want: String = direct.query_one(sql, &[]).await.unwrap().get(0);
            for _ in 0..3 {
                assert_eq!(one(&client, sql).await, want, "{sql}");
            }
        }
        let history: String = direct
            .query_one("SELECT sum(delta)::text FROM pgbench_history", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            one(&client, "SELECT sum(abalance)::text FROM pgbench_accounts").await,
            history
        );
    });
    proxy.stop();
}

fn l_tier(proxy: &Proxy, tier: &str, what: &str) -> u64 {
    cache_stats(proxy)[tier][what]
        .as_u64()
        .unwrap_or_else(|| panic!("{tier}.{what} in /cache: {}", cache_stats(proxy)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_shards_find_results_in_l2() {
    if proxy_only("cache l2", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP TABLE IF EXISTS cache_l2_t; CREATE TABLE cache_l2_t (v int); \
         INSERT INTO cache_l2_t VALUES (7);",
    )
    .await;
    let proxy = start("");
    let sql = "SELECT v FROM cache_l2_t";
    let first = proxy.client().await;
    read_until_hit(&proxy, &first, sql).await;
    // Twelve more connections: some land on the other shard (SO_REUSEPORT spreads
    // them), learn the statement there, then find its result with its owner.
    for _ in 0..12 {
        let client = proxy.client().await;
        for _ in 0..2 {
            assert_eq!(one(&client, sql).await, "7");
        }
    }
    let stats = cache_stats(&proxy);
    assert!(stats["l2"]["hits"].as_u64() > Some(0), "{stats}");
    // A write through any shard reaches L2 too.
    first
        .batch_execute("UPDATE cache_l2_t SET v = 8")
        .await
        .unwrap();
    for _ in 0..4 {
        let client = proxy.client().await;
        assert_eq!(one(&client, sql).await, "8");
    }
    proxy.stop();
}

/// Parse (declared types), Bind (text parameters), Describe portal, Execute, Sync.
fn extended(sql: &str, types: &[u32], params: &[&str]) -> Vec<Vec<u8>> {
    use common::raw::msg;
    let mut parse = vec![0u8];
    parse.extend_from_slice(sql.as_bytes());
    parse.push(0);
    parse.extend_from_slice(&(types.len() as u16).to_be_bytes());
    for t in types {
        parse.extend_from_slice(&t.to_be_bytes());
    }
    let mut bind = vec![0u8, 0u8];
    bind.extend_from_slice(&[0, 0]);
    bind.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for p in params {
        bind.extend_from_slice(&(p.len() as i32).to_be_bytes());
        bind.extend_from_slice(p.as_bytes());
    }
    bind.extend_from_slice(&[0, 0]);
    vec![
        msg(b'P', &parse),
        msg(b'B', &bind),
        msg(b'D', b"P\0"),
        common::raw::execute(),
        common::raw::sync(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spellings_of_one_query_share_an_l3_entry() {
    if proxy_only("cache l3", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP TABLE IF EXISTS cache_l3_t; CREATE TABLE cache_l3_t (id int, name text); \
         INSERT INTO cache_l3_t VALUES (42, 'forty-two'), (7, 'seven');",
    )
    .await;
    let proxy = start("");
    let mut raw = common::raw::RawConn::connect(proxy.port);
    let startup = raw.startup_trust(common::TRUST_USER, DATABASE);
    assert!(startup.error.is_none(), "{:?}", startup.error);
    let first = "select name from cache_l3_t where id=42";
    for _ in 0..2 {
        let r = raw.simple_query(first);
        assert_eq!(r.rows, vec![vec![Some("forty-two".to_string())]], "{r:?}");
    }
    let before = l_tier(&proxy, "l3", "hits");
    // Another spelling: one L3 hit, byte for byte the same answer.
    let plain: Vec<(u8, Vec<u8>)> = {
        raw.send_all(&[common::raw::query(first)]);
        raw.read_until_ready()
            .into_iter()
            .map(|m| (m.tag, m.body))
            .collect()
    };
    raw.send_all(&[common::raw::query(
        "SELECT name\n  FROM cache_l3_t WHERE id = 42 /* another spelling */",
    )]);
    let other: Vec<(u8, Vec<u8>)> = raw
        .read_until_ready()
        .into_iter()
        .map(|m| (m.tag, m.body))
        .collect();
    assert_eq!(other, plain);
    assert_eq!(l_tier(&proxy, "l3", "hits"), before + 1);
    // The prepared form with an int4 parameter bound to 42, in text.
    raw.send_all(&extended(
        "SELECT name FROM cache_l3_t WHERE id = $1",
        &[23],
        &["42"],
    ));
    let prepared = raw.read_until_ready();
    let tags: Vec<u8> = prepared.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"12TDCZ", "{prepared:?}");
    assert_eq!(
        common::raw::first_column(&prepared),
        [Some("forty-two".to_string())]
    );
    assert_eq!(l_tier(&proxy, "l3", "hits"), before + 2);
    // Another value is another entry; an untyped parameter is not the int4 literal.
    raw.send_all(&extended(
        "SELECT name FROM cache_l3_t WHERE id = $1",
        &[23],
        &["7"],
    ));
    assert_eq!(
        common::raw::first_column(&raw.read_until_ready()),
        [Some("seven".to_string())]
    );
    raw.send_all(&extended(
        "SELECT name FROM cache_l3_t WHERE id = $1",
        &[],
        &["42"],
    ));
    assert_eq!(
        common::raw::first_column(&raw.read_until_ready()),
        [Some("forty-two".to_string())]
    );
    assert_eq!(l_tier(&proxy, "l3", "hits"), before + 2);
    proxy.stop();
}

/// Waits (at most 15 s) until `done` holds, polling every 50 ms.
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !done().await {
        assert!(std::time::Instant::now() < deadline, "{what} within 15 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn helios_slots() -> i64 {
    common::cluster()
        .admin(DATABASE)
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'helios\\_cache\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_directly_on_postgresql_are_seen_through_the_wal() {
    if proxy_only("cache wal", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP TABLE IF EXISTS cache_wal_t, cache_wal_p CASCADE; \
         CREATE TABLE cache_wal_t (id int, v int); INSERT INTO cache_wal_t VALUES (1, 1); \
         CREATE TABLE cache_wal_p (id int, v int) PARTITION BY RANGE (id); \
         CREATE TABLE cache_wal_p1 PARTITION OF cache_wal_p FOR VALUES FROM (0) TO (100); \
         INSERT INTO cache_wal_p VALUES (1, 1);",
    )
    .await;
    for round in 0..2 {
        let proxy = start("invalidation = \"wal\"\n");
        let client = proxy.client().await;
        let read = "SELECT v FROM cache_wal_t WHERE id = 1";
        // Nothing is stored until the follower streams; then reads hit.
        eventually("a cache hit once the WAL follower streams", || async {
            let before = hits(&proxy);
            one(&client, read).await;
            one(&client, read).await;
            hits(&proxy) > before
        })
        .await;
        assert_eq!(helios_slots().await, 1, "one temporary slot while running");
        let stats = cache_stats(&proxy);
        assert_eq!(stats["invalidation"], "wal", "{stats}");
        assert_eq!(stats["wal"][0]["database"], DATABASE, "{stats}");
        assert_eq!(stats["wal"][0]["streaming"], true, "{stats}");
        // A write straight to PostgreSQL, which the proxy never sees.
        let want = (round * 10 + 2).to_string();
        admin(&format!("UPDATE cache_wal_t SET v = {want} WHERE id = 1")).await;
        eventually("the direct write seen through the cache", || async {
            one(&client, read).await == want
        })
        .await;
        // A partition written directly invalidates reads of its parent.
        let parent = "SELECT sum(v) FROM cache_wal_p";
        eventually("the partitioned read cached", || async {
            let before = hits(&proxy);
            one(&client, parent).await;
            hits(&proxy) > before
        })
        .await;
        let total: i64 = one(&client, parent).await.parse().unwrap();
        admin("UPDATE cache_wal_p1 SET v = v + 1").await;
        eventually("the partition's write seen through its parent", || async {
            one(&client, parent).await.parse::<i64>().unwrap() == total + 1
        })
        .await;
        let stats = cache_stats(&proxy);
        assert!(stats["wal"][0]["commits"].as_u64() >= Some(2), "{stats}");
        let prometheus = common::http::get(proxy.admin_port.unwrap(), "/metrics/prometheus").body;
        assert!(
            prometheus.contains("heliosdb_proxy_cache_wal_lag_bytes{database=\"app\"}"),
            "{prometheus}"
        );
        proxy.stop();
        // The slot goes with the proxy (and a restart starts a new one).
        eventually("no slot left behind", || async {
            helios_slots().await == 0
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_inside_read_only_transactions_are_cached() {
    if proxy_only(
        "cache read-only transactions",
        "the result cache is the proxy's",
    ) {
        return;
    }
    admin(
        "DROP TABLE IF EXISTS cache_ro_t; CREATE TABLE cache_ro_t (v int); \
         INSERT INTO cache_ro_t VALUES (1);",
    )
    .await;
    let proxy = start("");
    let client = proxy.client().await;
    let read = "SELECT v FROM cache_ro_t";
    read_until_hit(&proxy, &client, read).await;
    // Inside BEGIN READ ONLY the same result is served (status T), then COMMIT works.
    let before = hits(&proxy);
    let answers = client.simple_query("BEGIN READ ONLY").await.unwrap();
    assert!(!answers.is_empty());
    assert_eq!(one(&client, read).await, "1");
    assert_eq!(one(&client, "SELECT 2 + 2").await, "4");
    assert_eq!(one(&client, read).await, "1");
    client.batch_execute("COMMIT").await.unwrap();
    assert!(hits(&proxy) >= before + 2, "{}", cache_stats(&proxy));
    // A write through the proxy is seen inside the next read-only transaction too.
    let writer = proxy.client().await;
    writer
        .batch_execute("UPDATE cache_ro_t SET v = 2")
        .await
        .unwrap();
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(one(&client, read).await, "2");
    client.batch_execute("COMMIT").await.unwrap();
    // A read-only transaction fills the cache for reads outside one.
    writer
        .batch_execute("UPDATE cache_ro_t SET v = 3")
        .await
        .unwrap();
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(one(&client, read).await, "3");
    client.batch_execute("COMMIT").await.unwrap();
    let before = hits(&proxy);
    assert_eq!(one(&client, read).await, "3");
    assert_eq!(hits(&proxy), before + 1, "{}", cache_stats(&proxy));
    // REPEATABLE READ keeps its own snapshot: nothing from the cache there.
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .unwrap();
    let before = hits(&proxy);
    assert_eq!(one(&client, read).await, "3");
    assert_eq!(hits(&proxy), before, "{}", cache_stats(&proxy));
    client.batch_execute("COMMIT").await.unwrap();
    // A read-write transaction is not served from the cache either.
    client.batch_execute("BEGIN").await.unwrap();
    let before = hits(&proxy);
    assert_eq!(one(&client, read).await, "3");
    assert_eq!(hits(&proxy), before, "{}", cache_stats(&proxy));
    client.batch_execute("ROLLBACK").await.unwrap();
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_the_text_hides_and_writes_it_wraps_are_followed() {
    if proxy_only("cache names", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP TABLE IF EXISTS cache_n_t; CREATE TABLE cache_n_t (id int, v int); \
         INSERT INTO cache_n_t VALUES (1, 1), (2, 2); \
         DROP OPERATOR IF EXISTS ### (int, int); \
         DROP FUNCTION IF EXISTS cache_n_noisy_op(int, int), cache_n_noisy(int); \
         CREATE FUNCTION cache_n_noisy(int) RETURNS int LANGUAGE plpgsql VOLATILE AS \
           'BEGIN UPDATE cache_n_t SET v = v + 100 WHERE id = 2; RETURN $1; END'; \
         CREATE FUNCTION cache_n_noisy_op(int, int) RETURNS boolean LANGUAGE sql \
           VOLATILE AS 'SELECT cache_n_noisy($1) = $2'; \
         CREATE OPERATOR ### (LEFTARG = int, RIGHTARG = int, FUNCTION = cache_n_noisy_op);",
    )
    .await;
    let proxy = start("");
    let client = proxy.client().await;
    let writer = proxy.client().await;
    // A CTE named like the table it reads still depends on the table.
    let shadow = "WITH cache_n_t AS (SELECT * FROM cache_n_t WHERE id = 1) SELECT v FROM cache_n_t";
    read_until_hit(&proxy, &client, shadow).await;
    writer
        .batch_execute("UPDATE cache_n_t SET v = 10 WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(one(&client, shadow).await, "10");
    // A write inside a CTE, inside a transaction written out in one Query.
    let read = "SELECT count(*) FROM cache_n_t";
    read_until_hit(&proxy, &client, read).await;
    writer
        .batch_execute(
            "BEGIN; WITH d AS (DELETE FROM cache_n_t WHERE id = 1 RETURNING 1) \
             SELECT count(*) FROM d; COMMIT",
        )
        .await
        .unwrap();
    assert_eq!(one(&client, read).await, "1");
    // A user's operator that calls a volatile function is never answered from the cache.
    let before = hits(&proxy);
    for _ in 0..3 {
        one(&client, "SELECT count(*) FROM cache_n_t WHERE id ### 2").await;
    }
    assert_eq!(hits(&proxy), before, "{}", cache_stats(&proxy));
    assert_eq!(
        one(&client, "SELECT v FROM cache_n_t WHERE id = 2").await,
        "302",
        "the operator's function ran every time"
    );
    // A time-of-day constant is never cached.
    let before = hits(&proxy);
    for _ in 0..3 {
        one(
            &client,
            "SELECT count(*) FROM cache_n_t WHERE now() >= 'now'::timestamptz - interval '1 day'",
        )
        .await;
        one(&client, "SELECT 'today'::date").await;
    }
    assert_eq!(hits(&proxy), before, "{}", cache_stats(&proxy));
    // A session with a temporary table of the same name reads its own table.
    read_until_hit(&proxy, &client, read).await;
    let temp = proxy.client().await;
    temp.batch_execute("CREATE TEMP TABLE cache_n_t (id int, v int)")
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            one(&temp, read).await,
            "0",
            "the temporary table, not the cached result"
        );
    }
    assert_eq!(one(&client, read).await, "1");
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_table_overrides_turn_caching_off_and_shorten_the_time_to_live() {
    if proxy_only("cache tables", "the result cache is the proxy's") {
        return;
    }
    admin(
        "DROP TABLE IF EXISTS cache_o_off, cache_o_ttl; \
         CREATE TABLE cache_o_off (v int); INSERT INTO cache_o_off VALUES (1); \
         CREATE TABLE cache_o_ttl (v int); INSERT INTO cache_o_ttl VALUES (1);",
    )
    .await;
    let proxy = start(
        "[[cache.tables]]\nname = \"cache_o_off\"\ncache = false\n\
         [[cache.tables]]\nname = \"public.cache_o_ttl\"\nttl_secs = 1\n",
    );
    let client = proxy.client().await;
    let before = hits(&proxy);
    for _ in 0..4 {
        assert_eq!(one(&client, "SELECT v FROM cache_o_off").await, "1");
    }
    assert_eq!(hits(&proxy), before, "{}", cache_stats(&proxy));
    let ttl = "SELECT v FROM cache_o_ttl";
    read_until_hit(&proxy, &client, ttl).await;
    admin("UPDATE cache_o_ttl SET v = 2").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(one(&client, ttl).await, "2", "the table's own time to live");
    proxy.stop();
}
