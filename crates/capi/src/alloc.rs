//! Memory handed to the caller: strings, byte buffers and arrays, each
//! released by one documented free function. Strings and arrays are
//! allocated with `malloc`, so a NULL from it is reported rather than
//! aborting; byte buffers (file contents, command output: maybe large) are
//! handed out as the core built them, never copied, and tracked by address
//! until freed.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::ptr;
use std::sync::{Mutex, MutexGuard};

use crate::error::{cc_error, cc_error_code, Failure, CC_ERR_UNKNOWN};
use crate::ffi::{guard, Out};

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

/// Byte buffers handed out as they were built (no copy), by address, until
/// `cc_bytes_free` or `cc_bytes_move` takes them back.
static BUFFERS: Mutex<BTreeMap<usize, Vec<u8>>> = Mutex::new(BTreeMap::new());

fn buffers() -> MutexGuard<'static, BTreeMap<usize, Vec<u8>>> {
    BUFFERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// `data` handed to the caller as it is, without a copy (never NULL: an
/// empty one is a 1-byte malloc).
pub(crate) fn bytes(data: Vec<u8>) -> Result<*mut u8, Failure> {
    if data.is_empty() {
        return Ok(malloc(1)?.cast());
    }
    let mut data = data;
    let p = data.as_mut_ptr();
    buffers().insert(p as usize, data);
    Ok(p)
}

/// The body of an export that returns a byte buffer: `data` and `len` are
/// checked first, then what `make` returns is handed out through them.
///
/// # Safety
/// `data` and `len` are NULL or valid for writing.
pub(crate) unsafe fn bytes_out(
    data: *mut *mut u8,
    len: *mut usize,
    make: impl FnOnce() -> Result<Vec<u8>, Failure>,
) -> Result<(), Failure> {
    // SAFETY: per the contract.
    let (data, len) = unsafe { (Out::new(data, "data")?, Out::new(len, "len")?) };
    let made = make()?;
    len.write(made.len());
    data.write(bytes(made)?);
    Ok(())
}

/// Takes back a buffer from [`bytes`]: `Some` with its contents, `None`
/// for an empty one's malloc (freed here) and for NULL.
///
/// # Safety
/// `p` is NULL or came from [`bytes`] and was not taken back yet.
unsafe fn take_bytes(p: *mut u8) -> Option<Vec<u8>> {
    if p.is_null() {
        return None;
    }
    let taken = buffers().remove(&(p as usize));
    if taken.is_none() {
        // SAFETY: per the contract, an untracked `p` is an empty buffer's
        // live malloc allocation.
        unsafe { libc::free(p.cast()) };
    }
    taken
}

/// How much [`cc_bytes_move`] copies before giving the source's pages back.
const MOVE_STEP: usize = 8 << 20;

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

/// Frees a malloc'd array from this module; NULL is fine.
///
/// # Safety
/// `p` is NULL or came from [`array`] and was not freed yet.
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
    drop(unsafe { take_bytes(data) });
}

/// Moves the first `len` bytes of a buffer returned by the library (`len`
/// at most the length returned with it) into `dest`, and frees the
/// buffer, also on failure. The pages already copied are given back to the
/// system as the copy goes, so moving a large result into memory of the
/// caller's needs about its size once, not twice.
///
/// # Safety
/// `data` is NULL or a buffer returned by this library and not freed yet;
/// `dest` is valid for writing `len` bytes and does not overlap `data`;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_bytes_move(
    data: *mut u8,
    len: usize,
    dest: *mut u8,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller passes NULL or a buffer from `bytes`.
    let source = unsafe { take_bytes(data) }.unwrap_or_default();
    guard(err, || {
        if len > source.len() {
            return Err(Failure::invalid(format!(
                "`len` {len} is more than the buffer's {} bytes",
                source.len()
            )));
        }
        if dest.is_null() && len > 0 {
            return Err(Failure::null("dest"));
        }
        let page = page_size();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MOVE_STEP);
            // SAFETY: `source` has `len` bytes; the caller passes `len`
            // writable bytes at `dest` (maybe uninitialized, hence no
            // slice), not overlapping it.
            unsafe { ptr::copy_nonoverlapping(source.as_ptr().add(done), dest.add(done), n) };
            release(&source, done, done + n, page);
            done += n;
        }
        Ok(())
    })
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(1)
}

/// Gives back to the system the whole pages of `buf[from..to]`, which will
/// not be read again (they would read as zeros).
fn release(buf: &[u8], from: usize, to: usize, page: usize) {
    let base = buf.as_ptr() as usize;
    let start = (base + from).next_multiple_of(page);
    let end = (base + to) / page * page;
    if end > start {
        // SAFETY: [start, end) is whole pages inside `buf`, which the caller
        // owns and drops without reading it again; MADV_DONTNEED on private
        // anonymous memory only makes later reads return zeros. Allocator
        // bookkeeping lies outside the buffer, so it is untouched.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::CC_OK;

    #[test]
    fn byte_buffers_are_handed_out_without_a_copy_and_moved_out() {
        let data: Vec<u8> = (0..3 * MOVE_STEP + 12345)
            .map(|i| (i % 251) as u8)
            .collect();
        let expected = data.clone();
        let built_at = data.as_ptr();
        let p = bytes(data).unwrap();
        assert_eq!(p.cast_const(), built_at, "the core's buffer itself");
        let mut dest = vec![0u8; expected.len()];
        // SAFETY: `p` is a live buffer of that length; `dest` has room.
        let code = unsafe { cc_bytes_move(p, dest.len(), dest.as_mut_ptr(), ptr::null_mut()) };
        assert_eq!(code, CC_OK);
        assert_eq!(dest, expected);
        assert!(!buffers().contains_key(&(p as usize)), "freed by the move");

        // Empty buffers are still non-NULL, and free like any other.
        let empty = bytes(Vec::new()).unwrap();
        assert!(!empty.is_null());
        // SAFETY: a live buffer from `bytes`.
        unsafe { cc_bytes_free(empty) };
    }

    #[test]
    fn a_move_of_more_than_the_buffer_holds_is_refused_and_frees_it() {
        let p = bytes(vec![7u8; 10]).unwrap();
        let mut dest = [0u8; 11];
        let mut err = std::mem::MaybeUninit::<cc_error>::uninit();
        // SAFETY: `p` is a live buffer; `dest` has room for 11 bytes.
        let code = unsafe { cc_bytes_move(p, 11, dest.as_mut_ptr(), err.as_mut_ptr()) };
        assert_eq!(code, crate::error::CC_ERR_INVALID_ARGUMENT);
        // SAFETY: a failed call filled `err`.
        unsafe { crate::error::cc_error_free(err.as_mut_ptr()) };
        assert!(!buffers().contains_key(&(p as usize)));
    }
}
