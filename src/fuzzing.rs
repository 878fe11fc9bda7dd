//! The fuzz harnesses: one function per target, each taking the fuzzer's bytes. They are
//! used by the cargo-fuzz crate in `fuzz/` (coverage-guided runs, `scripts/fuzz.sh`) and by
//! the corpus-replay test (`tests/it/fuzz_corpus.rs`), which runs every file of
//! `fuzz/corpus/<target>/` through them. Not an API: hidden from the docs, and free to
//! change with the code it exercises. Compiled only with the `fuzzing` feature, which the
//! fuzz crate and this crate's own dev-dependency (for the tests) turn on.
//!
//! Each harness must return normally for any input; a panic is a finding. Where the code
//! under test promises something checkable, the harness asserts it: the chunked parser
//! reads what the whole-payload parser reads, whatever the chunks; a parsed message
//! written out and read again is the same message; a payload or websocket message over
//! the limit is refused as too large; a refused configuration or body names at least one
//! problem; a subscription the API accepts is accepted again when read back from the
//! store.
//!
//! Inputs are read the same way in every run, so a file of the corpus (or a crash the
//! fuzzer saved) reproduces on its own: `cargo +nightly fuzz run <target> <file>`.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

use bytes::Bytes;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};

use crate::cometd::fuzzing::{ChunkedPayload, STREAM_AFTER, parse_payload, socket_config};
use crate::cometd::{Data, Error, Message, TransportErrorKind};
use crate::config::{Env, Problem, RawConfig, RawSink, RawSubscription};

/// A payload parsed whole (`parse_payload`, the websocket path) and chunk by chunk
/// (`ChunkedPayload`, the long-polling path), split where the input says.
///
/// Input: a control byte, then `2 × (control & 0x0f)` bytes of cut points (little-endian
/// `u16`s, taken modulo the payload's length + 1), then the payload. The control byte's
/// high bits choose the declared length (none, exact, shorter, longer, huge) and the limit
/// (none, the payload's length, one byte less, 64 bytes).
///
/// Checks: the chunks give the same messages, or an error with the same text, as the
/// whole payload, and a well-formed array is read chunk by chunk (not handed whole to
/// `parse_payload`, which would hide a mistake in the chunk-by-chunk reading); a payload
/// over the limit (declared or streamed) is refused as too large, at the first chunk that
/// crosses it; every parsed message written out and parsed again is equal; every
/// message's data is a slice of the payload and agrees with itself (see [`data`]).
pub fn payload(input: &[u8]) {
    let Some((&control, rest)) = input.split_first() else { return };
    let cut_bytes = 2 * usize::from(control & 0x0f);
    if rest.len() < cut_bytes {
        return;
    }
    let (cuts, body) = rest.split_at(cut_bytes);
    let whole = parse_payload(Bytes::copy_from_slice(body));
    if let Ok(messages) = &whole {
        check_messages(body, messages);
    }

    let len = body.len();
    let mut cuts: Vec<usize> = cuts
        .chunks_exact(2)
        .map(|pair| usize::from(u16::from_le_bytes([pair[0], pair[1]])) % (len + 1))
        .collect();
    cuts.sort_unstable();
    let declared = match (control >> 4) & 0b11 {
        0 => None,
        1 => Some(len as u64),
        2 => Some((len as u64).saturating_sub(3)),
        _ if control & 0x80 != 0 => Some(u64::MAX),
        _ => Some(len as u64 + 1000),
    };
    let limit = match (control >> 6) & 0b11 {
        0 => usize::MAX,
        1 => len,
        2 => len.saturating_sub(1),
        _ => 64,
    };
    let mut parser = ChunkedPayload::new(declared, limit);
    if len > limit.min(STREAM_AFTER) {
        over_the_limit(parser, body, &cuts, limit, whole.as_ref().ok());
        return;
    }
    let mut start = 0;
    for end in cuts.into_iter().chain([len]) {
        let chunk = &body[start..end];
        start = end;
        parser.feed(Bytes::copy_from_slice(chunk)).expect("chunks within the limit are accepted");
        assert!(parser.take_portion().is_none(), "a payload within the limit is read whole");
    }
    // What `finish` does, with a look at which way the payload went.
    let chunked = match parser.end() {
        Ok(messages) => Ok(messages),
        Err(joined) => {
            assert_eq!(joined, body, "the chunks joined are the payload");
            let array = body.trim_ascii_start().starts_with(b"[");
            assert!(!(array && whole.is_ok()), "a well-formed array is read chunk by chunk, not whole");
            parse_payload(joined)
        }
    };
    if let (Ok(_), Err(error)) = (&chunked, &whole)
        && error.to_string().contains("recursion limit exceeded")
    {
        // Known: a message read on its own has one level more of serde_json's nesting
        // limit (128) than inside the array read whole, so `ext`, `advice` or
        // `subscription` nested 125–127 deep is read by long-polling and refused on a
        // websocket (corpus file `ext-nested-125`).
        return;
    }
    assert_eq!(
        chunked.as_ref().map_err(ToString::to_string),
        whole.as_ref().map_err(ToString::to_string),
        "the chunks parse as the whole payload does"
    );
}

/// Raw bytes from a server read by the client side of a websocket (tungstenite, with the
/// client's own `socket_config`), every text or binary message parsed as the websocket
/// transport parses it.
///
/// Input: a byte whose low bit chooses the limit (`max_message_size` of 1 KiB or 64 KiB,
/// which also bounds frames), a byte giving how many bytes each read returns (0: all it
/// asks for), then the server's bytes (frames, no HTTP upgrade).
///
/// Checks: no message over the limit gets through; what does is parsed without a panic
/// and its messages survive a round trip (see [`payload`]).
pub fn websocket(input: &[u8]) {
    let [settings, step, server @ ..] = input else { return };
    let limit = if settings & 1 == 0 { 1024 } else { 64 * 1024 };
    let stream = ServerBytes { bytes: server, step: usize::from(*step) };
    let mut socket = WebSocket::from_raw_socket(stream, Role::Client, Some(socket_config(limit)));
    // Every successful read consumes at least a frame header, so this ends.
    loop {
        let bytes = match socket.read() {
            Ok(Frame::Text(text)) => Bytes::from(text),
            Ok(Frame::Binary(bytes)) => bytes,
            // Ping, pong, close: tungstenite answers them itself.
            Ok(_) => continue,
            // Too large (`tungstenite::Error::Capacity`), malformed, or the end of the bytes.
            Err(_) => return,
        };
        assert!(bytes.len() <= limit, "a {}-byte message passed the {limit}-byte limit", bytes.len());
        if let Ok(messages) = parse_payload(bytes.clone()) {
            check_messages(&bytes, &messages);
        }
    }
}

/// The server's side of an in-memory socket: reads return `step` bytes at a time (all
/// that is asked for when 0), then the end of the stream; what the client writes
/// (pongs, its close frame) is dropped.
struct ServerBytes<'a> {
    bytes: &'a [u8],
    step: usize,
}

impl Read for ServerBytes<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let mut take = buffer.len().min(self.bytes.len());
        if self.step > 0 {
            take = take.min(self.step);
        }
        let (now, later) = self.bytes.split_at(take);
        buffer[..take].copy_from_slice(now);
        self.bytes = later;
        Ok(take)
    }
}

impl Write for ServerBytes<'_> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        Ok(buffer.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `Data` read from JSON text, as a message's `data` field is.
///
/// Input: JSON text (any bytes; what is not JSON is refused, which is checked too).
///
/// Checks: its text is the value as written; `value()` is the text parsed, or the text as
/// a string when serde_json cannot build a `Value` of it; `detach()` is equal; it is
/// written out as the same text and read back equal; in a message, through the payload
/// parser, it is the same data (or none, for `null`).
pub fn data(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        assert!(serde_json::from_slice::<Data>(input).is_err(), "data that is not UTF-8 is refused");
        return;
    };
    let Ok(data) = serde_json::from_str::<Data>(text) else { return };
    check_data(&data);
    assert_eq!(data.json(), text.trim_matches([' ', '\t', '\n', '\r']), "the text is kept as written");
    let event = format!(r#"[{{"channel":"/fuzz","data":{}}}]"#, data.json());
    let messages = parse_payload(Bytes::from(event)).expect("a message around valid data parses");
    let Some(carried) = messages[0].data.as_ref() else {
        assert_eq!(data.json(), "null", "only null data is the same as none");
        return;
    };
    assert_eq!(carried.json(), data.json(), "the payload parser keeps the text");
    assert_eq!(*carried, data);
}

/// The checks every `Data` must pass, wherever it came from.
fn check_data(data: &Data) {
    let json = data.json();
    assert_eq!(data.json_bytes(), json.as_bytes(), "json_bytes() is json()");
    match serde_json::from_str::<Value>(json) {
        Ok(value) => {
            assert_eq!(data.value(), value, "value() is the text parsed");
            assert!(*data == value, "equal to its value");
        }
        Err(_) => assert_eq!(data.value(), Value::String(json.to_owned()), "unparsable data is its text"),
    }
    let detached = data.detach();
    assert_eq!(detached.json(), json);
    assert_eq!(detached, *data, "detach() is equal");
    let written = serde_json::to_string(data).expect("data is written as the JSON it holds");
    assert_eq!(written, json, "written as the text it holds");
    let read: Data = serde_json::from_str(&written).expect("written data reads back");
    assert!(read == *data, "written data reads back equal");
}

/// The checks on messages parsed from `payload`: their data are slices of it, and pass
/// [`check_data`]; written out as a payload and parsed again, they are equal.
fn check_messages(payload: &[u8], messages: &[Message]) {
    for data in messages.iter().filter_map(|message| message.data.as_ref()) {
        assert!(
            memchr::memmem::find(payload, data.json().as_bytes()).is_some(),
            "data is text of the payload: {data}"
        );
        check_data(data);
    }
    let written = serde_json::to_vec(messages).expect("parsed messages are written out");
    let read = parse_payload(Bytes::from(written)).expect("written messages parse again");
    assert_eq!(read, messages, "messages survive a round trip");
}

/// A payload over the limit: refused as too large, refused as malformed once it streams,
/// or streamed; what was handed out before an error, or all of it, is what the whole
/// payload holds, in order, where the whole payload parses.
fn over_the_limit(
    mut parser: ChunkedPayload,
    body: &[u8],
    cuts: &[usize],
    limit: usize,
    whole: Option<&Vec<Message>>,
) {
    let mut streamed = Vec::new();
    let mut start = 0;
    let mut failed = None;
    for &end in cuts.iter().chain([&body.len()]) {
        let chunk = &body[start..end];
        start = end;
        let fed = parser.feed(Bytes::copy_from_slice(chunk));
        if let Some(portion) = parser.take_portion() {
            streamed.extend(portion.messages);
        }
        if let Err(error) = fed {
            failed = Some(error);
            break;
        }
    }
    let array = body.trim_ascii_start().starts_with(b"[");
    match failed {
        Some(error) if !array => assert_too_large(error, limit),
        Some(error) => assert!(
            matches!(error.transport_kind(), Some(TransportErrorKind::TooLarge { limit: refused }) if *refused == limit)
                || matches!(error.transport_kind(), Some(TransportErrorKind::MalformedReply(_))),
            "over the limit: too large or malformed, got {error}"
        ),
        None => match parser.finish() {
            Ok(rest) => streamed.extend(rest.messages),
            Err(error) => assert!(
                matches!(error.transport_kind(), Some(TransportErrorKind::MalformedReply(_)))
                    || matches!(error.transport_kind(), Some(TransportErrorKind::TooLarge { .. })),
                "over the limit: {error}"
            ),
        },
    }
    check_messages(body, &streamed);
    if let Some(whole) = whole {
        assert!(streamed.len() <= whole.len(), "no more messages streamed than the payload holds");
        assert_eq!(&whole[..streamed.len()], &streamed[..], "streamed messages are the payload's, in order");
    }
}

/// Asserts that `error` is the too-large transport error for `limit`.
fn assert_too_large(error: Error, limit: usize) {
    assert!(
        matches!(error.transport_kind(), Some(TransportErrorKind::TooLarge { limit: refused }) if *refused == limit),
        "expected a too-large error for the {limit}-byte limit, got {error}"
    );
}

/// A path no configuration read by the fuzzer may touch a file beyond: see [`config`].
const NO_FILE: &str = "/nonexistent/cometd-bridge-fuzz";

/// The configuration loader (`config::parse_text`, which `config::load` runs on a file's
/// text) and `validate`, on text in any of the three formats with environment
/// overrides.
///
/// Input: a byte choosing the format (`T` TOML, `Y` YAML, `J` JSON; any other byte by its
/// value modulo 3), then the text; after the first NUL byte, lines `NAME=VALUE` form the
/// environment (`COMETD_BRIDGE__ADMIN__LISTEN=...` overrides, other names for `env:`
/// secrets).
///
/// The fuzzer's configuration must not make the harness read the machine's files (each
/// read is bounded, but a megabyte of `/dev/zero` per input slows the fuzzer): every file it names (`file:` secrets, `tls.ca_file`,
/// `salesforce.private_key_file`) is replaced by a path that does not exist, so the
/// reading fails, as for a missing file, before validation runs. YAML whose aliases
/// expand it without bound ("billion laughs") goes through: the loader refuses it first.
///
/// Checks: a refused configuration names at least one problem, each with a message; an
/// accepted one gives every source its client options, and `run`'s own refusal (an API
/// without a token beyond loopback) has a message too.
pub fn config(input: &[u8]) {
    use crate::config::Format;
    let Some((&format, rest)) = input.split_first() else { return };
    let format = match format {
        b'T' => Format::Toml,
        b'Y' => Format::Yaml,
        b'J' => Format::Json,
        other => [Format::Toml, Format::Yaml, Format::Json][usize::from(other % 3)],
    };
    let (text, env_lines) = match rest.iter().position(|&byte| byte == 0) {
        Some(nul) => (&rest[..nul], &rest[nul + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else { return };
    let env: Env = String::from_utf8_lossy(env_lines)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    let result =
        crate::config::parse_text(text, format, "fuzz input", &env).and_then(|(mut raw, problems)| {
            without_files(&mut raw);
            crate::config::validate_parsed(raw, problems, &env)
        });
    match result {
        Ok(config) => {
            for source in &config.sources {
                let _ = source.client_options();
            }
            // The rule `run` adds: a problem like the others when it applies.
            if let Some(problem) = config.unprotected_api() {
                check_problems(&[problem]);
            }
        }
        Err(error) => {
            check_problems(error.problems());
            // What `check` and `run` print: one line per problem.
            assert!(!error.to_string().is_empty());
        }
    }
}

/// Points every file `raw` would read at [`NO_FILE`].
fn without_files(raw: &mut RawConfig) {
    fn secret(spec: &mut Option<String>) {
        if let Some(spec) = spec
            && spec.starts_with("file:")
        {
            *spec = format!("file:{NO_FILE}");
        }
    }
    fn file(path: &mut Option<String>) {
        if path.is_some() {
            *path = Some(NO_FILE.to_string());
        }
    }
    secret(&mut raw.admin.token);
    if let Some(nats) = &mut raw.nats {
        secret(&mut nats.password);
        secret(&mut nats.token);
    }
    for source in &mut raw.sources {
        for value in source.headers.values_mut() {
            let mut spec = Some(std::mem::take(value));
            secret(&mut spec);
            *value = spec.unwrap_or_default();
        }
        file(&mut source.tls.ca_file);
        if let Some(salesforce) = &mut source.salesforce {
            secret(&mut salesforce.client_secret);
            secret(&mut salesforce.password);
            secret(&mut salesforce.refresh_token);
            file(&mut salesforce.private_key_file);
        }
    }
    for subscription in &mut raw.subscriptions {
        if let RawSink::Webhook { secret: spec, .. } = &mut subscription.sink {
            secret(spec);
        }
    }
}

/// A refusal names at least one problem, each with a message.
fn check_problems(problems: &[Problem]) {
    assert!(!problems.is_empty(), "a refusal names its problems");
    for problem in problems {
        assert!(!problem.message.trim().is_empty(), "problem without a message under {:?}", problem.key);
    }
}

/// The admin API's JSON bodies: `POST /api/v1/subscriptions` (a `RawSubscription`) and
/// `POST /api/v1/subscriptions/{id}/position` (a `PositionBody`), read as `ApiJson` reads
/// them (unknown keys named), then checked as the handlers check them: the secret
/// references the API refuses, webhook destinations, `validate_subscription` against a
/// bridge that has the named source, and the position's `replay_from`.
///
/// Input: the request body.
///
/// Checks: a refusal is a 400 with a message; an accepted subscription keeps the body's
/// fields, and, written as the store writes it and read back (as at the next start), is
/// accepted again with the same fields.
pub fn api_body(input: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(input) else { return };
    match crate::admin::body_from_value::<crate::admin::PositionBody>(value.clone()) {
        Ok(body) => {
            if let Err(error) = crate::admin::position_from(&body) {
                check_api_error(&error);
            }
        }
        Err(error) => check_api_error(&error),
    }
    let raw = match crate::admin::body_from_value::<RawSubscription>(value) {
        Ok(raw) => raw,
        Err(error) => return check_api_error(&error),
    };
    if let RawSink::Webhook { url, secret, .. } = &raw.sink {
        // The bridge refuses secret references (they would read its environment or files)
        // before validating, and checks where a webhook goes.
        if secret.as_deref().is_some_and(|secret| secret.starts_with("env:") || secret.starts_with("file:")) {
            return;
        }
        if let Ok(url) = reqwest::Url::parse(url) {
            let _ = crate::config::private_destination(&url);
        }
    }
    let Some(accepted) = posted(&raw) else { return };
    let stored = serde_json::to_vec(&raw).expect("records serialize");
    let read: RawSubscription = serde_json::from_slice(&stored).expect("a stored subscription reads back");
    let again = posted(&read).expect("a stored subscription is accepted again");
    assert_eq!(
        serde_json::to_value(&again.raw).expect("serialize"),
        serde_json::to_value(&accepted.raw).expect("serialize"),
        "the stored subscription is the one accepted"
    );
    assert_eq!((&again.id, &again.source), (&raw.id, &raw.source));
    assert_eq!(again.channel.as_str(), accepted.channel.as_str());
}

/// `raw` validated as the API validates a posted subscription (its source exists); a
/// refusal is checked and gives `None`.
fn posted(raw: &RawSubscription) -> Option<crate::config::SubscriptionConfig> {
    let sources = BTreeSet::from([raw.source.clone(), "demo".to_string()]);
    match crate::config::validate_subscription(raw, "", &sources, &Env::new()) {
        Ok(config) => {
            assert_eq!(config.id, raw.id);
            assert_eq!(config.channel.as_str(), raw.channel, "the channel is kept as written");
            Some(config)
        }
        Err(problems) => {
            check_problems(&problems);
            check_api_error(&crate::bridge::BridgeError::Invalid(problems).into());
            None
        }
    }
}

/// A body the API refuses is a 400 with a sentence.
fn check_api_error(error: &crate::admin::ApiError) {
    assert_eq!(error.status(), axum::http::StatusCode::BAD_REQUEST, "{}", error.message());
    assert!(!error.message().trim().is_empty(), "a refusal says why");
}
