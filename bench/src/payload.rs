//! Message payloads that carry their own send time: the first 16 hex digits are the
//! nanoseconds since this process's [`epoch`], the next 8 a sequence number, the rest
//! padding. Sender and receiver live in one process, so a monotonic clock is enough.

use std::sync::OnceLock;
use std::time::Instant;

/// Bytes taken by the timestamp and the sequence number.
pub const HEADER: usize = 24;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the process-wide epoch.
pub fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// A payload of `size` bytes (at least [`HEADER`]) stamped with `sent_ns` and `seq`.
pub fn make(sent_ns: u64, seq: u32, size: usize) -> String {
    let mut text = format!("{sent_ns:016x}{seq:08x}");
    let pad = size.saturating_sub(HEADER);
    text.extend(std::iter::repeat_n('x', pad));
    text
}

/// The send time and sequence number of a payload made by [`make`].
pub fn parse(payload: &[u8]) -> Option<(u64, u32)> {
    let ts = std::str::from_utf8(payload.get(..16)?).ok()?;
    let seq = std::str::from_utf8(payload.get(16..HEADER)?).ok()?;
    Some((u64::from_str_radix(ts, 16).ok()?, u32::from_str_radix(seq, 16).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_and_has_the_asked_size() {
        let p = make(0x1234_5678_9abc, 42, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(parse(p.as_bytes()), Some((0x1234_5678_9abc, 42)));
        // Smaller than the header: the header alone.
        assert_eq!(make(1, 2, 4).len(), HEADER);
        assert_eq!(parse(b"not a payload"), None);
    }

    #[test]
    fn clock_is_monotonic() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
    }
}
