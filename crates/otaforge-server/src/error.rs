//! The one error type of the HTTP layer: a status and a message safe to show clients.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use otaforge_store::StoreError;

/// An error answered to a client. Internal details (database, I/O) are logged, never sent.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// What really happened, for the log only (internal errors).
    detail: Option<String>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            detail: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    /// An internal error: clients see only that it happened; the log gets what it was, once,
    /// where the response is made (`log`).
    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the server log",
        );
        e.detail = Some(format!("{context}: {err}"));
        e
    }

    /// The client's message, for places that answer with text of their own (a build log);
    /// what is behind it is logged here.
    pub fn into_message(self) -> String {
        self.log();
        self.message
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            StoreError::Conflict(msg) => ApiError::new(StatusCode::CONFLICT, msg),
            other => ApiError::internal("storage", other),
        }
    }
}

impl ApiError {
    /// Logs the error once, where its response is made.
    pub fn log(&self) {
        if let Some(detail) = &self.detail {
            tracing::error!(status = %self.status, error = %detail, "request failed");
        } else if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, message = %self.message, "request refused");
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let mut response = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
