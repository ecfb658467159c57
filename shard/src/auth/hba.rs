//! Host-based rules in `pg_hba.conf` syntax (`[auth] auth_hba_file`): the first line that
//! matches a login's connection type, database, user and address decides its method;
//! no match, or `reject`, refuses it with PostgreSQL's words.
//!
//! Supported: `host`, `hostssl`, `hostnossl`, `hostgssenc` (never matches: GSS encryption
//! is declined), `hostnogssenc`, and `local` (never matches: the proxy listens on TCP);
//! databases and users as comma lists of names (quoted or not) or `all`, databases also
//! `sameuser`; addresses as CIDR, address plus netmask, or `all`; methods `trust`,
//! `reject`, `password`, `md5`, `scram-sha-256` and `cert`. Options after the method are
//! accepted and ignored. Anything else is refused when the file is read, naming the line.

use std::net::IpAddr;

use crate::config::AuthMethod;

/// What a matching line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Method(AuthMethod),
    Reject,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnType {
    Local,
    Host,
    HostSsl,
    HostNoSsl,
    HostGssEnc,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Names {
    All,
    /// (databases only) the database named like the user.
    SameUser,
    List(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    conn: ConnType,
    databases: Vec<Names>,
    users: Names,
    /// Network address and prefix length; `None` = all.
    net: Option<(IpAddr, u8)>,
    decision: Decision,
}

/// The parsed file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hba {
    rules: Vec<Rule>,
}

/// Reads `[auth] auth_hba_file`, if set.
pub fn load(auth: &crate::config::AuthConfig) -> Result<Option<Hba>, String> {
    let Some(path) = &auth.auth_hba_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    Hba::parse(&text)
        .map(Some)
        .map_err(|e| format!("{path}: {e}"))
}

impl Hba {
    /// Parses the file's text; the error names the line.
    pub fn parse(text: &str) -> Result<Hba, String> {
        let mut rules = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            rules.push(rule(line).map_err(|e| format!("line {}: {e}", index + 1))?);
        }
        Ok(Hba { rules })
    }

    /// The first matching line's decision, or `None` when no line matches.
    pub fn decide(&self, tls: bool, addr: IpAddr, user: &str, database: &str) -> Option<Decision> {
        self.rules
            .iter()
            .find(|r| r.matches(tls, addr, user, database))
            .map(|r| r.decision)
    }
}

impl Rule {
    fn matches(&self, tls: bool, addr: IpAddr, user: &str, database: &str) -> bool {
        let conn = match self.conn {
            ConnType::Local | ConnType::HostGssEnc => false,
            ConnType::Host => true,
            ConnType::HostSsl => tls,
            ConnType::HostNoSsl => !tls,
        };
        conn && self.databases.iter().any(|d| match d {
            Names::All => true,
            Names::SameUser => database == user,
            Names::List(names) => names.iter().any(|n| n == database),
        }) && match &self.users {
            Names::All => true,
            Names::SameUser => false,
            Names::List(names) => names.iter().any(|n| n == user),
        } && self
            .net
            .is_none_or(|(net, prefix)| in_network(addr, net, prefix))
    }
}

fn in_network(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let addr = match (addr, net) {
        // An IPv4 client seen through an IPv6 socket.
        (IpAddr::V6(v6), IpAddr::V4(_)) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        _ => addr,
    };
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Splits a line into fields: whitespace-separated, double quotes keep spaces and commas.
fn fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
                // Keep the quotes so keywords in quotes stay names.
                current.push('"');
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut current));
                    any = false;
                }
            }
            c => {
                current.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(current);
    }
    out
}

/// A comma list of names and (unquoted) keywords.
fn names(field: &str, databases: bool) -> Result<Vec<Names>, String> {
    let mut list = Vec::new();
    let mut plain = Vec::new();
    for item in field.split(',') {
        if item.is_empty() {
            return Err(format!("empty name in `{field}`"));
        }
        if let Some(inner) = item.strip_prefix('"').and_then(|i| i.strip_suffix('"')) {
            plain.push(inner.to_string());
            continue;
        }
        match item {
            "all" => list.push(Names::All),
            "sameuser" if databases => list.push(Names::SameUser),
            "samerole" | "samegroup" | "replication" if databases => {
                return Err(format!("`{item}` is not supported by the proxy"))
            }
            _ if item.starts_with('+') || item.starts_with('@') || item.starts_with('/') => {
                return Err(format!(
                    "`{item}`: group membership, included files and regular expressions are not supported"
                ))
            }
            _ => plain.push(item.to_string()),
        }
    }
    if !plain.is_empty() {
        list.push(Names::List(plain));
    }
    Ok(list)
}

fn rule(line: &str) -> Result<Rule, String> {
    let fields = fields(line);
    let mut it = fields.iter().map(String::as_str);
    let conn = match it.next() {
        Some("local") => ConnType::Local,
        Some("host") | Some("hostnogssenc") => ConnType::Host,
        Some("hostssl") => ConnType::HostSsl,
        Some("hostnossl") => ConnType::HostNoSsl,
        Some("hostgssenc") => ConnType::HostGssEnc,
        Some(other) => return Err(format!("invalid connection type `{other}`")),
        None => return Err("empty line".into()),
    };
    let databases = names(it.next().ok_or("missing database field")?, true)?;
    let users = names(it.next().ok_or("missing user field")?, false)?;
    let users = if users.contains(&Names::All) {
        Names::All
    } else {
        users.into_iter().next().ok_or("missing user field")?
    };
    let net = if conn == ConnType::Local {
        None
    } else {
        let address = it.next().ok_or("missing address field")?;
        match address {
            "all" => None,
            "samehost" | "samenet" => return Err(format!("`{address}` is not supported")),
            _ => Some(network(address, &mut it)?),
        }
    };
    let method = it.next().ok_or("missing authentication method")?;
    let decision = match method {
        "trust" => Decision::Method(AuthMethod::Trust),
        "reject" => Decision::Reject,
        "password" => Decision::Method(AuthMethod::Password),
        "md5" => Decision::Method(AuthMethod::Md5),
        "scram-sha-256" => Decision::Method(AuthMethod::ScramSha256),
        "cert" => Decision::Method(AuthMethod::Cert),
        other => {
            return Err(format!(
                "authentication method `{other}` is not supported by the proxy"
            ))
        }
    };
    for option in it {
        if !option.contains('=') {
            return Err(format!(
                "`{option}` after the method is not an option (name=value)"
            ));
        }
    }
    Ok(Rule {
        conn,
        databases,
        users,
        net,
        decision,
    })
}

/// `a.b.c.d/n`, an IPv6 CIDR, or an address followed by a netmask field.
fn network<'a>(
    address: &str,
    rest: &mut impl Iterator<Item = &'a str>,
) -> Result<(IpAddr, u8), String> {
    if let Some((ip, prefix)) = address.split_once('/') {
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("invalid IP address `{ip}`"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("invalid CIDR mask in `{address}`"))?;
        return Ok((ip, prefix));
    }
    let ip: IpAddr = address
        .parse()
        .map_err(|_| format!("invalid IP address `{address}` (host names are not supported)"))?;
    let mask: IpAddr = rest
        .next()
        .ok_or("missing netmask after the address")?
        .parse()
        .map_err(|_| "invalid netmask".to_string())?;
    let bits = match mask {
        IpAddr::V4(m) => u32::from(m).leading_ones() as u8,
        IpAddr::V6(m) => u128::from(m).leading_ones() as u8,
    };
    Ok((ip, bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn first_match_wins_by_type_database_user_and_address() {
        let hba = Hba::parse(
            "# comment\n\
             local all all trust\n\
             hostssl app alice 127.0.0.1/32 cert\n\
             host app alice 127.0.0.1/32 reject\n\
             host \"app\",other bob,\"carol\" 10.0.0.0 255.0.0.0 md5\n\
             hostnossl sameuser all all scram-sha-256 clientcert=verify-ca\n\
             host all all ::1/128 trust\n",
        )
        .expect("valid");
        let local = ip("127.0.0.1");
        assert_eq!(
            hba.decide(true, local, "alice", "app"),
            Some(Decision::Method(AuthMethod::Cert))
        );
        assert_eq!(
            hba.decide(false, local, "alice", "app"),
            Some(Decision::Reject)
        );
        assert_eq!(
            hba.decide(false, ip("10.1.2.3"), "carol", "other"),
            Some(Decision::Method(AuthMethod::Md5))
        );
        assert_eq!(hba.decide(false, ip("11.1.2.3"), "carol", "other"), None);
        assert_eq!(
            hba.decide(false, local, "dave", "dave"),
            Some(Decision::Method(AuthMethod::ScramSha256))
        );
        assert_eq!(hba.decide(true, local, "dave", "dave"), None, "hostnossl");
        assert_eq!(
            hba.decide(false, ip("::1"), "x", "y"),
            Some(Decision::Method(AuthMethod::Trust))
        );
        assert_eq!(
            hba.decide(false, ip("::ffff:10.9.9.9"), "bob", "app"),
            Some(Decision::Method(AuthMethod::Md5)),
            "an IPv4 client on an IPv6 socket"
        );
    }

    #[test]
    fn unsupported_or_malformed_lines_name_the_line() {
        for (text, words) in [
            ("host all all 127.0.0.1/32 peer", "method `peer`"),
            ("hostx all all all trust", "connection type"),
            ("host all +admins all trust", "group"),
            ("host all all 127.0.0.1/33 trust", "CIDR"),
            ("host all all db.example.com trust", "host names"),
            ("host all all", "missing address"),
            ("host all all 127.0.0.1/32", "method"),
        ] {
            let error = Hba::parse(&format!("# first\n{text}\n")).expect_err(text);
            assert!(
                error.starts_with("line 2: ") && error.contains(words),
                "{text}: {error}"
            );
        }
    }
}
