//! Files replaced atomically: readers see the old or the new file, never a
//! torn one.

use crate::{Error, Result};
use std::path::Path;

/// Writes `dir/name` through a temporary file, fsyncs it, renames it into
/// place and fsyncs the directory: readers see the old or the new file.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.tmp"));
    let dst = dir.join(name);
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// [`write_atomic`] to a file path (a bare name: the working directory).
pub fn write_atomic_path(file: &Path, bytes: &[u8]) -> Result<()> {
    let parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = file
        .file_name()
        .ok_or_else(|| Error::Output(format!("{} names no file", file.display())))?;
    write_atomic(parent, &name.to_string_lossy(), bytes)
}
