//! Memory handed to the caller: strings, byte buffers and arrays, each
//! released by one documented free function. Everything is allocated with
//! `malloc`, so a NULL from it is reported rather than aborting.

use std::ffi::{c_char, c_void};
use std::ptr;

use crate::error::{Failure, CC_ERR_UNKNOWN};

fn out_of_memory(bytes: usize) -> Failure {
    Failure::new(CC_ERR_UNKNOWN, format!("out of memory ({bytes} bytes)"))
}

/// `malloc(max(bytes, 1))`: never NULL on success, even for 0 bytes.
fn malloc(bytes: usize) -> Result<*mut c_void, Failure> {
    // SAFETY: malloc may be called with any size; the result is checked.
    let p = unsafe { libc::malloc(bytes.max(1)) };
    if p.is_null() {
        Err(out_of_memory(bytes))
    } else {
        Ok(p)
    }
}

/// A NUL-terminated copy of `s` (a NUL inside `s` becomes `\0` spelled out,
/// which no path or name can contain anyway).
pub(crate) fn string(s: &str) -> Result<*mut c_char, Failure> {
    let owned;
    let s = if s.contains('\0') {
        owned = s.replace('\0', "\\0");
        owned.as_str()
    } else {
        s
    };
    let p = malloc(s.len() + 1)?.cast::<u8>();
    // SAFETY: `p` has room for `s.len() + 1` bytes and does not overlap `s`.
    unsafe {
        ptr::copy_nonoverlapping(s.as_ptr(), p, s.len());
        p.add(s.len()).write(0);
    }
    Ok(p.cast())
}

/// [`string`], or NULL when memory ran out (for error messages).
pub(crate) fn string_or_null(s: &str) -> *mut c_char {
    string(s).unwrap_or(ptr::null_mut())
}

/// Frees a string from [`string`]; NULL is fine.
///
/// # Safety
/// `p` is NULL or came from [`string`] and was not freed yet.
pub(crate) unsafe fn free_string(p: *mut c_char) {
    // SAFETY: per the contract, `p` is NULL or a live malloc allocation.
    unsafe { libc::free(p.cast()) }
}

/// A malloc'd copy of `data` (never NULL, even when empty).
pub(crate) fn bytes(data: &[u8]) -> Result<*mut u8, Failure> {
    let p = malloc(data.len())?.cast::<u8>();
    // SAFETY: `p` has room for `data.len()` bytes and does not overlap it.
    unsafe { ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    Ok(p)
}

/// A malloc'd array of `items` (never NULL) plus one zeroed element after
/// the last, so arrays of pointers are also NULL-terminated.
///
/// `T` must be a type for which all-zero bytes are a valid value.
pub(crate) fn array<T>(items: Vec<T>) -> Result<*mut T, Failure> {
    let len = items.len();
    let bytes = std::mem::size_of::<T>()
        .checked_mul(len + 1)
        .ok_or_else(|| out_of_memory(usize::MAX))?;
    let p = malloc(bytes)?.cast::<T>();
    // SAFETY: `p` has room for `len + 1` values of `T` and malloc aligns
    // for any fundamental type; the items are moved in (not dropped here)
    // and the slot after them is zeroed.
    unsafe {
        for (i, item) in items.into_iter().enumerate() {
            p.add(i).write(item);
        }
        ptr::write_bytes(p.add(len), 0, 1);
    }
    Ok(p)
}

/// An array of strings: all copied, or nothing (what was copied is freed).
pub(crate) fn strings<S: AsRef<str>>(items: &[S]) -> Result<*mut *mut c_char, Failure> {
    let mut copies = Vec::with_capacity(items.len());
    for s in items {
        match string(s.as_ref()) {
            Ok(p) => copies.push(p),
            Err(e) => {
                for p in copies {
                    // SAFETY: each `p` came from `string` just above.
                    unsafe { free_string(p) };
                }
                return Err(e);
            }
        }
    }
    array(copies.clone()).inspect_err(|_| {
        for p in copies {
            // SAFETY: each `p` came from `string` just above.
            unsafe { free_string(p) };
        }
    })
}

/// Frees an array from [`strings`]: its strings up to the NULL that ends
/// it, then the array; NULL is fine.
///
/// # Safety
/// `p` is NULL or came from [`strings`] and was not freed yet.
pub(crate) unsafe fn free_strings(p: *mut *mut c_char) {
    if p.is_null() {
        return;
    }
    // SAFETY: per the contract, `p` is a malloc'd array of strings from
    // `string` ended by a NULL entry.
    unsafe {
        let mut i = 0;
        loop {
            let s = p.add(i).read();
            if s.is_null() {
                break;
            }
            free_string(s);
            i += 1;
        }
        libc::free(p.cast());
    }
}

/// Frees any malloc'd block from this module (bytes, arrays); NULL is fine.
///
/// # Safety
/// `p` is NULL or came from [`bytes`] or [`array`] and was not freed yet.
pub(crate) unsafe fn free_block<T>(p: *mut T) {
    // SAFETY: per the contract, `p` is NULL or a live malloc allocation.
    unsafe { libc::free(p.cast()) }
}

/// Frees a string returned by the library (`cc_instance_id`,
/// `cc_instance_readlink`, `cc_cmd_get_env`, ...). NULL is fine.
///
/// # Safety
/// `s` is NULL or a string returned by this library and not freed yet.
#[no_mangle]
pub unsafe extern "C" fn cc_string_free(s: *mut c_char) {
    // SAFETY: the caller passes NULL or a string from `string`.
    unsafe { free_string(s) }
}

/// Frees a byte buffer returned by the library (`cc_instance_read_file`,
/// `cc_cmd_output`, ...). NULL is fine.
///
/// # Safety
/// `data` is NULL or a buffer returned by this library and not freed yet.
#[no_mangle]
pub unsafe extern "C" fn cc_bytes_free(data: *mut u8) {
    // SAFETY: the caller passes NULL or a buffer from `bytes`.
    unsafe { free_block(data) }
}

/// Frees an array of strings returned by the library (`cc_cmd_environ`):
/// the strings and the array. `count` is the count returned with it (the
/// array also ends with a NULL entry, which is what the library goes by).
/// NULL is fine.
///
/// # Safety
/// `strings` is NULL or an array returned by this library, not freed yet.
#[no_mangle]
pub unsafe extern "C" fn cc_strings_free(strings: *mut *mut c_char, count: usize) {
    let _ = count;
    // SAFETY: the caller passes NULL or an array from `strings`.
    unsafe { free_strings(strings) }
}
