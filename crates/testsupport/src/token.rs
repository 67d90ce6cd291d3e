//! A bearer-token server for [`crate::Registry`]'s `Auth::Token` mode: the
//! registry answers `401` with `WWW-Authenticate: Bearer realm=…,service=…,
//! scope=…`; clients fetch a token from this server's `GET /token` with HTTP
//! Basic credentials and then send `Authorization: Bearer <token>`, as with
//! the large public registries.
//!
//! Tokens are the JWTs Distribution verifies (`auth: token`): RS256, signed
//! with `openssl` by a throwaway self-signed certificate that is the
//! registry's `rootcertbundle` and travels in the token's `x5c` header.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::registry::{base64, run_tool};

/// The `service` the registry names and tokens are issued for.
pub(crate) const SERVICE: &str = "cc-testsupport";
/// The tokens' issuer, which the registry checks.
pub(crate) const ISSUER: &str = "cc-testsupport-token";

/// Signs tokens for one user.
#[derive(Debug)]
pub(crate) struct Issuer {
    key: PathBuf,
    /// The certificate, DER in standard base64 (the `x5c` entry).
    cert_der: String,
    user: String,
    password: String,
}

impl Issuer {
    /// A new key and certificate in DIR (`token.key`, `token.crt`).
    pub(crate) fn new(dir: &Path, user: &str, password: &str) -> Issuer {
        let key = dir.join("token.key");
        let cert = dir.join("token.crt");
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=cc-testsupport-token",
                "-keyout",
                &key.to_string_lossy(),
                "-out",
                &cert.to_string_lossy(),
            ],
            &[],
        );
        let der = openssl(
            &["x509", "-in", &cert.to_string_lossy(), "-outform", "DER"],
            &[],
        );
        Issuer {
            key,
            cert_der: base64(&der),
            user: user.to_string(),
            password: password.to_string(),
        }
    }

    /// The certificate file the registry trusts.
    pub(crate) fn cert(&self) -> PathBuf {
        self.key.with_file_name("token.crt")
    }

    /// A token granting SCOPES (`repository:NAME:ACTIONS` each).
    pub(crate) fn token(&self, scopes: &[String]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut access = Vec::new();
        for scope in scopes {
            // NAME may hold ':' only with a port, which repositories lack.
            let mut parts = scope.splitn(2, ':');
            let (Some(kind), Some(rest)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Some((name, actions)) = rest.rsplit_once(':') else {
                continue;
            };
            let actions: Vec<String> = actions.split(',').map(json_str).collect();
            access.push(format!(
                "{{\"type\":{},\"name\":{},\"actions\":[{}]}}",
                json_str(kind),
                json_str(name),
                actions.join(",")
            ));
        }
        let header = format!(
            "{{\"typ\":\"JWT\",\"alg\":\"RS256\",\"x5c\":[{}]}}",
            json_str(&self.cert_der)
        );
        let claims = format!(
            "{{\"iss\":{},\"sub\":{},\"aud\":{},\"exp\":{},\"nbf\":{},\"iat\":{},\"jti\":\"{}-{}\",\"access\":[{}]}}",
            json_str(ISSUER),
            json_str(&self.user),
            json_str(SERVICE),
            now + 600,
            now.saturating_sub(60),
            now.saturating_sub(60),
            std::process::id(),
            now,
            access.join(","),
        );
        let signing_input = format!(
            "{}.{}",
            base64url(header.as_bytes()),
            base64url(claims.as_bytes())
        );
        let signature = openssl(
            &["dgst", "-sha256", "-sign", &self.key.to_string_lossy()],
            signing_input.as_bytes(),
        );
        format!("{signing_input}.{}", base64url(&signature))
    }

    fn authorized(&self, authorization: Option<&str>) -> bool {
        let expected = base64(format!("{}:{}", self.user, self.password).as_bytes());
        authorization
            .and_then(|v| v.strip_prefix("Basic "))
            .is_some_and(|v| v.trim() == expected)
    }
}

/// `GET /token` on a loopback port, on a thread; stopped when dropped.
#[derive(Debug)]
pub(crate) struct TokenServer {
    addr: String,
    stop: Arc<AtomicBool>,
    pub(crate) issuer: Arc<Issuer>,
}

impl TokenServer {
    pub(crate) fn start(issuer: Issuer) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the token server");
        let addr = listener.local_addr().expect("local_addr").to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let issuer = Arc::new(issuer);
        let (flag, serving) = (stop.clone(), issuer.clone());
        std::thread::Builder::new()
            .name("cc-testsupport-token".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        // A client that hangs up early is its own problem.
                        let _ = serve(stream, &serving);
                    }
                }
            })
            .expect("start the token server thread");
        TokenServer { addr, stop, issuer }
    }

    /// The realm clients are sent to.
    pub(crate) fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.addr);
    }
}

/// Answers one request: a token for the scopes asked, if the Basic
/// credentials are right; 401 otherwise.
fn serve(stream: TcpStream, issuer: &Issuer) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_string());
            }
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let scopes: Vec<String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "scope")
        .flat_map(|(_, v)| {
            percent_decode(v)
                .split(' ')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|s| !s.is_empty())
        .collect();
    let (status, body) = if path != "/token" {
        ("404 Not Found", "{\"details\":\"not found\"}".to_string())
    } else if !issuer.authorized(authorization.as_deref()) {
        (
            "401 Unauthorized",
            "{\"details\":\"incorrect username or password\"}".to_string(),
        )
    } else {
        let token = json_str(&issuer.token(&scopes));
        (
            "200 OK",
            format!("{{\"token\":{token},\"access_token\":{token},\"expires_in\":600}}"),
        )
    };
    let mut out = stream;
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\n");
    let _ = write!(
        head,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(body.as_bytes())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// S as a JSON string.
fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Base64url without padding, as JWTs use.
fn base64url(data: &[u8]) -> String {
    base64(data)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

/// `openssl ARGS` with INPUT on stdin: its stdout.
fn openssl(args: &[&str], input: &[u8]) -> Vec<u8> {
    run_tool(("openssl", "openssl"), args, input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_decode() {
        assert_eq!(
            percent_decode("repository%3Aa%2Fb%3Apull%2Cpush"),
            "repository:a/b:pull,push"
        );
        assert_eq!(percent_decode("a+b%2"), "a b%2");
        assert_eq!(json_str("a\"b\\\n"), "\"a\\\"b\\\\\\u000a\"");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }
}
