//! Inverted lists (centroid → ascending internal document ids), in both on-disk layouts.
//!
//! * Format 1: offsets `u64[K + 1]` into a flat `u32` array of document ids.
//! * Format 2: offsets `u64[K + 1]` are byte offsets into a stream of LEB128 varints; list `c` holds the gaps
//!   between consecutive ids (the first gap is the id itself). About 1 byte per (centroid, document) pair
//!   instead of 4.

use std::ops::Range;

use crate::storage::{cast, Mapped};
use crate::{Error, Result};

/// An opened, validated inverted-list file.
pub(crate) struct InvertedLists {
    file: Mapped,
    offsets: Range<usize>,
    data: Range<usize>,
    varint: bool,
}

/// Appends `v` as an LEB128 varint.
#[inline]
fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Decodes one varint at `*at`, or `None` when the stream ends inside it or it overflows u32.
#[inline]
fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u32> {
    let mut v = 0u32;
    let mut shift = 0u32;
    loop {
        let b = *bytes.get(*at)?;
        *at += 1;
        if shift == 28 && b > 0x0f {
            return None;
        }
        v |= ((b & 0x7f) as u32) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// Encodes lists given as `(centroid, doc)` pairs sorted by centroid then doc (each pair once) into the
/// format-2 sections: byte offsets `u64[k + 1]` and the varint stream.
pub(crate) fn encode(pairs: &[(u32, u32)], k: usize) -> (Vec<u64>, Vec<u8>) {
    let mut offsets = Vec::with_capacity(k + 1);
    let mut data = Vec::with_capacity(pairs.len() * 2);
    let mut i = 0;
    for c in 0..k as u32 {
        offsets.push(data.len() as u64);
        let mut prev = 0u32;
        while i < pairs.len() && pairs[i].0 == c {
            put_varint(&mut data, pairs[i].1 - prev);
            prev = pairs[i].1;
            i += 1;
        }
    }
    offsets.push(data.len() as u64);
    debug_assert_eq!(i, pairs.len(), "pairs must be sorted with centroids < k");
    (offsets, data)
}

impl InvertedLists {
    /// Validates `file` (sections, monotone offsets, every list strictly ascending with ids below `num_docs`).
    pub(crate) fn open(file: Mapped, num_centroids: usize, num_docs: usize) -> Result<Self> {
        let varint = file.version() >= 2;
        let corrupt = |path: &std::path::Path| Error::Corrupt {
            path: path.to_path_buf(),
            reason: "inconsistent inverted lists".into(),
        };
        let (offsets, data) = {
            let base = file.payload().as_ptr() as usize;
            let secs = file.sections()?;
            if secs.len() != 2 {
                return Err(corrupt(file.path()));
            }
            let range = |s: &[u8]| {
                let start = s.as_ptr() as usize - base;
                start..start + s.len()
            };
            (range(secs[0]), range(secs[1]))
        };
        let lists = Self {
            file,
            offsets,
            data,
            varint,
        };
        let offs = lists.offsets()?;
        let end = if varint {
            lists.data().len()
        } else {
            cast::<u32>(lists.data(), lists.file.path(), "ivf docs")?.len()
        };
        if offs.len() != num_centroids + 1
            || offs.first() != Some(&0)
            || offs.windows(2).any(|w| w[0] > w[1])
            || offs.last().copied() != Some(end as u64)
        {
            return Err(corrupt(lists.file.path()));
        }
        let mut buf = Vec::new();
        for c in 0..num_centroids {
            buf.clear();
            if lists.decode_into(c, &mut buf).is_none()
                || buf.windows(2).any(|w| w[0] >= w[1])
                || buf.last().is_some_and(|&d| d as usize >= num_docs)
            {
                return Err(corrupt(lists.file.path()));
            }
        }
        Ok(lists)
    }

    fn offsets(&self) -> Result<&[u64]> {
        cast(
            &self.file.payload()[self.offsets.clone()],
            self.file.path(),
            "ivf offsets",
        )
    }

    fn data(&self) -> &[u8] {
        &self.file.payload()[self.data.clone()]
    }

    fn decode_into(&self, c: usize, out: &mut Vec<u32>) -> Option<()> {
        let offs = self.offsets().ok()?;
        let (s, e) = (offs[c] as usize, offs[c + 1] as usize);
        if self.varint {
            let bytes = &self.data()[..e];
            let mut at = s;
            let mut prev = 0u32;
            let mut first = true;
            while at < e {
                let gap = get_varint(bytes, &mut at)?;
                if !first && gap == 0 {
                    return None;
                }
                prev = prev.checked_add(gap)?;
                first = false;
                out.push(prev);
            }
            (at == e).then_some(())
        } else {
            let docs: &[u32] = cast(self.data(), self.file.path(), "ivf docs").ok()?;
            out.extend_from_slice(&docs[s..e]);
            Some(())
        }
    }

    /// Appends the documents of list `c` (ascending) to `out`.
    pub(crate) fn list_into(&self, c: usize, out: &mut Vec<u32>) {
        self.decode_into(c, out).expect("validated at open");
    }

    /// Bytes of the file.
    #[cfg(test)]
    pub(crate) fn payload_len(&self) -> usize {
        self.file.payload().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{as_bytes, write_sections};

    #[test]
    fn varints_roundtrip_and_reject_garbage() {
        let mut out = Vec::new();
        let values = [0u32, 1, 127, 128, 300, 16_383, 16_384, u32::MAX];
        for &v in &values {
            put_varint(&mut out, v);
        }
        let mut at = 0;
        for &v in &values {
            assert_eq!(get_varint(&out, &mut at), Some(v));
        }
        assert_eq!(at, out.len());
        // Truncated and overlong encodings.
        assert_eq!(get_varint(&[0x80], &mut 0), None);
        assert_eq!(get_varint(&[0xff, 0xff, 0xff, 0xff, 0x7f], &mut 0), None);
    }

    #[test]
    fn lists_encode_decode_and_validate() {
        let pairs = vec![(0u32, 3u32), (0, 5), (0, 900), (2, 0), (2, 1), (3, 70_000)];
        let (offs, data) = encode(&pairs, 4);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ivf.1.lt");
        write_sections(&p, b"IVFL", &[as_bytes(&offs), &data]).unwrap();
        let lists = InvertedLists::open(Mapped::open(&p, b"IVFL").unwrap(), 4, 70_001).unwrap();
        let mut v = Vec::new();
        lists.list_into(0, &mut v);
        assert_eq!(v, [3, 5, 900]);
        v.clear();
        lists.list_into(1, &mut v);
        assert!(v.is_empty());
        lists.list_into(2, &mut v);
        lists.list_into(3, &mut v);
        assert_eq!(v, [0, 1, 70_000]);
        assert!(lists.payload_len() < 4 * 8 + 64 * 3 + pairs.len() * 4);
        // A document id out of range, or a wrong centroid count, is refused.
        let reopen = || Mapped::open(&p, b"IVFL").unwrap();
        assert!(InvertedLists::open(reopen(), 4, 70_000).is_err());
        assert!(InvertedLists::open(reopen(), 5, 70_001).is_err());
        // A repeated id (gap 0 after the first) is refused.
        let (offs, mut data) = encode(&[(0, 3), (0, 4)], 1);
        data[1] = 0;
        write_sections(&p, b"IVFL", &[as_bytes(&offs), &data]).unwrap();
        assert!(InvertedLists::open(reopen(), 1, 10).is_err());
    }
}
