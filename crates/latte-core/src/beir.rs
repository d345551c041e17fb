//! The one reader of corpus and query files, streaming, with one id rule.
//!
//! * `.jsonl` / `.json`: one JSON object per line (blank lines are skipped), as BEIR's `corpus.jsonl` and
//!   `queries.jsonl`. The id is `_id`, else `id`: a string, or a JSON number taken as its decimal string; a
//!   missing, null, empty or otherwise typed id is an error naming the file and line. `text` is required. For
//!   documents the text is `"{title} {text}".strip()` (Python's `str.strip`), as PyLate's `load_beir` joins
//!   them; for queries it is `text` as it stands (BEIR's loader reads only `text` for queries).
//! * any other extension: one text per line, its id the 0-based line index (empty lines are texts too).
//!
//! Ids must be unique within a file (an error names both lines), and a file without any record is an error
//! ("no documents" / "no queries"). Ids longer than 200 bytes are shortened in messages (see
//! [`crate::short_id`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// What a file holds; decides the text rule and the wording of messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A corpus: the text is `"{title} {text}".strip()`.
    Documents,
    /// Queries: the text is `text`.
    Queries,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Documents => "documents",
            Kind::Queries => "queries",
        }
    }
    fn expected(self, jsonl: bool) -> &'static str {
        match (self, jsonl) {
            (Kind::Documents, true) => {
                "one JSON object per line with _id, text and optionally title"
            }
            (Kind::Queries, true) => "one JSON object per line with _id and text",
            (_, false) => "one text per line",
        }
    }
}

/// The JSON object of one line.
type Fields = serde_json::Map<String, Value>;

/// One document or query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its id (`_id` / `id`, or the 0-based line index of a text file).
    pub id: String,
    /// Its text.
    pub text: String,
    /// The 1-based line it came from.
    pub line: usize,
    /// The whole JSON object of the line, when the reader was asked to keep it ([`Reader::keep_fields`];
    /// JSONL only): the title, text and any other fields (metadata) as they stand.
    pub fields: Option<Fields>,
}

/// Python's `str.strip()` with no argument: Unicode whitespace plus the ASCII separators U+001C–U+001F.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// Whether `path` is read as JSON lines (extension `.jsonl` or `.json`, any case).
pub fn is_jsonl(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"))
}

/// A streaming reader of one corpus or queries file: an iterator of records, each checked as it is read
/// (duplicate ids against every earlier line). After the first error it yields nothing more.
#[derive(Debug)]
pub struct Reader {
    path: PathBuf,
    kind: Kind,
    jsonl: bool,
    lines: Lines<BufReader<File>>,
    line: usize,
    count: usize,
    seen: HashMap<String, usize>,
    done: bool,
    keep_fields: bool,
}

/// Opens `path` for streaming (see the module documentation for the format).
pub fn open(path: impl AsRef<Path>, kind: Kind) -> Result<Reader> {
    let path = path.as_ref().to_path_buf();
    let jsonl = is_jsonl(&path);
    let what = format!("{} file ({})", kind.plural(), kind.expected(jsonl));
    let file = File::open(&path).map_err(|e| Error::io(&path, what, e))?;
    Ok(Reader {
        path,
        kind,
        jsonl,
        lines: BufReader::new(file).lines(),
        line: 0,
        count: 0,
        seen: HashMap::new(),
        done: false,
        keep_fields: false,
    })
}

/// Reads every record of `path` (see the module documentation for the format).
pub fn read_all(path: impl AsRef<Path>, kind: Kind) -> Result<Vec<Record>> {
    open(path, kind)?.collect()
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Reader {
    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps each JSONL line's whole object in [`Record::fields`] (for storing titles, texts and metadata).
    pub fn keep_fields(mut self) -> Reader {
        self.keep_fields = true;
        self
    }

    /// Records yielded so far.
    pub fn yielded(&self) -> usize {
        self.count
    }

    fn input(&self, message: impl Into<String>) -> Error {
        Error::Input {
            path: self.path.clone(),
            line: self.line,
            message: message.into(),
        }
    }

    fn parse(&self, line: &str) -> Result<(String, String, Option<Fields>)> {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| self.input(format!("invalid JSON record: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(self.input(format!("expected a JSON object, got {}", type_name(&v))));
        };
        let id = match obj.get("_id").or_else(|| obj.get("id")) {
            Some(Value::String(s)) if s.is_empty() => return Err(self.input("empty _id")),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            other => {
                return Err(self.input(format!(
                    "expected an id: \"_id\" (or \"id\") as a string or a number, got {}",
                    other.map_or("none", type_name)
                )))
            }
        };
        let text = match obj.get("text") {
            Some(Value::String(s)) => s.as_str(),
            None | Some(Value::Null) => return Err(self.input("no \"text\" field")),
            Some(other) => {
                return Err(self.input(format!(
                    "\"text\" must be a string, got {}",
                    type_name(other)
                )))
            }
        };
        let text = match self.kind {
            Kind::Queries => text.to_string(),
            Kind::Documents => {
                let title = match obj.get("title") {
                    Some(Value::String(s)) => s.as_str(),
                    None | Some(Value::Null) => "",
                    Some(other) => {
                        return Err(self.input(format!(
                            "\"title\" must be a string, got {}",
                            type_name(other)
                        )))
                    }
                };
                py_strip(&format!("{title} {text}")).to_string()
            }
        };
        Ok((id, text, self.keep_fields.then_some(obj)))
    }

    fn next_record(&mut self) -> Option<Result<Record>> {
        loop {
            let line = match self.lines.next() {
                None if self.count == 0 => {
                    return Some(Err(Error::Empty {
                        path: self.path.clone(),
                        what: self.kind.plural(),
                        expected: self.kind.expected(self.jsonl),
                    }))
                }
                None => return None,
                Some(Err(e)) => {
                    self.line += 1;
                    return Some(Err(self.input(format!("cannot read the line: {e}"))));
                }
                Some(Ok(l)) => l,
            };
            self.line += 1;
            if !self.jsonl {
                let id = (self.line - 1).to_string();
                self.count += 1;
                return Some(Ok(Record {
                    id,
                    text: line,
                    line: self.line,
                    fields: None,
                }));
            }
            if line.trim().is_empty() {
                continue;
            }
            let (id, text, fields) = match self.parse(&line) {
                Ok(r) => r,
                Err(e) => return Some(Err(e)),
            };
            if let Some(&first) = self.seen.get(&id) {
                return Some(Err(Error::DuplicateId {
                    path: self.path.clone(),
                    id,
                    first,
                    line: self.line,
                }));
            }
            self.seen.insert(id.clone(), self.line);
            self.count += 1;
            return Some(Ok(Record {
                id,
                text,
                line: self.line,
                fields,
            }));
        }
    }
}

impl Iterator for Reader {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.next_record();
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    fn err(path: &Path, kind: Kind) -> String {
        read_all(path, kind).unwrap_err().to_string()
    }

    #[test]
    fn jsonl_joins_title_and_reports_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "c.jsonl",
            "{\"_id\": \"a\", \"title\": \"T\", \"text\": \"body\"}\n\n{\"_id\": 7, \"text\": \" x\\u001f\"}\n",
        );
        let r = read_all(&p, Kind::Documents).unwrap();
        assert_eq!(
            r,
            [
                Record {
                    id: "a".into(),
                    text: "T body".into(),
                    line: 1,
                    fields: None,
                },
                Record {
                    id: "7".into(),
                    text: "x".into(),
                    line: 3,
                    fields: None,
                }
            ]
        );
        // Asked for, the fields of each line are kept as they stand.
        let kept: Vec<Record> = open(&p, Kind::Documents)
            .unwrap()
            .keep_fields()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(
            kept[0].fields.as_ref().unwrap()["title"],
            Value::String("T".into())
        );
        assert_eq!(kept[1].fields.as_ref().unwrap()["_id"], Value::from(7));
        // Queries keep their text as it stands and ignore titles.
        let q = read_all(&p, Kind::Queries).unwrap();
        assert_eq!(q[0].text, "body");
        assert_eq!(q[1].text, " x\u{1f}");
        write(
            dir.path(),
            "c.jsonl",
            "{\"_id\": \"a\", \"text\": \"ok\"}\n{broken\n",
        );
        let e = err(&p, Kind::Documents);
        assert!(e.contains("c.jsonl:2: invalid JSON record"), "{e}");
        write(
            dir.path(),
            "c.jsonl",
            "{\"_id\": \"a\", \"title\": \"only\"}\n",
        );
        let e = err(&p, Kind::Documents);
        assert!(e.contains("c.jsonl:1: no \"text\""), "{e}");
        write(dir.path(), "c.jsonl", "[1, 2]\n");
        let e = err(&p, Kind::Documents);
        assert!(
            e.contains("c.jsonl:1: expected a JSON object, got an array"),
            "{e}"
        );
    }

    #[test]
    fn one_id_rule() {
        let dir = tempfile::tempdir().unwrap();
        let with_id = write(dir.path(), "a.jsonl", "{\"id\": \"x\", \"text\": \"t\"}\n");
        let with_under = write(dir.path(), "b.jsonl", "{\"_id\": \"x\", \"text\": \"t\"}\n");
        assert_eq!(
            read_all(&with_id, Kind::Queries).unwrap()[0],
            read_all(&with_under, Kind::Queries).unwrap()[0]
        );
        // `_id` wins over `id`.
        let both = write(
            dir.path(),
            "c.jsonl",
            "{\"_id\": \"u\", \"id\": \"v\", \"text\": \"t\"}\n",
        );
        assert_eq!(read_all(&both, Kind::Queries).unwrap()[0].id, "u");
        let num = write(
            dir.path(),
            "d.jsonl",
            "{\"_id\": 12, \"text\": \"t\"}\n{\"id\": 3.5, \"text\": \"t\"}\n",
        );
        let r = read_all(&num, Kind::Documents).unwrap();
        assert_eq!((r[0].id.as_str(), r[1].id.as_str()), ("12", "3.5"));
        for (body, got) in [
            ("{\"text\": \"t\"}", "got none"),
            ("{\"_id\": null, \"text\": \"t\"}", "got null"),
            ("{\"_id\": [1], \"text\": \"t\"}", "got an array"),
            ("{\"id\": true, \"text\": \"t\"}", "got a boolean"),
        ] {
            let p = write(
                dir.path(),
                "e.jsonl",
                &format!("{{\"_id\": \"ok\", \"text\": \"t\"}}\n{body}\n"),
            );
            let e = err(&p, Kind::Documents);
            assert!(
                e.contains(
                    "e.jsonl:2: expected an id: \"_id\" (or \"id\") as a string or a number"
                ) && e.contains(got),
                "{e}"
            );
        }
        let p = write(dir.path(), "f.jsonl", "{\"_id\": \"\", \"text\": \"t\"}\n");
        assert!(err(&p, Kind::Queries).contains("f.jsonl:1: empty _id"));
    }

    #[test]
    fn duplicates_name_both_lines_and_long_ids_are_shortened() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "q.jsonl",
            "{\"_id\": \"a\", \"text\": \"x\"}\n\n{\"id\": \"a\", \"text\": \"y\"}\n",
        );
        let e = err(&p, Kind::Queries);
        assert!(
            e.contains("q.jsonl:3: duplicate _id \"a\" (first on line 1)"),
            "{e}"
        );
        let long = "z".repeat(1_000_000);
        let p = write(
            dir.path(),
            "q.jsonl",
            &format!("{{\"_id\": \"{long}\", \"text\": \"x\"}}\n{{\"_id\": \"{long}\", \"text\": \"x\"}}\n"),
        );
        let e = err(&p, Kind::Queries);
        assert!(e.len() < 1024, "{} bytes", e.len());
        assert!(
            e.contains("(1000000 bytes)") && e.contains("q.jsonl:2: duplicate"),
            "{e}"
        );
    }

    #[test]
    fn empty_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "corpus.jsonl", "\n  \n");
        let e = err(&p, Kind::Documents);
        assert!(e.contains("corpus.jsonl: no documents"), "{e}");
        let p = write(dir.path(), "q.txt", "");
        let e = err(&p, Kind::Queries);
        assert!(e.contains("q.txt: no queries"), "{e}");
        let e = err(&dir.path().join("missing.jsonl"), Kind::Queries);
        assert!(
            e.contains("missing.jsonl") && e.contains("queries file"),
            "{e}"
        );
    }

    #[test]
    fn txt_is_one_text_per_line_and_streams() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "q.txt", "first\n\nthird\r\n");
        let r = read_all(&p, Kind::Queries).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1].text, "");
        assert_eq!((r[2].id.as_str(), r[2].text.as_str()), ("2", "third"));
        // The iterator stops at the first error, having yielded the good records before it.
        let p = write(
            dir.path(),
            "c.jsonl",
            "{\"_id\": 1, \"text\": \"a\"}\n{\"text\": \"b\"}\n{\"_id\": 3, \"text\": \"c\"}\n",
        );
        let mut it = open(&p, Kind::Documents).unwrap();
        assert_eq!(it.next().unwrap().unwrap().id, "1");
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
        assert_eq!(it.yielded(), 1);
    }
}
