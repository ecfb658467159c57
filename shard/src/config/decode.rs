//! TOML text to a document, and a document to [`Config`], with serde's errors turned into
//! [`ConfigError`]s that name the key (`nodes[1].port`) rather than a byte span.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::{Table, Value};

use super::{Config, ConfigError, NodeConfig, UserConfig};

/// Parses TOML syntax only; key names and types are checked by [`deserialize`].
pub(super) fn parse_document(text: &str) -> Result<Table, ConfigError> {
    let mut document = parse_toml(text)?;
    hoist_proxy_table(&mut document)?;
    Ok(document)
}

/// Keys the product documentation's examples put in a `[proxy]` table; they are the same
/// keys as at the top level.
const PROXY_TABLE_KEYS: [&str; 4] = ["listen_address", "admin_address", "workers", "admin_token"];

/// Accepts `[proxy] listen_address = …` (as the product docs write it) for the top-level
/// key: a key set in both places, or one that does not belong there, is an error naming it.
fn hoist_proxy_table(document: &mut Table) -> Result<(), ConfigError> {
    let Some(proxy) = document.remove("proxy") else {
        return Ok(());
    };
    let Value::Table(proxy) = proxy else {
        return Err(ConfigError::new(
            "proxy",
            "must be a table of listen_address, admin_address, workers, admin_token",
        ));
    };
    for (key, value) in proxy {
        let name = format!("proxy.{key}");
        if !PROXY_TABLE_KEYS.contains(&key.as_str()) {
            return Err(ConfigError::new(
                name,
                "unknown key; [proxy] holds listen_address, admin_address, workers and admin_token",
            ));
        }
        if document.contains_key(&key) {
            return Err(ConfigError::new(
                name,
                format!("`{key}` is also set at the top level; keep one"),
            ));
        }
        document.insert(key, value);
    }
    Ok(())
}

fn parse_toml(text: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|error| {
        let position = error
            .span()
            .map(|span| line_and_column(text, span.start))
            .map(|(line, column)| format!(" at line {line}, column {column}"))
            .unwrap_or_default();
        ConfigError::new(
            "config",
            format!("invalid TOML{position}: {}", one_line(error.message())),
        )
    })
}

/// toml's messages span several lines ("invalid string\nexpected `\"`"); logs want one.
fn one_line(message: &str) -> String {
    message.trim_end().replace('\n', "; ")
}

/// 1-based line and column (in characters) of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Builds the config from a (possibly overridden) document.
pub(super) fn deserialize(document: Table) -> Result<Config, ConfigError> {
    // The clone is kept to locate the failing array element if there is an error.
    Config::deserialize(Value::Table(document.clone())).map_err(|error| describe(&document, &error))
}

/// Names the key an error is about. toml reports the path of tables it descended into
/// (only in its Display text) but not array indices, so the failing `[[users]]` or
/// `[[nodes]]` element is found by deserialising the elements one by one.
fn describe(document: &Table, error: &toml::de::Error) -> ConfigError {
    let message = one_line(error.message());
    let mut path = error_path(error);
    if let Some(field) = unknown_field(&message) {
        path.push(field.to_string());
    }
    if let Some(first) = path.first_mut() {
        if let Some(index) = failing_element(document, first) {
            *first = format!("{first}[{index}]");
        }
    }
    let key = if path.is_empty() {
        "config".to_string()
    } else {
        path.join(".")
    };
    ConfigError::new(key, message)
}

/// The table path toml appends to its Display text as "in `a.b`".
fn error_path(error: &toml::de::Error) -> Vec<String> {
    let text = error.to_string();
    text.lines()
        .rev()
        .find_map(|line| line.strip_prefix("in `")?.strip_suffix('`'))
        .map(|path| path.split('.').map(str::to_string).collect())
        .unwrap_or_default()
}

/// The name in serde's "unknown field `name`, expected …" message.
fn unknown_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("unknown field `")?
        .split_once('`')
        .map(|(field, _)| field)
}

/// Index of the first element of the top-level array `array` that does not deserialise.
fn failing_element(document: &Table, array: &str) -> Option<usize> {
    let elements = document.get(array)?.as_array()?;
    match array {
        "users" => first_invalid::<UserConfig>(elements),
        "nodes" => first_invalid::<NodeConfig>(elements),
        _ => None,
    }
}

fn first_invalid<T: DeserializeOwned>(elements: &[Value]) -> Option<usize> {
    elements
        .iter()
        .position(|element| T::deserialize(element.clone()).is_err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        assert_eq!(line_and_column("a = 1\nbé = ?", 0), (1, 1));
        assert_eq!(line_and_column("a = 1\nbé = ?", 6), (2, 1));
        assert_eq!(line_and_column("a = 1\nbé = ?", 13), (2, 7));
        assert_eq!(line_and_column("x", 99), (1, 2));
    }

    #[test]
    fn unknown_field_name_is_extracted() {
        assert_eq!(
            unknown_field("unknown field `prot`, expected one of `host`, `port`"),
            Some("prot")
        );
        assert_eq!(unknown_field("invalid type: string"), None);
    }
}
