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

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use serde_json::value::RawValue;

use super::{Received, message_count_estimate, parse_received};
use crate::cometd::error::{Error, TransportErrorKind};
use crate::cometd::message::{Data, Message, WireMessage};

/// How many times its first chunk a payload's declared length may be, for sizing the
/// message vector up front; past it, the vector grows as messages arrive.
const PLAUSIBLE_GROWTH: usize = 64;

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
pub(crate) struct ChunkedPayload {
    expect: Expect,
    messages: Vec<Message>,
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
    /// A parser for a payload of `expected_len` bytes, if the length is known, and of at
    /// most `limit` bytes.
    ///
    /// # Errors
    /// [`TransportErrorKind::TooLarge`] if the announced length is over the limit.
    pub(crate) fn new(expected_len: Option<u64>, limit: usize) -> Result<Self, Error> {
        let expected_len = expected_len.map(|len| usize::try_from(len).unwrap_or(usize::MAX));
        if expected_len.is_some_and(|len| len > limit) {
            return Err(Error::transport(TransportErrorKind::TooLarge { limit }));
        }
        Ok(ChunkedPayload {
            expect: Expect::Open,
            messages: Vec::new(),
            carry: BytesMut::new(),
            retry_at: 0,
            chunks: Vec::new(),
            expected_len,
            received: 0,
            limit,
            whole: false,
        })
    }

    /// Reads the messages the chunk completes.
    ///
    /// # Errors
    /// [`TransportErrorKind::TooLarge`] once the payload grows past the limit.
    pub(crate) fn feed(&mut self, chunk: Bytes) -> Result<(), Error> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.received = self.received.saturating_add(chunk.len());
        if self.received > self.limit {
            return Err(Error::transport(TransportErrorKind::TooLarge { limit: self.limit }));
        }
        self.chunks.push(chunk.clone());
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
        Ok(())
    }

    /// Every message, once the last chunk has been fed; or the error that names what is
    /// wrong with the payload.
    pub(crate) fn finish(self) -> Result<Received, Error> {
        match self.end() {
            Ok(messages) => Ok(Received { messages, rejected: Vec::new() }),
            Err(whole) => parse_received(whole),
        }
    }

    /// The messages read chunk by chunk, or the whole payload when it has to be parsed
    /// whole. Crate-visible for the fuzz harness, which checks that a well-formed array is
    /// read chunk by chunk.
    pub(crate) fn end(mut self) -> Result<Vec<Message>, Bytes> {
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
            let more = self.carry.len().max(4096).min(chunk.len() - taken);
            self.carry.extend_from_slice(&chunk[taken..taken + more]);
            taken += more;
            if self.carry.len() < self.retry_at {
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
    use crate::cometd::transport::parse_payload;

    /// The chunks parsed; a well-formed array must be read chunk by chunk, not handed to
    /// `parse_payload` whole (which would hide a mistake in the chunk-by-chunk reading).
    fn parsed_in(chunks: &[&[u8]]) -> Result<Vec<Message>, String> {
        let declared = chunks.iter().map(|chunk| chunk.len() as u64).sum();
        let mut parser = ChunkedPayload::new(Some(declared), usize::MAX).expect("no limit");
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
        let mut parser = ChunkedPayload::new(None, usize::MAX).expect("no limit");
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

    #[test]
    fn a_payload_over_the_limit_is_refused_declared_or_streamed() {
        let too_large =
            |error: Error| matches!(error.transport_kind(), Some(TransportErrorKind::TooLarge { limit: 64 }));
        let declared = ChunkedPayload::new(Some(100_000_000_000_000), 64).err().expect("declared too large");
        assert!(too_large(declared));
        let mut streamed = ChunkedPayload::new(None, 64).expect("no length declared");
        streamed.feed(Bytes::from_static(&[b' '; 60])).expect("under the limit");
        assert!(too_large(streamed.feed(Bytes::from_static(&[b' '; 5])).expect_err("over the limit")));
    }

    #[test]
    fn a_declared_length_does_not_size_the_message_vector_beyond_the_first_chunk() {
        let chunk = Bytes::from(format!("[{}", r#"{"channel":"/a","data":1},"#.repeat(200)));
        let mut parser = ChunkedPayload::new(Some(u64::MAX / 2), usize::MAX).expect("no limit");
        parser.feed(chunk.clone()).expect("no limit");
        assert!(
            parser.messages.capacity() <= chunk.len() * PLAUSIBLE_GROWTH / 24,
            "capacity {} for a {}-byte chunk",
            parser.messages.capacity(),
            chunk.len()
        );
    }
}
