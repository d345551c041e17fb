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
///
/// Bodies are mostly numbers (embeddings: 85 KB for one 32 × 128 query), so eight bytes at a time are
/// skipped while none of them can be a bracket, a brace, a quote or a backslash; only the words that may
/// hold one are walked byte by byte. (A byte-by-byte walk of the whole body cost as much as parsing it.)
pub fn json_depth(bytes: &[u8]) -> usize {
    let mut scan = DepthScan::default();
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let x = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        if may_be_structural(x) {
            w.iter().for_each(|&b| scan.byte(b));
        }
    }
    words.remainder().iter().for_each(|&b| scan.byte(b));
    scan.max
}

/// Whether any byte of `x` is `"`, `\\`, `[`, `]`, `{` or `}` (true also for `Y`, `y`, `_` and 0x7F, which
/// the byte-by-byte walk then passes over).
fn may_be_structural(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Whether some byte of `v` is zero (exact as a yes/no answer).
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS != 0;
    // `[` 0x5B, `]` 0x5D, `{` 0x7B, `}` 0x7D all become 0x79 after setting bit 5 and clearing bits 1 and 2.
    let folded = (x | (0x20 * ONES)) & (0xF9 * ONES);
    has_zero(folded ^ (0x79 * ONES))
        || has_zero(x ^ (b'"' as u64 * ONES))
        || has_zero(x ^ (b'\\' as u64 * ONES))
}

/// The state of the depth walk: inside a string or not, after a backslash or not, the depth now and the
/// deepest seen.
#[derive(Default)]
struct DepthScan {
    in_string: bool,
    escaped: bool,
    depth: usize,
    max: usize,
}

impl DepthScan {
    #[inline]
    fn byte(&mut self, b: u8) {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'[' | b'{' => {
                self.depth += 1;
                self.max = self.max.max(self.depth);
            }
            b']' | b'}' => self.depth = self.depth.saturating_sub(1),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-by-byte walk the word skipping must agree with.
    fn depth_bytewise(bytes: &[u8]) -> usize {
        let mut scan = DepthScan::default();
        bytes.iter().for_each(|&b| scan.byte(b));
        scan.max
    }

    #[test]
    fn skipping_words_agrees_with_the_bytewise_walk() {
        // Every structural byte at every offset within a word, strings with escapes across word edges,
        // and the look-alikes (`Y`, `y`, `_`, 0x7F) that the word test lets through.
        let mut cases: Vec<Vec<u8>> = vec![
            br#"{"query_embeddings": [[[0.125, -0.5e-3, 1E+2]]], "k": 10}"#.to_vec(),
            br#"{"a_b": "x\"]]]\\", "c": [[{"d": "\\"}]]}"#.to_vec(),
            b"[\x7f_;Yy{}][[[[]]]]".to_vec(),
        ];
        for pad in 0..9 {
            for s in [
                "[[1]]",
                "{\"a\":{\"b\":[2]}}",
                "\"[[[\"",
                "\"\\\"[\"",
                "[\"\\\\\",[3]]",
            ] {
                let mut c = vec![b' '; pad];
                c.extend_from_slice(s.as_bytes());
                c.extend(std::iter::repeat_n(b'7', 17 - pad));
                cases.push(c);
            }
        }
        let mut seed = 7u64;
        for _ in 0..200 {
            let len = (seed % 64) as usize;
            let alphabet = b"[]{}\"\\0,._yY\x7f ";
            let c: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    alphabet[(seed >> 33) as usize % alphabet.len()]
                })
                .collect();
            cases.push(c);
        }
        for c in &cases {
            assert_eq!(
                json_depth(c),
                depth_bytewise(c),
                "{:?}",
                String::from_utf8_lossy(c)
            );
        }
    }

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
