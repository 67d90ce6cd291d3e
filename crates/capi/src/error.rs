//! Error codes, the caller-owned `cc_error` struct, and how core errors,
//! argument checks and panics become them.

use std::any::Any;
use std::ffi::c_char;
use std::mem::{offset_of, size_of};
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
    /// No instance can start here: QEMU is missing or the requested
    /// accelerator is unusable (`cc_query_capabilities` also reports a
    /// missing guest kernel or agent with it).
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
    /// The instance is paused (`cc_instance_pause`): new requests are
    /// refused until `cc_instance_resume`.
    CC_ERR_PAUSED = 11,
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
            cc::ErrorCode::Paused => CC_ERR_PAUSED,
            cc::ErrorCode::Unknown => CC_ERR_UNKNOWN,
        }
    }
}

/// What a failed call reports. The caller owns the struct (on its stack,
/// say) and sets `size` to `sizeof(cc_error)` first (`CC_ERROR_INIT` does);
/// the library fills it only when a call fails, overwriting every field
/// but `size` without reading or freeing what was there. It writes only
/// the fields that lie wholly within `size` bytes, so a program built
/// against an older, smaller `cc_error` keeps working. A `size` of 0 (a
/// struct zeroed with `{0}`) stands for this first version, which every
/// later one extends. Release the strings with `cc_error_free` before the
/// struct is reused or goes away.
#[repr(C)]
#[derive(Debug)]
pub struct cc_error {
    /// `sizeof(cc_error)` as the caller was compiled with; set by the
    /// caller, never written by the library.
    pub size: usize,
    /// The same code the call returned.
    pub code: cc_error_code,
    /// What went wrong, for people; never NULL after a failed call (unless
    /// memory ran out).
    pub message: *mut c_char,
    /// The operation that failed (`"remove"`, `"read_file"`, ...), or NULL.
    pub op: *mut c_char,
    /// The path involved, or NULL.
    pub path: *mut c_char,
    /// The OS `errno` behind the failure (the guest's for a guest file or
    /// network operation: `ENOENT` for a missing guest file), 0 when none.
    pub os_errno: i32,
}

impl Default for cc_error {
    /// As `CC_ERROR_INIT`: `size` set, every other field zero.
    fn default() -> cc_error {
        cc_error {
            size: size_of::<cc_error>(),
            code: CC_OK,
            message: ptr::null_mut(),
            op: ptr::null_mut(),
            path: ptr::null_mut(),
            os_errno: 0,
        }
    }
}

/// A failure on its way to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) code: cc_error_code,
    pub(crate) message: String,
    pub(crate) op: Option<String>,
    pub(crate) path: Option<String>,
    /// 0 when none.
    pub(crate) os_errno: i32,
}

impl Failure {
    pub(crate) fn new(code: cc_error_code, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            op: None,
            path: None,
            os_errno: 0,
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
            os_errno: e.os_errno().unwrap_or(0),
        }
    }
}

/// The size of `cc_error`'s first version, which a `size` of 0 stands for:
/// fields added later lie beyond it.
const FIRST_ERROR_SIZE: usize = offset_of!(cc_error, os_errno) + size_of::<i32>();

/// The bytes of `*err` the caller declared, by its `size` field.
///
/// # Safety
/// `err` points to a readable `size` field.
unsafe fn declared_size(err: *const cc_error) -> usize {
    // SAFETY: as the caller guarantees.
    match unsafe { ptr::addr_of!((*err).size).read() } {
        0 => FIRST_ERROR_SIZE,
        size => size,
    }
}

/// Stores `f` in `*err` (when `err` is not NULL), overwriting the fields
/// that fit in its declared `size`; a string whose field does not fit is
/// not allocated.
///
/// # Safety
/// `err` is NULL or valid for reading its `size` field and writing `size`
/// bytes.
pub(crate) unsafe fn fill(err: *mut cc_error, f: &Failure) {
    if err.is_null() {
        return;
    }
    // SAFETY: the caller guarantees `err` points to a struct whose leading
    // `size` field is readable and whose first `size` bytes are writable;
    // each field is written only when it lies wholly within them, through
    // raw pointers (neither reading nor dropping the old contents).
    unsafe {
        let size = declared_size(err);
        let fits = |offset: usize, len: usize| offset + len <= size;
        if fits(offset_of!(cc_error, code), size_of::<cc_error_code>()) {
            ptr::addr_of_mut!((*err).code).write(f.code);
        }
        let strings = [
            (offset_of!(cc_error, message), Some(f.message.as_str())),
            (offset_of!(cc_error, op), f.op.as_deref()),
            (offset_of!(cc_error, path), f.path.as_deref()),
        ];
        for (offset, text) in strings {
            if fits(offset, size_of::<*mut c_char>()) {
                let value = text.map_or(ptr::null_mut(), alloc::string_or_null);
                err.cast::<u8>()
                    .add(offset)
                    .cast::<*mut c_char>()
                    .write(value);
            }
        }
        if fits(offset_of!(cc_error, os_errno), size_of::<i32>()) {
            ptr::addr_of_mut!((*err).os_errno).write(f.os_errno);
        }
    }
}

/// Releases the strings of an error a failed call filled in and resets its
/// fields (those within its `size`) to `CC_OK`, NULL and 0, keeping `size`.
/// NULL, and an error already freed or only initialized, are fine.
///
/// # Safety
/// `err` is NULL or points to a `cc_error` whose `size` is set and whose
/// other fields are zero-initialized or were filled by this library (and
/// not modified since).
#[no_mangle]
pub unsafe extern "C" fn cc_error_free(err: *mut cc_error) {
    if err.is_null() {
        return;
    }
    // SAFETY: the caller guarantees `err` points to a readable and
    // writable `cc_error` of `size` bytes whose strings, if any, came from
    // this library. Only fields within `size` are touched, and only the
    // pointer fields are read (never the code, which may hold any
    // integer), through raw pointers.
    unsafe {
        let size = declared_size(err);
        let fits = |offset: usize, len: usize| offset + len <= size;
        for offset in [
            offset_of!(cc_error, message),
            offset_of!(cc_error, op),
            offset_of!(cc_error, path),
        ] {
            if fits(offset, size_of::<*mut c_char>()) {
                let field = err.cast::<u8>().add(offset).cast::<*mut c_char>();
                alloc::free_string(field.read());
                field.write(ptr::null_mut());
            }
        }
        if fits(offset_of!(cc_error, code), size_of::<cc_error_code>()) {
            ptr::addr_of_mut!((*err).code).write(CC_OK);
        }
        if fits(offset_of!(cc_error, os_errno), size_of::<i32>()) {
            ptr::addr_of_mut!((*err).os_errno).write(0);
        }
    }
}
