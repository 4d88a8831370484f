//! Redis bus (cluster mode). Being written; see the bus seam in `mod.rs`.
