//! Code the examples and the walkthrough tests share; compiled into them only (`mod support;` in
//! an example, `#[path]` in a test), so the `switchyard` binary never depends on the `redis` crate.
// Each crate that includes this uses part of it.
#![allow(dead_code)]

pub mod redis_server;
pub mod redis_sessions;
pub mod story;
