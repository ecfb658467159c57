//! The keywords routing analysis reacts to, folded to one lookup per word.

/// A word's role in the analysis. `Ident` is every word that is not listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kw {
    Ident,
    /// Any token that is not a word (operator, literal, parenthesis, comma).
    Punct,
    Abort,
    Analyze,
    As,
    Begin,
    Close,
    Commit,
    Copy,
    Create,
    Cycle,
    Declare,
    Delete,
    Distinct,
    Do,
    End,
    Except,
    Exists,
    Explain,
    False,
    Fetch,
    For,
    From,
    Group,
    Having,
    Hold,
    If,
    Insert,
    Intersect,
    Into,
    Is,
    Join,
    Key,
    Lateral,
    Limit,
    Lock,
    Materialized,
    Merge,
    Move,
    Not,
    Off,
    Offset,
    On,
    Only,
    Order,
    Prepared,
    Read,
    Recursive,
    Release,
    Returning,
    Revoke,
    Rollback,
    Rows,
    Savepoint,
    Search,
    Select,
    Serializable,
    Set,
    Share,
    Show,
    Start,
    Stdout,
    Table,
    Tablesample,
    Temp,
    Then,
    To,
    Transaction,
    Truncate,
    Union,
    Unlogged,
    Update,
    Using,
    Values,
    Verbose,
    When,
    Where,
    Window,
    With,
    Write,
    /// A listed word with no role of its own (only its `construct` flag matters).
    Other,
}

/// Looks a word up: its role, and whether the word followed by `(` is SQL syntax (a
/// construct, type modifier or clause) rather than a function call.
pub(super) fn keyword(word: &[u8]) -> (Kw, bool) {
    let mut buf = [0u8; 16];
    if word.len() > buf.len() {
        return (Kw::Ident, false);
    }
    for (b, w) in buf.iter_mut().zip(word) {
        *b = w.to_ascii_lowercase();
    }
    match &buf[..word.len()] {
        // Statement and clause words that take part in the analysis.
        b"abort" => (Kw::Abort, false),
        b"analyse" | b"analyze" => (Kw::Analyze, false),
        b"as" => (Kw::As, true),
        b"begin" => (Kw::Begin, false),
        b"close" => (Kw::Close, false),
        b"commit" => (Kw::Commit, false),
        b"copy" => (Kw::Copy, false),
        b"create" => (Kw::Create, false),
        b"cycle" => (Kw::Cycle, false),
        b"declare" => (Kw::Declare, false),
        b"delete" => (Kw::Delete, false),
        b"distinct" => (Kw::Distinct, true),
        b"do" => (Kw::Do, false),
        b"end" => (Kw::End, true),
        b"except" => (Kw::Except, true),
        b"exists" => (Kw::Exists, true),
        b"explain" => (Kw::Explain, false),
        b"false" => (Kw::False, false),
        b"fetch" => (Kw::Fetch, false),
        b"for" => (Kw::For, true),
        b"from" => (Kw::From, true),
        b"group" => (Kw::Group, true),
        b"having" => (Kw::Having, true),
        b"hold" => (Kw::Hold, false),
        b"if" => (Kw::If, false),
        b"insert" => (Kw::Insert, false),
        b"intersect" => (Kw::Intersect, true),
        b"into" => (Kw::Into, true),
        b"is" => (Kw::Is, true),
        b"join" => (Kw::Join, true),
        b"key" => (Kw::Key, false),
        b"lateral" => (Kw::Lateral, true),
        b"limit" => (Kw::Limit, true),
        b"lock" => (Kw::Lock, false),
        b"materialized" => (Kw::Materialized, false),
        b"merge" => (Kw::Merge, false),
        b"move" => (Kw::Move, false),
        b"not" => (Kw::Not, true),
        b"off" => (Kw::Off, false),
        b"offset" => (Kw::Offset, true),
        b"on" => (Kw::On, true),
        b"only" => (Kw::Only, true),
        b"order" => (Kw::Order, true),
        b"prepared" => (Kw::Prepared, false),
        b"read" => (Kw::Read, false),
        b"recursive" => (Kw::Recursive, false),
        b"release" => (Kw::Release, false),
        b"returning" => (Kw::Returning, true),
        b"revoke" => (Kw::Revoke, false),
        b"rollback" => (Kw::Rollback, false),
        b"rows" => (Kw::Rows, false),
        b"savepoint" => (Kw::Savepoint, false),
        b"search" => (Kw::Search, false),
        b"select" => (Kw::Select, true),
        b"serializable" => (Kw::Serializable, false),
        b"set" => (Kw::Set, false),
        b"share" => (Kw::Share, false),
        b"show" => (Kw::Show, false),
        b"start" => (Kw::Start, false),
        b"stdout" => (Kw::Stdout, false),
        b"table" => (Kw::Table, true),
        b"tablesample" => (Kw::Tablesample, true),
        b"temp" | b"temporary" => (Kw::Temp, false),
        b"then" => (Kw::Then, true),
        b"to" => (Kw::To, true),
        b"transaction" => (Kw::Transaction, false),
        b"truncate" => (Kw::Truncate, false),
        b"union" => (Kw::Union, true),
        b"unlogged" => (Kw::Unlogged, false),
        b"update" => (Kw::Update, false),
        b"using" => (Kw::Using, true),
        b"values" => (Kw::Values, true),
        b"verbose" => (Kw::Verbose, false),
        b"when" => (Kw::When, true),
        b"where" => (Kw::Where, true),
        b"window" => (Kw::Window, true),
        b"with" => (Kw::With, true),
        b"write" => (Kw::Write, false),
        // Syntax that takes parentheses but is not a function call: operators and
        // predicates, special forms, window/grouping clauses, and type names that take
        // modifiers (varchar(10), numeric(10,2), timestamp(3), bit varying(5), …).
        b"all" | b"and" | b"any" | b"array" | b"asc" | b"between" | b"bigint" | b"bit"
        | b"boolean" | b"both" | b"by" | b"case" | b"cast" | b"char" | b"character" | b"check"
        | b"coalesce" | b"collate" | b"cube" | b"dec" | b"decimal" | b"default" | b"desc"
        | b"else" | b"extract" | b"filter" | b"float" | b"greatest" | b"grouping" | b"ilike"
        | b"in" | b"int" | b"integer" | b"interval" | b"json" | b"json_array" | b"json_object"
        | b"json_scalar" | b"leading" | b"least" | b"like" | b"national" | b"nchar"
        | b"normalize" | b"nullif" | b"numeric" | b"operator" | b"or" | b"over" | b"overlaps"
        | b"overlay" | b"partition" | b"placing" | b"position" | b"precision" | b"real"
        | b"repeatable" | b"rollup" | b"row" | b"sets" | b"similar" | b"smallint" | b"some"
        | b"substring" | b"symmetric" | b"time" | b"timestamp" | b"trailing" | b"treat"
        | b"trim" | b"varchar" | b"variadic" | b"varying" | b"within" | b"xmlattributes"
        | b"xmlconcat" | b"xmlelement" | b"xmlexists" | b"xmlforest" | b"xmlparse" | b"xmlpi"
        | b"xmlroot" | b"xmltable" => (Kw::Other, true),
        _ => (Kw::Ident, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_ignore_case_and_length_limits() {
        assert_eq!(keyword(b"SeLeCt"), (Kw::Select, true));
        assert_eq!(keyword(b"TEMPORARY"), (Kw::Temp, false));
        assert_eq!(keyword(b"varying"), (Kw::Other, true));
        assert_eq!(keyword(b"nextval"), (Kw::Ident, false));
        assert_eq!(keyword(b"a_very_long_identifier_name"), (Kw::Ident, false));
    }
}
