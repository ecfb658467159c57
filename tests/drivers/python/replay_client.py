"""A psycopg client in the middle of a multi-statement transaction when the primary is
killed (tests/e2e_replay_failover.rs): it writes and reads, says "ready", waits until the
test says the primary is gone (the file named by its last argument exists), then goes on
with the same transaction and commits. Through the proxy with failover.replay on, it must
finish without an error. Prints "done <rows>" and exits 0, or prints the error and exits 1.
"""

import os
import sys
import time

import psycopg


def main() -> int:
    port, user, password, dbname, go_file = sys.argv[1:6]
    with psycopg.connect(
        host="127.0.0.1", port=int(port), user=user, password=password, dbname=dbname
    ) as conn:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO replay_py (n) VALUES (%s)", (1,))
            cur.execute("INSERT INTO replay_py (n) VALUES (%s)", (2,))
            cur.execute("SELECT count(*) FROM replay_py")
            print("ready", cur.fetchone()[0], flush=True)
            deadline = time.monotonic() + 60
            while not os.path.exists(go_file):
                if time.monotonic() > deadline:
                    print("never told to go on", flush=True)
                    return 1
                time.sleep(0.05)
            cur.execute("INSERT INTO replay_py (n) VALUES (%s)", (3,))
            cur.execute("SELECT count(*) FROM replay_py")
            rows = cur.fetchone()[0]
        conn.commit()
    print("done", rows, flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - the test reads what went wrong
        print("error", type(e).__name__, getattr(e, "sqlstate", None), e, flush=True)
        sys.exit(1)
