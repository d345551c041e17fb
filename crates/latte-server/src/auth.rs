//! API keys: a file of `key scope` lines, scopes `read` < `write` < `admin`. Every route but `/health`
//! needs `Authorization: Bearer KEY` when keys are configured. Keys are compared in constant time and never
//! logged or echoed.

use std::path::Path;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::state::AppState;

/// What a key may do; each scope includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Search, encode, rerank, read indexes, documents and metrics.
    Read,
    /// Also add and delete documents.
    Write,
    /// Also create and delete indexes.
    Admin,
}

impl Scope {
    fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// A malformed API key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file cannot be read.
    #[error("cannot read the API key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `key scope`.
    #[error("{path}, line {line}: {message}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong (never the key itself).
        message: String,
    },
}

/// The configured keys.
#[derive(Clone)]
pub struct ApiKeys {
    keys: Vec<(Vec<u8>, Scope)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

/// Shortest key accepted.
pub const MIN_KEY_LEN: usize = 16;

impl ApiKeys {
    /// Reads a key file: one `key scope` per line; blank lines and lines starting with `#` are skipped.
    pub fn from_file(path: &Path) -> Result<ApiKeys, KeyFileError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text, &p)
    }

    /// Parses the text of a key file (`name` is the file, for errors).
    pub fn parse(text: &str, name: &str) -> Result<ApiKeys, KeyFileError> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |message: String| KeyFileError::Line {
                path: name.to_string(),
                line: i + 1,
                message,
            };
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [key, scope] = parts[..] else {
                return Err(err(format!(
                    "expected `key scope` (two fields), got {} fields",
                    parts.len()
                )));
            };
            let scope = Scope::parse(scope)
                .ok_or_else(|| err(format!("scope must be read, write or admin, got {scope:?}")))?;
            if key.len() < MIN_KEY_LEN {
                return Err(err(format!(
                    "the key is {} characters long; at least {MIN_KEY_LEN} are required",
                    key.len()
                )));
            }
            keys.push((key.as_bytes().to_vec(), scope));
        }
        if keys.is_empty() {
            return Err(KeyFileError::Line {
                path: name.to_string(),
                line: 0,
                message: "the file holds no key".into(),
            });
        }
        Ok(ApiKeys { keys })
    }

    /// The scope of `presented`, comparing it with every key in constant time (no early exit).
    pub fn scope_of(&self, presented: &[u8]) -> Option<Scope> {
        let mut found = None;
        for (key, scope) in &self.keys {
            // `ct_eq` of slices of different lengths is false without comparing contents; the lengths are
            // not the secret.
            if bool::from(key.as_slice().ct_eq(presented)) {
                found = Some(*scope);
            }
        }
        found
    }
}

/// The scope a route needs: `None` for `/health`.
pub fn required_scope(method: &Method, route: &str) -> Option<Scope> {
    match route {
        "/health" => None,
        "/indexes" if method == Method::POST => Some(Scope::Admin),
        "/indexes/{name}" if method == Method::DELETE => Some(Scope::Admin),
        "/indexes/{name}/documents" if method == Method::POST || method == Method::DELETE => {
            Some(Scope::Write)
        }
        _ => Some(Scope::Read),
    }
}

/// The middleware: 401 without a valid key, 403 with too small a scope.
pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(keys) = &state.config.api_keys else {
        return next.run(req).await;
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    let Some(needed) = required_scope(req.method(), &route) else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return unauthorized("this route needs `Authorization: Bearer KEY`");
    };
    match keys.scope_of(presented.as_bytes()) {
        None => unauthorized("the API key is not valid"),
        Some(scope) if scope < needed => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} {route} needs a key of scope {}; this key has scope {}",
                req.method(),
                needed.name(),
                scope.name()
            ),
        )
        .into_response(),
        Some(_) => next.run(req).await,
    }
}

fn unauthorized(message: &str) -> Response {
    let mut res = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_lines_are_checked_without_echoing_keys() {
        let keys = ApiKeys::parse(
            "# comment\nreader-key-0123456789 read\n\nadmin-key-0123456789 admin\n",
            "k",
        )
        .unwrap();
        assert_eq!(keys.scope_of(b"reader-key-0123456789"), Some(Scope::Read));
        assert_eq!(keys.scope_of(b"admin-key-0123456789"), Some(Scope::Admin));
        assert_eq!(keys.scope_of(b"admin-key-012345678"), None);
        let err = ApiKeys::parse("secret-key-0123456789 owner\n", "k")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("owner"), "{err}");
        assert!(!err.contains("secret-key"), "{err}");
        let err = ApiKeys::parse("short read\n", "k").unwrap_err().to_string();
        assert!(
            err.contains("at least 16") && !err.contains("short"),
            "{err}"
        );
        assert!(ApiKeys::parse("\n# none\n", "k").is_err());
    }

    #[test]
    fn scopes_by_route() {
        assert_eq!(required_scope(&Method::GET, "/health"), None);
        assert_eq!(
            required_scope(&Method::POST, "/indexes"),
            Some(Scope::Admin)
        );
        assert_eq!(required_scope(&Method::GET, "/indexes"), Some(Scope::Read));
        assert_eq!(
            required_scope(&Method::DELETE, "/indexes/{name}/documents"),
            Some(Scope::Write)
        );
        assert_eq!(
            required_scope(&Method::POST, "/indexes/{name}/search"),
            Some(Scope::Read)
        );
    }
}
