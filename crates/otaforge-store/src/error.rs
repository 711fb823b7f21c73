//! The storage error type.

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named thing does not exist (or is not visible under the given parent).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The change would break a rule of the model (a duplicate name, an assigned firmware...).
    #[error("{0}")]
    Conflict(String),
    /// A value the database refused or returned that the model cannot hold.
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("blob store error: {0}")]
    Blob(#[from] object_store::Error),
    #[error("unsupported database url {0:?}: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
