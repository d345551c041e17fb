//! Resolving a model name to a local folder: a path on disk, or a Hugging Face Hub id fetched through
//! `hf-hub` into the standard cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`).
//! With `HF_HUB_OFFLINE=1` (or [`HubOptions::offline`]) only the cache is read.

use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};

use crate::{Error, Result};

/// Where and how to look for Hub models.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Cache folder (the `hub` folder holding `models--org--name`); `None` uses the environment.
    pub cache_dir: Option<PathBuf>,
    /// Git revision (branch, tag or commit); `None` is `main`.
    pub revision: Option<String>,
    /// Never touch the network; `None` reads `HF_HUB_OFFLINE`.
    pub offline: Option<bool>,
    /// Access token; `None` uses `HF_TOKEN` or the token file of the cache.
    pub token: Option<String>,
}

/// The files a model folder may hold; each is fetched when present on the Hub.
const OPTIONAL_FILES: &[&str] = &[
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "artifact.metadata",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
];

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The Hub cache folder from the options or the environment.
pub fn cache_dir(opts: &HubOptions) -> PathBuf {
    if let Some(d) = &opts.cache_dir {
        return d.clone();
    }
    if let Ok(d) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(d);
    }
    if let Ok(d) = std::env::var("HF_HOME") {
        return PathBuf::from(d).join("hub");
    }
    let home = std::env::var("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether the offline mode is on.
pub fn is_offline(opts: &HubOptions) -> bool {
    opts.offline
        .unwrap_or_else(|| env_flag("HF_HUB_OFFLINE") || env_flag("TRANSFORMERS_OFFLINE"))
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    (parts.len() == 2 || parts.len() == 1)
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        && !s.starts_with('.')
}

/// A file getter over one Hub repository, from the cache (and the network unless offline).
pub struct HubRepo {
    id: String,
    cache: PathBuf,
    revision: String,
    api: Option<hf_hub::api::sync::ApiRepo>,
}

impl HubRepo {
    fn open(id: &str, opts: &HubOptions) -> Result<Self> {
        let revision = opts.revision.clone().unwrap_or_else(|| "main".into());
        let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision);
        let dir = cache_dir(opts);
        let api = if is_offline(opts) {
            None
        } else {
            let token = opts
                .token
                .clone()
                .or_else(|| std::env::var("HF_TOKEN").ok());
            let mut b = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(dir.clone()))
                .with_progress(false);
            if token.is_some() {
                b = b.with_token(token);
            }
            if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
                b = b.with_endpoint(endpoint);
            }
            let api = b.build().map_err(|e| Error::Resolve {
                model: id.to_string(),
                reason: e.to_string(),
            })?;
            Some(api.repo(repo))
        };
        Ok(Self {
            id: id.to_string(),
            cache: dir,
            revision: opts.revision.clone().unwrap_or_else(|| "main".into()),
            api,
        })
    }

    /// The local path of `file`, downloading it when online; `None` when the repository lacks it.
    pub fn get(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(p) = cache_lookup(&self.cache, &self.id, &self.revision, file) {
            return Ok(Some(p));
        }
        let Some(api) = &self.api else {
            return Ok(None);
        };
        match api.get(file) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e)) if is_not_found(&e) => Ok(None),
            Err(e) => Err(Error::Resolve {
                model: self.id.clone(),
                reason: format!("downloading {file}: {e}"),
            }),
        }
    }
}

fn is_not_found(e: &ureq::Error) -> bool {
    matches!(e, ureq::Error::Status(404 | 401, _))
}

/// Finds `file` of `repo` in the cache layout `models--org--name/{refs,snapshots}/…`; the revision is a
/// ref name (resolved through `refs/`) or a commit hash.
pub fn cache_lookup(cache: &Path, id: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let folder = cache.join(format!("models--{}", id.replace('/', "--")));
    let commit = std::fs::read_to_string(folder.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let p = folder.join("snapshots").join(commit).join(file);
    p.exists().then_some(p)
}

/// Resolves `model` to a local folder holding its files. A path that exists is used as it is; anything
/// else is treated as a Hub id whose files are fetched into (or read from) the cache, and the snapshot
/// folder is returned (with every module sub-folder that `modules.json` names).
pub fn resolve(model: &str, opts: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(Error::Resolve {
            model: model.into(),
            reason: "this is a file; expected a model folder or a Hugging Face Hub id".into(),
        });
    }
    if !looks_like_hub_id(model) {
        return Err(Error::Resolve {
            model: model.into(),
            reason: "no such folder, and not a valid Hugging Face Hub id".into(),
        });
    }
    let repo = HubRepo::open(model, opts)?;
    let mut snapshot: Option<PathBuf> = None;
    let mut fetched = Vec::new();
    for f in OPTIONAL_FILES {
        if let Some(p) = repo.get(f)? {
            snapshot.get_or_insert_with(|| p.parent().unwrap().to_path_buf());
            fetched.push(*f);
            if *f == "model.safetensors" {
                // Skip the .bin fallback once safetensors weights are there.
                break;
            }
        }
    }
    let needs_config = !fetched.contains(&"config.json");
    if needs_config {
        if let Some(p) = repo.get("config.json")? {
            snapshot.get_or_insert_with(|| p.parent().unwrap().to_path_buf());
        }
    }
    let Some(dir) = snapshot else {
        let reason = if is_offline(opts) {
            format!(
                "not in the Hub cache {} and offline mode is on (HF_HUB_OFFLINE, --offline or local_files_only): \
                 download it once without offline mode, or give a local folder",
                cache_dir(opts).display()
            )
        } else {
            "no such repository on the Hub, or it has none of the files of a model".to_string()
        };
        return Err(Error::Resolve {
            model: model.into(),
            reason,
        });
    };
    // Shards of a sharded checkpoint.
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        fetch_shards(&repo, &index, "")?;
    }
    // Module sub-folders.
    if let Ok(text) = std::fs::read_to_string(dir.join("modules.json")) {
        if let Ok(serde_json::Value::Array(mods)) = serde_json::from_str(&text) {
            for m in mods {
                let sub = m.get("path").and_then(|p| p.as_str()).unwrap_or("");
                if sub.is_empty() {
                    continue;
                }
                for f in [
                    "config.json",
                    "model.safetensors",
                    "pytorch_model.bin",
                    "sentence_bert_config.json",
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "special_tokens_map.json",
                    "vocab.txt",
                    "model.safetensors.index.json",
                ] {
                    repo.get(&format!("{sub}/{f}"))?;
                }
                let sub_index = dir.join(sub).join("model.safetensors.index.json");
                if sub_index.is_file() {
                    fetch_shards(&repo, &sub_index, sub)?;
                }
            }
        }
    }
    Ok(dir)
}

fn fetch_shards(repo: &HubRepo, index: &Path, sub: &str) -> Result<()> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::bad(index, e))?;
    let mut shards: Vec<&str> = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| m.values().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default();
    shards.sort();
    shards.dedup();
    for s in shards {
        let name = if sub.is_empty() {
            s.to_string()
        } else {
            format!("{sub}/{s}")
        };
        if repo.get(&name)?.is_none() {
            return Err(Error::Resolve {
                model: repo.id.clone(),
                reason: format!("shard {name} is missing"),
            });
        }
    }
    Ok(())
}
