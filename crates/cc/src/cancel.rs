//! How a blocking call sees the token its caller gave.
//!
//! A public `…_cancellable(…, &CancelToken)` method runs its plain
//! counterpart inside [`scope`]: the token is the thread's current one for
//! that call, and every wait underneath (stream data and credit, a
//! process's exit, an accept, the channel going down, the boot greeting)
//! registers a wake-up with it through [`wake_on`] and checks it under its
//! own lock. So the plain methods need no token argument, and a wait the
//! call reaches deep inside (a `read_file`'s stream) is cancellable too.

use std::cell::RefCell;
use std::sync::Arc;

use cc_cancel::{CancelToken, Registration};

use crate::error::{Error, Result};

thread_local! {
    static CURRENT: RefCell<Option<CancelToken>> = const { RefCell::new(None) };
}

/// The token of the call running on this thread, if it has one.
pub(crate) fn current() -> Option<CancelToken> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Whether the current call was cancelled.
pub(crate) fn is_cancelled() -> bool {
    CURRENT.with(|c| c.borrow().as_ref().is_some_and(CancelToken::is_cancelled))
}

/// Runs `f` with `token` as this thread's current token. Whatever `f`
/// fails with once the token is cancelled is [`Error::Cancelled`] of `op`:
/// the wake-up ends a wait with whatever error the waiter makes of it.
pub(crate) fn scope<T>(op: &str, token: &CancelToken, f: impl FnOnce() -> Result<T>) -> Result<T> {
    struct Restore(Option<CancelToken>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    if token.is_cancelled() {
        return Err(cancelled(op));
    }
    let _restore = Restore(CURRENT.with(|c| c.borrow_mut().replace(token.clone())));
    match f() {
        Err(_) if token.is_cancelled() => Err(cancelled(op)),
        other => other,
    }
}

/// Calls `wake(owner)` when the current call's token is cancelled, until
/// the registration is dropped; nothing without a token.
pub(crate) fn wake_on<T: Send + Sync + 'static>(
    owner: &Arc<T>,
    wake: impl FnOnce(&T) + Send + 'static,
) -> Option<Registration> {
    let token = current()?;
    let owner = owner.clone();
    Some(token.on_cancel(move || wake(&owner)))
}

/// [`scope`] when there is a token, `f` as it is otherwise.
pub(crate) fn maybe<T>(
    op: &str,
    token: Option<&CancelToken>,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    match token {
        Some(token) => scope(op, token, f),
        None => f(),
    }
}

pub(crate) fn cancelled(op: &str) -> Error {
    Error::Cancelled { op: op.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_after_a_cancel_are_the_cancel_named_for_the_call() {
        let token = CancelToken::new();
        let err = scope("wait", &token, || -> Result<()> {
            token.cancel();
            Err(Error::AlreadyClosed)
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "wait cancelled");
        assert_eq!(err.code(), crate::ErrorCode::Cancelled);
        // Already cancelled: the call does not start.
        let err = scope("read", &token, || -> Result<()> { unreachable!() }).unwrap_err();
        assert_eq!(err.to_string(), "read cancelled");
        assert!(current().is_none(), "the scope's token is gone after it");
    }

    #[test]
    fn scopes_nest_and_restore_the_outer_token() {
        let (outer, inner) = (CancelToken::new(), CancelToken::new());
        scope("a", &outer, || {
            scope("b", &inner, || {
                inner.cancel();
                assert!(is_cancelled());
                Ok(())
            })?;
            assert!(!is_cancelled());
            Ok(())
        })
        .unwrap();
    }
}
