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
    /// The folder of a local store: its files are made readable by the owner only.
    root: Option<std::path::PathBuf>,
}

impl BlobStore {
    /// A blob store in a local folder, created if missing (owner-only, 0700). Temporary
    /// files of puts that a crash interrupted (`<blob>#<n>`) are removed.
    pub fn local(dir: &std::path::Path) -> Result<Self> {
        let io = |e: std::io::Error| object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(e),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        owner_only(dir, 0o700).map_err(io)?;
        let removed = remove_partial_puts(dir).map_err(io)?;
        if removed > 0 {
            tracing::info!(removed, "removed temporary files of interrupted uploads");
        }
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)?;
        Ok(BlobStore {
            inner: Arc::new(fs),
            root: Some(dir.to_path_buf()),
        })
    }

    /// The blob store a URL names: `s3://BUCKET[/PREFIX]?endpoint=URL&region=NAME` (an
    /// S3-compatible object store; credentials from `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`, an `http://` endpoint allowed for a store on a private
    /// network) or `file:///FOLDER` (a local folder). Several nodes share an S3 store.
    pub fn open_url(url: &str) -> Result<Self> {
        let invalid = |why: String| crate::StoreError::Invalid(format!("blob URL {url:?}: {why}"));
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err(invalid("a file:// URL names a folder".into()));
            }
            return Self::local(std::path::Path::new(path));
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(invalid(
                "use s3://BUCKET?endpoint=URL or file:///FOLDER".into(),
            ));
        };
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(invalid("no bucket named after s3://".into()));
        }
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            builder = match key {
                "endpoint" => {
                    let http = value.starts_with("http://");
                    if !http && !value.starts_with("https://") {
                        return Err(invalid(format!("endpoint {value:?} is not an http(s) URL")));
                    }
                    builder.with_endpoint(value).with_allow_http(http)
                }
                "region" => builder.with_region(value),
                other => {
                    return Err(invalid(format!(
                        "unknown setting {other:?} (known: endpoint, region)"
                    )));
                }
            };
        }
        let s3 = builder.build().map_err(|e| invalid(e.to_string()))?;
        let inner: Arc<dyn ObjectStore> = match prefix.trim_matches('/') {
            "" => Arc::new(s3),
            p => Arc::new(object_store::prefix::PrefixStore::new(s3, p)),
        };
        Ok(Self::new(inner))
    }

    /// Wraps any `object_store` backend.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        BlobStore { inner, root: None }
    }

    fn path(sha256: &str) -> Path {
        let prefix = sha256.get(..2).unwrap_or("xx");
        Path::from(format!("sha256/{prefix}/{sha256}"))
    }

    /// Stores `bytes` under `sha256` (which the caller computed over exactly these bytes).
    pub async fn put(&self, sha256: &str, bytes: Bytes) -> Result<()> {
        let path = Self::path(sha256);
        self.inner.put(&path, PutPayload::from(bytes)).await?;
        if let Some(root) = &self.root {
            let file = root.join(path.as_ref());
            owner_only(&file, 0o600).map_err(|e| object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(e),
            })?;
        }
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

/// Sets the permission bits of a file or folder (no-op off Unix).
pub fn owner_only(path: &std::path::Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Removes the staging files `object_store`'s local backend writes before its rename
/// (`<final name>#<n>`), left behind when the process died mid-put. Returns how many.
fn remove_partial_puts(dir: &std::path::Path) -> std::io::Result<usize> {
    let mut removed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if entry.file_name().to_string_lossy().contains('#') {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn interrupted_puts_are_cleaned_and_blobs_are_owner_only() {
        let dir = std::env::temp_dir().join(format!("otaforge-blob-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = BlobStore::local(&dir).unwrap();
        let sha = "ab".repeat(32);
        store
            .put(&sha, Bytes::from_static(b"firmware"))
            .await
            .unwrap();
        let blob = dir.join(format!("sha256/ab/{sha}"));
        let partial = dir.join(format!("sha256/ab/{sha}#3"));
        std::fs::write(&partial, b"half").unwrap();
        drop(store);
        let store = BlobStore::local(&dir).unwrap();
        assert!(!partial.exists(), "the partial put is gone");
        assert_eq!(&store.get(&sha).await.unwrap()[..], b"firmware");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode =
                |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&blob), 0o600);
            assert_eq!(mode(&dir), 0o700);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
