//! Reading and writing numpy `.npy` / `.npz` files of 2-D float32 arrays.
//!
//! `latte encode` writes one `(tokens, dim)` float32 array per text as `arr_0 … arr_{n-1}`, the layout
//! `numpy.savez` produces, so `numpy.load(path)["arr_0"]` reads it back. Reading accepts float32, float16
//! and float64 arrays in C or Fortran order and converts them to float32.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// A dense row-major 2-D float32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Number of rows (tokens).
    pub rows: usize,
    /// Number of columns (embedding dimension).
    pub cols: usize,
    /// `rows * cols` values, row-major.
    pub data: Vec<f32>,
}

fn npy_header(shape: &[usize]) -> Vec<u8> {
    let shape_str = match shape {
        [n] => format!("({n},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_str}, }}");
    // Magic (6) + version (2) + header len (2) + dict + '\n' must be a multiple of 64.
    let unpadded = 10 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    dict.push_str(&" ".repeat(pad));
    dict.push('\n');
    let mut out = Vec::with_capacity(10 + dict.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Serialises one float32 array as `.npy` bytes.
pub fn npy_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let mut out = npy_header(shape);
    out.reserve(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes arrays `arr_0 … arr_{n-1}` to an `.npz` file atomically: the archive is written to a temporary
/// file beside `path`, flushed to disk and renamed, so a failure leaves nothing partial at `path`.
pub fn write_npz(path: &Path, arrays: &[Matrix]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    {
        let mut zip = zip::ZipWriter::new(BufWriter::new(tmp.as_file()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        for (i, m) in arrays.iter().enumerate() {
            zip.start_file(format!("arr_{i}.npy"), opts)?;
            zip.write_all(&npy_bytes(&[m.rows, m.cols], &m.data))?;
        }
        let mut w = zip.finish()?;
        w.flush()?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn parse_npy(name: &str, bytes: &[u8]) -> Result<Matrix> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("{name}: not a .npy array (bad magic)");
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                bail!("{name}: truncated .npy header");
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => bail!("{name}: unsupported .npy version {v}"),
    };
    if bytes.len() < hstart + hlen {
        bail!("{name}: truncated .npy header");
    }
    let header = std::str::from_utf8(&bytes[hstart..hstart + hlen])
        .with_context(|| format!("{name}: .npy header is not text"))?;
    let field = |key: &str| -> Result<&str> {
        let k = format!("'{key}':");
        let at = header
            .find(&k)
            .with_context(|| format!("{name}: .npy header lacks '{key}'"))?;
        Ok(header[at + k.len()..].trim_start())
    };
    let descr = field("descr")?;
    let descr = descr[1..].split('\'').next().unwrap_or("");
    let fortran = field("fortran_order")?.starts_with("True");
    let shape_s = field("shape")?;
    let shape_s = &shape_s[1..shape_s.find(')').context("bad shape")?];
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{name}: bad shape in .npy header"))?;
    let (rows, cols) = match shape.as_slice() {
        [r, c] => (*r, *c),
        [c] => (1, *c),
        other => bail!("{name}: expected a 2-D array (tokens × dim), got shape {other:?}"),
    };
    let body = &bytes[hstart + hlen..];
    let n = rows * cols;
    let (width, little) = match descr {
        "<f4" | "=f4" | "|f4" => (4, true),
        ">f4" => (4, false),
        "<f2" | "=f2" => (2, true),
        "<f8" | "=f8" => (8, true),
        other => bail!("{name}: unsupported dtype {other:?}; expected float32, float16 or float64"),
    };
    if body.len() < n * width {
        bail!(
            "{name}: truncated data: expected {} bytes, got {}",
            n * width,
            body.len()
        );
    }
    let mut data: Vec<f32> = (0..n)
        .map(|i| {
            let b = &body[i * width..(i + 1) * width];
            match width {
                4 if little => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                4 => f32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                2 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                _ => f64::from_le_bytes(b.try_into().unwrap()) as f32,
            }
        })
        .collect();
    if fortran && rows > 1 && cols > 1 {
        let mut t = vec![0f32; n];
        for r in 0..rows {
            for c in 0..cols {
                t[r * cols + c] = data[c * rows + r];
            }
        }
        data = t;
    }
    Ok(Matrix { rows, cols, data })
}

/// Reads every array of an `.npz` file, ordered `arr_0, arr_1, …` numerically when the names follow
/// that pattern, and by name otherwise.
pub fn read_npz(path: &Path) -> Result<Vec<(String, Matrix)>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not an .npz (zip) archive", path.display()))?;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i)?;
        let name = entry.name().trim_end_matches(".npy").to_string();
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes)?;
        out.push((
            name.clone(),
            parse_npy(&format!("{}:{name}", path.display()), &bytes)?,
        ));
    }
    let key = |n: &str| n.strip_prefix("arr_").and_then(|s| s.parse::<usize>().ok());
    if out.iter().all(|(n, _)| key(n).is_some()) {
        out.sort_by_key(|(n, _)| key(n).unwrap());
    } else {
        out.sort_by(|a, b| a.0.cmp(&b.0));
    }
    Ok(out)
}

/// Reads one `.npy` file holding a 2-D array.
pub fn read_npy(path: &Path) -> Result<Matrix> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_npy(&path.display().to_string(), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npz_round_trip_keeps_order_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npz");
        let arrays: Vec<Matrix> = (0..12)
            .map(|i| Matrix {
                rows: i % 3 + 1,
                cols: 4,
                data: (0..(i % 3 + 1) * 4)
                    .map(|v| v as f32 * 0.5 + i as f32)
                    .collect(),
            })
            .collect();
        write_npz(&p, &arrays).unwrap();
        let back = read_npz(&p).unwrap();
        assert_eq!(back.len(), 12);
        for (i, (name, m)) in back.iter().enumerate() {
            assert_eq!(name, &format!("arr_{i}"));
            assert_eq!(m, &arrays[i]);
        }
    }

    #[test]
    fn header_is_64_byte_aligned() {
        let b = npy_bytes(&[3, 128], &[0.0; 384]);
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
    }

    #[test]
    fn truncated_npy_is_an_error() {
        let b = npy_bytes(&[3, 4], &[1.0; 12]);
        let err = parse_npy("t", &b[..b.len() - 5]).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
