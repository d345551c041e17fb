//! A [`DocumentSource`] reading `.npz` archives of float32 arrays lazily, one document at a time, with
//! positioned reads (the archive is never loaded whole). Handles what `numpy.savez` and `latte encode`
//! write: uncompressed (stored) entries `arr_0 … arr_{n-1}` holding C-order `<f4` 2-D arrays, zip64 included.

use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::plaid::DocumentSource;
use crate::{Error, Result};

/// Lazily read `.npz` embeddings plus their external ids.
#[derive(Debug)]
pub struct NpzSource {
    file: File,
    path: PathBuf,
    /// (data offset, rows) per array, in `arr_i` order.
    arrays: Vec<(u64, usize)>,
    dim: usize,
    ids: Vec<String>,
}

fn u16_at(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes([b[at], b[at + 1]]) as usize
}
fn u32_at(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl NpzSource {
    /// Opens `path` (reading only the zip directory and array headers). Fails with a clear error for
    /// compressed entries, other dtypes or ragged dimensions.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bad = |r: String| Error::Source(format!("{}: {r}", path.display()));
        let file = File::open(&path).at(&path)?;
        let len = file.metadata().at(&path)?.len();
        let tail_len = len.min(66_000);
        let mut tail = vec![0u8; tail_len as usize];
        file.read_exact_at(&mut tail, len - tail_len).at(&path)?;
        let eocd = (0..tail.len().saturating_sub(21))
            .rev()
            .find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
            .ok_or_else(|| bad("not a zip/npz archive".into()))?;
        let mut entries = u16_at(&tail, eocd + 10) as u64;
        let mut cd_size = u32_at(&tail, eocd + 12);
        let mut cd_off = u32_at(&tail, eocd + 16);
        if entries == 0xFFFF || cd_off == 0xFFFF_FFFF || cd_size == 0xFFFF_FFFF {
            // zip64 end of central directory locator sits just before the EOCD.
            let loc = eocd
                .checked_sub(20)
                .ok_or_else(|| bad("missing zip64 locator".into()))?;
            if tail[loc..loc + 4] != [0x50, 0x4b, 0x06, 0x07] {
                return Err(bad("missing zip64 locator".into()));
            }
            let z64 = u64_at(&tail, loc + 8);
            let mut rec = [0u8; 56];
            file.read_exact_at(&mut rec, z64).at(&path)?;
            if rec[..4] != [0x50, 0x4b, 0x06, 0x06] {
                return Err(bad("bad zip64 end record".into()));
            }
            entries = u64_at(&rec, 32);
            cd_size = u64_at(&rec, 40);
            cd_off = u64_at(&rec, 48);
        }
        let mut cd = vec![0u8; cd_size as usize];
        file.read_exact_at(&mut cd, cd_off).at(&path)?;
        let mut found: Vec<(usize, u64, usize, usize)> = Vec::with_capacity(entries as usize);
        let mut at = 0usize;
        for _ in 0..entries {
            if cd.len() < at + 46 || cd[at..at + 4] != [0x50, 0x4b, 0x01, 0x02] {
                return Err(bad("corrupt zip central directory".into()));
            }
            let method = u16_at(&cd, at + 10);
            let mut comp = u32_at(&cd, at + 20);
            let mut uncomp = u32_at(&cd, at + 24);
            let (nlen, xlen, clen) = (
                u16_at(&cd, at + 28),
                u16_at(&cd, at + 30),
                u16_at(&cd, at + 32),
            );
            let mut local = u32_at(&cd, at + 42);
            let name = String::from_utf8_lossy(&cd[at + 46..at + 46 + nlen]).to_string();
            let mut x = at + 46 + nlen;
            let xend = x + xlen;
            while x + 4 <= xend {
                let (tag, size) = (u16_at(&cd, x), u16_at(&cd, x + 2));
                if tag == 1 {
                    let mut p = x + 4;
                    for field in [&mut uncomp, &mut comp, &mut local] {
                        if *field == 0xFFFF_FFFF && p + 8 <= x + 4 + size {
                            *field = u64_at(&cd, p);
                            p += 8;
                        }
                    }
                }
                x += 4 + size;
            }
            at = xend + clen;
            if method != 0 || comp != uncomp {
                return Err(bad(format!(
                    "entry {name} is compressed; write it with numpy.savez (not savez_compressed) or latte encode"
                )));
            }
            let index: usize = name
                .strip_prefix("arr_")
                .and_then(|s| s.strip_suffix(".npy"))
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    bad(format!(
                        "unexpected entry {name:?}; expected arr_0.npy, arr_1.npy, …"
                    ))
                })?;
            let mut lh = [0u8; 30];
            file.read_exact_at(&mut lh, local).at(&path)?;
            let data = local + 30 + u16_at(&lh, 26) as u64 + u16_at(&lh, 28) as u64;
            let mut head = [0u8; 512];
            let hn = (uncomp as usize).min(512);
            file.read_exact_at(&mut head[..hn], data).at(&path)?;
            let (off, rows, cols) =
                parse_npy_header(&head[..hn]).map_err(|r| bad(format!("{name}: {r}")))?;
            if (uncomp as usize) < off + rows * cols * 4 {
                return Err(bad(format!("{name}: truncated array")));
            }
            found.push((index, data + off as u64, rows, cols));
        }
        found.sort_by_key(|f| f.0);
        if found.iter().enumerate().any(|(i, f)| f.0 != i) {
            return Err(bad("array names are not arr_0 … arr_{n-1}".into()));
        }
        let dim = found.first().map_or(0, |f| f.3);
        if let Some(f) = found.iter().find(|f| f.3 != dim) {
            return Err(bad(format!(
                "arr_{} has dimension {}, arr_0 has {dim}",
                f.0, f.3
            )));
        }
        let ids = (0..found.len()).map(|i| i.to_string()).collect();
        Ok(Self {
            file,
            path,
            arrays: found.into_iter().map(|f| (f.1, f.2)).collect(),
            dim,
            ids,
        })
    }

    /// Replaces the ids (by default `"0"`, `"1"`, …); there must be one per array.
    pub fn with_ids(mut self, ids: Vec<String>) -> Result<Self> {
        if ids.len() != self.arrays.len() {
            return Err(Error::Source(format!(
                "{}: {} arrays but {} ids",
                self.path.display(),
                self.arrays.len(),
                ids.len()
            )));
        }
        self.ids = ids;
        Ok(self)
    }
}

fn parse_npy_header(b: &[u8]) -> std::result::Result<(usize, usize, usize), String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("not a .npy array".into());
    }
    let (hlen, start) = if b[6] == 1 {
        (u16_at(b, 8), 10)
    } else {
        (u32_at(b, 8) as usize, 12)
    };
    let header = std::str::from_utf8(b.get(start..start + hlen).ok_or("header too long")?)
        .map_err(|_| "header is not text")?;
    if !header.contains("'descr': '<f4'") {
        return Err(format!(
            "dtype must be little-endian float32, header is {header}"
        ));
    }
    if header.contains("'fortran_order': True") {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or("no shape")?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| "bad shape"))
        .collect::<std::result::Result<_, _>>()?;
    match dims.as_slice() {
        [r, c] => Ok((start + hlen, *r, *c)),
        _ => Err(format!("expected a 2-D array, got shape {dims:?}")),
    }
}

impl DocumentSource for NpzSource {
    fn len(&self) -> usize {
        self.arrays.len()
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn id(&self, i: usize) -> String {
        self.ids[i].clone()
    }
    fn embeddings(&self, i: usize) -> Result<Cow<'_, [f32]>> {
        let (off, rows) = self.arrays[i];
        let mut bytes = vec![0u8; rows * self.dim * 4];
        self.file.read_exact_at(&mut bytes, off).at(&self.path)?;
        Ok(Cow::Owned(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ))
    }
}
