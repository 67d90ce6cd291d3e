//! The library's own state around core objects: closed flags and the links
//! that let client closes and `cc_shutdown` stop pulls.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::Failure;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);

/// Tokens to cancel along with something else, removable again.
#[derive(Debug, Default)]
struct Links {
    /// Once set, every token linked later is cancelled at once.
    fired: bool,
    tokens: Vec<(u64, cc::CancelToken)>,
}

impl Links {
    fn add(&mut self, token: &cc::CancelToken) -> u64 {
        if self.fired {
            token.cancel();
        }
        let id = NEXT_LINK.fetch_add(1, Ordering::Relaxed);
        self.tokens.push((id, token.clone()));
        id
    }

    fn fire(&mut self) {
        self.fired = true;
        for (_, t) in &self.tokens {
            t.cancel();
        }
    }

    fn remove(&mut self, id: u64) {
        self.tokens.retain(|(i, _)| *i != id);
    }
}

/// A `cc_cancel_token`: a core token. Calls link their own tokens to it
/// as children, so cancelling it wakes them at once.
#[derive(Debug, Default)]
pub(crate) struct Cancel {
    token: cc::CancelToken,
}

impl Cancel {
    /// A token cancelled with `parent` (see `cc_cancel_token_child`).
    pub(crate) fn child_of(parent: &Cancel) -> Cancel {
        Cancel {
            token: parent.token.child(),
        }
    }

    pub(crate) fn cancel(&self) {
        self.token.cancel();
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    pub(crate) fn token(&self) -> &cc::CancelToken {
        &self.token
    }
}

/// Unlinks a token when dropped.
#[derive(Debug)]
pub(crate) struct LinkGuard<'a> {
    links: &'a Mutex<Links>,
    id: u64,
}

impl Drop for LinkGuard<'_> {
    fn drop(&mut self) {
        lock(self.links).remove(self.id);
    }
}

/// A `cc_oci_client`: the image store, closable, with its pulls in flight.
#[derive(Debug)]
pub(crate) struct Client {
    client: cc::OciClient,
    closed: AtomicBool,
    pulls: Mutex<Links>,
}

impl Client {
    pub(crate) fn new(client: cc::OciClient) -> Client {
        Client {
            client,
            closed: AtomicBool::new(false),
            pulls: Mutex::default(),
        }
    }

    pub(crate) fn get(&self) -> Result<&cc::OciClient, Failure> {
        if self.closed.load(Ordering::SeqCst) {
            Err(Failure::already_closed("OCI client"))
        } else {
            Ok(&self.client)
        }
    }

    /// The store's directory, absolute; known even after close.
    pub(crate) fn cache_dir(&self) -> std::path::PathBuf {
        std::path::absolute(self.client.root()).unwrap_or_else(|_| self.client.root().into())
    }

    /// Registers a pull's token so that closing the client cancels it.
    pub(crate) fn track_pull(&self, token: &cc::CancelToken) -> Result<LinkGuard<'_>, Failure> {
        let mut pulls = lock(&self.pulls);
        if self.closed.load(Ordering::SeqCst) {
            return Err(Failure::already_closed("OCI client"));
        }
        Ok(LinkGuard {
            links: &self.pulls,
            id: pulls.add(token),
        })
    }

    /// Closes the client and cancels its pulls in flight. Idempotent.
    pub(crate) fn close(&self) {
        let mut pulls = lock(&self.pulls);
        self.closed.store(true, Ordering::SeqCst);
        pulls.fire();
    }
}

/// A `cc_instance`: the core instance plus whether the caller closed it.
#[derive(Debug)]
pub(crate) struct Instance {
    inst: cc::Instance,
    closed: AtomicBool,
}

impl Instance {
    pub(crate) fn new(inst: cc::Instance) -> Instance {
        Instance {
            inst,
            closed: AtomicBool::new(false),
        }
    }

    /// The instance, unless closed.
    pub(crate) fn get(&self) -> Result<&cc::Instance, Failure> {
        if self.closed.load(Ordering::SeqCst) {
            Err(Failure::already_closed("instance"))
        } else {
            Ok(&self.inst)
        }
    }

    /// The instance, closed or not (for its id and state).
    pub(crate) fn any(&self) -> &cc::Instance {
        &self.inst
    }

    /// Closes the instance. Idempotent.
    pub(crate) fn close(&self) -> Result<(), Failure> {
        self.closed.store(true, Ordering::SeqCst);
        self.inst.close().map_err(Failure::from)
    }
}

/// A `cc_snapshot`: the core snapshot plus whether the caller closed it.
#[derive(Debug)]
pub(crate) struct Snapshot {
    snap: cc::Snapshot,
    closed: AtomicBool,
}

impl Snapshot {
    pub(crate) fn new(snap: cc::Snapshot) -> Snapshot {
        Snapshot {
            snap,
            closed: AtomicBool::new(false),
        }
    }

    pub(crate) fn get(&self) -> Result<&cc::Snapshot, Failure> {
        if self.closed.load(Ordering::SeqCst) {
            Err(Failure::already_closed("snapshot"))
        } else {
            Ok(&self.snap)
        }
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}
