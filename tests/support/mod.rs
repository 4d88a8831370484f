//! Test support shared by the integration tests: real servers only (the
//! croupier binary, PostgreSQL, Redis, Nginx, Prometheus), each on loopback in
//! a temporary directory and stopped when dropped (`app`, `cluster`, ...); the
//! contract tables (`contract`), the background room members of the cluster
//! tests (`members`), and the polling helper that replaces fixed sleeps
//! (`wait`).
#![allow(dead_code)]

pub mod app;
pub mod cluster;
pub mod contract;
pub mod exposition;
pub mod members;
pub mod nginx;
pub mod ops;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod redis;
pub mod redis_ha;
pub mod tls;
pub mod wait;
