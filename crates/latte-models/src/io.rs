//! Reading configs and weights from model folders, writing them back atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads and parses a JSON file; `expected` says what the file is, for the error message.
pub fn read_json<T: DeserializeOwned>(path: &Path, expected: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                path: path.to_path_buf(),
                expected: expected.to_string(),
            }
        } else {
            Error::io(path, e)
        }
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::bad(path, format!("invalid JSON for {expected}: {e}")))
}

/// The weight files latte reads, in the order they are tried.
pub const WEIGHT_FILES: &[&str] = &[
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
];

/// Finds the weight file(s) of a folder: a single or sharded safetensors, or PyTorch `.bin`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for name in WEIGHT_FILES {
        let p = dir.join(name);
        if !p.is_file() {
            continue;
        }
        if name.ends_with(".index.json") {
            let index: serde_json::Value = read_json(&p, "a sharded checkpoint index")?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::bad(&p, "no \"weight_map\" object"))?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            for f in &files {
                if !f.is_file() {
                    return Err(Error::MissingFile {
                        path: f.clone(),
                        expected: format!("a weight shard listed in {}", p.display()),
                    });
                }
            }
            return Ok(files);
        }
        return Ok(vec![p]);
    }
    Err(Error::MissingFile {
        path: dir.join("model.safetensors"),
        expected: format!(
            "model weights (one of {} in {})",
            WEIGHT_FILES.join(", "),
            dir.display()
        ),
    })
}

/// Loads every tensor of a folder's weights as float32 (f16, bf16 and f64 are converted).
pub fn load_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for file in weight_files(dir)? {
        load_weight_file(&file, device, &mut out)?;
    }
    Ok(out)
}

/// Loads one `.safetensors` or `.bin` file into `out`, converted to float32.
pub fn load_weight_file(
    file: &Path,
    device: &Device,
    out: &mut HashMap<String, Tensor>,
) -> Result<()> {
    let is_st = file.extension().is_some_and(|e| e == "safetensors");
    let tensors: Vec<(String, Tensor)> = if is_st {
        candle_core::safetensors::load(file, device)
            .map_err(|e| Error::bad(file, e))?
            .into_iter()
            .collect()
    } else {
        candle_core::pickle::read_all(file).map_err(|e| Error::bad(file, e))?
    };
    for (name, t) in tensors {
        let t = match t.dtype() {
            DType::F32 => t,
            DType::F16 | DType::BF16 | DType::F64 => t.to_dtype(DType::F32)?,
            _ => t,
        };
        out.insert(name, t.to_device(device)?);
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (latte-core's [`latte_core::atomic::replace`]: temporary file in the
/// same folder, fsync, rename, fsync of the folder), creating the folder first, so that a crash never leaves
/// a half-written file at `path`.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    latte_core::atomic::replace(path, bytes).map_err(|e| match e {
        latte_core::Error::Io { path, source, .. } => Error::io(path, source),
        other => Error::Invalid(other.to_string()),
    })
}

/// Serialises float32 tensors to safetensors bytes (keys sorted, as the Python library writes them).
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        owned.push((name.clone(), t.dims().to_vec(), bytes));
    }
    owned.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Invalid(format!("safetensors: {e}")))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| Error::Invalid(format!("safetensors: {e}")))
}
