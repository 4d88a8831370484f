//! PostgreSQL backend (cluster mode). Being written; see the store seam in `mod.rs`.
