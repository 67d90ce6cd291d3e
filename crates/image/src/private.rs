//! Files and directories only their owner can read: the store and the
//! caches beside it hold images and disks of untrusted guests, and a
//! library must not change the process's umask to get there.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Mode of every file created in the cache.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory created in the cache.
pub const DIR_MODE: u32 = 0o700;

/// Creates `path` and its missing parents, each 0700.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// Creates (or truncates) `path` for writing; a new file is 0600.
pub fn create_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
}
