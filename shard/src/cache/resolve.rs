//! What a statement reads and writes, in the server's own terms, learned once per
//! statement shape (per database and session settings) with one catalog query on the
//! client's connection, right after a unit that used the shape.
//!
//! The names come from the routing analysis of the text; the catalog turns them into
//! tables: names resolve through the session's search_path (`to_regclass`), views
//! expand to the tables their rules read (recursively, through `pg_depend`), and every
//! table folds to the roots of its inheritance tree, so a write to a partition and a
//! read of its parent meet in one slot. Functions count as immutable only when every
//! function of that name the session can see is.

use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::backend::{BackendConn, BackendError, Rows};
use crate::codec::frontend;
use crate::config::CacheConfig;
use crate::engine::settings::text_array;
use crate::sql::{RouteAnalysis, TableRef};

/// What the catalog says about one statement shape.
#[derive(Debug)]
pub struct Resolved {
    /// The shape is a lone statement that only reads (but for the functions it calls,
    /// which `refusal` judges): the only kind whose results may be cached.
    pub readable: bool,
    /// The session's transactions are READ COMMITTED by default (the server's word).
    pub read_committed: bool,
    /// Why results of this shape are not cached (`None`: they are).
    pub refusal: Option<String>,
    /// Slots of the tables a read depends on.
    pub reads: Box<[u32]>,
    /// What a write of this shape may change.
    pub writes: Reach,
    /// The time to live of its results (the shortest of its tables' overrides).
    pub ttl: Option<Duration>,
    /// The catalog epoch it was learned at: DDL makes it stale.
    pub catalog: u64,
    pub learned: Instant,
}

/// What a write may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// These table slots (its tables and those whose foreign keys point at them).
    Tables(Box<[u32]>),
    /// Anything: triggers, rules, user functions, views, DDL, names not resolved.
    Everything,
}

/// How long a resolution is trusted even without DDL through the proxy (a view
/// redefined directly on the server is learned again within this time).
pub const RESOLUTION_LIFETIME: Duration = Duration::from_secs(60);

/// The catalog query. `$1`: relation names as SQL identifiers; `$2`, `$3`: function
/// schemas ('' when unqualified) and names; `$4`: CTE names, which may hide tables of
/// the same name (counted in when they resolve); `$5`: operator names. One row per
/// fact: ('refuse', reason), ('missing', relation), ('read', root oid), ('write', root
/// oid), ('name', 'schema.table', root oid), ('unlogged', relation), ('unknown', what),
/// ('isolation', the session's default transaction isolation).
const RESOLVE_SQL: &str = "WITH RECURSIVE \
named AS (SELECT r, pg_catalog.to_regclass(r)::pg_catalog.oid AS oid, false AS optional \
  FROM pg_catalog.unnest($1::pg_catalog.text[]) AS r \
  UNION ALL SELECT r, pg_catalog.to_regclass(r)::pg_catalog.oid, true \
  FROM pg_catalog.unnest($4::pg_catalog.text[]) AS r), \
used(oid) AS (SELECT oid FROM named WHERE oid IS NOT NULL \
  UNION SELECT d.refobjid FROM used u \
  JOIN pg_catalog.pg_rewrite w ON w.ev_class = u.oid \
  JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
   AND d.objid = w.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
   AND d.refobjid <> u.oid), \
down(oid) AS (SELECT oid FROM used \
  UNION SELECT i.inhrelid FROM down JOIN pg_catalog.pg_inherits i ON i.inhparent = down.oid), \
rels AS (SELECT c.oid, c.relkind, c.relpersistence, c.relrowsecurity, c.relhasrules, \
  n.nspname::pg_catalog.text || '.' || c.relname::pg_catalog.text AS name \
  FROM down u JOIN pg_catalog.pg_class c ON c.oid = u.oid \
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace), \
refs(oid) AS (SELECT k.conrelid FROM pg_catalog.pg_constraint k \
  WHERE k.contype = 'f' AND k.confrelid IN (SELECT oid FROM used) \
  UNION SELECT k.conrelid FROM refs JOIN pg_catalog.pg_constraint k \
  ON k.contype = 'f' AND k.confrelid = refs.oid), \
up(oid, anc, side) AS (SELECT oid, oid, 'read' FROM used \
  UNION SELECT oid, oid, 'write' FROM refs \
  UNION SELECT up.oid, i.inhparent, up.side FROM up \
  JOIN pg_catalog.pg_inherits i ON i.inhrelid = up.anc), \
roots AS (SELECT up.oid, up.anc, up.side FROM up \
  JOIN pg_catalog.pg_class c ON c.oid = up.anc AND c.relkind IN ('r', 'p') \
  WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhrelid = up.anc)), \
procs AS (SELECT f.s, f.f, p.provolatile, p.pronamespace \
  FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.text[]), \
   pg_catalog.unnest($3::pg_catalog.text[])) AS f(s, f) \
  LEFT JOIN pg_catalog.pg_proc p ON p.proname = f.f AND p.pronamespace IN \
   (SELECT n.oid FROM pg_catalog.pg_namespace n WHERE CASE WHEN f.s = '' \
    THEN n.nspname = ANY (pg_catalog.current_schemas(true)) ELSE n.nspname = f.s END)), \
view_procs AS (SELECT p.proname, p.provolatile, p.pronamespace FROM used u \
  JOIN pg_catalog.pg_rewrite w ON w.ev_class = u.oid \
  JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
   AND d.objid = w.oid AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass \
  JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid), \
user_ops AS (SELECT o.oprname, p.provolatile FROM pg_catalog.pg_operator o \
  JOIN pg_catalog.pg_proc p ON p.oid = o.oprcode \
  WHERE o.oprnamespace <> 'pg_catalog'::pg_catalog.regnamespace \
   AND (o.oprname = ANY ($5::pg_catalog.text[]) OR o.oid IN (SELECT d.refobjid FROM used u \
    JOIN pg_catalog.pg_rewrite w ON w.ev_class = u.oid \
    JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass \
     AND d.objid = w.oid AND d.refclassid = 'pg_catalog.pg_operator'::pg_catalog.regclass))) \
SELECT 'missing', r, NULL FROM named WHERE oid IS NULL AND NOT optional \
UNION ALL SELECT 'refuse', 'relation ' || name || CASE \
  WHEN relkind = 'm' THEN ' is a materialized view' \
  WHEN relkind = 'f' THEN ' is a foreign table' \
  WHEN relkind = 'S' THEN ' is a sequence' \
  WHEN relpersistence = 't' THEN ' is temporary' \
  WHEN relrowsecurity THEN ' has row security' \
  ELSE ' is a system catalog' END, NULL FROM rels \
  WHERE relkind NOT IN ('r', 'p', 'v') OR relpersistence = 't' OR relrowsecurity \
   OR name LIKE 'pg\\_catalog.%' OR name LIKE 'information\\_schema.%' OR name LIKE 'pg\\_toast.%' \
UNION ALL SELECT 'refuse', 'function ' || f || CASE WHEN provolatile IS NULL \
  THEN ' is not known' ELSE ' is not immutable' END, NULL FROM procs \
  WHERE provolatile IS DISTINCT FROM 'i' \
UNION ALL SELECT 'refuse', 'function ' || proname || ' (in a view) is not immutable', NULL \
  FROM view_procs WHERE provolatile <> 'i' \
UNION ALL SELECT 'refuse', 'operator ' || oprname || ' calls a function that is not immutable', \
  NULL FROM user_ops WHERE provolatile <> 'i' \
UNION ALL SELECT 'refuse', 'view ' || name || ' reads the clock or the session', NULL FROM rels \
  WHERE relkind = 'v' AND pg_catalog.pg_get_viewdef(oid) ~* \
  '(current_(date|time|timestamp|user|role|schema|catalog)|localtime|session_user|''(now|today|tomorrow|yesterday)'')' \
UNION ALL SELECT DISTINCT side, anc::pg_catalog.text, NULL FROM roots \
UNION ALL SELECT DISTINCT 'name', r.name, t.anc::pg_catalog.text FROM rels r \
  JOIN roots t ON t.oid = r.oid AND t.side = 'read' \
UNION ALL SELECT 'unlogged', name, NULL FROM rels WHERE relpersistence = 'u' \
UNION ALL SELECT 'unknown', 'trigger on ' || c.relname, NULL FROM pg_catalog.pg_class c \
  WHERE (c.oid IN (SELECT oid FROM down) OR c.oid IN (SELECT oid FROM refs)) \
   AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal) \
UNION ALL SELECT 'unknown', 'relation ' || name || ' is not a table', NULL FROM rels \
  WHERE relkind NOT IN ('r', 'p') OR relhasrules \
UNION ALL SELECT 'unknown', 'function ' || f, NULL FROM procs \
  WHERE provolatile IS NULL \
   OR (provolatile = 'v' AND pronamespace <> 'pg_catalog'::pg_catalog.regnamespace) \
UNION ALL SELECT 'unknown', 'operator ' || oprname, NULL FROM user_ops WHERE provolatile = 'v' \
UNION ALL SELECT 'unknown', 'a column default calls ' || p.proname, NULL \
  FROM pg_catalog.pg_attrdef a \
  JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass \
   AND d.objid = a.oid AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass \
  JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid \
  WHERE a.adrelid IN (SELECT oid FROM down) AND p.provolatile = 'v' \
   AND p.pronamespace <> 'pg_catalog'::pg_catalog.regnamespace \
UNION ALL SELECT 'isolation', pg_catalog.current_setting('default_transaction_isolation'), NULL";

/// Asks the server about the statement `analysis` describes, on `backend` (idle, with
/// the session's settings).
pub async fn resolve(
    backend: &mut BackendConn,
    analysis: &RouteAnalysis,
    sql: &Learning,
    database: &str,
    config: &CacheConfig,
    catalog: u64,
    buf: &mut [u8],
) -> Result<Option<(Resolved, Vec<(String, u32)>)>, BackendError> {
    let relations = text_array(analysis.tables.iter().map(qualified_identifier));
    let ctes = text_array(analysis.cte_names.iter().map(qualified_identifier));
    let operators = text_array(&sql.operators);
    let schemas = text_array(
        analysis
            .functions
            .iter()
            .map(|f| f.schema.clone().unwrap_or_default()),
    );
    let names = text_array(analysis.functions.iter().map(|f| &f.name));
    let mut request = Vec::with_capacity(RESOLVE_SQL.len() + 256);
    frontend::encode_parse(&mut request, "", RESOLVE_SQL, &[25, 25, 25, 25, 25]);
    frontend::encode_bind_text(
        &mut request,
        "",
        "",
        &[
            Some(relations.as_bytes()),
            Some(schemas.as_bytes()),
            Some(names.as_bytes()),
            Some(ctes.as_bytes()),
            Some(operators.as_bytes()),
        ],
    );
    frontend::encode_execute(&mut request, "", 0);
    frontend::encode_sync(&mut request);
    let (rows, error) = backend.fetch(&request, 1, buf).await?;
    if let Some(error) = error {
        log::debug!(target: "heliosdb_proxy::cache", "could not resolve a statement's tables: {error}");
        return Ok(None);
    }
    Ok(Some(digest(rows, analysis, sql, database, config, catalog)))
}

/// What the text itself says beyond its routing analysis, gathered when the shape is
/// first seen.
#[derive(Debug, Default, Clone)]
pub struct Learning {
    /// Operators the text uses (a user's operator may call any function).
    pub operators: Vec<String>,
    /// A string constant PostgreSQL reads as the current time (`'now'`, `'today'`, …).
    pub time_literal: bool,
}

impl Learning {
    pub fn of(sql: &[u8]) -> Learning {
        Learning {
            operators: super::key::operators(sql),
            time_literal: time_literal(sql),
        }
    }
}

/// Whether a quoted constant of `sql` is one of the special date/time inputs that mean
/// "now" (`'now'`, `'today'`, `'tomorrow'`, `'yesterday'`, with any spacing or case).
fn time_literal(sql: &[u8]) -> bool {
    let mut lexer = crate::sql::lexer::Lexer::new(sql);
    while let Some(token) = lexer.next() {
        if token != crate::sql::lexer::Token::Other {
            continue;
        }
        let text = &sql[lexer.token_start()..lexer.offset()];
        let Some(inner) = text.strip_prefix(b"'").and_then(|t| t.strip_suffix(b"'")) else {
            continue;
        };
        let word = String::from_utf8_lossy(inner).trim().to_ascii_lowercase();
        if matches!(word.as_str(), "now" | "today" | "tomorrow" | "yesterday") {
            return true;
        }
    }
    false
}

/// Turns the catalog's rows into a resolution (and the names it learned).
fn digest(
    rows: Rows,
    analysis: &RouteAnalysis,
    sql: &Learning,
    database: &str,
    config: &CacheConfig,
    catalog: u64,
) -> (Resolved, Vec<(String, u32)>) {
    let mut refusal = None;
    let mut reads = Vec::new();
    let mut write_slots = Vec::new();
    // Text the analysis could not follow to its end reaches anything.
    let mut unknown = !analysis.dml_only || analysis.too_deep;
    let mut names = Vec::new();
    let mut read_committed = false;
    let oid_slot = |text: &str| {
        text.parse::<u32>()
            .ok()
            .map(|oid| super::slot(database, oid))
    };
    for row in rows {
        let field = |i: usize| row.get(i).and_then(|v| v.as_deref()).unwrap_or("");
        match field(0) {
            "refuse" => {
                refusal.get_or_insert_with(|| field(1).to_string());
            }
            "read" => {
                if let Some(slot) = oid_slot(field(1)) {
                    push_unique(&mut reads, slot);
                    push_unique(&mut write_slots, slot);
                }
            }
            "write" => {
                if let Some(slot) = oid_slot(field(1)) {
                    push_unique(&mut write_slots, slot);
                }
            }
            "name" => {
                if let Some(slot) = oid_slot(field(2)) {
                    names.push((field(1).to_string(), slot));
                }
            }
            "unknown" => unknown = true,
            "missing" => {
                // A write to a name that does not resolve reaches who knows what.
                unknown = true;
                refusal.get_or_insert_with(|| format!("relation {} does not exist", field(1)));
            }
            "isolation" => {
                read_committed = matches!(field(1), "read committed" | "read uncommitted")
            }
            // Changes to an unlogged table never reach the WAL.
            "unlogged" if config.invalidation == crate::config::CacheInvalidation::Wal => {
                refusal.get_or_insert_with(|| {
                    format!(
                        "relation {} is unlogged (its changes are not in the WAL)",
                        field(1)
                    )
                });
            }
            _ => {}
        }
    }
    if analysis.value_functions || sql.time_literal {
        refusal.get_or_insert_with(|| "it reads the clock or the session user".to_string());
    }
    if analysis.too_deep {
        refusal.get_or_insert_with(|| "it nests deeper than the analysis follows".to_string());
    }
    let mut ttl =
        (config.default_ttl_secs > 0).then(|| Duration::from_secs(config.default_ttl_secs));
    for table in &config.tables {
        let Some((name, _)) = names
            .iter()
            .find(|(name, _)| super::table_name_matches(&table.name, name))
        else {
            continue;
        };
        if !table.cache {
            refusal.get_or_insert_with(|| format!("caching is off for table {name}"));
        }
        // 0, like default_ttl_secs = 0, sets no time limit.
        if let Some(secs) = table.ttl_secs.filter(|secs| *secs > 0) {
            let own = Duration::from_secs(secs);
            ttl = Some(ttl.map_or(own, |t| t.min(own)));
        }
    }
    let writes = if unknown {
        Reach::Everything
    } else {
        Reach::Tables(write_slots.into())
    };
    let resolved = Resolved {
        readable: analysis.reads_but_for_calls && analysis.dml_only && analysis.statements == 1,
        read_committed,
        refusal,
        reads: reads.into(),
        writes,
        ttl,
        catalog,
        learned: Instant::now(),
    };
    (resolved, names)
}

fn push_unique(slots: &mut Vec<u32>, slot: u32) {
    if !slots.contains(&slot) {
        slots.push(slot);
    }
}

/// A relation name as SQL text `to_regclass` reads back exactly.
fn qualified_identifier(table: &TableRef) -> String {
    match &table.schema {
        Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&table.name)),
        None => quote_ident(&table.name),
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether a resolution may still be used.
pub fn current(resolved: &Rc<Resolved>, catalog: u64) -> bool {
    resolved.catalog == catalog && resolved.learned.elapsed() < RESOLUTION_LIFETIME
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(fields: &[Option<&str>]) -> Vec<Option<String>> {
        fields.iter().map(|f| f.map(str::to_string)).collect()
    }

    fn analysis() -> RouteAnalysis {
        RouteAnalysis {
            read_only: true,
            reads_but_for_calls: true,
            dml_only: true,
            statements: 1,
            ..Default::default()
        }
    }

    #[test]
    fn time_literals_are_found_in_constants_only() {
        assert!(time_literal(
            b"SELECT * FROM t WHERE d > 'now'::timestamptz"
        ));
        assert!(time_literal(b"SELECT date ' Today '"));
        assert!(!time_literal(b"SELECT now_col FROM t WHERE x = 'nowhere'"));
    }

    #[test]
    fn names_quote_and_arrays_escape() {
        let t = TableRef {
            schema: Some("My\"S".into()),
            name: "t".into(),
        };
        assert_eq!(qualified_identifier(&t), "\"My\"\"S\".\"t\"");
        assert_eq!(text_array(["a\"b", "c\\d"]), "{\"a\\\"b\",\"c\\\\d\"}");
    }

    #[test]
    fn rows_become_slots_refusals_and_ttls() {
        let config = CacheConfig {
            default_ttl_secs: 60,
            tables: vec![crate::config::CacheTableConfig {
                name: "orders".into(),
                ttl_secs: Some(5),
                cache: true,
            }],
            ..Default::default()
        };
        let rows = vec![
            row(&[Some("read"), Some("100"), None]),
            row(&[Some("write"), Some("200"), None]),
            row(&[Some("name"), Some("public.orders"), Some("100")]),
        ];
        let (r, names) = digest(rows, &analysis(), &Learning::default(), "db", &config, 3);
        assert_eq!(r.refusal, None);
        assert!(r.readable);
        assert_eq!(&*r.reads, &[super::super::slot("db", 100)]);
        assert_eq!(
            r.writes,
            Reach::Tables(
                vec![super::super::slot("db", 100), super::super::slot("db", 200)].into()
            )
        );
        assert_eq!(r.ttl, Some(Duration::from_secs(5)));
        assert_eq!(
            names,
            [("public.orders".to_string(), super::super::slot("db", 100))]
        );

        let rows = vec![
            row(&[
                Some("refuse"),
                Some("function random is not immutable"),
                None,
            ]),
            row(&[Some("unknown"), Some("trigger on public.t"), None]),
        ];
        let (r, _) = digest(rows, &analysis(), &Learning::default(), "db", &config, 3);
        assert_eq!(
            r.refusal.as_deref(),
            Some("function random is not immutable")
        );
        assert_eq!(r.writes, Reach::Everything);
    }
}
