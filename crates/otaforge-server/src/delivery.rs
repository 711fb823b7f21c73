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

impl<'a> Delivery<'a> {
    /// A firmware's bytes under `filename`.
    pub fn of(firmware: &'a otaforge_store::model::Firmware, filename: &'a str) -> Self {
        Delivery {
            md5: &firmware.md5,
            version: &firmware.version,
            sha256: &firmware.sha256,
            filename,
        }
    }
}

/// Bytes of a file, as a request asked for them.
#[derive(Debug, Clone)]
pub enum Part {
    /// No body wanted (`HEAD`): length and headers only.
    Head,
    Whole(Bytes),
    Range {
        start: u64,
        end: u64,
        bytes: Bytes,
    },
    Unsatisfiable,
}

impl Part {
    /// The part of `body` the `Range` header asks for (parsed here, once).
    pub fn cut(range_header: Option<&str>, body: Bytes) -> ApiResult<Part> {
        let len = body.len() as u64;
        match range::parse(range_header, len).map_err(ApiError::bad_request)? {
            RangeRequest::Full => Ok(Part::Whole(body)),
            RangeRequest::Partial { start, end } => Ok(Part::Range {
                start,
                end,
                bytes: body.slice(start as usize..=end as usize),
            }),
            RangeRequest::Unsatisfiable => Ok(Part::Unsatisfiable),
        }
    }

    /// Whether this answer carries the file's last byte (the download is then complete,
    /// from the server's side).
    pub fn ends_file(&self, len: u64) -> bool {
        match self {
            Part::Whole(_) => true,
            Part::Range { end, .. } => end + 1 == len,
            Part::Head | Part::Unsatisfiable => false,
        }
    }
}

/// The `Range` header of a request, which must be ASCII.
pub fn range_header(request: &HeaderMap) -> ApiResult<Option<&str>> {
    match request.get(header::RANGE) {
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::bad_request("the Range header is not ASCII")),
        None => Ok(None),
    }
}

/// The response for a part of a file of `len` bytes: `Content-Length` always.
pub fn render(part: Part, len: u64, meta: &Delivery) -> Response {
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
    match part {
        Part::Head => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            (StatusCode::OK, headers, Body::empty()).into_response()
        }
        Part::Whole(body) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            (StatusCode::OK, headers, Body::from(body)).into_response()
        }
        Part::Range { start, end, bytes } => {
            headers.insert(
                header::CONTENT_LENGTH,
                HeaderValue::from(bytes.len() as u64),
            );
            headers.insert(
                header::CONTENT_RANGE,
                text(&format!("bytes {start}-{end}/{len}")),
            );
            (StatusCode::PARTIAL_CONTENT, headers, Body::from(bytes)).into_response()
        }
        Part::Unsatisfiable => {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_RANGE, text(&format!("bytes */{len}")));
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            (
                StatusCode::RANGE_NOT_SATISFIABLE,
                headers,
                format!("range not satisfiable: the file has {len} bytes\n"),
            )
                .into_response()
        }
    }
}
