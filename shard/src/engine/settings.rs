//! Phase: session settings, which follow a client from one server connection to the next.
//!
//! After a transaction that ran `SET`/`RESET`/`set_config` (seen by the SQL classifier),
//! the proxy asks the server what the session settings now are — the server's word, so
//! rolled-back SETs, `SET LOCAL` and `set_config(…, true)` need no guessing — and keeps
//! that snapshot for the client. When the client lands on a connection whose snapshot
//! differs, the difference is applied in one round trip before its first message.

use std::rc::Rc;

use crate::backend::{BackendConn, BackendError, Rows, ServerError, Settings};
use crate::codec::frontend;
use crate::lease::Lease;
use crate::sql::{unlisted_setting_names, Effects};

use super::phase::{Phase, Ready, Release};
use super::session::Session;
use super::unit::{LeaseNotes, Unit};

pub struct SessionSettings;

impl Phase for SessionSettings {
    /// The client's startup parameters are on the connection: learn what the session's
    /// settings now are.
    async fn login(&self, s: &mut Session, backend: &mut Lease) -> Ready {
        if !s.features.follow_settings || s.startup.is_empty() {
            s.settings = backend.settings.clone();
            return Ready::Go;
        }
        let unlisted: Vec<String> = s
            .startup
            .iter()
            .filter(|(n, _)| n.contains('.'))
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect();
        let mut buf = s.ctx.bufs.take();
        match Box::pin(snapshot(backend, &unlisted, &mut buf)).await {
            Ok(Ok(snapshot)) => {
                backend.settings = snapshot.clone();
                s.settings = snapshot;
                Ready::Go
            }
            Ok(Err(e)) => Ready::Refused(e),
            Err(e) => Ready::Lost(e),
        }
    }

    /// Brings the connection to the session's settings (one round trip, only when they
    /// differ).
    async fn after_acquire(&self, s: &mut Session, _u: &mut Unit, backend: &mut Lease) -> Ready {
        if !s.features.follow_settings || same(&backend.settings, &s.settings) {
            return Ready::Go;
        }
        let mut buf = s.ctx.bufs.take();
        match Box::pin(apply(backend, &s.settings, &mut buf)).await {
            Ok(None) => Ready::Go,
            Ok(Some(err)) => {
                log::warn!(
                    "pool {}: could not restore session settings: {err}",
                    backend.pool().label
                );
                Ready::Refused(err)
            }
            Err(e) => Ready::Lost(e),
        }
    }

    /// After SET, RESET and the like: the server's word on what the settings now are.
    async fn before_release(&self, s: &mut Session, u: &mut Unit, backend: &mut Lease) -> Release {
        if !u.notes.settings_touched {
            return Release::Release;
        }
        match Box::pin(refresh(s, &u.notes.unlisted, backend)).await {
            Ok(Ok(snapshot)) => {
                backend.settings = snapshot.clone();
                s.settings = snapshot;
                u.notes.settings_touched = false;
                u.notes.unlisted.clear();
                Release::Release
            }
            _ => Release::Lost,
        }
    }
}

/// A fresh snapshot of the session's settings, with startup parameters a RESET took
/// back to the server default set to their startup values again.
async fn refresh(
    s: &Session,
    named: &[String],
    backend: &mut BackendConn,
) -> Result<Result<Settings, ServerError>, BackendError> {
    let mut buf = s.ctx.bufs.take();
    let unlisted = unlisted_names(&s.settings, named);
    let taken = snapshot(backend, &unlisted, &mut buf).await?;
    let Ok(snapshot) = &taken else {
        return Ok(taken);
    };
    let lost = reset_startup_params(snapshot, &s.startup);
    if lost.is_empty() {
        return Ok(taken);
    }
    match set_params(backend, &lost, &mut buf).await? {
        None => self::snapshot(backend, &unlisted, &mut buf).await,
        Some(e) => Ok(Err(e)),
    }
}

/// Notes that the SQL may change settings (and which custom ones it names).
pub fn note(notes: &mut LeaseNotes, effects: &Effects, sql: &[u8]) {
    if effects.touches_settings || effects.drops_prepared {
        notes.settings_touched = true;
        unlisted_setting_names(sql, &mut notes.unlisted);
    }
}

/// Sets the client's startup parameters on `backend` where it differs, in one round trip.
pub async fn apply_startup_params(
    backend: &mut BackendConn,
    params: &[(String, String)],
    buf: &mut [u8],
) -> Result<Option<ServerError>, BackendError> {
    let wanted: Vec<&(String, String)> = params
        .iter()
        .filter(|(name, value)| backend.params.get(name) != Some(value.as_str()))
        .collect();
    if wanted.is_empty() {
        return Ok(None);
    }
    set_params(backend, &wanted, buf).await
}

/// Lists the session-level settings: everything `pg_settings` reports as set in this
/// session, plus the custom (dotted) settings and `role` named in `$1`, which that view
/// does not show.
const SNAPSHOT_SQL: &str = "SELECT name, setting FROM pg_catalog.pg_settings \
     WHERE source = 'session' \
     UNION ALL \
     SELECT n, v FROM (SELECT n, pg_catalog.current_setting(n, true) AS v \
     FROM pg_catalog.unnest($1::pg_catalog.text[]) AS n) AS s \
     WHERE v IS NOT NULL AND v <> '' AND NOT (n = 'role' AND v = 'none') \
     ORDER BY 1";

/// Names in `settings` that the snapshot query must ask for by name.
pub fn unlisted_names(settings: &Settings, extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = settings
        .iter()
        .filter(|(n, _)| n.contains('.') || n == "role")
        .map(|(n, _)| n.clone())
        .collect();
    for name in extra {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// Formats items as a PostgreSQL text[] literal (also for the result cache's catalog
/// lookup).
pub(crate) fn text_array<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    let mut out = String::from("{");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.as_ref().chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// Asks the server for its current session settings.
pub async fn snapshot(
    backend: &mut BackendConn,
    unlisted: &[String],
    buf: &mut [u8],
) -> Result<Result<Settings, ServerError>, BackendError> {
    let mut req = Vec::with_capacity(SNAPSHOT_SQL.len() + 64);
    frontend::encode_parse(&mut req, "", SNAPSHOT_SQL, &[25]);
    let array = text_array(unlisted);
    frontend::encode_bind_text(&mut req, "", "", &[Some(array.as_bytes())]);
    frontend::encode_execute(&mut req, "", 0);
    frontend::encode_sync(&mut req);
    let (rows, error) = backend.fetch(&req, 1, buf).await?;
    if let Some(error) = error {
        return Ok(Err(error));
    }
    Ok(Ok(Rc::new(pairs(rows))))
}

fn pairs(rows: Rows) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = rows
        .into_iter()
        .filter_map(|mut row| {
            let value = row.pop()??;
            let name = row.pop()??;
            Some((name, value))
        })
        .collect();
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// Startup parameters that `snapshot` no longer shows: a RESET (or RESET ALL, or SET …
/// TO DEFAULT) took them back to the server's default, whereas PostgreSQL resets a
/// setting to the value the client's startup packet gave it.
pub fn reset_startup_params<'a>(
    snapshot: &Settings,
    startup: &'a [(String, String)],
) -> Vec<&'a (String, String)> {
    startup
        .iter()
        .filter(|(name, _)| {
            !snapshot
                .iter()
                .any(|(have, _)| have.eq_ignore_ascii_case(name))
        })
        .collect()
}

/// Sets `params` with `set_config(…, false)` in one round trip.
pub async fn set_params(
    backend: &mut BackendConn,
    params: &[&(String, String)],
    buf: &mut [u8],
) -> Result<Option<ServerError>, BackendError> {
    let mut req = Vec::with_capacity(128 + params.len() * 64);
    encode_set_configs(&mut req, params);
    backend.exchange(&req, 1, buf).await
}

/// One extended-protocol batch (ending in Sync) of `set_config(name, value, false)` with
/// bound values: no quoting, no injection.
fn encode_set_configs(req: &mut Vec<u8>, params: &[&(String, String)]) {
    frontend::encode_parse(
        req,
        "",
        "SELECT pg_catalog.set_config($1, $2, false)",
        &[25, 25],
    );
    for (name, value) in params {
        frontend::encode_bind_text(
            req,
            "",
            "",
            &[Some(name.as_bytes()), Some(value.as_bytes())],
        );
        frontend::encode_execute(req, "", 0);
    }
    frontend::encode_sync(req);
}

/// Same settings, compared cheaply first by identity.
pub fn same(a: &Settings, b: &Settings) -> bool {
    Rc::ptr_eq(a, b) || a == b
}

/// Brings `backend` to `wanted` with one round trip: RESET what it has and `wanted` does
/// not, `set_config` what differs. Returns the server's error if it refused.
pub async fn apply(
    backend: &mut BackendConn,
    wanted: &Settings,
    buf: &mut [u8],
) -> Result<Option<ServerError>, BackendError> {
    let current = backend.settings.clone();
    let mut req = Vec::with_capacity(256);
    let mut syncs = 0;
    let mut resets = String::new();
    for (name, _) in current.iter() {
        if lookup(wanted, name).is_none() {
            resets.push_str("RESET ");
            push_quoted_name(&mut resets, name);
            resets.push(';');
        }
    }
    if !resets.is_empty() {
        frontend::encode_query(&mut req, &resets);
        syncs += 1;
    }
    let changes: Vec<&(String, String)> = wanted
        .iter()
        .filter(|(name, value)| lookup(&current, name) != Some(value.as_str()))
        .collect();
    if !changes.is_empty() {
        encode_set_configs(&mut req, &changes);
        syncs += 1;
    }
    if syncs == 0 {
        backend.settings = wanted.clone();
        return Ok(None);
    }
    let error = backend.exchange(&req, syncs, buf).await?;
    if error.is_none() {
        backend.settings = wanted.clone();
    }
    Ok(error)
}

fn lookup<'a>(settings: &'a Settings, name: &str) -> Option<&'a str> {
    settings
        .binary_search_by(|(n, _)| n.as_str().cmp(name))
        .ok()
        .map(|i| settings[i].1.as_str())
}

/// Writes a (possibly dotted) setting name with each part double-quoted.
fn push_quoted_name(out: &mut String, name: &str) {
    for (i, part) in name.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push('"');
        out.push_str(&part.replace('"', "\"\""));
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_and_names_are_quoted() {
        assert_eq!(text_array(["a.b", "x\"y"]), r#"{"a.b","x\"y"}"#);
        let mut s = String::new();
        push_quoted_name(&mut s, "helios.client");
        assert_eq!(s, r#""helios"."client""#);
    }

    #[test]
    fn snapshots_are_sorted_and_looked_up() {
        let rows = vec![
            vec![Some("work_mem".into()), Some("8192".into())],
            vec![Some("application_name".into()), Some("x".into())],
        ];
        let settings: Settings = Rc::new(pairs(rows));
        assert_eq!(lookup(&settings, "application_name"), Some("x"));
        assert_eq!(lookup(&settings, "work_mem"), Some("8192"));
        assert_eq!(lookup(&settings, "search_path"), None);
    }
}
