//! How the embedded store keeps an appended batch of spooled messages in one database
//! value: a version byte, the message count (u32, little-endian), then each message as
//! its length (u32, little-endian) and its bytes. The messages of a batch have
//! consecutive sequences from the record's key on.
//!
//! A batch is one B-tree insert and one value however many messages it holds, where a
//! record per message cost an insert (and later a delete) each: the larger part of what
//! the spool added to the bridge's CPU per message. Reading is tolerant: a value whose
//! framing is broken yields what can be read, and an empty record for each message that
//! cannot, which the reader reports and skips like any unreadable message.

/// The layout version written in the first byte.
const VERSION: u8 = 1;

/// The largest message a batch can hold (its length is written in 4 bytes).
pub const MAX_RECORD_BYTES: usize = u32::MAX as usize;

/// Bytes before the first message: the version and the count.
const HEADER: usize = 5;

/// A batch value holding `records`, in order, none larger than [`MAX_RECORD_BYTES`].
pub fn encode<'a>(records: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut value = vec![VERSION, 0, 0, 0, 0];
    let mut count: u32 = 0;
    for record in records {
        let length = u32::try_from(record.len()).expect("a spooled message is smaller than 4 GiB");
        value.extend_from_slice(&length.to_le_bytes());
        value.extend_from_slice(record);
        count += 1;
    }
    value[1..HEADER].copy_from_slice(&count.to_le_bytes());
    value
}

/// How many messages the batch `value` holds: at least 1, so that a damaged value still
/// takes its place in the sequence, and no more than its bytes can frame.
pub fn count(value: &[u8]) -> u64 {
    match value.get(1..HEADER) {
        Some(bytes) if value[0] == VERSION => {
            let declared = u64::from(u32::from_le_bytes(bytes.try_into().expect("4 bytes")));
            let room = ((value.len() - HEADER) / 4) as u64;
            declared.min(room).max(1)
        }
        _ => 1,
    }
}

/// The messages of the batch `value`, in order: `count(value)` of them, an empty slice for
/// each one the value's framing does not hold.
pub fn records(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let total = count(value);
    let mut rest =
        if value.first() == Some(&VERSION) { value.get(HEADER..).unwrap_or_default() } else { &[] };
    (0..total).map(move |_| {
        let Some((length, tail)) = rest.split_first_chunk::<4>() else {
            rest = &[];
            return &[][..];
        };
        let length = u32::from_le_bytes(*length) as usize;
        if length > tail.len() {
            rest = &[];
            return &[][..];
        }
        let (record, tail) = tail.split_at(length);
        rest = tail;
        record
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_reads_back_as_written() {
        let value = encode([&b"first"[..], b"", b"third one"]);
        assert_eq!(count(&value), 3);
        assert_eq!(records(&value).collect::<Vec<_>>(), [&b"first"[..], b"", b"third one"]);
    }

    #[test]
    fn a_damaged_batch_keeps_its_count_and_yields_empty_records_where_it_breaks() {
        let value = encode([&b"first"[..], b"second"]);
        let cut = &value[..value.len() - 2];
        assert_eq!(records(cut).collect::<Vec<_>>(), [&b"first"[..], b""]);
        assert_eq!(count(b""), 1);
        assert_eq!(records(b"").collect::<Vec<_>>(), [&b""[..]]);
        assert_eq!(records(b"\x07garbage").collect::<Vec<_>>(), [&b""[..]]);
        // A count larger than the value can hold is cut to what it can frame.
        assert_eq!(count(b"\x01\xff\xff\xff\xff\x00\x00\x00\x00"), 1);
    }
}
