//! Messages a server sends. The proxy decodes the few it must understand (authentication,
//! key data, errors, transaction status) and writes its own errors and handshake replies.

use std::fmt;
use std::iter::FusedIterator;

use super::frame::{
    decode_empty, decode_single_string, put_count, put_cstr, put_nullable, view_traits,
    write_message, Reader, TagSet,
};
use super::CodecError;

pub use super::frame::{FormatCodes, ParamTypes, StrList, Values};

/// Every valid backend tag.
pub const TAGS: TagSet = TagSet::new(b"RK23CdcGHWDIEVnNAtS1sZTv");

/// The SASL mechanisms a server offers, in its order of preference.
pub type SaslMechanisms<'a> = StrList<'a>;
/// The column values of a DataRow; `None` is NULL.
pub type DataRow<'a> = Values<'a>;

/// An authentication request ('R'), told apart by its Int32 code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication<'a> {
    Ok,
    KerberosV5,
    CleartextPassword,
    Md5Password([u8; 4]),
    Gss,
    GssContinue(&'a [u8]),
    Sspi,
    Sasl(SaslMechanisms<'a>),
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
}

/// Authentication request codes. Code 6 (SCM credentials) left the protocol in
/// PostgreSQL 9.1 and decodes as unknown.
const AUTH_OK: i32 = 0;
const AUTH_KERBEROS_V5: i32 = 2;
const AUTH_CLEARTEXT_PASSWORD: i32 = 3;
const AUTH_MD5_PASSWORD: i32 = 5;
const AUTH_GSS: i32 = 7;
const AUTH_GSS_CONTINUE: i32 = 8;
const AUTH_SSPI: i32 = 9;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

impl Authentication<'_> {
    fn code(&self) -> i32 {
        match self {
            Authentication::Ok => AUTH_OK,
            Authentication::KerberosV5 => AUTH_KERBEROS_V5,
            Authentication::CleartextPassword => AUTH_CLEARTEXT_PASSWORD,
            Authentication::Md5Password(_) => AUTH_MD5_PASSWORD,
            Authentication::Gss => AUTH_GSS,
            Authentication::GssContinue(_) => AUTH_GSS_CONTINUE,
            Authentication::Sspi => AUTH_SSPI,
            Authentication::Sasl(_) => AUTH_SASL,
            Authentication::SaslContinue(_) => AUTH_SASL_CONTINUE,
            Authentication::SaslFinal(_) => AUTH_SASL_FINAL,
        }
    }
}

/// A decoded backend message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage<'a> {
    Authentication(Authentication<'a>),
    BackendKeyData {
        pid: i32,
        secret: i32,
    },
    BindComplete,
    CloseComplete,
    CommandComplete(&'a [u8]),
    CopyData(&'a [u8]),
    CopyDone,
    CopyInResponse(CopyResponse<'a>),
    CopyOutResponse(CopyResponse<'a>),
    CopyBothResponse(CopyResponse<'a>),
    DataRow(DataRow<'a>),
    EmptyQueryResponse,
    ErrorResponse(Fields<'a>),
    NoticeResponse(Fields<'a>),
    FunctionCallResponse(Option<&'a [u8]>),
    /// `newest_minor` is the raw Int32. The documentation calls it the newest minor
    /// version, but PostgreSQL sends a whole version number (`major << 16 | minor`, its
    /// `PG_PROTOCOL_LATEST`), and libpq 18 compares it as one.
    NegotiateProtocolVersion {
        newest_minor: i32,
        unrecognized: StrList<'a>,
    },
    NoData,
    NotificationResponse {
        pid: i32,
        channel: &'a [u8],
        payload: &'a [u8],
    },
    ParameterDescription(ParamTypes<'a>),
    ParameterStatus {
        name: &'a [u8],
        value: &'a [u8],
    },
    ParseComplete,
    PortalSuspended,
    /// Transaction status: `b'I'` idle, `b'T'` in a transaction, `b'E'` in a failed one.
    ReadyForQuery(u8),
    RowDescription(FieldDescriptions<'a>),
}

/// The body of CopyInResponse, CopyOutResponse and CopyBothResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyResponse<'a> {
    format: u8,
    column_formats: FormatCodes<'a>,
}

impl<'a> CopyResponse<'a> {
    /// Overall format: 0 text, 1 binary.
    pub fn format(&self) -> u8 {
        self.format
    }

    pub fn column_formats(&self) -> FormatCodes<'a> {
        self.column_formats
    }
}

/// ErrorResponse/NoticeResponse fields.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fields<'a> {
    /// `code, text, NUL` triples without the final terminator, checked at decode.
    raw: &'a [u8],
}

impl<'a> Fields<'a> {
    /// (field code, text) pairs in the order the server sent them.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &'a [u8])> {
        let mut rest = self.raw;
        std::iter::from_fn(move || {
            let (&code, tail) = rest.split_first()?;
            let nul = tail.iter().position(|&b| b == 0)?;
            rest = &tail[nul + 1..];
            Some((code, &tail[..nul]))
        })
    }

    pub fn get(&self, code: u8) -> Option<&'a [u8]> {
        self.iter()
            .find(|&(field, _)| field == code)
            .map(|(_, text)| text)
    }

    /// The (possibly localized) severity, e.g. `ERROR`; "" when absent or not UTF-8.
    pub fn severity(&self) -> &'a str {
        self.text(b'S')
    }

    /// The SQLSTATE; "" when absent or not UTF-8.
    pub fn code(&self) -> &'a str {
        self.text(b'C')
    }

    /// The primary message; "" when absent or not UTF-8.
    pub fn message(&self) -> &'a str {
        self.text(b'M')
    }

    fn text(&self, code: u8) -> &'a str {
        self.get(code)
            .and_then(|text| std::str::from_utf8(text).ok())
            .unwrap_or("")
    }
}

impl fmt::Debug for Fields<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.iter()
                    .map(|(code, text)| (char::from(code), String::from_utf8_lossy(text))),
            )
            .finish()
    }
}

/// One column of a RowDescription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldDescription<'a> {
    pub name: &'a [u8],
    /// OID of the source table, or 0 when the column is not a plain table column.
    pub table_oid: u32,
    /// Attribute number in the source table, or 0.
    pub column_id: i16,
    pub type_oid: u32,
    /// `pg_type.typlen`; negative for variable-width types.
    pub type_size: i16,
    pub type_modifier: i32,
    /// 0 text, 1 binary (0 also when not yet known, after Describe of a statement).
    pub format: i16,
}

impl<'a> FieldDescription<'a> {
    fn read(reader: &mut Reader<'a>) -> Result<FieldDescription<'a>, CodecError> {
        Ok(FieldDescription {
            name: reader.cstr()?,
            table_oid: reader.u32()?,
            column_id: reader.i16()?,
            type_oid: reader.u32()?,
            type_size: reader.i16()?,
            type_modifier: reader.i32()?,
            format: reader.i16()?,
        })
    }

    fn write(&self, out: &mut Vec<u8>) {
        put_cstr(out, self.name);
        out.extend_from_slice(&self.table_oid.to_be_bytes());
        out.extend_from_slice(&self.column_id.to_be_bytes());
        out.extend_from_slice(&self.type_oid.to_be_bytes());
        out.extend_from_slice(&self.type_size.to_be_bytes());
        out.extend_from_slice(&self.type_modifier.to_be_bytes());
        out.extend_from_slice(&self.format.to_be_bytes());
    }
}

/// The columns of a RowDescription.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FieldDescriptions<'a> {
    remaining: usize,
    raw: &'a [u8],
}

impl<'a> FieldDescriptions<'a> {
    pub fn iter(&self) -> FieldDescriptions<'a> {
        *self
    }

    fn read(reader: &mut Reader<'a>) -> Result<FieldDescriptions<'a>, CodecError> {
        let count = reader.count()?;
        let (raw, ()) =
            reader.spanned(|r| (0..count).try_for_each(|_| FieldDescription::read(r).map(drop)))?;
        Ok(FieldDescriptions {
            remaining: count,
            raw,
        })
    }
}

impl<'a> Iterator for FieldDescriptions<'a> {
    type Item = FieldDescription<'a>;

    fn next(&mut self) -> Option<FieldDescription<'a>> {
        if self.remaining == 0 {
            return None;
        }
        let mut reader = Reader::new(self.raw, "RowDescription");
        match FieldDescription::read(&mut reader) {
            Ok(field) => {
                self.remaining -= 1;
                self.raw = reader.rest();
                Some(field)
            }
            // Unreachable for a decoded view; ending beats panicking.
            Err(_) => {
                self.remaining = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

view_traits!(FieldDescriptions);

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// Decodes the body of a message with the given tag; strict: every length checked, no
/// trailing bytes.
pub fn decode(tag: u8, body: &[u8]) -> Result<BackendMessage<'_>, CodecError> {
    use BackendMessage as M;
    match tag {
        b'R' => decode_authentication(body).map(M::Authentication),
        b'K' => decode_backend_key_data(body),
        b'2' => decode_empty(body, "BindComplete").map(|()| M::BindComplete),
        b'3' => decode_empty(body, "CloseComplete").map(|()| M::CloseComplete),
        b'C' => decode_single_string(body, "CommandComplete").map(M::CommandComplete),
        b'd' => Ok(M::CopyData(body)),
        b'c' => decode_empty(body, "CopyDone").map(|()| M::CopyDone),
        b'G' => decode_copy_response(body, "CopyInResponse").map(M::CopyInResponse),
        b'H' => decode_copy_response(body, "CopyOutResponse").map(M::CopyOutResponse),
        b'W' => decode_copy_response(body, "CopyBothResponse").map(M::CopyBothResponse),
        b'D' => decode_data_row(body).map(M::DataRow),
        b'I' => decode_empty(body, "EmptyQueryResponse").map(|()| M::EmptyQueryResponse),
        b'E' => decode_fields(body, "ErrorResponse").map(M::ErrorResponse),
        b'N' => decode_fields(body, "NoticeResponse").map(M::NoticeResponse),
        b'V' => decode_function_call_response(body).map(M::FunctionCallResponse),
        b'v' => decode_negotiate_protocol_version(body),
        b'n' => decode_empty(body, "NoData").map(|()| M::NoData),
        b'A' => decode_notification(body),
        b't' => decode_parameter_description(body).map(M::ParameterDescription),
        b'S' => decode_parameter_status(body),
        b'1' => decode_empty(body, "ParseComplete").map(|()| M::ParseComplete),
        b's' => decode_empty(body, "PortalSuspended").map(|()| M::PortalSuspended),
        b'Z' => decode_ready_for_query(body).map(M::ReadyForQuery),
        b'T' => decode_row_description(body).map(M::RowDescription),
        _ => Err(CodecError::UnknownTag(tag)),
    }
}

fn decode_authentication(body: &[u8]) -> Result<Authentication<'_>, CodecError> {
    let mut reader = Reader::new(body, "Authentication");
    let auth = match reader.i32()? {
        AUTH_OK => Authentication::Ok,
        AUTH_KERBEROS_V5 => Authentication::KerberosV5,
        AUTH_CLEARTEXT_PASSWORD => Authentication::CleartextPassword,
        AUTH_MD5_PASSWORD => Authentication::Md5Password(reader.bytes4()?),
        AUTH_GSS => Authentication::Gss,
        AUTH_GSS_CONTINUE => Authentication::GssContinue(reader.rest()),
        AUTH_SSPI => Authentication::Sspi,
        AUTH_SASL => Authentication::Sasl(reader.str_list_until_empty()?),
        AUTH_SASL_CONTINUE => Authentication::SaslContinue(reader.rest()),
        AUTH_SASL_FINAL => Authentication::SaslFinal(reader.rest()),
        _ => return Err(reader.error("unknown authentication request code")),
    };
    reader.finish()?;
    Ok(auth)
}

fn decode_backend_key_data(body: &[u8]) -> Result<BackendMessage<'_>, CodecError> {
    let mut reader = Reader::new(body, "BackendKeyData");
    let pid = reader.i32()?;
    let secret = reader.i32()?;
    reader.finish()?;
    Ok(BackendMessage::BackendKeyData { pid, secret })
}

fn decode_copy_response<'a>(
    body: &'a [u8],
    what: &'static str,
) -> Result<CopyResponse<'a>, CodecError> {
    let mut reader = Reader::new(body, what);
    let format = reader.u8()?;
    if format > 1 {
        return Err(reader.error("format must be 0 or 1"));
    }
    let column_formats = reader.format_codes()?;
    reader.finish()?;
    Ok(CopyResponse {
        format,
        column_formats,
    })
}

fn decode_data_row(body: &[u8]) -> Result<DataRow<'_>, CodecError> {
    let mut reader = Reader::new(body, "DataRow");
    let row = reader.values()?;
    reader.finish()?;
    Ok(row)
}

/// Field triples ended by a zero code, which must be the last byte.
fn decode_fields<'a>(body: &'a [u8], what: &'static str) -> Result<Fields<'a>, CodecError> {
    let mut reader = Reader::new(body, what);
    let (raw, ()) = reader.spanned(|r| {
        while r.u8()? != 0 {
            r.cstr()?;
        }
        Ok(())
    })?;
    reader.finish()?;
    let without_terminator = &raw[..raw.len() - 1];
    Ok(Fields {
        raw: without_terminator,
    })
}

fn decode_function_call_response(body: &[u8]) -> Result<Option<&[u8]>, CodecError> {
    let mut reader = Reader::new(body, "FunctionCallResponse");
    let result = reader.nullable()?;
    reader.finish()?;
    Ok(result)
}

fn decode_negotiate_protocol_version(body: &[u8]) -> Result<BackendMessage<'_>, CodecError> {
    let mut reader = Reader::new(body, "NegotiateProtocolVersion");
    let newest_minor = reader.i32()?;
    let count = usize::try_from(reader.i32()?).map_err(|_| reader.error("negative count"))?;
    let unrecognized = reader.str_list(count)?;
    reader.finish()?;
    Ok(BackendMessage::NegotiateProtocolVersion {
        newest_minor,
        unrecognized,
    })
}

fn decode_notification(body: &[u8]) -> Result<BackendMessage<'_>, CodecError> {
    let mut reader = Reader::new(body, "NotificationResponse");
    let pid = reader.i32()?;
    let channel = reader.cstr()?;
    let payload = reader.cstr()?;
    reader.finish()?;
    Ok(BackendMessage::NotificationResponse {
        pid,
        channel,
        payload,
    })
}

fn decode_parameter_description(body: &[u8]) -> Result<ParamTypes<'_>, CodecError> {
    let mut reader = Reader::new(body, "ParameterDescription");
    let types = reader.param_types()?;
    reader.finish()?;
    Ok(types)
}

fn decode_parameter_status(body: &[u8]) -> Result<BackendMessage<'_>, CodecError> {
    let mut reader = Reader::new(body, "ParameterStatus");
    let name = reader.cstr()?;
    let value = reader.cstr()?;
    reader.finish()?;
    Ok(BackendMessage::ParameterStatus { name, value })
}

fn decode_ready_for_query(body: &[u8]) -> Result<u8, CodecError> {
    let mut reader = Reader::new(body, "ReadyForQuery");
    let status = reader.u8()?;
    if !matches!(status, b'I' | b'T' | b'E') {
        return Err(reader.error("status must be 'I', 'T' or 'E'"));
    }
    reader.finish()?;
    Ok(status)
}

fn decode_row_description(body: &[u8]) -> Result<FieldDescriptions<'_>, CodecError> {
    let mut reader = Reader::new(body, "RowDescription");
    let fields = FieldDescriptions::read(&mut reader)?;
    reader.finish()?;
    Ok(fields)
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

impl BackendMessage<'_> {
    pub fn tag(&self) -> u8 {
        use BackendMessage as M;
        match self {
            M::Authentication(_) => b'R',
            M::BackendKeyData { .. } => b'K',
            M::BindComplete => b'2',
            M::CloseComplete => b'3',
            M::CommandComplete(_) => b'C',
            M::CopyData(_) => b'd',
            M::CopyDone => b'c',
            M::CopyInResponse(_) => b'G',
            M::CopyOutResponse(_) => b'H',
            M::CopyBothResponse(_) => b'W',
            M::DataRow(_) => b'D',
            M::EmptyQueryResponse => b'I',
            M::ErrorResponse(_) => b'E',
            M::NoticeResponse(_) => b'N',
            M::FunctionCallResponse(_) => b'V',
            M::NegotiateProtocolVersion { .. } => b'v',
            M::NoData => b'n',
            M::NotificationResponse { .. } => b'A',
            M::ParameterDescription(_) => b't',
            M::ParameterStatus { .. } => b'S',
            M::ParseComplete => b'1',
            M::PortalSuspended => b's',
            M::ReadyForQuery(_) => b'Z',
            M::RowDescription(_) => b'T',
        }
    }

    /// Appends the whole message, header included.
    pub fn encode(&self, out: &mut Vec<u8>) {
        write_message(out, self.tag(), |out| self.encode_body(out));
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        use BackendMessage as M;
        match self {
            M::Authentication(auth) => encode_authentication(out, auth),
            M::BackendKeyData { pid, secret } => {
                out.extend_from_slice(&pid.to_be_bytes());
                out.extend_from_slice(&secret.to_be_bytes());
            }
            M::CommandComplete(tag) => put_cstr(out, tag),
            M::CopyData(data) => out.extend_from_slice(data),
            M::CopyInResponse(copy) | M::CopyOutResponse(copy) | M::CopyBothResponse(copy) => {
                out.push(copy.format);
                copy.column_formats.encode(out);
            }
            M::DataRow(row) => row.encode(out),
            M::ErrorResponse(fields) | M::NoticeResponse(fields) => {
                out.extend_from_slice(fields.raw);
                out.push(0);
            }
            M::FunctionCallResponse(result) => put_nullable(out, *result),
            M::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            } => {
                out.extend_from_slice(&newest_minor.to_be_bytes());
                put_i32_count(out, unrecognized.len());
                unrecognized.encode_strings(out);
            }
            M::NotificationResponse {
                pid,
                channel,
                payload,
            } => {
                out.extend_from_slice(&pid.to_be_bytes());
                put_cstr(out, channel);
                put_cstr(out, payload);
            }
            M::ParameterDescription(types) => types.encode(out),
            M::ParameterStatus { name, value } => {
                put_cstr(out, name);
                put_cstr(out, value);
            }
            M::ReadyForQuery(status) => out.push(*status),
            M::RowDescription(fields) => {
                put_count(out, fields.remaining);
                out.extend_from_slice(fields.raw);
            }
            M::BindComplete
            | M::CloseComplete
            | M::CopyDone
            | M::EmptyQueryResponse
            | M::NoData
            | M::ParseComplete
            | M::PortalSuspended => {}
        }
    }
}

fn encode_authentication(out: &mut Vec<u8>, auth: &Authentication<'_>) {
    out.extend_from_slice(&auth.code().to_be_bytes());
    match auth {
        Authentication::Md5Password(salt) => out.extend_from_slice(salt),
        Authentication::GssContinue(data)
        | Authentication::SaslContinue(data)
        | Authentication::SaslFinal(data) => out.extend_from_slice(data),
        Authentication::Sasl(mechanisms) => {
            mechanisms.encode_strings(out);
            out.push(0);
        }
        Authentication::Ok
        | Authentication::KerberosV5
        | Authentication::CleartextPassword
        | Authentication::Gss
        | Authentication::Sspi => {}
    }
}

/// Appends an Int32 item count (NegotiateProtocolVersion counts with Int32, not Int16).
///
/// # Panics
/// If `count` exceeds `i32::MAX`.
fn put_i32_count(out: &mut Vec<u8>, count: usize) {
    let count = i32::try_from(count).expect("more than i32::MAX items in one message");
    out.extend_from_slice(&count.to_be_bytes());
}

/// True when an ErrorResponse body ends the session: severity FATAL or PANIC (the
/// non-localized `V` field when present, else `S`). The server closes right after it.
pub fn is_fatal_error(body: &[u8]) -> bool {
    let Ok(BackendMessage::ErrorResponse(fields)) = decode(b'E', body) else {
        return false;
    };
    let severity = fields.get(b'V').or_else(|| fields.get(b'S')).unwrap_or(b"");
    severity == b"FATAL" || severity == b"PANIC"
}

/// A FATAL that says the server itself is going away — its postmaster died while the
/// backend waited for input (57P01 from `secure_read`), or another process crashed
/// (57P02) — rather than anything about the client's session or statement.
pub fn is_server_gone_error(body: &[u8]) -> bool {
    let Ok(BackendMessage::ErrorResponse(fields)) = decode(b'E', body) else {
        return false;
    };
    match fields.get(b'C').unwrap_or(b"") {
        b"57P02" => true,
        b"57P01" => fields.get(b'R') == Some(b"secure_read"),
        _ => false,
    }
}

/// The warning PostgreSQL 14 and later send (as a NoticeResponse, SQLSTATE 57P02) from a
/// backend ended because another server process crashed, just before the connection
/// closes: like the 57P02 FATAL of older servers, the server going away, not an answer.
pub fn is_crash_notice(body: &[u8]) -> bool {
    matches!(
        decode(b'N', body),
        Ok(BackendMessage::NoticeResponse(fields)) if fields.get(b'C') == Some(b"57P02")
    )
}

/// A FATAL a backend sends when it dies while waiting for input — its postmaster gone
/// (57P01 from `secure_read`), another process crashed (57P02), or its idle-session
/// timeout (57P05): as the first answer to a request, proof the request was never run.
pub fn is_idle_death(body: &[u8]) -> bool {
    if is_server_gone_error(body) {
        return true;
    }
    let Ok(BackendMessage::ErrorResponse(fields)) = decode(b'E', body) else {
        return false;
    };
    fields.get(b'C') == Some(b"57P05")
}

/// Where the sender pid sits in a NotificationResponse body, if the body is one whose
/// sender is `pid`: the proxy shows a client its own made-up pid there (see
/// [`rewrite_notification_pids`]).
pub fn notification_from(body: &[u8], pid: i32) -> bool {
    body.first_chunk::<4>()
        .is_some_and(|sender| i32::from_be_bytes(*sender) == pid)
}

/// Rewrites the sender pid of every NotificationResponse in `bytes` (whole messages)
/// from `from` to `to`, in place.
pub fn rewrite_notification_pids(bytes: &mut [u8], from: i32, to: i32) {
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 5) {
        let tag = header[0];
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let Ok(len) = usize::try_from(len) else {
            return;
        };
        let body = at + 5;
        if tag == b'A' && bytes.len() >= body + 4 && notification_from(&bytes[body..], from) {
            bytes[body..body + 4].copy_from_slice(&to.to_be_bytes());
        }
        at += 1 + len.max(4);
    }
}

// ---------------------------------------------------------------------------------------
// Writers for what the proxy itself sends to clients
// ---------------------------------------------------------------------------------------

/// An ErrorResponse with severity (S and its non-localized twin V), SQLSTATE and message.
pub fn write_error(out: &mut Vec<u8>, severity: &str, sqlstate: &str, message: &str) {
    write_fields(out, b'E', &standard_fields(severity, sqlstate, message));
}

/// A NoticeResponse with the same fields as [`write_error`].
pub fn write_notice(out: &mut Vec<u8>, severity: &str, sqlstate: &str, message: &str) {
    write_fields(out, b'N', &standard_fields(severity, sqlstate, message));
}

/// A CommandComplete with `tag` (e.g. `DEALLOCATE`, `SELECT 3`).
pub fn write_command_complete(out: &mut Vec<u8>, tag: &str) {
    write_message(out, b'C', |out| put_cstr(out, tag.as_bytes()));
}

/// A whole result of text columns: RowDescription and DataRows when there are columns,
/// then CommandComplete with `tag`. For answers the proxy gives itself (the console).
pub fn write_text_result(
    out: &mut Vec<u8>,
    columns: &[String],
    rows: &[Vec<Option<String>>],
    tag: &str,
) {
    const TEXT_OID: u32 = 25;
    if !columns.is_empty() {
        let fields: Vec<FieldDescription<'_>> = columns
            .iter()
            .map(|name| FieldDescription {
                name: name.as_bytes(),
                table_oid: 0,
                column_id: 0,
                type_oid: TEXT_OID,
                type_size: -1,
                type_modifier: -1,
                format: 0,
            })
            .collect();
        write_message(out, b'T', |out| {
            put_count(out, fields.len());
            for field in &fields {
                field.write(out);
            }
        });
        for row in rows {
            write_message(out, b'D', |out| {
                put_count(out, row.len());
                for value in row {
                    put_nullable(out, value.as_deref().map(str::as_bytes));
                }
            });
        }
    }
    write_command_complete(out, tag);
}

/// An ErrorResponse with arbitrary fields. A field with code 0 is skipped: it would end
/// the list early.
pub fn write_error_fields(out: &mut Vec<u8>, fields: &[(u8, &[u8])]) {
    write_fields(out, b'E', fields);
}

fn standard_fields<'a>(
    severity: &'a str,
    sqlstate: &'a str,
    message: &'a str,
) -> [(u8, &'a [u8]); 4] {
    [
        (b'S', severity.as_bytes()),
        (b'V', severity.as_bytes()),
        (b'C', sqlstate.as_bytes()),
        (b'M', message.as_bytes()),
    ]
}

fn write_fields(out: &mut Vec<u8>, tag: u8, fields: &[(u8, &[u8])]) {
    write_message(out, tag, |out| {
        for &(code, text) in fields.iter().filter(|(code, _)| *code != 0) {
            out.push(code);
            put_cstr(out, text);
        }
        out.push(0);
    });
}

fn write_auth(out: &mut Vec<u8>, code: i32, write_data: impl FnOnce(&mut Vec<u8>)) {
    write_message(out, b'R', |out| {
        out.extend_from_slice(&code.to_be_bytes());
        write_data(out);
    });
}

pub fn write_auth_ok(out: &mut Vec<u8>) {
    write_auth(out, AUTH_OK, |_| {});
}

pub fn write_auth_cleartext(out: &mut Vec<u8>) {
    write_auth(out, AUTH_CLEARTEXT_PASSWORD, |_| {});
}

pub fn write_auth_md5(out: &mut Vec<u8>, salt: [u8; 4]) {
    write_auth(out, AUTH_MD5_PASSWORD, |out| out.extend_from_slice(&salt));
}

/// AuthenticationSASL offering `mechanisms`; an empty name is skipped since it would end
/// the list early.
pub fn write_auth_sasl(out: &mut Vec<u8>, mechanisms: &[&str]) {
    write_auth(out, AUTH_SASL, |out| {
        for mechanism in mechanisms.iter().filter(|m| !m.is_empty()) {
            put_cstr(out, mechanism.as_bytes());
        }
        out.push(0);
    });
}

pub fn write_auth_sasl_continue(out: &mut Vec<u8>, data: &[u8]) {
    write_auth(out, AUTH_SASL_CONTINUE, |out| out.extend_from_slice(data));
}

pub fn write_auth_sasl_final(out: &mut Vec<u8>, data: &[u8]) {
    write_auth(out, AUTH_SASL_FINAL, |out| out.extend_from_slice(data));
}

pub fn write_parameter_status(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    write_message(out, b'S', |out| {
        put_cstr(out, name);
        put_cstr(out, value);
    });
}

pub fn write_backend_key_data(out: &mut Vec<u8>, pid: i32, secret: i32) {
    BackendMessage::BackendKeyData { pid, secret }.encode(out);
}

/// `status` is `b'I'`, `b'T'` or `b'E'`.
pub fn write_ready_for_query(out: &mut Vec<u8>, status: u8) {
    BackendMessage::ReadyForQuery(status).encode(out);
}

/// NegotiateProtocolVersion. Pass a whole version number as `newest_minor`, e.g.
/// `startup::PROTOCOL_3_0 as i32`: that is what PostgreSQL sends, and a client reading it as
/// a version would take a bare minor such as 0 for a downgrade below 3.0.
pub fn write_negotiate_protocol_version(
    out: &mut Vec<u8>,
    newest_minor: i32,
    unrecognized: &[&str],
) {
    write_message(out, b'v', |out| {
        out.extend_from_slice(&newest_minor.to_be_bytes());
        put_i32_count(out, unrecognized.len());
        for option in unrecognized {
            put_cstr(out, option.as_bytes());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::frame::split_message;

    fn unframe(encoded: &[u8]) -> (u8, &[u8]) {
        let (tag, body, total) = split_message(encoded, usize::MAX).unwrap().unwrap();
        assert_eq!(total, encoded.len(), "exactly one message");
        (tag, body)
    }

    /// Decodes an encoded message and checks that re-encoding reproduces it.
    fn round_trip(encoded: &[u8]) -> BackendMessage<'_> {
        let (tag, body) = unframe(encoded);
        let msg = decode(tag, body).unwrap();
        assert_eq!(msg.tag(), tag);
        let mut again = Vec::new();
        msg.encode(&mut again);
        assert_eq!(again, encoded);
        msg
    }

    fn written(write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        write(&mut out);
        out
    }

    /// A message framed by hand, independent of the encoder.
    fn framed(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn malformed(what: &'static str, problem: &'static str) -> CodecError {
        CodecError::malformed(what, problem)
    }

    #[test]
    fn tags_cover_every_message() {
        assert!(b"RK23CdcGHWDIEVnNAtS1sZTv"
            .iter()
            .all(|&t| TAGS.contains(t)));
        assert_eq!((0..=255u8).filter(|&t| TAGS.contains(t)).count(), 24);
        for tag in (0..=255u8).filter(|&t| !TAGS.contains(t)) {
            assert_eq!(decode(tag, b""), Err(CodecError::UnknownTag(tag)));
        }
    }

    #[test]
    fn authentication_writers_round_trip() {
        let cases = [
            (written(write_auth_ok), Authentication::Ok),
            (
                written(write_auth_cleartext),
                Authentication::CleartextPassword,
            ),
            (
                written(|o| write_auth_md5(o, [1, 2, 3, 4])),
                Authentication::Md5Password([1, 2, 3, 4]),
            ),
            (
                written(|o| write_auth_sasl_continue(o, b"r=abc,s=xyz,i=4096")),
                Authentication::SaslContinue(b"r=abc,s=xyz,i=4096"),
            ),
            (
                written(|o| write_auth_sasl_final(o, b"v=sig")),
                Authentication::SaslFinal(b"v=sig"),
            ),
        ];
        for (encoded, expected) in cases {
            assert_eq!(
                round_trip(&encoded),
                BackendMessage::Authentication(expected)
            );
        }
        assert_eq!(written(write_auth_ok), b"R\0\0\0\x08\0\0\0\0");
    }

    #[test]
    fn authentication_sasl_mechanisms() {
        let encoded = written(|o| write_auth_sasl(o, &["SCRAM-SHA-256-PLUS", "", "SCRAM-SHA-256"]));
        let BackendMessage::Authentication(Authentication::Sasl(mechanisms)) = round_trip(&encoded)
        else {
            panic!("not AuthenticationSASL");
        };
        assert_eq!(mechanisms.len(), 2);
        assert_eq!(
            mechanisms.iter().collect::<Vec<_>>(),
            ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        );
        assert!(mechanisms.clone().any(|m| m == "SCRAM-SHA-256"));
    }

    #[test]
    fn authentication_without_writers_round_trip() {
        for (code, auth) in [
            (2, Authentication::KerberosV5),
            (7, Authentication::Gss),
            (9, Authentication::Sspi),
        ] {
            let encoded = framed(b'R', &i32::to_be_bytes(code));
            assert_eq!(round_trip(&encoded), BackendMessage::Authentication(auth));
        }
        let encoded = framed(b'R', b"\0\0\0\x08gss token");
        assert_eq!(
            round_trip(&encoded),
            BackendMessage::Authentication(Authentication::GssContinue(b"gss token"))
        );
    }

    #[test]
    fn authentication_malformed() {
        let what = "Authentication";
        assert_eq!(decode(b'R', b"\0\0\0"), Err(malformed(what, "truncated")));
        assert_eq!(
            decode(b'R', b"\0\0\0\0\0"),
            Err(malformed(what, "trailing bytes"))
        );
        assert_eq!(
            decode(b'R', b"\0\0\0\x05\x01\x02\x03"),
            Err(malformed(what, "truncated"))
        );
        assert_eq!(
            decode(b'R', b"\0\0\0\x05\x01\x02\x03\x04\x05"),
            Err(malformed(what, "trailing bytes"))
        );
        for code in [1, 4, 6, 13, -1] {
            assert_eq!(
                decode(b'R', &i32::to_be_bytes(code)),
                Err(malformed(what, "unknown authentication request code"))
            );
        }
        assert_eq!(
            decode(b'R', b"\0\0\0\x0aSCRAM\0"),
            Err(malformed(what, "missing string terminator"))
        );
        assert_eq!(
            decode(b'R', b"\0\0\0\x0aSCRAM\0\0x"),
            Err(malformed(what, "trailing bytes"))
        );
        assert_eq!(
            decode(b'R', b"\0\0\0\x0a\xc3\x28\0\0"),
            Err(malformed(what, "invalid UTF-8"))
        );
    }

    #[test]
    fn backend_key_data() {
        let encoded = written(|o| write_backend_key_data(o, 77, -123456));
        assert_eq!(
            round_trip(&encoded),
            BackendMessage::BackendKeyData {
                pid: 77,
                secret: -123456
            }
        );
        assert_eq!(
            decode(b'K', &[0; 7]),
            Err(malformed("BackendKeyData", "truncated"))
        );
        assert_eq!(
            decode(b'K', &[0; 9]),
            Err(malformed("BackendKeyData", "trailing bytes"))
        );
    }

    #[test]
    fn bodiless_messages() {
        for (tag, what) in [
            (b'2', "BindComplete"),
            (b'3', "CloseComplete"),
            (b'c', "CopyDone"),
            (b'I', "EmptyQueryResponse"),
            (b'n', "NoData"),
            (b'1', "ParseComplete"),
            (b's', "PortalSuspended"),
        ] {
            let encoded = framed(tag, b"");
            let msg = round_trip(&encoded);
            assert_eq!(msg.tag(), tag);
            assert_eq!(decode(tag, b"x"), Err(malformed(what, "trailing bytes")));
        }
    }

    #[test]
    fn command_complete_and_copy_data() {
        let encoded = framed(b'C', b"INSERT 0 5\0");
        assert_eq!(
            round_trip(&encoded),
            BackendMessage::CommandComplete(b"INSERT 0 5")
        );
        assert_eq!(
            decode(b'C', b"SELECT"),
            Err(malformed("CommandComplete", "missing string terminator"))
        );
        assert_eq!(
            decode(b'C', b"SELECT\0\0"),
            Err(malformed("CommandComplete", "trailing bytes"))
        );
        let data = framed(b'd', b"\0\x01raw\0bytes");
        assert_eq!(
            round_trip(&data),
            BackendMessage::CopyData(b"\0\x01raw\0bytes")
        );
    }

    #[test]
    fn copy_responses() {
        let body = [1, 0, 2, 0, 1, 0, 1];
        for (tag, what) in [
            (b'G', "CopyInResponse"),
            (b'H', "CopyOutResponse"),
            (b'W', "CopyBothResponse"),
        ] {
            let encoded = framed(tag, &body);
            let msg = round_trip(&encoded);
            let (BackendMessage::CopyInResponse(copy)
            | BackendMessage::CopyOutResponse(copy)
            | BackendMessage::CopyBothResponse(copy)) = msg
            else {
                panic!("not a copy response");
            };
            assert_eq!(msg.tag(), tag);
            assert_eq!(copy.format(), 1);
            assert_eq!(copy.column_formats().collect::<Vec<_>>(), [1, 1]);
            assert_eq!(
                decode(tag, &[2, 0, 0]),
                Err(malformed(what, "format must be 0 or 1"))
            );
            assert_eq!(decode(tag, &body[..6]), Err(malformed(what, "truncated")));
            assert_eq!(
                decode(tag, &[0, 0, 0, 9]),
                Err(malformed(what, "trailing bytes"))
            );
        }
    }

    fn data_row_body(lengths_and_values: &[(i32, &[u8])]) -> Vec<u8> {
        let mut body = (lengths_and_values.len() as u16).to_be_bytes().to_vec();
        for (len, value) in lengths_and_values {
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(value);
        }
        body
    }

    #[test]
    fn data_row() {
        let body = data_row_body(&[(1, b"1"), (-1, b""), (0, b""), (3, b"abc")]);
        let encoded = framed(b'D', &body);
        let BackendMessage::DataRow(row) = round_trip(&encoded) else {
            panic!("not a DataRow");
        };
        assert_eq!(row.len(), 4);
        assert_eq!(
            row.iter().collect::<Vec<_>>(),
            [Some(&b"1"[..]), None, Some(&b""[..]), Some(&b"abc"[..])]
        );
        let what = "DataRow";
        assert_eq!(
            decode(b'D', &data_row_body(&[(-2, b"")])),
            Err(malformed(what, "negative length"))
        );
        assert_eq!(
            decode(b'D', &data_row_body(&[(4, b"abc")])),
            Err(malformed(what, "truncated"))
        );
        assert_eq!(
            decode(b'D', &data_row_body(&[(2, b"abc")])),
            Err(malformed(what, "trailing bytes"))
        );
        assert_eq!(
            decode(b'D', b"\0\x02\0\0\0\0"),
            Err(malformed(what, "truncated"))
        );
        assert_eq!(decode(b'D', b"\0"), Err(malformed(what, "truncated")));
    }

    #[test]
    fn error_response_writer_and_fields() {
        let encoded =
            written(|o| write_error(o, "FATAL", "28P01", "password authentication failed"));
        let BackendMessage::ErrorResponse(fields) = round_trip(&encoded) else {
            panic!("not an ErrorResponse");
        };
        assert_eq!(fields.severity(), "FATAL");
        assert_eq!(fields.get(b'V'), Some(&b"FATAL"[..]));
        assert_eq!(fields.code(), "28P01");
        assert_eq!(fields.message(), "password authentication failed");
        assert_eq!(fields.get(b'D'), None);
        assert_eq!(
            fields.iter().map(|(code, _)| code).collect::<Vec<_>>(),
            b"SVCM"
        );
        assert!(format!("{fields:?}").contains("'C': \"28P01\""));
    }

    #[test]
    fn notice_and_custom_fields() {
        let encoded = written(|o| write_notice(o, "WARNING", "01000", "careful"));
        let BackendMessage::NoticeResponse(fields) = round_trip(&encoded) else {
            panic!("not a NoticeResponse");
        };
        assert_eq!(
            (fields.severity(), fields.code(), fields.message()),
            ("WARNING", "01000", "careful")
        );

        let encoded = written(|o| {
            write_error_fields(
                o,
                &[
                    (b'S', b"ERROR"),
                    (0, b"dropped"),
                    (b'M', b"\xffbad utf8"),
                    (b'H', b""),
                ],
            )
        });
        let BackendMessage::ErrorResponse(fields) = round_trip(&encoded) else {
            panic!("not an ErrorResponse");
        };
        assert_eq!(fields.iter().count(), 3);
        assert_eq!(fields.message(), "", "non-UTF-8 reads as empty");
        assert_eq!(fields.code(), "", "absent reads as empty");
        assert_eq!(fields.get(b'H'), Some(&b""[..]));
        assert_eq!(
            round_trip(&framed(b'E', b"\0")),
            BackendMessage::ErrorResponse(Fields { raw: b"" })
        );
    }

    #[test]
    fn error_response_malformed() {
        let what = "ErrorResponse";
        assert_eq!(decode(b'E', b""), Err(malformed(what, "truncated")));
        assert_eq!(decode(b'E', b"SERROR\0"), Err(malformed(what, "truncated")));
        assert_eq!(
            decode(b'E', b"SERROR"),
            Err(malformed(what, "missing string terminator"))
        );
        assert_eq!(
            decode(b'E', b"SERROR\0\0M"),
            Err(malformed(what, "trailing bytes"))
        );
        assert_eq!(
            decode(b'N', b"\0\0"),
            Err(malformed("NoticeResponse", "trailing bytes"))
        );
    }

    #[test]
    fn function_call_response() {
        let with_value = framed(b'V', b"\0\0\0\x02hi");
        assert_eq!(
            round_trip(&with_value),
            BackendMessage::FunctionCallResponse(Some(b"hi"))
        );
        let null = framed(b'V', b"\xff\xff\xff\xff");
        assert_eq!(
            round_trip(&null),
            BackendMessage::FunctionCallResponse(None)
        );
        let what = "FunctionCallResponse";
        assert_eq!(
            decode(b'V', b"\xff\xff\xff\xfe"),
            Err(malformed(what, "negative length"))
        );
        assert_eq!(
            decode(b'V', b"\0\0\0\x03hi"),
            Err(malformed(what, "truncated"))
        );
        assert_eq!(
            decode(b'V', b"\0\0\0\x01hi"),
            Err(malformed(what, "trailing bytes"))
        );
    }

    #[test]
    fn negotiate_protocol_version() {
        let encoded =
            written(|o| write_negotiate_protocol_version(o, 196608, &["_pq_.a", "_pq_.b"]));
        let BackendMessage::NegotiateProtocolVersion {
            newest_minor,
            unrecognized,
        } = round_trip(&encoded)
        else {
            panic!("not a NegotiateProtocolVersion");
        };
        assert_eq!(newest_minor, 196608);
        assert_eq!(
            unrecognized.iter().collect::<Vec<_>>(),
            ["_pq_.a", "_pq_.b"]
        );
        let none = written(|o| write_negotiate_protocol_version(o, 0, &[]));
        assert_eq!(round_trip(&none).tag(), b'v');

        let what = "NegotiateProtocolVersion";
        assert_eq!(
            decode(b'v', b"\0\0\0\0\xff\xff\xff\xff"),
            Err(malformed(what, "negative count"))
        );
        assert_eq!(
            decode(b'v', b"\0\0\0\0\0\0\0\x02a\0"),
            Err(malformed(what, "missing string terminator"))
        );
        assert_eq!(
            decode(b'v', b"\0\0\0\0\0\0\0\x01a\0b\0"),
            Err(malformed(what, "trailing bytes"))
        );
        assert_eq!(
            decode(b'v', b"\0\0\0\0\0\0\0\x01\xff\0"),
            Err(malformed(what, "invalid UTF-8"))
        );
        assert_eq!(
            decode(b'v', b"\0\0\0\0\0\0"),
            Err(malformed(what, "truncated"))
        );
    }

    #[test]
    fn notification_response() {
        let encoded = framed(b'A', b"\0\0\x01\0jobs\0{\"id\":1}\0");
        assert_eq!(
            round_trip(&encoded),
            BackendMessage::NotificationResponse {
                pid: 256,
                channel: b"jobs",
                payload: b"{\"id\":1}"
            }
        );
        let what = "NotificationResponse";
        assert_eq!(
            decode(b'A', b"\0\0\x01\0jobs\0"),
            Err(malformed(what, "missing string terminator"))
        );
        assert_eq!(
            decode(b'A', b"\0\0\x01\0a\0b\0c"),
            Err(malformed(what, "trailing bytes"))
        );
        assert_eq!(decode(b'A', b"\0\0"), Err(malformed(what, "truncated")));
    }

    #[test]
    fn parameter_description() {
        let encoded = framed(b't', b"\0\x02\0\0\0\x17\0\0\0\x19");
        let BackendMessage::ParameterDescription(types) = round_trip(&encoded) else {
            panic!("not a ParameterDescription");
        };
        assert_eq!(types.iter().collect::<Vec<_>>(), [23, 25]);
        let what = "ParameterDescription";
        assert_eq!(
            decode(b't', b"\0\x02\0\0\0\x17"),
            Err(malformed(what, "truncated"))
        );
        assert_eq!(
            decode(b't', b"\0\0\0"),
            Err(malformed(what, "trailing bytes"))
        );
    }

    #[test]
    fn parameter_status() {
        let encoded = written(|o| write_parameter_status(o, b"TimeZone", b"UTC"));
        assert_eq!(
            round_trip(&encoded),
            BackendMessage::ParameterStatus {
                name: b"TimeZone",
                value: b"UTC"
            }
        );
        let what = "ParameterStatus";
        assert_eq!(
            decode(b'S', b"TimeZone\0"),
            Err(malformed(what, "missing string terminator"))
        );
        assert_eq!(
            decode(b'S', b"a\0b\0c\0"),
            Err(malformed(what, "trailing bytes"))
        );
    }

    #[test]
    fn ready_for_query() {
        for status in [b'I', b'T', b'E'] {
            let encoded = written(|o| write_ready_for_query(o, status));
            assert_eq!(encoded, [b'Z', 0, 0, 0, 5, status]);
            assert_eq!(round_trip(&encoded), BackendMessage::ReadyForQuery(status));
        }
        let what = "ReadyForQuery";
        assert_eq!(
            decode(b'Z', b"X"),
            Err(malformed(what, "status must be 'I', 'T' or 'E'"))
        );
        assert_eq!(decode(b'Z', b""), Err(malformed(what, "truncated")));
        assert_eq!(decode(b'Z', b"II"), Err(malformed(what, "trailing bytes")));
    }

    fn row_description_body(names: &[&[u8]]) -> Vec<u8> {
        let mut body = (names.len() as u16).to_be_bytes().to_vec();
        for (i, name) in names.iter().enumerate() {
            body.extend_from_slice(name);
            body.push(0);
            body.extend_from_slice(&16384u32.to_be_bytes());
            body.extend_from_slice(&(i as i16 + 1).to_be_bytes());
            body.extend_from_slice(&25u32.to_be_bytes());
            body.extend_from_slice(&(-1i16).to_be_bytes());
            body.extend_from_slice(&(-1i32).to_be_bytes());
            body.extend_from_slice(&0i16.to_be_bytes());
        }
        body
    }

    #[test]
    fn row_description() {
        let body = row_description_body(&[b"id", b"name"]);
        let encoded = framed(b'T', &body);
        let BackendMessage::RowDescription(fields) = round_trip(&encoded) else {
            panic!("not a RowDescription");
        };
        assert_eq!(fields.len(), 2);
        let columns: Vec<_> = fields.iter().collect();
        assert_eq!(
            columns[1],
            FieldDescription {
                name: b"name",
                table_oid: 16384,
                column_id: 2,
                type_oid: 25,
                type_size: -1,
                type_modifier: -1,
                format: 0,
            }
        );
        let what = "RowDescription";
        assert_eq!(
            decode(b'T', &body[..body.len() - 1]),
            Err(malformed(what, "truncated"))
        );
        assert_eq!(
            decode(b'T', &[&body[..], b"\0"].concat()),
            Err(malformed(what, "trailing bytes"))
        );
        assert_eq!(
            decode(b'T', b"\0\x01id"),
            Err(malformed(what, "missing string terminator"))
        );
        assert_eq!(round_trip(&framed(b'T', b"\0\0")).tag(), b'T');
    }

    #[test]
    fn writers_cut_interior_nuls_to_keep_framing() {
        let encoded = written(|o| write_error(o, "ERROR", "42000", "bad\0tail"));
        let BackendMessage::ErrorResponse(fields) = round_trip(&encoded) else {
            panic!("not an ErrorResponse");
        };
        assert_eq!(fields.message(), "bad");
    }
}
