//! The Redis wire format of job events and wake-ups: channel names, and the events
//! message both its writer (the publisher) and its readers (every hub) use.
use uuid::Uuid;

/// The channel committed job events travel on: one message per publisher batch, holding
/// every event of that batch in commit order (`EventsMessage`). One `PUBLISH` per event
/// cost Redis a pattern match and every instance a message to parse, per event.
pub fn events_channel(prefix: &str) -> String {
    format!("{prefix}{EVENTS_SUFFIX}")
}

pub(super) const EVENTS_SUFFIX: &str = ":events";

/// Per-event channels of instances from before `events_channel`; still received, so
/// watchers see their events during a rolling upgrade.
pub(super) fn legacy_event_pattern(prefix: &str) -> String {
    format!("{prefix}:ev:*")
}

/// Format version of an events message (its first byte).
const EVENTS_V1: u8 = 1;
/// Project id, job id, payload length.
const EVENT_HEADER: usize = 16 + 16 + 4;

/// A message for `events_channel`: a version byte, then per event its project id and
/// job id (16 bytes each), the payload's length (4 bytes, big-endian) and the payload
/// (an encoded `JobEvent`). Instances skip the events nobody watches on them without
/// decoding them.
#[derive(Default)]
pub struct EventsMessage(Vec<u8>);

impl EventsMessage {
    pub fn push(&mut self, project: Uuid, job: Uuid, payload: &[u8]) {
        if self.0.is_empty() {
            self.0.push(EVENTS_V1);
        }
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(project.as_bytes());
        self.0.extend_from_slice(job.as_bytes());
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(&payload[..len as usize]);
    }

    /// Bytes so far.
    pub fn bytes(&self) -> usize {
        self.0.len()
    }

    /// The message, if it holds any event; the builder starts over.
    pub fn take(&mut self) -> Option<Vec<u8>> {
        (!self.0.is_empty()).then(|| std::mem::take(&mut self.0))
    }
}

/// The events of an `EventsMessage`; stops at anything malformed (a version it
/// does not know, a truncated event): watchers recover what is missing from Postgres.
pub(super) fn decode_events(message: &[u8]) -> impl Iterator<Item = (Uuid, Uuid, &[u8])> {
    let mut rest = match message.split_first() {
        Some((&EVENTS_V1, rest)) => rest,
        _ => &[][..],
    };
    std::iter::from_fn(move || {
        let (header, after) = rest.split_at_checked(EVENT_HEADER)?;
        let project = Uuid::from_slice(&header[..16]).ok()?;
        let job = Uuid::from_slice(&header[16..32]).ok()?;
        let len = u32::from_be_bytes(header[32..].try_into().ok()?) as usize;
        let (payload, after) = after.split_at_checked(len)?;
        rest = after;
        Some((project, job, payload))
    })
}

pub fn wake_channel(prefix: &str, kind: &str) -> String {
    format!("{prefix}:wake:{kind}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_messages_round_trip_and_stop_at_damage() {
        let (p, a, b) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut builder = EventsMessage::default();
        for (job, payload) in [(a, &b"first"[..]), (b, &b""[..]), (a, &b"x"[..])] {
            builder.push(p, job, payload);
        }
        let message = builder.take().unwrap();
        assert!(builder.take().is_none(), "the builder starts over");
        let decoded: Vec<_> = decode_events(&message).collect();
        assert_eq!(
            decoded,
            vec![(p, a, &b"first"[..]), (p, b, &b""[..]), (p, a, &b"x"[..])]
        );
        // Cut inside the last event: the whole ones before it still arrive.
        assert_eq!(decode_events(&message[..message.len() - 1]).count(), 2);
        let mut unknown = message.clone();
        unknown[0] = 2;
        assert_eq!(
            decode_events(&unknown).count(),
            0,
            "a version it does not know"
        );
        assert_eq!(decode_events(&[]).count(), 0);
    }
}
