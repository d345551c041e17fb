//! Training data: JSONL or Parquet tables read with sentence-transformers' column conventions, and
//! PyLate's distillation layout.
//!
//! Columns, in file order (JSONL key order of the first row, Parquet schema order):
//! - a column whose name contains `_id` is skipped (as PyLate's collator does);
//! - the first of `label` / `scores` present holds the labels (teacher scores for distillation);
//! - every other column holds texts (a string, or a list of strings that is flattened into the batch);
//!   the first text column is the query and must be named like one (`query` or `anchor` in the name),
//!   the others are documents (`positive`, `negative`, `negative_1`, ..., or `documents`).
//!
//! Distillation data may also come in PyLate's layout: training rows `{query_id, document_ids, scores}`
//! plus a queries table `{query_id, text}` and a documents table `{document_id, text}`
//! ([`TrainingData::distillation`]).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::batch::{is_query_column, Batch, Column};
use crate::{Error, Result};

/// A table read from a file: column names in order and one value per column per row.
#[derive(Debug, Clone)]
pub struct Table {
    /// Where it was read from.
    pub path: PathBuf,
    /// Column names in file order.
    pub columns: Vec<String>,
    /// Rows, each with one value per column (`Value::Null` when absent).
    pub rows: Vec<Vec<Value>>,
}

struct OrderedObject(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for OrderedObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(OrderedObject(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl Table {
    /// Reads a `.jsonl` / `.json` (one object per line) or `.parquet` file.
    pub fn read(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::data(
                path,
                "file not found (expected a .jsonl or .parquet training table)",
            ));
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("parquet") => Self::read_parquet(path),
            _ => Self::read_jsonl(path),
        }
    }

    /// Reads JSON lines: one object per non-empty line; the first line fixes the columns.
    pub fn read_jsonl(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut columns: Vec<String> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut rows = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let obj: OrderedObject = serde_json::from_str(line).map_err(|e| {
                Error::data(path, format!("line {}: not a JSON object: {e}", n + 1))
            })?;
            if columns.is_empty() {
                for (k, _) in &obj.0 {
                    index.insert(k.clone(), columns.len());
                    columns.push(k.clone());
                }
            }
            let mut row = vec![Value::Null; columns.len()];
            for (k, v) in obj.0 {
                match index.get(&k) {
                    Some(&i) => row[i] = v,
                    None => {
                        return Err(Error::data(
                            path,
                            format!(
                            "line {}: column {k:?} is not in the first row's columns {columns:?}",
                            n + 1
                        ),
                        ))
                    }
                }
            }
            rows.push(row);
        }
        if rows.is_empty() {
            return Err(Error::data(path, "no rows"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            columns,
            rows,
        })
    }

    /// Reads a Parquet file (snappy, gzip, zstd or uncompressed) through its row API.
    pub fn read_parquet(path: &Path) -> Result<Self> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| Error::data(path, format!("not a readable Parquet file: {e}")))?;
        let columns: Vec<String> = reader
            .metadata()
            .file_metadata()
            .schema_descr()
            .root_schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let mut rows = Vec::new();
        let iter = reader
            .get_row_iter(None)
            .map_err(|e| Error::data(path, format!("cannot read rows: {e}")))?;
        for (n, row) in iter.enumerate() {
            let row = row.map_err(|e| Error::data(path, format!("row {n}: {e}")))?;
            let mut out = vec![Value::Null; columns.len()];
            for (name, field) in row.get_column_iter() {
                if let Some(i) = columns.iter().position(|c| c == name) {
                    out[i] = field_to_json(field);
                }
            }
            rows.push(out);
        }
        if rows.is_empty() {
            return Err(Error::data(path, "no rows"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            columns,
            rows,
        })
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    fn require(&self, name: &str, what: &str) -> Result<usize> {
        self.column(name).ok_or_else(|| {
            Error::data(
                &self.path,
                format!(
                    "missing column {name:?} ({what}); columns found: {:?}",
                    self.columns
                ),
            )
        })
    }
}

fn field_to_json(f: &parquet::record::Field) -> Value {
    use parquet::record::Field as F;
    match f {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Byte(v) => (*v).into(),
        F::Short(v) => (*v).into(),
        F::Int(v) => (*v).into(),
        F::Long(v) => (*v).into(),
        F::UByte(v) => (*v).into(),
        F::UShort(v) => (*v).into(),
        F::UInt(v) => (*v).into(),
        F::ULong(v) => (*v).into(),
        F::Float16(v) => f64::from(f32::from(*v)).into(),
        F::Float(v) => (*v as f64).into(),
        F::Double(v) => (*v).into(),
        F::Str(s) => Value::String(s.clone()),
        F::Bytes(b) => Value::String(String::from_utf8_lossy(b.data()).into_owned()),
        F::ListInternal(l) => Value::Array(l.elements().iter().map(field_to_json).collect()),
        other => Value::String(other.to_string()),
    }
}

/// One training example: the texts of each text column and the optional label.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Per text column: one text, or the list of a list-valued column.
    pub texts: Vec<Vec<String>>,
    /// Teacher scores (distillation) or label.
    pub label: Option<Vec<f32>>,
}

/// Training examples with their column roles.
#[derive(Debug, Clone)]
pub struct TrainingData {
    /// Text column names, in order; the first is the query.
    pub text_columns: Vec<String>,
    /// Which text columns hold lists.
    pub list_columns: Vec<bool>,
    /// The label column, if any.
    pub label_column: Option<String>,
    /// The examples.
    pub rows: Vec<Row>,
}

fn as_text(v: &Value, path: &Path, row: usize, col: &str) -> Result<Vec<String>> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.clone()),
                other => Err(Error::data(
                    path,
                    format!(
                        "row {}: column {col:?}: expected strings in the list, got {other}",
                        row + 1
                    ),
                )),
            })
            .collect(),
        Value::Null => Err(Error::data(
            path,
            format!("row {}: column {col:?} is missing or null", row + 1),
        )),
        other => Err(Error::data(
            path,
            format!(
                "row {}: column {col:?}: expected a string or a list of strings, got {other}",
                row + 1
            ),
        )),
    }
}

/// Numbers, a list of numbers, or a stringified list (`"[0.1, 0.2]"`, as some datasets store scores).
fn as_numbers(v: &Value, path: &Path, row: usize, col: &str) -> Result<Vec<f32>> {
    let bad = |what: String| Error::data(path, format!("row {}: column {col:?}: {what}", row + 1));
    match v {
        Value::Number(n) => Ok(vec![n.as_f64().unwrap_or(f64::NAN) as f32]),
        Value::Bool(b) => Ok(vec![*b as u8 as f32]),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| bad(format!("expected numbers, got {x}")))
            })
            .collect(),
        Value::String(s) => {
            let parsed: Value = serde_json::from_str(s)
                .map_err(|_| bad(format!("expected numbers, got the string {s:?}")))?;
            as_numbers(&parsed, path, row, col)
        }
        other => Err(bad(format!(
            "expected a number or a list of numbers, got {other}"
        ))),
    }
}

fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl TrainingData {
    /// Reads a training table and assigns column roles (see the module docs).
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_table(&Table::read(path)?)
    }

    /// Assigns column roles to a table.
    pub fn from_table(table: &Table) -> Result<Self> {
        let path = &table.path;
        let label_column = ["label", "scores"]
            .into_iter()
            .find(|l| table.column(l).is_some())
            .map(str::to_string);
        let text_idx: Vec<usize> = (0..table.columns.len())
            .filter(|&i| {
                let c = &table.columns[i];
                !c.contains("_id") && Some(c) != label_column.as_ref()
            })
            .collect();
        let text_columns: Vec<String> =
            text_idx.iter().map(|&i| table.columns[i].clone()).collect();
        match text_columns.first() {
            None => {
                return Err(Error::data(
                    path,
                    format!("no text columns (columns found: {:?})", table.columns),
                ))
            }
            Some(first) if !is_query_column(first) => {
                return Err(Error::data(
                    path,
                    format!(
                        "the first text column must be the query (a name containing \"query\" or \"anchor\"), found {first:?}; columns: {:?}",
                        table.columns
                    ),
                ))
            }
            _ => {}
        }
        if text_columns.len() < 2 {
            return Err(Error::data(
                path,
                format!(
                    "need a query column and at least one document column (positive, negative..., or documents); columns found: {:?}",
                    table.columns
                ),
            ));
        }
        let label_idx = label_column.as_ref().and_then(|l| table.column(l));
        let mut rows = Vec::with_capacity(table.rows.len());
        for (r, row) in table.rows.iter().enumerate() {
            let texts = text_idx
                .iter()
                .map(|&i| as_text(&row[i], path, r, &table.columns[i]))
                .collect::<Result<Vec<_>>>()?;
            let label = label_idx
                .map(|i| as_numbers(&row[i], path, r, &table.columns[i]))
                .transpose()?;
            rows.push(Row { texts, label });
        }
        let list_columns = text_idx
            .iter()
            .map(|&i| table.rows.iter().any(|r| r[i].is_array()))
            .collect();
        let data = Self {
            text_columns,
            list_columns,
            label_column,
            rows,
        };
        data.check_shapes(path)?;
        Ok(data)
    }

    fn check_shapes(&self, path: &Path) -> Result<()> {
        for (c, name) in self.text_columns.iter().enumerate() {
            let n = self.rows[0].texts[c].len();
            if let Some((r, row)) = self
                .rows
                .iter()
                .enumerate()
                .find(|(_, row)| row.texts[c].len() != n)
            {
                return Err(Error::data(
                    path,
                    format!(
                        "row {}: column {name:?} has {} texts where row 1 has {n}; every row needs the same number",
                        r + 1,
                        row.texts[c].len()
                    ),
                ));
            }
        }
        if self.label_column.is_some() {
            let n = self.rows[0].label.as_ref().map(|l| l.len()).unwrap_or(0);
            if let Some((r, _)) = self
                .rows
                .iter()
                .enumerate()
                .find(|(_, row)| row.label.as_ref().map(|l| l.len()) != Some(n))
            {
                return Err(Error::data(
                    path,
                    format!(
                        "row {}: the scores have a different length than row 1's ({n})",
                        r + 1
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Joins PyLate's distillation layout: `train` rows `{query_id, document_ids, scores}`, `queries`
    /// `{query_id, text}`, `documents` `{document_id, text}`; keeps the first `n_ways` documents and
    /// scores of each row (PyLate's `KDProcessing`). A document id missing from `documents` becomes an
    /// empty text with a warning, as in PyLate; a missing query id is an error.
    pub fn distillation(
        train: &Table,
        queries: &Table,
        documents: &Table,
        n_ways: usize,
    ) -> Result<Self> {
        if n_ways == 0 {
            return Err(Error::Invalid("n_ways must be at least 1".into()));
        }
        let qi = queries.require("query_id", "the id of each query")?;
        let qt = queries.require("text", "the query text")?;
        let di = documents.require("document_id", "the id of each document")?;
        let dt = documents.require("text", "the document text")?;
        let tq = train.require("query_id", "the query of each training row")?;
        let td = train.require("document_ids", "the documents of each training row")?;
        let ts = train.require("scores", "the teacher scores of each training row")?;
        let qmap: HashMap<String, String> = queries
            .rows
            .iter()
            .filter_map(|r| Some((id_string(&r[qi])?, r[qt].as_str()?.to_string())))
            .collect();
        let dmap: HashMap<String, String> = documents
            .rows
            .iter()
            .filter_map(|r| Some((id_string(&r[di])?, r[dt].as_str()?.to_string())))
            .collect();
        let mut rows = Vec::with_capacity(train.rows.len());
        let mut missing_docs = 0usize;
        for (r, row) in train.rows.iter().enumerate() {
            let qid = id_string(&row[tq]).ok_or_else(|| {
                Error::data(&train.path, format!("row {}: query_id is missing", r + 1))
            })?;
            let query = qmap.get(&qid).cloned().ok_or_else(|| {
                Error::data(
                    &train.path,
                    format!(
                        "row {}: query_id {qid:?} is not in {}",
                        r + 1,
                        queries.path.display()
                    ),
                )
            })?;
            let ids: Vec<String> = match &row[td] {
                Value::Array(a) => a.iter().filter_map(id_string).collect(),
                Value::String(s) => match serde_json::from_str::<Value>(s) {
                    Ok(Value::Array(a)) => a.iter().filter_map(id_string).collect(),
                    _ => vec![],
                },
                _ => vec![],
            };
            let scores = as_numbers(&row[ts], &train.path, r, "scores")?;
            if ids.len() < n_ways || scores.len() < n_ways {
                return Err(Error::data(
                    &train.path,
                    format!(
                        "row {}: {} document ids and {} scores, need at least n_ways = {n_ways}",
                        r + 1,
                        ids.len(),
                        scores.len()
                    ),
                ));
            }
            let docs: Vec<String> = ids[..n_ways]
                .iter()
                .map(|id| {
                    dmap.get(id).cloned().unwrap_or_else(|| {
                        missing_docs += 1;
                        String::new()
                    })
                })
                .collect();
            rows.push(Row {
                texts: vec![vec![query], docs],
                label: Some(scores[..n_ways].to_vec()),
            });
        }
        if missing_docs > 0 {
            tracing::warn!(
                "{missing_docs} document ids of {} are not in {}; they are used as empty texts",
                train.path.display(),
                documents.path.display()
            );
        }
        Ok(Self {
            text_columns: vec!["query".into(), "documents".into()],
            list_columns: vec![false, true],
            label_column: Some("scores".into()),
            rows,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// No examples.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The batch of the rows at `indices`, as the collator builds it.
    pub fn batch(&self, indices: &[usize]) -> Batch {
        let columns = self
            .text_columns
            .iter()
            .enumerate()
            .map(|(c, name)| Column {
                name: name.clone(),
                is_query: is_query_column(name),
                texts: indices
                    .iter()
                    .flat_map(|&i| self.rows[i].texts[c].iter().cloned())
                    .collect(),
            })
            .collect();
        let labels = self.label_column.as_ref().map(|_| {
            indices
                .iter()
                .map(|&i| self.rows[i].label.clone().unwrap_or_default())
                .collect()
        });
        Batch { columns, labels }
    }
}
