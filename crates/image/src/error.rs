use std::io;
use std::path::Path;

use crate::layers::LayerError;

/// Image store failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid image reference {0:?}")]
    BadReference(String),
    #[error("invalid digest {0:?} (expected sha256:<64 lowercase hex>)")]
    BadDigest(String),
    #[error("content digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("blob {0} is missing")]
    MissingBlob(String),
    #[error("invalid manifest, index or config: {0}")]
    BadDocument(String),
    #[error("image {0} is not in the store")]
    NotFound(String),
    #[error("image {reference} has no {wanted} variant (it has: {available})")]
    NoPlatform {
        reference: String,
        wanted: String,
        available: String,
    },
    #[error("invalid platform {0:?} (expected os/arch[/variant])")]
    BadPlatform(String),
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    /// A registries.conf that cannot be used: malformed (with the line
    /// where known) or naming no registry for a short name.
    #[error("{path}{}: {message}", .line.map(|l| format!(" line {l}")).unwrap_or_default())]
    RegistriesConf {
        path: String,
        line: Option<usize>,
        message: String,
    },
    /// registries.conf forbids pulling this reference.
    #[error("{reference} is blocked by the registry prefix {prefix:?} in {path}")]
    Blocked {
        reference: String,
        prefix: String,
        path: String,
    },
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The caller's [`CancelToken`](crate::CancelToken) stopped the
    /// operation named (`pull`, `load`).
    #[error("{0} cancelled")]
    Cancelled(&'static str),
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// A layer expands past [`crate::UnpackLimits`]: a decompression bomb
    /// or an image too large for the configured bounds.
    #[error(
        "layer {layer} ({compressed} bytes compressed) expands past {limit} bytes (the {why})"
    )]
    LayerTooLarge {
        layer: String,
        compressed: u64,
        limit: u64,
        why: &'static str,
    },
    #[error("invalid unpack limits: {0}")]
    BadLimit(String),
    #[error("building root filesystem image")]
    Erofs(#[from] cc_erofs::Error),
    #[error("reading a root filesystem image: {0}")]
    ErofsRead(#[from] cc_erofs::ReadError),
}

impl Error {
    pub(crate) fn io(op: &str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> Error {
        let (op, path) = (op.to_string(), path.as_ref().display().to_string());
        move |source| Error::Io { op, path, source }
    }

    /// Whether this is a failure to reach or talk to a registry.
    pub fn is_network(&self) -> bool {
        matches!(self, Error::Registry { .. })
    }
}

impl From<io::Error> for Error {
    fn from(source: io::Error) -> Self {
        Error::Io {
            op: "write".into(),
            path: "image store".into(),
            source,
        }
    }
}

/// `text` safe to show on a terminal: control characters (but newlines)
/// escaped, undecodable bytes shown as `?`.
pub fn printable(text: &str) -> String {
    escape(text, |c| c == '\n' || !c.is_control())
}

/// `text` with every character but `keep`'s escaped and `?` for
/// undecodable bytes.
fn escape(text: &str, keep: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            char::REPLACEMENT_CHARACTER => out.push('?'),
            c if keep(c) => out.push(c),
            c => out.extend(c.escape_default()),
        }
    }
    out
}

/// An archive's read failure; the bytes of the archive it may quote are
/// untrusted, so all but printable ASCII is escaped.
pub(crate) fn untrusted(op: &str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> Error {
    let wrap = Error::io(op, path);
    move |e| {
        let text = escape(&e.to_string(), |c| c == ' ' || c.is_ascii_graphic());
        wrap(io::Error::new(e.kind(), text))
    }
}

/// Results of the image store.
pub type Result<T, E = Error> = std::result::Result<T, E>;
