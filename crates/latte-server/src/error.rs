//! [`ApiError`]: every failure a client sees, as a status code and the JSON body
//! `{"error": {"code", "message"}}` (plus `Retry-After` on 503).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The JSON body of every error response.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong: a stable machine-readable code and a message for people.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code, e.g. `invalid_request`, `not_found`, `overloaded`.
    pub code: String,
    /// What was expected and what was got.
    pub message: String,
}

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// Message.
    pub message: String,
    /// Seconds for `Retry-After` (503 only).
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 `invalid_request`: a field has a value the server cannot use.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409 `conflict`.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(code: &'static str, message: impl Into<String>, retry_after: u32) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// 500 `internal`: a failure of the server, not of the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The code used for a bare status (errors produced outside the handlers: unknown route, wrong method).
    pub fn code_for(status: StatusCode) -> &'static str {
        match status {
            StatusCode::BAD_REQUEST => "invalid_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::CONFLICT => "conflict",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            s if s.is_client_error() => "invalid_request",
            _ => "internal",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}

impl From<latte_index::Error> for ApiError {
    fn from(e: latte_index::Error) -> Self {
        use latte_index::Error as E;
        let message = e.to_string();
        match e {
            E::InvalidArgument(_)
            | E::DimensionMismatch { .. }
            | E::Shape(_)
            | E::EmptyDocument(_)
            | E::Core(_)
            | E::Fusion(_) => Self::invalid(message),
            E::DuplicateId(_) => Self::conflict("duplicate_id", message),
            E::UnknownIds(_) => Self::not_found(message),
            E::Locked { .. } => Self::conflict("locked", message),
            E::EmptyIndex => Self::conflict("index_empty", message),
            E::NoDocumentStore(_) => Self::conflict(
                "no_document_store",
                "the index has no document store (it was built before latte stored text and metadata): \
                 filters, hybrid search and stored fields need one; any add or delete creates it",
            ),
            E::Store(s) => s.into(),
            _ => Self::internal(message),
        }
    }
}

impl From<latte_store::StoreError> for ApiError {
    fn from(e: latte_store::StoreError) -> Self {
        use latte_store::StoreError as E;
        let message = e.to_string();
        match e {
            E::Filter(_) | E::QueryTooLong { .. } | E::InvalidDocument { .. } => {
                Self::invalid(message)
            }
            _ => Self::internal(message),
        }
    }
}

impl From<latte_models::Error> for ApiError {
    fn from(e: latte_models::Error) -> Self {
        match e {
            latte_models::Error::Invalid(m) => Self::invalid(m),
            e => Self::internal(e.to_string()),
        }
    }
}

impl From<latte_core::Error> for ApiError {
    fn from(e: latte_core::Error) -> Self {
        Self::invalid(e.to_string())
    }
}

/// A blocking task that panicked or was cancelled.
impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::internal(format!("the request's worker failed: {e}"))
    }
}
