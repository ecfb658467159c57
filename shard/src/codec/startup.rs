//! The untagged packets a client may open a connection with: StartupMessage, SSLRequest,
//! GSSENCRequest and CancelRequest. They share one layout, an Int32 length (counting itself)
//! and an Int32 code that is either a protocol version or a magic request number.

use super::frame::{put_cstr, write_packet, Reader};
use super::CodecError;

/// Protocol 3.0 as sent in a StartupMessage: major 3 in the high 16 bits, minor 0.
pub const PROTOCOL_3_0: u32 = 196608;
/// Protocol "1234.5679": the client asks to switch to TLS.
pub const SSL_REQUEST_CODE: u32 = 80877103;
/// Protocol "1234.5680": the client asks for GSSAPI encryption.
pub const GSSENC_REQUEST_CODE: u32 = 80877104;
/// Protocol "1234.5678": the client asks to cancel a running query.
pub const CANCEL_REQUEST_CODE: u32 = 80877102;
/// Largest startup packet accepted, the same limit PostgreSQL applies.
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// Length field plus code: the size of SSLRequest and GSSENCRequest, and the minimum.
const MIN_PACKET: usize = 8;
/// Length field, code, process id and secret key.
const CANCEL_PACKET: usize = 16;

/// A decoded startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket<'a> {
    Startup(StartupMessage<'a>),
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
}

/// A StartupMessage: requested protocol and `name=value` parameters (user, database, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartupMessage<'a> {
    protocol: u32,
    /// `name\0value\0` pairs without the list terminator, checked at decode.
    params: &'a str,
}

impl<'a> StartupMessage<'a> {
    pub fn protocol(&self) -> u32 {
        self.protocol
    }

    pub fn major(&self) -> u16 {
        major(self.protocol)
    }

    pub fn minor(&self) -> u16 {
        minor(self.protocol)
    }

    /// The parameters in the order the client sent them.
    pub fn params(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let mut strings = self.params.split_terminator('\0');
        std::iter::from_fn(move || Some((strings.next()?, strings.next()?)))
    }

    /// The value of the first parameter called `name`.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.params()
            .find(|&(param, _)| param == name)
            .map(|(_, value)| value)
    }
}

fn major(code: u32) -> u16 {
    (code >> 16) as u16
}

fn minor(code: u32) -> u16 {
    (code & 0xFFFF) as u16
}

/// Decodes the untagged packet at buf[0..]: Ok(None) = need more bytes; Ok(Some((packet, consumed))).
/// Errors: length < 8 or > MAX_STARTUP_PACKET, params not NUL-terminated pairs / missing final NUL,
/// non-UTF-8, a protocol major other than 3 or 1234 (UnsupportedProtocol), cancel packet of wrong size.
/// Protocol 3.x with x > 0 decodes fine (the caller negotiates down).
pub fn decode_startup(buf: &[u8]) -> Result<Option<(StartupPacket<'_>, usize)>, CodecError> {
    let Some(len_field) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = packet_len(i32::from_be_bytes(*len_field))?;
    let Some(packet) = buf.get(..len) else {
        return Ok(None);
    };
    let mut reader = Reader::new(&packet[4..], "startup");
    let code = reader.u32()?;
    let decoded = match code {
        SSL_REQUEST_CODE => bare_request(reader, "SSLRequest", StartupPacket::SslRequest)?,
        GSSENC_REQUEST_CODE => bare_request(reader, "GSSENCRequest", StartupPacket::GssEncRequest)?,
        CANCEL_REQUEST_CODE => decode_cancel(len, reader)?,
        _ if major(code) == 3 => StartupPacket::Startup(decode_params(code, reader)?),
        _ => {
            return Err(CodecError::UnsupportedProtocol {
                major: major(code),
                minor: minor(code),
            })
        }
    };
    Ok(Some((decoded, len)))
}

/// Checks the length field before waiting for the rest, so a bogus length fails fast.
fn packet_len(len: i32) -> Result<usize, CodecError> {
    let invalid = CodecError::InvalidLength {
        len: i64::from(len),
    };
    let len = usize::try_from(len).map_err(|_| invalid.clone())?;
    if len < MIN_PACKET {
        return Err(invalid);
    }
    if len > MAX_STARTUP_PACKET {
        return Err(CodecError::TooLarge {
            len,
            max: MAX_STARTUP_PACKET,
        });
    }
    Ok(len)
}

/// SSLRequest and GSSENCRequest carry nothing after the code.
fn bare_request<'a>(
    reader: Reader<'_>,
    what: &'static str,
    packet: StartupPacket<'a>,
) -> Result<StartupPacket<'a>, CodecError> {
    reader
        .finish()
        .map_err(|_| CodecError::malformed(what, "wrong packet size"))?;
    Ok(packet)
}

fn decode_cancel(len: usize, mut reader: Reader<'_>) -> Result<StartupPacket<'static>, CodecError> {
    if len != CANCEL_PACKET {
        return Err(CodecError::malformed("CancelRequest", "wrong packet size"));
    }
    let pid = reader.i32()?;
    let secret = reader.i32()?;
    reader.finish()?;
    Ok(StartupPacket::Cancel { pid, secret })
}

/// Validates the parameter list: `name\0value\0` pairs with non-empty names, ended by an
/// empty name that must be the last byte.
fn decode_params(protocol: u32, mut reader: Reader<'_>) -> Result<StartupMessage<'_>, CodecError> {
    let what = "StartupMessage";
    let params = reader.rest();
    let mut fields = Reader::new(params, what);
    loop {
        let name = fields
            .cstr()
            .map_err(|_| CodecError::malformed(what, "missing final terminator"))?;
        if name.is_empty() {
            break;
        }
        fields.cstr()?;
    }
    if !fields.is_empty() {
        return Err(CodecError::malformed(
            what,
            "data after the final terminator",
        ));
    }
    let pairs = &params[..params.len() - 1];
    let params = std::str::from_utf8(pairs)
        .map_err(|_| CodecError::malformed(what, "parameter is not valid UTF-8"))?;
    Ok(StartupMessage { protocol, params })
}

/// Appends a protocol 3.0 StartupMessage with the given parameters.
///
/// Names and values are cut at an interior NUL, which the protocol cannot carry.
pub fn encode_startup(out: &mut Vec<u8>, params: &[(&str, &str)]) {
    write_packet(out, |out| {
        out.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
        for (name, value) in params {
            put_cstr(out, name.as_bytes());
            put_cstr(out, value.as_bytes());
        }
        out.push(0);
    });
}

pub fn encode_cancel(out: &mut Vec<u8>, pid: i32, secret: i32) {
    write_packet(out, |out| {
        out.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        out.extend_from_slice(&pid.to_be_bytes());
        out.extend_from_slice(&secret.to_be_bytes());
    });
}

pub fn encode_ssl_request(out: &mut Vec<u8>) {
    write_packet(out, |out| {
        out.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes())
    });
}

pub fn encode_gssenc_request(out: &mut Vec<u8>) {
    write_packet(out, |out| {
        out.extend_from_slice(&GSSENC_REQUEST_CODE.to_be_bytes())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An untagged packet framed by hand.
    fn packet(code: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = ((payload.len() + 8) as i32).to_be_bytes().to_vec();
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn decode_whole(buf: &[u8]) -> StartupPacket<'_> {
        let (decoded, consumed) = decode_startup(buf).unwrap().unwrap();
        assert_eq!(consumed, buf.len());
        decoded
    }

    #[test]
    fn startup_round_trip() {
        let mut out = Vec::new();
        encode_startup(
            &mut out,
            &[("user", "alice"), ("database", "shop"), ("options", "")],
        );
        assert_eq!(
            out,
            packet(PROTOCOL_3_0, b"user\0alice\0database\0shop\0options\0\0\0")
        );
        let StartupPacket::Startup(msg) = decode_whole(&out) else {
            panic!("not a startup message");
        };
        assert_eq!(
            (msg.protocol(), msg.major(), msg.minor()),
            (PROTOCOL_3_0, 3, 0)
        );
        assert_eq!(
            msg.params().collect::<Vec<_>>(),
            [("user", "alice"), ("database", "shop"), ("options", "")]
        );
        assert_eq!(msg.get("database"), Some("shop"));
        assert_eq!(msg.get("application_name"), None);
    }

    #[test]
    fn startup_without_parameters() {
        let mut out = Vec::new();
        encode_startup(&mut out, &[]);
        let StartupPacket::Startup(msg) = decode_whole(&out) else {
            panic!("not a startup message");
        };
        assert_eq!(msg.params().count(), 0);
    }

    #[test]
    fn newer_minor_versions_decode() {
        let buf = packet(3 << 16 | 2, b"user\0bob\0\0");
        let StartupPacket::Startup(msg) = decode_whole(&buf) else {
            panic!("not a startup message");
        };
        assert_eq!((msg.major(), msg.minor()), (3, 2));
        assert_eq!(msg.get("user"), Some("bob"));
    }

    #[test]
    fn request_round_trips() {
        let mut out = Vec::new();
        encode_ssl_request(&mut out);
        assert_eq!(decode_whole(&out), StartupPacket::SslRequest);
        out.clear();
        encode_gssenc_request(&mut out);
        assert_eq!(decode_whole(&out), StartupPacket::GssEncRequest);
        out.clear();
        encode_cancel(&mut out, 4242, -7);
        assert_eq!(
            decode_whole(&out),
            StartupPacket::Cancel {
                pid: 4242,
                secret: -7
            }
        );
    }

    #[test]
    fn incomplete_packets_need_more_bytes() {
        let mut out = Vec::new();
        encode_startup(&mut out, &[("user", "alice")]);
        for n in 0..out.len() {
            assert_eq!(decode_startup(&out[..n]), Ok(None), "prefix {n}");
        }
    }

    #[test]
    fn consumed_excludes_following_bytes() {
        let mut out = Vec::new();
        encode_ssl_request(&mut out);
        out.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            decode_startup(&out),
            Ok(Some((StartupPacket::SslRequest, 8)))
        );
    }

    #[test]
    fn bad_lengths() {
        for len in [i32::MIN, -1, 0, 7] {
            assert_eq!(
                decode_startup(&len.to_be_bytes()),
                Err(CodecError::InvalidLength {
                    len: i64::from(len)
                })
            );
        }
        assert_eq!(
            decode_startup(&10_001i32.to_be_bytes()),
            Err(CodecError::TooLarge {
                len: 10_001,
                max: MAX_STARTUP_PACKET
            })
        );
    }

    #[test]
    fn malformed_parameter_lists() {
        let cases: [(&[u8], &str); 5] = [
            (b"user\0alice\0", "missing final terminator"),
            (b"user\0alice", "missing string terminator"),
            (b"user\0\0", "missing final terminator"),
            (b"\0alice\0\0", "data after the final terminator"),
            (b"user\0al\xffice\0\0", "parameter is not valid UTF-8"),
        ];
        for (payload, problem) in cases {
            assert_eq!(
                decode_startup(&packet(PROTOCOL_3_0, payload)),
                Err(CodecError::malformed("StartupMessage", problem)),
                "{payload:?}"
            );
        }
        assert_eq!(
            decode_startup(&packet(PROTOCOL_3_0, b"")),
            Err(CodecError::malformed(
                "StartupMessage",
                "missing final terminator"
            ))
        );
    }

    #[test]
    fn unsupported_protocols() {
        for (code, major, minor) in [
            (2 << 16, 2, 0),
            (4 << 16 | 1, 4, 1),
            (1234 << 16 | 5681, 1234, 5681),
        ] {
            assert_eq!(
                decode_startup(&packet(code, b"\0")),
                Err(CodecError::UnsupportedProtocol { major, minor })
            );
        }
    }

    #[test]
    fn requests_of_the_wrong_size() {
        assert_eq!(
            decode_startup(&packet(SSL_REQUEST_CODE, b"x")),
            Err(CodecError::malformed("SSLRequest", "wrong packet size"))
        );
        assert_eq!(
            decode_startup(&packet(GSSENC_REQUEST_CODE, &[0; 4])),
            Err(CodecError::malformed("GSSENCRequest", "wrong packet size"))
        );
        assert_eq!(
            decode_startup(&packet(CANCEL_REQUEST_CODE, &[0; 4])),
            Err(CodecError::malformed("CancelRequest", "wrong packet size"))
        );
        assert_eq!(
            decode_startup(&packet(CANCEL_REQUEST_CODE, &[0; 12])),
            Err(CodecError::malformed("CancelRequest", "wrong packet size"))
        );
    }

    #[test]
    fn interior_nuls_are_cut_when_encoding() {
        let mut out = Vec::new();
        encode_startup(&mut out, &[("user", "al\0ice")]);
        let StartupPacket::Startup(msg) = decode_whole(&out) else {
            panic!("not a startup message");
        };
        assert_eq!(msg.get("user"), Some("al"));
    }
}
