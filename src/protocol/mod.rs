//! The wire protocol of the WebSocket endpoint, shared by the hub (which renders
//! room events once per dialect) and the connection sessions (which parse what
//! clients send): client messages and server frames of the three dialects.

pub mod frames;
pub mod messages;
