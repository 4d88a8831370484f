//! Files only the server's own user may read.
//!
//! The data directory holds the SQLite database (password hashes) and the
//! token secret (anyone holding it can sign room tokens), so the directory is
//! created `0700` and those files are `0600`, whatever the umask. An existing
//! directory keeps its mode (it may be a mount point managed by someone else);
//! an existing database file is tightened at every start.

use std::io;
use std::path::Path;

/// Creates `dir` and any missing parents, owner-only (`0700`) on Unix.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Makes `path` an owner-only (`0600`) file: created empty if missing, its
/// permissions tightened if it exists.
pub fn make_private_file(path: &Path) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    // `mode` applies only when the file is created; tighten an existing one.
    let file = options.open(path)?;
    restrict(&file)
}

/// Tightens `path` to `0600` if it exists (SQLite's `-wal` and `-shm` files).
pub fn restrict_if_present(path: &Path) -> io::Result<()> {
    match std::fs::File::open(path) {
        Ok(file) => restrict(&file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(unix)]
fn restrict(file: &std::fs::File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
}

#[cfg(not(unix))]
fn restrict(_: &std::fs::File) -> io::Result<()> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_and_existing_files_become_owner_only() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("a/b");
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&temp.path().join("a")), 0o700);

        let fresh = dir.join("fresh.db");
        make_private_file(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o600);

        let old = dir.join("old.db");
        std::fs::write(&old, b"data").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        make_private_file(&old).unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(std::fs::read(&old).unwrap(), b"data", "contents untouched");

        restrict_if_present(&dir.join("missing-wal")).unwrap();
    }
}
