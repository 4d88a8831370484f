//! Fuzzes the WebSocket protocol of a live room: random and mutated frames in
//! every dialect, well-formed and not, for a bounded number of iterations.
//!
//! Every frame the fuzzer sends is either a valid `add` (with a unique mutation
//! id, so it can be recognised) or broken by construction: wrong JSON, wrong
//! types, invalid numbers and keys, out-of-range indexes, unknown types,
//! binary frames. The property: the room's history is exactly the valid adds,
//! in order — nothing else ever changed it — an observer saw exactly those
//! events, the server never failed (no `internal` error, no close other than
//! the ones a protocol breach calls for), and it keeps serving.

mod support;

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use support::app::{TestServer, WsClient, WsEvent};
use tokio_tungstenite::tungstenite::Message;

const ITERATIONS: usize = 2500;
const KEY: &str = "fuzzed-table";

/// A frame the fuzzer sends, and whether it is a valid add (its number).
struct Case {
    message: Message,
    valid_add: Option<Value>,
}

fn valid_number(rng: &mut StdRng) -> Value {
    if rng.random_ratio(1, 20) {
        json!("00")
    } else {
        json!(rng.random_range(0..=36))
    }
}

fn pick(rng: &mut StdRng, values: &[Value]) -> Value {
    values.choose(rng).cloned().unwrap_or_default()
}

/// A JSON value of any kind, small.
fn junk(rng: &mut StdRng, depth: u8) -> Value {
    match rng.random_range(0..9) {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 => json!(rng.random_range(-1_000_000i64..1_000_000)),
        3 => json!(rng.random::<f64>() * 1e6 - 5e5),
        4 => json!(["", "00", "0", "15", "a/b", " x", "\u{202e}", "sessions"].choose(rng)),
        5 => json!(u64::MAX),
        6 if depth > 0 => json!([junk(rng, depth - 1), junk(rng, depth - 1)]),
        7 if depth > 0 => json!({"type": junk(rng, depth - 1), "key": junk(rng, depth - 1)}),
        _ => json!("x".repeat(rng.random_range(0..300))),
    }
}

/// A message that must be refused: a well-formed message of some dialect with
/// one field broken, or no message at all.
fn broken(rng: &mut StdRng) -> Message {
    let types = [
        "join",
        "add",
        "remove",
        "update",
        "getHistory",
        "saveNumber",
        "updateHistory",
        "leave",
        "ping",
        "dance",
        "",
    ];
    let mut message = json!({"type": types.choose(rng)});
    let field = [
        "key", "number", "index", "history", "version", "token", "id", "type",
    ]
    .choose(rng)
    .copied()
    .unwrap_or("key");
    message[field] = match field {
        "number" => pick(
            rng,
            &[
                json!(37),
                json!(-1),
                json!(1.5),
                json!("15"),
                json!("0"),
                json!(null),
                json!(true),
                json!([]),
                json!({}),
            ],
        ),
        "key" => pick(
            rng,
            &[
                json!(""),
                json!("a/b"),
                json!(" x"),
                json!("x "),
                json!("\u{0007}"),
                json!("\u{200b}"),
                json!("k".repeat(101)),
            ],
        ),
        "index" => pick(
            rng,
            &[
                json!(-1),
                json!(1.5),
                json!("0"),
                json!(null),
                json!(1_000_000_000u64),
                json!(u64::MAX),
            ],
        ),
        "history" => pick(
            rng,
            &[json!([37]), json!("1,2"), json!([1, null]), json!({})],
        ),
        "id" => pick(rng, &[json!(""), json!("i".repeat(65)), json!(7)]),
        _ => junk(rng, 2),
    };
    // Mutations aimed at another room must fail too: this socket never joins it.
    if rng.random_ratio(1, 4) && message["key"].is_null() {
        message["key"] = json!("never-joined-room");
        message["number"] = valid_number(rng);
        message["type"] = json!("add");
        return Message::text(message.to_string());
    }
    let text = message.to_string();
    match rng.random_range(0..6) {
        // Truncated, so it is not JSON at all.
        0 if text.chars().count() > 2 => {
            let keep = rng.random_range(1..text.chars().count() - 1);
            Message::text(text.chars().take(keep).collect::<String>())
        }
        1 => Message::binary(text.into_bytes()),
        2 => Message::text(junk(rng, 3).to_string()),
        _ => Message::text(text),
    }
}

fn case(rng: &mut StdRng, n: usize) -> Case {
    if rng.random_ratio(1, 3) {
        let number = valid_number(rng);
        let dialect = rng.random_range(0..2);
        let message = if dialect == 0 {
            json!({"type": "add", "key": KEY, "number": number, "id": format!("fuzz-{n}")})
        } else {
            json!({"type": "saveNumber", "key": KEY, "number": number, "id": format!("fuzz-{n}")})
        };
        Case {
            message: Message::text(message.to_string()),
            valid_add: Some(number),
        }
    } else {
        let message = broken(rng);
        // A broken message whose key happens to be the room and is otherwise a
        // valid add cannot be produced: `broken` always breaks one field of a
        // message, and an add to the joined room is built only above.
        Case {
            message,
            valid_add: None,
        }
    }
}

async fn joined(server: &TestServer) -> WsClient {
    let mut ws = server.ws().await;
    ws.send(json!({"type": "join", "key": KEY, "version": 0}))
        .await;
    assert_eq!(ws.recv().await["type"], "sync");
    ws
}

#[tokio::test]
async fn random_and_mutated_frames_change_the_room_only_through_valid_adds() {
    let server =
        TestServer::start(&[("WS_RATE_LIMIT", "100000"), ("WS_RATE_BURST", "100000")]).await;
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut observer = joined(&server).await;
    let mut fuzzer = joined(&server).await;

    let mut expected: Vec<Value> = Vec::new();
    let mut pending_ids: Vec<String> = Vec::new();
    for n in 0..ITERATIONS {
        let case = case(&mut rng, n);
        if let Some(number) = case.valid_add {
            expected.push(number);
            pending_ids.push(format!("fuzz-{n}"));
        }
        fuzzer.send_raw(case.message).await;
        // Drain what the fuzzer's socket was sent so its queue never fills;
        // nothing it receives may be an internal failure.
        while let Ok(event) =
            tokio::time::timeout(Duration::ZERO, fuzzer.next_within(Duration::from_secs(10))).await
        {
            match event {
                WsEvent::Json(frame) => {
                    assert_ne!(frame["code"], "internal", "seed {seed}: {frame}")
                }
                WsEvent::Closed(code) => {
                    panic!("seed {seed}: the fuzzer's socket closed ({code:?})")
                }
            }
        }
    }

    // The observer sees exactly the valid adds, in order, each once.
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let frame = observer.recv().await;
        assert_eq!(frame["type"], "add", "seed {seed}: unexpected {frame}");
        assert_eq!(frame["version"], json!(seen.len() + 1), "seed {seed}");
        assert_eq!(frame["id"], json!(pending_ids[seen.len()]), "seed {seed}");
        seen.push(frame["number"].clone());
    }
    observer.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(seen, expected, "seed {seed}");

    let (history, version) = server.room(KEY).await;
    assert_eq!(
        history,
        json!(expected),
        "seed {seed}: the store holds only the valid adds"
    );
    assert_eq!(version as usize, expected.len());
    let (_, listing) = server.get("/api/roulette/sessions").await;
    assert_eq!(
        listing["total"], 1,
        "seed {seed}: no other room was created"
    );
    server.assert_healthy().await;
}
