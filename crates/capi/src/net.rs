//! TCP between the host and the guest over the agent channel: listeners
//! guest programs reach at `host.internal`, dialing into the guest, and
//! guest ports exposed on the host's loopback. Connections are `cc_conn`s.

use std::ffi::c_char;
use std::ptr;
use std::sync::Arc;

use crate::alloc;
use crate::cancel::cc_cancel_token;
use crate::cmd::cc_conn;
use crate::error::{cc_error, cc_error_code, Failure};
use crate::ffi::{cstr, entry, guard, put, Out};
use crate::handles;
use crate::instance::cc_instance;
use crate::objects::{Cancel, Instance};

/// A listener for guest connections. Usable from any thread; closing it
/// ends an accept blocked in another thread.
pub type cc_listener = u64;

/// A guest port published on the host's loopback. Usable from any thread.
pub type cc_exposed = u64;

/// `open(instance, network, address)` stored as a new handle in `out`: the
/// shared body of listen and dial.
///
/// # Safety
/// `network` and `address` are NULL or NUL-terminated strings; `out` is
/// NULL or valid for writing.
unsafe fn open_on<T>(
    inst: cc_instance,
    network: *const c_char,
    address: *const c_char,
    out: *mut u64,
    open: impl FnOnce(&cc::Instance, &str, &str) -> cc::Result<T>,
) -> Result<(), Failure>
where
    T: handles::Kind,
{
    // SAFETY: as promised by the caller.
    let (network, address, out) = unsafe {
        (
            cstr(network, "network")?,
            cstr(address, "address")?,
            Out::new(out, "out")?,
        )
    };
    let inst = handles::get::<Instance>(inst)?;
    let object = open(inst.get()?, network, address)?;
    out.write(handles::insert(Arc::new(object))?);
    Ok(())
}

/// Listens for guest connections: guest programs connect to
/// `host.internal` (in the guest's `/etc/hosts`) at the port. `network` is
/// `"tcp"` or `"tcp4"`; `address` is `":PORT"` or `"host.internal:PORT"`
/// (an IPv4 host such as `"0.0.0.0:PORT"` listens on that guest address
/// instead); port 0 picks a free port (`cc_listener_addr`). Works with the
/// network off. Bad input is `CC_ERR_INVALID_ARGUMENT`; a port taken in the
/// guest is `CC_ERR_NETWORK`.
///
/// # Safety
/// `network` and `address` are NUL-terminated strings; `out` is NULL or
/// valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_listen(
    inst: cc_instance,
    network: *const c_char,
    address: *const c_char,
    out: *mut cc_listener,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes strings and a writable slot as documented.
        unsafe { open_on(inst, network, address, out, cc::Instance::listen) }
    })
}

/// Waits for the next guest connection and returns it as a readable and
/// writable `cc_conn`. `cancel` (0 for none) stops the wait with
/// `CC_ERR_CANCELLED`; closing the listener meanwhile ends it with
/// `CC_ERR_ALREADY_CLOSED`, the instance ending with `CC_ERR_NOT_RUNNING`.
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_listener_accept(
    listener: cc_listener,
    cancel: cc_cancel_token,
    out: *mut cc_conn,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable slot.
        let out = unsafe { Out::new(out, "out") }?;
        let listener = handles::get::<cc::Listener>(listener)?;
        let cancel = handles::get_opt::<Cancel>(cancel)?;
        let conn = listener.accept(cancel.as_ref().map(|c| c.token()))?;
        out.write(handles::insert(Arc::new(conn))?);
        Ok(())
    })
}

/// The address guest programs connect to, `"host.internal:PORT"`, as a
/// string to free with `cc_string_free`; `port` (may be NULL) gets the
/// port alone.
///
/// # Safety
/// `out` and `port` are NULL or valid for writing; `err` is NULL or valid
/// for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_listener_addr(
    listener: cc_listener,
    out: *mut *mut c_char,
    port: *mut u16,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or writable slots.
        let (out, port) = unsafe { (Out::new(out, "out")?, Out::opt(port)) };
        let listener = handles::get::<cc::Listener>(listener)?;
        out.write(alloc::string(listener.addr())?);
        put(port, listener.port());
        Ok(())
    })
}

/// Stops listening; connections already accepted stay open. Closing again
/// is `CC_OK`.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_listener_close(
    listener: cc_listener,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        handles::get::<cc::Listener>(listener)?.close()?;
        Ok(())
    })
}

/// Closes the listener and releases the handle (0, and handles released by
/// `cc_shutdown`, are fine).
#[no_mangle]
pub extern "C" fn cc_listener_free(listener: cc_listener) -> cc_error_code {
    guard(ptr::null_mut(), || {
        if let Some(l) = handles::remove::<cc::Listener>(listener)? {
            l.close()?;
        }
        Ok(())
    })
}

/// Connects to a TCP service inside the guest: `address` is `"IP:PORT"` as
/// the guest sees it (`"127.0.0.1:8080"`; `":8080"` is the guest's
/// loopback). Nothing listening there is `CC_ERR_NETWORK`.
///
/// # Safety
/// `network` and `address` are NUL-terminated strings; `out` is NULL or
/// valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_dial(
    inst: cc_instance,
    network: *const c_char,
    address: *const c_char,
    out: *mut cc_conn,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes strings and a writable slot as documented.
        unsafe { open_on(inst, network, address, out, cc::Instance::dial) }
    })
}

/// Publishes the guest's TCP port `guest_port` at `127.0.0.1:host_port` on
/// the host (`host_port` 0 picks a free port); `port` (may be NULL) gets the
/// bound host port. Exposing a guest port twice is
/// `CC_ERR_INVALID_ARGUMENT`; a host port in use is `CC_ERR_NETWORK`.
///
/// # Safety
/// `out` and `port` are NULL or valid for writing; `err` is NULL or valid
/// for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_expose(
    inst: cc_instance,
    guest_port: u16,
    host_port: u16,
    out: *mut cc_exposed,
    port: *mut u16,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or writable slots.
        let (out, port) = unsafe { (Out::new(out, "out")?, Out::opt(port)) };
        let inst = handles::get::<Instance>(inst)?;
        let exposed = inst.get()?.expose(guest_port, host_port)?;
        let bound = exposed.host_port();
        out.write(handles::insert(Arc::new(exposed))?);
        put(port, bound);
        Ok(())
    })
}

/// The host port (on `127.0.0.1`) that reaches the guest port.
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_exposed_port(
    exposed: cc_exposed,
    out: *mut u16,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable slot.
        let out = unsafe { Out::new(out, "out") }?;
        out.write(handles::get::<cc::Exposed>(exposed)?.host_port());
        Ok(())
    })
}

/// Unpublishes the port and closes its connections. Closing again is
/// `CC_OK`.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_exposed_close(
    exposed: cc_exposed,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        handles::get::<cc::Exposed>(exposed)?.close();
        Ok(())
    })
}

/// Unpublishes the port and releases the handle (0, and handles released
/// by `cc_shutdown`, are fine).
#[no_mangle]
pub extern "C" fn cc_exposed_free(exposed: cc_exposed) -> cc_error_code {
    guard(ptr::null_mut(), || {
        if let Some(e) = handles::remove::<cc::Exposed>(exposed)? {
            e.close();
        }
        Ok(())
    })
}
