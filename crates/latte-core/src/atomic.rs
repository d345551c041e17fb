//! Replacing a file atomically: the new content goes to a temporary file in the same folder, which is
//! flushed to disk, renamed over the destination, and the folder is synced so the rename itself survives a
//! crash. Readers see the old file or the new one, never a half-written one.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::{Error, Result};

/// The folder `path` lives in (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Replaces `path` with `bytes` atomically. The folder must exist.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_with(path, |w| w.write_all(bytes))
}

/// Replaces `path` atomically with what `write` writes to the temporary file (buffered and seekable, as
/// zip writers need). If `write` fails, `path` is left as it was and the temporary file is removed. The
/// folder must exist.
pub fn replace_with(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = parent_of(path);
    let what = "destination of an atomic write";
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| Error::io(dir, "folder for a temporary file", e))?;
    {
        let mut w = BufWriter::new(tmp.as_file());
        write(&mut w).map_err(|e| Error::io(path, what, e))?;
        w.flush().map_err(|e| Error::io(path, what, e))?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(path, what, e))?;
    tmp.persist(path)
        .map_err(|e| Error::io(path, what, e.error))?;
    sync_dir(dir)
}

/// Flushes a folder's entries (the rename) to disk. Folders cannot be opened as files on Windows, where
/// the rename is durable without it.
fn sync_dir(dir: &Path) -> Result<()> {
    if cfg!(unix) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, "folder of an atomic write", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_writes_and_overwrites_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        replace(&p, b"first").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        replace(&p, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second, longer");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failing_writer_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        replace(&p, b"old").unwrap();
        let err = replace_with(&p, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk on fire"))
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("f.bin") && err.contains("disk on fire"),
            "{err}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_missing_folder_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope").join("f.bin");
        let err = replace(&p, b"x").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }
}
