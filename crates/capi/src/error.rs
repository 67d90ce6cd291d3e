//! Error codes, the caller-owned `cc_error` struct, and how core errors,
//! argument checks and panics become them.

use std::any::Any;
use std::ffi::c_char;
use std::ptr;

use crate::alloc;

/// Stable error codes: the numbers never change and equal the core's
/// `cc::ErrorCode`. `CC_OK` (0) is success.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum cc_error_code {
    /// Success. End of file and non-zero exit statuses are successes too.
    CC_OK = 0,
    /// A handle that is 0, freed, never issued, or of another kind.
    CC_ERR_INVALID_HANDLE = 1,
    /// A bad argument: NULL where a value is required, not UTF-8, out of
    /// range, misuse of a command, the library not initialized.
    CC_ERR_INVALID_ARGUMENT = 2,
    /// The instance's guest has ended (crashed, timed out, powered off).
    CC_ERR_NOT_RUNNING = 3,
    /// The object was closed.
    CC_ERR_ALREADY_CLOSED = 4,
    /// An operation took longer than allowed.
    CC_ERR_TIMEOUT = 5,
    /// QEMU is missing or the requested accelerator is unusable.
    CC_ERR_HYPERVISOR_UNAVAILABLE = 6,
    /// A file, directory or process failed, on the host or in the guest
    /// (a missing file, a program that is not there); `op` and `path` say
    /// which where they apply.
    CC_ERR_IO = 7,
    /// A registry could not be reached or refused the request.
    CC_ERR_NETWORK = 8,
    /// Cancelled by a cancel token or a progress callback.
    CC_ERR_CANCELLED = 9,
    /// A result (a file read whole, a command's captured output) is over
    /// the instance's `max_result_bytes`; the message names the size and
    /// the cap. Stream it instead (`cc_instance_copy_out`,
    /// `cc_instance_read_file_stream`, `cc_cmd_output_to_file`).
    CC_ERR_TOO_LARGE = 10,
    /// Anything else, including an internal error (a caught panic).
    CC_ERR_UNKNOWN = 99,
}

pub use cc_error_code::*;

impl From<cc::ErrorCode> for cc_error_code {
    fn from(code: cc::ErrorCode) -> cc_error_code {
        match code {
            cc::ErrorCode::Ok => CC_OK,
            cc::ErrorCode::InvalidHandle => CC_ERR_INVALID_HANDLE,
            cc::ErrorCode::InvalidArgument => CC_ERR_INVALID_ARGUMENT,
            cc::ErrorCode::NotRunning => CC_ERR_NOT_RUNNING,
            cc::ErrorCode::AlreadyClosed => CC_ERR_ALREADY_CLOSED,
            cc::ErrorCode::Timeout => CC_ERR_TIMEOUT,
            cc::ErrorCode::HypervisorUnavailable => CC_ERR_HYPERVISOR_UNAVAILABLE,
            cc::ErrorCode::Io => CC_ERR_IO,
            cc::ErrorCode::Network => CC_ERR_NETWORK,
            cc::ErrorCode::Cancelled => CC_ERR_CANCELLED,
            cc::ErrorCode::TooLarge => CC_ERR_TOO_LARGE,
            cc::ErrorCode::Unknown => CC_ERR_UNKNOWN,
        }
    }
}

/// What a failed call reports. The caller owns the struct (on its stack,
/// say); the library fills it only when a call fails, overwriting every
/// field without reading or freeing what was there. Release the strings
/// with `cc_error_free` before the struct is reused or goes away.
#[repr(C)]
#[derive(Debug)]
pub struct cc_error {
    /// The same code the call returned.
    pub code: cc_error_code,
    /// What went wrong, for people; never NULL after a failed call (unless
    /// memory ran out).
    pub message: *mut c_char,
    /// The operation that failed (`"remove"`, `"read_file"`, ...), or NULL.
    pub op: *mut c_char,
    /// The path involved, or NULL.
    pub path: *mut c_char,
}

/// A failure on its way to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) code: cc_error_code,
    pub(crate) message: String,
    pub(crate) op: Option<String>,
    pub(crate) path: Option<String>,
}

impl Failure {
    pub(crate) fn new(code: cc_error_code, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            op: None,
            path: None,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(CC_ERR_INVALID_ARGUMENT, message)
    }

    pub(crate) fn null(name: &str) -> Failure {
        Failure::invalid(format!("`{name}` is NULL"))
    }

    pub(crate) fn already_closed(what: &str) -> Failure {
        Failure::new(CC_ERR_ALREADY_CLOSED, format!("the {what} is closed"))
    }

    pub(crate) fn not_initialized() -> Failure {
        Failure::invalid("library not initialized: call cc_init")
    }

    /// A panic caught at the boundary.
    pub(crate) fn panic(payload: Box<dyn Any + Send>) -> Failure {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic payload".into());
        Failure::new(
            CC_ERR_UNKNOWN,
            format!("internal error in libcc (a bug; please report it): {what}"),
        )
    }
}

impl From<cc::Error> for Failure {
    fn from(e: cc::Error) -> Failure {
        Failure {
            code: e.code().into(),
            message: e.to_string(),
            op: e.op().map(str::to_string),
            path: e.path().map(str::to_string),
        }
    }
}

/// Stores `f` in `*err` (when `err` is not NULL), overwriting it.
///
/// # Safety
/// `err` is NULL or valid for writing one `cc_error`.
pub(crate) unsafe fn fill(err: *mut cc_error, f: &Failure) {
    if err.is_null() {
        return;
    }
    let value = cc_error {
        code: f.code,
        message: alloc::string_or_null(&f.message),
        op: f
            .op
            .as_deref()
            .map_or(ptr::null_mut(), alloc::string_or_null),
        path: f
            .path
            .as_deref()
            .map_or(ptr::null_mut(), alloc::string_or_null),
    };
    // SAFETY: the caller guarantees `err` is valid for writes; `write`
    // neither reads nor drops the old contents.
    unsafe { err.write(value) };
}

/// Releases the strings of an error a failed call filled in and resets it
/// to `{CC_OK, NULL, NULL, NULL}`. NULL, and an error already freed or
/// zero-initialized, are fine.
///
/// # Safety
/// `err` is NULL or points to a `cc_error` that is zero-initialized or was
/// filled by this library (and not modified since).
#[no_mangle]
pub unsafe extern "C" fn cc_error_free(err: *mut cc_error) {
    if err.is_null() {
        return;
    }
    // SAFETY: the caller guarantees `err` points to a readable and
    // writable `cc_error` whose strings, if any, came from this library.
    // Only the pointer fields are read (never the code, which may hold
    // any integer), through raw pointers.
    unsafe {
        for field in [
            ptr::addr_of_mut!((*err).message),
            ptr::addr_of_mut!((*err).op),
            ptr::addr_of_mut!((*err).path),
        ] {
            alloc::free_string(field.read());
        }
        err.write(cc_error {
            code: CC_OK,
            message: ptr::null_mut(),
            op: ptr::null_mut(),
            path: ptr::null_mut(),
        });
    }
}
