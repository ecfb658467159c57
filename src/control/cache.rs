//! The result cache as the admin API, the console and the metrics show it: every
//! shard's counters summed, and invalidation by table name or of everything.

use serde_json::{json, Value};

use std::sync::atomic::Ordering;

use helios_shard::cache::shard::Tier;
use helios_shard::config::CacheInvalidation;
use helios_shard::stats::ShardStats;

use super::Control;

/// One tier's counters summed over the shards.
#[derive(Default, Debug, Clone, Copy)]
pub struct TierTotals {
    pub entries: u64,
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub fills: u64,
    pub evictions: u64,
    /// Entries found stale (a table they read was written) and dropped.
    pub invalidations: u64,
}

impl TierTotals {
    fn json(&self) -> Value {
        json!({
            "entries": self.entries,
            "bytes": self.bytes,
            "hits": self.hits,
            "misses": self.misses,
            "fills": self.fills,
            "evictions": self.evictions,
            "invalidations": self.invalidations,
        })
    }
}

/// The cache's counters summed over the shards.
#[derive(Default, Debug, Clone, Copy)]
pub struct CacheTotals {
    pub tiers: [TierTotals; 3],
    /// Lookups that found nothing in any tier (the statement went to the server).
    pub misses: u64,
    pub uncacheable: u64,
    /// Results stored.
    pub fills: u64,
    pub fills_discarded: u64,
    /// Invalidations made (by writers through the proxy and the admin API).
    pub invalidations: u64,
}

impl CacheTotals {
    pub fn sum(control: &Control) -> CacheTotals {
        let mut t = CacheTotals::default();
        for link in control.shard_links() {
            let s: &ShardStats = &link.stats;
            for (sum, tier) in t.tiers.iter_mut().zip(&s.cache_tiers) {
                sum.entries += tier.entries.get();
                sum.bytes += tier.bytes.get();
                sum.hits += tier.hits.get();
                sum.misses += tier.misses.get();
                sum.fills += tier.fills.get();
                sum.evictions += tier.evictions.get();
                sum.invalidations += tier.stale.get();
            }
            t.misses += s.cache_misses.get();
            t.uncacheable += s.cache_uncacheable.get();
            t.fills += s.cache_fills.get();
            t.fills_discarded += s.cache_fills_discarded.get();
        }
        t.invalidations = control.cache_epochs.invalidations();
        t
    }

    pub fn hits(&self) -> u64 {
        self.tiers.iter().map(|t| t.hits).sum()
    }

    pub fn entries(&self) -> u64 {
        self.tiers.iter().map(|t| t.entries).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.tiers.iter().map(|t| t.bytes).sum()
    }

    pub fn evictions(&self) -> u64 {
        self.tiers.iter().map(|t| t.evictions).sum()
    }
}

/// `GET /cache`.
pub fn json(control: &Control) -> Value {
    let config = control.config();
    let t = CacheTotals::sum(control);
    let mut out = json!({
        "enabled": config.cache.enabled,
        "max_memory_bytes": config.cache.max_memory_mb * 1024 * 1024,
        "entries": t.entries(),
        "bytes": t.bytes(),
        "hits": t.hits(),
        "misses": t.misses,
        "fills": t.fills,
        "evictions": t.evictions(),
        "invalidations": t.invalidations,
        "uncacheable": t.uncacheable,
        "fills_discarded": t.fills_discarded,
    });
    let fields = out.as_object_mut().expect("an object");
    for (tier, totals) in Tier::ALL.iter().zip(&t.tiers) {
        fields.insert(tier.label().into(), totals.json());
    }
    fields.insert(
        "invalidation".into(),
        json!(match config.cache.invalidation {
            CacheInvalidation::Proxy => "proxy",
            CacheInvalidation::Wal => "wal",
        }),
    );
    fields.insert("wal".into(), Value::Array(wal_json(control)));
    out
}

/// One object per database followed in the WAL.
fn wal_json(control: &Control) -> Vec<Value> {
    control
        .cache_epochs
        .wal_follows()
        .iter()
        .map(|(database, f)| {
            let lsn = f.applied_lsn.load(Ordering::SeqCst);
            json!({
                "database": database,
                "streaming": f.ready.load(Ordering::SeqCst),
                "slot": f.slot.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                "lag_bytes": f.lag_bytes.load(Ordering::SeqCst),
                "lag_ms": f.lag_micros.load(Ordering::SeqCst) as f64 / 1000.0,
                "applied_lsn": format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff),
                "commits": f.commits.load(Ordering::SeqCst),
                "last_error": f.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            })
        })
        .collect()
}

/// What `POST /cache/invalidate` asks for.
pub enum Invalidate {
    All,
    Table(String),
}

/// Reads the request body: `{"table": "schema.name"}` or `{"all": true}`.
pub fn parse_invalidate(body: &[u8]) -> Result<Invalidate, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("malformed JSON body: {e}"))?;
    let Some(fields) = value.as_object() else {
        return Err("the body must be a JSON object".into());
    };
    for key in fields.keys() {
        if key != "table" && key != "all" {
            return Err(format!(
                "unknown field \"{key}\" (expected \"table\" or \"all\")"
            ));
        }
    }
    match (fields.get("table"), fields.get("all")) {
        (Some(_), Some(_)) => Err("give either \"table\" or \"all\", not both".into()),
        (Some(Value::String(name)), None) => {
            let parts: Vec<&str> = name.split('.').collect();
            if name.is_empty() || parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
                return Err(format!(
                    "\"table\" must be \"schema.name\" or \"name\", not {name:?}"
                ));
            }
            Ok(Invalidate::Table(name.clone()))
        }
        (Some(_), None) => Err("\"table\" must be a string".into()),
        (None, Some(Value::Bool(true))) => Ok(Invalidate::All),
        (None, Some(_)) => Err("\"all\" must be true".into()),
        (None, None) => Err("the body must name a \"table\" or say \"all\": true".into()),
    }
}

/// Carries out an invalidation; the JSON answer says what it reached.
pub fn invalidate(control: &Control, what: Invalidate) -> Value {
    let epochs = &control.cache_epochs;
    match what {
        Invalidate::All => {
            epochs.invalidate_all();
            json!({ "invalidated": "all" })
        }
        Invalidate::Table(name) => {
            let matched = epochs.invalidate_table(&name);
            json!({ "invalidated": name, "tables_matched": matched })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidate_bodies_are_checked() {
        assert!(matches!(
            parse_invalidate(br#"{"all": true}"#),
            Ok(Invalidate::All)
        ));
        assert!(matches!(
            parse_invalidate(br#"{"table": "public.t"}"#),
            Ok(Invalidate::Table(t)) if t == "public.t"
        ));
        for bad in [
            &br#"{"all": false}"#[..],
            br#"{"table": 1}"#,
            br#"{"table": "a.b.c"}"#,
            br#"{"table": ""}"#,
            br#"{"table": "t", "all": true}"#,
            br#"{"tables": "t"}"#,
            br#"{}"#,
            br#"[1]"#,
            b"not json",
        ] {
            assert!(
                parse_invalidate(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
