//! Handle semantics: 0, freed, never issued, wrong kind, double free, and
//! many threads creating, using and freeing handles at once.

use std::collections::HashSet;
use std::ffi::CStr;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use super::shared;
use crate::cancel::*;
use crate::error::*;
use crate::instance::*;
use crate::oci::*;

fn new_token() -> cc_cancel_token {
    let mut t = 0;
    // SAFETY: `t` is writable; NULL err.
    let code = unsafe { cc_cancel_token_new(&mut t, ptr::null_mut()) };
    assert_eq!(code, CC_OK);
    assert_ne!(t, 0);
    t
}

fn new_dir_source() -> cc_source {
    let mut s = 0;
    // SAFETY: a literal C string and a writable slot.
    let code =
        unsafe { cc_source_from_dir(c"/nonexistent/rootfs".as_ptr(), &mut s, ptr::null_mut()) };
    assert_eq!(code, CC_OK);
    s
}

/// `is_cancelled` on `h`, with the error message when it fails.
fn probe(h: u64) -> (cc_error_code, String) {
    let mut out = false;
    let mut err = cc_error::default();
    // SAFETY: writable out and err.
    let code = unsafe { cc_cancel_token_is_cancelled(h, &mut out, &mut err) };
    let message = if err.message.is_null() {
        String::new()
    } else {
        // SAFETY: filled by the library.
        unsafe { CStr::from_ptr(err.message) }
            .to_string_lossy()
            .into_owned()
    };
    // SAFETY: `err` was filled by the library or is zeroed.
    unsafe { cc_error_free(&mut err) };
    (code, message)
}

#[test]
fn zero_freed_never_issued_and_wrong_kind_are_invalid_handles() {
    let _g = shared();
    let (code, msg) = probe(0);
    assert_eq!(code, CC_ERR_INVALID_HANDLE);
    assert!(msg.contains("0 is never a valid handle"), "{msg}");

    let (code, msg) = probe(u64::MAX);
    assert_eq!(code, CC_ERR_INVALID_HANDLE);
    assert!(msg.contains("freed or never issued"), "{msg}");

    let source = new_dir_source();
    let (code, msg) = probe(source);
    assert_eq!(code, CC_ERR_INVALID_HANDLE);
    assert!(msg.contains("it is a cc_source"), "{msg}");
    // Freeing with the wrong kind's function fails and frees nothing.
    assert_eq!(cc_cancel_token_free(source), CC_ERR_INVALID_HANDLE);
    assert_eq!(cc_instance_free(source), CC_ERR_INVALID_HANDLE);
    assert_eq!(cc_source_free(source), CC_OK);
    assert_eq!(cc_source_free(source), CC_ERR_INVALID_HANDLE, "double free");

    let t = new_token();
    assert_eq!(probe(t).0, CC_OK);
    assert_eq!(cc_cancel_token_free(t), CC_OK);
    let (code, msg) = probe(t);
    assert_eq!(code, CC_ERR_INVALID_HANDLE, "a freed handle");
    assert!(msg.contains("cc_cancel_token handle"), "{msg}");
    assert_eq!(cc_cancel_token_free(0), CC_OK, "freeing 0 is a no-op");
}

#[test]
fn instance_calls_reject_other_kinds() {
    let _g = shared();
    let t = new_token();
    let mut running = true;
    // SAFETY: writable out, NULL err.
    let code = unsafe { cc_instance_is_running(t, &mut running, ptr::null_mut()) };
    assert_eq!(code, CC_ERR_INVALID_HANDLE);
    assert!(running, "outputs are untouched on failure");
    // SAFETY: NULL err.
    let code = unsafe { cc_instance_close(t, ptr::null_mut()) };
    assert_eq!(code, CC_ERR_INVALID_HANDLE);
    assert_eq!(cc_cancel_token_free(t), CC_OK);
}

#[test]
fn handles_are_unique_and_never_reused() {
    let _g = shared();
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let t = new_token();
        assert!(seen.insert(t), "handle {t} issued twice");
        assert_eq!(cc_cancel_token_free(t), CC_OK);
    }
    let mut sorted: Vec<_> = seen.into_iter().collect();
    sorted.sort_unstable();
    assert!(sorted.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn many_threads_create_use_and_free_handles() {
    let _g = shared();
    const THREADS: usize = 8;
    const ROUNDS: usize = 400;
    let barrier = Arc::new(Barrier::new(THREADS));
    // The last handle any thread freed, for others to probe.
    let last_freed = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..THREADS)
        .map(|n| {
            let barrier = barrier.clone();
            let last_freed = last_freed.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut issued = Vec::with_capacity(ROUNDS);
                for round in 0..ROUNDS {
                    let t = new_token();
                    issued.push(t);
                    if round % 3 == n % 3 {
                        // SAFETY: NULL err.
                        assert_eq!(unsafe { cc_cancel_token_cancel(t, ptr::null_mut()) }, CC_OK);
                    }
                    let mut cancelled = false;
                    // SAFETY: writable out, NULL err.
                    let code =
                        unsafe { cc_cancel_token_is_cancelled(t, &mut cancelled, ptr::null_mut()) };
                    assert_eq!(code, CC_OK);
                    assert_eq!(cancelled, round % 3 == n % 3);
                    // Someone else's freed handle stays invalid.
                    let other = last_freed.load(Ordering::SeqCst);
                    if other != 0 {
                        assert_eq!(probe(other).0, CC_ERR_INVALID_HANDLE);
                    }
                    // A source: another kind in the same table.
                    let s = new_dir_source();
                    assert_eq!(probe(s).0, CC_ERR_INVALID_HANDLE);
                    assert_eq!(cc_source_free(s), CC_OK);
                    if round % 2 == 0 {
                        assert_eq!(cc_cancel_token_free(t), CC_OK);
                        last_freed.store(t, Ordering::SeqCst);
                    }
                }
                for (round, t) in issued.iter().enumerate() {
                    if round % 2 == 1 {
                        assert_eq!(cc_cancel_token_free(*t), CC_OK);
                    }
                    assert_eq!(cc_cancel_token_free(*t), CC_ERR_INVALID_HANDLE);
                }
                issued
            })
        })
        .collect();
    let mut all = HashSet::new();
    for t in threads {
        for h in t.join().expect("a thread failed") {
            assert!(all.insert(h), "handle {h} issued twice");
        }
    }
    assert_eq!(all.len(), THREADS * ROUNDS);
}

#[test]
fn an_unreachable_registry_is_a_network_error_while_others_use_handles() {
    let _g = shared();
    let dir = std::env::temp_dir().join(format!("cc-capi-table-{}", std::process::id()));
    let dir_c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    let mut client = 0;
    // SAFETY: valid strings and slots.
    let code = unsafe { cc_oci_client_new(dir_c.as_ptr(), &mut client, ptr::null_mut()) };
    assert_eq!(code, CC_OK);
    let done = Arc::new(Barrier::new(2));
    let other = {
        let done = done.clone();
        std::thread::spawn(move || {
            for _ in 0..50 {
                let t = new_token();
                assert_eq!(cc_cancel_token_free(t), CC_OK);
            }
            done.wait();
        })
    };
    // Nothing listens on port 1: the pull fails at once, as a registry
    // failure (NETWORK) and without taking the table with it.
    let mut source = 0;
    let mut err = cc_error::default();
    // SAFETY: valid strings and slots.
    let code = unsafe {
        cc_oci_pull(
            client,
            c"127.0.0.1:1/nothing/here:latest".as_ptr(),
            ptr::null(),
            None,
            ptr::null_mut(),
            0,
            &mut source,
            &mut err,
        )
    };
    done.wait();
    other.join().unwrap();
    // SAFETY: filled by the library.
    let message = unsafe { CStr::from_ptr(err.message) }
        .to_string_lossy()
        .into_owned();
    assert_eq!(code, CC_ERR_NETWORK, "{message}");
    assert_eq!(source, 0);
    // SAFETY: filled by the library.
    unsafe { cc_error_free(&mut err) };
    assert_eq!(cc_oci_client_free(client), CC_OK);
    let _ = std::fs::remove_dir_all(dir);
}

/// Whether token `t` is cancelled (it must be a live token).
fn cancelled(t: cc_cancel_token) -> bool {
    let mut out = false;
    // SAFETY: a writable bool; NULL err.
    let code = unsafe { cc_cancel_token_is_cancelled(t, &mut out, ptr::null_mut()) };
    assert_eq!(code, CC_OK);
    out
}

#[test]
fn child_tokens_follow_their_parent_alone() {
    let _g = shared();
    let parent = new_token();
    let (mut a, mut b) = (0, 0);
    // SAFETY: writable slots; NULL err.
    unsafe {
        assert_eq!(
            cc_cancel_token_child(parent, &mut a, ptr::null_mut()),
            CC_OK
        );
        assert_eq!(
            cc_cancel_token_child(parent, &mut b, ptr::null_mut()),
            CC_OK
        );
        assert_eq!(cc_cancel_token_cancel(a, ptr::null_mut()), CC_OK);
    }
    assert!(cancelled(a) && !cancelled(parent) && !cancelled(b));
    // SAFETY: NULL err.
    let code = unsafe { cc_cancel_token_cancel(parent, ptr::null_mut()) };
    assert_eq!(code, CC_OK);
    assert!(cancelled(b));
    assert_eq!(cc_cancel_token_free(parent), CC_OK);
    let mut c = 0;
    // SAFETY: a writable slot; NULL err.
    let code = unsafe { cc_cancel_token_child(parent, &mut c, ptr::null_mut()) };
    assert_eq!(
        code, CC_ERR_INVALID_HANDLE,
        "a freed parent is a bad handle"
    );
    assert!(
        cancelled(b),
        "freeing the parent leaves the child as it was"
    );
    assert_eq!(cc_cancel_token_free(a), CC_OK);
    assert_eq!(cc_cancel_token_free(b), CC_OK);
}
