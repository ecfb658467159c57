//! Functions a query may call and still be sent to a standby.

use std::collections::{HashMap, HashSet};

/// Built-in functions (in `pg_catalog`) that neither write nor take locks nor assign a
/// transaction id. Sorted, lower case: looked up by binary search. Deliberately absent:
/// nextval, setval, set_config, txid_current, pg_current_xact_id, pg_advisory_*,
/// lo_*, dblink*.
const BUILTIN: &[&str] = &[
    "abs",
    "age",
    "any_value",
    "array_agg",
    "array_append",
    "array_cat",
    "array_dims",
    "array_fill",
    "array_length",
    "array_lower",
    "array_position",
    "array_positions",
    "array_prepend",
    "array_remove",
    "array_replace",
    "array_to_json",
    "array_to_string",
    "array_upper",
    "ascii",
    "avg",
    "bit_and",
    "bit_length",
    "bit_or",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "cbrt",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "chr",
    "clock_timestamp",
    "coalesce",
    "col_description",
    "concat",
    "concat_ws",
    "corr",
    "count",
    "covar_pop",
    "covar_samp",
    "cume_dist",
    "current_database",
    "current_schema",
    "current_schemas",
    "current_setting",
    "currval",
    "date",
    "date_bin",
    "date_part",
    "date_trunc",
    "daterange",
    "decode",
    "degrees",
    "dense_rank",
    "div",
    "encode",
    "every",
    "exp",
    "extract",
    "first_value",
    "floor",
    "format",
    "format_type",
    "gen_random_uuid",
    "generate_series",
    "generate_subscripts",
    "greatest",
    "has_column_privilege",
    "has_database_privilege",
    "has_function_privilege",
    "has_schema_privilege",
    "has_table_privilege",
    "inet_client_addr",
    "inet_client_port",
    "inet_server_addr",
    "inet_server_port",
    "initcap",
    "int4range",
    "int8range",
    "isfinite",
    "json_agg",
    "json_array_elements",
    "json_array_elements_text",
    "json_array_length",
    "json_build_array",
    "json_build_object",
    "json_each",
    "json_each_text",
    "json_extract_path",
    "json_extract_path_text",
    "json_object_agg",
    "json_object_keys",
    "json_populate_record",
    "json_to_record",
    "json_to_recordset",
    "json_typeof",
    "jsonb_agg",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "jsonb_array_length",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_each",
    "jsonb_each_text",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_insert",
    "jsonb_object_agg",
    "jsonb_object_keys",
    "jsonb_path_exists",
    "jsonb_path_match",
    "jsonb_path_query",
    "jsonb_path_query_array",
    "jsonb_path_query_first",
    "jsonb_populate_record",
    "jsonb_pretty",
    "jsonb_set",
    "jsonb_strip_nulls",
    "jsonb_to_record",
    "jsonb_to_recordset",
    "jsonb_typeof",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "lag",
    "last_value",
    "lead",
    "least",
    "left",
    "length",
    "ln",
    "log",
    "log10",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "make_interval",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "max",
    "md5",
    "min",
    "mod",
    "mode",
    "now",
    "nth_value",
    "ntile",
    "nullif",
    "num_nonnulls",
    "num_nulls",
    "numrange",
    "obj_description",
    "octet_length",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "pg_backend_pid",
    "pg_column_size",
    "pg_conf_load_time",
    "pg_current_snapshot",
    "pg_current_wal_lsn",
    "pg_database_size",
    "pg_get_constraintdef",
    "pg_get_expr",
    "pg_get_indexdef",
    "pg_get_serial_sequence",
    "pg_get_userbyid",
    "pg_get_viewdef",
    "pg_has_role",
    "pg_indexes_size",
    "pg_is_in_recovery",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_postmaster_start_time",
    "pg_relation_size",
    "pg_size_pretty",
    "pg_sleep",
    "pg_table_is_visible",
    "pg_table_size",
    "pg_total_relation_size",
    "pg_typeof",
    "pg_wal_lsn_diff",
    "pi",
    "plainto_tsquery",
    "position",
    "power",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "radians",
    "random",
    "rank",
    "regexp_count",
    "regexp_instr",
    "regexp_like",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "regexp_substr",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "row_number",
    "row_to_json",
    "rpad",
    "rtrim",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "sign",
    "split_part",
    "sqrt",
    "starts_with",
    "statement_timestamp",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "string_to_array",
    "strpos",
    "substr",
    "substring",
    "sum",
    "timeofday",
    "to_char",
    "to_date",
    "to_hex",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_regclass",
    "to_regtype",
    "to_timestamp",
    "to_tsquery",
    "to_tsvector",
    "transaction_timestamp",
    "translate",
    "trim",
    "trunc",
    "ts_headline",
    "ts_rank",
    "tsrange",
    "tstzrange",
    "txid_current_snapshot",
    "unnest",
    "upper",
    "var_pop",
    "var_samp",
    "variance",
    "version",
    "websearch_to_tsquery",
    "width_bucket",
];

/// Longest function name worth looking up: PostgreSQL truncates names to 63 bytes.
const MAX_NAME: usize = 64;

/// Functions a SELECT may call and still count as read-only: the built-in list plus the
/// configured extras. A bare extra (`f`) matches `f` in any schema; a qualified one
/// (`s.f`) only `s.f`. Names compare case-insensitively.
#[derive(Clone, Debug, Default)]
pub struct ReadOnlyFunctions {
    bare: HashSet<String>,
    qualified: HashMap<String, HashSet<String>>,
}

impl ReadOnlyFunctions {
    /// The built-in list plus `extra` (names as configured, case-insensitive;
    /// schema-qualified like "myschema.f" or bare "f"; double quotes are dropped).
    pub fn new(extra: &[String]) -> Self {
        let mut functions = ReadOnlyFunctions::default();
        for name in extra {
            let name: String = name
                .trim()
                .chars()
                .filter(|c| *c != '"')
                .collect::<String>()
                .to_ascii_lowercase();
            match name.rsplit_once('.') {
                Some((schema, f)) if !schema.is_empty() && !f.is_empty() => {
                    functions
                        .qualified
                        .entry(schema.to_string())
                        .or_default()
                        .insert(f.to_string());
                }
                Some(_) => {}
                None if !name.is_empty() => {
                    functions.bare.insert(name);
                }
                None => {}
            }
        }
        functions
    }

    /// Whether `schema.name` (or the unqualified `name`) is known to be read-only.
    pub fn contains(&self, schema: Option<&str>, name: &str) -> bool {
        let mut name_buf = [0u8; MAX_NAME];
        let Some(name) = lower(name, &mut name_buf) else {
            return false;
        };
        let builtin_schema = match schema {
            None => true,
            Some(s) => s.eq_ignore_ascii_case("pg_catalog"),
        };
        if builtin_schema && BUILTIN.binary_search(&name).is_ok() {
            return true;
        }
        if self.bare.contains(name) {
            return true;
        }
        let mut schema_buf = [0u8; MAX_NAME];
        match schema.and_then(|s| lower(s, &mut schema_buf)) {
            Some(schema) => self
                .qualified
                .get(schema)
                .is_some_and(|names| names.contains(name)),
            None => false,
        }
    }
}

/// `s` in ASCII lower case, in `buf`; None when it does not fit.
fn lower<'b>(s: &str, buf: &'b mut [u8; MAX_NAME]) -> Option<&'b str> {
    let out = buf.get_mut(..s.len())?;
    out.copy_from_slice(s.as_bytes());
    out.make_ascii_lowercase();
    std::str::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_list_is_sorted_and_unique() {
        assert!(BUILTIN.windows(2).all(|w| w[0] < w[1]));
        assert!(BUILTIN.iter().all(|f| f.len() < MAX_NAME));
    }

    #[test]
    fn builtins_match_bare_or_in_pg_catalog() {
        let f = ReadOnlyFunctions::new(&[]);
        assert!(f.contains(None, "count"));
        assert!(f.contains(None, "NOW"));
        assert!(f.contains(Some("PG_CATALOG"), "pg_is_in_recovery"));
        assert!(f.contains(None, "currval"));
        assert!(f.contains(None, "pg_current_wal_lsn"));
        assert!(!f.contains(Some("public"), "count"));
        for writer in [
            "nextval",
            "setval",
            "set_config",
            "txid_current",
            "pg_advisory_lock",
            "pg_advisory_xact_lock",
            "lo_create",
            "dblink_exec",
        ] {
            assert!(!f.contains(None, writer), "{writer}");
        }
        assert!(!f.contains(None, &"x".repeat(200)));
    }

    #[test]
    fn extras_match_as_configured() {
        let f = ReadOnlyFunctions::new(&[
            "My_Func".to_string(),
            "reports.Summary".to_string(),
            "\"Quoted\".f2".to_string(),
            "".to_string(),
            ".".to_string(),
        ]);
        assert!(f.contains(None, "my_func"));
        assert!(f.contains(Some("any"), "MY_FUNC"));
        assert!(f.contains(Some("REPORTS"), "summary"));
        assert!(!f.contains(None, "summary"));
        assert!(!f.contains(Some("other"), "summary"));
        assert!(f.contains(Some("quoted"), "f2"));
    }
}
