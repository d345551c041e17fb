//! [`ApiJson`]: the request body extractor. It reads the body within the size limit, refuses JSON nested
//! deeper than the depth limit before parsing it, and names the field a deserialisation error is at.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

/// A JSON request body of type `T`, parsed with the server's limits.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.config.limits.body_bytes;
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the request body is larger than the limit of {limit} bytes"),
                )
            } else {
                ApiError::invalid(format!("cannot read the request body: {}", e.body_text()))
            }
        })?;
        parse(&bytes, state.config.limits.json_depth).map(ApiJson)
    }
}

/// Parses `bytes` as a `T`, refusing nesting deeper than `max_depth`.
pub fn parse<T: DeserializeOwned>(bytes: &[u8], max_depth: usize) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "the request body is empty; expected a JSON object",
        ));
    }
    let depth = json_depth(bytes);
    if depth > max_depth {
        return Err(ApiError::invalid(format!(
            "the JSON body is nested {depth} levels deep; at most {max_depth} are allowed"
        )));
    }
    // The common case, a valid body, is parsed without tracking the path (which costs per element: a query
    // by embeddings carries thousands of numbers); only a body that fails is parsed again to name the field.
    if let Ok(value) = serde_json::from_slice::<T>(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::invalid(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::invalid(format!("invalid JSON body at {path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// The deepest nesting of arrays and objects in `bytes` (brackets inside strings do not count). Malformed
/// JSON gets some number; the parser reports what is wrong with it.
pub fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(json_depth(br#"{"a": [[1, 2], [3]]}"#), 3);
        assert_eq!(json_depth(br#"{"a": "[[[[\"{{{"}"#), 1);
        assert_eq!(json_depth(b"12"), 0);
    }

    #[test]
    fn errors_name_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Body {
            items: Vec<Item>,
        }
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Item {
            id: String,
        }
        let err = parse::<Body>(br#"{"items": [{"id": "a"}, {"id": 3}]}"#, 8).unwrap_err();
        assert!(err.message.contains("items[1].id"), "{err}");
        let err = parse::<Body>(br#"{"items": [[[[[[[[[]]]]]]]]]}"#, 4).unwrap_err();
        assert!(
            err.message.contains("10 levels") && err.message.contains("at most 4"),
            "{err}"
        );
        let err = parse::<Body>(b" ", 4).unwrap_err();
        assert!(err.message.contains("empty"), "{err}");
    }
}
