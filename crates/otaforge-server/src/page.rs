//! Paged lists: every list the API and the pages serve comes in pages of at most 1,000 items
//! (100 unless asked), each with an opaque cursor for the next one. The cursor is the last
//! item's place in the list's order (keyset paging), so a page costs the same wherever it is
//! and rows added meanwhile are neither skipped nor repeated.

use axum::http::StatusCode;
use base64::Engine;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ApiResult};

/// Items per page when the request does not say.
pub const DEFAULT_LIMIT: i64 = 100;
/// The most a request may ask for.
pub const MAX_LIMIT: i64 = 1000;

/// One page of a list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last one.
    pub next: Option<String>,
    /// How many items the filters take in all (asked with `count=true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
}

impl<T> Page<T> {
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next: self.next,
            total: self.total,
        }
    }
}

/// The page size a request asks for: 1 to `MAX_LIMIT`.
pub fn limit(asked: Option<i64>) -> ApiResult<i64> {
    match asked {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("limit must be 1 to {MAX_LIMIT}, not {n}"),
        )),
    }
}

/// A cursor as the client sees it: the position, in base64url JSON.
pub fn encode<T: Serialize>(position: &T) -> String {
    let json = serde_json::to_vec(position).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

/// The position a cursor names; 422 for one this server did not give.
pub fn decode<T: DeserializeOwned>(cursor: Option<&str>) -> ApiResult<Option<T>> {
    let Some(cursor) = cursor.filter(|c| !c.is_empty()) else {
        return Ok(None);
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "cursor is not one this server gave for this list",
            )
        })
}

/// A page from up to `limit + 1` rows fetched: the extra row says there is a next page,
/// whose cursor is the position of the last row kept.
pub fn of<R, T, P: Serialize>(
    mut rows: Vec<R>,
    limit: i64,
    position: impl Fn(&R) -> P,
    item: impl FnMut(R) -> T,
) -> Page<T> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    let next = if more {
        rows.last().map(|r| encode(&position(r)))
    } else {
        None
    };
    Page {
        items: rows.into_iter().map(item).collect(),
        next,
        total: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_strangers_are_refused() {
        let c = encode(&(3i64, 42i64));
        assert_eq!(decode::<(i64, i64)>(Some(&c)).unwrap(), Some((3, 42)));
        assert_eq!(decode::<(i64, i64)>(None).unwrap(), None);
        for bad in ["!!", "bm90IGpzb24", &encode(&"text")] {
            let e = decode::<(i64, i64)>(Some(bad)).unwrap_err();
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        }
        assert_eq!(limit(None).unwrap(), DEFAULT_LIMIT);
        assert!(limit(Some(0)).is_err() && limit(Some(MAX_LIMIT + 1)).is_err());
    }

    #[test]
    fn a_page_knows_whether_another_follows() {
        let p = of(vec![1, 2, 3], 2, |r| *r, |r| r * 10);
        assert_eq!(p.items, vec![10, 20]);
        assert_eq!(decode::<i32>(p.next.as_deref()).unwrap(), Some(2));
        let last = of(vec![1, 2], 2, |r| *r, |r| r);
        assert!(last.next.is_none());
    }
}
