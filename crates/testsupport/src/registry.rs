//! A real OCI registry for tests: Distribution's `docker-registry` on a
//! loopback port, with its own storage in a fresh temporary directory.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use crate::token::{Issuer, TokenServer, ISSUER, SERVICE};

/// The registry binary (Debian package `docker-registry`); `$CC_REGISTRY_BIN` overrides it.
const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// How long [`Registry::start`] waits for `GET /v2/` to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How many ports [`Registry::start`] tries when one is taken meanwhile.
const START_ATTEMPTS: usize = 5;

/// The manifest media types a client accepts, for [`Registry::digest`].
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// How clients authenticate to a [`Registry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// No authentication: anyone may pull and push.
    Anonymous,
    /// htpasswd (bcrypt) authentication with one user; the registry accepts
    /// HTTP Basic credentials directly and answers 401 without them.
    Htpasswd {
        /// The user name.
        user: String,
        /// The user's password.
        password: String,
    },
    /// Bearer tokens, as the large public registries use: the registry
    /// answers 401 with `WWW-Authenticate: Bearer realm=…,service=…`; a
    /// token server on another loopback port issues tokens at the realm to
    /// this one user (HTTP Basic there), and the registry accepts only
    /// `Authorization: Bearer <token>`.
    Token {
        /// The user name.
        user: String,
        /// The user's password.
        password: String,
    },
}

impl Auth {
    /// `Auth::Htpasswd` for USER and PASSWORD.
    pub fn htpasswd(user: &str, password: &str) -> Auth {
        Auth::Htpasswd {
            user: user.to_string(),
            password: password.to_string(),
        }
    }

    /// `Auth::Token` for USER and PASSWORD.
    pub fn token(user: &str, password: &str) -> Auth {
        Auth::Token {
            user: user.to_string(),
            password: password.to_string(),
        }
    }

    /// `user:password`, `None` for `Anonymous`.
    pub fn credentials(&self) -> Option<String> {
        match self {
            Auth::Anonymous => None,
            Auth::Htpasswd { user, password } | Auth::Token { user, password } => {
                Some(format!("{user}:{password}"))
            }
        }
    }
}

/// A response to [`Registry::request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The headers, names as sent, in order.
    pub headers: Vec<(String, String)>,
    /// The body (empty for `HEAD`).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named NAME (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A running `docker-registry serve` on `127.0.0.1:PORT`, storage and log in
/// a fresh temporary directory. Dropping it kills and reaps the registry and
/// removes the directory.
///
/// The registry dies with the test process too (`PR_SET_PDEATHSIG`, set from
/// a spawner thread that lives as long as the process, so a `Registry` kept in
/// a `static` outlives the test thread that started it). A registry kept in a
/// `static` is never dropped, so its directory stays in the temp dir.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    dir: PathBuf,
    addr: String,
    auth: Auth,
    /// The token server of `Auth::Token`.
    token: Option<TokenServer>,
}

impl Registry {
    /// Starts a registry with AUTH and waits (up to 20 s) until `GET /v2/`
    /// answers: 200 when anonymous, 401 otherwise.
    ///
    /// Panics, with the registry's log, if it cannot be started; and if
    /// `docker-registry` (or, for `Htpasswd`, `htpasswd`; for `Token`,
    /// `openssl`) is not installed.
    pub fn start(auth: Auth) -> Registry {
        let bin = std::env::var_os("CC_REGISTRY_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(REGISTRY_BIN));
        assert!(
            bin.exists(),
            "{} not found: install the docker-registry package (scripts/setup.sh does: \
             apt-get install docker-registry skopeo apache2-utils)",
            bin.display()
        );
        let dir = fresh_temp_dir();
        let htpasswd = dir.join("htpasswd");
        if let Auth::Htpasswd { user, password } = &auth {
            write_htpasswd(&htpasswd, user, password);
        }
        let token = match &auth {
            Auth::Token { user, password } => {
                Some(TokenServer::start(Issuer::new(&dir, user, password)))
            }
            _ => None,
        };
        let config = dir.join("config.yml");
        let log = dir.join("registry.log");
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let addr = format!("127.0.0.1:{}", free_port());
            let mut yaml = format!(
                "version: 0.1\n\
                 log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
                 \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: {addr}\n  secret: cc-testsupport-{pid}\n",
                storage = yaml_str(&dir.join("storage")),
                pid = std::process::id(),
            );
            if matches!(auth, Auth::Htpasswd { .. }) {
                let _ = write!(
                    yaml,
                    "auth:\n  htpasswd:\n    realm: cc-testsupport\n    path: {}\n",
                    yaml_str(&htpasswd)
                );
            }
            if let Some(server) = &token {
                let _ = write!(
                    yaml,
                    "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                    server.realm(),
                    yaml_str(&server.issuer.cert())
                );
            }
            fs::write(&config, yaml).unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
            let log_file =
                File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
            let log_err = log_file
                .try_clone()
                .unwrap_or_else(|e| panic!("dup {}: {e}", log.display()));
            let mut cmd = Command::new(&bin);
            cmd.arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log_file)
                .stderr(log_err);
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("REGISTRY_") {
                    cmd.env_remove(key); // the environment overrides the config file
                }
            }
            let mut child = spawn_dying_with_process(cmd)
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            match wait_ready(&mut child, &addr, &auth, &log) {
                Ok(()) => {
                    return Registry {
                        child,
                        dir,
                        addr,
                        auth,
                        token,
                    }
                }
                Err(Retry::PortTaken(text)) => {
                    last_log = text;
                    let _ = child.kill();
                    let _ = child.wait();
                }
                Err(Retry::Fatal(why)) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let text = fs::read_to_string(&log).unwrap_or_default();
                    let _ = fs::remove_dir_all(&dir);
                    panic!("docker-registry did not start: {why}\n--- registry log ---\n{text}");
                }
            }
        }
        let _ = fs::remove_dir_all(&dir);
        panic!("docker-registry found no free port in {START_ATTEMPTS} attempts\n--- last log ---\n{last_log}");
    }

    /// `127.0.0.1:PORT`, the registry's address (plain HTTP).
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// The authentication the registry was started with.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The realm URL of the token server (`Auth::Token` only).
    pub fn token_realm(&self) -> Option<String> {
        self.token.as_ref().map(TokenServer::realm)
    }

    /// The registry's temporary directory: `config.yml`, `registry.log`,
    /// `storage/`, `htpasswd` or `token.crt` and `token.key`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The registry process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    /// Pushes the OCI layout's TAG_IN_LAYOUT to REPO_AND_TAG unchanged (an
    /// index with all its platforms, digests preserved).
    pub fn push(&self, layout: &Path, tag_in_layout: &str, repo_and_tag: &str) {
        self.copy(
            layout,
            tag_in_layout,
            repo_and_tag,
            &["--all", "--preserve-digests"],
        );
    }

    /// Pushes the image converted to Docker's schema 2 media types (new
    /// digests), as registries serving older clients hold them.
    pub fn push_docker_v2(&self, layout: &Path, tag_in_layout: &str, repo_and_tag: &str) {
        self.copy(layout, tag_in_layout, repo_and_tag, &["--format", "v2s2"]);
    }

    fn copy(&self, layout: &Path, tag_in_layout: &str, repo_and_tag: &str, extra: &[&str]) {
        let skopeo = find_tool("skopeo", "skopeo");
        let mut cmd = Command::new(skopeo);
        cmd.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        cmd.args(extra);
        match self.auth.credentials() {
            Some(creds) => cmd.arg(format!("--dest-creds={creds}")),
            None => cmd.arg("--dest-no-creds"),
        };
        cmd.arg(format!("oci:{}:{tag_in_layout}", layout.display()))
            .arg(format!("docker://{}/{repo_and_tag}", self.addr))
            .stdin(Stdio::null());
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run skopeo: {e}"));
        assert!(
            out.status.success(),
            "skopeo copy {}:{tag_in_layout} -> {}/{repo_and_tag} failed ({}):\n{}{}\n--- registry log ---\n{}",
            layout.display(),
            self.addr,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// The digest (`sha256:…`) of the manifest or index REPO_AND_TAG
    /// (`repo:tag` or `repo@digest`) names: `HEAD /v2/REPO/manifests/TAG`'s
    /// `Docker-Content-Digest`, accepting OCI and Docker v2 types.
    pub fn digest(&self, repo_and_tag: &str) -> String {
        let (repo, reference) = split_reference(repo_and_tag);
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .request("HEAD", &path, &[("Accept", MANIFEST_ACCEPT)], true)
            .unwrap_or_else(|e| panic!("HEAD {path} on {}: {e}", self.addr));
        assert_eq!(resp.status, 200, "HEAD {path} on {}: {resp:?}", self.addr);
        resp.header("Docker-Content-Digest")
            .unwrap_or_else(|| panic!("HEAD {path}: no Docker-Content-Digest in {resp:?}"))
            .to_string()
    }

    /// Sends one HTTP/1.0 request (METHOD PATH, extra HEADERS) and reads the
    /// whole response. With AUTHENTICATED it sends the credentials as HTTP
    /// Basic, or with `Auth::Token` a token for the repository PATH names.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        authenticated: bool,
    ) -> io::Result<HttpResponse> {
        match (&self.token, authenticated) {
            (Some(server), true) => {
                let scopes: Vec<String> = repository_of(path)
                    .map(|repo| format!("repository:{repo}:pull,push,delete"))
                    .into_iter()
                    .collect();
                let bearer = format!("Bearer {}", server.issuer.token(&scopes));
                let mut all = headers.to_vec();
                all.push(("Authorization", &bearer));
                http_request(&self.addr, None, method, path, &all)
            }
            _ => {
                let creds = self.auth.credentials().filter(|_| authenticated);
                http_request(&self.addr, creds.as_deref(), method, path, headers)
            }
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- registry {} log (last {} lines) ---",
                self.addr,
                tail.len()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Why a start attempt failed.
enum Retry {
    /// The port was taken between choosing and binding it: try another (the log).
    PortTaken(String),
    /// Anything else (the reason).
    Fatal(String),
}

/// Waits until the registry CHILD logs (in LOG) that it listens on ADDR and
/// `GET /v2/` answers as expected for AUTH.
fn wait_ready(child: &mut Child, addr: &str, auth: &Auth, log: &Path) -> Result<(), Retry> {
    let deadline = Instant::now() + START_TIMEOUT;
    let listening = format!("listening on {addr}");
    let want = if matches!(auth, Auth::Anonymous) {
        200
    } else {
        401
    };
    let mut last = String::from("no answer yet");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = fs::read_to_string(log).unwrap_or_default();
            if text.contains("address already in use") {
                return Err(Retry::PortTaken(text));
            }
            return Err(Retry::Fatal(format!("it exited with {status}")));
        }
        // The log line comes right after bind(): what answers is ours, not a neighbour's.
        if fs::read_to_string(log)
            .unwrap_or_default()
            .contains(&listening)
        {
            match http_request(addr, None, "GET", "/v2/", &[]) {
                Ok(resp) if resp.status == want => return Ok(()),
                Ok(resp) => last = format!("GET /v2/ answered {} (want {want})", resp.status),
                Err(e) => last = format!("GET /v2/: {e}"),
            }
        }
        if Instant::now() > deadline {
            return Err(Retry::Fatal(format!(
                "not ready after {START_TIMEOUT:?} ({last})"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends one HTTP/1.0 request to ADDR, with Basic CREDENTIALS if given, and
/// reads the whole response.
fn http_request(
    addr: &str,
    credentials: Option<&str>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<HttpResponse> {
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(creds) = credentials {
        let _ = write!(req, "Authorization: Basic {}\r\n", base64(creds.as_bytes()));
    }
    for (name, value) in headers {
        let _ = write!(req, "{name}: {value}\r\n");
    }
    req.push_str("\r\n");
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// A port that was free a moment ago (bind 127.0.0.1:0, read it, close).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A new, empty directory under the system temp dir.
fn fresh_temp_dir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cc-registry-{}-{n}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Left by an earlier process with our pid: not ours to keep.
                let _ = fs::remove_dir_all(&dir);
            }
            Err(e) => panic!("create {}: {e}", dir.display()),
        }
    }
}

/// Writes an htpasswd file with USER's bcrypt hash (`htpasswd -Bbn`).
fn write_htpasswd(path: &Path, user: &str, password: &str) {
    let hash = run_tool(
        ("htpasswd", "apache2-utils"),
        &["-Bbn", user, password],
        &[],
    );
    fs::write(path, hash).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Runs TOOL (its name and package, for [`find_tool`]) with ARGS and INPUT
/// on stdin; its stdout. Panics, with its stderr, if it fails.
pub(crate) fn run_tool(tool: (&str, &str), args: &[&str], input: &[u8]) -> Vec<u8> {
    let (name, package) = tool;
    let mut child = Command::new(find_tool(name, package))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(input)
        .unwrap_or_else(|e| panic!("write to {name}: {e}"));
    drop(stdin);
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// NAME's path in `$PATH`; panics naming PACKAGE if it is not there.
fn find_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` not found in PATH: install the {package} package \
                 (scripts/setup.sh does: apt-get install docker-registry skopeo apache2-utils)"
            )
        })
}

/// P as a double-quoted YAML string.
fn yaml_str(p: &Path) -> String {
    let s = p.to_string_lossy();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Spawns CMD so that it is killed when this process exits.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, so
/// children are forked by one thread that lives as long as the process, not by
/// the (short-lived) test thread that asks.
fn spawn_dying_with_process(mut cmd: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("cc-testsupport-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the spawner thread");
        tx
    });
    let parent = std::process::id() as libc::pid_t;
    let set_pdeathsig = move || -> io::Result<()> {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and changes only
        // this (child) process's death signal; no memory is involved.
        if unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: getppid has no preconditions and cannot fail.
        if unsafe { libc::getppid() } != parent {
            // The parent died before prctl took effect: the signal will never come.
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec; it only makes
    // async-signal-safe system calls (prctl, getppid) and allocates nothing
    // (errors are built from raw errno values), so it is sound after fork in a
    // multi-threaded process.
    unsafe {
        cmd.pre_exec(set_pdeathsig);
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

/// The repository a `/v2/REPO/{manifests,blobs,tags}/…` PATH is about.
fn repository_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    ["/manifests/", "/blobs/", "/tags/"]
        .iter()
        .filter_map(|kind| rest.rfind(kind).map(|i| &rest[..i]))
        .next()
}

/// Splits `repo:tag` / `repo@digest` / `repo` (tag `latest`).
fn split_reference(reference: &str) -> (&str, &str) {
    if let Some((repo, digest)) = reference.split_once('@') {
        return (repo, digest);
    }
    match reference.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (reference, "latest"),
    }
}

/// Parses a whole HTTP/1.x response.
fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers in the response"))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

/// Standard base64 with padding.
pub(crate) fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("alice:s3cret", "YWxpY2U6czNjcmV0"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn references_split() {
        assert_eq!(split_reference("busybox:latest"), ("busybox", "latest"));
        assert_eq!(split_reference("a/b:v1"), ("a/b", "v1"));
        assert_eq!(split_reference("a/b"), ("a/b", "latest"));
        assert_eq!(split_reference("a/b@sha256:0123"), ("a/b", "sha256:0123"));
        assert_eq!(repository_of("/v2/a/b/manifests/v1"), Some("a/b"));
        assert_eq!(repository_of("/v2/a/blobs/sha256:00"), Some("a"));
        assert_eq!(repository_of("/v2/"), None);
    }

    #[test]
    fn responses_parse() {
        let raw = b"HTTP/1.0 401 Unauthorized\r\nWww-Authenticate: Basic realm=\"x\"\r\nContent-Length: 2\r\n\r\n{}";
        let resp = parse_response(raw).unwrap();
        assert_eq!(resp.status, 401);
        assert_eq!(resp.header("www-authenticate"), Some("Basic realm=\"x\""));
        assert_eq!(resp.body, b"{}");
        assert!(parse_response(b"HTTP/1.0 200 OK\r\n").is_err());
    }
}
