//! Writing a model as a PyLate folder that PyLate 1.6.0 (and sentence-transformers) load unchanged.
//!
//! Layout: `modules.json`, `config_sentence_transformers.json`, `sentence_bert_config.json`, the backbone's
//! `config.json` + `model.safetensors`, the tokenizer files, `{i}_Dense/{config.json,model.safetensors}`
//! and a short `README.md`. Every file is written to a temporary name, synced and renamed; the folder
//! is first assembled beside the target and swapped in at the end.

use std::path::Path;

use serde_json::{json, Value};

use crate::io::{atomic_write, safetensors_bytes};
use crate::model::ColBERT;
use crate::{Error, Result};

fn pretty(v: &Value, indent: usize) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let ind = " ".repeat(indent);
    let fmt = serde_json::ser::PrettyFormatter::with_indent(ind.as_bytes());
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    serde::Serialize::serialize(v, &mut ser).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(buf)
}

impl ColBERT {
    /// Saves the model as a PyLate folder at `path` (created, or replaced when it exists).
    pub fn save(&self, path: &Path) -> Result<()> {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let staging = tempfile::Builder::new()
            .prefix(".latte-save-")
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        self.write_files(staging.path())?;
        let staged = staging.keep();
        if path.exists() {
            let old = parent.join(format!(
                ".latte-old-{}",
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(path, &old).map_err(|e| Error::io(path, e))?;
            std::fs::rename(&staged, path).map_err(|e| Error::io(path, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&staged, path).map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    }

    fn write_files(&self, dir: &Path) -> Result<()> {
        let t = &self.transformer;
        let s = self.settings();
        // modules.json
        let mut modules = vec![
            json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        ];
        for (i, _) in self.denses.iter().enumerate() {
            let idx = i + 1;
            modules.push(json!({"idx": idx, "name": idx.to_string(), "path": format!("{idx}_Dense"), "type": "pylate.models.Dense.Dense"}));
        }
        atomic_write(
            &dir.join("modules.json"),
            &pretty(&Value::Array(modules), 2)?,
        )?;
        // config_sentence_transformers.json
        let mut cfg = serde_json::Map::new();
        cfg.insert(
            "__version__".into(),
            json!({"sentence_transformers": "5.3.0", "transformers": "5.3.0", "pytorch": "2.11.0", "latte": env!("CARGO_PKG_VERSION")}),
        );
        let prompts = self
            .extra_config
            .get("prompts")
            .cloned()
            .unwrap_or(json!({"query": "", "document": ""}));
        cfg.insert("prompts".into(), prompts);
        cfg.insert(
            "default_prompt_name".into(),
            self.extra_config
                .get("default_prompt_name")
                .cloned()
                .unwrap_or(Value::Null),
        );
        cfg.insert("similarity_fn_name".into(), json!("MaxSim"));
        for (k, v) in &self.extra_config {
            if !cfg.contains_key(k) && k != "model_type" {
                cfg.insert(k.clone(), v.clone());
            }
        }
        let st = serde_json::to_value(s).map_err(|e| Error::Invalid(e.to_string()))?;
        for k in [
            "query_prefix",
            "document_prefix",
            "query_length",
            "document_length",
            "attend_to_expansion_tokens",
            "skiplist_words",
            "do_query_expansion",
        ] {
            cfg.insert(k.into(), st[k].clone());
        }
        atomic_write(
            &dir.join("config_sentence_transformers.json"),
            &pretty(&Value::Object(cfg), 2)?,
        )?;
        // sentence_bert_config.json
        let max_seq = t
            .max_seq_length
            .unwrap_or(s.document_length.saturating_sub(1).max(1));
        atomic_write(
            &dir.join("sentence_bert_config.json"),
            &pretty(
                &json!({"max_seq_length": max_seq, "do_lower_case": t.do_lower_case}),
                4,
            )?,
        )?;
        // Backbone config and weights.
        let mut config = t.config.clone();
        if let Some(obj) = config.as_object_mut() {
            obj.insert("architectures".into(), json!([t.architecture()]));
            obj.insert("vocab_size".into(), json!(t.embedding_rows()));
            obj.remove("auto_map");
        }
        atomic_write(&dir.join("config.json"), &pretty(&config, 2)?)?;
        let mut weights: Vec<(String, candle_core::Tensor)> = t
            .weights
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        atomic_write(
            &dir.join("model.safetensors"),
            &safetensors_bytes(&weights)?,
        )?;
        // Tokenizer.
        let tok_json = t
            .tokenizer
            .to_string(true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        atomic_write(&dir.join("tokenizer.json"), tok_json.as_bytes())?;
        let pad = self.tokenizer().tokenizer.id_to_token(self.pad_id());
        let read = |name: &str| -> Option<serde_json::Map<String, Value>> {
            let text = std::fs::read_to_string(t.source.join(name)).ok()?;
            serde_json::from_str(&text).ok()
        };
        let mut tcfg = read("tokenizer_config.json").unwrap_or_else(|| {
            let mut m = serde_json::Map::new();
            if t.kind == crate::backbone::Kind::Bert {
                m.insert("tokenizer_class".into(), json!("BertTokenizer"));
                m.insert("do_lower_case".into(), json!(true));
            } else {
                m.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
            }
            m
        });
        let sp = &t.special;
        for (k, v) in [
            ("mask_token", &sp.mask),
            ("unk_token", &sp.unk),
            ("eos_token", &sp.eos),
        ] {
            if let Some(v) = v {
                tcfg.entry(k.to_string()).or_insert(json!(v));
            }
        }
        if let Some(p) = &pad {
            tcfg.insert("pad_token".into(), json!(p));
        }
        // Drop the slow-tokenizer added-token table: tokenizer.json is authoritative.
        tcfg.remove("added_tokens_decoder");
        atomic_write(
            &dir.join("tokenizer_config.json"),
            &pretty(&Value::Object(tcfg), 2)?,
        )?;
        if let Some(mut stm) = read("special_tokens_map.json") {
            if let Some(p) = &pad {
                stm.insert("pad_token".into(), json!(p));
            }
            atomic_write(
                &dir.join("special_tokens_map.json"),
                &pretty(&Value::Object(stm), 2)?,
            )?;
        }
        let vocab = t.source.join("vocab.txt");
        if vocab.is_file() {
            let bytes = std::fs::read(&vocab).map_err(|e| Error::io(&vocab, e))?;
            atomic_write(&dir.join("vocab.txt"), &bytes)?;
        }
        // Dense modules.
        for (i, d) in self.denses.iter().enumerate() {
            let sub = dir.join(format!("{}_Dense", i + 1));
            let c = serde_json::to_value(d.config()).map_err(|e| Error::Invalid(e.to_string()))?;
            atomic_write(&sub.join("config.json"), &pretty(&c, 4)?)?;
            atomic_write(
                &sub.join("model.safetensors"),
                &safetensors_bytes(&d.tensors())?,
            )?;
        }
        let card = format!(
            "---\ntags:\n- ColBERT\n- PyLate\n- sentence-transformers\n- sentence-similarity\n- feature-extraction\nlibrary_name: PyLate\npipeline_tag: sentence-similarity\n---\n\n# ColBERT model (saved by latte {})\n\nA PyLate-compatible ColBERT model.\n\n- Document length: {} tokens\n- Query length: {} tokens\n- Output dimensionality: {}\n- Similarity function: MaxSim\n\n```\n{}\n```\n",
            env!("CARGO_PKG_VERSION"),
            s.document_length,
            s.query_length,
            self.embedding_dim(),
            self
        );
        atomic_write(&dir.join("README.md"), card.as_bytes())?;
        Ok(())
    }
}
