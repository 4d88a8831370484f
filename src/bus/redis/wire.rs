//! The wire format of the Redis bus: channel names, and the JSON encoding of
//! room events (see the module documentation of the bus for its fields), with
//! its unit tests.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{Change, History, MutationId, Number, RoomEvent, RoomKey, Version};

pub(super) const CONTROL_CHANNEL: &str = "croupier:control";
/// "I could not publish some events; catch up from the store." Payload: the
/// announcing instance (which ignores its own announcement).
pub(super) const RESYNC_CHANNEL: &str = "croupier:resync";

/// Room channels are named by [`crate::redis_layout::Layout::room_channel`]:
/// the name depends on whether Redis is a Cluster.
/// A room event on the wire. Private so that domain types stay free of transport concerns.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEvent {
    origin: String,
    key: String,
    epoch: String,
    version: u64,
    kind: String,
    value: serde_json::Value,
    #[serde(default)]
    mutation_id: Option<String>,
    committed_at: String,
}

pub(super) fn encode_event(origin: &str, event: &RoomEvent) -> String {
    let value = match &event.change {
        Change::Added(n) => n.to_json(),
        Change::Removed(i) => serde_json::Value::from(*i),
        Change::Replaced(h) => serde_json::to_value(h).unwrap_or_default(),
    };
    let wire = WireEvent {
        origin: origin.to_owned(),
        key: event.key.to_string(),
        epoch: event.epoch.to_string(),
        version: event.version.get(),
        kind: event.change.kind().to_owned(),
        value,
        mutation_id: event.mutation_id.as_ref().map(|m| m.as_str().to_owned()),
        committed_at: event
            .committed_at
            .to_rfc3339_opts(SecondsFormat::Nanos, true),
    };
    // Serialising plain strings, integers and JSON values cannot fail.
    serde_json::to_string(&wire).unwrap_or_default()
}

/// The instance that published a payload, read without decoding the event
/// (an instance receives its own publishes and drops them).
#[derive(Deserialize)]
struct Origin<'a> {
    #[serde(borrow)]
    origin: std::borrow::Cow<'a, str>,
}

/// Whether `payload` is an event that `instance` published; `false` for
/// anything unreadable, which [`decode_event`] then reports.
pub(super) fn published_by(payload: &[u8], instance: &str) -> bool {
    serde_json::from_slice::<Origin>(payload).is_ok_and(|wire| wire.origin == instance)
}

/// Parses a payload into (origin instance, event); the error says what was wrong.
pub(super) fn decode_event(payload: &[u8]) -> Result<(String, RoomEvent), String> {
    let wire: WireEvent = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let change = match wire.kind.as_str() {
        "add" => Change::Added(Number::from_json(&wire.value).map_err(|e| e.to_string())?),
        "remove" => Change::Removed(
            wire.value
                .as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or("remove index is not an unsigned integer")?,
        ),
        "replace" => Change::Replaced(
            History::from_json(&wire.value, usize::MAX).map_err(|e| e.to_string())?,
        ),
        other => return Err(format!("unknown change kind {other:?}")),
    };
    let mutation_id = wire
        .mutation_id
        .map(MutationId::parse)
        .transpose()
        .map_err(|e| e.to_string())?;
    let committed_at = DateTime::parse_from_rfc3339(&wire.committed_at)
        .map_err(|e| format!("committedAt: {e}"))?
        .with_timezone(&Utc);
    let event = RoomEvent {
        key: RoomKey::parse(&wire.key).map_err(|e| e.to_string())?,
        epoch: wire.epoch.into(),
        version: Version::new(wire.version),
        change,
        mutation_id,
        committed_at,
    };
    Ok((wire.origin, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(change: Change) -> RoomEvent {
        RoomEvent {
            key: RoomKey::parse("Рулетка 1").unwrap(),
            epoch: "e1".into(),
            version: Version::new(7),
            change,
            mutation_id: Some(MutationId::parse("m-1").unwrap()),
            committed_at: DateTime::parse_from_rfc3339("2024-05-01T10:00:00.123456789Z")
                .unwrap()
                .with_timezone(&Utc),
        }
    }

    #[test]
    fn events_round_trip_through_the_wire_format() {
        let history = History::from_numbers(vec![Number::Single(3), Number::DoubleZero]);
        for change in [
            Change::Added(Number::Single(17)),
            Change::Added(Number::DoubleZero),
            Change::Removed(4),
            Change::Replaced(history),
            Change::Replaced(History::default()),
        ] {
            let sent = event(change);
            let (origin, received) = decode_event(encode_event("a", &sent).as_bytes()).unwrap();
            assert_eq!(origin, "a");
            assert_eq!(received, sent);
        }
    }

    #[test]
    fn an_instance_knows_its_own_events_without_decoding_them() {
        let payload = encode_event("node-\"1\"", &event(Change::Added(Number::Single(1))));
        assert!(published_by(payload.as_bytes(), "node-\"1\""));
        assert!(!published_by(payload.as_bytes(), "node-2"));
        assert!(!published_by(b"{", "node-2"));
        assert!(!published_by(b"{\"origin\":7}", "7"));
    }

    #[test]
    fn malformed_payloads_are_rejected_not_panicked_on() {
        let good = encode_event("a", &event(Change::Added(Number::Single(1))));
        let mut bad: Vec<String> = vec!["".into(), "null".into(), "[]".into(), "{".into()];
        for (from, to) in [
            ("\"value\":1", "\"value\":37"),
            ("\"kind\":\"add\"", "\"kind\":\"spin\""),
            ("\"key\":\"Рулетка 1\"", "\"key\":\"a/b\""),
            ("2024-05-01T10:00:00.123456789Z", "yesterday"),
            ("\"version\":7", "\"version\":-1"),
        ] {
            assert!(good.contains(from), "{from} not in {good}");
            bad.push(good.replace(from, to));
        }
        for payload in bad {
            assert!(
                decode_event(payload.as_bytes()).is_err(),
                "{payload} was accepted"
            );
        }
    }
}
