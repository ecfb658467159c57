//! Routing hints carried in SQL comments: `/*+ route=primary */` (optimizer-hint style)
//! and `helios:route=…` / `helios:cache=skip` / `helios:cache=ttl:N` in any comment. Several hints may share a
//! comment, separated by spaces or commas. Unknown hints are logged and ignored.

use super::RouteHint;

/// Hints found so far; the last valid route wins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Hints {
    pub route: Option<RouteHint>,
    pub cache_skip: bool,
    /// `helios:cache=ttl:N`: cache the result for N seconds.
    pub cache_ttl: Option<u32>,
}

const NAMESPACE: &[u8] = b"helios:";

/// Reads the hints in one comment's text (without its delimiters).
pub(super) fn scan(comment: &[u8], hints: &mut Hints) {
    // `/*+ … */`: the comment text starts with `+`; its bare `key=value` items are hints.
    let optimizer_style = comment.first() == Some(&b'+');
    let items = comment
        .split(|b| b.is_ascii_whitespace() || *b == b',')
        .map(|item| item.strip_prefix(b"+").unwrap_or(item))
        .filter(|item| !item.is_empty());
    for item in items {
        let namespaced = item.len() >= NAMESPACE.len()
            && item[..NAMESPACE.len()].eq_ignore_ascii_case(NAMESPACE);
        if !namespaced && !optimizer_style {
            continue;
        }
        let body = if namespaced {
            &item[NAMESPACE.len()..]
        } else {
            item
        };
        if !apply(body, hints) {
            log::debug!(
                target: "heliosdb_proxy::routing",
                "ignoring unknown routing hint {}",
                String::from_utf8_lossy(item)
            );
        }
    }
}

/// Applies one `key=value`; false when the key or value is unknown.
fn apply(item: &[u8], hints: &mut Hints) -> bool {
    let Some(eq) = item.iter().position(|b| *b == b'=') else {
        return false;
    };
    let (key, value) = (&item[..eq], &item[eq + 1..]);
    if key.eq_ignore_ascii_case(b"route") {
        let route = if value.eq_ignore_ascii_case(b"primary") {
            RouteHint::Primary
        } else if value.eq_ignore_ascii_case(b"standby") || value.eq_ignore_ascii_case(b"replica") {
            RouteHint::Standby
        } else if value.eq_ignore_ascii_case(b"nearest") {
            RouteHint::Nearest
        } else {
            return false;
        };
        hints.route = Some(route);
        true
    } else if key.eq_ignore_ascii_case(b"cache") && value.eq_ignore_ascii_case(b"skip") {
        hints.cache_skip = true;
        true
    } else if key.eq_ignore_ascii_case(b"cache")
        && value.len() > 4
        && value[..4].eq_ignore_ascii_case(b"ttl:")
    {
        match std::str::from_utf8(&value[4..])
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(secs) => {
                hints.cache_ttl = Some(secs);
                true
            }
            None => false,
        }
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hints(comments: &[&str]) -> Hints {
        let mut hints = Hints::default();
        for c in comments {
            scan(c.as_bytes(), &mut hints);
        }
        hints
    }

    #[test]
    fn both_spellings_and_lists() {
        assert_eq!(hints(&["+ route=primary "]).route, Some(RouteHint::Primary));
        assert_eq!(hints(&["+route=NEAREST"]).route, Some(RouteHint::Nearest));
        assert_eq!(
            hints(&[" helios:route=Replica "]).route,
            Some(RouteHint::Standby)
        );
        let h = hints(&[" HELIOS:route=standby,helios:cache=skip "]);
        assert_eq!(h.route, Some(RouteHint::Standby));
        assert!(h.cache_skip);
        assert_eq!(hints(&["helios:cache=ttl:30"]).cache_ttl, Some(30));
        assert_eq!(hints(&["helios:cache=ttl:x"]).cache_ttl, None);
    }

    #[test]
    fn plain_comments_and_unknown_hints_are_ignored() {
        assert_eq!(hints(&[" route=primary "]), Hints::default());
        assert_eq!(
            hints(&["+ SeqScan(t) route=sideways helios:colour=blue helios:route"]),
            Hints::default()
        );
        let h = hints(&["helios:route=primary", "helios:route=bogus"]);
        assert_eq!(h.route, Some(RouteHint::Primary));
    }
}
