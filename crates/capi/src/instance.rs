//! Instances: boot, identity, lifecycle.

use std::ffi::c_char;
use std::sync::Arc;
use std::time::Duration;

use crate::alloc;
use crate::cancel::cc_cancel_token;
use crate::error::{cc_error, cc_error_code, Failure};
use crate::ffi::{cstr, entry, guard, opt_cstr, read_sized, slice, strings, Out};
use crate::handles;
use crate::objects::{Cancel, Instance};
use crate::oci::cc_source;

/// A running virtual machine with its own root filesystem. Usable from any
/// thread, also concurrently (commands, file calls and waits in parallel).
pub type cc_instance = u64;

/// A host directory shared into the guest.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct cc_mount {
    /// An existing host directory.
    pub host_path: *const c_char,
    /// Where it appears in the guest: an absolute path other than `/`.
    pub guest_path: *const c_char,
    /// Writable (writes land in the host directory at once); read-only
    /// otherwise, enforced by the host.
    pub writable: bool,
}

/// How to run an instance. `CC_INSTANCE_OPTIONS_INIT` (`size` set, every
/// other field zero) means every default. The library reads only the
/// `size` bytes the caller declared and takes the defaults for fields
/// beyond them, so a program built against an older, smaller struct keeps
/// working; a `size` below the first version's is `CC_ERR_INVALID_ARGUMENT`,
/// as are non-zero bytes past the fields this library knows.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct cc_instance_options {
    /// `sizeof(cc_instance_options)` as the caller was compiled with.
    pub size: usize,
    /// Guest memory in MiB; 0 for the default (512).
    pub memory_mb: u32,
    /// Virtual CPUs; 0 for the default (1).
    pub cpus: u32,
    /// Ends the instance this many seconds after it was created (later
    /// calls fail with `CC_ERR_NOT_RUNNING`), time paused not counted; 0
    /// for never.
    pub timeout_seconds: f64,
    /// Default user of commands (`name`, `uid`, `uid:gid`, `name:group`);
    /// NULL for the image's.
    pub user: *const c_char,
    /// `mount_count` host directories to share; NULL when 0.
    pub mounts: *const cc_mount,
    pub mount_count: usize,
    /// No network interface (egress is on by default, so false keeps it).
    pub no_network: bool,
    /// Always boot cold, never from a template (warm start is on by
    /// default, so false keeps it).
    pub no_warm_start: bool,
    /// Let the guest reach the host: its loopback (as 10.0.2.2) and its
    /// interface addresses, which are denied by default.
    pub allow_host: bool,
    /// `net_allow_count` rules (`ADDR[/PREFIX][:PORT[-PORT]]`, `*` for any
    /// address); when there are any, the guest reaches only destinations
    /// matching one. NULL when 0.
    pub net_allow: *const *const c_char,
    pub net_allow_count: usize,
    /// `net_deny_count` rules of destinations never reached (they win over
    /// `net_allow` and `allow_host`). NULL when 0.
    pub net_deny: *const *const c_char,
    pub net_deny_count: usize,
    /// Size of the writable layer in MiB (the guest gets ENOSPC beyond
    /// it); 0 for the default (4096).
    pub disk_mb: u32,
    /// How QEMU is confined: `CC_CONFINE_DEFAULT` (0: everything the host
    /// offers, gaps reported by `cc_query_capabilities`),
    /// `CC_CONFINE_STRICT` (refuse to start with any gap) or
    /// `CC_CONFINE_OFF` (measurements and debugging only).
    pub confinement: u32,
    /// The largest result one call builds in memory (a file read whole,
    /// a command's captured output); bigger ones fail with
    /// `CC_ERR_TOO_LARGE` and should be streamed. 0 for the default
    /// (`CC_DEFAULT_MAX_RESULT_BYTES`, 1 GiB).
    pub max_result_bytes: u64,
}

impl Default for cc_instance_options {
    /// As `CC_INSTANCE_OPTIONS_INIT`: `size` set, every default.
    fn default() -> cc_instance_options {
        cc_instance_options {
            size: std::mem::size_of::<cc_instance_options>(),
            memory_mb: 0,
            cpus: 0,
            timeout_seconds: 0.0,
            user: std::ptr::null(),
            mounts: std::ptr::null(),
            mount_count: 0,
            no_network: false,
            no_warm_start: false,
            allow_host: false,
            net_allow: std::ptr::null(),
            net_allow_count: 0,
            net_deny: std::ptr::null(),
            net_deny_count: 0,
            disk_mb: 0,
            confinement: CC_CONFINE_DEFAULT,
            max_result_bytes: 0,
        }
    }
}

/// The size of `cc_instance_options`' first version: the least `size`
/// the library accepts.
const OPTIONS_V1_SIZE: usize = std::mem::size_of::<cc_instance_options>();

/// `cc_instance_options.confinement`: everything the host offers.
pub const CC_CONFINE_DEFAULT: u32 = 0;
/// `cc_instance_options.confinement`: refuse to start with any gap.
pub const CC_CONFINE_STRICT: u32 = 1;
/// `cc_instance_options.confinement`: QEMU unconfined (measurements and
/// debugging only, never for untrusted guests).
pub const CC_CONFINE_OFF: u32 = 2;

/// The default `max_result_bytes`: 1 GiB.
pub const CC_DEFAULT_MAX_RESULT_BYTES: u64 = 1_073_741_824;

const _: () = assert!(CC_DEFAULT_MAX_RESULT_BYTES == cc::DEFAULT_MAX_RESULT_BYTES);

/// How an instance's guest came to run.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum cc_start_kind {
    /// Booted from scratch (warm start off, or no template usable).
    CC_START_COLD = 0,
    /// Booted from scratch to build this configuration's template, then
    /// restored from it (the first start of a configuration).
    CC_START_BUILT = 1,
    /// Restored from an existing template.
    CC_START_WARM = 2,
    /// Restored from a parked instance (`cc_instance_restore`).
    CC_START_RESTORED = 3,
}

fn options(o: Option<&cc_instance_options>) -> Result<cc::Options, Failure> {
    let mut out = cc::Options::default();
    let Some(o) = o else { return Ok(out) };
    out.network = !o.no_network;
    out.warm_start = !o.no_warm_start;
    if o.memory_mb != 0 {
        out.memory_mb = o.memory_mb;
    }
    if o.cpus != 0 {
        out.cpus = o.cpus;
    }
    if o.disk_mb != 0 {
        out.disk_mb = o.disk_mb;
    }
    out.confinement = match o.confinement {
        CC_CONFINE_DEFAULT => cc::ConfineMode::BestEffort,
        CC_CONFINE_STRICT => cc::ConfineMode::Strict,
        CC_CONFINE_OFF => cc::ConfineMode::Off,
        other => {
            return Err(Failure::invalid(format!(
                "confinement {other}: expected CC_CONFINE_DEFAULT, _STRICT or _OFF"
            )))
        }
    };
    if o.max_result_bytes != 0 {
        out.max_result_bytes = o.max_result_bytes;
    }
    if o.timeout_seconds != 0.0 {
        out.timeout = Some(
            Duration::try_from_secs_f64(o.timeout_seconds)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    Failure::invalid(format!(
                        "timeout_seconds {} is not a positive number of seconds",
                        o.timeout_seconds
                    ))
                })?,
        );
    }
    out.network_policy.allow_host = o.allow_host;
    // SAFETY: documented at cc_instance_new: `user` is NULL or a string,
    // `mounts` NULL or `mount_count` mounts with string paths, the rule
    // lists NULL or their count of strings.
    unsafe {
        out.network_policy.allow = rules(o.net_allow, o.net_allow_count, "options->net_allow")?;
        out.network_policy.deny = rules(o.net_deny, o.net_deny_count, "options->net_deny")?;
        out.user = opt_cstr(o.user, "options->user")?.map(str::to_string);
        for (i, m) in slice(o.mounts, o.mount_count, "options->mounts")?
            .iter()
            .enumerate()
        {
            let host = cstr(m.host_path, &format!("options->mounts[{i}].host_path"))?;
            let guest = cstr(m.guest_path, &format!("options->mounts[{i}].guest_path"))?;
            out.mounts.push(if m.writable {
                cc::Mount::writable(host, guest)
            } else {
                cc::Mount::read_only(host, guest)
            });
        }
    }
    Ok(out)
}

/// Parses `count` network rules.
///
/// # Safety
/// `p` is NULL or valid for reading `count` pointers, each NULL or a
/// NUL-terminated string.
unsafe fn rules(
    p: *const *const c_char,
    count: usize,
    name: &str,
) -> Result<Vec<cc::Rule>, Failure> {
    // SAFETY: forwarded from the caller.
    let texts = unsafe { strings(p, count, name) }?;
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            t.parse()
                .map_err(|e| Failure::invalid(format!("{name}[{i}]: {e}")))
        })
        .collect()
}

/// Boots an instance from `source` and returns once it is ready for
/// commands (about a second under software emulation). `options` may be
/// NULL for the defaults.
///
/// # Safety
/// `options` is NULL or a valid `cc_instance_options` of its `size` bytes
/// (its strings NULL or NUL-terminated, `mounts` valid for `mount_count`
/// entries, `net_allow` and `net_deny` for their counts of strings); `out`
/// is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_new(
    source: cc_source,
    options: *const cc_instance_options,
    out: *mut cc_instance,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's guarantees are the variant's.
    unsafe { cc_instance_new_cancellable(source, options, 0, out, err) }
}

/// `cc_instance_new` that `cancel` (0 for none) stops with
/// `CC_ERR_CANCELLED` (at once while it waits for the guest to come up);
/// nothing of the instance remains.
///
/// # Safety
/// `options` is NULL or valid; `out` is NULL or valid for writing; `err`
/// is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_new_cancellable(
    source: cc_source,
    options: *const cc_instance_options,
    cancel: cc_cancel_token,
    out: *mut cc_instance,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or valid options, and NULL or a
        // writable slot.
        let (opts, out) = unsafe {
            (
                read_sized(options, OPTIONS_V1_SIZE, "options")?,
                Out::new(out, "out")?,
            )
        };
        let opts = self::options(opts.as_ref())?;
        let source = handles::get::<cc::Source>(source)?;
        let inst = match handles::get_opt::<Cancel>(cancel)? {
            Some(c) => cc::Instance::new_cancellable(&source, opts, c.token())?,
            None => cc::Instance::new(&source, opts)?,
        };
        out.write(handles::insert(Arc::new(Instance::new(inst)))?);
        Ok(())
    })
}

/// The instance's unique id, a string to free with `cc_string_free`. Also
/// works on a closed instance.
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_id(
    inst: cc_instance,
    out: *mut *mut c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable pointer slot.
        let out = unsafe { Out::new(out, "out") }?;
        let inst = handles::get::<Instance>(inst)?;
        out.write(alloc::string(inst.any().id())?);
        Ok(())
    })
}

/// Whether the instance booted cold or was restored from a template. Also
/// works on a closed instance.
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_start_kind(
    inst: cc_instance,
    out: *mut cc_start_kind,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable slot.
        let out = unsafe { Out::new(out, "out") }?;
        out.write(match handles::get::<Instance>(inst)?.any().start_kind() {
            cc::StartKind::Cold => cc_start_kind::CC_START_COLD,
            cc::StartKind::Built => cc_start_kind::CC_START_BUILT,
            cc::StartKind::Warm => cc_start_kind::CC_START_WARM,
            cc::StartKind::Restored => cc_start_kind::CC_START_RESTORED,
        });
        Ok(())
    })
}

/// Whether the instance is open and its guest alive (false once closed,
/// timed out or crashed).
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_is_running(
    inst: cc_instance,
    out: *mut bool,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's promises, passed on.
    unsafe { write_state(inst, out, err, cc::Instance::is_running) }
}

/// Writes to `out` what `state` says of the open instance, false once
/// closed.
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
unsafe fn write_state(
    inst: cc_instance,
    out: *mut bool,
    err: *mut cc_error,
    state: fn(&cc::Instance) -> bool,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable bool.
        let out = unsafe { Out::new(out, "out") }?;
        let inst = handles::get::<Instance>(inst)?;
        out.write(inst.get().is_ok_and(state));
        Ok(())
    })
}

/// Waits until the guest ends (powers off, crashes or times out): `CC_OK`.
/// `cancel` (0 for none) stops the wait with `CC_ERR_CANCELLED`; closing
/// the instance meanwhile ends it with `CC_ERR_ALREADY_CLOSED`.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_wait(
    inst: cc_instance,
    cancel: cc_cancel_token,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        let inst = handles::get::<Instance>(inst)?;
        let cancel = handles::get_opt::<Cancel>(cancel)?;
        inst.get()?.wait(cancel.as_ref().map(|c| c.token()))?;
        Ok(())
    })
}

/// Connects (`enabled`) or disconnects the guest's network interface; while
/// disconnected no packet leaves the guest. `CC_ERR_INVALID_ARGUMENT` for
/// an instance created with `no_network`.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_set_network_enabled(
    inst: cc_instance,
    enabled: bool,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        Ok(handles::get::<Instance>(inst)?
            .get()?
            .set_network_enabled(enabled)?)
    })
}

/// Stops the guest's CPUs in place: its processes and clocks stand still
/// and it uses no host CPU; memory, files and connections stay. Until
/// `cc_instance_resume`, new requests (commands, file operations, signals,
/// listen, dial, snapshots) fail at once with `CC_ERR_PAUSED`, while waits
/// (`cc_cmd_wait`, reading output, accept, `cc_instance_wait`) keep
/// waiting. Paused time counts towards no time limit (`timeout_seconds`,
/// command timeouts). Pausing a paused instance is `CC_OK`; a closed one
/// fails with `CC_ERR_ALREADY_CLOSED`, a dead one with
/// `CC_ERR_NOT_RUNNING`. Closing a paused instance is prompt.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_pause(inst: cc_instance, err: *mut cc_error) -> cc_error_code {
    entry(err, || {
        Ok(handles::get::<Instance>(inst)?.get()?.pause()?)
    })
}

/// Lets a paused guest run on and sets its clock from the host's. Resuming
/// a running instance is `CC_OK`; a closed one fails with
/// `CC_ERR_ALREADY_CLOSED`, a dead one with `CC_ERR_NOT_RUNNING`.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_resume(
    inst: cc_instance,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        Ok(handles::get::<Instance>(inst)?.get()?.resume()?)
    })
}

/// Whether the instance is paused (`cc_instance_pause`); false once closed.
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_is_paused(
    inst: cc_instance,
    out: *mut bool,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's promises, passed on.
    unsafe { write_state(inst, out, err, cc::Instance::is_paused) }
}

/// Closes the instance: with a writable mount the guest syncs and powers
/// off first, without one the VM ends at once; nothing of it remains. Closing again is `CC_OK`; other calls on a closed instance
/// (except `cc_instance_id`, `cc_instance_is_running`,
/// `cc_instance_is_paused` and the free) fail
/// with `CC_ERR_ALREADY_CLOSED`, as do its files and commands.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_close(inst: cc_instance, err: *mut cc_error) -> cc_error_code {
    entry(err, || handles::get::<Instance>(inst)?.close())
}

/// Saves the running instance to the new directory `path` and closes it:
/// its VM ends and its memory is released; `cc_instance_restore` starts
/// it again from there, processes intact. `bytes` (NULL to skip) gets the
/// disk space the park takes. Commands may be running: their guest
/// processes go on in every restore, while their `cc_cmd`s, listeners and
/// connections fail with `CC_ERR_ALREADY_CLOSED`. No guest process may
/// have a file open on a mount (`CC_ERR_INVALID_ARGUMENT`; the instance
/// runs on). Mounts are kept: every restore shares the same host
/// directories with the same modes. Handle still needs `cc_instance_free`.
///
/// # Safety
/// `path` is a string; `bytes` is NULL or valid for writing; `err` is NULL
/// or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_park(
    inst: cc_instance,
    path: *const c_char,
    bytes: *mut u64,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or a writable slot.
        let (path, bytes) = unsafe { (cstr(path, "path")?, Out::opt(bytes)) };
        let parked = handles::get::<Instance>(inst)?.get()?.park(path)?;
        if let Some(out) = bytes {
            out.write(parked.bytes);
        }
        Ok(())
    })
}

/// Starts a new, independent instance from the park at `path` (made by
/// `cc_instance_park`), its processes, memory and files as they were
/// parked, with a new id and hostname; it can be restored any number of
/// times. Memory, CPUs, disk, network and user are the parked instance's.
/// `timeout_seconds` ends the restored instance that long after the
/// restore (0 for never). A park made by another kernel, agent or QEMU,
/// or a path that is not a park, is `CC_ERR_INVALID_ARGUMENT` and nothing
/// starts; so is a park whose mount source directory is gone, and the park
/// of a warm-started instance whose template was removed or rebuilt since
/// (such a park keeps only the memory pages that differ from it).
///
/// # Safety
/// `path` is a string; `out` is NULL or valid for writing; `err` is NULL
/// or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_restore(
    path: *const c_char,
    timeout_seconds: f64,
    out: *mut cc_instance,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or a writable slot.
        let (path, out) = unsafe { (cstr(path, "path")?, Out::new(out, "out")?) };
        let mut options = cc::RestoreOptions::default();
        if timeout_seconds != 0.0 {
            options.timeout = Some(
                Duration::try_from_secs_f64(timeout_seconds)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        Failure::invalid(format!(
                            "timeout_seconds {timeout_seconds} is not a positive number of seconds"
                        ))
                    })?,
            );
        }
        let inst = cc::Instance::restore(path, options)?;
        out.write(handles::insert(Arc::new(Instance::new(inst)))?);
        Ok(())
    })
}

/// Starts `n` (1 to 64) new instances that are copies of `inst` at the
/// moment of the call (memory, guest processes, files), each diverging
/// on its own, with a new id and hostname; `inst` is stopped only while
/// it is saved, then runs on. Writes their handles to `out[0..n]` (each
/// freed with `cc_instance_free`), all or none. The children share the
/// saved memory copy-on-write; as for `cc_instance_park`, no guest
/// process of `inst` may have a file open on a mount
/// (`CC_ERR_INVALID_ARGUMENT`; it runs on), and source and children keep
/// the mounts. Commands, listeners and connections in flight stay with
/// `inst` and carry on; the children's copies of running processes go on
/// with their output dropped and their input at end of file. Calls on
/// `inst` from other threads meanwhile wait for the save. Children report
/// `CC_START_RESTORED`.
///
/// # Safety
/// `out` is NULL or valid for writing `n` handles; `err` is NULL or valid
/// for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_branch(
    inst: cc_instance,
    n: usize,
    out: *mut cc_instance,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let children = handles::get::<Instance>(inst)?.get()?.branch(n)?;
        let mut made = Vec::with_capacity(children.len());
        for child in children {
            match handles::insert(Arc::new(Instance::new(child))) {
                Ok(h) => made.push(h),
                Err(e) => {
                    for h in made {
                        if let Ok(Some(i)) = handles::remove::<Instance>(h) {
                            let _ = i.close();
                        }
                    }
                    return Err(e);
                }
            }
        }
        for (i, h) in made.into_iter().enumerate() {
            // SAFETY: the caller gave room for n handles, and i < n.
            unsafe { out.add(i).write(h) };
        }
        Ok(())
    })
}

/// Closes the instance if needed and releases the handle (0, and handles
/// released by `cc_shutdown`, are fine).
#[no_mangle]
pub extern "C" fn cc_instance_free(inst: cc_instance) -> cc_error_code {
    guard(std::ptr::null_mut(), || {
        match handles::remove::<Instance>(inst)? {
            Some(i) => i.close(),
            None => Ok(()),
        }
    })
}
