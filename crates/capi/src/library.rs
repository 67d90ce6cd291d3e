//! The library as a whole: init and shutdown, versions, capabilities.

use std::ffi::c_char;

use crate::error::{cc_error, cc_error_code, Failure, CC_ERR_HYPERVISOR_UNAVAILABLE};
use crate::ffi::{entry, guard, shielded, SizedOut};
use crate::handles::{self, Object};

/// The C API's version, `MAJOR.MINOR.PATCH` (see `cc_api_version`).
pub const CC_API_VERSION_MAJOR: u32 = 0;
/// See `CC_API_VERSION_MAJOR`.
pub const CC_API_VERSION_MINOR: u32 = 1;
/// See `CC_API_VERSION_MAJOR`.
pub const CC_API_VERSION_PATCH: u32 = 0;

/// `cc_api_version()`: the three numbers above (a test keeps them equal).
const API_VERSION: &[u8] = b"0.1.0\0";

/// Initializes the library. Call it before anything else; calling it again
/// does nothing. After `cc_shutdown`, it initializes the library anew.
///
/// # Safety
/// `err` is NULL or valid for writing a `cc_error`.
#[no_mangle]
pub unsafe extern "C" fn cc_init(err: *mut cc_error) -> cc_error_code {
    guard(err, || {
        handles::initialize();
        Ok(())
    })
}

/// Shuts the library down: closes every instance (in parallel), client and
/// other object still open, cancels pulls in flight, and releases every
/// handle. Afterwards every call except `cc_init`, the version queries,
/// `cc_supports_hypervisor` and the free functions fails with
/// `CC_ERR_INVALID_ARGUMENT` ("library not initialized: call cc_init")
/// until `cc_init` is called again. Calls blocked in other threads return
/// (a wait ends with `CC_ERR_ALREADY_CLOSED`, a pull with
/// `CC_ERR_CANCELLED`). Shutting down a library that is not initialized
/// does nothing. Reports the first failure to close an instance, after
/// closing all the others.
///
/// # Safety
/// `err` is NULL or valid for writing a `cc_error`.
#[no_mangle]
pub unsafe extern "C" fn cc_shutdown(err: *mut cc_error) -> cc_error_code {
    guard(err, || {
        let objects = handles::shut_down();
        let mut instances = Vec::new();
        for object in &objects {
            match object {
                Object::Client(c) => c.close(),
                Object::Instance(i) => instances.push(i.clone()),
                Object::Snapshot(s) => s.close(),
                _ => {}
            }
        }
        // Close instances in parallel: each may take a moment to power off.
        let results: Vec<Result<(), Failure>> = std::thread::scope(|scope| {
            let workers: Vec<_> = instances
                .iter()
                .map(|inst| {
                    std::thread::Builder::new()
                        .name("cc-shutdown".into())
                        .spawn_scoped(scope, || inst.close())
                        .map_err(|_| inst)
                })
                .collect();
            workers
                .into_iter()
                .map(|w| match w {
                    Ok(thread) => thread.join().unwrap_or_else(|p| Err(Failure::panic(p))),
                    Err(inst) => inst.close(),
                })
                .collect()
        });
        drop(objects);
        results.into_iter().collect()
    })
}

/// The C API version, `"MAJOR.MINOR.PATCH"`: a static string (do not free
/// it). Works whether or not the library is initialized.
#[no_mangle]
pub extern "C" fn cc_api_version() -> *const c_char {
    API_VERSION.as_ptr().cast()
}

/// Whether a program written against API version `major.minor` can use
/// this library: `major` equals `CC_API_VERSION_MAJOR` and `minor` is at
/// most `CC_API_VERSION_MINOR`. Minor versions only add to the API;
/// anything incompatible changes the major version (also while it is 0).
/// Works whether or not the library is initialized.
#[no_mangle]
pub extern "C" fn cc_api_version_compatible(major: u32, minor: u32) -> bool {
    major == CC_API_VERSION_MAJOR && minor <= CC_API_VERSION_MINOR
}

/// The version of the host-guest agent protocol this library speaks.
/// Works whether or not the library is initialized.
#[no_mangle]
pub extern "C" fn cc_guest_protocol_version() -> u32 {
    cc::GUEST_PROTOCOL_VERSION
}

/// Whether instances can run here: QEMU, an accelerator (KVM, or QEMU's
/// software emulation TCG where there is none), the guest kernel and the
/// agent are all usable. `cc_query_capabilities` says which accelerator
/// and whether it is hardware-accelerated, or why instances cannot run.
/// `CC_ACCEL=kvm|tcg` forces the accelerator. Works whether or not the
/// library is initialized.
#[no_mangle]
pub extern "C" fn cc_supports_hypervisor() -> bool {
    shielded(|| cc::host_info().hypervisor_available()).unwrap_or(false)
}

/// What this host offers. The caller sets `size` to
/// `sizeof(cc_capabilities)` first (`CC_CAPABILITIES_INIT` does); the
/// library writes only the fields within `size` bytes (never `size`), so
/// a program built against an older, smaller struct keeps working. All
/// strings are static (do not free them).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct cc_capabilities {
    /// `sizeof(cc_capabilities)` as the caller was compiled with.
    pub size: usize,
    /// The host architecture guests run as: `"x86_64"`.
    pub architecture: *const c_char,
    /// Whether instances can run here (as `cc_supports_hypervisor`);
    /// always true when the call succeeds.
    pub hypervisor_available: bool,
    /// The accelerator instances will use: `"kvm"` or `"tcg"`.
    pub accelerator: *const c_char,
    /// QEMU runs under its own seccomp filter.
    pub confined_seccomp: bool,
    /// QEMU runs in its own user, mount, PID, network, IPC and UTS
    /// namespaces and sees only its own files.
    pub confined_namespaces: bool,
    /// The host uid QEMU runs as (an unprivileged one when the caller is
    /// root).
    pub sandbox_uid: u32,
    /// What of the confinement this host cannot give, `"; "`-separated;
    /// `""` when fully confined.
    pub confinement_gaps: *const c_char,
    /// Whether the accelerator is hardware virtualization (KVM) rather
    /// than QEMU's slower software emulation (TCG).
    pub hardware_accelerated: bool,
    /// The guest kernel's content hash (the key it was built under, as
    /// `crumble doctor` shows it); `""` when unknown or no kernel is found.
    pub kernel_hash: *const c_char,
}

/// The size of `cc_capabilities`' first version: the least `size` the
/// library accepts.
const CAPABILITIES_V1_SIZE: usize = std::mem::size_of::<cc_capabilities>();

/// Fills `out` with the host's capabilities. Fails with
/// `CC_ERR_HYPERVISOR_UNAVAILABLE` when no instance can start here (QEMU,
/// the guest kernel or the agent missing, or `CC_ACCEL` asking for an
/// accelerator the host cannot provide), the message saying what is
/// missing; with `CC_ERR_INVALID_ARGUMENT` when `out->size` is below the
/// first version's.
///
/// # Safety
/// `out` is NULL or valid for reading its `size` and writing `size`
/// bytes; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_query_capabilities(
    out: *mut cc_capabilities,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a `cc_capabilities` of its size.
        let out = unsafe { SizedOut::new(out, CAPABILITIES_V1_SIZE, "out") }?;
        let host = cc::host_info();
        if let Some(why) = host.unavailable() {
            return Err(Failure::new(CC_ERR_HYPERVISOR_UNAVAILABLE, why));
        }
        let kvm = host.hardware_accelerated();
        let static_str = |s: &'static [u8]| s.as_ptr().cast::<c_char>();
        let arch: &'static [u8] = match std::env::consts::ARCH {
            "x86_64" => b"x86_64\0",
            "aarch64" => b"aarch64\0",
            _ => b"unknown\0",
        };
        let confinement = host.confinement;
        // The host's answer does not change while the process runs.
        static GAPS: std::sync::OnceLock<std::ffi::CString> = std::sync::OnceLock::new();
        let gaps = GAPS.get_or_init(|| {
            let joined = confinement.gaps.join("; ").replace('\0', " ");
            std::ffi::CString::new(joined).unwrap_or_default()
        });
        out.write(cc_capabilities {
            size: CAPABILITIES_V1_SIZE,
            architecture: static_str(arch),
            hypervisor_available: true,
            accelerator: static_str(if kvm { b"kvm\0" } else { b"tcg\0" }),
            confined_seccomp: confinement.seccomp,
            confined_namespaces: confinement.namespaces,
            sandbox_uid: confinement.uid,
            confinement_gaps: gaps.as_ptr(),
            hardware_accelerated: kvm,
            kernel_hash: static_c_str(host.kernel.ok().and_then(|k| k.hash).unwrap_or_default()),
        });
        Ok(())
    })
}

/// `s` as a C string that lives as long as the process: each distinct
/// value is kept once (kernel hashes: a handful at most).
fn static_c_str(s: String) -> *const c_char {
    static KEPT: std::sync::Mutex<Vec<&'static std::ffi::CStr>> = std::sync::Mutex::new(Vec::new());
    let mut kept = KEPT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let c = std::ffi::CString::new(s).unwrap_or_default();
    if let Some(old) = kept.iter().find(|k| **k == c.as_c_str()) {
        return old.as_ptr();
    }
    let leaked: &'static std::ffi::CStr = Box::leak(c.into_boxed_c_str());
    kept.push(leaked);
    leaked.as_ptr()
}
