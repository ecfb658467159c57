#!/usr/bin/env python3
"""The result cache through HeliosProxy with psycopg 3 and asyncpg.

Each scenario reads the proxy's `GET /cache` (HELIOS_ADMIN_PORT) to tell hits from
misses. Run by tests/e2e_cache.rs against a proxy with `[cache] enabled = true`; see
common.py for the environment it reads.
"""

import asyncio
import json
import os
import urllib.request

import asyncpg
import psycopg

from common import DB, HOST, PASSWORD, PORT, USER, Runner, check, check_eq, name

DRIVER = "cache"
ADMIN_PORT = int(os.environ["HELIOS_ADMIN_PORT"])


def cache():
    with urllib.request.urlopen(f"http://{HOST}:{ADMIN_PORT}/cache", timeout=10) as r:
        return json.loads(r.read())


def hits():
    return cache()["hits"]


def pg():
    return psycopg.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, dbname=DB,
                           autocommit=True, connect_timeout=10)


async def apg():
    return await asyncpg.connect(host=HOST, port=PORT, user=USER, password=PASSWORD,
                                 database=DB, timeout=10)


def setup(table, rows=10):
    with pg() as c:
        c.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
        c.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL)")
        c.execute(f"INSERT INTO {table} SELECT g, g FROM generate_series(1, {rows}) g")


def psycopg_hits():
    """Repeated reads, simple and server-side prepared (past prepare_threshold), are
    answered from the cache with the same rows."""
    table = name(DRIVER, "psy_hits")
    setup(table)
    with pg() as c:
        before = hits()
        sql = f"SELECT id, v FROM {table} WHERE id <= %s ORDER BY id"
        first = c.execute(sql, (5,)).fetchall()
        for _ in range(12):
            check_eq(c.execute(sql, (5,)).fetchall(), first, "cached rows")
        got = hits() - before
        check(got >= 8, f"only {got} of 13 reads were cache hits: {cache()}")
        # Binary results are another entry, with the same values.
        with c.cursor(binary=True) as cur:
            for _ in range(3):
                check_eq(cur.execute(sql, (5,)).fetchall(), first, "binary rows")
    return f"{got} hits"


def psycopg_writes():
    """Every kind of write from another connection is seen by the next read."""
    table = name(DRIVER, "psy_w")
    setup(table, 3)
    read = f"SELECT coalesce(sum(v), 0) FROM {table}"
    with pg() as reader, pg() as writer:
        def settled():
            for _ in range(3):
                reader.execute(read).fetchone()

        steps = [
            (f"INSERT INTO {table} VALUES (10, 100)", 106),
            (f"UPDATE {table} SET v = v + 1 WHERE id = 10", 107),
            (f"DELETE FROM {table} WHERE id = 10", 6),
            (f"MERGE INTO {table} t USING (SELECT 1 AS id) s ON t.id = s.id "
             f"WHEN MATCHED THEN UPDATE SET v = 50", 55),
            (f"TRUNCATE {table}", 0),
        ]
        for write, want in steps:
            settled()
            writer.execute(write)
            check_eq(reader.execute(read).fetchone()[0], want, f"after {write}")
        settled()
        with writer.cursor().copy(f"COPY {table} (id, v) FROM STDIN") as copy:
            copy.write_row((1, 7))
            copy.write_row((2, 8))
        check_eq(reader.execute(read).fetchone()[0], 15, "after COPY FROM")
        settled()
        with writer.transaction():
            writer.execute(f"UPDATE {table} SET v = 0")
        check_eq(reader.execute(read).fetchone()[0], 0, "after a committed transaction")
        settled()
        try:
            with writer.transaction():
                writer.execute(f"UPDATE {table} SET v = 99")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        check_eq(reader.execute(read).fetchone()[0], 0, "after a rolled-back transaction")


def psycopg_volatile():
    """Volatile and stable functions, built-in or the user's, are never cached."""
    fn = name(DRIVER, "psy_vol")
    with pg() as c:
        c.execute(f"CREATE OR REPLACE FUNCTION {fn}() RETURNS float8 LANGUAGE sql VOLATILE "
                  f"AS 'SELECT random()'")
        before = hits()
        for sql in ["SELECT random()", "SELECT clock_timestamp()", f"SELECT {fn}()"]:
            seen = {c.execute(sql).fetchone()[0] for _ in range(5)}
            check_eq(len(seen), 5, f"distinct answers to {sql}")
        check_eq(hits() - before, 0, "cache hits for volatile functions")


def psycopg_search_path():
    """search_path is part of the key: the same text reads each session's own table."""
    schema1, schema2 = name(DRIVER, "sp1"), name(DRIVER, "sp2")
    with pg() as c:
        for schema, value in ((schema1, 1), (schema2, 2)):
            c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            c.execute(f"CREATE SCHEMA {schema}")
            c.execute(f"CREATE TABLE {schema}.t (v int)")
            c.execute(f"INSERT INTO {schema}.t VALUES ({value})")
    with pg() as a, pg() as b:
        a.execute(f"SET search_path = {schema1}")
        b.execute(f"SET search_path = {schema2}")
        for _ in range(4):
            check_eq(a.execute("SELECT v FROM t").fetchone()[0], 1, "first schema")
            check_eq(b.execute("SELECT v FROM t").fetchone()[0], 2, "second schema")


def psycopg_l3():
    """A literal and psycopg's bound parameter (text, unknown type) share one entry."""
    table = name(DRIVER, "psy_l3")
    with pg() as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute(f"CREATE TABLE {table} (id int, who text)")
        c.execute(f"INSERT INTO {table} VALUES (1, 'bob'), (2, 'eve')")
        for _ in range(2):
            check_eq(c.execute(f"SELECT id FROM {table} WHERE who = 'bob'").fetchall(),
                     [(1,)], "literal")
        before = cache()["l3"]["hits"]
        check_eq(c.execute(f"SELECT id FROM {table} WHERE who = %s", ("bob",)).fetchall(),
                 [(1,)], "bound parameter")
        check_eq(c.execute(f"SELECT id FROM {table} WHERE who = %s", ("eve",)).fetchall(),
                 [(2,)], "another value")
        got = cache()["l3"]["hits"] - before
        check_eq(got, 1, f"L3 hits: {cache()}")


async def asyncpg_hits_and_writes():
    """asyncpg (named statements, binary results): hits, and writes seen at once."""
    table = name(DRIVER, "apg")
    setup(table)
    reader, writer = await apg(), await apg()
    try:
        before = hits()
        for _ in range(10):
            check_eq(await reader.fetchval(f"SELECT v FROM {table} WHERE id = $1", 3), 3,
                     "cached value")
        got = hits() - before
        check(got >= 6, f"only {got} of 10 reads were cache hits: {cache()}")
        for i in range(5):
            await writer.execute(f"UPDATE {table} SET v = $1 WHERE id = 3", 100 + i)
            check_eq(await reader.fetchval(f"SELECT v FROM {table} WHERE id = $1", 3),
                     100 + i, "after an UPDATE")
            await reader.fetchval(f"SELECT v FROM {table} WHERE id = $1", 3)
        await writer.copy_records_to_table(table, records=[(20, 1)], columns=["id", "v"])
        check_eq(await reader.fetchval(f"SELECT count(*) FROM {table}"), 11, "after COPY")
        check_eq(await reader.fetchval(f"SELECT count(*) FROM {table}"), 11, "cached count")
        await writer.execute(f"DELETE FROM {table} WHERE id = 20")
        check_eq(await reader.fetchval(f"SELECT count(*) FROM {table}"), 10, "after DELETE")
    finally:
        await reader.close()
        await writer.close()
    return f"{got} hits"


async def asyncpg_race():
    """Writers and readers at once: no read returns a value older than one whose
    UPDATE was already acknowledged when the read began."""
    table = name(DRIVER, "race")
    setup(table, 1)
    acked = [0]
    stale = []
    stop = asyncio.Event()

    async def write(conn, rounds):
        for _ in range(rounds):
            v = await conn.fetchval(f"UPDATE {table} SET v = v + 1 WHERE id = 1 RETURNING v")
            acked[0] = max(acked[0], v)

    async def read(conn):
        while not stop.is_set():
            floor = acked[0]
            v = await conn.fetchval(f"SELECT v FROM {table} WHERE id = $1", 1)
            if v < floor:
                stale.append((v, floor))

    writers = [await apg() for _ in range(2)]
    readers = [await apg() for _ in range(4)]
    before = hits()
    try:
        tasks = [asyncio.create_task(read(r)) for r in readers]
        await asyncio.wait_for(asyncio.gather(*(write(w, 150) for w in writers)), 60)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        for c in writers + readers:
            await c.close()
    check(not stale, f"stale reads: {stale[:5]}")
    got = hits() - before
    check(got > 0, f"the race never hit the cache: {cache()}")
    return f"{got} hits"


def main():
    runner = Runner(DRIVER)
    runner.run("psycopg_hits", psycopg_hits)
    runner.run("psycopg_writes", psycopg_writes)
    runner.run("psycopg_volatile", psycopg_volatile)
    runner.run("psycopg_search_path", psycopg_search_path)
    runner.run("psycopg_l3", psycopg_l3)
    runner.run("asyncpg_hits_and_writes", lambda: asyncio.run(asyncpg_hits_and_writes()))
    runner.run("asyncpg_race", lambda: asyncio.run(asyncpg_race()))
    runner.finish()


if __name__ == "__main__":
    main()
