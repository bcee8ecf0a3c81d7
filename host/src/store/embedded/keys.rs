//! How the embedded log lays out its keys and values. Numbers are big-endian, so keys sort
//! by stream, then position (or by time first in the age indexes).

use cim_proto::Positions;

use super::super::StoreError;
use super::super::log::LogStream;

const INBOX: u8 = b'i';
const GROUP: u8 = b'g';

/// A stream's key: `i` ‖ user (9 bytes) or `g` (1 byte). Fixed length per kind, so one
/// stream's key is never a prefix of another's entry keys.
pub(super) fn stream(stream: LogStream) -> Vec<u8> {
    match stream {
        LogStream::Inbox(user) => {
            let mut key = Vec::with_capacity(17);
            key.push(INBOX);
            key.extend_from_slice(&user.to_be_bytes());
            key
        }
        LogStream::Group => vec![GROUP],
    }
}

/// The stream a stream key names.
pub(super) fn parse_stream(key: &[u8]) -> Result<LogStream, StoreError> {
    match key {
        [GROUP] => Ok(LogStream::Group),
        [INBOX, user @ ..] => Ok(LogStream::Inbox(u64_at(user, 0)?)),
        _ => Err(corrupt("stream key", key)),
    }
}

/// An entry's key: stream ‖ position.
pub(super) fn entry(s: LogStream, position: u64) -> Vec<u8> {
    let mut key = stream(s);
    key.extend_from_slice(&position.to_be_bytes());
    key
}

/// The position an entry key ends with.
pub(super) fn entry_position(key: &[u8]) -> Result<u64, StoreError> {
    u64_at(key, key.len().checked_sub(8).ok_or_else(|| corrupt("entry key", key))?)
}

/// An entry's value: timestamp (ms) ‖ the encoded message.
pub(super) fn entry_value_of(timestamp_ms: u64, message: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + message.len());
    value.extend_from_slice(&timestamp_ms.to_be_bytes());
    value.extend_from_slice(message);
    value
}

/// An entry value's timestamp and encoded message.
pub(super) fn entry_value(value: &[u8]) -> Result<(u64, &[u8]), StoreError> {
    Ok((u64_at(value, 0)?, &value[8..]))
}

/// The age index's key: the start of a time bucket (ms) ‖ a stream that has entries from
/// that bucket. One row per stream per bucket, not per entry.
pub(super) fn age(bucket_ms: u64, stream: LogStream) -> Vec<u8> {
    let mut key = time(bucket_ms).to_vec();
    key.extend_from_slice(&self::stream(stream));
    key
}

/// The stream an age index key names.
pub(super) fn parse_age(key: &[u8]) -> Result<LogStream, StoreError> {
    parse_stream(key.get(8..).ok_or_else(|| corrupt("age key", key))?)
}

/// The stream and position a row of the old, per-entry age index (timestamp ‖ entry key)
/// points at; read once, when a log written by an earlier version is opened.
pub(super) fn parse_old_expiry(key: &[u8]) -> Result<(u64, LogStream), StoreError> {
    let entry_key = key.get(8..).filter(|k| k.len() > 8).ok_or_else(|| corrupt("expiry key", key))?;
    let (stream_key, _) = entry_key.split_at(entry_key.len() - 8);
    Ok((u64_at(key, 0)?, parse_stream(stream_key)?))
}

/// The first key of the age index at `timestamp_ms`.
pub(super) fn time(timestamp_ms: u64) -> [u8; 8] {
    timestamp_ms.to_be_bytes()
}

/// A stream's metadata.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Meta {
    pub last: u64,
    pub trimmed_through: u64,
}

impl Meta {
    pub(super) fn read(value: Option<&[u8]>) -> Result<Meta, StoreError> {
        Ok(match value {
            None => Meta::default(),
            Some(v) => Meta { last: u64_at(v, 0)?, trimmed_through: u64_at(v, 8)? },
        })
    }

    pub(super) fn bytes(&self) -> [u8; 16] {
        pair(self.last, self.trimmed_through)
    }
}

pub(super) fn positions(value: &[u8]) -> Result<Positions, StoreError> {
    Ok(Positions { inbox: u64_at(value, 0)?, group: u64_at(value, 8)? })
}

pub(super) fn positions_bytes(p: Positions) -> [u8; 16] {
    pair(p.inbox, p.group)
}

/// A client message id's key: sender ‖ the id.
pub(super) fn client_id(sender: u64, client_msg_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + client_msg_id.len());
    key.extend_from_slice(&sender.to_be_bytes());
    key.extend_from_slice(client_msg_id.as_bytes());
    key
}

/// A client message id's value: message id ‖ when it was first used (ms).
pub(super) fn client_id_value(message_id: u64, at_ms: u64) -> [u8; 16] {
    pair(message_id, at_ms)
}

pub(super) fn parse_client_id_value(value: &[u8]) -> Result<(u64, u64), StoreError> {
    Ok((u64_at(value, 0)?, u64_at(value, 8)?))
}

fn pair(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0; 16];
    out[..8].copy_from_slice(&a.to_be_bytes());
    out[8..].copy_from_slice(&b.to_be_bytes());
    out
}

fn u64_at(bytes: &[u8], at: usize) -> Result<u64, StoreError> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt("number", bytes))
}

fn corrupt(what: &str, bytes: &[u8]) -> StoreError {
    StoreError::Corrupt(format!("a message log {what} has {} bytes: {bytes:02x?}", bytes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort() {
        for s in [LogStream::Group, LogStream::Inbox(0), LogStream::Inbox(u64::MAX)] {
            assert_eq!(parse_stream(&stream(s)).unwrap(), s);
            let key = entry(s, 42);
            assert_eq!(entry_position(&key).unwrap(), 42);
            assert_eq!(parse_age(&age(7, s)).unwrap(), s);
            let mut old = time(7).to_vec();
            old.extend_from_slice(&key);
            assert_eq!(parse_old_expiry(&old).unwrap(), (7, s));
        }
        assert!(entry(LogStream::Inbox(1), 2) < entry(LogStream::Inbox(1), 256));
        assert!(entry(LogStream::Inbox(1), u64::MAX) < entry(LogStream::Inbox(2), 0));
        assert!(age(1, LogStream::Inbox(9)) < age(2, LogStream::Group));
        assert!(parse_age(b"short").is_err());
        assert!(entry_value(b"1234").is_err());
    }
}
