//! Message framing: where tagged messages start and end in a byte stream, plus the
//! primitive field readers, writers and views that the message codecs are built from.
//!
//! Every tagged message is `tag: u8`, `len: i32` (counting itself, not the tag), then
//! `len - 4` body bytes. The proxy forwards most traffic untouched, so [`Scanner`] only
//! tracks boundaries and hands out the few bodies a caller asks for.

use std::fmt;
use std::iter::FusedIterator;

use super::CodecError;

/// Bytes in a tagged message header: the tag and the Int32 length.
pub const HEADER_LEN: usize = 5;

/// Bytes the length field counts besides the body: the field itself.
const LENGTH_FIELD_LEN: usize = 4;

// ---------------------------------------------------------------------------------------
// Tag sets
// ---------------------------------------------------------------------------------------

/// A set of message tags as a 256-bit bitmap, so membership is one shift and mask on the
/// hot path and sets can be built in `const` context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TagSet([u64; 4]);

impl TagSet {
    /// No tags at all: a scanner with this capture set only tracks boundaries.
    pub const EMPTY: TagSet = TagSet([0; 4]);
    /// Every byte value, e.g. to capture all messages.
    pub const ALL: TagSet = TagSet([u64::MAX; 4]);

    pub const fn new(tags: &[u8]) -> TagSet {
        let mut words = [0u64; 4];
        let mut i = 0;
        while i < tags.len() {
            let tag = tags[i];
            words[(tag >> 6) as usize] |= 1 << (tag & 63);
            i += 1;
        }
        TagSet(words)
    }

    pub const fn contains(&self, tag: u8) -> bool {
        self.0[(tag >> 6) as usize] & (1 << (tag & 63)) != 0
    }

    pub const fn union(self, other: TagSet) -> TagSet {
        let (a, b) = (self.0, other.0);
        TagSet([a[0] | b[0], a[1] | b[1], a[2] | b[2], a[3] | b[3]])
    }
}

// ---------------------------------------------------------------------------------------
// Whole-buffer framing
// ---------------------------------------------------------------------------------------

/// Reads a tagged header at buf[0..5]: (tag, total message length incl. tag byte = 1 + len field).
///
/// Returns `Ok(None)` while fewer than [`HEADER_LEN`] bytes are available. The tag is not
/// judged here: which tags are valid depends on the direction of the stream.
pub fn read_header(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, CodecError> {
    buf.first_chunk::<HEADER_LEN>()
        .map(|header| parse_header(header, max))
        .transpose()
}

/// Validates a header's length field: (tag, total message length).
fn parse_header(header: &[u8; HEADER_LEN], max: usize) -> Result<(u8, usize), CodecError> {
    let [tag, a, b, c, d] = *header;
    let len = i32::from_be_bytes([a, b, c, d]);
    let body_and_length = usize::try_from(len)
        .ok()
        .filter(|&n| n >= LENGTH_FIELD_LEN)
        .ok_or(CodecError::InvalidLength {
            len: i64::from(len),
        })?;
    let total = 1 + body_and_length;
    if total > max {
        return Err(CodecError::TooLarge { len: total, max });
    }
    Ok((tag, total))
}

/// A message split off a buffer: (tag, body, total length including the header).
pub type RawMessage<'a> = (u8, &'a [u8], usize);

/// Splits one complete message off the front of buf: (tag, body, total_len); Ok(None) = need more bytes.
pub fn split_message(buf: &[u8], max: usize) -> Result<Option<RawMessage<'_>>, CodecError> {
    let Some((tag, total)) = read_header(buf, max)? else {
        return Ok(None);
    };
    Ok(buf.get(HEADER_LEN..total).map(|body| (tag, body, total)))
}

// ---------------------------------------------------------------------------------------
// Streaming scanner
// ---------------------------------------------------------------------------------------

/// What a [`Scanner`] callback wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Continue,
    Stop,
}

/// Where the scanner stands in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Position {
    /// Between messages (`have == 0`) or inside a header of which `have` bytes are buffered.
    Header { have: usize },
    /// Inside a body that began in an earlier chunk.
    Body(PendingBody),
}

/// A message body still arriving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PendingBody {
    tag: u8,
    /// Body bytes still to come (never 0: a complete body is delivered at once).
    left: usize,
    /// The whole body's length.
    len: usize,
    delivery: Delivery,
}

/// What the caller hears about a message once it completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    Nothing,
    /// The callback runs with an empty body; nothing is copied.
    Notify,
    /// The callback runs with the whole body.
    Capture,
}

impl Delivery {
    fn deliver(
        self,
        on_message: &mut impl FnMut(u8, &[u8], usize) -> Step,
        tag: u8,
        body: &[u8],
        end: usize,
    ) -> Step {
        match self {
            Delivery::Nothing => Step::Continue,
            Delivery::Notify => on_message(tag, &[], end),
            Delivery::Capture => on_message(tag, body, end),
        }
    }
}

/// Streaming message-boundary scanner for a byte stream of tagged messages. The caller forwards
/// bytes unchanged; the scanner tracks where messages start/end and hands the caller complete bodies of
/// the messages whose tag is in `capture`.
///
/// Bodies that are not captured are skipped by arithmetic, so scanning costs O(1) per message
/// whatever its size. After an error the stream is unusable; call [`Scanner::reset`] before
/// reusing the scanner for another stream.
pub struct Scanner {
    valid: TagSet,
    capture: TagSet,
    notify: TagSet,
    max_len: usize,
    position: Position,
    header: [u8; HEADER_LEN],
    /// Body bytes of a captured message that arrived in earlier chunks.
    straddled: Vec<u8>,
}

impl Scanner {
    pub fn new(valid: TagSet, capture: TagSet, max_len: usize) -> Scanner {
        Scanner {
            valid,
            capture,
            notify: TagSet::EMPTY,
            max_len,
            position: Position::Header { have: 0 },
            header: [0; HEADER_LEN],
            straddled: Vec::new(),
        }
    }

    /// Which complete bodies are handed over from the next message on.
    pub fn set_capture(&mut self, capture: TagSet) {
        self.capture = capture;
    }

    /// Also reports messages whose tag is in `notify` (and not in `capture`) when they
    /// complete, passing an empty body: for callers that only need to know a message went by
    /// and should not pay for copying its body.
    pub fn with_notify(mut self, notify: TagSet) -> Scanner {
        self.notify = notify;
        self
    }

    /// Scans `chunk` (the next bytes of the stream). For every message whose tag is in `capture`
    /// and which completes inside this chunk calls on_message(tag, body, end) where `end` is the offset in
    /// `chunk` just past that message. A captured body that straddles chunks is copied into an internal
    /// Vec (allocated lazily on first need and reused), so callers may discard bytes once scanned. If the
    /// callback returns Step::Stop scanning stops and Ok(end) is returned, else Ok(chunk.len()).
    /// Errors: tag not in `valid` (UnknownTag), length field < 4 (InvalidLength), 1+len > max_len (TooLarge).
    pub fn scan(
        &mut self,
        chunk: &[u8],
        mut on_message: impl FnMut(u8, &[u8], usize) -> Step,
    ) -> Result<usize, CodecError> {
        let mut pos = 0;
        loop {
            let step = match self.position {
                Position::Header { have } => {
                    self.start_message(chunk, &mut pos, have, &mut on_message)?
                }
                Position::Body(body) => self.continue_body(chunk, &mut pos, body, &mut on_message),
            };
            match step {
                None => return Ok(chunk.len()),
                Some(Step::Stop) => return Ok(pos),
                Some(Step::Continue) => {}
            }
        }
    }

    /// Bytes at the end of the scanned input that form an incomplete header (0..=4).
    pub fn partial_header_len(&self) -> usize {
        match self.position {
            Position::Header { have } => have,
            Position::Body(_) => 0,
        }
    }

    /// The message in progress at the end of the scanned input: its tag (once the header
    /// is complete) and how many of its bytes, header included, were scanned so far. `None`
    /// between messages. Callers that may still drop or replace that message hold those
    /// bytes back instead of forwarding them.
    pub fn partial_message(&self) -> Option<(Option<u8>, usize)> {
        match self.position {
            Position::Header { have: 0 } => None,
            Position::Header { have } => Some((None, have)),
            Position::Body(body) => Some((Some(body.tag), HEADER_LEN + body.len - body.left)),
        }
    }

    /// True when the scanner sits exactly between two messages.
    pub fn at_boundary(&self) -> bool {
        self.position == Position::Header { have: 0 }
    }

    /// Forgets the current position so the scanner can start on a fresh stream; keeps the
    /// capture buffer's allocation.
    pub fn reset(&mut self) {
        self.position = Position::Header { have: 0 };
        self.straddled.clear();
    }

    /// Reads the next header and, when the chunk holds the whole body, the message itself.
    /// `None` means the chunk ran out first.
    fn start_message(
        &mut self,
        chunk: &[u8],
        pos: &mut usize,
        have: usize,
        on_message: &mut impl FnMut(u8, &[u8], usize) -> Step,
    ) -> Result<Option<Step>, CodecError> {
        let Some(header) = self.take_header(chunk, pos, have) else {
            return Ok(None);
        };
        let (tag, body_len) = self.check_header(&header)?;
        let delivery = self.delivery(tag);
        let start = *pos;
        let available = chunk.len() - start;
        if available < body_len {
            if delivery == Delivery::Capture {
                self.straddled.clear();
                self.straddled.extend_from_slice(&chunk[start..]);
            }
            let left = body_len - available;
            self.position = Position::Body(PendingBody {
                tag,
                left,
                len: body_len,
                delivery,
            });
            *pos = chunk.len();
            return Ok(None);
        }
        let end = start + body_len;
        *pos = end;
        Ok(Some(delivery.deliver(
            on_message,
            tag,
            &chunk[start..end],
            end,
        )))
    }

    /// Consumes more of a body that began in an earlier chunk. `None` means the chunk ran
    /// out first.
    fn continue_body(
        &mut self,
        chunk: &[u8],
        pos: &mut usize,
        body: PendingBody,
        on_message: &mut impl FnMut(u8, &[u8], usize) -> Step,
    ) -> Option<Step> {
        let start = *pos;
        let end = start.saturating_add(body.left).min(chunk.len());
        if body.delivery == Delivery::Capture {
            self.straddled.extend_from_slice(&chunk[start..end]);
        }
        *pos = end;
        let left = body.left - (end - start);
        if left > 0 {
            self.position = Position::Body(PendingBody { left, ..body });
            return None;
        }
        self.position = Position::Header { have: 0 };
        Some(
            body.delivery
                .deliver(on_message, body.tag, &self.straddled, end),
        )
    }

    fn delivery(&self, tag: u8) -> Delivery {
        if self.capture.contains(tag) {
            Delivery::Capture
        } else if self.notify.contains(tag) {
            Delivery::Notify
        } else {
            Delivery::Nothing
        }
    }

    /// Completes the header at `chunk[*pos..]`, reading straight from the chunk when it holds
    /// the whole header and buffering otherwise. `None` means the chunk ran out first.
    fn take_header(
        &mut self,
        chunk: &[u8],
        pos: &mut usize,
        have: usize,
    ) -> Option<[u8; HEADER_LEN]> {
        let rest = &chunk[*pos..];
        if have == 0 {
            if let Some(header) = rest.first_chunk::<HEADER_LEN>() {
                *pos += HEADER_LEN;
                return Some(*header);
            }
        }
        let wanted = (HEADER_LEN - have).min(rest.len());
        self.header[have..have + wanted].copy_from_slice(&rest[..wanted]);
        *pos += wanted;
        let have = have + wanted;
        if have < HEADER_LEN {
            self.position = Position::Header { have };
            return None;
        }
        self.position = Position::Header { have: 0 };
        Some(self.header)
    }

    /// Validates a complete header, returning the tag and the body length.
    fn check_header(&self, header: &[u8; HEADER_LEN]) -> Result<(u8, usize), CodecError> {
        let tag = header[0];
        if !self.valid.contains(tag) {
            return Err(CodecError::UnknownTag(tag));
        }
        let (tag, total) = parse_header(header, self.max_len)?;
        Ok((tag, total - HEADER_LEN))
    }
}

impl fmt::Debug for Scanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scanner")
            .field("position", &self.position)
            .field("max_len", &self.max_len)
            .field("straddled_len", &self.straddled.len())
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------
// Body reading
// ---------------------------------------------------------------------------------------

/// Cursor over a message body. Every short read becomes a `Malformed` error naming the
/// message, so decoders are straight-line code with `?`.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(body: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { rest: body, what }
    }

    pub(crate) fn error(&self, problem: &'static str) -> CodecError {
        CodecError::malformed(self.what, problem)
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if n > self.rest.len() {
            return Err(self.error("truncated"));
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let (bytes, rest) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or_else(|| self.error("truncated"))?;
        self.rest = rest;
        Ok(*bytes)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, CodecError> {
        self.array::<1>().map(|[b]| b)
    }

    pub(crate) fn i16(&mut self) -> Result<i16, CodecError> {
        self.array().map(i16::from_be_bytes)
    }

    /// An Int16 item count. PostgreSQL reads counts as unsigned (up to 65535 parameters).
    pub(crate) fn count(&mut self) -> Result<usize, CodecError> {
        self.array().map(|b| usize::from(u16::from_be_bytes(b)))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, CodecError> {
        self.array().map(i32::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, CodecError> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn bytes4(&mut self) -> Result<[u8; 4], CodecError> {
        self.array()
    }

    /// A NUL-terminated string, returned without its terminator.
    pub(crate) fn cstr(&mut self) -> Result<&'a [u8], CodecError> {
        let nul = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.error("missing string terminator"))?;
        let s = &self.rest[..nul];
        self.rest = &self.rest[nul + 1..];
        Ok(s)
    }

    /// An Int32 length followed by that many bytes, where -1 means NULL.
    pub(crate) fn nullable(&mut self) -> Result<Option<&'a [u8]>, CodecError> {
        match self.i32()? {
            -1 => Ok(None),
            len => {
                let len = usize::try_from(len).map_err(|_| self.error("negative length"))?;
                self.take(len).map(Some)
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Everything not read yet.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Ends decoding: a valid message has no bytes beyond its last field.
    pub(crate) fn finish(self) -> Result<(), CodecError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.error("trailing bytes"))
        }
    }

    pub(crate) fn format_codes(&mut self) -> Result<FormatCodes<'a>, CodecError> {
        let count = self.count()?;
        self.take(count * 2).map(|raw| FormatCodes { raw })
    }

    pub(crate) fn param_types(&mut self) -> Result<ParamTypes<'a>, CodecError> {
        let count = self.count()?;
        self.take(count * 4).map(|raw| ParamTypes { raw })
    }

    /// Runs `read` and also returns the bytes it consumed, for views that keep their raw
    /// region and iterate it later.
    pub(crate) fn spanned<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<T, CodecError>,
    ) -> Result<(&'a [u8], T), CodecError> {
        let start = self.rest;
        let value = read(self)?;
        Ok((&start[..start.len() - self.rest.len()], value))
    }

    /// A count followed by that many nullable values.
    pub(crate) fn values(&mut self) -> Result<Values<'a>, CodecError> {
        let count = self.count()?;
        let (raw, ()) = self.spanned(|r| (0..count).try_for_each(|_| r.nullable().map(drop)))?;
        Ok(Values {
            remaining: count,
            raw,
        })
    }

    /// `count` NUL-terminated UTF-8 strings.
    pub(crate) fn str_list(&mut self, count: usize) -> Result<StrList<'a>, CodecError> {
        let (raw, ()) = self.spanned(|r| (0..count).try_for_each(|_| r.cstr().map(drop)))?;
        self.utf8_list(raw, count)
    }

    /// NUL-terminated UTF-8 strings ended by an empty string (the SASL mechanism list).
    pub(crate) fn str_list_until_empty(&mut self) -> Result<StrList<'a>, CodecError> {
        let (raw, count) = self.spanned(|r| {
            let mut count = 0;
            while !r.cstr()?.is_empty() {
                count += 1;
            }
            Ok(count)
        })?;
        let without_terminator = &raw[..raw.len() - 1];
        self.utf8_list(without_terminator, count)
    }

    fn utf8_list(&self, raw: &'a [u8], count: usize) -> Result<StrList<'a>, CodecError> {
        let rest = std::str::from_utf8(raw).map_err(|_| self.error("invalid UTF-8"))?;
        Ok(StrList {
            remaining: count,
            rest,
        })
    }
}

/// Decodes a body that must be empty (Sync, BindComplete, ...).
pub(crate) fn decode_empty(body: &[u8], what: &'static str) -> Result<(), CodecError> {
    Reader::new(body, what).finish()
}

/// Decodes a body that is exactly one NUL-terminated string (Query, CommandComplete, ...).
pub(crate) fn decode_single_string<'a>(
    body: &'a [u8],
    what: &'static str,
) -> Result<&'a [u8], CodecError> {
    let mut reader = Reader::new(body, what);
    let s = reader.cstr()?;
    reader.finish()?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// Body writing
// ---------------------------------------------------------------------------------------

/// Appends a tagged message whose body `write_body` appends, then back-patches the length.
///
/// # Panics
/// If the message would exceed `i32::MAX` bytes, which the protocol cannot express.
pub(crate) fn write_message(out: &mut Vec<u8>, tag: u8, write_body: impl FnOnce(&mut Vec<u8>)) {
    out.push(tag);
    write_packet(out, write_body);
}

/// Appends a tagged message whose body is `parts` one after another: for forwarding a
/// client's message with one field changed without building it twice.
pub fn write_parts(out: &mut Vec<u8>, tag: u8, parts: &[&[u8]]) {
    write_message(out, tag, |out| {
        for part in parts {
            out.extend_from_slice(part);
        }
    });
}

/// Splits a NUL-terminated string off the front of `bytes`: (string, rest after the NUL).
pub fn split_cstr(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = bytes.iter().position(|&b| b == 0)?;
    Some((&bytes[..nul], &bytes[nul + 1..]))
}

/// Appends an untagged (startup-phase) packet; see [`write_message`].
pub(crate) fn write_packet(out: &mut Vec<u8>, write_body: impl FnOnce(&mut Vec<u8>)) {
    let length_at = out.len();
    out.extend_from_slice(&[0; LENGTH_FIELD_LEN]);
    write_body(out);
    let len = i32::try_from(out.len() - length_at).expect("message longer than i32::MAX bytes");
    out[length_at..length_at + LENGTH_FIELD_LEN].copy_from_slice(&len.to_be_bytes());
}

/// Appends `s` and a NUL. An interior NUL would end the string early on the peer's side
/// and desynchronise every following field, so `s` is cut at its first NUL.
pub(crate) fn put_cstr(out: &mut Vec<u8>, s: &[u8]) {
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    out.extend_from_slice(&s[..end]);
    out.push(0);
}

/// Appends an Int16 item count.
///
/// # Panics
/// If `count` exceeds 65535, the protocol's limit.
pub(crate) fn put_count(out: &mut Vec<u8>, count: usize) {
    let count = u16::try_from(count).expect("more than 65535 items in one message");
    out.extend_from_slice(&count.to_be_bytes());
}

/// Appends an Int32 length and the bytes, or -1 for NULL.
///
/// # Panics
/// If the value exceeds `i32::MAX` bytes.
pub(crate) fn put_nullable(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(bytes) => {
            let len = i32::try_from(bytes.len()).expect("value longer than i32::MAX bytes");
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(bytes);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Field views shared by both directions
// ---------------------------------------------------------------------------------------
//
// Each view is an iterator over fields validated at decode time, borrowing the body. Views
// are `Copy`, so iterating one taken out of a message never consumes the message's own, and
// `iter()` gives a fresh copy of a view held by reference. Debug shows the remaining items.

/// Takes the next `N` bytes off the front of `raw`.
fn next_chunk<const N: usize>(raw: &mut &[u8]) -> Option<[u8; N]> {
    let (chunk, rest) = raw.split_first_chunk::<N>()?;
    *raw = rest;
    Some(*chunk)
}

/// Format codes (0 = text, 1 = binary) as Int16 values.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FormatCodes<'a> {
    raw: &'a [u8],
}

impl<'a> FormatCodes<'a> {
    pub fn iter(&self) -> FormatCodes<'a> {
        *self
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_count(out, self.len());
        out.extend_from_slice(self.raw);
    }
}

impl Iterator for FormatCodes<'_> {
    type Item = i16;

    fn next(&mut self) -> Option<i16> {
        next_chunk(&mut self.raw).map(i16::from_be_bytes)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.raw.len() / 2;
        (n, Some(n))
    }
}

/// Parameter type OIDs, as in Parse and ParameterDescription (0 = unspecified).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ParamTypes<'a> {
    raw: &'a [u8],
}

impl<'a> ParamTypes<'a> {
    pub fn iter(&self) -> ParamTypes<'a> {
        *self
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_count(out, self.len());
        out.extend_from_slice(self.raw);
    }
}

impl Iterator for ParamTypes<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        next_chunk(&mut self.raw).map(u32::from_be_bytes)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.raw.len() / 4;
        (n, Some(n))
    }
}

/// Nullable values (Bind parameters, FunctionCall arguments, DataRow columns); `None` is NULL.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Values<'a> {
    remaining: usize,
    raw: &'a [u8],
}

impl<'a> Values<'a> {
    pub fn iter(&self) -> Values<'a> {
        *self
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_count(out, self.remaining);
        out.extend_from_slice(self.raw);
    }
}

impl<'a> Iterator for Values<'a> {
    type Item = Option<&'a [u8]>;

    fn next(&mut self) -> Option<Option<&'a [u8]>> {
        if self.remaining == 0 {
            return None;
        }
        let mut reader = Reader::new(self.raw, "value list");
        match reader.nullable() {
            Ok(value) => {
                self.remaining -= 1;
                self.raw = reader.rest();
                Some(value)
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

/// NUL-terminated UTF-8 names (SASL mechanisms, unrecognized protocol options).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StrList<'a> {
    remaining: usize,
    /// The strings, each followed by its NUL.
    rest: &'a str,
}

impl<'a> StrList<'a> {
    pub fn iter(&self) -> StrList<'a> {
        *self
    }

    /// Appends the strings with their terminators (no count, no list terminator).
    pub(crate) fn encode_strings(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.rest.as_bytes());
    }
}

impl<'a> Iterator for StrList<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let (s, rest) = self.rest.split_once('\0')?;
        self.rest = rest;
        self.remaining = self.remaining.saturating_sub(1);
        Some(s)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

/// The traits every field view implements; needs an inherent `iter()` returning `Self`.
macro_rules! view_traits {
    ($($view:ident),*) => {$(
        impl ExactSizeIterator for $view<'_> {}
        impl FusedIterator for $view<'_> {}
        impl fmt::Debug for $view<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list().entries(self.iter()).finish()
            }
        }
    )*};
}

view_traits!(FormatCodes, ParamTypes, Values, StrList);
pub(crate) use view_traits;

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    /// A tagged message with the given body, framed by hand.
    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn tag_set_membership_covers_all_words() {
        let set = TagSet::new(&[0, 63, 64, b'Q', 200, 255]);
        for tag in 0..=255u8 {
            let expected = matches!(tag, 0 | 63 | 64 | b'Q' | 200 | 255);
            assert_eq!(set.contains(tag), expected, "tag {tag}");
        }
        assert!(!TagSet::EMPTY.contains(b'Q'));
        assert!((0..=255u8).all(|t| TagSet::ALL.contains(t)));
    }

    #[test]
    fn tag_set_union_and_const_construction() {
        const A: TagSet = TagSet::new(b"QP");
        const B: TagSet = TagSet::new(b"PX");
        const AB: TagSet = A.union(B);
        assert_eq!(AB, TagSet::new(b"QPX"));
        assert_eq!(A.union(TagSet::EMPTY), A);
    }

    #[test]
    fn read_header_needs_five_bytes() {
        let m = msg(b'Z', b"I");
        for n in 0..HEADER_LEN {
            assert_eq!(read_header(&m[..n], MAX), Ok(None));
        }
        assert_eq!(read_header(&m, MAX), Ok(Some((b'Z', 6))));
        assert_eq!(read_header(&m[..HEADER_LEN], MAX), Ok(Some((b'Z', 6))));
    }

    #[test]
    fn read_header_rejects_short_and_negative_lengths() {
        for len in [i32::MIN, -1, 0, 3] {
            let mut m = vec![b'Q'];
            m.extend_from_slice(&len.to_be_bytes());
            assert_eq!(
                read_header(&m, MAX),
                Err(CodecError::InvalidLength {
                    len: i64::from(len)
                })
            );
        }
        assert_eq!(read_header(&msg(b'S', b""), MAX), Ok(Some((b'S', 5))));
    }

    #[test]
    fn read_header_enforces_the_maximum_on_the_whole_message() {
        let m = msg(b'd', &[7; 10]);
        assert_eq!(read_header(&m, 15), Ok(Some((b'd', 15))));
        assert_eq!(
            read_header(&m, 14),
            Err(CodecError::TooLarge { len: 15, max: 14 })
        );
        let mut huge = vec![b'd'];
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(
            read_header(&huge, MAX),
            Err(CodecError::TooLarge {
                len: 1 + i32::MAX as usize,
                max: MAX
            })
        );
    }

    #[test]
    fn split_message_waits_for_the_whole_body() {
        let mut stream = msg(b'C', b"SELECT 1\0");
        stream.extend(msg(b'Z', b"I"));
        let first_len = 1 + 4 + 9;
        for n in 0..first_len {
            assert_eq!(split_message(&stream[..n], MAX), Ok(None));
        }
        assert_eq!(
            split_message(&stream, MAX),
            Ok(Some((b'C', &b"SELECT 1\0"[..], first_len)))
        );
        assert_eq!(
            split_message(&stream[first_len..], MAX),
            Ok(Some((b'Z', &b"I"[..], 6)))
        );
    }

    #[test]
    fn split_message_propagates_header_errors() {
        assert_eq!(
            split_message(&[b'Q', 0, 0, 0, 2], MAX),
            Err(CodecError::InvalidLength { len: 2 })
        );
        assert_eq!(
            split_message(&msg(b'Q', &[1; 20]), 10),
            Err(CodecError::TooLarge { len: 25, max: 10 })
        );
    }

    /// Scans `chunks` in order, recording (tag, body, stream offset of the end).
    fn scan_all(scanner: &mut Scanner, chunks: &[&[u8]]) -> Vec<(u8, Vec<u8>, usize)> {
        let mut seen = Vec::new();
        let mut base = 0;
        for chunk in chunks {
            let scanned = scanner
                .scan(chunk, |tag, body, end| {
                    seen.push((tag, body.to_vec(), base + end));
                    Step::Continue
                })
                .expect("valid stream");
            assert_eq!(scanned, chunk.len());
            base += chunk.len();
        }
        seen
    }

    fn three_messages() -> Vec<u8> {
        let mut stream = msg(b'T', b"row description");
        stream.extend(msg(b'D', b""));
        stream.extend(msg(b'Z', b"T"));
        stream
    }

    #[test]
    fn scanner_reports_captured_messages_in_one_chunk() {
        let stream = three_messages();
        let mut scanner = Scanner::new(TagSet::new(b"TDZ"), TagSet::new(b"TZ"), MAX);
        let seen = scan_all(&mut scanner, &[&stream]);
        assert_eq!(
            seen,
            vec![
                (b'T', b"row description".to_vec(), 20),
                (b'Z', b"T".to_vec(), stream.len())
            ]
        );
        assert!(scanner.at_boundary());
    }

    #[test]
    fn scanner_handles_one_byte_at_a_time() {
        let stream = three_messages();
        let mut scanner = Scanner::new(TagSet::ALL, TagSet::ALL, MAX);
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        let seen = scan_all(&mut scanner, &chunks);
        let tags: Vec<u8> = seen.iter().map(|m| m.0).collect();
        assert_eq!(tags, b"TDZ");
        assert_eq!(seen[0].1, b"row description");
        assert_eq!(seen[1], (b'D', vec![], 25));
    }

    #[test]
    fn scanner_tracks_partial_headers() {
        let stream = msg(b'Z', b"I");
        let mut scanner = Scanner::new(TagSet::ALL, TagSet::EMPTY, MAX);
        assert!(scanner.at_boundary());
        for (i, byte) in stream.iter().enumerate().take(HEADER_LEN - 1) {
            scanner.scan(&[*byte], |_, _, _| Step::Continue).unwrap();
            assert_eq!(scanner.partial_header_len(), i + 1);
            assert!(!scanner.at_boundary());
        }
        scanner
            .scan(&stream[4..5], |_, _, _| Step::Continue)
            .unwrap();
        assert_eq!(scanner.partial_header_len(), 0);
        assert!(!scanner.at_boundary(), "inside the body");
        scanner
            .scan(&stream[5..], |_, _, _| Step::Continue)
            .unwrap();
        assert!(scanner.at_boundary());
    }

    #[test]
    fn scanner_skips_uncaptured_bodies_without_copying() {
        let mut stream = msg(b'd', &[9; 1000]);
        stream.extend(msg(b'Z', b"I"));
        let mut scanner = Scanner::new(TagSet::ALL, TagSet::new(b"Z"), MAX);
        let chunks: Vec<&[u8]> = stream.chunks(7).collect();
        let seen = scan_all(&mut scanner, &chunks);
        assert_eq!(seen, vec![(b'Z', b"I".to_vec(), stream.len())]);
        assert_eq!(scanner.straddled.capacity(), 0, "never allocated");
    }

    #[test]
    fn scanner_notifies_without_copying() {
        let mut stream = msg(b'Q', &[b'x'; 100]);
        stream.push(0);
        stream[4] += 1;
        stream.extend(msg(b'X', b""));
        let mut scanner =
            Scanner::new(TagSet::ALL, TagSet::new(b"X"), MAX).with_notify(TagSet::new(b"QX"));
        let chunks: Vec<&[u8]> = stream.chunks(30).collect();
        let seen = scan_all(&mut scanner, &chunks);
        assert_eq!(
            seen,
            vec![(b'Q', vec![], 106), (b'X', vec![], stream.len())]
        );
        assert_eq!(scanner.straddled.capacity(), 0, "never allocated");
    }

    #[test]
    fn scanner_reassembles_a_straddling_captured_body() {
        let stream = msg(b'E', b"SERROR\0Mboom\0\0");
        let mut scanner = Scanner::new(TagSet::ALL, TagSet::new(b"E"), MAX);
        let seen = scan_all(&mut scanner, &[&stream[..8], &stream[8..12], &stream[12..]]);
        assert_eq!(
            seen,
            vec![(b'E', b"SERROR\0Mboom\0\0".to_vec(), stream.len())]
        );
    }

    #[test]
    fn scanner_stops_when_asked_and_resumes() {
        let stream = three_messages();
        let mut scanner = Scanner::new(TagSet::ALL, TagSet::ALL, MAX);
        let mut offset = 0;
        let mut ends = Vec::new();
        while offset < stream.len() {
            let end = scanner
                .scan(&stream[offset..], |_, _, _| Step::Stop)
                .unwrap();
            offset += end;
            ends.push(offset);
            assert!(scanner.at_boundary());
        }
        assert_eq!(ends, vec![20, 25, 31]);
    }

    #[test]
    fn scanner_rejects_invalid_tags_lengths_and_sizes() {
        let mut scanner = Scanner::new(TagSet::new(b"Z"), TagSet::EMPTY, MAX);
        let bad_tag = msg(b'Q', b"x\0");
        assert_eq!(
            scanner.scan(&bad_tag, |_, _, _| Step::Continue),
            Err(CodecError::UnknownTag(b'Q'))
        );

        let mut scanner = Scanner::new(TagSet::new(b"Z"), TagSet::EMPTY, MAX);
        assert_eq!(scanner.scan(&[b'Z', 0, 0], |_, _, _| Step::Continue), Ok(3));
        assert_eq!(
            scanner.scan(&[0, 3], |_, _, _| Step::Continue),
            Err(CodecError::InvalidLength { len: 3 })
        );

        let mut scanner = Scanner::new(TagSet::new(b"Z"), TagSet::EMPTY, 6);
        let ok_then_big = [msg(b'Z', b"I"), msg(b'Z', b"II")].concat();
        assert_eq!(
            scanner.scan(&ok_then_big, |_, _, _| Step::Continue),
            Err(CodecError::TooLarge { len: 7, max: 6 })
        );
    }

    #[test]
    fn scanner_reset_discards_a_partial_message() {
        let mut scanner = Scanner::new(TagSet::ALL, TagSet::ALL, MAX);
        let stream = msg(b'Z', b"I");
        scanner
            .scan(&stream[..6 - 1], |_, _, _| Step::Continue)
            .unwrap();
        assert!(!scanner.at_boundary());
        scanner.reset();
        assert!(scanner.at_boundary());
        let seen = scan_all(&mut scanner, &[&stream]);
        assert_eq!(seen, vec![(b'Z', b"I".to_vec(), 6)]);
    }

    #[test]
    fn scanner_with_empty_chunk_is_a_no_op() {
        let mut scanner = Scanner::new(TagSet::ALL, TagSet::ALL, MAX);
        assert_eq!(scanner.scan(&[], |_, _, _| Step::Stop), Ok(0));
        assert!(scanner.at_boundary());
    }

    #[test]
    fn reader_reads_fields_and_rejects_leftovers() {
        let mut body = vec![7u8];
        body.extend_from_slice(&(-2i16).to_be_bytes());
        body.extend_from_slice(&0xFFFEu16.to_be_bytes());
        body.extend_from_slice(&(-5i32).to_be_bytes());
        body.extend_from_slice(&u32::MAX.to_be_bytes());
        body.extend_from_slice(b"name\0tail");
        let mut r = Reader::new(&body, "test");
        assert_eq!(r.u8(), Ok(7));
        assert_eq!(r.i16(), Ok(-2));
        assert_eq!(r.count(), Ok(65534));
        assert_eq!(r.i32(), Ok(-5));
        assert_eq!(r.u32(), Ok(u32::MAX));
        assert_eq!(r.cstr(), Ok(&b"name"[..]));
        assert_eq!(
            r.cstr(),
            Err(CodecError::malformed("test", "missing string terminator"))
        );
        assert_eq!(r.take(5), Err(CodecError::malformed("test", "truncated")));
        assert_eq!(r.take(4), Ok(&b"tail"[..]));
        assert_eq!(r.i16(), Err(CodecError::malformed("test", "truncated")));
        assert_eq!(r.finish(), Ok(()));
        assert_eq!(
            Reader::new(b"x", "test").finish(),
            Err(CodecError::malformed("test", "trailing bytes"))
        );
    }

    #[test]
    fn reader_nullable_accepts_minus_one_only() {
        let mut body = Vec::new();
        put_nullable(&mut body, None);
        put_nullable(&mut body, Some(b"ab"));
        body.extend_from_slice(&(-2i32).to_be_bytes());
        let mut r = Reader::new(&body, "test");
        assert_eq!(r.nullable(), Ok(None));
        assert_eq!(r.nullable(), Ok(Some(&b"ab"[..])));
        assert_eq!(
            r.nullable(),
            Err(CodecError::malformed("test", "negative length"))
        );
        let overrun = 10i32.to_be_bytes();
        assert_eq!(
            Reader::new(&overrun, "test").nullable(),
            Err(CodecError::malformed("test", "truncated"))
        );
    }

    #[test]
    fn views_iterate_and_re_encode() {
        let mut body = Vec::new();
        put_count(&mut body, 2);
        body.extend_from_slice(&[0, 1, 0, 0]);
        put_count(&mut body, 3);
        for oid in [23u32, 0, u32::MAX] {
            body.extend_from_slice(&oid.to_be_bytes());
        }
        put_count(&mut body, 3);
        put_nullable(&mut body, Some(b"x"));
        put_nullable(&mut body, None);
        put_nullable(&mut body, Some(b""));
        let mut r = Reader::new(&body, "test");
        let formats = r.format_codes().unwrap();
        let types = r.param_types().unwrap();
        let values = r.values().unwrap();
        r.finish().unwrap();

        assert_eq!(formats.iter().collect::<Vec<_>>(), [1, 0]);
        assert_eq!(types.len(), 3);
        assert_eq!(types.iter().collect::<Vec<_>>(), [23, 0, u32::MAX]);
        assert_eq!(values.len(), 3);
        assert_eq!(
            values.iter().collect::<Vec<_>>(),
            [Some(&b"x"[..]), None, Some(&b""[..])]
        );
        assert_eq!(format!("{types:?}"), "[23, 0, 4294967295]");

        let mut out = Vec::new();
        formats.encode(&mut out);
        types.encode(&mut out);
        values.encode(&mut out);
        assert_eq!(out, body);
    }

    #[test]
    fn views_reject_overrunning_counts() {
        let mut body = Vec::new();
        put_count(&mut body, 3);
        body.extend_from_slice(&[0, 1, 0, 1]);
        assert!(Reader::new(&body, "t").format_codes().is_err());
        assert!(Reader::new(&body, "t").param_types().is_err());
        assert!(Reader::new(&body, "t").values().is_err());
    }

    #[test]
    fn string_lists() {
        let body = b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0";
        let mut r = Reader::new(body, "t");
        let list = r.str_list_until_empty().unwrap();
        r.finish().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(
            list.iter().collect::<Vec<_>>(),
            ["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]
        );
        let mut r = Reader::new(b"a\0b\0", "t");
        assert_eq!(r.str_list(2).unwrap().collect::<Vec<_>>(), ["a", "b"]);
        assert!(Reader::new(b"a\0", "t").str_list(2).is_err());
        assert!(Reader::new(b"\xff\0\0", "t")
            .str_list_until_empty()
            .is_err());
        assert!(Reader::new(b"abc\0", "t").str_list_until_empty().is_err());
    }

    #[test]
    fn writers_back_patch_lengths_and_cut_interior_nuls() {
        let mut out = vec![0xAA];
        write_message(&mut out, b'Q', |out| put_cstr(out, b"SELECT\x001"));
        assert_eq!(out, [&[0xAA][..], &msg(b'Q', b"SELECT\0")].concat());
        let mut out = Vec::new();
        write_packet(&mut out, |out| out.extend_from_slice(&[1, 2]));
        assert_eq!(out, [0, 0, 0, 6, 1, 2]);
    }
}
