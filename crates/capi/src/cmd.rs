//! Commands in the guest (configure, start once, wait) and the pipes to
//! their standard streams.

use std::ffi::c_char;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use crate::alloc;
use crate::cancel::cc_cancel_token;
use crate::error::{cc_error, cc_error_code, Failure};
use crate::ffi::{cstr, entry, guard, put, slice, slice_mut, strings, Out};
use crate::handles;
use crate::instance::cc_instance;
use crate::objects::{Cancel, Instance};

/// A command in a guest: configured, then started once. Usable from any
/// thread: `cc_cmd_kill` and the pipes work while another thread waits.
pub type cc_cmd = u64;

/// One end of a byte stream to the guest: a command's stdin (writable) or
/// stdout/stderr (readable), or a TCP connection (both). A read and a write
/// may run in two threads at once; `cc_conn_close` from any thread ends
/// both.
pub type cc_conn = u64;

fn new_cmd(out: Out<cc_cmd>, cmd: cc::Cmd) -> Result<(), Failure> {
    out.write(handles::insert(Arc::new(cmd))?);
    Ok(())
}

/// A command running `program` (looked up in the guest's `PATH`) with the
/// `nargs` arguments in `args` (NULL when 0). The image's environment,
/// working directory and user apply unless set on the command.
///
/// # Safety
/// `program` is a NUL-terminated string; `args` is NULL or valid for
/// reading `nargs` NUL-terminated strings; `out` is NULL or valid for
/// writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_command(
    inst: cc_instance,
    program: *const c_char,
    args: *const *const c_char,
    nargs: usize,
    out: *mut cc_cmd,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes strings as documented and a writable slot.
        let (program, args, out) = unsafe {
            (
                cstr(program, "program")?,
                strings(args, nargs, "args")?,
                Out::new(out, "out")?,
            )
        };
        if program.is_empty() {
            return Err(Failure::invalid("`program` is empty"));
        }
        let inst = handles::get::<Instance>(inst)?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        new_cmd(out, inst.get()?.cmd(program, &args))
    })
}

/// A command running the image's entrypoint: `Entrypoint` + `args`, or
/// `Entrypoint` + `Cmd` when `nargs` is 0. Fails with
/// `CC_ERR_INVALID_ARGUMENT` when that is empty.
///
/// # Safety
/// `args` is NULL or valid for reading `nargs` NUL-terminated strings;
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_instance_entrypoint_command(
    inst: cc_instance,
    args: *const *const c_char,
    nargs: usize,
    out: *mut cc_cmd,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes strings as documented and a writable slot.
        let (args, out) = unsafe { (strings(args, nargs, "args")?, Out::new(out, "out")?) };
        let inst = handles::get::<Instance>(inst)?;
        let inst = inst.get()?;
        let argv = match inst.image_config() {
            Some(config) => config.entrypoint_argv(&args),
            None => args,
        };
        let Some((program, rest)) = argv.split_first() else {
            return Err(Failure::invalid(
                "the image has no entrypoint or cmd, and no arguments were given",
            ));
        };
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        new_cmd(out, inst.cmd(program, &rest))
    })
}

fn with_cmd<T>(cmd: cc_cmd, f: impl FnOnce(&cc::Cmd) -> cc::Result<T>) -> Result<T, Failure> {
    Ok(f(&*handles::get::<cc::Cmd>(cmd)?)?)
}

/// Sets the working directory (before start).
///
/// # Safety
/// `dir` is a NUL-terminated string; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_set_dir(
    cmd: cc_cmd,
    dir: *const c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a NUL-terminated string.
        let dir = unsafe { cstr(dir, "dir") }?;
        with_cmd(cmd, |c| c.set_dir(dir))
    })
}

/// Sets an environment variable (before start).
///
/// # Safety
/// `key` and `value` are NUL-terminated strings; `err` is NULL or valid
/// for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_set_env(
    cmd: cc_cmd,
    key: *const c_char,
    value: *const c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NUL-terminated strings.
        let (key, value) = unsafe { (cstr(key, "key")?, cstr(value, "value")?) };
        with_cmd(cmd, |c| c.set_env(key, value))
    })
}

/// The value of `key` in the command's environment (the image's or set),
/// a string to free with `cc_string_free`, or NULL when unset (`CC_OK`
/// either way). After start it is always NULL.
///
/// # Safety
/// `key` is a NUL-terminated string; `value` is NULL or valid for writing;
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_get_env(
    cmd: cc_cmd,
    key: *const c_char,
    value: *mut *mut c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or a writable slot.
        let (key, value) = unsafe { (cstr(key, "key")?, Out::new(value, "value")?) };
        let found = handles::get::<cc::Cmd>(cmd)?.get_env(key);
        value.write(match found {
            Some(v) => alloc::string(&v)?,
            None => ptr::null_mut(),
        });
        Ok(())
    })
}

/// The command's environment as `count` `KEY=VALUE` strings (the array
/// also ends with NULL), to free with `cc_strings_free`. Empty after start.
///
/// # Safety
/// `entries` and `count` are NULL or valid for writing; `err` is NULL or
/// valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_environ(
    cmd: cc_cmd,
    entries: *mut *mut *mut c_char,
    count: *mut usize,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or writable slots.
        let (entries, count) =
            unsafe { (Out::new(entries, "entries")?, Out::new(count, "count")?) };
        let env = handles::get::<cc::Cmd>(cmd)?.environ();
        entries.write(alloc::strings(&env)?);
        count.write(env.len());
        Ok(())
    })
}

/// Sets the user to run as (`name`, `uid`, `uid:gid`, `name:group`),
/// before start.
///
/// # Safety
/// `user` is a NUL-terminated string; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_set_user(
    cmd: cc_cmd,
    user: *const c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a NUL-terminated string.
        let user = unsafe { cstr(user, "user") }?;
        with_cmd(cmd, |c| c.set_user(user))
    })
}

/// Kills the process if it runs longer than `seconds` (before start);
/// waiting then fails with `CC_ERR_TIMEOUT`.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_set_timeout(
    cmd: cc_cmd,
    seconds: f64,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        let limit = Duration::try_from_secs_f64(seconds)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                Failure::invalid(format!(
                    "timeout {seconds} is not a positive number of seconds"
                ))
            })?;
        with_cmd(cmd, |c| c.set_timeout(limit))
    })
}

/// Runs the command on a pseudo-terminal of `rows` × `cols` (each 1 to
/// 4096), before start, with `TERM` set to `term` unless it is NULL (the
/// default is `xterm`). The terminal is its stdin, stdout and stderr: the
/// stdout pipe or output is everything the terminal shows (echo
/// included), the stdin pipe is what is typed; a stderr pipe is refused.
///
/// # Safety
/// `term` is NULL or a NUL-terminated string; `err` is NULL or valid for
/// writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_set_pty(
    cmd: cc_cmd,
    rows: u16,
    cols: u16,
    term: *const c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        let term = match term.is_null() {
            true => None,
            // SAFETY: the caller passes a NUL-terminated string.
            false => Some(unsafe { cstr(term, "term") }?),
        };
        with_cmd(cmd, |c| c.set_pty(rows, cols, term))
    })
}

/// Sets the window size of the started command's terminal (see
/// `cc_cmd_set_pty`); its foreground programs get `SIGWINCH`. A command
/// that ended is fine; one without a terminal is `CC_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_resize(
    cmd: cc_cmd,
    rows: u16,
    cols: u16,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || with_cmd(cmd, |c| c.resize(rows, cols)))
}

/// Requests the process's stdin as a writable `cc_conn` (before start);
/// closing it sends end of file.
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_stdin_pipe(
    cmd: cc_cmd,
    out: *mut cc_conn,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: forwarded from the caller.
    unsafe { pipe(cmd, out, err, cc::Cmd::stdin_pipe) }
}

/// Requests the process's stdout as a readable `cc_conn` (before start).
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_stdout_pipe(
    cmd: cc_cmd,
    out: *mut cc_conn,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: forwarded from the caller.
    unsafe { pipe(cmd, out, err, cc::Cmd::stdout_pipe) }
}

/// Requests the process's stderr as a readable `cc_conn` (before start).
///
/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_stderr_pipe(
    cmd: cc_cmd,
    out: *mut cc_conn,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: forwarded from the caller.
    unsafe { pipe(cmd, out, err, cc::Cmd::stderr_pipe) }
}

/// # Safety
/// `out` is NULL or valid for writing; `err` is NULL or valid for writing.
unsafe fn pipe(
    cmd: cc_cmd,
    out: *mut cc_conn,
    err: *mut cc_error,
    which: fn(&cc::Cmd) -> cc::Result<cc::Conn>,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: forwarded from the caller.
        let out = unsafe { Out::new(out, "out") }?;
        let conn = with_cmd(cmd, which)?;
        out.write(handles::insert(Arc::new(conn))?);
        Ok(())
    })
}

/// Starts the process; output not taken by a pipe is discarded.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_start(cmd: cc_cmd, err: *mut cc_error) -> cc_error_code {
    entry(err, || with_cmd(cmd, |c| c.start()))
}

/// Waits for the started process; `*exit_code` (may be NULL) is its exit
/// status, or minus the number of the signal that ended it. A non-zero
/// status is `CC_OK`. Waiting again gives the same code.
///
/// # Safety
/// `exit_code` is NULL or valid for writing; `err` is NULL or valid for
/// writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_wait(
    cmd: cc_cmd,
    exit_code: *mut i32,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's guarantees are the variant's.
    unsafe { cc_cmd_wait_cancellable(cmd, 0, exit_code, err) }
}

/// `cc_cmd_wait` that `cancel` (0 for none) stops with `CC_ERR_CANCELLED`;
/// the process keeps running and can be waited for again.
///
/// # Safety
/// `exit_code` is NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_wait_cancellable(
    cmd: cc_cmd,
    cancel: cc_cancel_token,
    exit_code: *mut i32,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable int.
        let exit_code = unsafe { Out::opt(exit_code) };
        let cancel = handles::get_opt::<Cancel>(cancel)?;
        let code = match &cancel {
            Some(c) => with_cmd(cmd, |cmd| cmd.wait_cancellable(c.token()))?,
            None => with_cmd(cmd, |cmd| cmd.wait())?,
        };
        put(exit_code, code);
        Ok(())
    })
}

/// Starts the process and waits for it (as `cc_cmd_start` + `cc_cmd_wait`).
///
/// # Safety
/// `exit_code` is NULL or valid for writing; `err` is NULL or valid for
/// writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_run(
    cmd: cc_cmd,
    exit_code: *mut i32,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or a writable int.
        let exit_code = unsafe { Out::opt(exit_code) };
        put(exit_code, with_cmd(cmd, |c| c.run())?);
        Ok(())
    })
}

/// # Safety
/// `data` and `len` are NULL or valid for writing; `exit_code` is NULL or
/// valid for writing; `err` is NULL or valid for writing.
unsafe fn capture(
    cmd: cc_cmd,
    data: *mut *mut u8,
    len: *mut usize,
    exit_code: *mut i32,
    err: *mut cc_error,
    merged: bool,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: forwarded from the caller.
        let exit_code = unsafe { Out::opt(exit_code) };
        let cmd = handles::get::<cc::Cmd>(cmd)?;
        // SAFETY: forwarded from the caller.
        unsafe {
            alloc::bytes_out(data, len, || {
                Ok(if merged {
                    cmd.combined_output()?
                } else {
                    cmd.output()?
                })
            })
        }?;
        put(exit_code, cmd.exit_code().unwrap_or(-1));
        Ok(())
    })
}

/// Runs the process and streams its stdout (with stderr interleaved in
/// the order written when `merged`) into `host_path` (created, or
/// truncated) as it comes, in constant memory whatever its size.
/// `*written` (may be NULL) is the byte count and `*exit_code` (may be
/// NULL) as `cc_cmd_wait`. If the file cannot be written the process is
/// killed.
///
/// # Safety
/// `host_path` is a NUL-terminated string; `written` and `exit_code` are
/// NULL or valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_output_to_file(
    cmd: cc_cmd,
    host_path: *const c_char,
    merged: bool,
    written: *mut u64,
    exit_code: *mut i32,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes a string and NULL or writable slots.
        let (host_path, written, exit_code) = unsafe {
            (
                cstr(host_path, "host_path")?,
                Out::opt(written),
                Out::opt(exit_code),
            )
        };
        let cmd = handles::get::<cc::Cmd>(cmd)?;
        let mut file = std::fs::File::create(host_path).map_err(|e| cc::Error::Io {
            op: "output_to_file (create)".into(),
            path: host_path.into(),
            source: e,
        })?;
        put(written, cmd.output_to(merged, &mut file)?);
        put(exit_code, cmd.exit_code().unwrap_or(-1));
        Ok(())
    })
}

/// Runs the process and returns its stdout in a buffer to free with
/// `cc_bytes_free` or move with `cc_bytes_move` (never NULL on success);
/// `*exit_code` (may be NULL) as `cc_cmd_wait`. Output over the instance's
/// `max_result_bytes` kills the process and fails with `CC_ERR_TOO_LARGE`
/// (stream it with `cc_cmd_output_to_file` or a stdout pipe).
///
/// # Safety
/// `data` and `len` are NULL or valid for writing; `exit_code` is NULL or
/// valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_output(
    cmd: cc_cmd,
    data: *mut *mut u8,
    len: *mut usize,
    exit_code: *mut i32,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: forwarded from the caller.
    unsafe { capture(cmd, data, len, exit_code, err, false) }
}

/// As `cc_cmd_output`, with stdout and stderr interleaved in the order
/// written.
///
/// # Safety
/// `data` and `len` are NULL or valid for writing; `exit_code` is NULL or
/// valid for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_combined_output(
    cmd: cc_cmd,
    data: *mut *mut u8,
    len: *mut usize,
    exit_code: *mut i32,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: forwarded from the caller.
    unsafe { capture(cmd, data, len, exit_code, err, true) }
}

/// Kills the started process and its process group (SIGKILL); a process
/// that has ended is fine.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_kill(cmd: cc_cmd, err: *mut cc_error) -> cc_error_code {
    entry(err, || with_cmd(cmd, |c| c.kill()))
}

/// The exit code once a wait returned: `*exited` says whether there is one
/// and `*code` is it (as `cc_cmd_wait`; 0 when `*exited` is false).
///
/// # Safety
/// `code` and `exited` are NULL or valid for writing; `err` is NULL or
/// valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_cmd_exit_code(
    cmd: cc_cmd,
    code: *mut i32,
    exited: *mut bool,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or writable slots.
        let (code, exited) = unsafe { (Out::new(code, "code")?, Out::new(exited, "exited")?) };
        let status = handles::get::<cc::Cmd>(cmd)?.exit_code();
        code.write(status.unwrap_or(0));
        exited.write(status.is_some());
        Ok(())
    })
}

/// Releases the command handle (0, and handles released by `cc_shutdown`,
/// are fine). A running process keeps running; its pipes stay usable.
#[no_mangle]
pub extern "C" fn cc_cmd_free(cmd: cc_cmd) -> cc_error_code {
    guard(ptr::null_mut(), || {
        drop(handles::remove::<cc::Cmd>(cmd)?);
        Ok(())
    })
}

/// Reads up to `cap` bytes into `buf`; `*n` is how many (maybe fewer than
/// `cap`; 0 only at end of stream, which is `CC_OK`, or when `cap` is 0).
/// Blocks until data arrives.
///
/// # Safety
/// `buf` is NULL or valid for writing `cap` bytes; `n` is NULL or valid
/// for writing; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_conn_read(
    conn: cc_conn,
    buf: *mut u8,
    cap: usize,
    n: *mut usize,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's guarantees are the variant's.
    unsafe { cc_conn_read_cancellable(conn, 0, buf, cap, n, err) }
}

/// `cc_conn_read` that `cancel` (0 for none) stops with
/// `CC_ERR_CANCELLED`; what was not read yet stays to be read.
///
/// # Safety
/// `buf` is valid for `cap` bytes; `n` is valid for writing; `err` is NULL
/// or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_conn_read_cancellable(
    conn: cc_conn,
    cancel: cc_cancel_token,
    buf: *mut u8,
    cap: usize,
    n: *mut usize,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes `cap` writable bytes and a writable slot.
        let (buf, n) = unsafe { (slice_mut(buf, cap, "buf")?, Out::new(n, "n")?) };
        let conn = handles::get::<cc::Conn>(conn)?;
        let cancel = handles::get_opt::<Cancel>(cancel)?;
        if buf.is_empty() {
            n.write(0);
            return Ok(());
        }
        n.write(match &cancel {
            Some(c) => conn.read_into_cancellable(buf, c.token())?,
            None => conn.read_into(buf)?,
        });
        Ok(())
    })
}

/// Reads to the end of the stream, into a buffer to free with
/// `cc_bytes_free` or move with `cc_bytes_move` (never NULL on success).
/// More than the instance's `max_result_bytes` fails with
/// `CC_ERR_TOO_LARGE` and stops the stream.
///
/// # Safety
/// `data` and `len` are NULL or valid for writing; `err` is NULL or valid
/// for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_conn_read_all(
    conn: cc_conn,
    data: *mut *mut u8,
    len: *mut usize,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or writable slots.
        unsafe {
            alloc::bytes_out(
                data,
                len,
                || Ok(handles::get::<cc::Conn>(conn)?.read_all()?),
            )
        }
    })
}

/// Writes all `len` bytes of `data` (blocking while the reader is behind).
///
/// # Safety
/// `data` is NULL or valid for reading `len` bytes; `err` is NULL or valid
/// for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_conn_write(
    conn: cc_conn,
    data: *const u8,
    len: usize,
    err: *mut cc_error,
) -> cc_error_code {
    // SAFETY: the caller's guarantees are the variant's.
    unsafe { cc_conn_write_cancellable(conn, 0, data, len, err) }
}

/// `cc_conn_write` that `cancel` (0 for none) stops with
/// `CC_ERR_CANCELLED` while it waits for the guest; part of `data` may
/// have been sent.
///
/// # Safety
/// `data` is valid for `len` bytes; `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_conn_write_cancellable(
    conn: cc_conn,
    cancel: cc_cancel_token,
    data: *const u8,
    len: usize,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes `len` readable bytes.
        let data = unsafe { slice(data, len, "data") }?;
        let conn = handles::get::<cc::Conn>(conn)?;
        match handles::get_opt::<Cancel>(cancel)? {
            Some(c) => conn.write_cancellable(data, c.token())?,
            None => conn.write(data)?,
        }
        Ok(())
    })
}

/// Closes this end: a writer sends end of file, a reader stops the stream.
/// Closing again is `CC_OK`; reads and writes after it fail with
/// `CC_ERR_ALREADY_CLOSED`.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_conn_close(conn: cc_conn, err: *mut cc_error) -> cc_error_code {
    entry(err, || {
        handles::get::<cc::Conn>(conn)?.close();
        Ok(())
    })
}

/// Ends the writing direction only (a TCP half close): the guest reads end
/// of file, and this end can still read. On a stdin pipe it is
/// `cc_conn_close`; on an output pipe it does nothing.
///
/// # Safety
/// `err` is NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_conn_close_write(conn: cc_conn, err: *mut cc_error) -> cc_error_code {
    entry(err, || {
        handles::get::<cc::Conn>(conn)?.close_write();
        Ok(())
    })
}

/// The local and remote addresses (`"IP:PORT"`) of a TCP connection, as
/// strings to free with `cc_string_free`; NULL for a pipe. Either output
/// may be NULL.
///
/// # Safety
/// `local` and `remote` are NULL or valid for writing; `err` is NULL or
/// valid for writing.
#[no_mangle]
pub unsafe extern "C" fn cc_conn_addrs(
    conn: cc_conn,
    local: *mut *mut c_char,
    remote: *mut *mut c_char,
    err: *mut cc_error,
) -> cc_error_code {
    entry(err, || {
        // SAFETY: the caller passes NULL or writable slots.
        let (local, remote) = unsafe { (Out::opt(local), Out::opt(remote)) };
        let conn = handles::get::<cc::Conn>(conn)?;
        let text = |s: Option<&str>| s.map_or(Ok(ptr::null_mut()), alloc::string);
        put(local, text(conn.local_addr())?);
        put(remote, text(conn.remote_addr())?);
        Ok(())
    })
}

/// Closes the connection and releases the handle (0, and handles released
/// by `cc_shutdown`, are fine).
#[no_mangle]
pub extern "C" fn cc_conn_free(conn: cc_conn) -> cc_error_code {
    guard(ptr::null_mut(), || {
        if let Some(c) = handles::remove::<cc::Conn>(conn)? {
            c.close();
        }
        Ok(())
    })
}
