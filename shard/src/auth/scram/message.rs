//! Strict parsers for the four SCRAM messages (RFC 5802 §7). Every message is untrusted
//! input, so each attribute is checked for order, syntax and size before it is used, and
//! every failure is an error value, never a panic.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use super::keys::{Key, KEY_LEN};
use super::ScramError;

/// The largest iteration count accepted from a server, PostgreSQL's own limit (INT_MAX).
const MAX_ITERATIONS: u32 = i32::MAX as u32;

/// The client-first-message, as a server sees it.
#[derive(Debug)]
pub(crate) struct ClientFirst<'a> {
    /// "n,," or "y,,": echoed back, base64-encoded, in the client-final-message.
    pub gs2_header: &'a [u8],
    /// client-first-message-bare, the first part of the AuthMessage.
    pub bare: &'a [u8],
    pub nonce: &'a [u8],
}

/// The server-first-message, as a client sees it.
#[derive(Debug)]
pub(crate) struct ServerFirst<'a> {
    /// Client nonce followed by the server's part.
    pub nonce: &'a [u8],
    pub salt: Vec<u8>,
    pub iterations: u32,
}

/// The client-final-message, as a server sees it.
#[derive(Debug)]
pub(crate) struct ClientFinal<'a> {
    /// Decoded "c=" attribute: the gs2 header again, since channel binding is not offered.
    pub channel_binding: Vec<u8>,
    pub nonce: &'a [u8],
    /// client-final-message-without-proof, the last part of the AuthMessage.
    pub without_proof: &'a [u8],
    pub proof: Key,
}

/// Cursor over the comma-separated `x=value` attributes of one message.
struct Attributes<'a> {
    message: &'a [u8],
    /// Offset of the next unread attribute, or `None` once the message is exhausted.
    next: Option<usize>,
}

impl<'a> Attributes<'a> {
    fn new(message: &'a [u8]) -> Self {
        Attributes {
            message,
            next: Some(0),
        }
    }

    /// Offset in the message at which the next attribute starts (its length at the end).
    fn offset(&self) -> usize {
        self.next.unwrap_or(self.message.len())
    }

    fn is_empty(&self) -> bool {
        self.next.is_none()
    }

    fn peek_name(&self) -> Option<u8> {
        self.next.and_then(|at| self.message.get(at).copied())
    }

    /// Reads the next attribute as (name, value); `Ok(None)` at the end of the message.
    fn next_any(&mut self) -> Result<Option<(u8, &'a [u8])>, ScramError> {
        let Some(start) = self.next else {
            return Ok(None);
        };
        let rest = &self.message[start..];
        let (attribute, next) = match rest.iter().position(|&b| b == b',') {
            Some(comma) => (&rest[..comma], Some(start + comma + 1)),
            None => (rest, None),
        };
        self.next = next;
        match attribute {
            [name, b'=', value @ ..] if name.is_ascii_alphabetic() => Ok(Some((*name, value))),
            _ => Err(ScramError::Malformed(
                "attribute is not of the form x=value",
            )),
        }
    }

    /// Reads the next attribute, which must be named `name`.
    fn expect(&mut self, name: u8, missing: &'static str) -> Result<&'a [u8], ScramError> {
        match self.next_any()? {
            Some((found, value)) if found == name => Ok(value),
            _ => Err(ScramError::Malformed(missing)),
        }
    }

    /// Requires that the message has been read completely.
    fn finish(&self, garbage: &'static str) -> Result<(), ScramError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(ScramError::Malformed(garbage))
        }
    }

    /// Skips optional extension attributes up to the end, checking only their syntax.
    fn skip_extensions(&mut self) -> Result<(), ScramError> {
        while self.next_any()?.is_some() {}
        Ok(())
    }
}

/// Parses `gs2-header client-first-message-bare`. Channel binding ("p=") and authorization
/// identities ("a=") are refused, as PostgreSQL does without TLS channel binding.
pub(crate) fn parse_client_first(data: &[u8]) -> Result<ClientFirst<'_>, ScramError> {
    let header_len = gs2_header_len(data)?;
    let (gs2_header, bare) = data.split_at(header_len);
    let mut attributes = Attributes::new(bare);
    if attributes.peek_name() == Some(b'm') {
        return Err(ScramError::Unsupported("mandatory SCRAM extensions"));
    }
    // PostgreSQL takes the user name from the startup packet and ignores this one.
    attributes.expect(b'n', "client-first-message lacks the user name (n=)")?;
    let nonce = attributes.expect(b'r', "client-first-message lacks the nonce (r=)")?;
    check_nonce(nonce)?;
    attributes.skip_extensions()?;
    Ok(ClientFirst {
        gs2_header,
        bare,
        nonce,
    })
}

/// Length of the gs2 header "n,," or "y,," at the start of a client-first-message.
fn gs2_header_len(data: &[u8]) -> Result<usize, ScramError> {
    match data {
        [b'n' | b'y', b',', rest @ ..] => match rest {
            [b',', ..] => Ok(3),
            [b'a', b'=', ..] => Err(ScramError::Unsupported("authorization identities")),
            _ => Err(ScramError::Malformed("invalid gs2 header")),
        },
        [b'p', ..] => Err(ScramError::Unsupported("channel binding")),
        _ => Err(ScramError::Malformed("invalid channel binding flag")),
    }
}

/// Parses `r=nonce,s=salt,i=iterations`, refusing trailing attributes as libpq does.
pub(crate) fn parse_server_first(data: &[u8]) -> Result<ServerFirst<'_>, ScramError> {
    let mut attributes = Attributes::new(data);
    if attributes.peek_name() == Some(b'm') {
        return Err(ScramError::Unsupported("mandatory SCRAM extensions"));
    }
    let nonce = attributes.expect(b'r', "server-first-message lacks the nonce (r=)")?;
    check_nonce(nonce)?;
    let salt = decode_base64(
        attributes.expect(b's', "server-first-message lacks the salt (s=)")?,
        "salt is not valid base64",
    )?;
    if salt.is_empty() {
        return Err(ScramError::Malformed("salt is empty"));
    }
    let iterations = parse_iterations(
        attributes.expect(b'i', "server-first-message lacks the iteration count (i=)")?,
    )?;
    attributes.finish("garbage at the end of server-first-message")?;
    Ok(ServerFirst {
        nonce,
        salt,
        iterations,
    })
}

/// Parses `c=binding,r=nonce[,extensions],p=proof`; the proof must come last.
pub(crate) fn parse_client_final(data: &[u8]) -> Result<ClientFinal<'_>, ScramError> {
    let mut attributes = Attributes::new(data);
    let channel_binding = decode_base64(
        attributes.expect(b'c', "client-final-message lacks channel binding (c=)")?,
        "channel binding is not valid base64",
    )?;
    let nonce = attributes.expect(b'r', "client-final-message lacks the nonce (r=)")?;
    loop {
        let attribute_start = attributes.offset();
        match attributes.next_any()? {
            Some((b'p', value)) => {
                attributes.finish("garbage after the proof in client-final-message")?;
                // The proof follows "c=…,r=…", so a comma precedes it.
                let without_proof = &data[..attribute_start.saturating_sub(1)];
                return Ok(ClientFinal {
                    channel_binding,
                    nonce,
                    without_proof,
                    proof: decode_key(value, "client proof is not a base64 SHA-256 value")?,
                });
            }
            Some(_extension) => {}
            None => {
                return Err(ScramError::Malformed(
                    "client-final-message lacks the proof (p=)",
                ))
            }
        }
    }
}

/// Server signature from the server-final-message `v=signature`. A server error ("e=")
/// is reported as malformed since PostgreSQL never sends one (it uses ErrorResponse).
pub(crate) fn parse_server_final(data: &[u8]) -> Result<Key, ScramError> {
    let mut attributes = Attributes::new(data);
    if attributes.peek_name() == Some(b'e') {
        return Err(ScramError::Malformed(
            "server-final-message reports an error",
        ));
    }
    let signature = decode_key(
        attributes.expect(b'v', "server-final-message lacks the verifier (v=)")?,
        "server signature is not a base64 SHA-256 value",
    )?;
    attributes.finish("garbage at the end of server-final-message")?;
    Ok(signature)
}

/// A nonce is a non-empty run of printable ASCII other than ',' (RFC 5802 `printable`).
fn check_nonce(nonce: &[u8]) -> Result<(), ScramError> {
    let printable = |b: &u8| (0x21..=0x7e).contains(b) && *b != b',';
    if !nonce.is_empty() && nonce.iter().all(printable) {
        Ok(())
    } else {
        Err(ScramError::Malformed("nonce is empty or not printable"))
    }
}

/// Decimal iteration count in 1..=MAX_ITERATIONS, digits only (no sign, no spaces).
pub(crate) fn parse_iterations(value: &[u8]) -> Result<u32, ScramError> {
    const INVALID: ScramError = ScramError::Malformed("invalid iteration count");
    if value.is_empty() || value.len() > 10 || !value.iter().all(u8::is_ascii_digit) {
        return Err(INVALID);
    }
    let count = value
        .iter()
        .fold(0u64, |acc, digit| acc * 10 + u64::from(digit - b'0'));
    match u32::try_from(count) {
        Ok(count) if (1..=MAX_ITERATIONS).contains(&count) => Ok(count),
        _ => Err(INVALID),
    }
}

pub(crate) fn decode_base64(value: &[u8], invalid: &'static str) -> Result<Vec<u8>, ScramError> {
    BASE64
        .decode(value)
        .map_err(|_| ScramError::Malformed(invalid))
}

/// Decodes a base64 value that must hold exactly one SHA-256 sized key.
pub(crate) fn decode_key(value: &[u8], invalid: &'static str) -> Result<Key, ScramError> {
    // Reject oversized input before decoding it: a key encodes to exactly 44 characters.
    if value.len() != KEY_LEN.div_ceil(3) * 4 {
        return Err(ScramError::Malformed(invalid));
    }
    decode_base64(value, invalid)?
        .try_into()
        .map_err(|_| ScramError::Malformed(invalid))
}

pub(crate) fn encode_base64(data: &[u8]) -> String {
    BASE64.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn malformed<T: std::fmt::Debug>(result: Result<T, ScramError>) -> bool {
        matches!(result, Err(ScramError::Malformed(_)))
    }

    fn unsupported<T: std::fmt::Debug>(result: Result<T, ScramError>) -> bool {
        matches!(result, Err(ScramError::Unsupported(_)))
    }

    #[test]
    fn client_first_splits_header_and_bare() {
        let parsed = parse_client_first(b"n,,n=,r=abc").expect("valid");
        assert_eq!(parsed.gs2_header, b"n,,");
        assert_eq!(parsed.bare, b"n=,r=abc");
        assert_eq!(parsed.nonce, b"abc");
        let parsed = parse_client_first(b"y,,n=user,r=x,q=ext").expect("valid");
        assert_eq!(parsed.gs2_header, b"y,,");
        assert_eq!(parsed.nonce, b"x");
    }

    #[test]
    fn client_first_refusals() {
        assert!(unsupported(parse_client_first(
            b"p=tls-server-end-point,,n=,r=a"
        )));
        assert!(unsupported(parse_client_first(b"n,a=admin,n=,r=a")));
        assert!(unsupported(parse_client_first(b"n,,m=ext,n=,r=a")));
        for bad in [
            &b""[..],
            b"n",
            b"n,",
            b"x,,n=,r=a",
            b"n,x,n=,r=a",
            b"n,,",
            b"n,,r=a",
            b"n,,n=,r=",
            b"n,,n=,r=a\x01b",
            b"n,,n=,s=a",
            b"n,,n=,r=a,",
            b"n,,n=,r=a,=x",
            b"n,,n=,r=a,1=x",
            b"n,,n=,r=a,q",
        ] {
            assert!(malformed(parse_client_first(bad)), "{bad:?}");
        }
    }

    #[test]
    fn server_first_parses_and_checks() {
        let parsed = parse_server_first(b"r=abcdef,s=c2FsdA==,i=4096").expect("valid");
        assert_eq!(parsed.nonce, b"abcdef");
        assert_eq!(parsed.salt, b"salt");
        assert_eq!(parsed.iterations, 4096);
        assert!(unsupported(parse_server_first(b"m=x,r=a,s=c2FsdA==,i=1")));
        for bad in [
            &b"r=a,s=c2FsdA==,i=4096,x=y"[..],
            b"r=a,s=c2FsdA=,i=4096",
            b"r=a,s=,i=4096",
            b"r=a,s=c2FsdA==,i=0",
            b"r=a,s=c2FsdA==,i=+5",
            b"r=a,s=c2FsdA==,i=4294967296",
            b"r=a,s=c2FsdA==,i=99999999999999999999",
            b"r=a,s=c2FsdA==,i=2147483648",
            b"r=a,s=c2FsdA==",
            b"s=c2FsdA==,r=a,i=1",
            b"",
        ] {
            assert!(malformed(parse_server_first(bad)), "{bad:?}");
        }
    }

    #[test]
    fn client_final_finds_proof_and_prefix() {
        let proof = encode_base64(&[7u8; 32]);
        let message = format!("c=biws,r=abc,x=ext,p={proof}");
        let parsed = parse_client_final(message.as_bytes()).expect("valid");
        assert_eq!(parsed.channel_binding, b"n,,");
        assert_eq!(parsed.nonce, b"abc");
        assert_eq!(parsed.without_proof, b"c=biws,r=abc,x=ext");
        assert_eq!(parsed.proof, [7u8; 32]);
    }

    #[test]
    fn client_final_rejects_malformed() {
        let proof = encode_base64(&[7u8; 32]);
        let short = encode_base64(&[7u8; 31]);
        for bad in [
            format!("c=biws,r=abc,p={proof},x=y"),
            format!("c=biws,r=abc,p={short}"),
            format!("c=biws,r=abc,p={proof}AAAA"),
            format!("c=bi!s,r=abc,p={proof}"),
            format!("r=abc,c=biws,p={proof}"),
            format!("c=biws,p={proof}"),
            "c=biws,r=abc".to_string(),
            "c=biws,r=abc,p=".to_string(),
            String::new(),
        ] {
            assert!(malformed(parse_client_final(bad.as_bytes())), "{bad}");
        }
    }

    proptest::proptest! {
        /// No input makes a parser panic, and accepted client-final proofs are 32 bytes.
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_client_first(&data);
            let _ = parse_server_first(&data);
            let _ = parse_server_final(&data);
            if let Ok(last) = parse_client_final(&data) {
                proptest::prop_assert!(data.starts_with(last.without_proof));
            }
        }

        /// Attribute-shaped input exercises the deeper branches that random bytes rarely reach.
        #[test]
        fn attribute_soup_never_panics(data in "([cnprsvimye]=[A-Za-z0-9+/=,]{0,50}){0,6}") {
            let _ = parse_client_first(data.as_bytes());
            let _ = parse_client_final(data.as_bytes());
            let _ = parse_server_first(data.as_bytes());
            let _ = parse_server_final(data.as_bytes());
        }
    }

    #[test]
    fn server_final_parses_and_checks() {
        let signature = encode_base64(&[9u8; 32]);
        let parsed = parse_server_final(format!("v={signature}").as_bytes()).expect("valid");
        assert_eq!(parsed, [9u8; 32]);
        for bad in [
            "e=invalid-proof".to_string(),
            format!("v={signature},x=y"),
            "v=AAAA".to_string(),
            "v=".to_string(),
            String::new(),
        ] {
            assert!(malformed(parse_server_final(bad.as_bytes())), "{bad}");
        }
    }
}
