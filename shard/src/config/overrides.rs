//! `HELIOS_` environment overrides, applied to the parsed TOML document before it is
//! deserialised so they go through exactly the same type checks and validation as the file.
//!
//! `HELIOS_POOL_MODE__MAX_POOL_SIZE=50` sets `pool_mode.max_pool_size`: the name after the
//! prefix is lower-cased and split on `__`; a numeric segment indexes `[[users]]` or
//! `[[nodes]]` (an existing element, or the next one to append it). Keys are checked
//! against the shape of [`Config`], so a misspelt variable is an error instead of being
//! silently ignored.

use toml::{Table, Value};

use super::{AuthMethod, Config, ConfigError, NodeConfig, UserConfig, ENV_PREFIX};

/// Applies every `HELIOS_` variable in `env` to `document`; other variables are ignored.
/// Overrides are applied in key order, array indices compared as numbers, so the
/// environment's arbitrary order cannot matter (`nodes__0` is created before `nodes__1`).
pub(super) fn apply(
    document: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let schema = schema();
    let mut overrides: Vec<Override> = env
        .into_iter()
        .filter_map(|(name, value)| Override::from_env(name, value))
        .collect();
    overrides.sort_by_cached_key(Override::sort_key);
    for target in &overrides {
        set(document, &schema, &target.segments, target)
            .map_err(|problem| ConfigError::new(target.variable.as_str(), problem))?;
    }
    Ok(())
}

/// One `HELIOS_` variable: the key path it names and the raw value.
struct Override {
    variable: String,
    /// Lower-cased path segments: `["nodes", "0", "port"]`.
    segments: Vec<String>,
    /// The path as written in messages: `nodes[0].port`.
    path: String,
    raw: String,
}

impl Override {
    fn from_env(variable: String, raw: String) -> Option<Override> {
        let key = variable.strip_prefix(ENV_PREFIX)?;
        let segments: Vec<String> = key.to_lowercase().split("__").map(str::to_string).collect();
        Some(Override {
            path: render(&segments),
            segments,
            variable,
            raw,
        })
    }

    /// Orders paths segment by segment, numeric segments by value.
    fn sort_key(&self) -> Vec<(Option<usize>, String)> {
        self.segments
            .iter()
            .map(|segment| (segment.parse().ok(), segment.clone()))
            .collect()
    }
}

/// `nodes[0].port` for the segments `nodes`, `0`, `port`.
fn render(segments: &[String]) -> String {
    let mut path = String::new();
    for segment in segments {
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            path.push_str(&format!("[{segment}]"));
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(segment);
        }
    }
    path
}

/// Every settable key with a value of its type: the defaults, plus one fully populated
/// element for each array of tables so element keys can be checked too.
fn schema() -> Table {
    let mut schema = to_table(Config::default());
    let user = UserConfig {
        password: Some(String::new()),
        auth_method: Some(AuthMethod::default()),
        server_user: Some(String::new()),
        server_password: Some(String::new()),
        ..UserConfig::default()
    };
    let node = NodeConfig {
        name: Some(String::new()),
        ..NodeConfig::default()
    };
    schema.insert(
        "users".into(),
        Value::Array(vec![Value::Table(to_table(user))]),
    );
    schema.insert(
        "nodes".into(),
        Value::Array(vec![Value::Table(to_table(node))]),
    );
    schema
}

/// Config types serialise to tables by construction (plain structs of scalars).
fn to_table(value: impl serde::Serialize) -> Table {
    Table::try_from(value).expect("config structs serialise to TOML tables")
}

/// Sets the key at `segments` (what is left of the target's path) in `document`, walking
/// `schema` in step. Returns the problem as text; the caller names the variable.
fn set(
    document: &mut Table,
    schema: &Table,
    segments: &[String],
    target: &Override,
) -> Result<(), String> {
    let no_such_key = || format!("no configuration key `{}`", target.path);
    let (key, rest) = segments.split_first().ok_or_else(no_such_key)?;
    let expected = schema.get(key).ok_or_else(no_such_key)?;
    match (expected, rest.is_empty()) {
        (Value::Table(_) | Value::Array(_), true) => Err(format!(
            "`{}` is a section; override one of its keys",
            target.path
        )),
        (_, true) => {
            document.insert(key.clone(), override_value(&target.raw, expected));
            Ok(())
        }
        (Value::Table(sub_schema), false) => {
            let entry = document
                .entry(key.clone())
                .or_insert_with(|| Value::Table(Table::new()));
            let Value::Table(sub_document) = entry else {
                return Err(format!("`{key}` in the file is not a table"));
            };
            set(sub_document, sub_schema, rest, target)
        }
        (Value::Array(elements), false) => match elements.first() {
            Some(Value::Table(element_schema)) => {
                set_in_element(document, key, element_schema, rest, target)
            }
            _ => Err(no_such_key()),
        },
        (_, false) => Err(no_such_key()),
    }
}

/// Continues [`set`] inside element `segments[0]` of the array of tables `key`. The index
/// may name an element the file defines or the next one, which is appended; so a whole
/// node or user can come from the environment alone.
fn set_in_element(
    document: &mut Table,
    key: &str,
    element_schema: &Table,
    segments: &[String],
    target: &Override,
) -> Result<(), String> {
    let (index_text, rest) = segments
        .split_first()
        .ok_or_else(|| format!("`{key}` is a section; override one of its keys"))?;
    let index: usize = index_text.parse().map_err(|_| {
        format!("`{key}` is an array: expected an element number, found `{index_text}`")
    })?;
    if rest.is_empty() {
        return Err(format!(
            "`{}` is a section; override one of its keys",
            target.path
        ));
    }
    let entry = document
        .entry(key)
        .or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(elements) = entry else {
        return Err(format!("`{key}` in the file is not an array of tables"));
    };
    if index == elements.len() {
        elements.push(Value::Table(Table::new()));
    }
    let defined = elements.len();
    match elements.get_mut(index) {
        Some(Value::Table(element)) => set(element, element_schema, rest, target),
        Some(_) => Err(format!("`{key}[{index}]` in the file is not a table")),
        None => Err(format!(
            "`{key}[{index}]` does not exist: there are {defined} [[{key}]] tables, \
             so the next one is {key}[{defined}]"
        )),
    }
}

/// The override's value: a TOML scalar when it parses as one (`50`, `true`, `"quoted"`),
/// else the text itself. Keys that hold strings always take the text as it is, so a
/// password such as `12345` stays a string.
fn override_value(raw: &str, expected: &Value) -> Value {
    match (expected, parse_scalar(raw)) {
        (Value::String(_), Some(Value::String(text))) => Value::String(text),
        (Value::String(_), _) | (_, None) => Value::String(raw.to_string()),
        (_, Some(value)) => value,
    }
}

/// `raw` as a single TOML scalar, or `None` if it is not exactly one.
fn parse_scalar(raw: &str) -> Option<Value> {
    let mut table: Table = format!("value = {raw}").parse().ok()?;
    if table.len() != 1 {
        return None;
    }
    match table.remove("value")? {
        Value::Table(_) | Value::Array(_) => None,
        scalar => Some(scalar),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_parse_as_toml() {
        assert_eq!(parse_scalar("50"), Some(Value::Integer(50)));
        assert_eq!(parse_scalar("true"), Some(Value::Boolean(true)));
        assert_eq!(parse_scalar("\"x y\""), Some(Value::String("x y".into())));
        assert_eq!(parse_scalar("0.0.0.0:6432"), None);
        assert_eq!(parse_scalar("[1, 2]"), None);
        assert_eq!(parse_scalar("{ a = 1 }"), None);
        assert_eq!(parse_scalar("1\nlisten_address = \"x\""), None);
    }

    #[test]
    fn string_keys_keep_text() {
        let string = Value::String(String::new());
        let number = Value::Integer(0);
        assert_eq!(
            override_value("12345", &string),
            Value::String("12345".into())
        );
        assert_eq!(
            override_value("\"quoted\"", &string),
            Value::String("quoted".into())
        );
        assert_eq!(override_value("12345", &number), Value::Integer(12345));
        assert_eq!(
            override_value("many", &number),
            Value::String("many".into())
        );
    }

    #[test]
    fn paths_render_with_indices() {
        let segments = |s: &str| s.split("__").map(str::to_string).collect::<Vec<_>>();
        assert_eq!(render(&segments("nodes__0__port")), "nodes[0].port");
        assert_eq!(
            render(&segments("pool_mode__max_pool_size")),
            "pool_mode.max_pool_size"
        );
        assert_eq!(render(&segments("workers")), "workers");
    }

    #[test]
    fn schema_covers_every_section_and_element_key() {
        let schema = schema();
        for section in ["pool_mode", "auth", "limits", "timeouts"] {
            assert!(
                schema.get(section).is_some_and(Value::is_table),
                "{section}"
            );
        }
        let element_keys = |array: &str| -> Vec<String> {
            schema[array].as_array().unwrap()[0]
                .as_table()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        assert_eq!(element_keys("users").len(), 5);
        assert_eq!(element_keys("nodes").len(), 6);
    }
}
