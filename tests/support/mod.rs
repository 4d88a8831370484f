//! Test support shared by the integration tests: real servers only (the
//! croupier binary, PostgreSQL, Redis), each on free loopback ports in
//! temporary directories, stopped when dropped.
#![allow(dead_code)]

pub mod app;
pub mod cluster;
pub mod exposition;
pub mod nginx;
pub mod ops;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod redis;
pub mod redis_ha;
pub mod tls;
