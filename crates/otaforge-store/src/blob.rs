//! The blob store: firmware images and resource files, content-addressed by SHA-256,
//! behind `object_store` (a local folder by default).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};

use crate::error::Result;

/// Blobs keyed by the lowercase hex SHA-256 of their bytes. A put is atomic (the local
/// backend writes a temporary file and renames it), so a crash never leaves half a blob
/// under its final key.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
}

impl BlobStore {
    /// A blob store in a local folder, created if missing.
    pub fn local(dir: &std::path::Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(e),
        })?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)?;
        Ok(BlobStore {
            inner: Arc::new(fs),
        })
    }

    /// Wraps any `object_store` backend.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        BlobStore { inner }
    }

    fn path(sha256: &str) -> Path {
        let prefix = sha256.get(..2).unwrap_or("xx");
        Path::from(format!("sha256/{prefix}/{sha256}"))
    }

    /// Stores `bytes` under `sha256` (which the caller computed over exactly these bytes).
    pub async fn put(&self, sha256: &str, bytes: Bytes) -> Result<()> {
        self.inner
            .put(&Self::path(sha256), PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    pub async fn get(&self, sha256: &str) -> Result<Bytes> {
        Ok(self.inner.get(&Self::path(sha256)).await?.bytes().await?)
    }

    pub async fn get_range(&self, sha256: &str, range: Range<u64>) -> Result<Bytes> {
        Ok(self.inner.get_range(&Self::path(sha256), range).await?)
    }

    /// Deletes the blob; a missing blob is not an error.
    pub async fn delete(&self, sha256: &str) -> Result<()> {
        match self.inner.delete(&Self::path(sha256)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
