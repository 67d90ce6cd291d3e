//! Filesystem snapshots of instances.

use std::ffi::c_char;
use std::path::Path;
use std::ptr;
use std::sync::Arc;

use crate::alloc;
use crate::error::{cc_error, cc_error_code};
use crate::ffi::{cstr, entry, guard, strings, Out};
use crate::handles;
use crate::instance::cc_instance;
use crate::objects::{Instance, Snapshot};
use crate::oci::cc_source;

/// A captured instance filesystem, stored in the per-user image store
/// independently of the instance (boot new instances from it with
/// `cc_snapshot_as_source`). Usable from any thread.
pub type cc_snapshot = u64;

/// Captures the instance's whole filesystem without stopping it, leaving
/// out paths matching the `nexcludes` globs in `excludes` (NULL when 0;
/// `*`, `?`, `**`; without a leading `/` they match at any depth).
///
/// # Safety
/// `excludes` is NULL or valid for reading `nexcludes` NUL-terminated
/// strings; `out` is NULL or valid for writing; `err` is NULL or valid for
/// writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_snapshot(
    inst: cc_instance,
    excludes: *const *const c_char,
    nexcludes: usize,
    out: *mut cc_snapshot,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes strings as documented and a writable slot.
        let (excludes, out) = unsafe {
            (
                strings(excludes, nexcludes, "excludes")?,
                Out::new(out, "out")?,
            )
        };
        let excludes: Vec<&str> = excludes.iter().map(String::as_str).collect();
        let snap = handles::get::<Instance>(inst)?
            .get()?
            .snapshot_filesystem(&excludes)?;
        out.write(handles::insert(Arc::new(Snapshot::new(snap)))?);
        Ok(())
    })
}

/// A new source for `cc_instance_new` booting from the snapshot (free it
/// with `cc_source_free`; it stays valid after the snapshot is closed).
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_snapshot_as_source(
    snap: cc_snapshot,
    out: *mut cc_source,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable slot.
        let out = unsafe { Out::new(out, "out") }?;
        let source = handles::get::<Snapshot>(snap)?.get()?.as_source();
        out.write(handles::insert(Arc::new(source))?);
        Ok(())
    })
}

/// The snapshot's name in the image store
/// (`localhost/cc-snapshots:<instance>-<n>`), a string to free with
/// `cc_string_free`.
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_snapshot_name(
    snap: cc_snapshot,
    out: *mut *mut c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable slot.
        let out = unsafe { Out::new(out, "out") }?;
        let snap = handles::get::<Snapshot>(snap)?;
        out.write(alloc::string(snap.get()?.name())?);
        Ok(())
    })
}

/// Writes the snapshot as an OCI image layout directory (readable by
/// skopeo, docker and `cc_oci_load_dir`).
///
/// # Safety
/// `path` is a NUL-terminated string; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_snapshot_export_dir(
    snap: cc_snapshot,
    path: *const c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a NUL-terminated string.
        let path = unsafe { cstr(path, "path") }?;
        handles::get::<Snapshot>(snap)?
            .get()?
            .export_dir(Path::new(path))?;
        Ok(())
    })
}

/// Closes the snapshot handle's use: later calls with it fail with
/// `CC_ERR_ALREADY_CLOSED` (sources made from it stay usable; the stored
/// image stays in the store). Closing again is `CC_OK`.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_snapshot_close(snap: cc_snapshot, err: *mut cc_error) -> cc_error_code {
    entry(err, || {
        handles::get::<Snapshot>(snap)?.close();
        Ok(())
    })
}

/// Releases the snapshot handle (0, and handles released by `cc_shutdown`,
/// are fine).
#[no_mangle]
pub extern "C" fn cc_snapshot_free(snap: cc_snapshot) -> cc_error_code {
    guard(ptr::null_mut(), || {
        drop(handles::remove::<Snapshot>(snap)?);
        Ok(())
    })
}
