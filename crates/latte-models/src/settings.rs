//! ColBERT settings and how they resolve: explicit value > the model's config > PyLate's defaults.

use serde::{Deserialize, Serialize};

/// The 32 ASCII punctuation characters, PyLate's default skiplist (`string.punctuation`).
pub const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// The default skiplist words: each ASCII punctuation character.
pub fn default_skiplist() -> Vec<String> {
    PUNCTUATION.chars().map(|c| c.to_string()).collect()
}

/// The resolved ColBERT settings of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Token inserted after `[CLS]` in queries (`""` for none).
    pub query_prefix: String,
    /// Token inserted after `[CLS]` in documents (`""` for none).
    pub document_prefix: String,
    /// Query length in tokens, prefix included; queries are padded to it when expanding.
    pub query_length: usize,
    /// Maximum document length in tokens, prefix included.
    pub document_length: usize,
    /// Pad queries with mask tokens up to `query_length` and keep those embeddings.
    pub do_query_expansion: bool,
    /// Let the transformer attend to the expansion tokens.
    pub attend_to_expansion_tokens: bool,
    /// Words whose token ids are removed from document embeddings.
    pub skiplist_words: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            query_prefix: "[Q] ".into(),
            document_prefix: "[D] ".into(),
            query_length: 32,
            document_length: 180,
            do_query_expansion: true,
            attend_to_expansion_tokens: false,
            skiplist_words: default_skiplist(),
        }
    }
}

/// Settings that may or may not be given: explicit arguments, or values read from a config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartialSettings {
    /// See [`Settings::query_prefix`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_prefix: Option<String>,
    /// See [`Settings::document_prefix`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_prefix: Option<String>,
    /// See [`Settings::query_length`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_length: Option<usize>,
    /// See [`Settings::document_length`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_length: Option<usize>,
    /// See [`Settings::do_query_expansion`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_query_expansion: Option<bool>,
    /// See [`Settings::attend_to_expansion_tokens`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attend_to_expansion_tokens: Option<bool>,
    /// See [`Settings::skiplist_words`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skiplist_words: Option<Vec<String>>,
}

impl PartialSettings {
    /// Fills every unset field from `lower` (a lower-priority source).
    pub fn or(self, lower: &PartialSettings) -> PartialSettings {
        PartialSettings {
            query_prefix: self.query_prefix.or_else(|| lower.query_prefix.clone()),
            document_prefix: self
                .document_prefix
                .or_else(|| lower.document_prefix.clone()),
            query_length: self.query_length.or(lower.query_length),
            document_length: self.document_length.or(lower.document_length),
            do_query_expansion: self.do_query_expansion.or(lower.do_query_expansion),
            attend_to_expansion_tokens: self
                .attend_to_expansion_tokens
                .or(lower.attend_to_expansion_tokens),
            skiplist_words: self.skiplist_words.or_else(|| lower.skiplist_words.clone()),
        }
    }

    /// Resolves against PyLate's defaults; attending to expansion tokens is forced off without expansion.
    pub fn resolve(&self) -> Settings {
        let d = Settings::default();
        let do_query_expansion = self.do_query_expansion.unwrap_or(d.do_query_expansion);
        Settings {
            query_prefix: self.query_prefix.clone().unwrap_or(d.query_prefix),
            document_prefix: self.document_prefix.clone().unwrap_or(d.document_prefix),
            query_length: self.query_length.unwrap_or(d.query_length),
            document_length: self.document_length.unwrap_or(d.document_length),
            do_query_expansion,
            attend_to_expansion_tokens: do_query_expansion
                && self
                    .attend_to_expansion_tokens
                    .unwrap_or(d.attend_to_expansion_tokens),
            skiplist_words: self.skiplist_words.clone().unwrap_or(d.skiplist_words),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_beats_config_beats_default() {
        let explicit = PartialSettings {
            query_length: Some(64),
            ..Default::default()
        };
        let config = PartialSettings {
            query_length: Some(48),
            document_length: Some(300),
            do_query_expansion: Some(false),
            attend_to_expansion_tokens: Some(true),
            ..Default::default()
        };
        let s = explicit.or(&config).resolve();
        assert_eq!(s.query_length, 64);
        assert_eq!(s.document_length, 300);
        assert_eq!(s.query_prefix, "[Q] ");
        assert!(!s.do_query_expansion);
        assert!(
            !s.attend_to_expansion_tokens,
            "forced off without expansion"
        );
        assert_eq!(s.skiplist_words.len(), 32);
    }
}
