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
        read_safetensors(file)?
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

/// Largest safetensors header read (the format's own limit).
const MAX_HEADER: u64 = 100 << 20;

/// Reads a `.safetensors` file tensor by tensor, straight into each tensor's own buffer: float32 data is read
/// into the `Vec<f32>` the tensor keeps (one copy from the page cache, no whole-file buffer: loading a
/// 440 MB checkpoint needs 440 MB, not twice that), other dtypes through candle's conversion. The header is
/// validated before any data is read: every tensor's bytes must match its dtype and shape and lie inside
/// the file.
fn read_safetensors(file: &Path) -> Result<Vec<(String, Tensor)>> {
    use candle_core::safetensors::Load;
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(file, e))?.len();
    let bad = |what: String| Error::bad(file, format!("not a valid safetensors file: {what}"));
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| {
        bad(format!(
            "{file_len} bytes, shorter than the 8-byte header length"
        ))
    })?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || 8 + n > file_len {
        return Err(bad(format!(
            "header length {n} does not fit a {file_len}-byte file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(file, e))?;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let data_len = file_len - 8 - n;
    let mut infos: Vec<(String, safetensors::tensor::TensorInfo)> =
        Vec::with_capacity(header.len());
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let info: safetensors::tensor::TensorInfo =
            serde_json::from_value(v).map_err(|e| bad(format!("tensor {name:?}: {e}")))?;
        let (a, b) = info.data_offsets;
        let bits = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize(), |acc, &d| acc.checked_mul(d));
        if b < a || b as u64 > data_len || bits != Some((b - a) * 8) {
            return Err(bad(format!(
                "tensor {name:?} ({:?} {:?}) has data offsets {a}..{b} in {data_len} bytes of data",
                info.dtype, info.shape
            )));
        }
        infos.push((name, info));
    }
    // In file order, so the reads are sequential.
    infos.sort_by_key(|(_, i)| i.data_offsets.0);
    let start = 8 + n;
    let mut out = Vec::with_capacity(infos.len());
    let mut bytes = Vec::new();
    for (name, info) in infos {
        let (a, b) = info.data_offsets;
        f.seek(SeekFrom::Start(start + a as u64))
            .map_err(|e| Error::io(file, e))?;
        let t = if info.dtype == safetensors::Dtype::F32 {
            let mut v = vec![0f32; (b - a) / 4];
            f.read_exact(bytemuck::cast_slice_mut(&mut v))
                .map_err(|e| Error::io(file, e))?;
            if cfg!(target_endian = "big") {
                v.iter_mut()
                    .for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
            }
            Tensor::from_vec(v, info.shape, &Device::Cpu)?
        } else {
            bytes.resize(b - a, 0u8);
            f.read_exact(&mut bytes).map_err(|e| Error::io(file, e))?;
            safetensors::tensor::TensorView::new(info.dtype, info.shape, &bytes)
                .map_err(|e| bad(format!("tensor {name:?}: {e}")))?
                .load(&Device::Cpu)
                .map_err(|e| Error::bad(file, format!("tensor {name:?}: {e}")))?
        };
        out.push((name, t));
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("latte-io-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("model.safetensors")
    }

    #[test]
    fn safetensors_read_tensor_by_tensor_equal_candles_loader() {
        let path = tmp("roundtrip");
        let dev = Device::Cpu;
        let f32s = Tensor::from_vec(
            (0..60).map(|i| i as f32 * 0.37 - 9.0).collect::<Vec<_>>(),
            (3, 4, 5),
            &dev,
        )
        .unwrap();
        let bf16 = Tensor::from_vec(vec![1.5f32, -2.25, 3.0, 0.125], 4, &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let ids = Tensor::from_vec(vec![7i64, -1, 40], 3, &dev).unwrap();
        let empty = Tensor::zeros((0, 3), DType::F32, &dev).unwrap();
        let map: HashMap<String, Tensor> = [
            ("b.weight", f32s),
            ("a.bf16", bf16),
            ("c.position_ids", ids),
            ("d.empty", empty),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        let mut ours = HashMap::new();
        load_weight_file(&path, &dev, &mut ours).unwrap();
        let theirs = candle_core::safetensors::load(&path, &dev).unwrap();
        assert_eq!(ours.len(), 4);
        for (name, want) in theirs {
            let got = &ours[&name];
            // Float tensors come back as float32 (bf16 widened), the others keep their dtype.
            let want = if want.dtype().is_float() {
                want.to_dtype(DType::F32).unwrap()
            } else {
                want
            };
            assert_eq!(got.dtype(), want.dtype(), "{name}");
            assert_eq!(got.dims(), want.dims(), "{name}");
            let diff = got
                .to_dtype(DType::F64)
                .unwrap()
                .sub(&want.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .map(|m| m.to_scalar::<f64>().unwrap())
                .unwrap_or(0.0);
            assert_eq!(diff, 0.0, "{name}");
        }
    }

    #[test]
    fn a_damaged_safetensors_file_is_an_error_naming_it() {
        let path = tmp("damaged");
        let dev = Device::Cpu;
        let t = Tensor::ones((8, 8), DType::F32, &dev).unwrap();
        candle_core::safetensors::save(&HashMap::from([("w".to_string(), t)]), &path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&good[8..8 + n]).unwrap().to_string();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated data", good[..good.len() - 4].to_vec()),
            ("no header", good[..5].to_vec()),
            ("header longer than the file", {
                let mut b = good.clone();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                b
            }),
            ("offsets that disagree with the shape", {
                let lie = header.replace("[8,8]", "[8,9]");
                assert_ne!(lie, header);
                let mut b = (lie.len() as u64).to_le_bytes().to_vec();
                b.extend_from_slice(lie.as_bytes());
                b.extend_from_slice(&good[8 + n..]);
                b
            }),
            ("a header that is not JSON", {
                let mut b = good.clone();
                b[8] = b'#';
                b
            }),
        ];
        for (what, bytes) in cases {
            std::fs::write(&path, bytes).unwrap();
            let err = load_weight_file(&path, &dev, &mut HashMap::new())
                .expect_err(what)
                .to_string();
            assert!(
                err.contains(&path.display().to_string()),
                "{what}: the error does not name the file: {err}"
            );
        }
    }
}
