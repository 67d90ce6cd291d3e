//! Copying disk images: by reflink where the filesystem can, else sparse
//! (holes stay holes), so a mostly empty multi-GiB disk copies in moments.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Makes `dst` (created or truncated) a copy of `src`.
pub fn clone_file(src: &Path, dst: &Path) -> io::Result<()> {
    let (from, to) = open_pair(src, dst)?;
    if !reflinked(&from, &to) {
        sparse_copy(&from, &to)?;
    }
    Ok(())
}

/// Makes `dst` (created or truncated) a reflink of `src`, sharing its
/// blocks; `false` (and `dst` empty) where the filesystem has no reflinks.
pub fn reflink(src: &Path, dst: &Path) -> io::Result<bool> {
    let (from, to) = open_pair(src, dst)?;
    Ok(reflinked(&from, &to))
}

fn open_pair(src: &Path, dst: &Path) -> io::Result<(File, File)> {
    let from = File::open(src)?;
    let to = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dst)?;
    Ok((from, to))
}

fn reflinked(from: &File, to: &File) -> bool {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
    unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) == 0 }
}

fn sparse_copy(src: &File, dst: &File) -> io::Result<()> {
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on an open fd with a valid whence.
        let data = unsafe { libc::lseek(src.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            // SAFETY: both fds are open; the offsets point to live locals.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    (hole - off_in) as usize,
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        pos = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let d = std::env::temp_dir().join(format!("cc-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let src_path = d.join("src");
        let f = File::create(&src_path).unwrap();
        f.set_len(64 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(f);
        let dst_path = d.join("dst");
        sparse_copy(
            &File::open(&src_path).unwrap(),
            &File::create(&dst_path).unwrap(),
        )
        .unwrap();
        let cloned = d.join("cloned");
        clone_file(&src_path, &cloned).unwrap();
        assert_eq!(fs::read(&src_path).unwrap(), fs::read(&cloned).unwrap());
        assert_eq!(fs::read(&src_path).unwrap(), fs::read(&dst_path).unwrap());
        assert!(
            fs::metadata(&dst_path).unwrap().blocks() * 512 < 8 << 20,
            "holes preserved"
        );
        fs::remove_dir_all(&d).unwrap();
    }
}
