//! Cancel tokens.

use std::sync::Arc;

use crate::error::{cc_error, cc_error_code};
use crate::ffi::{entry, guard, Out};
use crate::handles;
use crate::objects::Cancel;

/// A cancel token: set once (from any thread, or from a progress
/// callback), it stops the calls it was given to (pulls, waits, accepts,
/// and the `_cancellable` reads, writes and loads) with `CC_ERR_CANCELLED`
/// at once, however they block. It stays set. 0 means "no token" where one
/// is optional; a freed token is `CC_ERR_INVALID_HANDLE`.
pub type cc_cancel_token = u64;

/// Creates a cancel token (not cancelled).
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cancel_token_new(
    out: *mut cc_cancel_token,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable handle slot.
        let out = unsafe { Out::new(out, "out") }?;
        out.write(handles::insert(Arc::new(Cancel::default()))?);
        Ok(())
    })
}

/// Creates a token cancelled when `parent` is (at once, if it already
/// is); cancelling the child leaves `parent` alone. Free it with
/// `cc_cancel_token_free` like any token; freeing either does not cancel
/// the other.
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cancel_token_child(
    parent: cc_cancel_token,
    out: *mut cc_cancel_token,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable handle slot.
        let out = unsafe { Out::new(out, "out") }?;
        let parent = handles::get::<Cancel>(parent)?;
        out.write(handles::insert(Arc::new(Cancel::child_of(&parent)))?);
        Ok(())
    })
}

/// Cancels: every call using the token (or a child of it) stops at once.
/// Cancelling again does nothing.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cancel_token_cancel(
    token: cc_cancel_token,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        handles::get::<Cancel>(token)?.cancel();
        Ok(())
    })
}

/// Whether the token was cancelled.
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cancel_token_is_cancelled(
    token: cc_cancel_token,
    out: *mut bool,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable bool.
        let out = unsafe { Out::new(out, "out") }?;
        out.write(handles::get::<Cancel>(token)?.is_cancelled());
        Ok(())
    })
}

/// Releases the handle (0, and handles released by `cc_shutdown`, are
/// fine). Calls already using the token still see it cancelled.
#[no_mangle]
pub extern "C" fn cc_cancel_token_free(token: cc_cancel_token) -> cc_error_code {
    guard(std::ptr::null_mut(), || {
        drop(handles::remove::<Cancel>(token)?);
        Ok(())
    })
}
