//! numpy `.npy` / `.npz` files of 2-D float arrays: one header parser, whole-file reading, lazy per-array
//! reading, and writing.
//!
//! `latte encode` writes one `(tokens, dim)` float32 array per text as `arr_0 … arr_{n-1}`, the layout
//! `numpy.savez` produces, so `numpy.load(path)["arr_0"]` reads it back. [`read_npz`] / [`read_npy`] accept
//! float32, float16 and float64 arrays in C or Fortran order (compressed archives included) and convert them to
//! float32. [`NpzArchive`] reads the uncompressed little-endian float32 C-order archives that `latte encode` and
//! `numpy.savez` write one array at a time with positioned reads, so the archive is never loaded whole.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::matrix::Matrix;
use crate::{atomic, Error, Result};

/// Element types this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// Little-endian float32 (`<f4`).
    F32Le,
    /// Big-endian float32 (`>f4`).
    F32Be,
    /// Little-endian float16 (`<f2`).
    F16Le,
    /// Little-endian float64 (`<f8`).
    F64Le,
}

impl Dtype {
    fn width(self) -> usize {
        match self {
            Dtype::F32Le | Dtype::F32Be => 4,
            Dtype::F16Le => 2,
            Dtype::F64Le => 8,
        }
    }
}

/// A parsed `.npy` header of a 1-D or 2-D array (a 1-D array is read as one row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// Element type.
    pub dtype: Dtype,
    /// Whether the data is stored column-major.
    pub fortran_order: bool,
    /// Rows (1 for a 1-D array).
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Where the data starts, counted from the start of the `.npy` bytes.
    pub data_offset: usize,
}

impl NpyHeader {
    /// Bytes of data the header announces.
    pub fn data_len(&self) -> Option<usize> {
        self.rows
            .checked_mul(self.cols)
            .and_then(|n| n.checked_mul(self.dtype.width()))
    }
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

/// Serialises one float32 array as `.npy` bytes (little-endian, C order).
pub fn npy_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let mut out = npy_header(shape);
    out.reserve(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Parses the header at the start of `.npy` bytes (the whole array, or at least its header). `name` is the
/// file (or `file:entry`) that errors name.
pub fn parse_npy_header(name: &Path, bytes: &[u8]) -> Result<NpyHeader> {
    let bad = |r: String| Error::npz(name, r);
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy array (bad magic)".into()));
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad("truncated .npy header".into()));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(bad(format!("unsupported .npy version {v}"))),
    };
    let header = bytes
        .get(hstart..hstart + hlen)
        .ok_or_else(|| bad("truncated .npy header".into()))?;
    let header = std::str::from_utf8(header).map_err(|_| bad(".npy header is not text".into()))?;
    let field = |key: &str| -> Result<&str> {
        let k = format!("'{key}':");
        let at = header
            .find(&k)
            .ok_or_else(|| bad(format!(".npy header lacks '{key}'")))?;
        Ok(header[at + k.len()..].trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .get(1..)
        .unwrap_or("")
        .split('\'')
        .next()
        .unwrap_or("");
    let dtype = match descr {
        "<f4" | "=f4" | "|f4" => Dtype::F32Le,
        ">f4" => Dtype::F32Be,
        "<f2" | "=f2" => Dtype::F16Le,
        "<f8" | "=f8" => Dtype::F64Le,
        other => {
            return Err(bad(format!(
                "unsupported dtype {other:?}; expected float32, float16 or float64"
            )))
        }
    };
    let fortran_order = field("fortran_order")?.starts_with("True");
    let shape_s = field("shape")?;
    let close = shape_s
        .find(')')
        .ok_or_else(|| bad("bad shape in .npy header".into()))?;
    let shape: Vec<usize> = shape_s
        .get(1..close)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad("bad shape in .npy header".into()))?;
    let (rows, cols) = match shape.as_slice() {
        [r, c] => (*r, *c),
        [c] => (1, *c),
        other => {
            return Err(bad(format!(
                "expected a 2-D array (tokens × dim), got shape {other:?}"
            )))
        }
    };
    Ok(NpyHeader {
        dtype,
        fortran_order,
        rows,
        cols,
        data_offset: hstart + hlen,
    })
}

/// Parses a whole `.npy` array into a float32 matrix.
pub fn parse_npy(name: &Path, bytes: &[u8]) -> Result<Matrix> {
    let h = parse_npy_header(name, bytes)?;
    let need = h
        .data_len()
        .ok_or_else(|| Error::npz(name, "array size overflows"))?;
    let body = &bytes[h.data_offset..];
    if body.len() < need {
        return Err(Error::npz(
            name,
            format!("truncated data: expected {need} bytes, got {}", body.len()),
        ));
    }
    let (rows, cols) = (h.rows, h.cols);
    let n = rows * cols;
    let width = h.dtype.width();
    let mut data: Vec<f32> = body[..need]
        .chunks_exact(width)
        .map(|b| match h.dtype {
            Dtype::F32Le => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Dtype::F32Be => f32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            Dtype::F16Le => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::F64Le => {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
            }
        })
        .collect();
    if h.fortran_order && rows > 1 && cols > 1 {
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

/// Writes arrays `arr_0 … arr_{n-1}` to an uncompressed `.npz` file atomically (see [`atomic`]): a failure
/// leaves nothing partial at `path`.
pub fn write_npz(path: &Path, arrays: &[Matrix]) -> Result<()> {
    atomic::replace_with(path, |w| {
        let mut zip = zip::ZipWriter::new(w);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        for (i, m) in arrays.iter().enumerate() {
            zip.start_file(format!("arr_{i}.npy"), opts)
                .map_err(std::io::Error::other)?;
            zip.write_all(&npy_bytes(&[m.rows, m.cols], &m.data))?;
        }
        zip.finish().map_err(std::io::Error::other)?;
        Ok(())
    })
}

fn entry_name(path: &Path, name: &str) -> PathBuf {
    PathBuf::from(format!("{}:{name}", path.display()))
}

/// Reads every array of an `.npz` file, ordered `arr_0, arr_1, …` numerically when the names follow
/// that pattern, and by name otherwise.
pub fn read_npz(path: &Path) -> Result<Vec<(String, Matrix)>> {
    let file = File::open(path).map_err(|e| Error::io(path, ".npz archive", e))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| Error::npz(path, format!("not an .npz (zip) archive: {e}")))?;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| Error::npz(path, format!("corrupt archive entry {i}: {e}")))?;
        let name = entry.name().trim_end_matches(".npy").to_string();
        let mut bytes = Vec::with_capacity((entry.size() as usize).min(1 << 30));
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| Error::npz(entry_name(path, &name), format!("cannot read: {e}")))?;
        let m = parse_npy(&entry_name(path, &name), &bytes)?;
        out.push((name, m));
    }
    let key = |n: &str| n.strip_prefix("arr_").and_then(|s| s.parse::<usize>().ok());
    if out.iter().all(|(n, _)| key(n).is_some()) {
        out.sort_by_key(|(n, _)| key(n));
    } else {
        out.sort_by(|a, b| a.0.cmp(&b.0));
    }
    Ok(out)
}

/// Reads one `.npy` file holding a 1-D or 2-D array.
pub fn read_npy(path: &Path) -> Result<Matrix> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, ".npy array", e))?;
    parse_npy(path, &bytes)
}

fn le(b: &[u8], at: usize, n: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(n)?)?;
    Some(s.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
}

/// An `.npz` archive opened for lazy reading: only the zip directory and the array headers are read on
/// open; [`NpzArchive::read`] reads one array with a positioned read. Handles uncompressed (stored) entries
/// `arr_0 … arr_{n-1}` holding little-endian float32 C-order 2-D arrays of one dimension, zip64 included.
#[derive(Debug)]
pub struct NpzArchive {
    file: File,
    path: PathBuf,
    /// (data offset, rows) per array, in `arr_i` order.
    arrays: Vec<(u64, usize)>,
    dim: usize,
}

impl NpzArchive {
    /// Opens `path`. Fails with an error naming the file for compressed entries, other dtypes, Fortran order,
    /// ragged dimensions, unexpected entry names and truncated or corrupt archives.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bad = |r: String| Error::npz(&path, r);
        let corrupt = || Error::npz(&path, "corrupt or truncated zip/npz archive");
        let file = File::open(&path).map_err(|e| Error::io(&path, ".npz archive", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(&path, ".npz archive", e))?
            .len();
        let read_at = |buf: &mut [u8], at: u64| -> Result<()> {
            if at.checked_add(buf.len() as u64).is_none_or(|end| end > len) {
                return Err(corrupt());
            }
            file.read_exact_at(buf, at)
                .map_err(|e| Error::io(&path, ".npz archive", e))
        };
        let tail_len = len.min(66_000);
        let mut tail = vec![0u8; tail_len as usize];
        read_at(&mut tail, len - tail_len)?;
        let eocd = (0..tail.len().saturating_sub(21))
            .rev()
            .find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
            .ok_or_else(|| bad("not a zip/npz archive (no end of central directory)".into()))?;
        let mut entries = le(&tail, eocd + 10, 2).ok_or_else(corrupt)?;
        let mut cd_size = le(&tail, eocd + 12, 4).ok_or_else(corrupt)?;
        let mut cd_off = le(&tail, eocd + 16, 4).ok_or_else(corrupt)?;
        if entries == 0xFFFF || cd_off == 0xFFFF_FFFF || cd_size == 0xFFFF_FFFF {
            // The zip64 end of central directory locator sits just before the EOCD.
            let loc = eocd
                .checked_sub(20)
                .ok_or_else(|| bad("missing zip64 locator".into()))?;
            if tail[loc..loc + 4] != [0x50, 0x4b, 0x06, 0x07] {
                return Err(bad("missing zip64 locator".into()));
            }
            let z64 = le(&tail, loc + 8, 8).ok_or_else(corrupt)?;
            let mut rec = [0u8; 56];
            read_at(&mut rec, z64)?;
            if rec[..4] != [0x50, 0x4b, 0x06, 0x06] {
                return Err(bad("bad zip64 end record".into()));
            }
            entries = le(&rec, 32, 8).ok_or_else(corrupt)?;
            cd_size = le(&rec, 40, 8).ok_or_else(corrupt)?;
            cd_off = le(&rec, 48, 8).ok_or_else(corrupt)?;
        }
        if cd_size > len {
            return Err(corrupt());
        }
        let mut cd = vec![0u8; cd_size as usize];
        read_at(&mut cd, cd_off)?;
        let mut found: Vec<(usize, u64, usize, usize)> = Vec::new();
        let mut at = 0usize;
        for _ in 0..entries {
            if cd.get(at..at + 4) != Some(&[0x50, 0x4b, 0x01, 0x02]) || cd.len() < at + 46 {
                return Err(bad("corrupt zip central directory".into()));
            }
            let field = |off: usize, n: usize| le(&cd, at + off, n).ok_or_else(corrupt);
            let method = field(10, 2)?;
            let mut comp = field(20, 4)?;
            let mut uncomp = field(24, 4)?;
            let (nlen, xlen, clen) = (
                field(28, 2)? as usize,
                field(30, 2)? as usize,
                field(32, 2)? as usize,
            );
            let mut local = field(42, 4)?;
            let name = cd.get(at + 46..at + 46 + nlen).ok_or_else(corrupt)?;
            let name = String::from_utf8_lossy(name).to_string();
            let mut x = at + 46 + nlen;
            let xend = x + xlen;
            while x + 4 <= xend {
                let tag = le(&cd, x, 2).ok_or_else(corrupt)?;
                let size = le(&cd, x + 2, 2).ok_or_else(corrupt)? as usize;
                if tag == 1 {
                    let mut p = x + 4;
                    for f in [&mut uncomp, &mut comp, &mut local] {
                        if *f == 0xFFFF_FFFF && p + 8 <= x + 4 + size {
                            *f = le(&cd, p, 8).ok_or_else(corrupt)?;
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
            read_at(&mut lh, local)?;
            let data = local + 30 + le(&lh, 26, 2).unwrap_or(0) + le(&lh, 28, 2).unwrap_or(0);
            let hn = uncomp.min(512).min(len.saturating_sub(data)) as usize;
            let mut head = vec![0u8; hn];
            read_at(&mut head, data)?;
            let ename = entry_name(&path, &name);
            let h = parse_npy_header(&ename, &head)?;
            if h.dtype != Dtype::F32Le {
                return Err(Error::npz(
                    &ename,
                    format!("dtype must be little-endian float32, got {:?}", h.dtype),
                ));
            }
            if h.fortran_order && h.rows > 1 && h.cols > 1 {
                return Err(Error::npz(&ename, "Fortran-order arrays are not supported"));
            }
            let need = h
                .data_len()
                .and_then(|n| n.checked_add(h.data_offset))
                .ok_or_else(|| Error::npz(&ename, "array size overflows"))?;
            if uncomp < need as u64 || data + need as u64 > len {
                return Err(Error::npz(
                    &ename,
                    format!(
                        "truncated array: expected {need} bytes, the archive holds {}",
                        uncomp.min(len.saturating_sub(data))
                    ),
                ));
            }
            found.push((index, data + h.data_offset as u64, h.rows, h.cols));
        }
        found.sort_by_key(|f| f.0);
        if found.iter().enumerate().any(|(i, f)| f.0 != i) {
            return Err(bad("array names are not arr_0 … arr_{n-1}".into()));
        }
        let dim = found.first().map_or(0, |f| f.3);
        if let Some(f) = found.iter().find(|f| f.3 != dim) {
            return Err(bad(format!(
                "arr_{} has dimension {}, arr_0 has {dim}: expected one dimension for every array",
                f.0, f.3
            )));
        }
        Ok(Self {
            file,
            path,
            arrays: found.into_iter().map(|f| (f.1, f.2)).collect(),
            dim,
        })
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of arrays.
    pub fn len(&self) -> usize {
        self.arrays.len()
    }

    /// Whether the archive holds no array.
    pub fn is_empty(&self) -> bool {
        self.arrays.is_empty()
    }

    /// Columns of every array (0 for an empty archive).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows of array `i`.
    pub fn rows(&self, i: usize) -> usize {
        self.arrays[i].1
    }

    /// Reads array `arr_{i}` (`rows(i) × dim()`, row-major).
    pub fn read(&self, i: usize) -> Result<Vec<f32>> {
        let (off, rows) = self.arrays[i];
        let mut bytes = vec![0u8; rows * self.dim * 4];
        self.file
            .read_exact_at(&mut bytes, off)
            .map_err(|e| Error::io(&self.path, ".npz archive", e))?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<Matrix> {
        (0..n)
            .map(|i| Matrix {
                rows: i % 3 + 1,
                cols: 4,
                data: (0..(i % 3 + 1) * 4)
                    .map(|v| v as f32 * 0.5 + i as f32)
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn npz_round_trip_keeps_order_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npz");
        let arrays = sample(12);
        write_npz(&p, &arrays).unwrap();
        let back = read_npz(&p).unwrap();
        assert_eq!(back.len(), 12);
        for (i, (name, m)) in back.iter().enumerate() {
            assert_eq!(name, &format!("arr_{i}"));
            assert_eq!(m, &arrays[i]);
        }
        let lazy = NpzArchive::open(&p).unwrap();
        assert_eq!((lazy.len(), lazy.dim()), (12, 4));
        for (i, m) in arrays.iter().enumerate() {
            assert_eq!(lazy.rows(i), m.rows);
            assert_eq!(lazy.read(i).unwrap(), m.data);
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
        let err = parse_npy(Path::new("t"), &b[..b.len() - 5])
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn npy_file_round_trip_and_one_dimensional_arrays() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.npy");
        std::fs::write(&p, npy_bytes(&[5], &[1.0, 2.0, 3.0, 4.0, 5.0])).unwrap();
        let m = read_npy(&p).unwrap();
        assert_eq!((m.rows, m.cols), (1, 5));
        std::fs::write(&p, npy_bytes(&[2, 2, 2], &[0.0; 8])).unwrap();
        let err = read_npy(&p).unwrap_err().to_string();
        assert!(
            err.contains("v.npy") && err.contains("got shape [2, 2, 2]"),
            "{err}"
        );
    }

    #[test]
    fn truncated_or_corrupt_npz_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npz");
        write_npz(&p, &sample(5)).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let cut = dir.path().join("cut.npz");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = NpzArchive::open(&cut).unwrap_err().to_string();
        assert!(err.contains("cut.npz"), "{err}");
        let err = read_npz(&cut).unwrap_err().to_string();
        assert!(err.contains("cut.npz"), "{err}");
        // A damaged array inside an intact directory: the shape in the header no longer fits the data.
        let mut damaged = bytes.clone();
        let at = damaged
            .windows(6)
            .position(|w| w == b"(1, 4)")
            .expect("arr_0 header");
        damaged[at..at + 6].copy_from_slice(b"(9, 4)");
        let bad = dir.path().join("bad.npz");
        std::fs::write(&bad, &damaged).unwrap();
        let err = NpzArchive::open(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.npz:arr_0.npy") && err.contains("truncated"),
            "{err}"
        );
        std::fs::write(&bad, b"not a zip at all").unwrap();
        let err = NpzArchive::open(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.npz"), "{err}");
    }

    #[test]
    fn compressed_archives_are_read_whole_but_not_lazily() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z.npz");
        let f = File::create(&p).unwrap();
        let mut zip = zip::ZipWriter::new(f);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("arr_0.npy", opts).unwrap();
        zip.write_all(&npy_bytes(&[2, 2], &[1.0, 2.0, 3.0, 4.0]))
            .unwrap();
        zip.finish().unwrap();
        assert_eq!(read_npz(&p).unwrap()[0].1.data, [1.0, 2.0, 3.0, 4.0]);
        let err = NpzArchive::open(&p).unwrap_err().to_string();
        assert!(err.contains("compressed"), "{err}");
    }
}
