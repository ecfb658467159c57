//! Property tests for the wire codec: any sequence of valid messages, cut into chunks at
//! any points, comes back out of both framers (accumulate + `split_message`, and the
//! streaming `Scanner`) exactly as it went in; every accepted body re-encodes to the same
//! bytes; and no input makes a decoder panic.
//!
//! Message bodies are built by hand here, independently of the encoders under test.

use helios_shard::codec::frame::{split_message, Scanner, Step, TagSet, HEADER_LEN};
use helios_shard::codec::{backend, frontend, startup, CodecError};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

const MAX_LEN: usize = 1 << 20;

/// A message as the framers report it: tag, body and the stream offset just past it.
type Framed = (u8, Vec<u8>, usize);

/// Decodes a body and re-encodes the message, header included.
type Reencode = fn(u8, &[u8]) -> Result<Vec<u8>, CodecError>;

fn reencode_frontend(tag: u8, body: &[u8]) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    frontend::decode(tag, body)?.encode(&mut out);
    Ok(out)
}

fn reencode_backend(tag: u8, body: &[u8]) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    backend::decode(tag, body)?.encode(&mut out);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Hand-built bodies
// ---------------------------------------------------------------------------------------

/// A body under construction, in the protocol's big-endian layout.
#[derive(Debug, Default)]
struct Body(Vec<u8>);

impl Body {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }

    fn i16(mut self, v: i16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn count(mut self, n: usize) -> Self {
        self.0.extend_from_slice(&(n as u16).to_be_bytes());
        self
    }

    fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }

    fn cstr(self, s: &[u8]) -> Self {
        self.bytes(s).u8(0)
    }

    fn nullable(self, v: &Option<Vec<u8>>) -> Self {
        match v {
            None => self.i32(-1),
            Some(b) => self.i32(b.len() as i32).bytes(b),
        }
    }

    fn formats(self, codes: &[i16]) -> Self {
        codes.iter().fold(self.count(codes.len()), |b, &c| b.i16(c))
    }

    fn oids(self, oids: &[u32]) -> Self {
        oids.iter().fold(self.count(oids.len()), |b, &o| b.u32(o))
    }

    fn values(self, values: &[Option<Vec<u8>>]) -> Self {
        values
            .iter()
            .fold(self.count(values.len()), |b, v| b.nullable(v))
    }

    fn done(self, tag: u8) -> (u8, Vec<u8>) {
        (tag, self.0)
    }
}

fn framed(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// A protocol string: any bytes but NUL.
fn cstring() -> impl Strategy<Value = Vec<u8>> + Clone {
    vec(1u8..=255, 0..10)
}

/// A UTF-8 protocol string (SASL mechanisms, option names).
fn utf8_name() -> impl Strategy<Value = String> + Clone {
    "[^\\x00]{0,8}"
}

fn blob() -> impl Strategy<Value = Vec<u8>> + Clone {
    vec(any::<u8>(), 0..20)
}

fn nullable() -> impl Strategy<Value = Option<Vec<u8>>> + Clone {
    proptest::option::of(blob())
}

fn formats() -> impl Strategy<Value = Vec<i16>> + Clone {
    vec(0i16..=1, 0..3)
}

fn target_kind() -> impl Strategy<Value = u8> + Clone {
    prop_oneof![Just(b'S'), Just(b'P')]
}

fn frontend_message() -> BoxedStrategy<(u8, Vec<u8>)> {
    let extended = prop_oneof![
        (cstring(), cstring(), vec(any::<u32>(), 0..4)).prop_map(|(name, sql, types)| {
            Body::default()
                .cstr(&name)
                .cstr(&sql)
                .oids(&types)
                .done(b'P')
        }),
        (
            cstring(),
            cstring(),
            formats(),
            vec(nullable(), 0..4),
            formats()
        )
            .prop_map(|(portal, stmt, param_formats, params, result_formats)| {
                Body::default()
                    .cstr(&portal)
                    .cstr(&stmt)
                    .formats(&param_formats)
                    .values(&params)
                    .formats(&result_formats)
                    .done(b'B')
            }),
        (target_kind(), cstring())
            .prop_map(|(kind, name)| Body::default().u8(kind).cstr(&name).done(b'D')),
        (cstring(), any::<i32>())
            .prop_map(|(portal, rows)| Body::default().cstr(&portal).i32(rows).done(b'E')),
        (target_kind(), cstring())
            .prop_map(|(kind, name)| Body::default().u8(kind).cstr(&name).done(b'C')),
        Just((b'S', vec![])),
        Just((b'H', vec![])),
    ];
    let other = prop_oneof![
        cstring().prop_map(|sql| Body::default().cstr(&sql).done(b'Q')),
        blob().prop_map(|data| (b'd', data)),
        Just((b'c', vec![])),
        cstring().prop_map(|why| Body::default().cstr(&why).done(b'f')),
        (any::<u32>(), formats(), vec(nullable(), 0..3), 0i16..=1).prop_map(
            |(oid, arg_formats, args, result_format)| {
                Body::default()
                    .u32(oid)
                    .formats(&arg_formats)
                    .values(&args)
                    .i16(result_format)
                    .done(b'F')
            }
        ),
        Just((b'X', vec![])),
        blob().prop_map(|raw| (b'p', raw)),
    ];
    prop_oneof![extended, other].boxed()
}

fn authentication() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let auth = |code: i32| Body::default().i32(code);
    prop_oneof![
        prop_oneof![Just(0), Just(2), Just(3), Just(7), Just(9)]
            .prop_map(move |code| auth(code).done(b'R')),
        any::<[u8; 4]>().prop_map(move |salt| auth(5).bytes(&salt).done(b'R')),
        (prop_oneof![Just(8), Just(11), Just(12)], blob())
            .prop_map(move |(code, data)| auth(code).bytes(&data).done(b'R')),
        vec("[^\\x00]{1,8}", 0..3).prop_map(move |mechanisms| {
            mechanisms
                .iter()
                .fold(auth(10), |b, m| b.cstr(m.as_bytes()))
                .u8(0)
                .done(b'R')
        }),
    ]
}

fn field_description() -> impl Strategy<Value = Body> {
    (
        cstring(),
        any::<u32>(),
        any::<i16>(),
        any::<u32>(),
        any::<i16>(),
        any::<i32>(),
        0i16..=1,
    )
        .prop_map(|(name, table, column, type_oid, size, modifier, format)| {
            Body::default()
                .cstr(&name)
                .u32(table)
                .i16(column)
                .u32(type_oid)
                .i16(size)
                .i32(modifier)
                .i16(format)
        })
}

fn backend_message() -> BoxedStrategy<(u8, Vec<u8>)> {
    let query_flow = prop_oneof![
        vec(field_description(), 0..3).prop_map(|fields| {
            let body = Body::default().count(fields.len());
            fields.iter().fold(body, |b, f| b.bytes(&f.0)).done(b'T')
        }),
        vec(nullable(), 0..4).prop_map(|row| Body::default().values(&row).done(b'D')),
        cstring().prop_map(|tag| Body::default().cstr(&tag).done(b'C')),
        prop_oneof![Just(b'I'), Just(b'T'), Just(b'E')]
            .prop_map(|status| Body::default().u8(status).done(b'Z')),
        prop_oneof![
            Just(b'2'),
            Just(b'3'),
            Just(b'c'),
            Just(b'I'),
            Just(b'n'),
            Just(b'1'),
            Just(b's')
        ]
        .prop_map(|tag| (tag, vec![])),
        vec(any::<u32>(), 0..4).prop_map(|oids| Body::default().oids(&oids).done(b't')),
        (
            prop_oneof![Just(b'E'), Just(b'N')],
            vec((1u8..=255, cstring()), 0..4)
        )
            .prop_map(|(tag, fields)| {
                fields
                    .iter()
                    .fold(Body::default(), |b, (code, text)| b.u8(*code).cstr(text))
                    .u8(0)
                    .done(tag)
            }),
    ];
    let session = prop_oneof![
        authentication(),
        (any::<i32>(), any::<i32>())
            .prop_map(|(pid, secret)| Body::default().i32(pid).i32(secret).done(b'K')),
        (cstring(), cstring())
            .prop_map(|(name, value)| Body::default().cstr(&name).cstr(&value).done(b'S')),
        (any::<i32>(), cstring(), cstring()).prop_map(|(pid, channel, payload)| {
            Body::default()
                .i32(pid)
                .cstr(&channel)
                .cstr(&payload)
                .done(b'A')
        }),
        (any::<i32>(), vec(utf8_name(), 0..3)).prop_map(|(version, options)| {
            let body = Body::default().i32(version).i32(options.len() as i32);
            options
                .iter()
                .fold(body, |b, o| b.cstr(o.as_bytes()))
                .done(b'v')
        }),
    ];
    let copy_and_calls = prop_oneof![
        (
            prop_oneof![Just(b'G'), Just(b'H'), Just(b'W')],
            0u8..=1,
            formats()
        )
            .prop_map(|(tag, format, columns)| Body::default()
                .u8(format)
                .formats(&columns)
                .done(tag)),
        blob().prop_map(|data| (b'd', data)),
        nullable().prop_map(|result| Body::default().nullable(&result).done(b'V')),
    ];
    prop_oneof![3 => query_flow, 2 => session, 1 => copy_and_calls].boxed()
}

/// Cut points for a stream of `len` bytes, sorted; duplicates make empty chunks.
fn cuts_within(len: usize, picks: &[Index]) -> Vec<usize> {
    let mut cuts: Vec<usize> = picks.iter().map(|p| p.index(len + 1)).collect();
    cuts.sort_unstable();
    cuts
}

fn chunked<'s>(stream: &'s [u8], cuts: &[usize]) -> Vec<&'s [u8]> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(stream.len());
    bounds.windows(2).map(|w| &stream[w[0]..w[1]]).collect()
}

// ---------------------------------------------------------------------------------------
// The decoders under test
// ---------------------------------------------------------------------------------------

fn fail(e: CodecError) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// Accumulates chunks in a buffer and splits complete messages off its front.
fn split_decoder(chunks: &[&[u8]]) -> Result<Vec<Framed>, TestCaseError> {
    let mut buffer = Vec::new();
    let mut consumed = 0;
    let mut seen = Vec::new();
    for chunk in chunks {
        buffer.extend_from_slice(chunk);
        while let Some((tag, body, total)) = split_message(&buffer, MAX_LEN).map_err(fail)? {
            consumed += total;
            seen.push((tag, body.to_vec(), consumed));
            buffer.drain(..total);
        }
    }
    prop_assert!(buffer.is_empty(), "{} bytes left over", buffer.len());
    Ok(seen)
}

/// What `partial_header_len` and `at_boundary` must say after `offset` bytes of a stream
/// whose messages end at `ends`.
fn expected_position(ends: &[usize], offset: usize) -> (usize, bool) {
    let start = ends
        .iter()
        .copied()
        .filter(|&e| e <= offset)
        .max()
        .unwrap_or(0);
    match offset - start {
        0 => (0, true),
        into if into < HEADER_LEN => (into, false),
        _ => (0, false),
    }
}

/// Runs the scanner over the chunks, checking its position after every chunk.
fn scanner_decoder(
    chunks: &[&[u8]],
    valid: TagSet,
    (capture, notify): (TagSet, TagSet),
    ends: &[usize],
) -> Result<Vec<Framed>, TestCaseError> {
    let mut scanner = Scanner::new(valid, capture, MAX_LEN).with_notify(notify);
    let mut base = 0;
    let mut seen = Vec::new();
    for chunk in chunks {
        let scanned = scanner
            .scan(chunk, |tag, body, end| {
                seen.push((tag, body.to_vec(), base + end));
                Step::Continue
            })
            .map_err(fail)?;
        prop_assert_eq!(scanned, chunk.len());
        base += chunk.len();
        let position = (scanner.partial_header_len(), scanner.at_boundary());
        prop_assert_eq!(
            position,
            expected_position(ends, base),
            "after {} bytes",
            base
        );
    }
    Ok(seen)
}

/// Runs the scanner asking it to stop after every message, resuming where it stopped.
fn stopping_scanner_decoder(chunks: &[&[u8]], valid: TagSet) -> Result<Vec<Framed>, TestCaseError> {
    let mut scanner = Scanner::new(valid, TagSet::ALL, MAX_LEN);
    let mut base = 0;
    let mut seen = Vec::new();
    for chunk in chunks {
        let mut rest: &[u8] = chunk;
        while !rest.is_empty() {
            let scanned = scanner
                .scan(rest, |tag, body, end| {
                    seen.push((tag, body.to_vec(), base + end));
                    Step::Stop
                })
                .map_err(fail)?;
            prop_assert!(scanned > 0, "no progress");
            base += scanned;
            rest = &rest[scanned..];
        }
    }
    Ok(seen)
}

// ---------------------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------------------

/// Frames the messages into one stream, returning it and the expected framer output.
fn stream_of(messages: &[(u8, Vec<u8>)]) -> (Vec<u8>, Vec<Framed>) {
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for (tag, body) in messages {
        stream.extend(framed(*tag, body));
        expected.push((*tag, body.clone(), stream.len()));
    }
    (stream, expected)
}

fn ends_of(expected: &[Framed]) -> Vec<usize> {
    expected.iter().map(|m| m.2).collect()
}

fn check_reencoding(messages: &[(u8, Vec<u8>)], reencode: Reencode) -> Result<(), TestCaseError> {
    for (tag, body) in messages {
        let again = reencode(*tag, body).map_err(fail)?;
        prop_assert_eq!(again, framed(*tag, body), "tag {}", char::from(*tag));
    }
    Ok(())
}

fn check_chunking(
    stream: &[u8],
    expected: &[Framed],
    cuts: &[usize],
    valid: TagSet,
) -> Result<(), TestCaseError> {
    let chunks = chunked(stream, cuts);
    let ends = ends_of(expected);
    prop_assert_eq!(
        &split_decoder(&chunks)?,
        expected,
        "split_message, cuts {:?}",
        cuts
    );
    prop_assert_eq!(
        &scanner_decoder(&chunks, valid, (TagSet::ALL, TagSet::EMPTY), &ends)?,
        expected,
        "scanner, cuts {:?}",
        cuts
    );
    Ok(())
}

fn check_every_two_chunk_split(
    messages: &[(u8, Vec<u8>)],
    valid: TagSet,
    reencode: Reencode,
) -> Result<(), TestCaseError> {
    check_reencoding(messages, reencode)?;
    let (stream, expected) = stream_of(messages);
    for cut in 0..=stream.len() {
        check_chunking(&stream, &expected, &[cut], valid)?;
    }
    Ok(())
}

/// The tags of the messages picked by cycling through `keep`.
fn some_tags(messages: &[(u8, Vec<u8>)], keep: &[bool]) -> TagSet {
    let tags: Vec<u8> = messages
        .iter()
        .zip(keep.iter().cycle())
        .filter(|(_, &keep)| keep)
        .map(|((tag, _), _)| *tag)
        .collect();
    TagSet::new(&tags)
}

fn check_random_chunkings(
    messages: &[(u8, Vec<u8>)],
    picks: &[Index],
    (capture_picks, notify_picks): (&[bool], &[bool]),
    valid: TagSet,
) -> Result<(), TestCaseError> {
    let (stream, expected) = stream_of(messages);
    let cuts = cuts_within(stream.len(), picks);
    check_chunking(&stream, &expected, &cuts, valid)?;

    let chunks = chunked(&stream, &cuts);
    prop_assert_eq!(&stopping_scanner_decoder(&chunks, valid)?, &expected);

    // Capturing some tags and being notified of others reports exactly those messages, at
    // the same offsets, with bodies only for the captured ones.
    let capture = some_tags(messages, capture_picks);
    let notify = some_tags(messages, notify_picks);
    let wanted: Vec<Framed> = expected
        .iter()
        .filter_map(|(tag, body, end)| {
            if capture.contains(*tag) {
                Some((*tag, body.clone(), *end))
            } else if notify.contains(*tag) {
                Some((*tag, Vec::new(), *end))
            } else {
                None
            }
        })
        .collect();
    let seen = scanner_decoder(&chunks, valid, (capture, notify), &ends_of(&expected))?;
    prop_assert_eq!(seen, wanted);
    Ok(())
}

/// Damages a body: truncates it, overwrites or inserts one byte, or appends bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(Index),
    Overwrite(Index, u8),
    Insert(Index, u8),
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        vec(any::<u8>(), 1..3).prop_map(Mutation::Append),
    ]
}

fn mutate(mut body: Vec<u8>, mutation: &Mutation) -> Vec<u8> {
    match mutation {
        Mutation::Truncate(i) => body.truncate(i.index(body.len() + 1)),
        Mutation::Overwrite(i, b) if !body.is_empty() => {
            let at = i.index(body.len());
            body[at] = *b;
        }
        Mutation::Overwrite(..) => {}
        Mutation::Insert(i, b) => body.insert(i.index(body.len() + 1), *b),
        Mutation::Append(bytes) => body.extend_from_slice(bytes),
    }
    body
}

/// Decoding never panics, and a body the decoder accepts re-encodes to the same bytes.
fn check_accepted_bodies_are_canonical(
    tag: u8,
    body: &[u8],
    reencode: Reencode,
) -> Result<(), TestCaseError> {
    if let Ok(again) = reencode(tag, body) {
        prop_assert_eq!(again, framed(tag, body));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn frontend_stream_survives_every_two_chunk_split(
        messages in vec(frontend_message(), 1..6),
    ) {
        check_every_two_chunk_split(&messages, frontend::TAGS, reencode_frontend)?;
    }

    #[test]
    fn backend_stream_survives_every_two_chunk_split(
        messages in vec(backend_message(), 1..6),
    ) {
        check_every_two_chunk_split(&messages, backend::TAGS, reencode_backend)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frontend_stream_survives_random_chunkings(
        messages in vec(frontend_message(), 0..10),
        picks in vec(any::<Index>(), 0..12),
        capture_picks in vec(any::<bool>(), 1..4),
        notify_picks in vec(any::<bool>(), 1..4),
    ) {
        check_reencoding(&messages, reencode_frontend)?;
        let subsets = (&capture_picks[..], &notify_picks[..]);
        check_random_chunkings(&messages, &picks, subsets, frontend::TAGS)?;
    }

    #[test]
    fn backend_stream_survives_random_chunkings(
        messages in vec(backend_message(), 0..10),
        picks in vec(any::<Index>(), 0..12),
        capture_picks in vec(any::<bool>(), 1..4),
        notify_picks in vec(any::<bool>(), 1..4),
    ) {
        check_reencoding(&messages, reencode_backend)?;
        let subsets = (&capture_picks[..], &notify_picks[..]);
        check_random_chunkings(&messages, &picks, subsets, backend::TAGS)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn frontend_decode_of_random_bytes_never_panics(tag in any::<u8>(), body in vec(any::<u8>(), 0..64)) {
        check_accepted_bodies_are_canonical(tag, &body, reencode_frontend)?;
    }

    #[test]
    fn backend_decode_of_random_bytes_never_panics(tag in any::<u8>(), body in vec(any::<u8>(), 0..64)) {
        check_accepted_bodies_are_canonical(tag, &body, reencode_backend)?;
    }

    #[test]
    fn frontend_damaged_messages_are_rejected_or_canonical(
        (tag, body) in frontend_message(),
        damage in mutation(),
    ) {
        check_accepted_bodies_are_canonical(tag, &mutate(body, &damage), reencode_frontend)?;
    }

    #[test]
    fn backend_damaged_messages_are_rejected_or_canonical(
        (tag, body) in backend_message(),
        damage in mutation(),
    ) {
        check_accepted_bodies_are_canonical(tag, &mutate(body, &damage), reencode_backend)?;
    }

    #[test]
    fn decode_startup_of_random_bytes_never_panics(buf in vec(any::<u8>(), 0..48)) {
        if let Ok(Some((_, consumed))) = startup::decode_startup(&buf) {
            prop_assert!((8..=buf.len()).contains(&consumed));
        }
    }

    #[test]
    fn decode_startup_of_damaged_packets_never_panics(
        params in vec(("[^\\x00]{1,6}", "[^\\x00]{0,6}"), 0..4),
        damage in mutation(),
    ) {
        let pairs: Vec<(&str, &str)> = params.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let mut packet = Vec::new();
        startup::encode_startup(&mut packet, &pairs);
        let damaged = mutate(packet, &damage);
        if let Ok(Some((_, consumed))) = startup::decode_startup(&damaged) {
            prop_assert!((8..=damaged.len()).contains(&consumed));
        }
    }

    #[test]
    fn startup_round_trips_and_waits_for_the_whole_packet(
        params in vec(("[^\\x00]{1,6}", "[^\\x00]{0,6}"), 0..4),
    ) {
        let pairs: Vec<(&str, &str)> = params.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let mut packet = Vec::new();
        startup::encode_startup(&mut packet, &pairs);
        for prefix in 0..packet.len() {
            prop_assert_eq!(startup::decode_startup(&packet[..prefix]), Ok(None));
        }
        let decoded = startup::decode_startup(&packet).map_err(fail)?;
        let Some((startup::StartupPacket::Startup(message), consumed)) = decoded else {
            return Err(TestCaseError::fail("not a StartupMessage"));
        };
        prop_assert_eq!(consumed, packet.len());
        prop_assert_eq!(message.protocol(), startup::PROTOCOL_3_0);
        prop_assert_eq!(message.params().collect::<Vec<_>>(), pairs);
    }

    #[test]
    fn scanner_and_split_agree_on_random_streams(
        stream in vec(any::<u8>(), 0..96),
        picks in vec(any::<Index>(), 0..6),
    ) {
        let max = 64;
        let chunks = chunked(&stream, &cuts_within(stream.len(), &picks));
        let mut by_split = Vec::new();
        let mut offset = 0;
        let split_error = loop {
            match split_message(&stream[offset..], max) {
                Ok(Some((tag, body, total))) => {
                    offset += total;
                    by_split.push((tag, body.to_vec(), offset));
                }
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        let mut scanner = Scanner::new(TagSet::ALL, TagSet::ALL, max);
        let mut by_scanner = Vec::new();
        let mut base = 0;
        let mut scan_error = None;
        for chunk in chunks {
            let result = scanner.scan(chunk, |tag, body, end| {
                by_scanner.push((tag, body.to_vec(), base + end));
                Step::Continue
            });
            if let Err(e) = result {
                scan_error = Some(e);
                break;
            }
            base += chunk.len();
        }
        prop_assert_eq!(by_scanner, by_split);
        prop_assert_eq!(scan_error, split_error);
    }
}
