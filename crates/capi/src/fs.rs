//! The guest's filesystem (through the guest agent: what guest processes
//! see) and open guest files.

use std::ffi::{c_char, c_int};
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::alloc;
use crate::cancel::cc_cancel_token;
use crate::cmd::cc_conn;
use crate::error::{cc_error, cc_error_code, Failure};
use crate::ffi::{cstr, entry, guard, put, slice, slice_mut, Out};
use crate::handles;
use crate::instance::cc_instance;
use crate::objects::{Cancel, Instance};

/// An open guest file. Its calls are serialized; use it from one thread at
/// a time for a meaningful file offset.
pub type cc_file = u64;

/// Open for reading only.
pub const CC_O_RDONLY: u32 = 0;
/// Open for writing only.
pub const CC_O_WRONLY: u32 = 1;
/// Open for reading and writing.
pub const CC_O_RDWR: u32 = 2;
/// Every write appends.
pub const CC_O_APPEND: u32 = 0x8;
/// Create the file if missing (with the given mode).
pub const CC_O_CREATE: u32 = 0x200;
/// Truncate to zero length.
pub const CC_O_TRUNC: u32 = 0x400;
/// With `CC_O_CREATE`: fail if the file exists.
pub const CC_O_EXCL: u32 = 0x800;

const _: () = assert!(
    CC_O_RDONLY == cc::O_RDONLY
        && CC_O_WRONLY == cc::O_WRONLY
        && CC_O_RDWR == cc::O_RDWR
        && CC_O_APPEND == cc::O_APPEND
        && CC_O_CREATE == cc::O_CREATE
        && CC_O_TRUNC == cc::O_TRUNC
        && CC_O_EXCL == cc::O_EXCL
);

/// `cc_file_seek` from the start of the file.
pub const CC_SEEK_SET: c_int = 0;
/// `cc_file_seek` from the current offset.
pub const CC_SEEK_CUR: c_int = 1;
/// `cc_file_seek` from the end of the file.
pub const CC_SEEK_END: c_int = 2;

/// What `stat` tells of a guest file. `name` is the caller's to free with
/// `cc_file_info_free`.
#[repr(C)]
#[derive(Debug)]
pub struct cc_file_info {
    /// The last component of the path (`"/"` for the root).
    pub name: *mut c_char,
    pub size: u64,
    /// Type and permission bits, as `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time: seconds since the Unix epoch (negative before
    /// it) plus `mtime_nsec` nanoseconds (0..999999999).
    pub mtime_unix: i64,
    pub mtime_nsec: u32,
    pub is_dir: bool,
    pub is_symlink: bool,
}

/// One directory entry (symlinks not followed).
#[repr(C)]
#[derive(Debug)]
pub struct cc_dir_entry {
    pub name: *mut c_char,
    pub is_dir: bool,
    /// Type and permission bits of the entry itself.
    pub mode: u32,
}

fn unix_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}

fn system_time(secs: i64, nsec: u32, name: &str) -> Result<SystemTime, Failure> {
    if nsec >= 1_000_000_000 {
        return Err(Failure::invalid(format!(
            "`{name}_nsec` {nsec} is not below 1000000000"
        )));
    }
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs as u64, nsec))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nsec))))
    };
    t.ok_or_else(|| Failure::invalid(format!("`{name}` {secs} is out of range")))
}

fn file_info(i: &cc::FileInfo) -> Result<cc_file_info, Failure> {
    let (mtime_unix, mtime_nsec) = unix_time(i.mtime);
    Ok(cc_file_info {
        name: alloc::string(&i.name)?,
        size: i.size,
        mode: i.mode,
        uid: i.uid,
        gid: i.gid,
        mtime_unix,
        mtime_nsec,
        is_dir: i.is_dir,
        is_symlink: i.is_symlink,
    })
}

/// Frees the name in a `cc_file_info` and sets it to NULL (the struct
/// itself is the caller's). NULL, and an info freed already, are fine.
///
/// # Safety
/// `info` is NULL or a `cc_file_info` filled by this library (or with a
/// NULL name).
#[no_mangle]
pub unsafe extern "C" fn cc_file_info_free(info: *mut cc_file_info) {
    if info.is_null() {
        return;
    }
    // SAFETY: per the contract; only the name field is read and written.
    unsafe {
        let name = ptr::addr_of_mut!((*info).name);
        alloc::free_string(name.read());
        name.write(ptr::null_mut());
    }
}

/// Frees an array from `cc_instance_read_dir` and the names in it. `count`
/// is the count returned with it (the array also ends with an entry whose
/// name is NULL, which is what the library goes by). NULL is fine.
///
/// # Safety
/// `entries` is NULL or came from `cc_instance_read_dir`, not freed yet.
#[no_mangle]
pub unsafe extern "C" fn cc_dir_entries_free(entries: *mut cc_dir_entry, count: usize) {
    let _ = count;
    if entries.is_null() {
        return;
    }
    // SAFETY: per the contract `entries` is an array this library
    // allocated, ended by an entry with a NULL name; the names before it
    // are strings it allocated.
    unsafe {
        let mut i = 0;
        loop {
            let name = ptr::addr_of!((*entries.add(i)).name).read();
            if name.is_null() {
                break;
            }
            alloc::free_string(name);
            i += 1;
        }
        alloc::free_block(entries);
    }
}

/// Runs `f` on the open instance behind `inst`.
fn with_inst<T>(
    inst: cc_instance,
    f: impl FnOnce(&cc::Instance) -> cc::Result<T>,
) -> Result<T, Failure> {
    let inst = handles::get::<Instance>(inst)?;
    Ok(f(inst.get()?)?)
}

/// The whole contents of a guest file, in a buffer to free with
/// `cc_bytes_free` or move with `cc_bytes_move` (never NULL on success,
/// even when empty). Read into one buffer of the size the guest reports;
/// a file over the instance's `max_result_bytes` fails with
/// `CC_ERR_TOO_LARGE` before any of it is read (stream it with
/// `cc_instance_copy_out` or `cc_instance_read_file_stream`).
///
/// # Safety
/// `path` is a NUL-terminated string; `data` and `len` are NULL or valid
/// for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_read_file(
    inst: cc_instance,
    path: *const c_char,
    data: *mut *mut u8,
    len: *mut usize,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's guarantees are the variant's.
    unsafe { cc_instance_read_file_cancellable(inst, path, 0, data, len, err) }
}

/// `cc_instance_read_file` that `cancel` (0 for none) stops with
/// `CC_ERR_CANCELLED`.
///
/// # Safety
/// `path` is a NUL-terminated string; `data` and `len` are NULL or valid
/// for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_read_file_cancellable(
    inst: cc_instance,
    path: *const c_char,
    cancel: cc_cancel_token,
    data: *mut *mut u8,
    len: *mut usize,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        let cancel = handles::get_opt::<Cancel>(cancel)?;
        // SAFETY: the caller passes a string and NULL or writable slots.
        unsafe {
            let path = cstr(path, "path")?;
            alloc::bytes_out(data, len, || {
                with_inst(inst, |i| match &cancel {
                    Some(c) => i.read_file_cancellable(path, c.token()),
                    None => i.read_file(path),
                })
            })
        }
    })
}

/// Starts streaming a guest file of any size: `*out` is a readable
/// `cc_conn` (read it with `cc_conn_read` until it gives 0 bytes, then
/// `cc_conn_free` it; freeing it early stops the transfer) and `*size`
/// (may be NULL) the size the guest reported when it began (0 for files
/// such as those in `/proc`). Only a bounded window is in memory at a
/// time, and `max_result_bytes` does not apply.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is NULL or valid for writing;
/// `size` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_read_file_stream(
    inst: cc_instance,
    path: *const c_char,
    out: *mut cc_conn,
    size: *mut u64,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or writable slots.
        let (path, out, size) =
            unsafe { (cstr(path, "path")?, Out::new(out, "out")?, Out::opt(size)) };
        let reader = with_inst(inst, |i| i.read_file_stream(path))?;
        put(size, reader.size());
        out.write(handles::insert(Arc::new(reader.into_conn()))?);
        Ok(())
    })
}

/// Copies the guest file `guest_path` to `host_path` (created, or
/// truncated) in constant memory whatever its size; runs of zero bytes
/// become holes. `*copied` (may be NULL) is the byte count. On failure the
/// host file may hold part of the contents.
///
/// # Safety
/// `guest_path` and `host_path` are NUL-terminated strings; `copied` is
/// NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_copy_out(
    inst: cc_instance,
    guest_path: *const c_char,
    host_path: *const c_char,
    copied: *mut u64,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes strings and NULL or a writable slot.
        let (guest, host, copied) = unsafe {
            (
                cstr(guest_path, "guest_path")?,
                cstr(host_path, "host_path")?,
                Out::opt(copied),
            )
        };
        put(copied, with_inst(inst, |i| i.copy_out(guest, host))?);
        Ok(())
    })
}

/// Copies the host file `host_path` to the guest file `guest_path`
/// (created or replaced, permission bits `mode`) in constant memory
/// whatever its size. `*copied` (may be NULL) is the byte count.
///
/// # Safety
/// `host_path` and `guest_path` are NUL-terminated strings; `copied` is
/// NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_copy_in(
    inst: cc_instance,
    host_path: *const c_char,
    guest_path: *const c_char,
    mode: u32,
    copied: *mut u64,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes strings and NULL or a writable slot.
        let (host, guest, copied) = unsafe {
            (
                cstr(host_path, "host_path")?,
                cstr(guest_path, "guest_path")?,
                Out::opt(copied),
            )
        };
        put(copied, with_inst(inst, |i| i.copy_in(host, guest, mode))?);
        Ok(())
    })
}

/// Creates or replaces a guest file with `len` bytes of `data` (NULL when
/// `len` is 0) and permission bits `mode` (such as 0644).
///
/// # Safety
/// `path` is a NUL-terminated string; `data` is NULL or valid for reading
/// `len` bytes; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_write_file(
    inst: cc_instance,
    path: *const c_char,
    data: *const u8,
    len: usize,
    mode: u32,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's guarantees are the variant's.
    unsafe { cc_instance_write_file_cancellable(inst, path, data, len, mode, 0, err) }
}

/// `cc_instance_write_file` that `cancel` (0 for none) stops with
/// `CC_ERR_CANCELLED` while it waits for the guest; the file may then
/// hold part of `data`.
///
/// # Safety
/// `path` is a NUL-terminated string; `data` is valid for `len` bytes;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_write_file_cancellable(
    inst: cc_instance,
    path: *const c_char,
    data: *const u8,
    len: usize,
    mode: u32,
    cancel: cc_cancel_token,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and `len` readable bytes.
        let (path, data) = unsafe { (cstr(path, "path")?, slice(data, len, "data")?) };
        let cancel = handles::get_opt::<Cancel>(cancel)?;
        with_inst(inst, |i| match &cancel {
            Some(c) => i.write_file_cancellable(path, data, mode, c.token()),
            None => i.write_file(path, data, mode),
        })
    })
}

/// Metadata of `path`, following a final symlink. Free `out->name` with
/// `cc_file_info_free`.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is NULL or valid for writing;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_stat(
    inst: cc_instance,
    path: *const c_char,
    out: *mut cc_file_info,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or a writable struct.
        let (path, out) = unsafe { (cstr(path, "path")?, Out::new(out, "out")?) };
        out.write(file_info(&with_inst(inst, |i| i.stat(path))?)?);
        Ok(())
    })
}

/// Metadata of `path` itself, not following a final symlink. Free
/// `out->name` with `cc_file_info_free`.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is NULL or valid for writing;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_lstat(
    inst: cc_instance,
    path: *const c_char,
    out: *mut cc_file_info,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or a writable struct.
        let (path, out) = unsafe { (cstr(path, "path")?, Out::new(out, "out")?) };
        out.write(file_info(&with_inst(inst, |i| i.lstat(path))?)?);
        Ok(())
    })
}

/// Creates a directory with permission bits `mode`; its parent must
/// exist.
///
/// # Safety
/// `path` is a NUL-terminated string; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_mkdir(
    inst: cc_instance,
    path: *const c_char,
    mode: u32,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a NUL-terminated string.
        let path = unsafe { cstr(path, "path") }?;
        with_inst(inst, |i| i.mkdir(path, mode))
    })
}

/// Creates a directory and any missing parents; an existing directory
/// is fine.
///
/// # Safety
/// `path` is a NUL-terminated string; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_mkdir_all(
    inst: cc_instance,
    path: *const c_char,
    mode: u32,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a NUL-terminated string.
        let path = unsafe { cstr(path, "path") }?;
        with_inst(inst, |i| i.mkdir_all(path, mode))
    })
}

/// Removes a file, symlink or empty directory. A missing path is
/// `CC_ERR_IO` with `op` "remove" and the path.
///
/// # Safety
/// `path` is a NUL-terminated string; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_remove(
    inst: cc_instance,
    path: *const c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a NUL-terminated string.
        let path = unsafe { cstr(path, "path") }?;
        with_inst(inst, |i| i.remove(path))
    })
}

/// Removes a path and everything under it (never following symlinks);
/// a missing path is fine.
///
/// # Safety
/// `path` is a NUL-terminated string; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_remove_all(
    inst: cc_instance,
    path: *const c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a NUL-terminated string.
        let path = unsafe { cstr(path, "path") }?;
        with_inst(inst, |i| i.remove_all(path))
    })
}

/// Sets the permission bits (`07777`).
///
/// # Safety
/// `path` is a NUL-terminated string; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_chmod(
    inst: cc_instance,
    path: *const c_char,
    mode: u32,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a NUL-terminated string.
        let path = unsafe { cstr(path, "path") }?;
        with_inst(inst, |i| i.chmod(path, mode))
    })
}

fn id(value: i64, name: &str) -> Result<Option<u32>, Failure> {
    match value {
        -1 => Ok(None),
        v => u32::try_from(v)
            .map(Some)
            .map_err(|_| Failure::invalid(format!("`{name}` {v} is not an id or -1"))),
    }
}

/// Sets the owner and/or group; -1 leaves one unchanged.
///
/// # Safety
/// `path` is a NUL-terminated string; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_chown(
    inst: cc_instance,
    path: *const c_char,
    uid: i64,
    gid: i64,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a NUL-terminated string.
        let path = unsafe { cstr(path, "path") }?;
        let (uid, gid) = (id(uid, "uid")?, id(gid, "gid")?);
        with_inst(inst, |i| i.chown(path, uid, gid))
    })
}

/// Sets the access and modification times (seconds since the epoch plus
/// nanoseconds below 1000000000).
///
/// # Safety
/// `path` is a NUL-terminated string; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_chtimes(
    inst: cc_instance,
    path: *const c_char,
    atime_unix: i64,
    atime_nsec: u32,
    mtime_unix: i64,
    mtime_nsec: u32,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a NUL-terminated string.
        let path = unsafe { cstr(path, "path") }?;
        let atime = system_time(atime_unix, atime_nsec, "atime")?;
        let mtime = system_time(mtime_unix, mtime_nsec, "mtime")?;
        with_inst(inst, |i| i.chtimes(path, atime, mtime))
    })
}

/// The entries of a directory, sorted by name, as an array of `count`
/// entries (then one whose name is NULL) to free with
/// `cc_dir_entries_free` (never NULL on success).
///
/// # Safety
/// `path` is a NUL-terminated string; `entries` and `count` are NULL or
/// valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_read_dir(
    inst: cc_instance,
    path: *const c_char,
    entries: *mut *mut cc_dir_entry,
    count: *mut usize,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or writable slots.
        let (path, entries, count) = unsafe {
            (
                cstr(path, "path")?,
                Out::new(entries, "entries")?,
                Out::new(count, "count")?,
            )
        };
        let list = with_inst(inst, |i| i.read_dir(path))?;
        let mut out = Vec::with_capacity(list.len());
        for e in &list {
            match alloc::string(&e.name) {
                Ok(name) => out.push(cc_dir_entry {
                    name,
                    is_dir: e.is_dir,
                    mode: e.mode,
                }),
                Err(f) => {
                    for e in out {
                        // SAFETY: allocated just above.
                        unsafe { alloc::free_string(e.name) };
                    }
                    return Err(f);
                }
            }
        }
        let n = out.len();
        let names: Vec<*mut c_char> = out.iter().map(|e| e.name).collect();
        match alloc::array(out) {
            Ok(p) => {
                entries.write(p);
                count.write(n);
                Ok(())
            }
            Err(f) => {
                for name in names {
                    // SAFETY: allocated just above, not handed out.
                    unsafe { alloc::free_string(name) };
                }
                Err(f)
            }
        }
    })
}

/// Renames (moves) `from` to `to`.
///
/// # Safety
/// `from` and `to` are NUL-terminated strings; `err` is NULL or valid for
/// writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_rename(
    inst: cc_instance,
    from: *const c_char,
    to: *const c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NUL-terminated strings.
        let (from, to) = unsafe { (cstr(from, "from")?, cstr(to, "to")?) };
        with_inst(inst, |i| i.rename(from, to))
    })
}

/// Creates `link` as a symlink to `target` (stored as given).
///
/// # Safety
/// `target` and `link` are NUL-terminated strings; `err` is NULL or valid
/// for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_symlink(
    inst: cc_instance,
    target: *const c_char,
    link: *const c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NUL-terminated strings.
        let (target, link) = unsafe { (cstr(target, "target")?, cstr(link, "link")?) };
        with_inst(inst, |i| i.symlink(target, link))
    })
}

/// The target of a symlink, a string to free with `cc_string_free`.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is NULL or valid for writing;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_readlink(
    inst: cc_instance,
    path: *const c_char,
    out: *mut *mut c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or a writable slot.
        let (path, out) = unsafe { (cstr(path, "path")?, Out::new(out, "out")?) };
        let target = with_inst(inst, |i| i.readlink(path))?;
        out.write(alloc::string(&target)?);
        Ok(())
    })
}

fn open_with(
    inst: cc_instance,
    out: Out<cc_file>,
    f: impl FnOnce(&cc::Instance) -> cc::Result<cc::File>,
) -> Result<(), Failure> {
    let file = with_inst(inst, f)?;
    out.write(handles::insert(Arc::new(file))?);
    Ok(())
}

/// Opens a guest file for reading.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is NULL or valid for writing;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_open(
    inst: cc_instance,
    path: *const c_char,
    out: *mut cc_file,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or a writable slot.
        let (path, out) = unsafe { (cstr(path, "path")?, Out::new(out, "out")?) };
        open_with(inst, out, |i| i.open(path))
    })
}

/// Creates (or truncates) a guest file for reading and writing, mode 0666.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is NULL or valid for writing;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_create(
    inst: cc_instance,
    path: *const c_char,
    out: *mut cc_file,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or a writable slot.
        let (path, out) = unsafe { (cstr(path, "path")?, Out::new(out, "out")?) };
        open_with(inst, out, |i| i.create(path))
    })
}

/// Opens a guest file with `CC_O_*` flags and, when it is created,
/// permission bits `mode`.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is NULL or valid for writing;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_open_file(
    inst: cc_instance,
    path: *const c_char,
    flags: u32,
    mode: u32,
    out: *mut cc_file,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or a writable slot.
        let (path, out) = unsafe { (cstr(path, "path")?, Out::new(out, "out")?) };
        open_with(inst, out, |i| i.open_file(path, flags, mode))
    })
}

fn with_file<T>(file: cc_file, f: impl FnOnce(&cc::File) -> cc::Result<T>) -> Result<T, Failure> {
    Ok(f(&*handles::get::<cc::File>(file)?)?)
}

/// Reads up to `cap` bytes at the file offset into `buf`; `*n` is how many
/// (maybe fewer than `cap`; 0 only at end of file, which is `CC_OK`, or
/// when `cap` is 0).
///
/// # Safety
/// `buf` is NULL or valid for writing `cap` bytes; `n` is NULL or valid
/// for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_file_read(
    file: cc_file,
    buf: *mut u8,
    cap: usize,
    n: *mut usize,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's guarantees are the variant's.
    unsafe { cc_file_read_cancellable(file, 0, buf, cap, n, err) }
}

/// `cc_file_read` that `cancel` (0 for none) stops with `CC_ERR_CANCELLED`.
///
/// # Safety
/// `buf` is valid for `cap` bytes; `n` is valid for writing; `err` is NULL
/// or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_file_read_cancellable(
    file: cc_file,
    cancel: cc_cancel_token,
    buf: *mut u8,
    cap: usize,
    n: *mut usize,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes `cap` writable bytes and a writable slot.
        let (buf, n) = unsafe { (slice_mut(buf, cap, "buf")?, Out::new(n, "n")?) };
        let f = handles::get::<cc::File>(file)?;
        let cancel = handles::get_opt::<Cancel>(cancel)?;
        let count = match (&cancel, buf.is_empty()) {
            (_, true) => 0,
            (Some(c), false) => f.read_some_cancellable(buf, c.token())?,
            (None, false) => f.read_some(buf)?,
        };
        n.write(count);
        Ok(())
    })
}

/// Everything from the file offset to the end, in a buffer to free with
/// `cc_bytes_free` or move with `cc_bytes_move` (never NULL on success):
/// read into one buffer of the size left in a regular file. More than the
/// instance's `max_result_bytes` fails with `CC_ERR_TOO_LARGE`.
///
/// # Safety
/// `data` and `len` are NULL or valid for writing; `err` is NULL or valid
/// for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_file_read_all(
    file: cc_file,
    data: *mut *mut u8,
    len: *mut usize,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or writable slots.
        unsafe { alloc::bytes_out(data, len, || with_file(file, |f| f.read_all())) }
    })
}

/// Writes all `len` bytes of `data` at the file offset (at the end with
/// `CC_O_APPEND`); `*written` (may be NULL) becomes `len`.
///
/// # Safety
/// `data` is NULL or valid for reading `len` bytes; `written` is NULL or
/// valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_file_write(
    file: cc_file,
    data: *const u8,
    len: usize,
    written: *mut usize,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's guarantees are the variant's.
    unsafe { cc_file_write_cancellable(file, 0, data, len, written, err) }
}

/// `cc_file_write` that `cancel` (0 for none) stops with
/// `CC_ERR_CANCELLED` while it waits for the guest; part of `data` may
/// have been written.
///
/// # Safety
/// `data` is valid for `len` bytes; `written` is NULL or valid for
/// writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_file_write_cancellable(
    file: cc_file,
    cancel: cc_cancel_token,
    data: *const u8,
    len: usize,
    written: *mut usize,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes `len` readable bytes and NULL or a
        // writable slot.
        let (data, written) = unsafe { (slice(data, len, "data")?, Out::opt(written)) };
        let cancel = handles::get_opt::<Cancel>(cancel)?;
        with_file(file, |f| match &cancel {
            Some(c) => f.write_all_bytes_cancellable(data, c.token()),
            None => f.write_all_bytes(data),
        })?;
        put(written, len);
        Ok(())
    })
}

/// Moves the file offset by `offset` from `whence` (`CC_SEEK_SET`,
/// `CC_SEEK_CUR`, `CC_SEEK_END`); `*new_offset` (may be NULL) is the new
/// offset from the start.
///
/// # Safety
/// `new_offset` is NULL or valid for writing; `err` is NULL or valid for
/// writing.
#[no_mangle]
pub unsafe extern "C" fn cc_file_seek(
    file: cc_file,
    offset: i64,
    whence: c_int,
    new_offset: *mut u64,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable slot.
        let new_offset = unsafe { Out::opt(new_offset) };
        let pos = match whence {
            CC_SEEK_SET => cc::Whence::Start(u64::try_from(offset).map_err(|_| {
                Failure::invalid(format!("offset {offset} is negative with CC_SEEK_SET"))
            })?),
            CC_SEEK_CUR => cc::Whence::Current(offset),
            CC_SEEK_END => cc::Whence::End(offset),
            other => return Err(Failure::invalid(format!("unknown whence {other}"))),
        };
        put(new_offset, with_file(file, |f| f.seek_to(pos))?);
        Ok(())
    })
}

/// Metadata of the open file. Free `out->name` with `cc_file_info_free`.
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_file_stat(
    file: cc_file,
    out: *mut cc_file_info,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable struct.
        let out = unsafe { Out::new(out, "out") }?;
        out.write(file_info(&with_file(file, |f| f.stat())?)?);
        Ok(())
    })
}

/// Sets the file's length.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_file_truncate(
    file: cc_file,
    len: u64,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || with_file(file, |f| f.truncate(len)))
}

/// Flushes the file to the guest's disk.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_file_sync(file: cc_file, err: *mut cc_error) -> cc_error_code {
    entry(err, || with_file(file, |f| f.sync()))
}

/// Closes the file; closing again is `CC_OK`, other calls on a closed
/// file fail with `CC_ERR_ALREADY_CLOSED`.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_file_close(file: cc_file, err: *mut cc_error) -> cc_error_code {
    entry(err, || with_file(file, |f| f.close()))
}

/// Closes the file if needed and releases the handle (0, and handles
/// released by `cc_shutdown`, are fine).
#[no_mangle]
pub extern "C" fn cc_file_free(file: cc_file) -> cc_error_code {
    guard(ptr::null_mut(), || {
        match handles::remove::<cc::File>(file)? {
            Some(f) => Ok(f.close()?),
            None => Ok(()),
        }
    })
}
