//! Storage of the fleet: the `Store` trait, its SQLite and PostgreSQL backends, and the
//! content-addressed blob store. Only this crate talks SQL.

#![forbid(unsafe_code)]

mod blob;
mod error;
pub use otaforge_domain::model;
mod sql;
mod store;

use std::sync::Arc;

pub use blob::{BlobStore, owner_only};
pub use error::{Result, StoreError};
pub use sql::{PgStore, SqliteStore};
pub use store::Store;

/// Opens the store named by a database URL: `sqlite://PATH` (or `sqlite:PATH`) or
/// `postgres://...` / `postgresql://...`. Any other scheme is refused.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(PgStore::open(url).await?));
    }
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        let path = path.split('?').next().unwrap_or(path);
        if path.is_empty() {
            return Err(StoreError::UnsupportedUrl(url.to_string()));
        }
        let path = std::path::Path::new(path);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Invalid(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        return Ok(Arc::new(SqliteStore::open(path).await?));
    }
    Err(StoreError::UnsupportedUrl(url.to_string()))
}
