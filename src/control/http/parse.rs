//! One HTTP/1.x request head, parsed with httparse, and how its body is framed. Only what
//! the admin API needs: Content-Length bodies up to [`MAX_BODY`]; a Transfer-Encoding is
//! refused, because a body whose end cannot be found cannot be skipped safely.

/// Request bodies larger than this are refused (the API takes no large input).
pub const MAX_BODY: usize = 64 * 1024;

/// A longer request head is refused: no admin request comes near it.
pub const MAX_HEAD: usize = 16 * 1024;

const MAX_HEADERS: usize = 64;

/// A request as the router sees it. Header values that are not UTF-8 are dropped (the
/// API reads none that could be).
#[derive(Debug, Default)]
pub struct Request {
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The target without its query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// A complete request head.
#[derive(Debug)]
pub struct Head {
    /// The request, its body still to be read.
    pub request: Request,
    /// Bytes the head took in the buffer.
    pub len: usize,
    /// Body bytes that follow the head.
    pub body_len: usize,
    /// The connection may carry another request after this one.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before sending the body.
    pub expects_continue: bool,
}

/// Why a request head was refused: the status and message of the JSON error.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

/// Parses the head at the start of `buf`: `Ok(None)` while it is incomplete.
pub fn head(buf: &[u8]) -> Result<Option<Head>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(refuse(
                431,
                format!("request head larger than {MAX_HEAD} bytes"),
            ))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(
                431,
                format!("more than {MAX_HEADERS} header fields"),
            ))
        }
        Err(e) => return Err(refuse(400, format!("malformed request: {e}"))),
    };
    if len > MAX_HEAD {
        return Err(refuse(
            431,
            format!("request head larger than {MAX_HEAD} bytes"),
        ));
    }
    let request = Request {
        method: parsed.method.unwrap_or_default().to_string(),
        target: parsed.path.unwrap_or_default().to_string(),
        headers: parsed
            .headers
            .iter()
            .filter_map(|h| {
                Some((
                    h.name.to_string(),
                    std::str::from_utf8(h.value).ok()?.trim().to_string(),
                ))
            })
            .collect(),
        body: Vec::new(),
    };
    let http11 = parsed.version == Some(1);
    if let Some(coding) = request.header("transfer-encoding") {
        return Err(if coding.eq_ignore_ascii_case("chunked") {
            refuse(
                411,
                "chunked request bodies are not accepted; send Content-Length",
            )
        } else {
            refuse(
                501,
                format!("Transfer-Encoding `{coding}` is not supported"),
            )
        });
    }
    let body_len = content_length(&request)?;
    let connection = request.header("connection").unwrap_or("");
    let has = |token: &str| {
        connection
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let keep_alive = if http11 {
        !has("close")
    } else {
        has("keep-alive")
    };
    let expects_continue = http11
        && request
            .header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"));
    Ok(Some(Head {
        request,
        len,
        body_len,
        keep_alive,
        expects_continue,
    }))
}

/// The body length: every Content-Length must agree and be at most [`MAX_BODY`].
fn content_length(request: &Request) -> Result<usize, Refusal> {
    let mut length = None;
    for (_, value) in request
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        let this: u64 = value
            .parse()
            .map_err(|_| refuse(400, format!("malformed Content-Length `{value}`")))?;
        if length.is_some_and(|l| l != this) {
            return Err(refuse(400, "conflicting Content-Length headers"));
        }
        length = Some(this);
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY as u64 {
        return Err(refuse(
            400,
            format!("request body too large ({length} bytes; at most {MAX_BODY})"),
        ));
    }
    Ok(length as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(text: &str) -> Head {
        head(text.as_bytes()).expect("valid").expect("complete")
    }

    #[test]
    fn a_simple_get() {
        let h = complete("GET /nodes/a%3A1?x=1 HTTP/1.1\r\nHost: h\r\nX-Y:  z \r\n\r\nrest");
        assert_eq!(h.request.method, "GET");
        assert_eq!(h.request.path(), "/nodes/a%3A1");
        assert_eq!(h.request.header("x-y"), Some("z"));
        assert_eq!(
            h.len,
            "GET /nodes/a%3A1?x=1 HTTP/1.1\r\nHost: h\r\nX-Y:  z \r\n\r\n".len()
        );
        assert_eq!(h.body_len, 0);
        assert!(h.keep_alive);
        assert!(!h.expects_continue);
    }

    #[test]
    fn partial_heads_wait_for_more() {
        assert!(head(b"GET /health HTTP/1.1\r\nHost:").unwrap().is_none());
        assert!(head(b"").unwrap().is_none());
    }

    #[test]
    fn connection_persistence_follows_the_version() {
        assert!(!complete("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!complete("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(complete("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!complete("GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n").keep_alive);
    }

    #[test]
    fn bodies_are_framed_by_content_length() {
        let h = complete("POST /x HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n");
        assert_eq!(h.body_len, 5);
        assert!(h.expects_continue);
        let twice = "POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(complete(twice).body_len, 5);
    }

    #[test]
    fn refusals_carry_their_status() {
        let status = |text: &str| head(text.as_bytes()).expect_err("refused").status;
        assert_eq!(status("GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status("GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            501
        );
        assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), 400);
        assert_eq!(status("GET\x01 / HTTP/1.1\r\n\r\n"), 400);
        let many: String = (0..70).map(|i| format!("h{i}: v\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(&long), 431);
    }
}
