//! The handle table: every object the caller holds is a `u64` key into one
//! global table. Keys are issued in increasing order and never reused, so
//! a freed handle stays invalid for good; 0 is never issued. The lock is
//! held only to look up, insert or remove (objects are `Arc`s), never
//! across a call into the core.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Failure, CC_ERR_INVALID_HANDLE};
use crate::objects::{Cancel, Client, Instance, Snapshot};

/// Everything a handle can name.
#[derive(Debug, Clone)]
pub(crate) enum Object {
    Client(Arc<Client>),
    Source(Arc<cc::Source>),
    Instance(Arc<Instance>),
    File(Arc<cc::File>),
    Cmd(Arc<cc::Cmd>),
    Conn(Arc<cc::Conn>),
    Listener(Arc<cc::Listener>),
    Exposed(Arc<cc::Exposed>),
    Snapshot(Arc<Snapshot>),
    Cancel(Arc<Cancel>),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Client(_) => Client::KIND,
            Object::Source(_) => cc::Source::KIND,
            Object::Instance(_) => Instance::KIND,
            Object::File(_) => cc::File::KIND,
            Object::Cmd(_) => cc::Cmd::KIND,
            Object::Conn(_) => cc::Conn::KIND,
            Object::Listener(_) => cc::Listener::KIND,
            Object::Exposed(_) => cc::Exposed::KIND,
            Object::Snapshot(_) => Snapshot::KIND,
            Object::Cancel(_) => Cancel::KIND,
        }
    }
}

/// A type a handle can name.
pub(crate) trait Kind: Sized {
    /// The C type name (`cc_instance`), for messages.
    const KIND: &'static str;
    fn wrap(this: Arc<Self>) -> Object;
    fn unwrap(object: &Object) -> Option<&Arc<Self>>;
}

macro_rules! kinds {
    ($($variant:ident($ty:ty) = $name:literal),* $(,)?) => {$(
        impl Kind for $ty {
            const KIND: &'static str = $name;
            fn wrap(this: Arc<Self>) -> Object {
                Object::$variant(this)
            }
            fn unwrap(object: &Object) -> Option<&Arc<Self>> {
                match object {
                    Object::$variant(x) => Some(x),
                    _ => None,
                }
            }
        }
    )*};
}

kinds! {
    Client(Client) = "cc_oci_client",
    Source(cc::Source) = "cc_source",
    Instance(Instance) = "cc_instance",
    File(cc::File) = "cc_file",
    Cmd(cc::Cmd) = "cc_cmd",
    Conn(cc::Conn) = "cc_conn",
    Listener(cc::Listener) = "cc_listener",
    Exposed(cc::Exposed) = "cc_exposed",
    Snapshot(Snapshot) = "cc_snapshot",
    Cancel(Cancel) = "cc_cancel_token",
}

#[derive(Debug)]
struct Table {
    initialized: bool,
    /// The next handle to issue.
    next: u64,
    /// Handles below this were issued before the last `cc_shutdown`,
    /// which released them all.
    released_below: u64,
    objects: BTreeMap<u64, Object>,
}

static TABLE: Mutex<Table> = Mutex::new(Table {
    initialized: false,
    next: 1,
    released_below: 1,
    objects: BTreeMap::new(),
});

fn table() -> MutexGuard<'static, Table> {
    // The table is consistent after every statement: a panic elsewhere
    // while the lock was held leaves nothing half-done.
    TABLE.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn check_initialized() -> Result<(), Failure> {
    if table().initialized {
        Ok(())
    } else {
        Err(Failure::not_initialized())
    }
}

/// Marks the library initialized (idempotent).
pub(crate) fn initialize() {
    table().initialized = true;
}

/// Marks the library shut down and hands back every object to release.
pub(crate) fn shut_down() -> Vec<Object> {
    let mut t = table();
    t.initialized = false;
    t.released_below = t.next;
    std::mem::take(&mut t.objects).into_values().collect()
}

/// Registers `object` and returns its new handle.
pub(crate) fn insert<T: Kind>(object: Arc<T>) -> Result<u64, Failure> {
    let mut t = table();
    if !t.initialized {
        // Shut down while the call ran: the object is released (outside
        // the lock: dropping an instance closes it).
        drop(t);
        drop(object);
        return Err(Failure::not_initialized());
    }
    let handle = t.next;
    t.next += 1;
    t.objects.insert(handle, T::wrap(object));
    Ok(handle)
}

fn invalid(handle: u64, expected: &str, why: &str) -> Failure {
    Failure::new(
        CC_ERR_INVALID_HANDLE,
        format!("{expected} handle {handle} is invalid: {why}"),
    )
}

/// The object behind `handle`, which must be a live `T`.
pub(crate) fn get<T: Kind>(handle: u64) -> Result<Arc<T>, Failure> {
    let t = table();
    if !t.initialized {
        return Err(Failure::not_initialized());
    }
    if handle == 0 {
        return Err(invalid(handle, T::KIND, "0 is never a valid handle"));
    }
    match t.objects.get(&handle) {
        None => Err(invalid(handle, T::KIND, "freed or never issued")),
        Some(object) => match T::unwrap(object) {
            Some(x) => Ok(x.clone()),
            None => Err(invalid(
                handle,
                T::KIND,
                &format!("it is a {}", object.kind()),
            )),
        },
    }
}

/// `get` for an optional handle: 0 means none.
pub(crate) fn get_opt<T: Kind>(handle: u64) -> Result<Option<Arc<T>>, Failure> {
    if handle == 0 {
        check_initialized()?;
        Ok(None)
    } else {
        get(handle).map(Some)
    }
}

/// Releases `handle`, which must name a `T`, and returns its object (to be
/// dropped by the caller, outside the lock). 0, and any handle once the
/// library is shut down (which released everything), are no-ops.
pub(crate) fn remove<T: Kind>(handle: u64) -> Result<Option<Arc<T>>, Failure> {
    let mut t = table();
    if handle == 0 || !t.initialized {
        return Ok(None);
    }
    let Some(object) = t.objects.get(&handle) else {
        if handle < t.released_below {
            return Ok(None);
        }
        return Err(invalid(handle, T::KIND, "freed or never issued"));
    };
    if T::unwrap(object).is_none() {
        return Err(invalid(
            handle,
            T::KIND,
            &format!("it is a {}", object.kind()),
        ));
    }
    Ok(t.objects
        .remove(&handle)
        .and_then(|o| T::unwrap(&o).cloned()))
}

/// How many objects the table holds (for tests).
#[cfg(test)]
pub(crate) fn len() -> usize {
    table().objects.len()
}
