//! The fleet's domain, pure: the records every layer shares (`model`), the update decision
//! every device dialect reaches (`decision`), and rollout planning and gate verdicts
//! (`rollout_plan`). No I/O, no database, no HTTP: plain functions over plain data, testable
//! without a server.

#![forbid(unsafe_code)]

pub mod decision;
pub mod model;
pub mod rollout_plan;
