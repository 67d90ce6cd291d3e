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
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("pull cancelled")]
    Cancelled,
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("building root filesystem image")]
    Erofs(#[from] cc_erofs::Error),
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

/// Results of the image store.
pub type Result<T, E = Error> = std::result::Result<T, E>;
