//! The server's rules, made once: the check-in pipeline every device dialect calls, the
//! password guard every sign-in calls, and the fleet operations the REST API, the pages and
//! the CLI call. Nothing here knows axum; the edges (`device`, `api`, `web`) translate.

pub mod accounts;
pub mod bulk;
pub mod checkin;
pub mod device_auth;
pub mod firmware;
pub mod fleet;
pub mod passwords;
pub mod signatures;
pub mod sketch;
