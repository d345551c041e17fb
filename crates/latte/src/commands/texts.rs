//! Reading texts to encode: BEIR-style JSONL or plain text, one per line.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// One input text and its id (the JSONL `_id`, or the 0-based line index for `.txt`).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Identifier.
    pub id: String,
    /// Text to encode.
    pub text: String,
}

/// Reads `.jsonl` (objects with `text` and optional `title`, joined as `"{title} {text}".strip()` the way
/// PyLate's BEIR loader does, and `_id`/`id`) or any other file as one text per line.
pub fn read_texts(path: &Path) -> Result<Vec<Record>> {
    let content = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read input file {}", path.display()))?;
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"));
    if !is_jsonl {
        return Ok(content
            .lines()
            .enumerate()
            .map(|(i, l)| Record {
                id: i.to_string(),
                text: l.to_string(),
            })
            .collect());
    }
    let mut out = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: malformed JSON line", path.display(), i + 1))?;
        let Some(obj) = v.as_object() else {
            bail!("{}:{}: expected a JSON object", path.display(), i + 1);
        };
        let text = match obj.get("text") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) | None => {
                bail!("{}:{}: no \"text\" field", path.display(), i + 1)
            }
            Some(other) => bail!(
                "{}:{}: \"text\" must be a string, got {other}",
                path.display(),
                i + 1
            ),
        };
        let title = obj.get("title").and_then(|t| t.as_str()).unwrap_or("");
        let joined = format!("{title} {text}");
        let id = match obj.get("_id").or_else(|| obj.get("id")) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => out.len().to_string(),
        };
        out.push(Record {
            id,
            text: latte_models::py_strip(&joined).to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_joins_title_and_reports_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(
            &p,
            "{\"_id\": \"a\", \"title\": \"T\", \"text\": \"body\"}\n\n{\"_id\": 7, \"text\": \"x\"}\n",
        )
        .unwrap();
        let r = read_texts(&p).unwrap();
        assert_eq!(
            r[0],
            Record {
                id: "a".into(),
                text: "T body".into()
            }
        );
        assert_eq!(
            r[1],
            Record {
                id: "7".into(),
                text: "x".into()
            }
        );
        std::fs::write(&p, "{\"_id\": \"a\", \"text\": \"ok\"}\n{broken\n").unwrap();
        let err = format!("{:#}", read_texts(&p).unwrap_err());
        assert!(err.contains("c.jsonl:2"), "{err}");
        std::fs::write(&p, "{\"_id\": \"a\", \"title\": \"only\"}\n").unwrap();
        let err = format!("{:#}", read_texts(&p).unwrap_err());
        assert!(err.contains(":1: no \"text\""), "{err}");
    }

    #[test]
    fn txt_is_one_text_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.txt");
        std::fs::write(&p, "first\n\nthird\n").unwrap();
        let r = read_texts(&p).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1].text, "");
    }
}
