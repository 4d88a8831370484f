//! Domain types: the only shapes the rest of the server deals in.
//!
//! Raw JSON from clients is parsed into these types exactly once, at the edge
//! (HTTP extractors and WebSocket message parsing). Everything inside the server
//! can therefore assume a `Number` is on the wheel, a `RoomKey` is a valid key and
//! a `History` respects the configured length limit.

pub mod rules;

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};
use serde_json::Value;

/// Why a client-supplied value was rejected. The message is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("number must be an integer from 0 to 36 or the string \"00\"")]
    InvalidNumber,
    #[error("{0}")]
    InvalidKey(&'static str),
    #[error("history must be an array of numbers")]
    InvalidHistory,
    #[error("history may hold at most {max} numbers")]
    HistoryTooLong { max: usize },
    #[error("id must be a non-empty string of at most 64 characters")]
    InvalidMutationId,
    #[error("version must be a non-negative integer")]
    InvalidVersion,
}

/// One pocket of the wheel: 0..=36, or the American double zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Number {
    Single(u8),
    DoubleZero,
}

impl Number {
    /// Parses a JSON value: an integer 0..=36 (an integral float counts), or `"00"`.
    pub fn from_json(value: &Value) -> Result<Self, DomainError> {
        match value {
            Value::Number(n) => {
                let int = if let Some(i) = n.as_i64() {
                    Some(i)
                } else {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && (0.0..=36.0).contains(f))
                        .map(|f| f as i64)
                };
                match int {
                    Some(i @ 0..=36) => Ok(Number::Single(i as u8)),
                    _ => Err(DomainError::InvalidNumber),
                }
            }
            Value::String(s) if s == "00" => Ok(Number::DoubleZero),
            _ => Err(DomainError::InvalidNumber),
        }
    }

    /// The JSON value clients use for this number (`17` or `"00"`).
    pub fn to_json(self) -> Value {
        match self {
            Number::Single(n) => Value::from(n),
            Number::DoubleZero => Value::from("00"),
        }
    }
}

impl Serialize for Number {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Number::Single(n) => serializer.serialize_u8(*n),
            Number::DoubleZero => serializer.serialize_str("00"),
        }
    }
}

/// Longest key, in Unicode scalar values.
pub const MAX_KEY_CHARS: usize = 100;

/// A room's key: 1..=100 characters, no control characters, no `/`, not blank,
/// no surrounding whitespace, no bidirectional overrides or isolates, at least
/// one visible character, and not one of the route names.
///
/// Invisible-only keys (a zero-width space) and keys that reorder their own text
/// on screen (U+202E) make rooms that look empty or look like another room in
/// every list, the admin page included.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomKey(Arc<str>);

impl RoomKey {
    pub fn parse(raw: &str) -> Result<Self, DomainError> {
        let chars = raw.chars().count();
        if chars == 0 || raw.trim().is_empty() {
            return Err(DomainError::InvalidKey("key must not be empty or blank"));
        }
        if chars > MAX_KEY_CHARS {
            return Err(DomainError::InvalidKey(
                "key must be at most 100 characters",
            ));
        }
        if raw.trim() != raw {
            return Err(DomainError::InvalidKey(
                "key must not start or end with whitespace",
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err(DomainError::InvalidKey(
                "key must not contain control characters",
            ));
        }
        if raw.contains('/') {
            return Err(DomainError::InvalidKey("key must not contain '/'"));
        }
        if raw.chars().any(is_bidi_control) {
            return Err(DomainError::InvalidKey(
                "key must not contain bidirectional override or isolate characters",
            ));
        }
        if raw.chars().all(is_invisible) {
            return Err(DomainError::InvalidKey(
                "key must contain at least one visible character",
            ));
        }
        if raw == "sessions" || raw == "save" {
            return Err(DomainError::InvalidKey("key is a reserved name"));
        }
        Ok(RoomKey(raw.into()))
    }

    /// Parses a JSON value that must be a string key.
    pub fn from_json(value: &Value) -> Result<Self, DomainError> {
        match value {
            Value::String(s) => Self::parse(s),
            _ => Err(DomainError::InvalidKey("key must be a string")),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The explicit bidirectional formatting characters that override or isolate
/// (U+202A–U+202E, U+2066–U+2069): they change how the text around them is
/// shown. The implicit marks (LRM, RLM) only nudge neutral characters and are
/// left alone.
fn is_bidi_control(c: char) -> bool {
    use unicode_bidi::BidiClass::{FSI, LRE, LRI, LRO, PDF, PDI, RLE, RLI, RLO};
    // No ASCII character is one; most keys are ASCII, and the class lookup is
    // a binary search through the whole table.
    !c.is_ascii()
        && matches!(
            unicode_bidi::bidi_class(c),
            LRE | RLE | LRO | RLO | PDF | LRI | RLI | FSI | PDI
        )
}

/// Characters that draw nothing: whitespace, format characters (general
/// category Cf: U+00AD soft hyphen, U+200B zero-width space, U+2060 word
/// joiner, U+FEFF, ...), and the other default-ignorable code points that are
/// not Cf (combining grapheme joiner, Hangul fillers, variation selectors).
/// They are fine inside a key (a zero-width joiner inside an emoji sequence),
/// just not as all of it.
fn is_invisible(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    c.is_whitespace()
        || c.general_category() == GeneralCategory::Format
        || matches!(
            c,
            '\u{034F}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FFA0}'
                | '\u{E0100}'..='\u{E01EF}'
        )
}

impl fmt::Display for RoomKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for RoomKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// A room's spun numbers, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(transparent)]
pub struct History(Vec<Number>);

impl History {
    /// Parses a JSON array; one invalid element rejects the whole array.
    pub fn from_json(value: &Value, max: usize) -> Result<Self, DomainError> {
        let Value::Array(items) = value else {
            return Err(DomainError::InvalidHistory);
        };
        if items.len() > max {
            return Err(DomainError::HistoryTooLong { max });
        }
        items
            .iter()
            .map(Number::from_json)
            .collect::<Result<Vec<_>, _>>()
            .map(History)
    }

    /// Wraps numbers that were already validated (e.g. read back from the store).
    pub fn from_numbers(numbers: Vec<Number>) -> Self {
        History(numbers)
    }

    pub fn numbers(&self) -> &[Number] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Applies an already-committed event's change to this history.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Added(n) => self.0.push(*n),
            Change::Removed(i) => {
                if *i < self.0.len() {
                    self.0.remove(*i);
                }
            }
            Change::Replaced(h) => self.0 = h.0.clone(),
        }
    }

    /// Encodes the history for storage as a compact JSON array.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string(&self.0).unwrap_or_else(|_| "[]".to_owned())
    }

    /// Decodes a history the store wrote; invalid stored data is a store error.
    pub fn from_stored(raw: &str) -> Result<Self, DomainError> {
        let value: Value = serde_json::from_str(raw).map_err(|_| DomainError::InvalidHistory)?;
        History::from_json(&value, usize::MAX)
    }
}

/// A room's revision counter: 0 at creation, +1 per mutation.
///
/// Serialized as a plain JSON number. Raw numbers become versions only at the
/// edges: [`Version::from_json`] for what a client sends, [`Version::new`] for
/// the bus and the cache, [`Version::from_stored`] for a database column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
#[serde(transparent)]
pub struct Version(u64);

impl Version {
    /// The version of a room that was just created (or never was).
    pub const ZERO: Version = Version(0);

    /// A version read from a transport that carries it as an unsigned number.
    pub const fn new(raw: u64) -> Version {
        Version(raw)
    }

    /// The number itself, for logs and metrics.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The version after one more mutation. Saturates instead of overflowing:
    /// stored versions fit a BIGINT, so `u64::MAX` is never reached by counting.
    #[must_use]
    pub const fn next(self) -> Version {
        Version(self.0.saturating_add(1))
    }

    /// How many mutations lead from `earlier` to this version; 0 if `earlier`
    /// is not older (callers compare first, this only keeps it from underflowing).
    pub const fn since(self, earlier: Version) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// Parses a client's version: a non-negative integer (an integral float
    /// counts), or `null` for 0.
    pub fn from_json(value: &Value) -> Result<Self, DomainError> {
        match value {
            Value::Null => Ok(Version::ZERO),
            v => v
                .as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                        .map(|f| f as u64)
                })
                .map(Version)
                .ok_or(DomainError::InvalidVersion),
        }
    }

    /// Reads a version from a BIGINT column; a negative one is refused.
    pub fn from_stored(raw: i64) -> Result<Self, DomainError> {
        u64::try_from(raw)
            .map(Version)
            .map_err(|_| DomainError::InvalidVersion)
    }

    /// The value for a BIGINT column or parameter. Saturates at `i64::MAX`: only
    /// a client's claim can be larger, and it stays "ahead of every room".
    pub fn to_stored(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A client-chosen mutation id (up to 64 characters) that makes retries safe.
///
/// Only [`MutationId::parse`] makes one, so an id read back from the store or
/// the bus obeys the same rules as one a client sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct MutationId(String);

impl MutationId {
    /// The longest id, in characters (not bytes: clients count characters).
    pub const MAX_LEN: usize = 64;

    /// Accepts a non-empty string of at most [`Self::MAX_LEN`] characters.
    pub fn parse(raw: impl Into<String>) -> Result<Self, DomainError> {
        let raw = raw.into();
        if raw.is_empty() || raw.chars().count() > Self::MAX_LEN {
            return Err(DomainError::InvalidMutationId);
        }
        Ok(MutationId(raw))
    }

    /// Parses the `id` of a client's change: it must be a JSON string.
    pub fn from_json(value: &Value) -> Result<Self, DomainError> {
        match value {
            Value::String(s) => Self::parse(s.as_str()),
            _ => Err(DomainError::InvalidMutationId),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A requested change to a room's history, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added(Number),
    Removed(usize),
    Replaced(History),
}

impl Change {
    /// Short name used in the event log and in metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Added(_) => "add",
            Change::Removed(_) => "remove",
            Change::Replaced(_) => "replace",
        }
    }
}

/// A committed mutation: what every member of the room is told, in version order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomEvent {
    pub key: RoomKey,
    pub epoch: Arc<str>,
    pub version: Version,
    pub change: Change,
    pub mutation_id: Option<MutationId>,
    /// When the store committed it (for fan-out latency measurement).
    pub committed_at: DateTime<Utc>,
}

/// A room as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub id: i64,
    pub key: RoomKey,
    pub history: History,
    pub version: Version,
    pub epoch: Arc<str>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub protected: bool,
}

/// Makes a fresh epoch: an opaque string that changes whenever a room's history
/// can no longer be continued from an old version.
pub fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_follow_the_wheel() {
        for ok in [json!(0), json!(36), json!(15.0), json!("00")] {
            assert!(Number::from_json(&ok).is_ok(), "{ok} should parse");
        }
        for bad in [
            json!(37),
            json!(-1),
            json!(1.5),
            json!("15"),
            json!("0"),
            json!(null),
            json!(true),
            json!([]),
        ] {
            assert_eq!(Number::from_json(&bad), Err(DomainError::InvalidNumber));
        }
        assert_eq!(
            Number::from_json(&json!(15.0)).unwrap().to_json(),
            json!(15)
        );
    }

    #[test]
    fn keys_follow_the_rules() {
        for ok in ["table-1", "Рулетка", "a b", &"k".repeat(100)] {
            assert!(RoomKey::parse(ok).is_ok(), "{ok} should parse");
        }
        let long = "k".repeat(101);
        for bad in [
            "", "   ", "a/b", " x", "x ", "a\nb", &long, "sessions", "save",
        ] {
            assert!(RoomKey::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn invisible_keys_are_rejected() {
        let visible = "visible character";
        for bad in [
            "\u{200B}",
            "\u{2060}",
            "\u{FEFF}",
            "\u{00AD}",
            "\u{200B}\u{200C}\u{200D}\u{2060}",
            "\u{3164}\u{FE0F}",
        ] {
            let err = RoomKey::parse(bad).unwrap_err();
            assert!(err.to_string().contains(visible), "{bad:?}: {err}");
        }
        // Inside a key they are ordinary: emoji sequences use the joiner.
        for ok in [
            "a\u{200B}b",
            "👨\u{200D}👩\u{200D}👧",
            "soft\u{00AD}hyphen",
            "❤\u{FE0F}",
        ] {
            assert!(RoomKey::parse(ok).is_ok(), "{ok:?} should parse");
        }
    }

    #[test]
    fn bidi_overrides_and_isolates_are_rejected() {
        for c in ('\u{202A}'..='\u{202E}').chain('\u{2066}'..='\u{2069}') {
            let err = RoomKey::parse(&format!("room{c}1")).unwrap_err();
            assert!(err.to_string().contains("bidirectional"), "{c:?}: {err}");
        }
        // Right-to-left scripts and the implicit marks are fine.
        for ok in ["שולחן 1", "طاولة", "a\u{200F}b"] {
            assert!(RoomKey::parse(ok).is_ok(), "{ok:?} should parse");
        }
    }

    #[test]
    fn history_is_all_or_nothing() {
        assert_eq!(
            History::from_json(&json!([1, "00", 36]), 10).unwrap().len(),
            3
        );
        assert!(History::from_json(&json!([1, 37]), 10).is_err());
        assert_eq!(
            History::from_json(&json!([1, 2, 3]), 2),
            Err(DomainError::HistoryTooLong { max: 2 })
        );
        let h = History::from_json(&json!([5, "00"]), 10).unwrap();
        assert_eq!(History::from_stored(&h.to_json_string()).unwrap(), h);
    }

    #[test]
    fn mutation_ids_are_one_to_sixty_four_characters() {
        for ok in ["a", "m-1", &"x".repeat(64), &"é".repeat(64)] {
            assert_eq!(MutationId::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["", &"x".repeat(65), &"é".repeat(65)] {
            assert_eq!(MutationId::parse(bad), Err(DomainError::InvalidMutationId));
        }
        assert!(MutationId::from_json(&json!("id-7")).is_ok());
        for bad in [json!(7), json!(null), json!(["a"]), json!("")] {
            assert_eq!(
                MutationId::from_json(&bad),
                Err(DomainError::InvalidMutationId)
            );
        }
    }

    #[test]
    fn versions_count_mutations() {
        assert_eq!(Version::default(), Version::ZERO);
        assert_eq!(Version::ZERO.get(), 0);
        assert_eq!(Version::ZERO.next(), Version::new(1));
        assert_eq!(Version::new(41).next().get(), 42);
        assert_eq!(Version::new(u64::MAX).next(), Version::new(u64::MAX));
        assert!(Version::new(3) < Version::new(3).next());
        assert_eq!(Version::new(7).since(Version::new(3)), 4);
        assert_eq!(Version::new(3).since(Version::new(7)), 0);
        assert_eq!(Version::new(12).to_string(), "12");
    }

    #[test]
    fn stored_versions_are_never_negative() {
        assert_eq!(Version::from_stored(0), Ok(Version::ZERO));
        assert_eq!(
            Version::from_stored(i64::MAX).unwrap().get(),
            i64::MAX as u64
        );
        assert_eq!(Version::from_stored(-1), Err(DomainError::InvalidVersion));
        assert_eq!(
            Version::from_stored(i64::MIN),
            Err(DomainError::InvalidVersion)
        );
        for raw in [0, 1, 25_000, i64::MAX] {
            assert_eq!(Version::from_stored(raw).unwrap().to_stored(), raw);
        }
        // Only a client's claim can exceed a BIGINT; it stays the largest.
        assert_eq!(Version::new(u64::MAX).to_stored(), i64::MAX);
    }

    #[test]
    fn versions_serialize_as_plain_numbers() {
        assert_eq!(serde_json::to_string(&Version::new(7)).unwrap(), "7");
        assert_eq!(
            json!({"version": Version::ZERO.next()}),
            json!({"version": 1})
        );
    }

    #[test]
    fn client_versions_are_non_negative_integers() {
        for (raw, expected) in [
            (json!(0), 0),
            (json!(12), 12),
            (json!(12.0), 12),
            (json!(null), 0),
            (json!(u64::MAX), u64::MAX),
        ] {
            assert_eq!(
                Version::from_json(&raw),
                Ok(Version::new(expected)),
                "{raw}"
            );
        }
        for bad in [
            json!(-1),
            json!(1.5),
            json!(-2.0),
            json!("3"),
            json!(true),
            json!([]),
        ] {
            assert_eq!(
                Version::from_json(&bad),
                Err(DomainError::InvalidVersion),
                "{bad}"
            );
        }
    }
}
