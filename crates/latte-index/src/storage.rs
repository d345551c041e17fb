//! Checksummed, versioned files; memory-mapped reads; atomic writes.
//!
//! Every file is `header (32 bytes) | payload | footer (8 bytes)`, little-endian (see FORMAT.md):
//! header = magic `LATTEIX\0`, format version (u32), kind (4 ASCII bytes), payload length (u64), 8 zero bytes;
//! footer = crc32 (IEEE) of the payload (u32) and `LEND`. Sectioned payloads start with a section table.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::IoContext;
use crate::{Error, Result};

/// Index format version written by this build (FORMAT.md lists what changed between versions).
pub const FORMAT_VERSION: u32 = 2;
/// Oldest index format version this build reads.
pub const OLDEST_SUPPORTED_VERSION: u32 = 1;

const MAGIC: &[u8; 8] = b"LATTEIX\0";
const END: &[u8; 4] = b"LEND";
pub(crate) const HEADER_LEN: usize = 32;
pub(crate) const FOOTER_LEN: usize = 8;
const SECTION_ALIGN: usize = 64;

/// Streams a payload into `<path>.tmp`; [`StreamWriter::finish`] writes the footer, fsyncs and renames it to
/// `path`. Dropping an unfinished writer removes the temporary file.
pub(crate) struct StreamWriter {
    out: Option<BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    hasher: crc32fast::Hasher,
    len: u64,
}

impl StreamWriter {
    pub(crate) fn create(path: &Path, kind: &[u8; 4]) -> Result<Self> {
        let tmp = tmp_path(path);
        let file = File::create(&tmp).at(&tmp)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(kind);
        out.write_all(&header).at(&tmp)?;
        Ok(Self {
            out: Some(out),
            tmp,
            path: path.to_path_buf(),
            hasher: crc32fast::Hasher::new(),
            len: 0,
        })
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        self.out
            .as_mut()
            .expect("writer finished")
            .write_all(bytes)
            .at(&self.tmp)
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn finish(mut self) -> Result<()> {
        let mut out = self.out.take().expect("writer finished");
        let crc = std::mem::take(&mut self.hasher).finalize();
        out.write_all(&crc.to_le_bytes()).at(&self.tmp)?;
        out.write_all(END).at(&self.tmp)?;
        let mut file = out.into_inner().map_err(|e| Error::Io {
            path: self.tmp.clone(),
            source: e.into_error(),
        })?;
        file.seek(SeekFrom::Start(16)).at(&self.tmp)?;
        file.write_all(&self.len.to_le_bytes()).at(&self.tmp)?;
        file.sync_all().at(&self.tmp)?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).at(&self.path)?;
        Ok(())
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Writes a file whose payload is a section table followed by the sections (each 64-byte aligned).
pub(crate) fn write_sections(path: &Path, kind: &[u8; 4], sections: &[&[u8]]) -> Result<()> {
    let mut w = StreamWriter::create(path, kind)?;
    let table_len = 8 + 16 * sections.len();
    let mut offset = table_len.next_multiple_of(SECTION_ALIGN);
    let mut table = Vec::with_capacity(offset);
    table.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    for s in sections {
        table.extend_from_slice(&(offset as u64).to_le_bytes());
        table.extend_from_slice(&(s.len() as u64).to_le_bytes());
        offset = (offset + s.len()).next_multiple_of(SECTION_ALIGN);
    }
    table.resize(table_len.next_multiple_of(SECTION_ALIGN), 0);
    w.write(&table)?;
    for s in sections {
        w.write(s)?;
        let pad = (w.len() as usize).next_multiple_of(SECTION_ALIGN) - w.len() as usize;
        w.write(&[0u8; SECTION_ALIGN][..pad])?;
    }
    w.finish()
}

/// A verified, memory-mapped file (clones share the mapping).
#[derive(Clone)]
pub(crate) struct Mapped {
    map: Arc<memmap2::Mmap>,
    path: PathBuf,
    payload_len: usize,
    version: u32,
}

impl Mapped {
    /// Opens `path`, checks magic, version, kind, length and the payload crc32, and maps it.
    pub(crate) fn open(path: &Path, kind: &[u8; 4]) -> Result<Self> {
        let corrupt = |reason: String| Error::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = File::open(path).at(path)?;
        let file_len = file.metadata().at(path)?.len() as usize;
        if file_len < HEADER_LEN + FOOTER_LEN {
            return Err(corrupt(format!(
                "{file_len} bytes is shorter than a header and footer"
            )));
        }
        let mut header = [0u8; HEADER_LEN];
        file.read_exact(&mut header).at(path)?;
        if &header[..8] != MAGIC {
            return Err(corrupt("bad magic: not a latte index file".into()));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
        if !(OLDEST_SUPPORTED_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                oldest: OLDEST_SUPPORTED_VERSION,
                current: FORMAT_VERSION,
            });
        }
        if &header[12..16] != kind {
            return Err(corrupt(format!(
                "file kind {:?}, expected {:?}",
                String::from_utf8_lossy(&header[12..16]),
                String::from_utf8_lossy(kind)
            )));
        }
        let raw_len = u64::from_le_bytes(header[16..24].try_into().unwrap());
        // A corrupt length field may be anything: compare without overflowing.
        let payload_len = usize::try_from(raw_len).unwrap_or(usize::MAX);
        let total = payload_len
            .checked_add(HEADER_LEN + FOOTER_LEN)
            .ok_or_else(|| {
                corrupt(format!(
                    "header says {raw_len} payload bytes, more than any file can hold (corrupt length field)"
                ))
            })?;
        if total != file_len {
            return Err(corrupt(format!(
                "header says {payload_len} payload bytes but the file has {file_len} bytes in all (truncated?)"
            )));
        }
        // Verify the checksum with plain reads, so checking does not make the whole file resident.
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; (1 << 20).min(payload_len.max(1))];
        let mut left = payload_len;
        while left > 0 {
            let n = left.min(buf.len());
            file.read_exact(&mut buf[..n]).at(path)?;
            hasher.update(&buf[..n]);
            left -= n;
        }
        let mut footer = [0u8; FOOTER_LEN];
        file.read_exact(&mut footer).at(path)?;
        if &footer[4..] != END {
            return Err(corrupt("bad end marker".into()));
        }
        let stored = u32::from_le_bytes(footer[..4].try_into().unwrap());
        let actual = hasher.finalize();
        if stored != actual {
            return Err(corrupt(format!(
                "checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"
            )));
        }
        // SAFETY: the file is opened read-only. Index files are never modified in place: writers create new
        // files and rename them, and remove old ones only after a new meta.lt no longer references them, so the
        // mapped bytes do not change under us (an unlinked file stays valid while mapped).
        let map = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
        if map.len() != file_len {
            return Err(corrupt("file changed while it was being opened".into()));
        }
        Ok(Self {
            map: Arc::new(map),
            path: path.to_path_buf(),
            payload_len,
            version,
        })
    }

    /// The format version in this file's header (files of one index may differ: an add to an older index
    /// writes its new files in the current version).
    pub(crate) fn version(&self) -> u32 {
        self.version
    }

    pub(crate) fn payload(&self) -> &[u8] {
        &self.map[HEADER_LEN..HEADER_LEN + self.payload_len]
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The sections of a sectioned payload.
    pub(crate) fn sections(&self) -> Result<Vec<&[u8]>> {
        let p = self.payload();
        let corrupt = |reason: &str| Error::Corrupt {
            path: self.path.clone(),
            reason: reason.into(),
        };
        if p.len() < 8 {
            return Err(corrupt("missing section table"));
        }
        let n = u32::from_le_bytes(p[..4].try_into().unwrap()) as usize;
        if p.len() < 8 + 16 * n {
            return Err(corrupt("section table runs past the payload"));
        }
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let at = 8 + 16 * i;
            let off = u64::from_le_bytes(p[at..at + 8].try_into().unwrap()) as usize;
            let len = u64::from_le_bytes(p[at + 8..at + 16].try_into().unwrap()) as usize;
            if !off.is_multiple_of(SECTION_ALIGN)
                || off.checked_add(len).is_none_or(|e| e > p.len())
            {
                return Err(corrupt("section out of bounds"));
            }
            out.push(&p[off..off + len]);
        }
        Ok(out)
    }
}

/// Plain-old-data element types that can be viewed in a mapped byte slice.
pub(crate) trait Pod: Copy + 'static {}
impl Pod for u8 {}
impl Pod for u16 {}
impl Pod for u32 {}
impl Pod for u64 {}
impl Pod for f32 {}
impl Pod for half::f16 {}

/// Views `bytes` as a slice of `T` (little-endian target). Fails on misalignment or a ragged length.
pub(crate) fn cast<'a, T: Pod>(bytes: &'a [u8], path: &Path, what: &str) -> Result<&'a [T]> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size)
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            reason: format!("{what}: bad length or alignment"),
        });
    }
    // SAFETY: T is a plain integer/float type with no invalid bit patterns; pointer alignment and length were
    // checked above, and the returned slice borrows `bytes`.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) })
}

/// The raw bytes of a slice of `T`.
pub(crate) fn as_bytes<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: any initialised T: Pod is valid as bytes; the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Fsyncs a directory so that renames in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).at(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lt");
        write_sections(&p, b"TEST", &[b"hello", &[1, 2, 3]]).unwrap();
        let m = Mapped::open(&p, b"TEST").unwrap();
        let s = m.sections().unwrap();
        assert_eq!(s, vec![&b"hello"[..], &[1u8, 2, 3][..]]);
        drop(m);
        assert!(matches!(
            Mapped::open(&p, b"OTHR"),
            Err(Error::Corrupt { .. })
        ));
        // Flip one payload byte.
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n - FOOTER_LEN - 60] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let err = Mapped::open(&p, b"TEST").err().unwrap();
        assert!(
            err.to_string().contains("x.lt") && err.to_string().contains("checksum"),
            "{err}"
        );
        // Truncate.
        std::fs::write(&p, &bytes[..n - 3]).unwrap();
        assert!(matches!(
            Mapped::open(&p, b"TEST"),
            Err(Error::Corrupt { .. })
        ));
    }
}
