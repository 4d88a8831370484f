//! Client → server messages, parsed once into domain types. A message that does
//! not parse becomes a [`WsError`] with a machine code and a sentence; the
//! connection stays open.

use serde_json::{Map, Value};

use crate::domain::{DomainError, History, MutationId, Number, RoomKey, Version};

/// An error frame's `code` and `error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsError {
    pub code: &'static str,
    pub message: String,
}

impl WsError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        WsError {
            code,
            message: message.into(),
        }
    }
}

impl From<DomainError> for WsError {
    fn from(err: DomainError) -> Self {
        let code = match err {
            DomainError::InvalidNumber => "invalid_number",
            DomainError::InvalidKey(_) => "invalid_key",
            DomainError::InvalidHistory => "invalid_history",
            DomainError::HistoryTooLong { .. } => "history_too_long",
            DomainError::InvalidMutationId => "invalid_id",
            DomainError::InvalidVersion => "invalid_version",
        };
        WsError::new(code, err.to_string())
    }
}

/// Where a membership's room and dialect come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Join {
        key: RoomKey,
        token: Option<String>,
        version: Option<Version>,
        epoch: Option<String>,
    },
    Add {
        key: Option<RoomKey>,
        number: Number,
        token: Option<String>,
        id: Option<MutationId>,
    },
    Remove {
        key: Option<RoomKey>,
        index: usize,
        token: Option<String>,
        id: Option<MutationId>,
    },
    Update {
        key: Option<RoomKey>,
        history: History,
        token: Option<String>,
        id: Option<MutationId>,
    },
    GetHistory {
        key: RoomKey,
        token: Option<String>,
    },
    SaveNumber {
        key: RoomKey,
        number: Number,
        token: Option<String>,
        id: Option<MutationId>,
    },
    UpdateHistory {
        key: RoomKey,
        history: History,
        token: Option<String>,
        id: Option<MutationId>,
    },
    Leave {
        key: RoomKey,
    },
    Ping,
}

impl ClientMessage {
    /// The `type` for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMessage::Join { .. } => "join",
            ClientMessage::Add { .. } => "add",
            ClientMessage::Remove { .. } => "remove",
            ClientMessage::Update { .. } => "update",
            ClientMessage::GetHistory { .. } => "getHistory",
            ClientMessage::SaveNumber { .. } => "saveNumber",
            ClientMessage::UpdateHistory { .. } => "updateHistory",
            ClientMessage::Leave { .. } => "leave",
            ClientMessage::Ping => "ping",
        }
    }
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn required(&self, name: &str, code: &'static str) -> Result<&Value, WsError> {
        self.0
            .get(name)
            .ok_or_else(|| WsError::new(code, format!("missing field \"{name}\"")))
    }

    fn key(&self) -> Result<RoomKey, WsError> {
        Ok(RoomKey::from_json(self.required("key", "invalid_key")?)?)
    }

    fn optional_key(&self) -> Result<Option<RoomKey>, WsError> {
        match self.0.get("key") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Ok(Some(RoomKey::from_json(v)?)),
        }
    }

    fn number(&self) -> Result<Number, WsError> {
        Ok(Number::from_json(
            self.required("number", "invalid_number")?,
        )?)
    }

    fn history(&self, max: usize) -> Result<History, WsError> {
        Ok(History::from_json(
            self.required("history", "invalid_history")?,
            max,
        )?)
    }

    fn string(&self, name: &str, code: &'static str) -> Result<Option<String>, WsError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(WsError::new(code, format!("\"{name}\" must be a string"))),
        }
    }

    fn token(&self) -> Result<Option<String>, WsError> {
        self.string("token", "invalid_token")
    }

    fn id(&self) -> Result<Option<MutationId>, WsError> {
        match self.0.get("id") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Ok(Some(MutationId::from_json(v)?)),
        }
    }

    /// `version`: present (even 0 or null) selects dialect v2.
    fn version(&self) -> Result<Option<Version>, WsError> {
        self.0
            .get("version")
            .map(|v| Version::from_json(v).map_err(WsError::from))
            .transpose()
    }

    fn index(&self) -> Result<usize, WsError> {
        let value = self.required("index", "invalid_index")?;
        value
            .as_u64()
            .or_else(|| {
                value
                    .as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                    .map(|f| f as u64)
            })
            .map(|i| i as usize)
            .ok_or_else(|| WsError::new("invalid_index", "index must be a non-negative integer"))
    }
}

/// Parses one text frame.
pub fn parse(text: &str, max_history: usize) -> Result<ClientMessage, WsError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|_| WsError::new("invalid_json", "message is not valid JSON"))?;
    let Value::Object(map) = value else {
        return Err(WsError::new(
            "invalid_json",
            "message must be a JSON object",
        ));
    };
    let fields = Fields(&map);
    let kind = match map.get("type") {
        Some(Value::String(t)) => t.as_str(),
        _ => {
            return Err(WsError::new(
                "unknown_type",
                "message needs a string \"type\"",
            ));
        }
    };
    Ok(match kind {
        "join" => ClientMessage::Join {
            key: fields.key()?,
            token: fields.token()?,
            version: fields.version()?,
            epoch: fields.string("epoch", "invalid_epoch")?,
        },
        "add" => ClientMessage::Add {
            key: fields.optional_key()?,
            number: fields.number()?,
            token: fields.token()?,
            id: fields.id()?,
        },
        "remove" => ClientMessage::Remove {
            key: fields.optional_key()?,
            index: fields.index()?,
            token: fields.token()?,
            id: fields.id()?,
        },
        "update" => ClientMessage::Update {
            key: fields.optional_key()?,
            history: fields.history(max_history)?,
            token: fields.token()?,
            id: fields.id()?,
        },
        "getHistory" => ClientMessage::GetHistory {
            key: fields.key()?,
            token: fields.token()?,
        },
        "saveNumber" => ClientMessage::SaveNumber {
            key: fields.key()?,
            number: fields.number()?,
            token: fields.token()?,
            id: fields.id()?,
        },
        "updateHistory" => ClientMessage::UpdateHistory {
            key: fields.key()?,
            history: fields.history(max_history)?,
            token: fields.token()?,
            id: fields.id()?,
        },
        "leave" => ClientMessage::Leave { key: fields.key()? },
        "ping" => ClientMessage::Ping,
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(WsError::new(
                "unknown_type",
                format!("unknown message type \"{shown}\""),
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_presence_selects_the_dialect() {
        let v1 = parse(r#"{"type":"join","key":"a"}"#, 10).unwrap();
        let v2 = parse(r#"{"type":"join","key":"a","version":0}"#, 10).unwrap();
        assert!(matches!(v1, ClientMessage::Join { version: None, .. }));
        assert!(matches!(
            v2,
            ClientMessage::Join {
                version: Some(Version::ZERO),
                ..
            }
        ));
        let resume = parse(r#"{"type":"join","key":"a","version":12.0}"#, 10).unwrap();
        assert!(matches!(
            resume,
            ClientMessage::Join { version: Some(v), .. } if v == Version::new(12)
        ));
    }

    #[test]
    fn bad_messages_get_codes() {
        let code = |text: &str| parse(text, 3).unwrap_err().code;
        assert_eq!(code("nope"), "invalid_json");
        assert_eq!(code("[1]"), "invalid_json");
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"add","number":37}"#), "invalid_number");
        assert_eq!(code(r#"{"type":"add","number":"15"}"#), "invalid_number");
        assert_eq!(code(r#"{"type":"join","key":"a/b"}"#), "invalid_key");
        assert_eq!(
            code(r#"{"type":"join","key":"a","version":-1}"#),
            "invalid_version"
        );
        assert_eq!(
            code(r#"{"type":"update","history":[1,2,3,4]}"#),
            "history_too_long"
        );
        assert_eq!(code(r#"{"type":"remove","index":-1}"#), "invalid_index");
    }
}
