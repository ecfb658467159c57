//! Where a backend node listens: a TCP socket address, or — for a `host` that starts
//! with `/`, as libpq and PgBouncer read it — a Unix-domain socket directory, whose
//! socket file is `{host}/.s.PGSQL.{port}`. Resolved once per configured node; cloning
//! one is a copy (TCP) or a reference count (Unix), never an allocation.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;

/// Longest socket path the kernel takes (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// A resolved node address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NodeAddr {
    Tcp(SocketAddr),
    /// The socket file, and the port its name carries (for host/port columns).
    Unix {
        path: Arc<Path>,
        port: u16,
    },
}

/// Does `host` name a Unix-socket directory (rather than a host name or IP address)?
pub fn is_socket_dir(host: &str) -> bool {
    host.starts_with('/')
}

/// The socket file PostgreSQL listens on in directory `dir` for `port`.
pub fn socket_path(dir: &str, port: u16) -> String {
    let dir = dir.trim_end_matches('/');
    format!("{dir}/.s.PGSQL.{port}")
}

/// The node's address as text: the socket file for a Unix-socket directory, else
/// "host:port" with IPv6 literals bracketed so the result resolves.
pub fn address(host: &str, port: u16) -> String {
    if is_socket_dir(host) {
        socket_path(host, port)
    } else if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl NodeAddr {
    /// Resolves a configured `host` and `port` (a TCP host name is looked up here, once).
    pub fn resolve(host: &str, port: u16) -> io::Result<NodeAddr> {
        if is_socket_dir(host) {
            let path = socket_path(host, port);
            return Ok(NodeAddr::Unix {
                path: Arc::from(Path::new(&path)),
                port,
            });
        }
        address(host, port)
            .to_socket_addrs()?
            .next()
            .map(NodeAddr::Tcp)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "address resolves to nothing"))
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, NodeAddr::Unix { .. })
    }

    /// The host part: the IP address, or the socket directory.
    pub fn host(&self) -> String {
        match self {
            NodeAddr::Tcp(addr) => addr.ip().to_string(),
            NodeAddr::Unix { path, .. } => path
                .parent()
                .map_or_else(String::new, |dir| dir.display().to_string()),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            NodeAddr::Tcp(addr) => addr.port(),
            NodeAddr::Unix { port, .. } => *port,
        }
    }

    /// The same address with a path of its own: a shard keeps its copy, so the
    /// reference counts it touches per connection live in its own memory.
    pub fn detached(&self) -> NodeAddr {
        match self {
            NodeAddr::Tcp(addr) => NodeAddr::Tcp(*addr),
            NodeAddr::Unix { path, port } => NodeAddr::Unix {
                path: Arc::from(&**path),
                port: *port,
            },
        }
    }
}

impl From<SocketAddr> for NodeAddr {
    fn from(addr: SocketAddr) -> Self {
        NodeAddr::Tcp(addr)
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeAddr::Tcp(addr) => write!(f, "{addr}"),
            NodeAddr::Unix { path, .. } => write!(f, "{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_starting_with_a_slash_is_a_socket_directory() {
        let addr = NodeAddr::resolve("/var/run/postgresql", 5432).unwrap();
        assert!(addr.is_unix());
        assert_eq!(addr.to_string(), "/var/run/postgresql/.s.PGSQL.5432");
        assert_eq!(addr.host(), "/var/run/postgresql");
        assert_eq!(addr.port(), 5432);
        // A trailing slash changes nothing.
        assert_eq!(
            NodeAddr::resolve("/tmp/", 6543).unwrap().to_string(),
            "/tmp/.s.PGSQL.6543"
        );
        assert_eq!(
            NodeAddr::resolve("/", 1).unwrap().to_string(),
            "/.s.PGSQL.1"
        );
        assert_eq!(address("/tmp", 5432), "/tmp/.s.PGSQL.5432");
    }

    #[test]
    fn other_hosts_are_tcp() {
        let addr = NodeAddr::resolve("127.0.0.1", 5432).unwrap();
        assert_eq!(addr, NodeAddr::Tcp("127.0.0.1:5432".parse().unwrap()));
        assert!(!addr.is_unix());
        assert_eq!((addr.host().as_str(), addr.port()), ("127.0.0.1", 5432));
        let v6 = NodeAddr::resolve("::1", 6432).unwrap();
        assert_eq!(v6.to_string(), "[::1]:6432");
        assert_eq!(address("::1", 6432), "[::1]:6432");
        assert_eq!(address("db.local", 5432), "db.local:5432");
        assert!(!is_socket_dir("run/pg"));
    }

    #[test]
    fn a_detached_copy_is_equal_but_its_own() {
        let addr = NodeAddr::resolve("/tmp", 5432).unwrap();
        let copy = addr.detached();
        assert_eq!(addr, copy);
        let (NodeAddr::Unix { path: a, .. }, NodeAddr::Unix { path: b, .. }) = (&addr, &copy)
        else {
            unreachable!()
        };
        assert!(!Arc::ptr_eq(a, b));
    }
}
