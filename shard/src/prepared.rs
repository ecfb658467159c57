//! Prepared statements shared across pooled server connections.
//!
//! A client's statement name means nothing to the server connection that serves its next
//! transaction, and two clients happily use the same name for different SQL. So each
//! distinct statement (query text plus parameter types) is interned once per shard and
//! gets a server-side name derived from a 128-bit hash of its full content; the registry
//! guarantees no two live statements share a name (a colliding hash is probed onward),
//! and each server connection records exactly which statement objects it has prepared
//! under which name, so a name can never refer to the wrong SQL there.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use hashbrown::HashMap;

use crate::codec::backend::{decode, BackendMessage};
use crate::codec::tag;
use crate::sql::route::{analyze, ReadOnlyFunctions, RouteAnalysis};
use crate::sql::{classify, Effects};

/// Prefix of every server-side statement name the proxy creates.
pub const NAME_PREFIX: &str = "_hx_";

/// One distinct statement: the Parse message's body after the statement name.
pub struct Statement {
    /// Query text, NUL, Int16 type count, Int32 type OIDs — exactly as the client sent it.
    spec: Box<[u8]>,
    hash: u128,
    /// Bumped when the server's cached plan went stale, so every connection re-prepares.
    generation: Cell<u32>,
    name: RefCell<Rc<str>>,
    /// What the SQL does, classified once.
    pub effects: Effects,
    /// The result columns the server last reported when preparing this statement (see
    /// [`result_shape`]). A client that prepared it when the shape was different must
    /// not silently get the new one.
    shape: RefCell<Option<Shape>>,
    /// How the query may be routed, analysed once for the function list in force.
    route: RefCell<Option<(Weak<ReadOnlyFunctions>, Rc<RouteAnalysis>)>>,
}

impl Statement {
    pub fn spec(&self) -> &[u8] {
        &self.spec
    }

    /// The routing analysis of the query: computed at the first use after the statement
    /// was prepared, and again only if a reload changed the read-only function list.
    pub fn route_analysis(&self, functions: &Rc<ReadOnlyFunctions>) -> Rc<RouteAnalysis> {
        let mut cached = self.route.borrow_mut();
        if let Some((list, analysis)) = cached.as_ref() {
            if list.ptr_eq(&Rc::downgrade(functions)) {
                return analysis.clone();
            }
        }
        let analysis = Rc::new(analyze(query_of(&self.spec), functions));
        *cached = Some((Rc::downgrade(functions), analysis.clone()));
        analysis
    }

    /// The query text (without its NUL).
    pub fn query(&self) -> &[u8] {
        let end = self
            .spec
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.spec.len());
        &self.spec[..end]
    }

    /// The name this statement has on servers now.
    pub fn server_name(&self) -> Rc<str> {
        self.name.borrow().clone()
    }

    pub fn generation(&self) -> u32 {
        self.generation.get()
    }

    /// The result shape clients preparing this statement now are told; `None` until a
    /// server described it.
    pub fn shape(&self) -> Option<Shape> {
        self.shape.borrow().clone()
    }

    /// Records the result shape a server just reported for this statement: the body of
    /// its RowDescription, or empty for NoData.
    pub fn learn_shape(&self, row_description: &[u8]) {
        let shape = result_shape(row_description);
        let mut known = self.shape.borrow_mut();
        if known.as_deref() != Some(&*shape) {
            *known = Some(shape);
        }
    }

    /// The schema may have changed: prepare this statement under a new name on every
    /// connection, so no stale server-side plan is used. The shape is kept, so a changed
    /// one is noticed when it is learnt again.
    pub fn rename(&self) {
        let generation = self.generation.get().wrapping_add(1);
        self.generation.set(generation);
        *self.name.borrow_mut() = server_name(self.hash, generation);
    }

    /// The server said this statement's plan no longer fits the table (DDL changed its
    /// result type): prepare it afresh under a new name everywhere. Whether clients that
    /// prepared it earlier must be told is decided by comparing shapes at their Bind.
    pub fn invalidate(&self) {
        self.rename();
    }
}

impl std::fmt::Debug for Statement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Statement")
            .field("name", &*self.name.borrow())
            .field("query", &String::from_utf8_lossy(self.query()))
            .finish()
    }
}

/// A statement's result columns as PostgreSQL compares them when it re-plans a prepared
/// statement: each column's name, type, size and type modifier, in order. The table OID
/// and column number a RowDescription also carries are left out: a table dropped and
/// created again with the same columns gets new ones, and PostgreSQL re-plans silently.
pub type Shape = Rc<[u8]>;

/// The [`Shape`] of a RowDescription body (empty for NoData). A body that does not
/// parse is kept whole: it can only compare equal to itself.
pub fn result_shape(row_description: &[u8]) -> Shape {
    if row_description.is_empty() {
        return Rc::from(&[][..]);
    }
    let Ok(BackendMessage::RowDescription(fields)) =
        decode(tag::be::ROW_DESCRIPTION, row_description)
    else {
        return row_description.into();
    };
    let mut shape = Vec::with_capacity(row_description.len());
    for field in fields.iter() {
        shape.extend_from_slice(field.name);
        shape.push(0);
        shape.extend_from_slice(&field.type_oid.to_be_bytes());
        shape.extend_from_slice(&field.type_size.to_be_bytes());
        shape.extend_from_slice(&field.type_modifier.to_be_bytes());
    }
    shape.into()
}

fn server_name(hash: u128, generation: u32) -> Rc<str> {
    if generation == 0 {
        format!("{NAME_PREFIX}{hash:032x}").into()
    } else {
        format!("{NAME_PREFIX}{hash:032x}_{generation}").into()
    }
}

fn content_hash(spec: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(spec)
}

/// Every statement some client or server connection of this shard still refers to.
#[derive(Default)]
pub struct Registry {
    by_hash: RefCell<HashMap<u128, Weak<Statement>>>,
    /// A schema change was seen here and other shards have not been told yet.
    unannounced_change: Cell<bool>,
}

impl Registry {
    /// The statement with this exact content, interned.
    /// The shared statement for `spec`, made (and classified, unless `effects` were
    /// already worked out) when it is new.
    pub fn intern(&self, spec: &[u8], effects: Option<Effects>) -> Rc<Statement> {
        let mut hash = content_hash(spec);
        let mut map = self.by_hash.borrow_mut();
        loop {
            match map.get(&hash).and_then(Weak::upgrade) {
                Some(stmt) if *stmt.spec == *spec => return stmt,
                // Another live statement owns this hash: probe on, so names stay unique.
                Some(_) => hash = hash.wrapping_add(1),
                None => break,
            }
        }
        let stmt = Rc::new(Statement {
            effects: effects.unwrap_or_else(|| classify(query_of(spec))),
            spec: spec.into(),
            hash,
            generation: Cell::new(0),
            name: RefCell::new(server_name(hash, 0)),
            shape: RefCell::new(None),
            route: RefCell::new(None),
        });
        map.insert(hash, Rc::downgrade(&stmt));
        stmt
    }

    /// After DDL: every statement is prepared afresh where it is next used.
    pub fn rename_all(&self) {
        for stmt in self.by_hash.borrow().values().filter_map(Weak::upgrade) {
            stmt.rename();
        }
    }

    /// A client of this shard changed the schema: prepare afresh here, and remember to
    /// tell the other shards.
    pub fn schema_changed(&self) {
        self.rename_all();
        self.unannounced_change.set(true);
    }

    /// True once per schema change seen here: the caller tells the other shards.
    pub fn take_unannounced_change(&self) -> bool {
        self.unannounced_change.replace(false)
    }

    /// Forgets statements nobody refers to any more.
    pub fn prune(&self) {
        self.by_hash
            .borrow_mut()
            .retain(|_, w| w.strong_count() > 0);
    }

    pub fn len(&self) -> usize {
        self.by_hash.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn query_of(spec: &[u8]) -> &[u8] {
    let end = spec.iter().position(|&b| b == 0).unwrap_or(spec.len());
    &spec[..end]
}

/// The statements one server connection has prepared, with a bound on their number.
#[derive(Default)]
pub struct ServerStatements {
    entries: HashMap<Rc<str>, Entry>,
    tick: u64,
}

struct Entry {
    stmt: Rc<Statement>,
    last_used: u64,
}

impl ServerStatements {
    /// True when this connection has `stmt` prepared under its current name.
    pub fn has(&mut self, stmt: &Rc<Statement>) -> bool {
        let name = stmt.name.borrow();
        self.tick += 1;
        let tick = self.tick;
        match self.entries.get_mut(&**name) {
            Some(entry) if Rc::ptr_eq(&entry.stmt, stmt) => {
                entry.last_used = tick;
                true
            }
            _ => false,
        }
    }

    /// Records that `stmt` is (being) prepared under its current name. When that makes
    /// more than `capacity`, returns the least recently used other statement's name,
    /// which the caller must Close on the server.
    pub fn insert(&mut self, stmt: &Rc<Statement>, capacity: usize) -> Option<Rc<str>> {
        self.tick += 1;
        let name = stmt.server_name();
        self.entries.insert(
            name.clone(),
            Entry {
                stmt: stmt.clone(),
                last_used: self.tick,
            },
        );
        if self.entries.len() <= capacity.max(1) {
            return None;
        }
        let victim = self
            .entries
            .iter()
            .filter(|(n, _)| **n != name)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(n, _)| n.clone())?;
        self.entries.remove(&victim);
        Some(victim)
    }

    /// The server did not (or no longer does) have this name prepared.
    pub fn remove(&mut self, name: &str) {
        self.entries.remove(name);
    }

    /// The server dropped every prepared statement (DEALLOCATE ALL, DISCARD ALL).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(query: &str, types: &[u32]) -> Vec<u8> {
        let mut out = query.as_bytes().to_vec();
        out.push(0);
        out.extend_from_slice(&(types.len() as u16).to_be_bytes());
        for t in types {
            out.extend_from_slice(&t.to_be_bytes());
        }
        out
    }

    #[test]
    fn same_content_is_one_statement_and_different_content_another() {
        let reg = Registry::default();
        let a = reg.intern(&spec("SELECT $1", &[23]), None);
        let b = reg.intern(&spec("SELECT $1", &[23]), None);
        let c = reg.intern(&spec("SELECT $1", &[25]), None);
        assert!(Rc::ptr_eq(&a, &b));
        assert!(!Rc::ptr_eq(&a, &c));
        assert_ne!(a.server_name(), c.server_name());
        assert!(a.server_name().starts_with(NAME_PREFIX));
        assert_eq!(a.query(), b"SELECT $1");
    }

    #[test]
    fn effects_are_classified_once_at_intern() {
        let reg = Registry::default();
        assert!(
            reg.intern(&spec("SET search_path = x", &[]), None)
                .effects
                .touches_settings
        );
        assert!(reg.intern(&spec("SELECT 1", &[]), None).effects.is_plain());
    }

    #[test]
    fn dead_statements_are_pruned() {
        let reg = Registry::default();
        let keep = reg.intern(&spec("SELECT 1", &[]), None);
        drop(reg.intern(&spec("SELECT 2", &[]), None));
        reg.prune();
        assert_eq!(reg.len(), 1);
        drop(keep);
        reg.prune();
        assert!(reg.is_empty());
    }

    #[test]
    fn invalidation_renames() {
        let reg = Registry::default();
        let a = reg.intern(&spec("SELECT * FROM t", &[]), None);
        let before = a.server_name();
        let mut server = ServerStatements::default();
        server.insert(&a, 10);
        assert!(server.has(&a));
        a.invalidate();
        assert_ne!(a.server_name(), before);
        assert!(!server.has(&a), "the stale plan must not be reused");
    }

    /// A RowDescription body with one column per (name, table OID, type OID).
    fn row_description(columns: &[(&str, u32, u32)]) -> Vec<u8> {
        let mut out = (columns.len() as u16).to_be_bytes().to_vec();
        for (i, (name, table, ty)) in columns.iter().enumerate() {
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            out.extend_from_slice(&table.to_be_bytes());
            out.extend_from_slice(&(i as u16 + 1).to_be_bytes());
            out.extend_from_slice(&ty.to_be_bytes());
            out.extend_from_slice(&4i16.to_be_bytes());
            out.extend_from_slice(&(-1i32).to_be_bytes());
            out.extend_from_slice(&0u16.to_be_bytes());
        }
        out
    }

    #[test]
    fn shapes_compare_like_postgresql_does() {
        let before = result_shape(&row_description(&[("id", 16384, 23), ("v", 16384, 25)]));
        // The table dropped and created again: new OID, same columns.
        let recreated = result_shape(&row_description(&[("id", 16390, 23), ("v", 16390, 25)]));
        assert_eq!(before, recreated);
        let retyped = result_shape(&row_description(&[("id", 16390, 20), ("v", 16390, 25)]));
        assert_ne!(before, retyped);
        let renamed = result_shape(&row_description(&[("ident", 16390, 23), ("v", 16390, 25)]));
        assert_ne!(before, renamed);
        let wider = result_shape(&row_description(&[
            ("id", 16390, 23),
            ("v", 16390, 25),
            ("w", 16390, 25),
        ]));
        assert_ne!(before, wider);
        assert!(result_shape(b"").is_empty(), "NoData");
        assert_eq!(&*result_shape(b"\0\x01junk"), b"\0\x01junk", "kept whole");

        let reg = Registry::default();
        let a = reg.intern(&spec("SELECT * FROM t", &[]), None);
        assert!(a.shape().is_none());
        a.learn_shape(&row_description(&[("id", 1, 23)]));
        let first = a.shape().unwrap();
        a.learn_shape(&row_description(&[("id", 2, 23)]));
        assert!(Rc::ptr_eq(&first, &a.shape().unwrap()), "same shape, kept");
        a.learn_shape(&row_description(&[("id", 2, 20)]));
        assert_ne!(first, a.shape().unwrap());
    }

    #[test]
    fn server_set_is_bounded_and_evicts_least_recently_used() {
        let reg = Registry::default();
        let stmts: Vec<_> = (0..4)
            .map(|i| reg.intern(&spec(&format!("SELECT {i}"), &[]), None))
            .collect();
        let mut server = ServerStatements::default();
        assert_eq!(server.insert(&stmts[0], 3), None);
        assert_eq!(server.insert(&stmts[1], 3), None);
        assert_eq!(server.insert(&stmts[2], 3), None);
        assert!(server.has(&stmts[0]));
        let evicted = server.insert(&stmts[3], 3);
        assert_eq!(evicted, Some(stmts[1].server_name()));
        assert_eq!(server.len(), 3);
        assert!(!server.has(&stmts[1]));
    }

    #[test]
    fn a_name_held_by_another_statement_is_not_a_hit() {
        let reg = Registry::default();
        let a = reg.intern(&spec("SELECT 1", &[]), None);
        let mut server = ServerStatements::default();
        server.insert(&a, 10);
        // A statement object with the same name but other content (forced collision).
        let impostor = Rc::new(Statement {
            spec: spec("SELECT 2", &[]).into(),
            hash: a.hash,
            generation: Cell::new(0),
            name: RefCell::new(a.server_name()),
            effects: Effects::default(),
            shape: RefCell::new(None),
            route: RefCell::new(None),
        });
        assert!(!server.has(&impostor));
    }
}
