//! croupier: a realtime backend for shared roulette rooms.
//!
//! The module tree follows the architecture: `domain` types parsed once at the
//! edge; the `store` seam (SQLite, PostgreSQL) and the `bus` seam (in-process,
//! Redis); the `hub` that keeps each room's local members in version order; the
//! `ws` protocol and the `http` API on top; `startup` wires them together.

pub mod auth;
pub mod bus;
pub mod config;
pub mod domain;
pub mod files;
pub mod http;
pub mod hub;
pub mod protocol;
pub mod quota;
pub mod redis_layout;
pub mod rooms;
pub mod startup;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod ws;
