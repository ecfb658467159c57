//! Messages a client sends after the startup packet. Decoding borrows from the body;
//! strings are raw bytes without their NUL because client encodings need not be UTF-8.

use super::frame::{
    decode_empty, decode_single_string, put_count, put_cstr, put_nullable, write_message, Reader,
    TagSet,
};
use super::CodecError;

pub use super::frame::{FormatCodes, ParamTypes, Values};

/// Every valid frontend tag after startup.
pub const TAGS: TagSet = TagSet::new(b"QPBDECSHdcfFXp");

/// A decoded frontend message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    Query(&'a [u8]),
    Parse {
        name: &'a [u8],
        query: &'a [u8],
        param_types: ParamTypes<'a>,
    },
    Bind(Bind<'a>),
    /// `kind` is `b'S'` (prepared statement) or `b'P'` (portal).
    Describe {
        kind: u8,
        name: &'a [u8],
    },
    Execute {
        portal: &'a [u8],
        max_rows: i32,
    },
    /// `kind` is `b'S'` (prepared statement) or `b'P'` (portal).
    Close {
        kind: u8,
        name: &'a [u8],
    },
    Sync,
    Flush,
    CopyData(&'a [u8]),
    CopyDone,
    CopyFail(&'a [u8]),
    FunctionCall(FunctionCall<'a>),
    Terminate,
    /// The raw 'p' body. Its layout depends on the authentication exchange in progress
    /// (password, SASLInitialResponse, SASLResponse, GSSResponse), which only the caller
    /// knows; see [`decode_password`] and [`decode_sasl_initial`].
    Password(&'a [u8]),
}

/// Bind: creates a portal from a prepared statement and parameter values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    portal: &'a [u8],
    statement: &'a [u8],
    param_formats: FormatCodes<'a>,
    params: Values<'a>,
    result_formats: FormatCodes<'a>,
}

impl<'a> Bind<'a> {
    pub fn portal(&self) -> &'a [u8] {
        self.portal
    }

    pub fn statement(&self) -> &'a [u8] {
        self.statement
    }

    /// None: all text; one: applies to all parameters; else one per parameter.
    pub fn param_formats(&self) -> FormatCodes<'a> {
        self.param_formats
    }

    pub fn params(&self) -> Values<'a> {
        self.params
    }

    /// Same convention as [`Bind::param_formats`], for result columns.
    pub fn result_formats(&self) -> FormatCodes<'a> {
        self.result_formats
    }
}

/// FunctionCall: the legacy fast-path function call interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionCall<'a> {
    oid: u32,
    arg_formats: FormatCodes<'a>,
    args: Values<'a>,
    result_format: i16,
}

impl<'a> FunctionCall<'a> {
    pub fn oid(&self) -> u32 {
        self.oid
    }

    pub fn arg_formats(&self) -> FormatCodes<'a> {
        self.arg_formats
    }

    pub fn args(&self) -> Values<'a> {
        self.args
    }

    pub fn result_format(&self) -> i16 {
        self.result_format
    }
}

/// Decodes the body of a message with the given tag; strict: every length checked, no
/// trailing bytes.
pub fn decode(tag: u8, body: &[u8]) -> Result<FrontendMessage<'_>, CodecError> {
    use FrontendMessage as M;
    match tag {
        b'Q' => decode_single_string(body, "Query").map(M::Query),
        b'P' => decode_parse(body),
        b'B' => decode_bind(body).map(M::Bind),
        b'D' => decode_target(body, "Describe").map(|(kind, name)| M::Describe { kind, name }),
        b'E' => decode_execute(body),
        b'C' => decode_target(body, "Close").map(|(kind, name)| M::Close { kind, name }),
        b'S' => decode_empty(body, "Sync").map(|()| M::Sync),
        b'H' => decode_empty(body, "Flush").map(|()| M::Flush),
        b'd' => Ok(M::CopyData(body)),
        b'c' => decode_empty(body, "CopyDone").map(|()| M::CopyDone),
        b'f' => decode_single_string(body, "CopyFail").map(M::CopyFail),
        b'F' => decode_function_call(body).map(M::FunctionCall),
        b'X' => decode_empty(body, "Terminate").map(|()| M::Terminate),
        b'p' => Ok(M::Password(body)),
        _ => Err(CodecError::UnknownTag(tag)),
    }
}

fn decode_parse(body: &[u8]) -> Result<FrontendMessage<'_>, CodecError> {
    let mut reader = Reader::new(body, "Parse");
    let name = reader.cstr()?;
    let query = reader.cstr()?;
    let param_types = reader.param_types()?;
    reader.finish()?;
    Ok(FrontendMessage::Parse {
        name,
        query,
        param_types,
    })
}

fn decode_bind(body: &[u8]) -> Result<Bind<'_>, CodecError> {
    let mut reader = Reader::new(body, "Bind");
    let bind = Bind {
        portal: reader.cstr()?,
        statement: reader.cstr()?,
        param_formats: reader.format_codes()?,
        params: reader.values()?,
        result_formats: reader.format_codes()?,
    };
    reader.finish()?;
    Ok(bind)
}

/// The `kind` + name body shared by Describe and Close.
fn decode_target<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a [u8]), CodecError> {
    let mut reader = Reader::new(body, what);
    let kind = reader.u8()?;
    if !matches!(kind, b'S' | b'P') {
        return Err(reader.error("kind must be 'S' or 'P'"));
    }
    let name = reader.cstr()?;
    reader.finish()?;
    Ok((kind, name))
}

fn decode_execute(body: &[u8]) -> Result<FrontendMessage<'_>, CodecError> {
    let mut reader = Reader::new(body, "Execute");
    let portal = reader.cstr()?;
    let max_rows = reader.i32()?;
    reader.finish()?;
    Ok(FrontendMessage::Execute { portal, max_rows })
}

fn decode_function_call(body: &[u8]) -> Result<FunctionCall<'_>, CodecError> {
    let mut reader = Reader::new(body, "FunctionCall");
    let call = FunctionCall {
        oid: reader.u32()?,
        arg_formats: reader.format_codes()?,
        args: reader.values()?,
        result_format: reader.i16()?,
    };
    reader.finish()?;
    Ok(call)
}

impl FrontendMessage<'_> {
    pub fn tag(&self) -> u8 {
        use FrontendMessage as M;
        match self {
            M::Query(_) => b'Q',
            M::Parse { .. } => b'P',
            M::Bind(_) => b'B',
            M::Describe { .. } => b'D',
            M::Execute { .. } => b'E',
            M::Close { .. } => b'C',
            M::Sync => b'S',
            M::Flush => b'H',
            M::CopyData(_) => b'd',
            M::CopyDone => b'c',
            M::CopyFail(_) => b'f',
            M::FunctionCall(_) => b'F',
            M::Terminate => b'X',
            M::Password(_) => b'p',
        }
    }

    /// Appends the whole message, header included.
    pub fn encode(&self, out: &mut Vec<u8>) {
        write_message(out, self.tag(), |out| self.encode_body(out));
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        use FrontendMessage as M;
        match self {
            M::Query(s) | M::CopyFail(s) => put_cstr(out, s),
            M::Parse {
                name,
                query,
                param_types,
            } => {
                put_cstr(out, name);
                put_cstr(out, query);
                param_types.encode(out);
            }
            M::Bind(bind) => {
                put_cstr(out, bind.portal);
                put_cstr(out, bind.statement);
                bind.param_formats.encode(out);
                bind.params.encode(out);
                bind.result_formats.encode(out);
            }
            M::Describe { kind, name } | M::Close { kind, name } => {
                out.push(*kind);
                put_cstr(out, name);
            }
            M::Execute { portal, max_rows } => {
                put_cstr(out, portal);
                out.extend_from_slice(&max_rows.to_be_bytes());
            }
            M::CopyData(data) | M::Password(data) => out.extend_from_slice(data),
            M::FunctionCall(call) => {
                out.extend_from_slice(&call.oid.to_be_bytes());
                call.arg_formats.encode(out);
                call.args.encode(out);
                out.extend_from_slice(&call.result_format.to_be_bytes());
            }
            M::Sync | M::Flush | M::CopyDone | M::Terminate => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Authentication responses ('p' bodies)
// ---------------------------------------------------------------------------------------

/// The first client message of a SASL exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaslInitialResponse<'a> {
    pub mechanism: &'a str,
    /// `None` when the client sent length -1 (no initial response).
    pub data: Option<&'a [u8]>,
}

pub fn decode_sasl_initial(body: &[u8]) -> Result<SaslInitialResponse<'_>, CodecError> {
    let mut reader = Reader::new(body, "SASLInitialResponse");
    let mechanism = std::str::from_utf8(reader.cstr()?)
        .map_err(|_| reader.error("mechanism is not valid UTF-8"))?;
    let data = reader.nullable()?;
    reader.finish()?;
    Ok(SaslInitialResponse { mechanism, data })
}

/// The password of a PasswordMessage (cleartext or md5 hash), without its NUL.
pub fn decode_password(body: &[u8]) -> Result<&[u8], CodecError> {
    decode_single_string(body, "PasswordMessage")
}

pub fn encode_password(out: &mut Vec<u8>, password: &[u8]) {
    write_message(out, b'p', |out| put_cstr(out, password));
}

pub fn encode_sasl_initial(out: &mut Vec<u8>, mechanism: &str, data: &[u8]) {
    write_message(out, b'p', |out| {
        put_cstr(out, mechanism.as_bytes());
        put_nullable(out, Some(data));
    });
}

pub fn encode_sasl_response(out: &mut Vec<u8>, data: &[u8]) {
    write_message(out, b'p', |out| out.extend_from_slice(data));
}

// ---------------------------------------------------------------------------------------
// Writers for what the proxy itself sends to backends
// ---------------------------------------------------------------------------------------

pub fn encode_query(out: &mut Vec<u8>, sql: &str) {
    write_message(out, b'Q', |out| put_cstr(out, sql.as_bytes()));
}

/// # Panics
/// With more than 65535 parameter types.
pub fn encode_parse(out: &mut Vec<u8>, name: &str, sql: &str, param_types: &[u32]) {
    write_message(out, b'P', |out| {
        put_cstr(out, name.as_bytes());
        put_cstr(out, sql.as_bytes());
        put_count(out, param_types.len());
        for oid in param_types {
            out.extend_from_slice(&oid.to_be_bytes());
        }
    });
}

/// A Bind with text parameters and text results (both format lists empty).
///
/// # Panics
/// With more than 65535 parameters.
pub fn encode_bind_text(
    out: &mut Vec<u8>,
    portal: &str,
    statement: &str,
    params: &[Option<&[u8]>],
) {
    write_message(out, b'B', |out| {
        put_cstr(out, portal.as_bytes());
        put_cstr(out, statement.as_bytes());
        put_count(out, 0);
        put_count(out, params.len());
        for param in params {
            put_nullable(out, *param);
        }
        put_count(out, 0);
    });
}

/// `max_rows` 0 fetches every row.
pub fn encode_execute(out: &mut Vec<u8>, portal: &str, max_rows: i32) {
    write_message(out, b'E', |out| {
        put_cstr(out, portal.as_bytes());
        out.extend_from_slice(&max_rows.to_be_bytes());
    });
}

pub fn encode_sync(out: &mut Vec<u8>) {
    write_message(out, b'S', |_| {});
}

pub fn encode_terminate(out: &mut Vec<u8>) {
    write_message(out, b'X', |_| {});
}

pub fn encode_copy_data(out: &mut Vec<u8>, data: &[u8]) {
    write_message(out, b'd', |out| out.extend_from_slice(data));
}

pub fn encode_copy_done(out: &mut Vec<u8>) {
    write_message(out, b'c', |_| {});
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::frame::split_message;

    /// Splits a single encoded message into tag and body, checking the framing.
    fn unframe(encoded: &[u8]) -> (u8, &[u8]) {
        let (tag, body, total) = split_message(encoded, usize::MAX).unwrap().unwrap();
        assert_eq!(total, encoded.len(), "exactly one message");
        (tag, body)
    }

    /// Decodes an encoded message and checks that re-encoding reproduces it.
    fn round_trip(encoded: &[u8]) -> FrontendMessage<'_> {
        let (tag, body) = unframe(encoded);
        let msg = decode(tag, body).unwrap();
        assert_eq!(msg.tag(), tag);
        let mut again = Vec::new();
        msg.encode(&mut again);
        assert_eq!(again, encoded);
        msg
    }

    fn encoded(msg: &FrontendMessage<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        msg.encode(&mut out);
        out
    }

    fn malformed(what: &'static str, problem: &'static str) -> CodecError {
        CodecError::malformed(what, problem)
    }

    #[test]
    fn tags_cover_every_message() {
        assert!(b"QPBDECSHdcfFXp".iter().all(|&t| TAGS.contains(t)));
        assert_eq!((0..=255u8).filter(|&t| TAGS.contains(t)).count(), 14);
    }

    #[test]
    fn query() {
        let mut out = Vec::new();
        encode_query(&mut out, "SELECT 1");
        assert_eq!(out, b"Q\0\0\0\x0dSELECT 1\0");
        assert_eq!(round_trip(&out), FrontendMessage::Query(b"SELECT 1"));
        assert_eq!(
            decode(b'Q', b"SELECT 1"),
            Err(malformed("Query", "missing string terminator"))
        );
        assert_eq!(
            decode(b'Q', b"a\0b"),
            Err(malformed("Query", "trailing bytes"))
        );
    }

    #[test]
    fn parse() {
        let mut out = Vec::new();
        encode_parse(&mut out, "s1", "SELECT $1, $2", &[23, 0]);
        let FrontendMessage::Parse {
            name,
            query,
            param_types,
        } = round_trip(&out)
        else {
            panic!("not a Parse");
        };
        assert_eq!((name, query), (&b"s1"[..], &b"SELECT $1, $2"[..]));
        assert_eq!(param_types.len(), 2);
        assert_eq!(param_types.iter().collect::<Vec<_>>(), [23, 0]);

        let (_, body) = unframe(&out);
        assert_eq!(
            decode(b'P', &body[..body.len() - 1]),
            Err(malformed("Parse", "truncated"))
        );
        assert_eq!(
            decode(b'P', &[body, b"x"].concat()),
            Err(malformed("Parse", "trailing bytes"))
        );
        assert_eq!(
            decode(b'P', b"s1\0"),
            Err(malformed("Parse", "missing string terminator"))
        );
        assert_eq!(
            decode(b'P', b"\0q\0\0\x05\0\0\0\x17"),
            Err(malformed("Parse", "truncated"))
        );
    }

    #[test]
    fn counts_above_i16_max_are_valid() {
        // libpq allows up to 65535 parameters, so Int16 counts are read as unsigned.
        let types = vec![25u32; 40_000];
        let mut out = Vec::new();
        encode_parse(&mut out, "", "SELECT", &types);
        let FrontendMessage::Parse { param_types, .. } = round_trip(&out) else {
            panic!("not a Parse");
        };
        assert_eq!(param_types.len(), 40_000);

        let params = vec![None; 40_000];
        out.clear();
        encode_bind_text(&mut out, "", "", &params);
        let FrontendMessage::Bind(bind) = round_trip(&out) else {
            panic!("not a Bind");
        };
        assert_eq!(bind.params().len(), 40_000);
    }

    #[test]
    fn bind_text() {
        let mut out = Vec::new();
        encode_bind_text(&mut out, "p", "s", &[Some(b"42"), None, Some(b"")]);
        let FrontendMessage::Bind(bind) = round_trip(&out) else {
            panic!("not a Bind");
        };
        assert_eq!((bind.portal(), bind.statement()), (&b"p"[..], &b"s"[..]));
        assert_eq!(bind.param_formats().len(), 0);
        assert_eq!(bind.result_formats().count(), 0);
        assert_eq!(
            bind.params().collect::<Vec<_>>(),
            [Some(&b"42"[..]), None, Some(&b""[..])]
        );
    }

    /// A Bind body with one binary parameter and binary results, built by hand.
    fn binary_bind_body(value_len: i32) -> Vec<u8> {
        let mut body = b"portal\0stmt\0".to_vec();
        body.extend_from_slice(&[0, 1, 0, 1]); // one format code: binary
        body.extend_from_slice(&[0, 1]); // one parameter
        body.extend_from_slice(&value_len.to_be_bytes());
        body.extend_from_slice(&[0, 0, 0, 7]);
        body.extend_from_slice(&[0, 2, 0, 1, 0, 0]); // two result formats
        body
    }

    #[test]
    fn bind_binary() {
        let body = binary_bind_body(4);
        let msg = decode(b'B', &body).unwrap();
        let FrontendMessage::Bind(bind) = &msg else {
            panic!("not a Bind");
        };
        assert_eq!(bind.param_formats().collect::<Vec<_>>(), [1]);
        assert_eq!(
            bind.params().collect::<Vec<_>>(),
            [Some(&[0u8, 0, 0, 7][..])]
        );
        assert_eq!(bind.result_formats().collect::<Vec<_>>(), [1, 0]);
        let reencoded = encoded(&msg);
        assert_eq!(unframe(&reencoded), (b'B', &body[..]));
    }

    #[test]
    fn bind_malformed() {
        assert_eq!(
            decode(b'B', &binary_bind_body(-2)),
            Err(malformed("Bind", "negative length"))
        );
        assert_eq!(
            decode(b'B', &binary_bind_body(5)),
            Err(malformed("Bind", "truncated"))
        );
        assert_eq!(
            decode(b'B', &binary_bind_body(3)),
            Err(malformed("Bind", "truncated"))
        );
        let body = binary_bind_body(4);
        assert_eq!(
            decode(b'B', &body[..body.len() - 1]),
            Err(malformed("Bind", "truncated"))
        );
        assert_eq!(
            decode(b'B', &[&body[..], &[0]].concat()),
            Err(malformed("Bind", "trailing bytes"))
        );
        assert_eq!(
            decode(b'B', b"p\0s\0\xff\xff"),
            Err(malformed("Bind", "truncated"))
        );
    }

    #[test]
    fn describe_and_close() {
        for kind in [b'S', b'P'] {
            let describe = encoded(&FrontendMessage::Describe { kind, name: b"x" });
            assert_eq!(
                round_trip(&describe),
                FrontendMessage::Describe { kind, name: b"x" }
            );
            let close = encoded(&FrontendMessage::Close { kind, name: b"" });
            assert_eq!(
                round_trip(&close),
                FrontendMessage::Close { kind, name: b"" }
            );
        }
        assert_eq!(
            decode(b'D', b"Xname\0"),
            Err(malformed("Describe", "kind must be 'S' or 'P'"))
        );
        assert_eq!(
            decode(b'C', b"s\0"),
            Err(malformed("Close", "kind must be 'S' or 'P'"))
        );
        assert_eq!(decode(b'D', b""), Err(malformed("Describe", "truncated")));
        assert_eq!(
            decode(b'C', b"Sname"),
            Err(malformed("Close", "missing string terminator"))
        );
        assert_eq!(
            decode(b'C', b"S\0\0"),
            Err(malformed("Close", "trailing bytes"))
        );
    }

    #[test]
    fn execute() {
        let mut out = Vec::new();
        encode_execute(&mut out, "", 0);
        assert_eq!(
            round_trip(&out),
            FrontendMessage::Execute {
                portal: b"",
                max_rows: 0
            }
        );
        let msg = FrontendMessage::Execute {
            portal: b"c",
            max_rows: -1,
        };
        assert_eq!(round_trip(&encoded(&msg)), msg);
        assert_eq!(
            decode(b'E', b"\0\0\0\0"),
            Err(malformed("Execute", "truncated"))
        );
        assert_eq!(
            decode(b'E', b"\0\0\0\0\0\0"),
            Err(malformed("Execute", "trailing bytes"))
        );
    }

    #[test]
    fn bodiless_messages() {
        let mut out = Vec::new();
        encode_sync(&mut out);
        assert_eq!(out, b"S\0\0\0\x04");
        assert_eq!(round_trip(&out), FrontendMessage::Sync);
        out.clear();
        encode_terminate(&mut out);
        assert_eq!(round_trip(&out), FrontendMessage::Terminate);
        for (msg, what) in [
            (FrontendMessage::Flush, "Flush"),
            (FrontendMessage::CopyDone, "CopyDone"),
            (FrontendMessage::Sync, "Sync"),
            (FrontendMessage::Terminate, "Terminate"),
        ] {
            assert_eq!(round_trip(&encoded(&msg)), msg);
            assert_eq!(
                decode(msg.tag(), b"\0"),
                Err(malformed(what, "trailing bytes"))
            );
        }
    }

    #[test]
    fn copy_messages() {
        let data = FrontendMessage::CopyData(b"1\tfoo\n\0binary ok");
        assert_eq!(round_trip(&encoded(&data)), data);
        assert_eq!(
            round_trip(&encoded(&FrontendMessage::CopyData(b""))),
            FrontendMessage::CopyData(b"")
        );
        let fail = FrontendMessage::CopyFail(b"client gave up");
        assert_eq!(round_trip(&encoded(&fail)), fail);
        assert_eq!(
            decode(b'f', b"no nul"),
            Err(malformed("CopyFail", "missing string terminator"))
        );
    }

    fn function_call_body(args: &[Option<&[u8]>]) -> Vec<u8> {
        let mut body = 1598u32.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 1, 0, 1]);
        put_count(&mut body, args.len());
        for arg in args {
            put_nullable(&mut body, *arg);
        }
        body.extend_from_slice(&1i16.to_be_bytes());
        body
    }

    #[test]
    fn function_call() {
        let body = function_call_body(&[Some(b"\0\0\0\x01"), None]);
        let msg = decode(b'F', &body).unwrap();
        let FrontendMessage::FunctionCall(call) = &msg else {
            panic!("not a FunctionCall");
        };
        assert_eq!(call.oid(), 1598);
        assert_eq!(call.arg_formats().collect::<Vec<_>>(), [1]);
        assert_eq!(
            call.args().collect::<Vec<_>>(),
            [Some(&b"\0\0\0\x01"[..]), None]
        );
        assert_eq!(call.result_format(), 1);
        assert_eq!(unframe(&encoded(&msg)), (b'F', &body[..]));

        assert_eq!(
            decode(b'F', &body[..body.len() - 1]),
            Err(malformed("FunctionCall", "truncated"))
        );
        assert_eq!(
            decode(b'F', &[&body[..], b"!"].concat()),
            Err(malformed("FunctionCall", "trailing bytes"))
        );
        let negative = function_call_body(&[]);
        let mut negative_len = negative[..8].to_vec();
        negative_len.extend_from_slice(&[0, 1, 0xFF, 0xFF, 0xFF, 0xF0, 0, 0]);
        assert_eq!(
            decode(b'F', &negative_len),
            Err(malformed("FunctionCall", "negative length"))
        );
    }

    #[test]
    fn password_family() {
        let mut out = Vec::new();
        encode_password(&mut out, b"md5abc");
        let FrontendMessage::Password(body) = round_trip(&out) else {
            panic!("not a password message");
        };
        assert_eq!(decode_password(body), Ok(&b"md5abc"[..]));
        assert_eq!(
            decode_password(b"secret"),
            Err(malformed("PasswordMessage", "missing string terminator"))
        );
        assert_eq!(
            decode_password(b"a\0b"),
            Err(malformed("PasswordMessage", "trailing bytes"))
        );

        out.clear();
        encode_sasl_initial(&mut out, "SCRAM-SHA-256", b"n,,n=,r=abc");
        let FrontendMessage::Password(body) = round_trip(&out) else {
            panic!("not a password message");
        };
        assert_eq!(
            decode_sasl_initial(body),
            Ok(SaslInitialResponse {
                mechanism: "SCRAM-SHA-256",
                data: Some(b"n,,n=,r=abc"),
            })
        );

        out.clear();
        encode_sasl_response(&mut out, b"c=biws,r=abc,p=xyz");
        assert_eq!(
            round_trip(&out),
            FrontendMessage::Password(b"c=biws,r=abc,p=xyz")
        );
    }

    #[test]
    fn sasl_initial_edge_cases() {
        let no_data = b"SCRAM-SHA-256\0\xff\xff\xff\xff";
        assert_eq!(
            decode_sasl_initial(no_data),
            Ok(SaslInitialResponse {
                mechanism: "SCRAM-SHA-256",
                data: None
            })
        );
        let what = "SASLInitialResponse";
        assert_eq!(
            decode_sasl_initial(b"M\0\xff\xff\xff\xfe"),
            Err(malformed(what, "negative length"))
        );
        assert_eq!(
            decode_sasl_initial(b"M\0\0\0\0\x05abc"),
            Err(malformed(what, "truncated"))
        );
        assert_eq!(
            decode_sasl_initial(b"M\0\0\0\0\x01ab"),
            Err(malformed(what, "trailing bytes"))
        );
        assert_eq!(
            decode_sasl_initial(b"M\0\0\0"),
            Err(malformed(what, "truncated"))
        );
        assert_eq!(
            decode_sasl_initial(b"\xff\0\0\0\0\0"),
            Err(malformed(what, "mechanism is not valid UTF-8"))
        );
    }

    #[test]
    fn unknown_tags() {
        for tag in (0..=255u8).filter(|&t| !TAGS.contains(t)) {
            assert_eq!(decode(tag, b""), Err(CodecError::UnknownTag(tag)));
        }
    }

    #[test]
    fn interior_nul_is_cut_rather_than_corrupting_the_frame() {
        let mut out = Vec::new();
        encode_query(&mut out, "SELECT 1\0; DROP TABLE x");
        assert_eq!(round_trip(&out), FrontendMessage::Query(b"SELECT 1"));
    }
}
