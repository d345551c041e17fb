//! [`ModelOptions`]: the load options that change the embeddings, as an index records them, so that whoever
//! opens the index later (`latte search`, `latte index` adding documents, `latte serve`) loads the model the
//! same way.

use serde::{Deserialize, Serialize};

use crate::{Dtype, Error, HubOptions, LoadOptions, PartialSettings, Result};

/// The load options that change the embeddings, as an index records them (`model_options` in its metadata;
/// unset fields mean the model's own setting). Also the token pooling applied to the indexed documents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelOptions {
    /// Query prefix token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_prefix: Option<String>,
    /// Document prefix token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_prefix: Option<String>,
    /// Query length in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_length: Option<usize>,
    /// Maximum document length in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_length: Option<usize>,
    /// Query expansion on or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_expansion: Option<bool>,
    /// Attend to query expansion tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attend_to_expansion_tokens: Option<bool>,
    /// Output dimension of a projection latte adds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_size: Option<usize>,
    /// Matryoshka truncation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate_dim: Option<usize>,
    /// Precision of the encoder's linear layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
    /// Seed of any projection latte adds (0 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Documents were pooled to `tokens / pool_factor` before indexing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_factor: Option<usize>,
}

impl ModelOptions {
    /// The options recorded in an index's metadata (`None`: an index written before they were recorded, or
    /// without a model: defaults).
    pub fn from_json(value: Option<&serde_json::Value>) -> Result<Self> {
        match value {
            None => Ok(Self::default()),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                Error::Invalid(format!(
                    "the index's model_options are not the JSON object latte writes: {e}"
                ))
            }),
        }
    }

    /// As JSON for the index's metadata.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("plain fields serialise")
    }

    /// The load options (with `hub` for where the files come from).
    pub fn load_options(&self, hub: &HubOptions) -> LoadOptions {
        LoadOptions {
            settings: PartialSettings {
                query_prefix: self.query_prefix.clone(),
                document_prefix: self.document_prefix.clone(),
                query_length: self.query_length,
                document_length: self.document_length,
                do_query_expansion: self.query_expansion,
                attend_to_expansion_tokens: self.attend_to_expansion_tokens,
                skiplist_words: None,
            },
            embedding_size: self.embedding_size,
            bias: false,
            seed: self.seed.unwrap_or(0),
            hub: hub.clone(),
            device: None,
            truncate_dim: self.truncate_dim,
            dtype: self.dtype.unwrap_or_default(),
        }
    }

    /// `self` (recorded) with every option set in `given` replacing it.
    pub fn overridden_by(&self, given: &ModelOptions) -> ModelOptions {
        ModelOptions {
            query_prefix: given
                .query_prefix
                .clone()
                .or_else(|| self.query_prefix.clone()),
            document_prefix: given
                .document_prefix
                .clone()
                .or_else(|| self.document_prefix.clone()),
            query_length: given.query_length.or(self.query_length),
            document_length: given.document_length.or(self.document_length),
            query_expansion: given.query_expansion.or(self.query_expansion),
            attend_to_expansion_tokens: given
                .attend_to_expansion_tokens
                .or(self.attend_to_expansion_tokens),
            embedding_size: given.embedding_size.or(self.embedding_size),
            truncate_dim: given.truncate_dim.or(self.truncate_dim),
            dtype: given.dtype.or(self.dtype),
            seed: given.seed.or(self.seed),
            pool_factor: given.pool_factor.or(self.pool_factor),
        }
    }

    /// The options set in `given` that differ from the recorded ones (`self`), as `(field, recorded, given)`
    /// in JSON: documents added to an index must be encoded as the ones already in it.
    pub fn differences(
        &self,
        given: &ModelOptions,
    ) -> Vec<(String, serde_json::Value, serde_json::Value)> {
        let recorded = self.to_json();
        let given = given.to_json();
        let (Some(recorded), Some(given)) = (recorded.as_object(), given.as_object()) else {
            return Vec::new();
        };
        given
            .iter()
            .filter_map(|(key, got)| {
                let expected = recorded.get(key).unwrap_or(&serde_json::Value::Null);
                (expected != got).then(|| (key.clone(), expected.clone(), got.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_options_round_trip_and_override() {
        let recorded = ModelOptions {
            truncate_dim: Some(64),
            query_length: Some(16),
            seed: Some(3),
            ..Default::default()
        };
        let json = recorded.to_json();
        assert_eq!(
            json,
            serde_json::json!({"truncate_dim": 64, "query_length": 16, "seed": 3})
        );
        assert_eq!(ModelOptions::from_json(Some(&json)).unwrap(), recorded);
        assert_eq!(
            ModelOptions::from_json(None).unwrap(),
            ModelOptions::default()
        );
        let given = ModelOptions {
            query_length: Some(8),
            ..Default::default()
        };
        let merged = recorded.overridden_by(&given);
        assert_eq!(merged.query_length, Some(8));
        assert_eq!(merged.dtype, None);
        assert_eq!(
            merged.load_options(&HubOptions::default()).dtype,
            Dtype::F32
        );
        assert_eq!(merged.truncate_dim, Some(64));
        assert_eq!(merged.seed, Some(3));
        assert!(recorded.differences(&ModelOptions::default()).is_empty());
        let diff = recorded.differences(&ModelOptions {
            truncate_dim: Some(32),
            ..Default::default()
        });
        assert_eq!(
            diff,
            vec![(
                "truncate_dim".to_string(),
                serde_json::json!(64),
                serde_json::json!(32)
            )]
        );
        let bad = ModelOptions::from_json(Some(&serde_json::json!({"dtype": "fp8"})));
        assert!(bad.unwrap_err().to_string().contains("fp8"));
    }
}
