//! OCI images: the client (image store), pulls with progress and
//! cancellation, loads and exports, sources and image configs.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CString};
use std::path::Path;
use std::ptr;
use std::sync::Arc;

use crate::alloc;
use crate::cancel::cc_cancel_token;
use crate::error::{cc_error, cc_error_code, Failure, CC_ERR_CANCELLED};
use crate::ffi::{cstr, entry, guard, opt_cstr, Out};
use crate::handles;
use crate::objects::{Cancel, Client};

/// An image store: pulls, loads and exports images. Usable from any
/// thread, also concurrently.
pub type cc_oci_client = u64;

/// What an instance boots from: an image (pulled or loaded), a snapshot,
/// or a host directory holding a root filesystem. Immutable; usable from
/// any thread.
pub type cc_source = u64;

/// Pull policy: use the stored image when the name is known, else pull.
pub const CC_PULL_IF_NOT_PRESENT: i32 = 0;
/// Pull policy: always ask the registry (stored layers are not downloaded
/// again).
pub const CC_PULL_ALWAYS: i32 = 1;
/// Pull policy: never contact the registry; a missing image is an error.
pub const CC_PULL_NEVER: i32 = 2;

/// How to pull (all fields optional: a zeroed struct is the default).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct cc_pull_options {
    /// `"os/arch[/variant]"` to pick from a multi-platform image; NULL for
    /// the host's.
    pub platform: *const c_char,
    /// Registry user; NULL to use `~/.docker/config.json` (`DOCKER_CONFIG`)
    /// or no credentials.
    pub username: *const c_char,
    /// The user's password (required with `username`).
    pub password: *const c_char,
    /// `CC_PULL_IF_NOT_PRESENT` (0), `CC_PULL_ALWAYS` or `CC_PULL_NEVER`.
    pub policy: i32,
    /// A layer may expand to this many times its compressed size (or
    /// 64 MiB, whichever is more) when unpacked; 0 for the default (100).
    pub max_layer_ratio: u64,
    /// Bound on one layer unpacked, in bytes; 0 for the default (32 GiB).
    pub max_layer_bytes: u64,
    /// Bound on all layers unpacked, in bytes; 0 for the default (32 GiB).
    pub max_image_bytes: u64,
}

/// Where a pull is, passed to a `cc_progress_fn`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct cc_pull_progress {
    /// Bytes downloaded so far, all blobs.
    pub current: u64,
    /// Bytes to download in all (0 until known).
    pub total: u64,
    /// The digest of the blob being downloaded; valid only during the
    /// callback.
    pub blob: *const c_char,
    /// Index (from 0) of that blob among `blob_count`.
    pub blob_index: usize,
    pub blob_count: usize,
    pub bytes_per_second: f64,
    /// Estimated seconds left; negative when unknown.
    pub eta_seconds: f64,
}

/// Called as a pull makes progress, on the thread that called
/// `cc_oci_pull`, with the `user_data` given to it; `progress` is valid
/// only during the call. Returning non-zero
/// cancels the pull, which then fails with `CC_ERR_CANCELLED` (and the
/// callback is not called again). It may call other libcc functions but
/// must not unwind or `longjmp` out.
pub type cc_progress_fn = Option<
    unsafe extern "C" fn(progress: *const cc_pull_progress, user_data: *mut c_void) -> c_int,
>;

/// Opens the image store in `cache_dir`, or, when NULL, the per-user store
/// (`$CC_CACHE_DIR/oci`, by default `~/.cache/crumblecracker/oci`).
///
/// # Safety
/// `cache_dir` is NULL or a NUL-terminated string; `out` is NULL or
/// valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_oci_client_new(
    cache_dir: *const c_char,
    out: *mut cc_oci_client,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a string, and a writable slot.
        let (dir, out) = unsafe { (opt_cstr(cache_dir, "cache_dir")?, Out::new(out, "out")?) };
        let client = cc::OciClient::new(dir.map(Path::new))?;
        out.write(handles::insert(Arc::new(Client::new(client)))?);
        Ok(())
    })
}

fn pull_options(opts: Option<&cc_pull_options>) -> Result<cc::PullOptions, Failure> {
    let mut out = cc::PullOptions::default();
    let Some(o) = opts else { return Ok(out) };
    // SAFETY: the struct's strings are NULL or NUL-terminated (documented
    // at cc_oci_pull).
    let (platform, username, password) = unsafe {
        (
            opt_cstr(o.platform, "options->platform")?,
            opt_cstr(o.username, "options->username")?,
            opt_cstr(o.password, "options->password")?,
        )
    };
    if let Some(p) = platform {
        out.platform = Some(p.parse::<cc::Platform>().map_err(cc::Error::from)?);
    }
    out.auth = match (username, password) {
        (Some(username), Some(password)) => Some(cc::Auth {
            username: username.into(),
            password: password.into(),
        }),
        (None, None) => None,
        (Some(_), None) => return Err(Failure::null("options->password")),
        (None, Some(_)) => return Err(Failure::null("options->username")),
    };
    out.policy = match o.policy {
        CC_PULL_IF_NOT_PRESENT => cc::PullPolicy::IfNotPresent,
        CC_PULL_ALWAYS => cc::PullPolicy::Always,
        CC_PULL_NEVER => cc::PullPolicy::Never,
        other => return Err(Failure::invalid(format!("unknown pull policy {other}"))),
    };
    for (field, value) in [
        (&mut out.limits.max_ratio, o.max_layer_ratio),
        (&mut out.limits.max_layer_bytes, o.max_layer_bytes),
        (&mut out.limits.max_image_bytes, o.max_image_bytes),
    ] {
        if value != 0 {
            *field = value;
        }
    }
    Ok(out)
}

/// Pulls `reference` (`alpine`, `docker.io/library/alpine:3.20`,
/// `127.0.0.1:5000/img@sha256:...`; registries on loopback speak plain
/// HTTP) into the client's store and returns it as a source. `options`,
/// `progress` and `user_data` may be NULL; `cancel` may be 0. Registry
/// failures are `CC_ERR_NETWORK`; a cancelled token, a progress callback
/// returning non-zero, or closing the client meanwhile, `CC_ERR_CANCELLED`.
///
/// # Safety
/// `reference` is a NUL-terminated string; `options` is NULL or a valid
/// `cc_pull_options` whose strings are NULL or NUL-terminated; `progress`
/// is NULL or a function as `cc_progress_fn` describes; `out` is NULL or
/// valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_oci_pull(
    client: cc_oci_client,
    reference: *const c_char,
    options: *const cc_pull_options,
    progress: cc_progress_fn,
    user_data: *mut c_void,
    cancel: cc_cancel_token,
    out: *mut cc_source,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string, NULL or valid options, and
        // NULL or a writable slot.
        let (reference, options, out) = unsafe {
            (
                cstr(reference, "reference")?,
                options.as_ref(),
                Out::new(out, "out")?,
            )
        };
        let options = pull_options(options)?;
        let client = handles::get::<Client>(client)?;
        let cancel = handles::get_opt::<Cancel>(cancel)?;
        // The call's own token: the progress callback cancels it alone.
        let token = cancel
            .as_ref()
            .map_or_else(cc::CancelToken::new, |c| c.token().child());
        let _closing = client.track_pull(&token)?;
        if token.is_cancelled() {
            return Err(Failure::new(CC_ERR_CANCELLED, "pull cancelled"));
        }
        let stopped = Cell::new(false);
        let mut on_progress = |p: &cc::Progress| {
            let Some(callback) = progress else { return };
            if stopped.get() {
                return;
            }
            let blob = CString::new(p.blob.replace('\0', "")).unwrap_or_default();
            let report = cc_pull_progress {
                current: p.current,
                total: p.total,
                blob: blob.as_ptr(),
                blob_index: p.blob_index,
                blob_count: p.blob_count,
                bytes_per_second: p.bytes_per_second,
                eta_seconds: p.eta.map_or(-1.0, |d| d.as_secs_f64()),
            };
            // SAFETY: the caller vouches for the callback and `user_data`;
            // `report` and the string it points to outlive the call.
            if unsafe { callback(&report, user_data) } != 0 {
                stopped.set(true);
                token.cancel();
            }
        };
        let image = client
            .get()?
            .pull(reference, &options, &mut on_progress, &token);
        if stopped.get() {
            return Err(Failure::new(
                CC_ERR_CANCELLED,
                "pull cancelled by the progress callback",
            ));
        }
        out.write(handles::insert(Arc::new(cc::Source::from(image?)))?);
        Ok(())
    })
}

/// Loads a `docker save` archive or an OCI image layout archive (`.tar`)
/// into the store.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is NULL or valid for writing;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_oci_load_tar(
    client: cc_oci_client,
    path: *const c_char,
    out: *mut cc_source,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's guarantees are the variant's.
    unsafe { cc_oci_load_tar_cancellable(client, path, 0, out, err) }
}

/// `cc_oci_load_tar` that `cancel` (0 for none) stops with
/// `CC_ERR_CANCELLED`, leaving nothing half-written in the store.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is NULL or valid for writing;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_oci_load_tar_cancellable(
    client: cc_oci_client,
    path: *const c_char,
    cancel: cc_cancel_token,
    out: *mut cc_source,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's guarantees are `load`'s.
    unsafe {
        load(
            client,
            path,
            cancel,
            out,
            err,
            cc::OciClient::load_tar_cancellable,
        )
    }
}

/// Loads an OCI image layout directory into the store.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is NULL or valid for writing;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_oci_load_dir(
    client: cc_oci_client,
    path: *const c_char,
    out: *mut cc_source,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's guarantees are the variant's.
    unsafe { cc_oci_load_dir_cancellable(client, path, 0, out, err) }
}

/// `cc_oci_load_dir` that `cancel` (0 for none) stops with
/// `CC_ERR_CANCELLED`, leaving nothing half-written in the store.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is NULL or valid for writing;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_oci_load_dir_cancellable(
    client: cc_oci_client,
    path: *const c_char,
    cancel: cc_cancel_token,
    out: *mut cc_source,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's guarantees are `load`'s.
    unsafe {
        load(
            client,
            path,
            cancel,
            out,
            err,
            cc::OciClient::load_dir_cancellable,
        )
    }
}

/// Loads an image with `load` (a `load_*_cancellable`), with a fresh
/// token when the caller gave none.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is NULL or valid for writing;
/// `err` is NULL or valid for writing.
unsafe fn load(
    client: cc_oci_client,
    path: *const c_char,
    cancel: cc_cancel_token,
    out: *mut cc_source,
    err: *mut cc_error,
    load: fn(&cc::OciClient, &Path, &cc::CancelToken) -> cc::Result<cc::Image>,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or a writable slot.
        let (path, out) = unsafe { (cstr(path, "path")?, Out::new(out, "out")?) };
        let client = handles::get::<Client>(client)?;
        let token = handles::get_opt::<Cancel>(cancel)?
            .map_or_else(cc::CancelToken::new, |c| c.token().clone());
        let image = load(client.get()?, Path::new(path), &token)?;
        out.write(handles::insert(Arc::new(cc::Source::from(image)))?);
        Ok(())
    })
}

/// The image behind a source: an image, or a snapshot's image.
fn image_of(source: &cc::Source) -> Result<&cc::Image, Failure> {
    match source {
        cc::Source::Image(image) => Ok(image),
        cc::Source::Snapshot(snap) => Ok(snap.image()),
        cc::Source::Dir(dir) => Err(Failure::invalid(format!(
            "the source is the directory {} and not an image",
            dir.display()
        ))),
    }
}

/// Writes an image (or snapshot) source as an OCI image layout directory
/// that skopeo, docker and `cc_oci_load_dir` read.
///
/// # Safety
/// `path` is a NUL-terminated string; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_oci_export_dir(
    client: cc_oci_client,
    source: cc_source,
    path: *const c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string.
        let path = unsafe { cstr(path, "path") }?;
        let client = handles::get::<Client>(client)?;
        let source = handles::get::<cc::Source>(source)?;
        client
            .get()?
            .export_dir(image_of(&source)?, Path::new(path))?;
        Ok(())
    })
}

/// The directory of the client's image store, as an absolute path: a
/// string to free with `cc_string_free`. Also works on a closed client.
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_oci_client_cache_dir(
    client: cc_oci_client,
    out: *mut *mut c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable pointer slot.
        let out = unsafe { Out::new(out, "out") }?;
        let dir = handles::get::<Client>(client)?.cache_dir();
        out.write(alloc::string(&dir.to_string_lossy())?);
        Ok(())
    })
}

/// Closes the client: pulls in flight are cancelled and later calls with it
/// fail with `CC_ERR_ALREADY_CLOSED`. Sources from it stay usable.
/// Closing again does nothing.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_oci_client_close(
    client: cc_oci_client,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        handles::get::<Client>(client)?.close();
        Ok(())
    })
}

/// Closes the client if needed and releases the handle (0, and handles
/// released by `cc_shutdown`, are fine).
#[no_mangle]
pub extern "C" fn cc_oci_client_free(client: cc_oci_client) -> cc_error_code {
    guard(ptr::null_mut(), || {
        if let Some(c) = handles::remove::<Client>(client)? {
            c.close();
        }
        Ok(())
    })
}

/// A source from a host directory holding a root filesystem tree (never
/// modified: instances write to a layer of their own). The directory is
/// checked when an instance boots from it.
///
/// # Safety
/// `path` is a NUL-terminated string; `out` is NULL or valid for writing;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_source_from_dir(
    path: *const c_char,
    out: *mut cc_source,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or a writable slot.
        let (path, out) = unsafe { (cstr(path, "path")?, Out::new(out, "out")?) };
        if path.is_empty() {
            return Err(Failure::invalid("`path` is empty"));
        }
        out.write(handles::insert(Arc::new(cc::Source::Dir(path.into())))?);
        Ok(())
    })
}

/// Releases a source handle (0, and handles released by `cc_shutdown`,
/// are fine). Instances booted from it are unaffected.
#[no_mangle]
pub extern "C" fn cc_source_free(source: cc_source) -> cc_error_code {
    guard(ptr::null_mut(), || {
        drop(handles::remove::<cc::Source>(source)?);
        Ok(())
    })
}

/// An image's configuration. Every array is also NULL-terminated; strings
/// that may be absent are NULL. Free it with `cc_image_config_free`.
#[repr(C)]
#[derive(Debug)]
pub struct cc_image_config {
    /// `"amd64"`, `"arm64"`, ...
    pub architecture: *mut c_char,
    /// `"linux"`.
    pub os: *mut c_char,
    /// `KEY=VALUE` entries.
    pub env: *mut *mut c_char,
    pub env_count: usize,
    /// NULL when the image sets none.
    pub working_dir: *mut c_char,
    pub entrypoint: *mut *mut c_char,
    pub entrypoint_count: usize,
    pub cmd: *mut *mut c_char,
    pub cmd_count: usize,
    /// NULL when the image sets none.
    pub user: *mut c_char,
    /// Label keys, sorted, and their values at the same indexes.
    pub label_keys: *mut *mut c_char,
    pub label_values: *mut *mut c_char,
    pub label_count: usize,
}

impl cc_image_config {
    fn empty() -> cc_image_config {
        cc_image_config {
            architecture: ptr::null_mut(),
            os: ptr::null_mut(),
            env: ptr::null_mut(),
            env_count: 0,
            working_dir: ptr::null_mut(),
            entrypoint: ptr::null_mut(),
            entrypoint_count: 0,
            cmd: ptr::null_mut(),
            cmd_count: 0,
            user: ptr::null_mut(),
            label_keys: ptr::null_mut(),
            label_values: ptr::null_mut(),
            label_count: 0,
        }
    }

    /// Frees what the fields point to (not the struct).
    ///
    /// # Safety
    /// Every pointer field is NULL or owned by this struct.
    unsafe fn release(&mut self) {
        // SAFETY: per the contract.
        unsafe {
            for s in [self.architecture, self.os, self.working_dir, self.user] {
                alloc::free_string(s);
            }
            for a in [
                self.env,
                self.entrypoint,
                self.cmd,
                self.label_keys,
                self.label_values,
            ] {
                alloc::free_strings(a);
            }
        }
        *self = cc_image_config::empty();
    }
}

fn image_config(c: &cc::ImageConfig) -> Result<cc_image_config, Failure> {
    let mut out = cc_image_config::empty();
    let fill = |out: &mut cc_image_config| -> Result<(), Failure> {
        let opt = |s: &Option<String>| s.as_deref().map_or(Ok(ptr::null_mut()), alloc::string);
        out.architecture = alloc::string(&c.architecture)?;
        out.os = alloc::string(&c.os)?;
        out.env = alloc::strings(&c.env)?;
        out.env_count = c.env.len();
        out.working_dir = opt(&c.working_dir)?;
        out.entrypoint = alloc::strings(&c.entrypoint)?;
        out.entrypoint_count = c.entrypoint.len();
        out.cmd = alloc::strings(&c.cmd)?;
        out.cmd_count = c.cmd.len();
        out.user = opt(&c.user)?;
        let keys: Vec<&String> = c.labels.keys().collect();
        let values: Vec<&String> = c.labels.values().collect();
        out.label_keys = alloc::strings(&keys)?;
        out.label_values = alloc::strings(&values)?;
        out.label_count = keys.len();
        Ok(())
    };
    match fill(&mut out) {
        Ok(()) => Ok(out),
        Err(e) => {
            // SAFETY: every field is NULL or was just allocated for `out`.
            unsafe { out.release() };
            Err(e)
        }
    }
}

/// The configuration of an image (or snapshot) source. A directory source
/// has none: `CC_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_source_image_config(
    source: cc_source,
    out: *mut *mut cc_image_config,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable pointer slot.
        let out = unsafe { Out::new(out, "out") }?;
        let source = handles::get::<cc::Source>(source)?;
        let config = image_of(&source)?.config();
        let block = alloc::array(vec![cc_image_config::empty()])?;
        match image_config(&config) {
            Ok(c) => {
                // SAFETY: `block` was just allocated for one struct.
                unsafe { block.write(c) };
                out.write(block);
                Ok(())
            }
            Err(e) => {
                // SAFETY: `block` came from `alloc::array` and holds no pointers.
                unsafe { alloc::free_block(block) };
                Err(e)
            }
        }
    })
}

/// Frees an image configuration and everything it points to. NULL is fine.
///
/// # Safety
/// `config` is NULL or came from `cc_source_image_config`, not freed yet.
#[no_mangle]
pub unsafe extern "C" fn cc_image_config_free(config: *mut cc_image_config) {
    if config.is_null() {
        return;
    }
    // SAFETY: per the contract `config` is a live struct from
    // `cc_source_image_config`, whose fields it owns.
    unsafe {
        (*config).release();
        alloc::free_block(config);
    }
}
