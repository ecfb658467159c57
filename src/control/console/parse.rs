//! The console's grammar: PgBouncer's admin commands, case-insensitive, several per query
//! separated by `;`. Every statement of a query is parsed before any of them runs.

use helios_shard::control::ConsoleError;

/// What SHOW can list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Show {
    Pools,
    Stats,
    Clients,
    Servers,
    Databases,
    Config,
    Version,
    Users,
    Nodes,
    State,
    Cache,
    Help,
}

/// One console statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    Pause,
    Resume,
    Reload,
    KillClient(i32),
    /// A PgBouncer command the proxy deliberately does not offer here; the text says
    /// what to do instead.
    Refused(&'static str),
}

impl Command {
    /// May a stats user (SHOW only) run it?
    pub fn read_only(&self) -> bool {
        matches!(self, Command::Show(_))
    }

    /// The command's keyword, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Show(_) => "SHOW",
            Command::Pause => "PAUSE",
            Command::Resume => "RESUME",
            Command::Reload => "RELOAD",
            Command::KillClient(_) => "KILL_CLIENT",
            Command::Refused(_) => "that command",
        }
    }
}

/// Every command, for SHOW HELP and the hint of a syntax error: (syntax, what it does).
pub const COMMANDS: [(&str, &str); 16] = [
    (
        "SHOW POOLS",
        "server and client counts per (database, user)",
    ),
    ("SHOW STATS", "transaction, query, traffic and wait totals"),
    ("SHOW CLIENTS", "every connected client, with its id"),
    ("SHOW SERVERS", "every open server connection"),
    (
        "SHOW DATABASES",
        "databases per node, pool sizes, paused/disabled",
    ),
    ("SHOW USERS", "configured users and their connection counts"),
    (
        "SHOW NODES",
        "backend nodes and their health (as GET /nodes)",
    ),
    ("SHOW CONFIG", "the running configuration, secrets redacted"),
    ("SHOW STATE", "paused or not, and since when the proxy runs"),
    (
        "SHOW CACHE",
        "the result cache: entries, bytes, hits, misses, fills, evictions, invalidations by tier",
    ),
    ("SHOW VERSION", "the proxy version"),
    ("SHOW HELP", "this list"),
    (
        "PAUSE",
        "hand out no server connections; waits until none is in use",
    ),
    ("RESUME", "undo PAUSE"),
    ("RELOAD", "re-read the configuration file"),
    (
        "KILL_CLIENT <id>",
        "disconnect the client with this SHOW CLIENTS id",
    ),
];

/// Splits a query into statements and parses each.
pub fn parse_query(sql: &str) -> Result<Vec<Command>, ConsoleError> {
    sql.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse)
        .collect()
}

/// Parses one statement (without its `;`).
pub fn parse(statement: &str) -> Result<Command, ConsoleError> {
    let words: Vec<String> = statement
        .split_ascii_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    Ok(match words.as_slice() {
        ["SHOW", what] => Command::Show(show(what).ok_or_else(|| unknown(statement))?),
        ["PAUSE"] => Command::Pause,
        ["RESUME"] => Command::Resume,
        ["RELOAD"] => Command::Reload,
        ["KILL_CLIENT", id] => Command::KillClient(id.parse().map_err(|_| ConsoleError {
            code: "42601",
            message: format!("KILL_CLIENT needs a client id from SHOW CLIENTS, not \"{id}\""),
        })?),
        ["PAUSE" | "RESUME", _] => Command::Refused(
            "PAUSE and RESUME apply to the whole proxy here: run them without a database name",
        ),
        ["SHUTDOWN", ..] => Command::Refused(
            "SHUTDOWN is not available from the console: stop the proxy with SIGTERM",
        ),
        ["SUSPEND", ..] => {
            Command::Refused("SUSPEND is not supported: the proxy does not hand over sockets")
        }
        ["ENABLE" | "DISABLE", ..] => Command::Refused(
            "ENABLE and DISABLE work on nodes here: POST /nodes/{address}/enable|disable",
        ),
        ["KILL" | "RECONNECT" | "WAIT_CLOSE", ..] => Command::Refused(
            "not supported: drain a node with POST /nodes/{address}/drain, or KILL_CLIENT one client",
        ),
        ["SET", ..] => {
            Command::Refused("SET is not supported: edit the configuration file and RELOAD")
        }
        _ => return Err(unknown(statement)),
    })
}

fn show(what: &str) -> Option<Show> {
    Some(match what {
        "POOLS" => Show::Pools,
        "STATS" => Show::Stats,
        "CLIENTS" => Show::Clients,
        "SERVERS" => Show::Servers,
        "DATABASES" => Show::Databases,
        "CONFIG" => Show::Config,
        "VERSION" => Show::Version,
        "USERS" => Show::Users,
        "NODES" => Show::Nodes,
        "STATE" => Show::State,
        "CACHE" => Show::Cache,
        "HELP" => Show::Help,
        _ => return None,
    })
}

fn unknown(statement: &str) -> ConsoleError {
    let list: Vec<&str> = COMMANDS.iter().map(|(syntax, _)| *syntax).collect();
    ConsoleError {
        code: "42601",
        message: format!(
            "unrecognized admin console command \"{statement}\"; the console understands: {}",
            list.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_case_insensitively() {
        assert_eq!(parse("show pools").unwrap(), Command::Show(Show::Pools));
        assert_eq!(parse("Show  Nodes").unwrap(), Command::Show(Show::Nodes));
        assert_eq!(parse("pause").unwrap(), Command::Pause);
        assert_eq!(parse("kill_client 42").unwrap(), Command::KillClient(42));
        assert!(matches!(parse("SHUTDOWN").unwrap(), Command::Refused(_)));
    }

    #[test]
    fn queries_split_on_semicolons() {
        assert_eq!(
            parse_query("SHOW VERSION; show help;").unwrap(),
            vec![Command::Show(Show::Version), Command::Show(Show::Help)]
        );
        assert!(parse_query(";;").unwrap().is_empty());
    }

    #[test]
    fn errors_carry_sqlstates() {
        assert_eq!(parse("SELECT 1").unwrap_err().code, "42601");
        assert_eq!(parse("SHOW MEM").unwrap_err().code, "42601");
        assert_eq!(parse("KILL_CLIENT x").unwrap_err().code, "42601");
        assert!(parse("FOO").unwrap_err().message.contains("SHOW POOLS"));
        // One bad statement refuses the whole query before anything runs.
        assert!(parse_query("RESUME; FOO").is_err());
    }

    #[test]
    fn only_show_is_read_only() {
        assert!(Command::Show(Show::Stats).read_only());
        assert!(!Command::Pause.read_only());
        assert!(!Command::KillClient(1).read_only());
    }
}
