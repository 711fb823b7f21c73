//! Sending firmware bytes: an in-memory cache of hot blobs and the response builder
//! shared by every device dialect (Content-Length always, `Range` → 206/416, `x-MD5`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use otaforge_store::BlobStore;

use crate::error::{ApiError, ApiResult};
use crate::range::{self, RangeRequest};

/// Blobs kept in memory, oldest evicted first once over the byte budget. Keys are SHA-256
/// digests, so an entry never goes stale.
pub struct BlobCache {
    budget: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    bytes: usize,
    map: HashMap<String, Bytes>,
    order: VecDeque<String>,
}

impl BlobCache {
    pub fn new(budget: usize) -> Self {
        BlobCache {
            budget,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    pub async fn get(&self, blobs: &BlobStore, sha256: &str) -> ApiResult<Bytes> {
        if let Some(hit) = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .get(sha256)
        {
            return Ok(hit.clone());
        }
        let bytes = blobs
            .get(sha256)
            .await
            .map_err(|e| ApiError::internal("reading a blob", e))?;
        self.insert(sha256, bytes.clone());
        Ok(bytes)
    }

    pub fn insert(&self, sha256: &str, bytes: Bytes) {
        if bytes.len() > self.budget {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.map.contains_key(sha256) {
            return;
        }
        while inner.bytes + bytes.len() > self.budget {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(gone) = inner.map.remove(&oldest) {
                inner.bytes -= gone.len();
            }
        }
        inner.bytes += bytes.len();
        inner.order.push_back(sha256.to_string());
        inner.map.insert(sha256.to_string(), bytes);
    }
}

/// What to say about the bytes besides their length.
pub struct Delivery<'a> {
    pub md5: &'a str,
    pub version: &'a str,
    pub sha256: &'a str,
    pub filename: &'a str,
}

/// Whether the answer to this request will carry the body's last byte (the download is then
/// complete, from the server's side).
pub fn serves_last_byte(request: &HeaderMap, len: u64) -> bool {
    let header = request.get(header::RANGE).and_then(|v| v.to_str().ok());
    match range::parse(header, len) {
        Ok(RangeRequest::Full) => true,
        Ok(RangeRequest::Partial { end, .. }) => end + 1 == len,
        _ => false,
    }
}

/// A 200 with the whole body, a 206 with the requested range, or 416.
pub fn respond(request: &HeaderMap, body: Bytes, meta: &Delivery) -> ApiResult<Response> {
    let len = body.len() as u64;
    let range_header = match request.get(header::RANGE) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::bad_request("the Range header is not ASCII"))?,
        ),
        None => None,
    };
    let wanted = range::parse(range_header, len).map_err(ApiError::bad_request)?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let text = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""));
    headers.insert("x-md5", text(meta.md5));
    headers.insert("x-version", text(meta.version));
    headers.insert(header::ETAG, text(&format!("\"{}\"", meta.sha256)));
    headers.insert(
        header::CONTENT_DISPOSITION,
        text(&format!(
            "attachment; filename=\"{}\"",
            meta.filename.replace('"', "")
        )),
    );
    match wanted {
        RangeRequest::Full => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            Ok((StatusCode::OK, headers, Body::from(body)).into_response())
        }
        RangeRequest::Partial { start, end } => {
            let part = body.slice(start as usize..=end as usize);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(part.len() as u64));
            headers.insert(
                header::CONTENT_RANGE,
                text(&format!("bytes {start}-{end}/{len}")),
            );
            Ok((StatusCode::PARTIAL_CONTENT, headers, Body::from(part)).into_response())
        }
        RangeRequest::Unsatisfiable => {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_RANGE, text(&format!("bytes */{len}")));
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                headers,
                format!("range not satisfiable: the file has {len} bytes\n"),
            )
                .into_response())
        }
    }
}
