//! The boundary itself: every export runs its body through [`entry`] (or
//! [`guard`]), which catches panics, keeps SIGPIPE from killing the
//! caller's process, and reports failures; plus the checked conversions of
//! C arguments.

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;

use crate::error::{cc_error, cc_error_code, fill, Failure, CC_OK};
use crate::handles;

/// Blocks SIGPIPE in the calling thread while a call runs (threads the
/// core starts meanwhile inherit the mask), and swallows a SIGPIPE the call
/// raised, so a write to a connection whose peer is gone is an error
/// instead of the death of the caller's process. No handler is installed
/// and the process-wide disposition is untouched.
struct SigpipeGuard {
    old: libc::sigset_t,
    pending_before: bool,
}

fn sigpipe_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialize the set they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        set
    }
}

fn sigpipe_pending() -> bool {
    // SAFETY: sigpending fills the set; sigismember reads it.
    unsafe {
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut pending) == 0 && libc::sigismember(&pending, libc::SIGPIPE) == 1
    }
}

impl SigpipeGuard {
    fn new() -> SigpipeGuard {
        let set = sigpipe_set();
        // SAFETY: pthread_sigmask with valid set pointers only changes
        // this thread's signal mask.
        let old = unsafe {
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            old
        };
        SigpipeGuard {
            old,
            pending_before: sigpipe_pending(),
        }
    }
}

impl Drop for SigpipeGuard {
    fn drop(&mut self) {
        if !self.pending_before && sigpipe_pending() {
            let set = sigpipe_set();
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: consumes the pending SIGPIPE this call raised; the
            // pointers are valid for the duration of the call.
            unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) };
        }
        // SAFETY: restores the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// Runs `body` with panics caught and SIGPIPE held off.
pub(crate) fn shielded<T>(body: impl FnOnce() -> T) -> std::thread::Result<T> {
    let _sigpipe = SigpipeGuard::new();
    catch_unwind(AssertUnwindSafe(body))
}

/// The body of a fallible export that needs no initialized library.
pub(crate) fn guard(
    err: *mut cc_error,
    body: impl FnOnce() -> Result<(), Failure>,
) -> cc_error_code {
    let failure = match shielded(body) {
        Ok(Ok(())) => return CC_OK,
        Ok(Err(f)) => f,
        Err(payload) => Failure::panic(payload),
    };
    // SAFETY: every export documents `err` as NULL or valid for writes.
    unsafe { fill(err, &failure) };
    failure.code
}

/// The body of a fallible export: fails unless `cc_init` was called.
pub(crate) fn entry(
    err: *mut cc_error,
    body: impl FnOnce() -> Result<(), Failure>,
) -> cc_error_code {
    guard(err, || {
        handles::check_initialized()?;
        body()
    })
}

/// A required string argument, borrowed.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn cstr<'a>(p: *const c_char, name: &str) -> Result<&'a str, Failure> {
    // SAFETY: forwarded from the caller.
    unsafe { opt_cstr(p, name) }?.ok_or_else(|| Failure::null(name))
}

/// An optional (nullable) string argument, borrowed.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn opt_cstr<'a>(
    p: *const c_char,
    name: &str,
) -> Result<Option<&'a str>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: per the contract `p` is a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(Some)
        .map_err(|_| Failure::invalid(format!("`{name}` is not valid UTF-8")))
}

/// `len` elements at `p`; `p` may be NULL when `len` is 0.
///
/// # Safety
/// `p` is NULL or valid for reading `len` elements that outlive `'a`.
pub(crate) unsafe fn slice<'a, T>(p: *const T, len: usize, name: &str) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: per the contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// `len` writable bytes at `p`; `p` may be NULL when `len` is 0.
///
/// # Safety
/// `p` is NULL or valid for writing `len` bytes for `'a`, not aliased.
pub(crate) unsafe fn slice_mut<'a>(
    p: *mut u8,
    len: usize,
    name: &str,
) -> Result<&'a mut [u8], Failure> {
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: per the contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// `count` strings at `p` (an array of `const char*`), copied.
///
/// # Safety
/// `p` is NULL or valid for reading `count` pointers, each NULL or a
/// NUL-terminated string.
pub(crate) unsafe fn strings(
    p: *const *const c_char,
    count: usize,
    name: &str,
) -> Result<Vec<String>, Failure> {
    // SAFETY: forwarded from the caller.
    let ptrs = unsafe { slice(p, count, name) }?;
    ptrs.iter()
        .enumerate()
        // SAFETY: each entry is NULL or a NUL-terminated string.
        .map(|(i, &s)| unsafe { cstr(s, &format!("{name}[{i}]")) }.map(str::to_string))
        .collect()
}

/// The declared size of a struct that can grow (`cc_instance_options`,
/// `cc_capabilities`): its leading `size_t size` field, at least `min` (the
/// size of the struct's first version).
///
/// # Safety
/// `p` is valid for reading a `usize`.
unsafe fn declared_size(p: *const u8, min: usize, name: &str) -> Result<usize, Failure> {
    // SAFETY: per the contract.
    let size = unsafe { p.cast::<usize>().read_unaligned() };
    if size < min {
        return Err(Failure::invalid(format!(
            "`{name}->size` is {size}, less than the {min} bytes of the struct's first version: \
             initialize it with its CC_..._INIT macro"
        )));
    }
    Ok(size)
}

/// A caller's struct that can grow, read as this library knows it: the
/// bytes the caller declared in its leading `size` field (at least `min`),
/// the fields beyond them zero (their defaults). Bytes past this library's
/// struct (from a newer caller) must be zero: set fields this version does
/// not know are refused rather than ignored. `None` for NULL.
///
/// # Safety
/// `p` is NULL or valid for reading the `size` bytes its first field
/// declares; `T` starts with a `usize` and is valid when all zero.
pub(crate) unsafe fn read_sized<T: Copy>(
    p: *const T,
    min: usize,
    name: &str,
) -> Result<Option<T>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: per the contract, the size field is readable.
    let size = unsafe { declared_size(p.cast(), min, name) }?;
    let ours = std::mem::size_of::<T>();
    // SAFETY: the caller declared `size` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), size) };
    if bytes
        .get(ours..)
        .is_some_and(|rest| rest.iter().any(|&b| b != 0))
    {
        return Err(Failure::invalid(format!(
            "`{name}` sets fields this version of libcc does not know (size {size}, \
             known {ours}): upgrade libcc"
        )));
    }
    let mut value = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: copies at most `size_of::<T>()` bytes into a zeroed `T`,
    // which is valid all zero (and with the caller's field values).
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            value.as_mut_ptr().cast::<u8>(),
            size.min(ours),
        );
        Ok(Some(value.assume_init()))
    }
}

/// An output struct that can grow (`cc_capabilities`): the caller's
/// `size` is checked when the call starts, and [`SizedOut::write`] fills
/// only the bytes it declared, never its `size` field.
#[derive(Debug)]
pub(crate) struct SizedOut<T> {
    out: NonNull<T>,
    size: usize,
}

impl<T: Copy> SizedOut<T> {
    /// # Safety
    /// `p` is NULL or valid for reading its leading `usize` and writing
    /// the `size` bytes it declares until the call returns.
    pub(crate) unsafe fn new(p: *mut T, min: usize, name: &str) -> Result<SizedOut<T>, Failure> {
        let out = NonNull::new(p).ok_or_else(|| Failure::null(name))?;
        // SAFETY: per the contract.
        let size = unsafe { declared_size(p.cast(), min, name) }?;
        Ok(SizedOut { out, size })
    }

    pub(crate) fn write(self, value: T) {
        let skip = std::mem::size_of::<usize>();
        let end = self.size.min(std::mem::size_of::<T>());
        // SAFETY: `new` was promised `size` writable bytes; the bytes
        // after the `size` field up to the smaller struct are copied from
        // a whole `T` (`T: Copy`, nothing to drop).
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&value as *const T).cast::<u8>().add(skip),
                self.out.as_ptr().cast::<u8>().add(skip),
                end.saturating_sub(skip),
            );
        }
    }
}

/// A required output parameter: written only when the call succeeds.
#[derive(Debug)]
pub(crate) struct Out<T>(NonNull<T>);

impl<T> Out<T> {
    /// # Safety
    /// `p` is NULL or valid for writing one `T` until the call returns.
    pub(crate) unsafe fn new(p: *mut T, name: &str) -> Result<Out<T>, Failure> {
        NonNull::new(p).map(Out).ok_or_else(|| Failure::null(name))
    }

    /// An optional output: `None` for NULL.
    ///
    /// # Safety
    /// As [`Out::new`].
    pub(crate) unsafe fn opt(p: *mut T) -> Option<Out<T>> {
        NonNull::new(p).map(Out)
    }

    pub(crate) fn write(self, value: T) {
        // SAFETY: `new` was promised a pointer valid for writes; `write`
        // neither reads nor drops what was there.
        unsafe { self.0.as_ptr().write(value) }
    }
}

/// Writes to an optional output if there is one.
pub(crate) fn put<T>(out: Option<Out<T>>, value: T) {
    if let Some(out) = out {
        out.write(value);
    }
}
