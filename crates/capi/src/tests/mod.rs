//! Rust tests of the C API, calling the exports as C would. The library's
//! state is global: every test holds [`shared`] (and initializes), the one
//! test of `cc_shutdown` holds [`exclusive`].

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

mod api;
mod header;
mod table;

static STATE: RwLock<()> = RwLock::new(());

/// For a test that needs the library initialized and not shut down.
fn shared() -> RwLockReadGuard<'static, ()> {
    let guard = STATE.read().unwrap_or_else(|e| e.into_inner());
    // SAFETY: NULL is a valid `err`.
    let code = unsafe { crate::library::cc_init(std::ptr::null_mut()) };
    assert_eq!(code, crate::error::CC_OK);
    guard
}

/// For a test that shuts the library down (and initializes it again).
fn exclusive() -> RwLockWriteGuard<'static, ()> {
    STATE.write().unwrap_or_else(|e| e.into_inner())
}
