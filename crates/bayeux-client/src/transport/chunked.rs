//! A payload parsed chunk by chunk as it arrives, so that a long-polling response (often
//! megabytes, arriving in a few hundred kilobytes at a time) is never copied into one
//! contiguous buffer first. Messages are read in place from each chunk, and their data
//! share the chunk; only a message cut by a chunk boundary is copied, joined with the
//! start of the next chunk.
//!
//! It handles the shape servers send, a JSON array of messages. Anything else (a single
//! object, malformed JSON, a message that does not fit) is handed whole to
//! [`parse_received`], which accepts the single object, skips (and names) a message that
//! does not fit, and names what is wrong with the rest, the same as for a payload
//! received in one piece.
//!
//! An array of messages larger than [`STREAM_AFTER`] (or the limit, `max_message_size`,
//! if lower) is *streamed*: from then on the messages read are handed out as they
//! complete ([`take_portion`](ChunkedPayload::take_portion)), the limit applies to each
//! message rather than to the whole, a message that does not fit is skipped where it
//! stands, and anything else wrong with the rest is a malformed payload. A server that
//! replays hours of events in one answer is then read at the pace the application takes
//! them, holding at most one message over what the application has not taken. Anything
//! else is read whole, up to the limit.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use serde_json::value::RawValue;

use super::{Received, message_count_estimate, parse_received, rejected_message};
use crate::error::{Error, TransportErrorKind};
use crate::message::{Data, Message, WireMessage};

/// How many times its first chunk a payload's declared length may be, for sizing the
/// message vector up front; past it, the vector grows as messages arrive.
const PLAUSIBLE_GROWTH: usize = 64;

/// The size past which an array of messages is handed out as it is read rather than
/// kept whole: large enough that an ordinary batch is read and handed over in one piece,
/// small enough that a long one never holds much beyond what the application has not
/// taken yet.
pub const STREAM_AFTER: usize = 1024 * 1024;

/// Where the parser is in the array's syntax.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Before the opening `[`.
    Open,
    /// After `[`: a message or `]`.
    FirstOrClose,
    /// After `,`: a message.
    Message,
    /// After a message: `,` or `]`.
    CommaOrClose,
    /// After `]`: nothing but whitespace.
    End,
}

/// What reading at a position found.
enum Step {
    /// Moved on by this many bytes.
    Advance(usize),
    /// The input ends inside a message: more is needed.
    Incomplete,
    /// Not an array of messages (or not JSON), or a message that does not fit: the whole
    /// payload goes to `parse_received`.
    Other,
}

/// Parses a JSON array of messages from its chunks, in order.
pub struct ChunkedPayload {
    expect: Expect,
    messages: Vec<Message>,
    /// Messages that did not fit, skipped while streaming (before, the whole payload is
    /// parsed again to name them).
    rejected: Vec<Error>,
    /// Set once the payload has grown past the limit: messages are handed out as they
    /// complete and the limit bounds each message.
    streaming: bool,
    /// Set when a streamed message is over the limit.
    oversized: bool,
    /// The start of a message cut by the end of the chunks fed so far.
    carry: BytesMut,
    /// `carry` is not parsed again until it has grown to this length, so that a message
    /// spanning many chunks is rescanned a few times, not once a chunk.
    retry_at: usize,
    /// Every chunk, kept (shared, not copied) in case the payload turns out not to be an
    /// array of messages and has to be parsed whole.
    chunks: Vec<Bytes>,
    /// The payload's announced length, to size the message vector from the first chunk
    /// (trusted only as far as the first chunk supports it).
    expected_len: Option<usize>,
    /// The bytes fed so far, and the most that may be.
    received: usize,
    limit: usize,
    /// Set when the payload is not an array of messages: the rest is only collected.
    whole: bool,
}

impl ChunkedPayload {
    /// A parser for a payload of `expected_len` bytes, if the length is known, read whole
    /// up to `limit` bytes and streamed past it.
    pub fn new(expected_len: Option<u64>, limit: usize) -> Self {
        let expected_len = expected_len.map(|len| usize::try_from(len).unwrap_or(usize::MAX));
        ChunkedPayload {
            expect: Expect::Open,
            messages: Vec::new(),
            rejected: Vec::new(),
            streaming: false,
            oversized: false,
            carry: BytesMut::new(),
            retry_at: 0,
            chunks: Vec::new(),
            expected_len,
            received: 0,
            limit,
            whole: false,
        }
    }

    /// Reads the messages the chunk completes.
    ///
    /// # Errors
    /// [`TransportErrorKind::TooLarge`] once a payload that is not an array of messages,
    /// or one message, grows past the limit; a malformed payload once it streams.
    pub fn feed(&mut self, chunk: Bytes) -> Result<(), Error> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.received = self.received.saturating_add(chunk.len());
        if !self.streaming && !self.whole && self.received > self.limit.min(STREAM_AFTER) {
            let array = match self.expect {
                // Only whitespace so far: the array must start in this chunk.
                Expect::Open => chunk.trim_ascii_start().first() == Some(&b'['),
                _ => true,
            };
            if array {
                // From here on it is read message by message, and the chunks need not be
                // kept for a parse of the whole.
                self.streaming = true;
                self.chunks = Vec::new();
            }
        }
        // Anything else over the limit (a single object, whitespace, what is not JSON)
        // is refused.
        if !self.streaming && self.received > self.limit {
            return Err(Error::transport(TransportErrorKind::TooLarge { limit: self.limit }));
        }
        if !self.streaming {
            self.chunks.push(chunk.clone());
        }
        if self.whole {
            return Ok(());
        }
        if self.chunks.len() == 1 {
            // A declared length is believed only up to what the first chunk makes
            // plausible: a server may announce terabytes and send a few bytes.
            let plausible = chunk.len().saturating_mul(PLAUSIBLE_GROWTH);
            let total = self.expected_len.unwrap_or(0).min(plausible).max(chunk.len());
            self.messages.reserve(message_count_estimate(&chunk, total));
        }
        if self.carry.is_empty() {
            self.read_in_place(chunk);
        } else {
            self.complete_carry(chunk);
        }
        if self.streaming {
            if self.oversized || self.carry.len() > self.limit {
                return Err(Error::transport(TransportErrorKind::TooLarge { limit: self.limit }));
            }
            if self.whole {
                return Err(self.malformed_stream());
            }
        }
        Ok(())
    }

    /// Once the payload streams: the messages (and the errors for messages that did not
    /// fit) read since the last call, in order; `None` if there are none, or if the
    /// payload is still small enough to be read whole.
    pub fn take_portion(&mut self) -> Option<Received> {
        if !self.streaming || (self.messages.is_empty() && self.rejected.is_empty()) {
            return None;
        }
        Some(Received {
            messages: std::mem::take(&mut self.messages),
            rejected: std::mem::take(&mut self.rejected),
        })
    }

    /// The error for a streamed payload that turns out not to be an array of messages.
    fn malformed_stream(&self) -> Error {
        Error::malformed(format!(
            "not an array of Bayeux messages (a payload of more than {} bytes, malformed after {} bytes)",
            self.limit, self.received
        ))
    }

    /// Every message, once the last chunk has been fed; or the error that names what is
    /// wrong with the payload.
    pub fn finish(mut self) -> Result<Received, Error> {
        if self.streaming {
            let rejected = std::mem::take(&mut self.rejected);
            let malformed = self.malformed_stream();
            let limit = self.limit;
            let oversized = self.oversized;
            return match self.end() {
                Ok(messages) => Ok(Received { messages, rejected }),
                Err(_) if oversized => Err(Error::transport(TransportErrorKind::TooLarge { limit })),
                Err(_) => Err(malformed),
            };
        }
        match self.end() {
            Ok(messages) => Ok(Received { messages, rejected: Vec::new() }),
            Err(whole) => parse_received(whole),
        }
    }

    /// The messages read chunk by chunk, or the whole payload when it has to be parsed
    /// whole. Crate-visible for the fuzz harness, which checks that a well-formed array is
    /// read chunk by chunk.
    pub fn end(mut self) -> Result<Vec<Message>, Bytes> {
        if !self.whole && !self.carry.is_empty() {
            // Carried bytes not parsed yet (they were waiting to grow): parse them now.
            let raw = self.carry.split().freeze();
            let stopped = self.read(&raw);
            if stopped < raw.len() {
                self.whole = true;
            }
        }
        if self.whole || self.expect != Expect::End {
            return Err(join(&self.chunks));
        }
        Ok(self.messages)
    }

    /// Reads `chunk` in place, and carries (copies) the message its end cuts short.
    fn read_in_place(&mut self, chunk: Bytes) {
        let stopped = self.read(&chunk);
        if stopped < chunk.len() && !self.whole {
            self.carry.extend_from_slice(&chunk[stopped..]);
            self.retry_at = self.carry.len() * 2;
        }
    }

    /// Joins the start of `chunk` to the carried message until the message is complete,
    /// then reads the rest of `chunk` in place.
    fn complete_carry(&mut self, chunk: Bytes) {
        let mut taken = 0;
        while taken < chunk.len() {
            // About as much again as is carried: a message cut in two is then usually
            // finished by the first join, and a long one is rescanned only as it doubles.
            // While streaming, the carried message is never held past the limit: one
            // that is still incomplete at the limit is refused (by `feed`).
            let room =
                if self.streaming { self.limit - self.carry.len().min(self.limit) } else { usize::MAX };
            if room == 0 {
                self.oversized = true;
                return;
            }
            let more = self.carry.len().max(4096).min(chunk.len() - taken).min(room);
            self.carry.extend_from_slice(&chunk[taken..taken + more]);
            taken += more;
            if self.carry.len() < self.retry_at.min(self.limit) {
                continue;
            }
            let raw = self.carry.split().freeze();
            let stopped = self.read(&raw);
            if self.whole {
                return;
            }
            // Where this chunk's bytes begin in `raw`.
            let chunk_start = raw.len() - taken;
            if stopped >= chunk_start {
                // What is left starts inside the chunk: read it there.
                return self.read_in_place(chunk.slice(taken - (raw.len() - stopped)..));
            }
            self.carry = if stopped == 0 {
                // Still one message short: the buffer goes back, not copied (a message
                // megabytes long would otherwise be held twice while it is copied).
                raw.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]))
            } else {
                BytesMut::from(&raw[stopped..])
            };
            self.retry_at = self.carry.len() * 2;
        }
    }

    /// Reads messages from `bytes` as far as they go, the data sharing `bytes`; returns
    /// where it stopped: the end, or the start of a message the bytes cut short.
    fn read(&mut self, bytes: &Bytes) -> usize {
        let Some(text) = whole_characters(bytes) else {
            self.whole = true;
            return 0;
        };
        let mut at = 0;
        while at < text.len() {
            match self.step(&text, at) {
                Step::Advance(by) => at += by,
                Step::Incomplete => break,
                Step::Other => {
                    self.whole = true;
                    break;
                }
            }
        }
        at
    }

    /// One step of the array's syntax at `at`: whitespace, a separator, or a message.
    fn step(&mut self, text: &ByteString, at: usize) -> Step {
        let byte = text.as_bytes()[at];
        if matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            return Step::Advance(1);
        }
        match (self.expect, byte) {
            (Expect::Open, b'[') => self.expect = Expect::FirstOrClose,
            (Expect::FirstOrClose | Expect::CommaOrClose, b']') => self.expect = Expect::End,
            (Expect::CommaOrClose, b',') => self.expect = Expect::Message,
            (Expect::FirstOrClose | Expect::Message, b'{') => return self.message(text, at),
            _ => return Step::Other,
        }
        Step::Advance(1)
    }

    /// Reads the message that starts at `at`.
    fn message(&mut self, text: &ByteString, at: usize) -> Step {
        let mut stream =
            serde_json::Deserializer::from_str(&text[at..]).into_iter::<WireMessage<&RawValue>>();
        match stream.next() {
            Some(Ok(_)) if self.streaming && stream.byte_offset() > self.limit => {
                self.oversized = true;
                Step::Other
            }
            Some(Ok(wire)) => {
                self.messages.push(wire.into_message(|raw| Data::shared(text, raw)));
                self.expect = Expect::CommaOrClose;
                Step::Advance(stream.byte_offset())
            }
            // A number cut after `-`, `.`, `e` or `+` is an invalid number to serde_json,
            // not the end of the input: it is incomplete too (else the whole payload would
            // be collected and parsed whole).
            Some(Err(error)) if error.is_eof() || text.ends_with(['-', '.', 'e', 'E', '+']) => {
                Step::Incomplete
            }
            Some(Err(error)) if self.streaming => self.skip(text, at, &error),
            _ => Step::Other,
        }
    }

    /// While streaming, a message that is JSON but not a Bayeux message: skipped and
    /// named where it stands (there is no whole payload to parse again).
    fn skip(&mut self, text: &ByteString, at: usize, error: &serde_json::Error) -> Step {
        let mut stream = serde_json::Deserializer::from_str(&text[at..]).into_iter::<&RawValue>();
        match stream.next() {
            Some(Ok(_)) if stream.byte_offset() > self.limit => {
                self.oversized = true;
                Step::Other
            }
            Some(Ok(raw)) => {
                self.rejected.push(rejected_message(raw, error));
                self.expect = Expect::CommaOrClose;
                Step::Advance(stream.byte_offset())
            }
            Some(Err(error)) if error.is_eof() => Step::Incomplete,
            _ => Step::Other,
        }
    }
}

/// `bytes` up to the last whole character (one cut by the chunk's end is left for the
/// next); `None` if they are not UTF-8.
fn whole_characters(bytes: &Bytes) -> Option<ByteString> {
    match ByteString::try_from(bytes.clone()) {
        Ok(text) => Some(text),
        Err(error) if error.error_len().is_none() => {
            ByteString::try_from(bytes.slice(..error.valid_up_to())).ok()
        }
        Err(_) => None,
    }
}

/// The chunks as one buffer.
fn join(chunks: &[Bytes]) -> Bytes {
    match chunks {
        [] => Bytes::new(),
        [one] => one.clone(),
        many => {
            let mut joined = BytesMut::with_capacity(many.iter().map(Bytes::len).sum());
            for chunk in many {
                joined.extend_from_slice(chunk);
            }
            joined.freeze()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::parse_payload;

    /// The chunks parsed; a well-formed array must be read chunk by chunk, not handed to
    /// `parse_payload` whole (which would hide a mistake in the chunk-by-chunk reading).
    fn parsed_in(chunks: &[&[u8]]) -> Result<Vec<Message>, String> {
        let declared = chunks.iter().map(|chunk| chunk.len() as u64).sum();
        let mut parser = ChunkedPayload::new(Some(declared), usize::MAX);
        for chunk in chunks {
            parser.feed(Bytes::copy_from_slice(chunk)).expect("no limit");
        }
        match parser.end() {
            Ok(messages) => Ok(messages),
            Err(whole) => {
                let parsed = parse_payload(whole.clone()).map_err(|error| error.to_string());
                let array = whole.trim_ascii_start().starts_with(b"[");
                assert!(!(array && parsed.is_ok()), "a well-formed array was parsed whole: {chunks:?}");
                parsed
            }
        }
    }

    fn parsed_whole(payload: &[u8]) -> Result<Vec<Message>, String> {
        parse_payload(Bytes::copy_from_slice(payload)).map_err(|error| error.to_string())
    }

    /// Payloads of every shape: arrays with whitespace and non-ASCII text (cut inside a
    /// character by some splits), a single object, and malformed ones, whose errors must
    /// read as they do for a payload received whole.
    const PAYLOADS: &[&str] = &[
        r#"[{"channel":"/a","id":"1","data":{"text":"café ☕ 𝄞","n":[1,2]}},{"channel":"/b","data":"x"}]"#,
        // Numbers cut after `-`, `.`, `e`, `+` (found by the payload fuzz target).
        r#"[{"channel":"/n","data":{"price":50.01,"e":-1.5e-3,"f":2E+2},"ext":{"x":-0.5e+1}}]"#,
        " [ {\"channel\":\"/meta/connect\",\"successful\":true,\"advice\":{\"interval\":0}} ,\n\t{\"channel\":\"/é\",\"data\":null} ] \r\n",
        "[]",
        r#"{"channel":"/single","data":1}"#,
        "",
        "<html>",
        r#"[{"channel":"/a"},]"#,
        r#"[{"channel":"/a"}"#,
        r#"[{"channel":"/a"}] trailing"#,
        r#"[{"id":"1"}]"#,
        r#"[{"channel":"/a","data":{"s":"unterminated}]"#,
        r#"[42]"#,
    ];

    #[test]
    fn every_split_parses_as_the_whole_payload_does() {
        for payload in PAYLOADS {
            let bytes = payload.as_bytes();
            let whole = parsed_whole(bytes);
            for cut in 0..=bytes.len() {
                let (left, right) = bytes.split_at(cut);
                assert_eq!(parsed_in(&[left, right]), whole, "{payload:?} cut at {cut}");
                for second in cut..=bytes.len() {
                    let pieces = [&bytes[..cut], &bytes[cut..second], &bytes[second..]];
                    assert_eq!(parsed_in(&pieces), whole, "{payload:?} cut at {cut} and {second}");
                }
            }
        }
    }

    #[test]
    fn long_payloads_in_many_uneven_chunks_parse_whole() {
        let mut random = fastrand::Rng::with_seed(7);
        let events: Vec<serde_json::Value> = (0..400)
            .map(|n| {
                let text = "é☕ab".repeat(random.usize(0..300));
                serde_json::json!({"channel": "/chat", "id": n.to_string(), "data": {"n": n, "text": text}})
            })
            .collect();
        let mut long = events.clone();
        // One message longer than many chunks together.
        long.push(serde_json::json!({"channel": "/big", "id": "big", "data": "x".repeat(300_000)}));
        for events in [events, long] {
            let payload = serde_json::to_vec(&events).expect("json");
            let whole = parsed_whole(&payload).expect("parses whole");
            for _ in 0..20 {
                let mut chunks = Vec::new();
                let mut rest = payload.as_slice();
                while !rest.is_empty() {
                    let (chunk, tail) = rest.split_at(random.usize(1..=rest.len().min(20_000)));
                    chunks.push(chunk);
                    rest = tail;
                }
                assert_eq!(parsed_in(&chunks), Ok(whole.clone()));
            }
        }
    }

    #[test]
    fn data_within_a_chunk_share_it() {
        let first = Bytes::from_static(br#"[{"channel":"/a","data":{"n":1}},{"channel":"/b","da"#);
        // The cut message is finished by joining the next 4 KiB; what starts after them is
        // read in place.
        let padding = "x".repeat(5000);
        let second = Bytes::from(format!(
            r#"ta":[2]}},{{"channel":"/pad","data":"{padding}"}},{{"channel":"/c","data":"three"}}]"#
        ));
        let mut parser = ChunkedPayload::new(None, usize::MAX);
        parser.feed(first.clone()).expect("no limit");
        parser.feed(second.clone()).expect("no limit");
        let messages = parser.finish().expect("parse").messages;
        let data: Vec<Bytes> =
            messages.iter().filter_map(|m| m.data.as_ref().map(Data::json_bytes)).collect();
        assert_eq!(data.len(), 4);
        assert_eq!(data[0], &b"{\"n\":1}"[..]);
        assert_eq!(data[1], &b"[2]"[..]);
        assert_eq!(data[3], &b"\"three\""[..]);
        let inside = |chunk: &Bytes, data: &Bytes| chunk.as_ptr_range().contains(&data.as_ptr());
        assert!(inside(&first, &data[0]), "read in place from the first chunk");
        assert!(!inside(&first, &data[1]) && !inside(&second, &data[1]), "the cut message is joined");
        assert!(inside(&second, &data[3]), "read in place from the second chunk");
    }

    fn too_large(error: &Error) -> bool {
        matches!(error.transport_kind(), Some(TransportErrorKind::TooLarge { limit: 64 }))
    }

    #[test]
    fn a_payload_over_the_limit_that_is_not_an_array_is_refused() {
        let mut spaces = ChunkedPayload::new(Some(100_000_000_000_000), 64);
        spaces.feed(Bytes::from_static(&[b' '; 60])).expect("under the limit");
        assert!(too_large(&spaces.feed(Bytes::from_static(&[b' '; 5])).expect_err("over the limit")));
        let mut object = ChunkedPayload::new(None, 64);
        let single = format!(r#"{{"channel":"/a","data":"{}"}}"#, "x".repeat(100));
        assert!(too_large(&object.feed(Bytes::from(single)).expect_err("one object over the limit")));
    }

    #[test]
    fn an_array_over_the_limit_is_handed_out_message_by_message() {
        // Messages of 26 to 64 bytes (the limit), in chunks that cut them anywhere.
        for (pad, chunk_len) in [(0, 50), (38, 7), (37, 1), (30, 1000)] {
            let messages: Vec<String> =
                (10..30).map(|n| format!(r#"{{"channel":"/n","data":{n}{}}}"#, " ".repeat(pad))).collect();
            assert!(messages.iter().all(|message| message.len() <= 64));
            streamed_in_portions(&format!("[{}]", messages.join(",")), chunk_len);
        }
    }

    fn streamed_in_portions(payload: &str, chunk_len: usize) {
        let mut parser = ChunkedPayload::new(Some(payload.len() as u64), 64);
        let mut handed = Vec::new();
        for chunk in payload.as_bytes().chunks(chunk_len) {
            parser.feed(Bytes::copy_from_slice(chunk)).expect("each message fits");
            if let Some(portion) = parser.take_portion() {
                assert!(portion.rejected.is_empty());
                handed.push(portion.messages.len());
            }
        }
        let rest = parser.finish().expect("a well-formed array");
        let total = handed.iter().sum::<usize>() + rest.messages.len();
        assert_eq!(total, 20, "chunks of {chunk_len}");
        if chunk_len < payload.len() / 2 {
            assert!(handed.len() > 1, "handed out in portions as the chunks came: {handed:?}");
        }
    }

    #[test]
    fn a_streamed_array_skips_a_message_that_does_not_fit_and_refuses_one_over_the_limit() {
        let mut parser = ChunkedPayload::new(None, 64);
        parser
            .feed(Bytes::from_static(br#"[{"channel":"/a","data":1},{"channel":"/b","data":2},"#))
            .expect("fits");
        parser
            .feed(Bytes::from_static(br#"{"id":"no channel"},{"channel":"/c","data":3},"#))
            .expect("skipped");
        let portion = parser.take_portion().expect("streaming");
        let channels: Vec<&str> = portion.messages.iter().map(|m| m.channel.as_str()).collect();
        assert_eq!(channels, ["/a", "/b", "/c"], "what was read before the limit was crossed goes first");
        assert_eq!(portion.rejected.len(), 1, "the message without a channel is named");
        let big = format!(r#"{{"channel":"/big","data":"{}"}}"#, "x".repeat(100));
        assert!(too_large(&parser.feed(Bytes::from(big)).expect_err("one message over the limit")));

        let mut broken = ChunkedPayload::new(None, 64);
        broken
            .feed(Bytes::from_static(br#"[{"channel":"/a","data":1},{"channel":"/b","data":2},"#))
            .expect("fits");
        broken.feed(Bytes::from_static(br#"{"channel":"/c","data":3}"#)).expect("fits");
        let error = broken.feed(Bytes::from_static(b" <html>")).expect_err("malformed");
        assert!(matches!(error.transport_kind(), Some(TransportErrorKind::MalformedReply(_))), "{error}");
    }

    #[test]
    fn a_declared_length_does_not_size_the_message_vector_beyond_the_first_chunk() {
        let chunk = Bytes::from(format!("[{}", r#"{"channel":"/a","data":1},"#.repeat(200)));
        let mut parser = ChunkedPayload::new(Some(u64::MAX / 2), usize::MAX);
        parser.feed(chunk.clone()).expect("no limit");
        assert!(
            parser.messages.capacity() <= chunk.len() * PLAUSIBLE_GROWTH / 24,
            "capacity {} for a {}-byte chunk",
            parser.messages.capacity(),
            chunk.len()
        );
    }
}
