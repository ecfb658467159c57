// pgjdbc scenarios through HeliosProxy (or PostgreSQL itself), run by tests/e2e_drivers.rs as
//   java -cp /usr/share/java/postgresql.jar tests/drivers/java/Scenarios.java
//
// Connections use prepareThreshold=1, so a PreparedStatement is a named server-side
// statement (S_1, S_2, ... counted per connection) from its first execution; plain
// Statements use the unnamed statement. executeBatch sends every Parse/Bind/Execute and one
// Sync at the end.
//
// Environment: HELIOS_HOST, HELIOS_PORT, HELIOS_USER, HELIOS_PASSWORD, HELIOS_DB, HELIOS_TAG
// (suffix for table/channel names), HELIOS_TIMEOUT_SECS (overall bound, default 120),
// HELIOS_ONLY (comma-separated scenario names), HELIOS_KNOWN_GAPS (comma-separated scenarios
// known to fail on this target: their failure prints `xfail NAME: reason` and does not count,
// and their passing is a failure, so the list is kept up to date).

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.List;
import java.util.Locale;
import java.util.Objects;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class Scenarios {
    static final String HOST = env("HELIOS_HOST", "127.0.0.1");
    static final String PORT = env("HELIOS_PORT", "5432");
    static final String USER = env("HELIOS_USER", "helios");
    static final String PASSWORD = env("HELIOS_PASSWORD", "");
    static final String DB = env("HELIOS_DB", "app");
    static final String TAG = env("HELIOS_TAG", "local").toLowerCase(Locale.ROOT).replaceAll("[^a-z0-9_]", "_");
    static final long TIMEOUT_SECS = Long.parseLong(env("HELIOS_TIMEOUT_SECS", "120"));
    static final Set<String> ONLY = new HashSet<>();
    static final Set<String> KNOWN_GAPS = new HashSet<>();
    /**
     * What RESET and RESET ALL return to without startup parameters for them: the server
     * defaults of application_name, search_path and statement_timeout (PostgreSQL's built-in
     * ones). pgjdbc sets its ApplicationName with SET after start-up unless told the server
     * version (assumeMinServerVersion), so RESET clears it.
     */
    static final List<Object> SERVER_DEFAULTS = Arrays.asList("", "\"$user\", public", "0");
    static final String DRIVER = "jdbc";
    static final int STEP_TIMEOUT_SECS = 30;
    static volatile String current = "start-up";

    static String env(String key, String fallback) {
        String v = System.getenv(key);
        return v == null || v.isEmpty() ? fallback : v;
    }

    static String name(String what) {
        return "drv_" + DRIVER + "_" + TAG + "_" + what;
    }

    interface Scenario {
        String run() throws Exception;
    }

    interface Worker {
        void run(int id, Connection conn, CyclicBarrier barrier) throws Exception;
    }

    static Connection connect() throws SQLException {
        return connect(new Properties());
    }

    static Connection connect(Properties extra) throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", USER);
        p.setProperty("password", PASSWORD);
        p.setProperty("prepareThreshold", "1");
        p.setProperty("connectTimeout", "10");
        p.setProperty("socketTimeout", "60");
        p.putAll(extra);
        return DriverManager.getConnection("jdbc:postgresql://" + HOST + ":" + PORT + "/" + DB, p);
    }

    static List<Connection> openAll(int count) throws SQLException {
        List<Connection> conns = new ArrayList<>();
        try {
            for (int i = 0; i < count; i++) {
                conns.add(connect());
            }
        } catch (SQLException e) {
            closeAll(conns);
            throw e;
        }
        return conns;
    }

    static void closeAll(List<Connection> conns) {
        for (Connection c : conns) {
            try {
                c.close();
            } catch (SQLException ignored) {
                // closing is best effort
            }
        }
    }

    static void check(boolean cond, String message) {
        if (!cond) {
            throw new AssertionError(message);
        }
    }

    static void checkEq(Object got, Object want, String what) {
        if (!Objects.equals(String.valueOf(got), String.valueOf(want))) {
            throw new AssertionError(what + ": got " + got + ", want " + want);
        }
    }

    interface Action {
        void run() throws Exception;
    }

    static SQLException expectError(String sqlstate, Action action, String what) throws Exception {
        try {
            action.run();
        } catch (SQLException e) {
            String got = e.getSQLState();
            if (!sqlstate.equals(got) && e.getNextException() != null) {
                got = e.getNextException().getSQLState();
            }
            if (!sqlstate.equals(got)) {
                throw new AssertionError(what + ": want SQLSTATE " + sqlstate + ", got " + got + ": " + e, e);
            }
            return e;
        }
        throw new AssertionError(what + ": want SQLSTATE " + sqlstate + ", but it succeeded");
    }

    static List<List<Object>> rows(ResultSet rs) throws SQLException {
        List<List<Object>> out = new ArrayList<>();
        int n = rs.getMetaData().getColumnCount();
        while (rs.next()) {
            List<Object> row = new ArrayList<>();
            for (int i = 1; i <= n; i++) {
                row.add(rs.getObject(i));
            }
            out.add(row);
        }
        rs.close();
        return out;
    }

    static List<List<Object>> query(PreparedStatement ps, Object... args) throws SQLException {
        for (int i = 0; i < args.length; i++) {
            ps.setObject(i + 1, args[i]);
        }
        return rows(ps.executeQuery());
    }

    static Object one(PreparedStatement ps, Object... args) throws SQLException {
        return query(ps, args).get(0).get(0);
    }

    static Object one(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement()) {
            return rows(st.executeQuery(sql)).get(0).get(0);
        }
    }

    static List<List<Object>> rowsOf(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement()) {
            return rows(st.executeQuery(sql));
        }
    }

    static void exec(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement()) {
            st.execute(sql);
        }
    }

    static void freshTable(Connection c, String table, String columns) throws SQLException {
        exec(c, "DROP TABLE IF EXISTS " + table);
        exec(c, "CREATE TABLE " + table + " (" + columns + ")");
    }

    static List<Object> row(Object... values) {
        return Arrays.asList(values);
    }

    /** Runs worker(i, conns[i], barrier) on one thread per connection; rethrows the first failure. */
    static void parallel(List<Connection> conns, Worker worker) throws Exception {
        CyclicBarrier barrier = new CyclicBarrier(conns.size());
        ExecutorService pool = Executors.newFixedThreadPool(conns.size());
        try {
            List<Future<Object>> futures = new ArrayList<>();
            for (int i = 0; i < conns.size(); i++) {
                final int id = i;
                futures.add(pool.submit(() -> {
                    try {
                        worker.run(id, conns.get(id), barrier);
                    } catch (Exception | AssertionError e) {
                        barrier.reset(); // wake the others: they fail with BrokenBarrierException
                        throw e;
                    }
                    return null;
                }));
            }
            Throwable first = null;
            for (Future<Object> f : futures) {
                try {
                    f.get(STEP_TIMEOUT_SECS * 4L, TimeUnit.SECONDS);
                } catch (java.util.concurrent.ExecutionException e) {
                    Throwable cause = e.getCause();
                    boolean broken = cause instanceof java.util.concurrent.BrokenBarrierException;
                    if (first == null || (first instanceof java.util.concurrent.BrokenBarrierException && !broken)) {
                        first = cause;
                    }
                }
            }
            if (first instanceof Exception) {
                throw (Exception) first;
            } else if (first != null) {
                throw (Error) first;
            }
        } finally {
            pool.shutdownNow();
        }
    }

    static void await(CyclicBarrier barrier) throws Exception {
        barrier.await(STEP_TIMEOUT_SECS, TimeUnit.SECONDS);
    }

    // a. The same prepared statement on 8 connections at once, interleaved round by round.
    static String preparedConcurrent() throws Exception {
        List<Connection> conns = openAll(8);
        int rounds = 8;
        try {
            parallel(conns, (cid, c, barrier) -> {
                try (PreparedStatement shared = c.prepareStatement("SELECT ?::int * 1000 + ?::int");
                     PreparedStatement own = c.prepareStatement("SELECT ?::int + " + cid)) {
                    for (int r = 0; r < rounds; r++) {
                        await(barrier);
                        checkEq(one(shared, r, cid), r * 1000 + cid, "conn " + cid + " round " + r + " shared");
                        checkEq(one(own, r), r + cid, "conn " + cid + " round " + r + " own SQL");
                        checkEq(one(shared, cid, r), cid * 1000 + r, "conn " + cid + " round " + r + " again");
                    }
                }
            });
        } finally {
            closeAll(conns);
        }
        return (8 * rounds * 3) + " prepared executions on 8 connections";
    }

    // b. Fresh connections name their statements S_1, S_2, ... so different SQL collides on
    // the same names across connections.
    static String sameNameDifferentSql() throws Exception {
        String alpha = "SELECT 'alpha-' || ?::text";
        String len = "SELECT length(?::text) * 10";
        List<Connection> conns = openAll(2);
        try {
            Connection a = conns.get(0);
            Connection b = conns.get(1);
            try (PreparedStatement a1 = a.prepareStatement(alpha); PreparedStatement b1 = b.prepareStatement(len);
                 PreparedStatement a2 = a.prepareStatement(len); PreparedStatement b2 = b.prepareStatement(alpha)) {
                // a: S_1 = alpha, S_2 = length; b: S_1 = length, S_2 = alpha.
                checkEq(one(a1, "x"), "alpha-x", "a first");
                checkEq(one(b1, "xyz"), 30, "b first");
                checkEq(one(a2, "xy"), 20, "a second");
                checkEq(one(b2, "q"), "alpha-q", "b second");
                parallel(conns, (id, c, barrier) -> {
                    PreparedStatement p1 = id == 0 ? a1 : b1;
                    PreparedStatement p2 = id == 0 ? a2 : b2;
                    for (int i = 0; i < 20; i++) {
                        await(barrier);
                        String word = "w".repeat(i + 1);
                        Object want1 = id == 0 ? "alpha-" + word : 10 * word.length();
                        checkEq(one(p1, word), want1, "conn " + id + " round " + i + " first statement");
                        Object want2 = id == 0 ? 10 * String.valueOf(i).length() : "alpha-" + i;
                        checkEq(one(p2, String.valueOf(i)), want2, "conn " + id + " round " + i + " second");
                    }
                });
            }
        } finally {
            closeAll(conns);
        }
        return null;
    }

    // c. DEALLOCATE ALL (pgjdbc notices the command tag and re-prepares), and statement-cache
    // evictions, which pgjdbc closes with a protocol Close.
    static String deallocateReprepare() throws Exception {
        try (Connection c = connect(); PreparedStatement times3 = c.prepareStatement("SELECT ?::int * 3")) {
            for (int i = 0; i < 3; i++) {
                checkEq(one(times3, i), i * 3, "before DEALLOCATE ALL");
            }
            exec(c, "DEALLOCATE ALL");
            for (int i = 0; i < 3; i++) {
                checkEq(one(times3, i), i * 3, "after DEALLOCATE ALL");
            }
            try (PreparedStatement times5 = c.prepareStatement("SELECT ?::int * 5")) {
                checkEq(one(times5, 4), 20, "new SQL after DEALLOCATE ALL");
            }
            expectError("26000", () -> exec(c, "EXECUTE helios_c_missing"), "unknown statement");
            checkEq(one(times3, 5), 15, "usable after 26000");
        }
        Properties small = new Properties();
        small.setProperty("preparedStatementCacheQueries", "2");
        try (Connection c = connect(small)) {
            for (int r = 0; r < 5; r++) {
                for (int k = 0; k < 6; k++) {
                    try (PreparedStatement ps = c.prepareStatement("SELECT ?::int + " + k)) {
                        checkEq(one(ps, r), r + k, "evicting cache round " + r + " query " + k);
                    }
                }
            }
        }
        return null;
    }

    // d. A table's shape changes between executions of a prepared SELECT *. pgjdbc retries
    // once on "cached plan must not change result type" outside a transaction.
    static String ddlBetweenExecutions() throws Exception {
        String table = name("ddl");
        String sql = "SELECT * FROM " + table + " ORDER BY id";
        List<Connection> conns = openAll(3);
        try {
            Connection a = conns.get(0);
            Connection b = conns.get(1);
            Connection other = conns.get(2);
            freshTable(other, table, "id int");
            exec(other, "INSERT INTO " + table + " VALUES (1)");
            try (PreparedStatement pa = a.prepareStatement(sql); PreparedStatement pb = b.prepareStatement(sql)) {
                checkEq(query(pa), List.of(row(1)), "a before");
                checkEq(query(pb), List.of(row(1)), "b before");
                checkEq(query(pa), List.of(row(1)), "a before, prepared");
                exec(a, "ALTER TABLE " + table + " ADD COLUMN extra text DEFAULT 'x'");
                checkEq(query(pa), List.of(row(1, "x")), "a after its own ALTER");
                exec(other, "ALTER TABLE " + table + " ADD COLUMN more int DEFAULT 7");
                checkEq(query(pb), List.of(row(1, "x", 7)), "b after another connection's ALTER");
                checkEq(query(pa), List.of(row(1, "x", 7)), "a after another connection's ALTER");
                for (int i = 0; i < 3; i++) {
                    checkEq(query(pa), List.of(row(1, "x", 7)), "a again");
                    checkEq(query(pb), List.of(row(1, "x", 7)), "b again");
                }
            }
            exec(other, "DROP TABLE " + table);
        } finally {
            closeAll(conns);
        }
        return null;
    }

    // e. Session state per connection, checked in many autocommit transactions while the
    // other connections set different values at the same time.
    static String sessionState() throws Exception {
        int rounds = 15;
        List<Connection> conns = openAll(4);
        String settingsSql = "SELECT current_setting('application_name'), current_setting('search_path'),"
            + " current_setting('statement_timeout')";
        try {
            parallel(conns, (i, c, barrier) -> {
                try (PreparedStatement settings = c.prepareStatement(settingsSql);
                     PreparedStatement setConfig = c.prepareStatement("SELECT set_config('search_path', ?, false)")) {
                    List<Object> defaults = SERVER_DEFAULTS;
                    await(barrier);
                    String app = "jdbc-" + i;
                    String timeout = (i + 1) + "s";
                    String path = "sp" + i + ", public";
                    exec(c, "SET application_name = '" + app + "'");
                    exec(c, "SET search_path = sp" + i + ", public");
                    exec(c, "SET statement_timeout = '" + timeout + "'");
                    for (int r = 0; r < rounds; r++) {
                        await(barrier);
                        if (r == rounds / 2) {
                            checkEq(one(setConfig, "cfg" + i), "cfg" + i, "set_config result");
                            path = "cfg" + i;
                        }
                        checkEq(query(settings).get(0), row(app, path, timeout), "conn " + i + " round " + r);
                        checkEq(one(c, "SHOW application_name"), app, "conn " + i + " SHOW");
                        if (r == 3) {
                            c.setAutoCommit(false);
                            exec(c, "SET application_name = 'rolled-back'");
                            checkEq(one(c, "SHOW application_name"), "rolled-back", "in transaction");
                            c.rollback();
                            c.setAutoCommit(true);
                            checkEq(one(c, "SHOW application_name"), app, "after ROLLBACK");
                        }
                        if (r == 5) {
                            c.setAutoCommit(false);
                            exec(c, "SET LOCAL statement_timeout = '7s'");
                            checkEq(one(c, "SHOW statement_timeout"), "7s", "SET LOCAL");
                            c.commit();
                            c.setAutoCommit(true);
                            checkEq(one(c, "SHOW statement_timeout"), timeout, "SET LOCAL after COMMIT");
                        }
                    }
                    await(barrier);
                    exec(c, "RESET search_path");
                    checkEq(query(settings).get(0), row(app, defaults.get(1), timeout), "RESET search_path");
                    exec(c, "RESET ALL");
                    checkEq(query(settings).get(0), defaults, "RESET ALL");
                    await(barrier);
                    for (int r = 0; r < 3; r++) {
                        checkEq(query(settings).get(0), defaults, "defaults stay, round " + r);
                    }
                }
            });
        } finally {
            closeAll(conns);
        }
        return null;
    }

    // f. Errors: in an explicit transaction (status E), and inside a batch.
    static String errorsRecover() throws Exception {
        String table = name("batcherr");
        try (Connection c = connect(); PreparedStatement sel = c.prepareStatement("SELECT ?::int");
             PreparedStatement div = c.prepareStatement("SELECT 1 / ?::int")) {
            c.setAutoCommit(false);
            checkEq(one(sel, 1), 1, "in transaction");
            expectError("22012", () -> one(div, 0), "division");
            expectError("25P02", () -> one(sel, 2), "prepared after the error");
            expectError("25P02", () -> one(c, "SELECT 2"), "plain statement after the error");
            c.rollback();
            c.setAutoCommit(true);
            checkEq(one(sel, 3), 3, "after ROLLBACK");

            freshTable(c, table, "id int primary key");
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + table + " VALUES (?)")) {
                for (int id : new int[] {1, 1, 2}) {
                    ins.setInt(1, id);
                    ins.addBatch();
                }
                SQLException e = expectError("23505", ins::executeBatch, "batch with a duplicate");
                check(e instanceof BatchUpdateException, "not a BatchUpdateException: " + e);
                // Autocommit: the batch ran in one implicit transaction up to its Sync.
                checkEq(one(c, "SELECT count(*)::int FROM " + table), 0, "rows after failed batch");
                for (int id = 10; id < 20; id++) {
                    ins.setInt(1, id);
                    ins.addBatch();
                }
                checkEq(Arrays.stream(ins.executeBatch()).sum(), 10, "later batch update counts");
            }
            checkEq(one(c, "SELECT count(*)::int FROM " + table), 10, "rows after later batch");
            exec(c, "DROP TABLE " + table);
        }
        return null;
    }

    // g. executeBatch: 100 inserts in one round trip, also inside an explicit transaction.
    static String pipeline100() throws Exception {
        String table = name("batch");
        try (Connection c = connect()) {
            freshTable(c, table, "id int, v text");
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + table + " VALUES (?, ?)")) {
                for (int i = 0; i < 100; i++) {
                    ins.setInt(1, i);
                    ins.setString(2, "v" + i);
                    ins.addBatch();
                }
                int[] counts = ins.executeBatch();
                checkEq(counts.length, 100, "update counts");
                checkEq(Arrays.stream(counts).sum(), 100, "rows reported");
                c.setAutoCommit(false);
                for (int i = 100; i < 200; i++) {
                    ins.setInt(1, i);
                    ins.setString(2, "tx");
                    ins.addBatch();
                }
                ins.executeBatch();
                c.commit();
                c.setAutoCommit(true);
            }
            checkEq(rowsOf(c, "SELECT count(*)::int, sum(id)::int FROM " + table).get(0), row(200, 19900),
                "rows inserted by the batches");
            try (Statement st = c.createStatement()) {
                for (int i = 0; i < 20; i++) {
                    st.addBatch("UPDATE " + table + " SET v = 'u' WHERE id = " + i);
                }
                checkEq(Arrays.stream(st.executeBatch()).sum(), 20, "statement batch");
            }
            exec(c, "DROP TABLE " + table);
        }
        return null;
    }

    // h. COPY FROM STDIN and COPY TO STDOUT with CopyManager, and a failed COPY.
    static String copyInOut() throws Exception {
        String table = name("copy");
        try (Connection c = connect()) {
            freshTable(c, table, "id int, name text");
            CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder in = new StringBuilder();
            for (int i = 0; i < 2000; i++) {
                in.append(i).append('\t').append("name-").append(i).append('\n');
            }
            long copied = copy.copyIn("COPY " + table + " (id, name) FROM STDIN", new StringReader(in.toString()));
            checkEq(copied, 2000, "COPY FROM row count");
            checkEq(rowsOf(c, "SELECT count(*)::int, sum(id)::int FROM " + table).get(0), row(2000, 1999000),
                "rows after COPY FROM");
            StringWriter out = new StringWriter();
            long exported = copy.copyOut("COPY (SELECT id, name FROM " + table + " ORDER BY id) TO STDOUT", out);
            checkEq(exported, 2000, "COPY TO row count");
            String[] lines = out.toString().split("\n");
            checkEq(lines.length, 2000, "COPY TO lines");
            checkEq(lines[0] + "|" + lines[1999], "0\tname-0|1999\tname-1999", "first and last line");
            expectError("22P02", () -> copy.copyIn("COPY " + table + " FROM STDIN",
                new StringReader("1\tok\nnot-a-number\tbad\n")), "COPY with a bad row");
            checkEq(one(c, "SELECT count(*)::int FROM " + table), 2000, "failed COPY added nothing");
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int + 1")) {
                checkEq(one(ps, 1), 2, "usable after failed COPY");
            }
            exec(c, "DROP TABLE " + table);
        }
        return null;
    }

    // i. Transactions: visibility on commit, nothing after rollback, savepoints.
    static String transactions() throws Exception {
        String table = name("tx");
        List<Connection> conns = openAll(2);
        try {
            Connection a = conns.get(0);
            Connection b = conns.get(1);
            freshTable(a, table, "id int");
            String count = "SELECT count(*)::int FROM " + table;
            try (PreparedStatement ins = a.prepareStatement("INSERT INTO " + table + " VALUES (?)");
                 PreparedStatement countA = a.prepareStatement(count);
                 PreparedStatement countB = b.prepareStatement(count)) {
                a.setAutoCommit(false);
                ins.setInt(1, 1);
                ins.executeUpdate();
                ins.setInt(1, 2);
                ins.executeUpdate();
                checkEq(one(countA), 2, "own rows inside the transaction");
                checkEq(one(countB), 0, "other connection before COMMIT");
                a.commit();
                checkEq(one(countB), 2, "other connection after COMMIT");
                ins.setInt(1, 3);
                ins.executeUpdate();
                checkEq(one(countA), 3, "own row before ROLLBACK");
                a.rollback();
                checkEq(one(countA), 2, "after ROLLBACK");
                checkEq(one(countB), 2, "other connection after ROLLBACK");
                ins.setInt(1, 10);
                ins.executeUpdate();
                java.sql.Savepoint sp = a.setSavepoint();
                ins.setInt(1, 11);
                ins.executeUpdate();
                expectError("22012", () -> one(a, "SELECT 1 / 0"), "error after savepoint");
                a.rollback(sp);
                ins.setInt(1, 12);
                ins.executeUpdate();
                a.commit();
                a.setAutoCommit(true);
            }
            checkEq(rowsOf(b, "SELECT id FROM " + table + " ORDER BY id"), List.of(row(1), row(2), row(10), row(12)),
                "after savepoint rollback and COMMIT");
            exec(a, "DROP TABLE " + table);
        } finally {
            closeAll(conns);
        }
        return null;
    }

    // j. LISTEN on one connection, NOTIFY from another.
    static String listenNotify() throws Exception {
        String channel = name("chan");
        List<Connection> conns = openAll(2);
        try {
            Connection listener = conns.get(0);
            Connection notifier = conns.get(1);
            exec(listener, "LISTEN " + channel);
            for (int i = 0; i < 3; i++) {
                exec(notifier, "NOTIFY " + channel + ", 'hello-" + i + "'");
            }
            try (PreparedStatement ps = notifier.prepareStatement("SELECT pg_notify(?, ?)")) {
                ps.setString(1, channel);
                ps.setString(2, "via-function");
                ps.executeQuery().close();
            }
            PGConnection pg = listener.unwrap(PGConnection.class);
            List<String> got = new ArrayList<>();
            long deadline = System.currentTimeMillis() + 10_000;
            while (got.size() < 4 && System.currentTimeMillis() < deadline) {
                PGNotification[] batch = pg.getNotifications(500);
                if (batch != null) {
                    for (PGNotification n : batch) {
                        got.add(n.getName() + ":" + n.getParameter());
                    }
                }
            }
            checkEq(got, List.of(channel + ":hello-0", channel + ":hello-1", channel + ":hello-2",
                channel + ":via-function"), "notifications");
            try (PreparedStatement ps = listener.prepareStatement("SELECT ?::int")) {
                checkEq(one(ps, 9), 9, "listener query");
            }
            exec(notifier, "NOTIFY " + channel + ", 'after-query'");
            got.clear();
            deadline = System.currentTimeMillis() + 10_000;
            while (got.isEmpty() && System.currentTimeMillis() < deadline) {
                PGNotification[] batch = pg.getNotifications(500);
                if (batch != null) {
                    for (PGNotification n : batch) {
                        got.add(n.getParameter());
                    }
                }
            }
            checkEq(got, List.of("after-query"), "notification after a query");
        } finally {
            closeAll(conns);
        }
        return null;
    }

    // k. Startup parameters (application_name, options=-c ...) are what RESET returns to.
    static String startupParams() throws Exception {
        Properties p = new Properties();
        p.setProperty("ApplicationName", "jdbc-start");
        p.setProperty("assumeMinServerVersion", "9.0"); // application_name in the startup packet
        p.setProperty("options", "-c statement_timeout=3s");
        String sql = "SELECT current_setting('application_name'), current_setting('statement_timeout')";
        try (Connection c = connect(p)) {
            checkEq(rowsOf(c, sql).get(0), row("jdbc-start", "3s"), "startup values");
            exec(c, "SET application_name = 'changed'");
            exec(c, "SET statement_timeout = '9s'");
            checkEq(rowsOf(c, sql).get(0), row("changed", "9s"), "after SET");
            exec(c, "RESET application_name");
            checkEq(rowsOf(c, sql).get(0), row("jdbc-start", "9s"), "RESET application_name");
            exec(c, "SET application_name = 'changed'");
            exec(c, "RESET ALL");
            checkEq(rowsOf(c, sql).get(0), row("jdbc-start", "3s"), "RESET ALL");
        }
        return null;
    }

    public static void main(String[] args) throws Exception {
        for (String s : env("HELIOS_ONLY", "").split(",")) {
            if (!s.isEmpty()) {
                ONLY.add(s);
            }
        }
        for (String s : env("HELIOS_KNOWN_GAPS", "").split(",")) {
            if (!s.isEmpty()) {
                KNOWN_GAPS.add(s);
            }
        }
        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(TIMEOUT_SECS * 1000);
            } catch (InterruptedException e) {
                return;
            }
            System.out.println("FAIL " + current + ": timed out (pgjdbc: whole run exceeded " + TIMEOUT_SECS + " s)");
            System.out.flush();
            Runtime.getRuntime().halt(3);
        });
        watchdog.setDaemon(true);
        watchdog.start();

        Object[][] scenarios = {
            {"prepared_concurrent", (Scenario) Scenarios::preparedConcurrent},
            {"same_name_different_sql", (Scenario) Scenarios::sameNameDifferentSql},
            {"deallocate_reprepare", (Scenario) Scenarios::deallocateReprepare},
            {"ddl_between_executions", (Scenario) Scenarios::ddlBetweenExecutions},
            {"session_state", (Scenario) Scenarios::sessionState},
            {"errors_recover", (Scenario) Scenarios::errorsRecover},
            {"pipeline_100", (Scenario) Scenarios::pipeline100},
            {"copy_in_out", (Scenario) Scenarios::copyInOut},
            {"transactions", (Scenario) Scenarios::transactions},
            {"listen_notify", (Scenario) Scenarios::listenNotify},
            {"startup_params", (Scenario) Scenarios::startupParams},
        };
        long started = System.nanoTime();
        int passed = 0;
        int failed = 0;
        for (Object[] s : scenarios) {
            String scenario = (String) s[0];
            if (!ONLY.isEmpty() && !ONLY.contains(scenario)) {
                continue;
            }
            current = scenario;
            long t0 = System.nanoTime();
            boolean gap = KNOWN_GAPS.contains(scenario);
            try {
                String note = ((Scenario) s[1]).run();
                if (gap) {
                    System.out.println("FAIL " + scenario + ": passed although listed in HELIOS_KNOWN_GAPS; "
                        + "remove it from the known gaps in tests/e2e_drivers.rs");
                    failed++;
                    continue;
                }
                System.out.printf("ok %s%s [%.2fs]%n", scenario, note == null ? "" : " (" + note + ")",
                    (System.nanoTime() - t0) / 1e9);
                passed++;
            } catch (Exception | AssertionError e) {
                if (gap) {
                    System.out.println("xfail " + scenario + ": " + String.valueOf(e).replace('\n', ' ')
                        + " (known gap, in HELIOS_KNOWN_GAPS)");
                    passed++;
                    continue;
                }
                System.out.println("FAIL " + scenario + ": " + String.valueOf(e).replace('\n', ' '));
                e.printStackTrace(System.err);
                failed++;
            }
            System.out.flush();
        }
        System.out.printf("summary pgjdbc: %d ok, %d failed in %.1fs%n", passed, failed, (System.nanoTime() - started) / 1e9);
        System.out.flush();
        Runtime.getRuntime().halt(failed > 0 ? 1 : 0);
    }
}
