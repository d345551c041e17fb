//! ColBERT tokenisation exactly as PyLate does it: strip, tokenise with truncation to `length − 1`,
//! insert the prefix id at position 1, pad queries with the mask token up to `query_length` (query
//! expansion) and documents to the longest in the batch.

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokenizers::{
    AddedToken, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::{Error, Result};

/// Special tokens read from `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    /// `mask_token`.
    pub mask: Option<String>,
    /// `eos_token`.
    pub eos: Option<String>,
    /// `pad_token`.
    pub pad: Option<String>,
    /// `unk_token`.
    pub unk: Option<String>,
}

fn token_field(v: &serde_json::Value, key: &str) -> Option<String> {
    match v.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl SpecialTokens {
    /// Reads the special tokens of the tokenizer in `dir`, falling back to the defaults of the
    /// tokenizer class transformers would use.
    pub fn read(dir: &Path) -> Self {
        let mut out = SpecialTokens::default();
        let mut class = String::new();
        for file in ["special_tokens_map.json", "tokenizer_config.json"] {
            let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if let Some(c) = v.get("tokenizer_class").and_then(|c| c.as_str()) {
                class = c.to_string();
            }
            // tokenizer_config.json is read last and wins, as in transformers.
            out.mask = token_field(&v, "mask_token").or(out.mask);
            out.eos = token_field(&v, "eos_token").or(out.eos);
            out.pad = token_field(&v, "pad_token").or(out.pad);
            out.unk = token_field(&v, "unk_token").or(out.unk);
        }
        if class.is_empty() && !dir.join("tokenizer_config.json").is_file() {
            // No tokenizer_config.json: transformers' AutoTokenizer then picks the tokenizer class from
            // config.json's `model_type` and that class's default special tokens, and PyLate loads the model.
            // Do the same rather than refuse; model types without class defaults (ModernBERT, Gemma …) end
            // in the loader's error naming the missing tokenizer_config.json.
            class = std::fs::read_to_string(dir.join("config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v.get("model_type")?.as_str().map(str::to_string))
                .map(|t| match t.as_str() {
                    "bert" => "BertTokenizerFast",
                    "distilbert" => "DistilBertTokenizerFast",
                    "electra" => "ElectraTokenizerFast",
                    "roberta" => "RobertaTokenizerFast",
                    "xlm-roberta" => "XLMRobertaTokenizerFast",
                    "camembert" => "CamembertTokenizerFast",
                    _ => "",
                })
                .unwrap_or_default()
                .to_string();
        }
        let defaults: Option<(&str, Option<&str>, &str, &str)> = if class.starts_with("Bert")
            || class.starts_with("DistilBert")
            || class.starts_with("Electra")
            || class.starts_with("HF_ColBERT")
        {
            Some(("[MASK]", None, "[PAD]", "[UNK]"))
        } else if class.contains("Roberta") || class.starts_with("Camembert") {
            Some(("<mask>", Some("</s>"), "<pad>", "<unk>"))
        } else {
            None
        };
        if let Some((m, e, p, u)) = defaults {
            out.mask.get_or_insert_with(|| m.to_string());
            if let Some(e) = e {
                out.eos.get_or_insert_with(|| e.to_string());
            }
            out.pad.get_or_insert_with(|| p.to_string());
            out.unk.get_or_insert_with(|| u.to_string());
        }
        out
    }
}

/// Loads `tokenizer.json`, or builds a BERT WordPiece tokenizer from `vocab.txt` when only that exists.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let json = dir.join("tokenizer.json");
    let mut tok = if json.is_file() {
        Tokenizer::from_file(&json).map_err(|e| Error::bad(&json, e))?
    } else if dir.join("vocab.txt").is_file() {
        bert_from_vocab(dir)?
    } else {
        return Err(Error::MissingFile {
            path: json,
            expected: "a Hugging Face tokenizer (tokenizer.json, or vocab.txt for BERT)".into(),
        });
    };
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(tok)
}

fn bert_from_vocab(dir: &Path) -> Result<Tokenizer> {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::bert::BertProcessing;
    let vocab = dir.join("vocab.txt");
    let lower = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
        .unwrap_or(true);
    let wp = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| Error::bad(&vocab, e))?;
    let cls = wp_id(&wp, "[CLS]", &vocab)?;
    let sep = wp_id(&wp, "[SEP]", &vocab)?;
    let mut tok = Tokenizer::new(wp);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, lower)))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(tok)
}

fn wp_id(wp: &tokenizers::models::wordpiece::WordPiece, t: &str, path: &Path) -> Result<u32> {
    use tokenizers::Model;
    wp.token_to_id(t)
        .ok_or_else(|| Error::bad(path, format!("vocabulary has no {t} token")))
}

/// Python's `str.strip()`: Unicode whitespace plus the ASCII separators `\x1c`–`\x1f`.
pub fn py_strip(s: &str) -> &str {
    let ws = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    s.trim_matches(ws)
}

/// One tokenised text before batching: ids and attention mask, prefix included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// Token ids.
    pub ids: Vec<u32>,
    /// 1 for attended tokens, 0 for padding.
    pub mask: Vec<u32>,
}

/// The ColBERT tokenizer: a Hugging Face tokenizer plus PyLate's prefix, length and padding rules.
#[derive(Debug, Clone)]
pub struct ColbertTokenizer {
    /// The underlying tokenizer (prefix tokens already added). Build a new `ColbertTokenizer` rather than
    /// changing it in place: the truncating copies [`Self::encode`] keeps are made from it once per length.
    pub tokenizer: Tokenizer,
    /// Lower-case texts before tokenising (`do_lower_case` of `sentence_bert_config.json`).
    pub do_lower_case: bool,
    /// Id used for padding and query expansion (mask, else EOS, else pad).
    pub pad_id: u32,
    /// `tokenizer` with truncation set, one per maximum length used so far (a query and a document length,
    /// usually): a tokenizer clone copies its whole vocabulary, which cost more than encoding one query.
    truncating: Arc<Mutex<TruncatingCopies>>,
}

/// Truncating copies of a tokenizer, by maximum length.
type TruncatingCopies = Vec<(usize, Arc<Tokenizer>)>;

impl ColbertTokenizer {
    /// A ColBERT tokenizer over `tokenizer`.
    pub fn new(tokenizer: Tokenizer, do_lower_case: bool, pad_id: u32) -> Self {
        Self {
            tokenizer,
            do_lower_case,
            pad_id,
            truncating: Arc::default(),
        }
    }

    /// `tokenizer` truncating to `max_len` tokens, special tokens included (made once per length).
    fn truncating(&self, max_len: usize) -> Result<Arc<Tokenizer>> {
        let mut cache = self.truncating.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = cache.iter().find(|(l, _)| *l == max_len) {
            return Ok(t.clone());
        }
        let mut tok = self.tokenizer.clone();
        tok.with_truncation(Some(TruncationParams {
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let tok = Arc::new(tok);
        if cache.len() >= 8 {
            cache.remove(0);
        }
        cache.push((max_len, tok.clone()));
        Ok(tok)
    }

    /// The id of `token` as `convert_tokens_to_ids` gives it: the vocab id, else the unknown-token id.
    pub fn token_id(&self, token: &str, unk: Option<&str>) -> Option<u32> {
        self.tokenizer
            .token_to_id(token)
            .or_else(|| unk.and_then(|u| self.tokenizer.token_to_id(u)))
    }

    /// Tokenises `texts`: each is stripped (and lower-cased when configured), truncated to
    /// `max_len` tokens including special tokens and, when `prefix` is given, the prefix id inserted at
    /// position 1 (so the result is at most `max_len + 1` long). No padding.
    pub fn encode(
        &self,
        texts: &[String],
        max_len: usize,
        prefix: Option<u32>,
    ) -> Result<Vec<Tokenized>> {
        let tok = self.truncating(max_len)?;
        let inputs: Vec<String> = texts
            .iter()
            .map(|t| {
                let s = py_strip(t);
                if self.do_lower_case {
                    s.to_lowercase()
                } else {
                    s.to_string()
                }
            })
            .collect();
        let encodings = tok
            .encode_batch(inputs, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| {
                let mut ids = e.get_ids().to_vec();
                let mut mask = e.get_attention_mask().to_vec();
                if let Some(p) = prefix {
                    let at = ids.len().min(1);
                    ids.insert(at, p);
                    mask.insert(at, 1);
                }
                Tokenized { ids, mask }
            })
            .collect())
    }
}
