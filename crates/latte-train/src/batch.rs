//! A training batch: text columns in dataset order plus optional teacher scores, as PyLate's
//! `ColBERTCollator` builds them.

/// One text column of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// The column name.
    pub name: String,
    /// Tokenised as queries (`"query"` or `"anchor"` in the name), else as documents.
    pub is_query: bool,
    /// The texts, row after row; a list-valued column (distillation `documents`) is flattened.
    pub texts: Vec<String>,
}

/// A batch of rows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    /// Text columns in the dataset's column order; the first is the query.
    pub columns: Vec<Column>,
    /// Teacher scores per row (the `scores` / `label` column), for distillation.
    pub labels: Option<Vec<Vec<f32>>>,
}

impl Batch {
    /// Number of rows (queries).
    pub fn len(&self) -> usize {
        self.columns.first().map(|c| c.texts.len()).unwrap_or(0)
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// PyLate's rule: a column is tokenised as queries when its name contains `query` or `anchor`.
pub fn is_query_column(name: &str) -> bool {
    name.contains("query") || name.contains("anchor")
}
