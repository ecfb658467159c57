#!/usr/bin/env python3
"""asyncpg scenarios through HeliosProxy (or PostgreSQL itself).

asyncpg's statement cache is on (the default): every fetch*/execute-with-arguments prepares
a named statement (__asyncpg_stmt_N__, N counted per process) with Parse + Describe + Flush,
then runs it with Bind + Execute + Sync. Run by tests/e2e_drivers.rs; see common.py for the
environment it reads.
"""

import asyncio
import gc
import io

import asyncpg

from common import (
    DB, HOST, PASSWORD, PORT, SERVER_DEFAULTS, USER, Runner, check, check_eq, name,
    sqlstate_of,
)

DRIVER = "apg"
STEP_TIMEOUT = 30


async def connect(**extra):
    return await asyncpg.connect(
        host=HOST, port=PORT, user=USER, password=PASSWORD, database=DB, timeout=10, **extra,
    )


async def open_all(count, **extra):
    conns = []
    try:
        for _ in range(count):
            conns.append(await connect(**extra))
    except Exception:
        await close_all(conns)
        raise
    return conns


async def close_all(conns):
    for c in conns:
        await c.close(timeout=10)


async def together(*aws):
    """All steps of one round at once (interleaving the connections), bounded in time."""
    return await asyncio.wait_for(asyncio.gather(*aws), STEP_TIMEOUT)


async def expect_error(sqlstate, aw, what):
    try:
        await aw
    except asyncpg.PostgresError as exc:
        check_eq(sqlstate_of(exc), sqlstate, f"{what}: SQLSTATE ({exc!r})")
        return exc
    raise AssertionError(f"{what}: want SQLSTATE {sqlstate}, but it succeeded")


def rows_of(records):
    return [tuple(r) for r in records]


async def fresh_table(conn, table, columns):
    await conn.execute(f"DROP TABLE IF EXISTS {table}")
    await conn.execute(f"CREATE TABLE {table} ({columns})")


# a. The same prepared query on 8 connections at once, interleaved round by round.
async def prepared_concurrent():
    conns = await open_all(8)
    rounds = 8
    try:
        async def step(cid, conn, r):
            check_eq(await conn.fetchval("SELECT $1::int * 1000 + $2::int", r, cid),
                     r * 1000 + cid, f"conn {cid} round {r} shared SQL")
            check_eq(await conn.fetchval(f"SELECT $1::int + {cid}", r), r + cid,
                     f"conn {cid} round {r} own SQL")
            check_eq(await conn.fetchval("SELECT $1::int * 1000 + $2::int", cid, r),
                     cid * 1000 + r, f"conn {cid} round {r} shared SQL again")

        for r in range(rounds):
            await together(*(step(cid, c, r) for cid, c in enumerate(conns)))
    finally:
        await close_all(conns)
    return f"{8 * rounds * 3} prepared executions on 8 connections"


# b. Two connections prepare different SQL under the same names (asyncpg lets us name them).
async def same_name_different_sql():
    sql_alpha = "SELECT 'alpha-' || $1::text"
    sql_len = "SELECT length($1::text) * 10"
    a, b = await open_all(2)
    try:
        a1 = await a.prepare(sql_alpha, name="helios_same_1")
        b1 = await b.prepare(sql_len, name="helios_same_1")
        a2 = await a.prepare(sql_len, name="helios_same_2")
        b2 = await b.prepare(sql_alpha, name="helios_same_2")
        for i in range(20):
            word = "w" * (i + 1)
            # One statement per connection at a time, both connections at once.
            got = await together(a1.fetchval(word), b1.fetchval(word))
            check_eq(list(got), [f"alpha-{word}", 10 * len(word)], f"round {i}, name 1")
            got = await together(a2.fetchval(str(i)), b2.fetchval(str(i)))
            check_eq(list(got), [10 * len(str(i)), f"alpha-{i}"], f"round {i}, name 2")
    finally:
        await close_all([a, b])


# c. Close a named statement and prepare other SQL under its name; cache evictions (Close).
async def deallocate_reprepare():
    conn = await connect()
    try:
        stmt = await conn.prepare("SELECT 1 + $1::int", name="helios_c_stmt")
        check_eq(await stmt.fetchval(41), 42, "first SQL")
        del stmt
        gc.collect()
        # asyncpg closes dropped statements (Close + Sync) after preparing the next one.
        check_eq(await conn.fetchval("SELECT 'trigger-cleanup'"), "trigger-cleanup", "cleanup")
        stmt = await conn.prepare("SELECT 'x' || $1::text", name="helios_c_stmt")
        check_eq(await stmt.fetchval("41"), "x41", "second SQL under the same name")
        del stmt
        gc.collect()
        # DEALLOCATE ALL behind asyncpg's back, then drop its caches so it re-prepares.
        check_eq(await conn.fetchval("SELECT $1::int * 3", 5), 15, "cached statement")
        await conn.execute("DEALLOCATE ALL")
        await conn.reload_schema_state()
        check_eq(await conn.fetchval("SELECT $1::int * 3", 6), 18, "after DEALLOCATE ALL")
        stmt = await conn.prepare("SELECT $1::int * 100", name="helios_c_stmt")
        check_eq(await stmt.fetchval(7), 700, "third SQL under the same name")
        await expect_error("26000", conn.execute("EXECUTE helios_c_missing"), "unknown statement")
        check_eq(await stmt.fetchval(8), 800, "usable after 26000")
    finally:
        await conn.close(timeout=10)
    # A tiny statement cache: every miss evicts (closes) another statement.
    conn = await connect(statement_cache_size=3)
    try:
        for r in range(5):
            for k in range(8):
                check_eq(await conn.fetchval(f"SELECT $1::int + {k}", r), r + k,
                         f"evicting cache round {r} query {k}")
    finally:
        await conn.close(timeout=10)


# d. A table's shape changes between executions of a cached SELECT *.
async def ddl_between_executions():
    table = name(DRIVER, "ddl")
    sql = f"SELECT * FROM {table} ORDER BY id"
    a, b, other = await open_all(3)
    try:
        await fresh_table(other, table, "id int")
        await other.execute(f"INSERT INTO {table} VALUES (1)")
        check_eq(rows_of(await a.fetch(sql)), [(1,)], "a before")
        check_eq(rows_of(await b.fetch(sql)), [(1,)], "b before")
        # asyncpg re-prepares once on "cached plan must not change result type" outside
        # transactions, so no error may reach it here.
        await a.execute(f"ALTER TABLE {table} ADD COLUMN extra text DEFAULT 'x'")
        check_eq(rows_of(await a.fetch(sql)), [(1, "x")], "a after its own ALTER")
        await other.execute(f"ALTER TABLE {table} ADD COLUMN more int DEFAULT 7")
        check_eq(rows_of(await b.fetch(sql)), [(1, "x", 7)], "b after another's ALTER")
        check_eq(rows_of(await a.fetch(sql)), [(1, "x", 7)], "a after another's ALTER")
        for _ in range(3):
            got = await together(a.fetch(sql), b.fetch(sql))
            check_eq([rows_of(g) for g in got], [[(1, "x", 7)]] * 2, "a and b again")
        await other.execute(f"DROP TABLE {table}")
    finally:
        await close_all([a, b, other])


# e. Session state per connection, checked in many autocommit transactions while the
# other connections set different values at the same time.
async def session_state():
    count, rounds = 4, 15
    conns = await open_all(count)
    try:
        settings_sql = ("SELECT current_setting('application_name'),"
                        " current_setting('search_path'), current_setting('statement_timeout')")
        defaults = [SERVER_DEFAULTS] * count
        want = {}

        async def setup(i, conn):
            await conn.execute(f"SET application_name = 'apg-{i}'")
            await conn.execute(f"SET search_path = sp{i}, public")
            await conn.execute(f"SET statement_timeout = '{i + 1}s'")
            want[i] = (f"apg-{i}", f"sp{i}, public", f"{i + 1}s")

        async def step(i, conn, r):
            app, path, timeout = want[i]
            if r == rounds // 2:
                check_eq(await conn.fetchval("SELECT set_config('search_path', $1, false)",
                                             f"cfg{i}"), f"cfg{i}", "set_config result")
                path = f"cfg{i}"
                want[i] = (app, path, timeout)
            check_eq(tuple(await conn.fetchrow(settings_sql)), want[i], f"conn {i} round {r}")
            check_eq(await conn.fetchval("SHOW application_name"), app, f"conn {i} SHOW")
            if r == 3:
                tr = conn.transaction()
                await tr.start()
                await conn.execute("SET application_name = 'rolled-back'")
                check_eq(await conn.fetchval("SHOW application_name"), "rolled-back", "in tx")
                await tr.rollback()
                check_eq(await conn.fetchval("SHOW application_name"), app, "after ROLLBACK")
            if r == 5:
                async with conn.transaction():
                    await conn.execute("SET LOCAL statement_timeout = '7s'")
                    check_eq(await conn.fetchval("SHOW statement_timeout"), "7s", "SET LOCAL")
                check_eq(await conn.fetchval("SHOW statement_timeout"), timeout,
                         "SET LOCAL after COMMIT")

        async def reset(i, conn):
            app, _, timeout = want[i]
            d_app, d_path, d_timeout = defaults[i]
            await conn.execute("RESET search_path")
            check_eq(tuple(await conn.fetchrow(settings_sql)), (app, d_path, timeout),
                     "RESET search_path")
            await conn.execute("RESET ALL")
            check_eq(tuple(await conn.fetchrow(settings_sql)), defaults[i], "RESET ALL")

        async def still_default(i, conn):
            check_eq(tuple(await conn.fetchrow(settings_sql)), defaults[i], "defaults stay")

        await together(*(setup(i, c) for i, c in enumerate(conns)))
        for r in range(rounds):
            await together(*(step(i, c, r) for i, c in enumerate(conns)))
        await together(*(reset(i, c) for i, c in enumerate(conns)))
        for _ in range(3):
            await together(*(still_default(i, c) for i, c in enumerate(conns)))
    finally:
        await close_all(conns)


# f. Errors: in an explicit transaction (status E), and inside executemany.
async def errors_recover():
    table = name(DRIVER, "manyerr")
    conn = await connect()
    try:
        tr = conn.transaction()
        await tr.start()
        check_eq(await conn.fetchval("SELECT $1::int", 1), 1, "in transaction")
        await expect_error("22012", conn.fetchval("SELECT 1 / $1::int", 0), "division")
        await expect_error("25P02", conn.fetchval("SELECT $1::int", 2), "after the error")
        await expect_error("25P02", conn.execute("SELECT 2"), "simple query too")
        await tr.rollback()
        check(not conn.is_in_transaction(), "still in a transaction after ROLLBACK")
        check_eq(await conn.fetchval("SELECT $1::int", 3), 3, "after ROLLBACK")

        await fresh_table(conn, table, "id int primary key")
        await expect_error("23505", conn.executemany(
            f"INSERT INTO {table} VALUES ($1)", [(1,), (1,), (2,)]), "duplicate in executemany")
        check_eq(await conn.fetchval(f"SELECT count(*) FROM {table}"), 0,
                 "executemany is all or nothing")
        await conn.executemany(f"INSERT INTO {table} VALUES ($1)", [(i,) for i in range(10)])
        check_eq(await conn.fetchval(f"SELECT count(*) FROM {table}"), 10, "later executemany")
        await conn.execute(f"DROP TABLE {table}")
    finally:
        await conn.close(timeout=10)


# g. Pipelining: executemany sends every Bind/Execute before one Sync; fetchmany likewise.
async def pipeline_100():
    table = name(DRIVER, "pipe")
    conn = await connect()
    try:
        await fresh_table(conn, table, "id int, v text")
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)",
                               [(i, f"v{i}") for i in range(100)])
        check_eq(tuple(await conn.fetchrow(f"SELECT count(*), sum(id) FROM {table}")),
                 (100, 4950), "rows inserted by executemany")
        rows = await conn.fetchmany("SELECT $1::int * 2, $2::text", [(i, f"v{i}") for i in
                                                                     range(100)])
        check_eq(rows_of(rows), [(i * 2, f"v{i}") for i in range(100)], "fetchmany rows")
        await conn.execute(f"DROP TABLE {table}")
    finally:
        await conn.close(timeout=10)


# h. COPY: records in (binary COPY FROM STDIN), query and table out, a COPY that fails.
async def copy_in_out():
    table = name(DRIVER, "copy")
    conn = await connect()
    try:
        await fresh_table(conn, table, "id int CHECK (id >= 0), name text")
        status = await conn.copy_records_to_table(
            table, records=[(i, f"name-{i}") for i in range(2000)], columns=["id", "name"])
        check_eq(status, "COPY 2000", "copy_records_to_table status")
        check_eq(tuple(await conn.fetchrow(f"SELECT count(*), sum(id) FROM {table}")),
                 (2000, 1999000), "rows after COPY FROM")
        out = io.BytesIO()
        status = await conn.copy_from_query(
            f"SELECT id, name FROM {table} WHERE id < $1 ORDER BY id", 1000, output=out,
            format="csv")
        check_eq(status, "COPY 1000", "copy_from_query status")
        lines = out.getvalue().decode().splitlines()
        check_eq(len(lines), 1000, "COPY TO lines")
        check_eq((lines[0], lines[-1]), ("0,name-0", "999,name-999"), "first and last line")
        out = io.BytesIO()
        await conn.copy_from_table(table, output=out, format="text")
        check_eq(len(out.getvalue().splitlines()), 2000, "copy_from_table lines")
        await expect_error("23514", conn.copy_records_to_table(
            table, records=[(1, "ok"), (-1, "violates")], columns=["id", "name"]),
            "COPY with a bad row")
        check_eq(await conn.fetchval(f"SELECT count(*) FROM {table}"), 2000, "failed COPY")
        check_eq(await conn.fetchval("SELECT $1::int + 1", 1), 2, "usable after failed COPY")
        await conn.execute(f"DROP TABLE {table}")
    finally:
        await conn.close(timeout=10)


# i. Transactions: visibility on commit, nothing after rollback, savepoints.
async def transactions():
    table = name(DRIVER, "tx")
    a, b = await open_all(2)
    try:
        await fresh_table(a, table, "id int")
        count = f"SELECT count(*) FROM {table}"
        tr = a.transaction()
        await tr.start()
        await a.execute(f"INSERT INTO {table} VALUES ($1)", 1)
        await a.execute(f"INSERT INTO {table} VALUES ($1)", 2)
        check_eq(await a.fetchval(count), 2, "own rows inside the transaction")
        check_eq(await b.fetchval(count), 0, "other connection before COMMIT")
        await tr.commit()
        check_eq(await b.fetchval(count), 2, "other connection after COMMIT")
        tr = a.transaction()
        await tr.start()
        await a.execute(f"INSERT INTO {table} VALUES ($1)", 3)
        check_eq(await a.fetchval(count), 3, "own row before ROLLBACK")
        await tr.rollback()
        check_eq(await a.fetchval(count), 2, "after ROLLBACK")
        check_eq(await b.fetchval(count), 2, "other connection after ROLLBACK")
        async with a.transaction():
            await a.execute(f"INSERT INTO {table} VALUES ($1)", 10)
            try:
                async with a.transaction():
                    await a.execute(f"INSERT INTO {table} VALUES ($1)", 11)
                    await a.fetchval("SELECT 1 / $1::int", 0)
            except asyncpg.DivisionByZeroError:
                pass
            await a.execute(f"INSERT INTO {table} VALUES ($1)", 12)
        check_eq([r[0] for r in await b.fetch(f"SELECT id FROM {table} ORDER BY id")],
                 [1, 2, 10, 12], "after savepoint rollback and COMMIT")
        await a.execute(f"DROP TABLE {table}")
    finally:
        await close_all([a, b])


# j. LISTEN on one connection, NOTIFY from another.
async def listen_notify():
    channel = name(DRIVER, "chan")
    listener, notifier = await open_all(2)
    try:
        got = asyncio.Queue()
        await listener.add_listener(channel, lambda _c, _pid, ch, payload: got.put_nowait(
            (ch, payload)))
        for i in range(3):
            await notifier.execute(f"NOTIFY {channel}, 'hello-{i}'")
        await notifier.fetchval("SELECT pg_notify($1, $2)", channel, "via-function")
        received = [await asyncio.wait_for(got.get(), 10) for _ in range(4)]
        want = [(channel, f"hello-{i}") for i in range(3)] + [(channel, "via-function")]
        check_eq(received, want, "notifications")
        check_eq(await listener.fetchval("SELECT $1::int", 9), 9, "listener query")
        await notifier.execute(f"NOTIFY {channel}, 'after-query'")
        check_eq(await asyncio.wait_for(got.get(), 10), (channel, "after-query"),
                 "notification after a query")
    finally:
        await close_all([listener, notifier])


# k. Startup parameters (server_settings) are what RESET returns to.
async def startup_params():
    conn = await connect(server_settings={"application_name": "apg-start",
                                          "statement_timeout": "3s"})
    try:
        sql = "SELECT current_setting('application_name'), current_setting('statement_timeout')"
        check_eq(tuple(await conn.fetchrow(sql)), ("apg-start", "3s"), "startup values")
        await conn.execute("SET application_name = 'changed'; SET statement_timeout = '9s'")
        check_eq(tuple(await conn.fetchrow(sql)), ("changed", "9s"), "after SET")
        await conn.execute("RESET application_name")
        check_eq(tuple(await conn.fetchrow(sql)), ("apg-start", "9s"), "RESET application_name")
        await conn.execute("SET application_name = 'changed'")
        await conn.execute("RESET ALL")
        check_eq(tuple(await conn.fetchrow(sql)), ("apg-start", "3s"), "RESET ALL")
    finally:
        await conn.close(timeout=10)


# l. With the statement cache off, asyncpg parses each query as the unnamed statement and
# binds it in a later round trip (Parse/Describe/Sync, then Bind/Execute/Sync): the
# unnamed statement must survive that gap even when other connections run in between.
async def uncached_statements():
    conns = await open_all(4, statement_cache_size=0)
    try:
        async def work(i, conn):
            for r in range(25):
                got = await conn.fetchval(f"SELECT $1::int * {i + 1} + $2::int", r, i)
                check_eq(got, r * (i + 1) + i, f"conn {i} round {r}")

        await asyncio.gather(*(work(i, c) for i, c in enumerate(conns)))
    finally:
        await close_all(conns)


def main():
    runner = Runner("asyncpg")
    loop = asyncio.new_event_loop()
    scenarios = [
        ("prepared_concurrent", prepared_concurrent),
        ("same_name_different_sql", same_name_different_sql),
        ("deallocate_reprepare", deallocate_reprepare),
        ("ddl_between_executions", ddl_between_executions),
        ("session_state", session_state),
        ("errors_recover", errors_recover),
        ("pipeline_100", pipeline_100),
        ("copy_in_out", copy_in_out),
        ("transactions", transactions),
        ("listen_notify", listen_notify),
        ("startup_params", startup_params),
        ("uncached_statements", uncached_statements),
    ]
    for scenario, fn in scenarios:
        runner.run(scenario, lambda fn=fn: loop.run_until_complete(fn()))
    runner.finish()


if __name__ == "__main__":
    main()
