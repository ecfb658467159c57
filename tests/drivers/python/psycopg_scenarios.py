#!/usr/bin/env python3
"""psycopg 3 scenarios through HeliosProxy (or PostgreSQL itself).

Every connection uses prepare_threshold=0, so every query psycopg sends with
cursor.execute() is prepared server-side on first use under psycopg's automatic names
(_pg3_0, _pg3_1, ... counted per connection, so fresh connections collide on names).
Run by tests/e2e_drivers.rs; see common.py for the environment it reads.
"""

import threading

import psycopg
from psycopg import errors, pq

from common import (
    DB, HOST, PASSWORD, PORT, SERVER_DEFAULTS, USER, Runner, check, check_eq, expect_error,
    name,
)

DRIVER = "pg3"
BARRIER_TIMEOUT = 30


def connect(**extra):
    return psycopg.connect(
        host=HOST, port=PORT, user=USER, password=PASSWORD, dbname=DB,
        autocommit=True, prepare_threshold=0, connect_timeout=10, **extra,
    )


def one(conn, sql, params=None, **kw):
    return conn.execute(sql, params, **kw).fetchone()[0]


def fresh_table(conn, table, columns):
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(f"CREATE TABLE {table} ({columns})")


def parallel(workers):
    """Runs each worker(barrier) in its own thread; re-raises the first failure. A failure
    aborts the shared barrier so the other workers stop instead of waiting forever."""
    barrier = threading.Barrier(len(workers), timeout=BARRIER_TIMEOUT)
    errors_seen = []

    def wrap(worker):
        try:
            worker(barrier)
        except Exception as exc:  # noqa: BLE001 - re-raised below
            errors_seen.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=wrap, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BARRIER_TIMEOUT * 4)
        check(not t.is_alive(), "a worker thread hung")
    real = [e for e in errors_seen if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors_seen:
        raise (real or errors_seen)[0]


def open_all(count, **extra):
    conns = []
    try:
        for _ in range(count):
            conns.append(connect(**extra))
    except Exception:
        for c in conns:
            c.close()
        raise
    return conns


# a. The same prepared query on 8 connections at once, interleaved round by round.
def prepared_concurrent():
    conns = open_all(8)
    rounds = 8
    try:
        def worker_for(cid, conn):
            def worker(barrier):
                for r in range(rounds):
                    barrier.wait()
                    check_eq(one(conn, "SELECT %s::int * 1000 + %s::int", (r, cid)),
                             r * 1000 + cid, f"conn {cid} round {r} shared SQL")
                    check_eq(one(conn, f"SELECT %s::int + {cid}", (r,)), r + cid,
                             f"conn {cid} round {r} own SQL")
                    check_eq(one(conn, "SELECT %s::int * 1000 + %s::int", (cid, r)),
                             cid * 1000 + r, f"conn {cid} round {r} shared SQL again")
            return worker
        parallel([worker_for(cid, c) for cid, c in enumerate(conns)])
    finally:
        for c in conns:
            c.close()
    return f"{8 * rounds * 3} prepared executions on 8 connections"


# b. Fresh connections prepare different SQL under the same automatic names.
def same_name_different_sql():
    sql_alpha = "SELECT 'alpha-' || %s::text"
    sql_len = "SELECT length(%s::text) * 10"
    a, b = open_all(2)
    try:
        # a: _pg3_0 = alpha, _pg3_1 = length; b: _pg3_0 = length, _pg3_1 = alpha.
        check_eq(one(a, sql_alpha, ("x",), prepare=True), "alpha-x", "a first")
        check_eq(one(b, sql_len, ("xyz",), prepare=True), 30, "b first")
        check_eq(one(a, sql_len, ("xy",), prepare=True), 20, "a second")
        check_eq(one(b, sql_alpha, ("q",), prepare=True), "alpha-q", "b second")
        for i in range(20):
            word = "w" * (i + 1)
            conn_first, conn_second = (a, b) if i % 2 == 0 else (b, a)
            check_eq(one(conn_first, sql_alpha, (word,)), f"alpha-{word}", f"round {i} alpha")
            check_eq(one(conn_second, sql_len, (word,)), 10 * len(word), f"round {i} length")
            check_eq(one(conn_second, sql_alpha, (str(i),)), f"alpha-{i}", f"round {i} alpha 2")
            check_eq(one(conn_first, sql_len, (str(i),)), 10 * len(str(i)), f"round {i} len 2")
    finally:
        a.close()
        b.close()


# c. DEALLOCATE ALL, protocol Close and SQL DEALLOCATE, each followed by re-preparing.
def deallocate_reprepare():
    with connect() as conn:
        for i in range(3):
            check_eq(one(conn, "SELECT %s::int * 3", (i,)), i * 3, "before DEALLOCATE ALL")
        # psycopg sees the DEALLOCATE ALL command tag and forgets its statements.
        conn.execute("DEALLOCATE ALL")
        for i in range(3):
            check_eq(one(conn, "SELECT %s::int * 3", (i,)), i * 3, "after DEALLOCATE ALL")
            check_eq(one(conn, "SELECT %s::int * 5", (i,)), i * 5, "new SQL after DEALLOCATE ALL")

        # Low level, with names we choose: Parse, Close (protocol), Parse again with other SQL.
        pg = conn.pgconn
        stmt = b"helios_c_stmt"

        def prepare(sql):
            res = pg.prepare(stmt, sql)
            check_eq(res.status, pq.ExecStatus.COMMAND_OK, f"prepare {sql!r}: "
                     f"{res.error_message.decode(errors='replace')}")

        def execute(args):
            res = pg.exec_prepared(stmt, args)
            check_eq(res.status, pq.ExecStatus.TUPLES_OK,
                     f"execute: {res.error_message.decode(errors='replace')}")
            return res.get_value(0, 0).decode()

        prepare(b"SELECT 1 + $1::int")
        check_eq(execute([b"41"]), "42", "first SQL under helios_c_stmt")
        res = pg.close_prepared(stmt)
        check_eq(res.status, pq.ExecStatus.COMMAND_OK, "protocol Close")
        prepare(b"SELECT 'x' || $1::text")
        check_eq(execute([b"41"]), "x41", "second SQL under the same name after Close")
        # SQL-level DEALLOCATE of a protocol-level statement, then the name is free again.
        conn.execute("DEALLOCATE helios_c_stmt", prepare=False)
        prepare(b"SELECT $1::int * 100")
        check_eq(execute([b"7"]), "700", "third SQL under the same name after DEALLOCATE")
        res = pg.exec_prepared(b"helios_c_missing", [])
        check_eq(res.status, pq.ExecStatus.FATAL_ERROR, "executing an unknown statement")
        check_eq(res.error_field(pq.DiagnosticField.SQLSTATE), b"26000", "unknown statement")
        check_eq(one(conn, "SELECT %s::int * 3", (5,)), 15, "usable after the 26000")


# d. A table's shape changes between executions of a prepared SELECT *.
def ddl_between_executions():
    table = name(DRIVER, "ddl")
    retried = 0
    with connect() as admin:
        fresh_table(admin, table, "id int")
        admin.execute(f"INSERT INTO {table} VALUES (1)")
    sql = f"SELECT * FROM {table} ORDER BY id"
    with connect() as a, connect() as b, connect() as other:
        check_eq(a.execute(sql).fetchall(), [(1,)], "a before")
        check_eq(b.execute(sql).fetchall(), [(1,)], "b before")
        check_eq(a.execute(sql).fetchall(), [(1,)], "a before, prepared")
        # DDL on the same connection: psycopg sees the ALTER tag and re-prepares.
        a.execute(f"ALTER TABLE {table} ADD COLUMN extra text DEFAULT 'x'")
        check_eq(a.execute(sql).fetchall(), [(1, "x")], "a after its own ALTER")
        # DDL on another connection: PostgreSQL itself answers the stale statements of b
        # and a with 0A000, and psycopg keeps using them until its cache is cleared (here
        # with DEALLOCATE ALL). A proxy may do better (re-prepare); it must never answer
        # with the old shape, nor keep failing once the client has re-prepared.
        other.execute(f"ALTER TABLE {table} ADD COLUMN more int DEFAULT 7")
        for who, conn in (("b", b), ("a", a)):
            try:
                rows = conn.execute(sql).fetchall()
            except errors.FeatureNotSupported as exc:
                check("cached plan must not change result type" in str(exc), repr(exc))
                retried += 1
                conn.execute("DEALLOCATE ALL")
                rows = conn.execute(sql).fetchall()
            check_eq(rows, [(1, "x", 7)], f"{who} after another connection's ALTER")
            check_eq(conn.execute(sql).fetchall(), [(1, "x", 7)], f"{who} again")
    # A connection preparing after the DDL never sees the old shape or an error.
    with connect() as fresh:
        for _ in range(3):
            check_eq(fresh.execute(sql).fetchall(), [(1, "x", 7)], "fresh connection")
    return f"{retried} stale-statement errors (PostgreSQL itself gives 2)"


# e. Session state per connection, checked in many autocommit transactions while the
# other connections set different values at the same time.
def session_state():
    count, rounds = 4, 15
    conns = open_all(count)
    try:
        defaults = [SERVER_DEFAULTS] * count

        def settings(conn, unnamed):
            return conn.execute(
                "SELECT current_setting('application_name'), current_setting('search_path'),"
                " current_setting('statement_timeout')",
                prepare=not unnamed,
            ).fetchone()

        def worker_for(i, conn):
            app, path, timeout = f"pg3-{i}", f"sp{i}, public", f"{i + 1}s"

            def worker(barrier):
                barrier.wait()
                conn.execute(f"SET application_name = '{app}'")
                conn.execute(f"SET search_path = sp{i}, public")
                conn.execute(f"SET statement_timeout = '{timeout}'")
                want_path = path
                for r in range(rounds):
                    barrier.wait()
                    if r == rounds // 2:
                        check_eq(one(conn, "SELECT set_config('search_path', %s, false)",
                                     (f"cfg{i}",)), f"cfg{i}", "set_config result")
                        want_path = f"cfg{i}"
                    check_eq(settings(conn, r % 2 == 1), (app, want_path, timeout),
                             f"conn {i} round {r}")
                    check_eq(one(conn, "SHOW application_name"), app, f"conn {i} SHOW")
                    if r == 3:
                        # A SET inside a rolled-back transaction is undone.
                        conn.execute("BEGIN")
                        conn.execute("SET application_name = 'rolled-back'")
                        check_eq(one(conn, "SHOW application_name"), "rolled-back", "in tx")
                        conn.execute("ROLLBACK")
                        check_eq(one(conn, "SHOW application_name"), app, "after ROLLBACK")
                    if r == 5:
                        # SET LOCAL lasts until COMMIT only.
                        with conn.transaction():
                            conn.execute("SET LOCAL statement_timeout = '7s'")
                            check_eq(one(conn, "SHOW statement_timeout"), "7s", "SET LOCAL")
                        check_eq(one(conn, "SHOW statement_timeout"), timeout,
                                 "SET LOCAL after COMMIT")
                barrier.wait()
                d_app, d_path, d_timeout = defaults[i]
                conn.execute("RESET search_path")
                check_eq(settings(conn, False), (app, d_path, timeout), "RESET search_path")
                conn.execute("RESET ALL")
                check_eq(settings(conn, False), (d_app, d_path, d_timeout), "RESET ALL")
                barrier.wait()
                for r in range(3):
                    check_eq(settings(conn, r == 1), (d_app, d_path, d_timeout),
                             f"defaults stay, round {r}")
            return worker

        parallel([worker_for(i, c) for i, c in enumerate(conns)])
    finally:
        for c in conns:
            c.close()


# f. Errors: in an explicit transaction (status E), and inside a pipeline.
def errors_recover():
    with connect() as conn:
        conn.execute("BEGIN")
        check_eq(one(conn, "SELECT %s::int", (1,)), 1, "in transaction")
        expect_error("22012", lambda: conn.execute("SELECT 1 / %s::int", (0,)), "division")
        check_eq(conn.info.transaction_status, pq.TransactionStatus.INERROR, "status E")
        expect_error("25P02", lambda: conn.execute("SELECT %s::int", (2,)), "after the error")
        expect_error("25P02", lambda: conn.execute("SELECT 2", prepare=False), "unnamed too")
        conn.execute("ROLLBACK")
        check_eq(conn.info.transaction_status, pq.TransactionStatus.IDLE, "status I")
        check_eq(one(conn, "SELECT %s::int", (3,)), 3, "after ROLLBACK")

        # An error inside a pipeline: everything up to the Sync is skipped.
        table = name(DRIVER, "pipeerr")
        fresh_table(conn, table, "id int primary key")
        try:
            with conn.pipeline() as p:
                conn.execute(f"INSERT INTO {table} VALUES (%s)", (1,))
                conn.execute(f"INSERT INTO {table} VALUES (%s)", (1,))  # duplicate key
                conn.execute(f"INSERT INTO {table} VALUES (%s)", (2,))
                p.sync()
            raise AssertionError("pipeline with a duplicate key did not fail")
        except errors.UniqueViolation:
            pass
        check_eq(conn.info.transaction_status, pq.TransactionStatus.IDLE, "after pipeline error")
        # The implicit transaction of the failed pipeline rolled back as a whole.
        check_eq(one(conn, f"SELECT count(*) FROM {table}"), 0, "rows after failed pipeline")
        with conn.pipeline():
            curs = [conn.execute(f"INSERT INTO {table} VALUES (%s) RETURNING id", (i,))
                    for i in range(10, 20)]
        check_eq([c.fetchone()[0] for c in curs], list(range(10, 20)), "later pipeline")
        check_eq(one(conn, f"SELECT count(*) FROM {table}"), 10, "rows after later pipeline")
        conn.execute(f"DROP TABLE {table}")


# g. Pipeline mode: 100 prepared queries in one pipeline, then 100 inserts.
def pipeline_100():
    table = name(DRIVER, "pipe")
    with connect() as conn:
        fresh_table(conn, table, "id int, v text")
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 2, %s::text", (i, f"v{i}")) for i in range(100)]
        for i, cur in enumerate(curs):
            check_eq(cur.fetchone(), (i * 2, f"v{i}"), f"pipelined query {i}")
        with conn.pipeline() as p:
            for i in range(100):
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, f"v{i}"))
                if i == 49:
                    p.sync()
        check_eq(conn.execute(f"SELECT count(*), sum(id) FROM {table}").fetchone(),
                 (100, 4950), "rows inserted by the pipeline")
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)",
                            [(i, "many") for i in range(100, 200)])
        check_eq(one(conn, f"SELECT count(*) FROM {table} WHERE v = 'many'"), 100, "executemany")
        conn.execute(f"DROP TABLE {table}")


# h. COPY FROM STDIN and COPY TO STDOUT, and a failed COPY.
def copy_in_out():
    table = name(DRIVER, "copy")
    with connect() as conn:
        fresh_table(conn, table, "id int, name text")
        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} (id, name) FROM STDIN") as copy:
                for i in range(2000):
                    copy.write_row((i, f"name-{i}"))
            check_eq(cur.rowcount, 2000, "COPY FROM row count")
        check_eq(conn.execute(f"SELECT count(*), sum(id) FROM {table}").fetchone(),
                 (2000, 1999000), "rows after COPY FROM")
        with conn.cursor() as cur:
            with cur.copy(f"COPY (SELECT id, name FROM {table} ORDER BY id) TO STDOUT") as copy:
                copy.set_types(["int4", "text"])
                rows = list(copy.rows())
        check_eq(len(rows), 2000, "COPY TO row count")
        check_eq(rows[0], (0, "name-0"), "first row")
        check_eq(rows[-1], (1999, "name-1999"), "last row")

        def bad_copy():
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} (id, name) FROM STDIN") as copy:
                    copy.write(b"1\tok\nnot-a-number\tbad\n")
        expect_error("22P02", bad_copy, "COPY with a bad row")
        check_eq(one(conn, f"SELECT count(*) FROM {table}"), 2000, "failed COPY added nothing")
        check_eq(one(conn, "SELECT %s::int + 1", (1,)), 2, "usable after failed COPY")
        conn.execute(f"DROP TABLE {table}")


# i. Transactions: visibility on commit, nothing after rollback, savepoints.
def transactions():
    table = name(DRIVER, "tx")
    with connect() as a, connect() as b:
        fresh_table(a, table, "id int")
        count = f"SELECT count(*) FROM {table}"
        a.execute("BEGIN")
        a.execute(f"INSERT INTO {table} VALUES (%s)", (1,))
        a.execute(f"INSERT INTO {table} VALUES (%s)", (2,))
        check_eq(one(a, count), 2, "own rows inside the transaction")
        check_eq(one(b, count), 0, "other connection before COMMIT")
        a.execute("COMMIT")
        check_eq(one(b, count), 2, "other connection after COMMIT")
        a.execute("BEGIN")
        a.execute(f"INSERT INTO {table} VALUES (%s)", (3,))
        check_eq(one(a, count), 3, "own row before ROLLBACK")
        a.execute("ROLLBACK")
        check_eq(one(a, count), 2, "after ROLLBACK")
        check_eq(one(b, count), 2, "other connection after ROLLBACK")
        # psycopg's transaction blocks: BEGIN/COMMIT, nested ones as savepoints.
        with a.transaction():
            a.execute(f"INSERT INTO {table} VALUES (%s)", (10,))
            try:
                with a.transaction():
                    a.execute(f"INSERT INTO {table} VALUES (%s)", (11,))
                    a.execute("SELECT 1 / %s::int", (0,))
            except errors.DivisionByZero:
                pass
            a.execute(f"INSERT INTO {table} VALUES (%s)", (12,))
        check_eq(b.execute(f"SELECT id FROM {table} ORDER BY id").fetchall(),
                 [(1,), (2,), (10,), (12,)], "after savepoint rollback and COMMIT")
        a.execute(f"DROP TABLE {table}")


# j. LISTEN on one connection, NOTIFY from another.
def listen_notify():
    channel = name(DRIVER, "chan")
    with connect() as listener, connect() as notifier:
        listener.execute(f"LISTEN {channel}")
        for i in range(3):
            notifier.execute(f"NOTIFY {channel}, 'hello-{i}'")
        notifier.execute("SELECT pg_notify(%s, %s)", (channel, "via-function"))
        got = [(n.channel, n.payload)
               for n in listener.notifies(timeout=10, stop_after=4)]
        want = [(channel, f"hello-{i}") for i in range(3)] + [(channel, "via-function")]
        check_eq(got, want, "notifications")
        # Still listening after other traffic on the listener.
        check_eq(one(listener, "SELECT %s::int", (9,)), 9, "listener query")
        notifier.execute(f"NOTIFY {channel}, 'after-query'")
        got = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
        check_eq(got, ["after-query"], "notification after a query")
        listener.execute(f"UNLISTEN {channel}")


# k. Startup parameters (application_name, options=-c ...) are what RESET returns to.
def startup_params():
    with connect(application_name="pg3-start", options="-c statement_timeout=3s") as conn:
        sql = "SELECT current_setting('application_name'), current_setting('statement_timeout')"
        check_eq(conn.execute(sql).fetchone(), ("pg3-start", "3s"), "startup values")
        conn.execute("SET application_name = 'changed'")
        conn.execute("SET statement_timeout = '9s'")
        check_eq(conn.execute(sql).fetchone(), ("changed", "9s"), "after SET")
        conn.execute("RESET application_name")
        check_eq(conn.execute(sql).fetchone(), ("pg3-start", "9s"), "RESET application_name")
        conn.execute("SET application_name = 'changed'")
        conn.execute("RESET ALL")
        check_eq(conn.execute(sql).fetchone(), ("pg3-start", "3s"), "RESET ALL")


def main():
    runner = Runner("psycopg")
    runner.run("prepared_concurrent", prepared_concurrent)
    runner.run("same_name_different_sql", same_name_different_sql)
    runner.run("deallocate_reprepare", deallocate_reprepare)
    runner.run("ddl_between_executions", ddl_between_executions)
    runner.run("session_state", session_state)
    runner.run("errors_recover", errors_recover)
    runner.run("pipeline_100", pipeline_100)
    runner.run("copy_in_out", copy_in_out)
    runner.run("transactions", transactions)
    runner.run("listen_notify", listen_notify)
    runner.run("startup_params", startup_params)
    runner.finish()


if __name__ == "__main__":
    main()
