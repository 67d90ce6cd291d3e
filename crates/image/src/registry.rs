//! Pulling from registries with `oci-client`, into the store.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use oci_spec::image::{ImageIndex, ImageManifest};

use crate::image::parse;
use crate::platform::{host_platform, select, Platform};
use crate::registries::{self, is_short, RegistriesConf};
use crate::store::MAX_DOCUMENT;
use crate::stream::Chunk;
use crate::{CancelToken, Digest, Error, Image, Result, Store, UnpackLimits};

/// When to contact the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Use the stored image if the name is known, else pull.
    #[default]
    IfNotPresent,
    /// Always ask the registry (layers already stored are not downloaded).
    Always,
    /// Never contact the registry: a missing image is an error.
    Never,
}

/// Registry credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Auth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Platform to select from a multi-platform image (default: the host's).
    pub platform: Option<Platform>,
    /// Credentials; without them, `~/.docker/config.json` is consulted.
    pub auth: Option<Auth>,
    pub policy: PullPolicy,
    /// How far its layers may expand: each is unpacked once before the
    /// image is named, and a bomb is refused.
    pub limits: UnpackLimits,
    /// A `containers-registries.conf` to use alone, instead of the file
    /// `$CC_REGISTRIES_CONF` names or containers' own files (see the crate
    /// docs).
    pub registries_conf: Option<PathBuf>,
}

/// Where a pull is.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Bytes downloaded so far, all blobs.
    pub current: u64,
    /// Bytes to download in all, all blobs (0 until known).
    pub total: u64,
    /// The blob being downloaded (its digest).
    pub blob: String,
    /// Index of that blob (0-based) among `blob_count`.
    pub blob_index: usize,
    pub blob_count: usize,
    pub bytes_per_second: f64,
    pub eta: Option<Duration>,
}

const ACCEPT: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(registry);
    matches!(host, "localhost" | "[::1]" | "::1") || host.starts_with("127.")
}

/// How to reach a registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Https,
    /// TLS without verifying the certificate (an `insecure` registry).
    HttpsUnverified,
    Http,
}

/// The protocols to try, in order, for REGISTRY (`host[:port]`).
fn protocols(registry: &str, insecure: bool) -> &'static [Protocol] {
    if is_loopback(registry) {
        // Registries on this machine speak plain HTTP, as docker assumes.
        &[Protocol::Http]
    } else if insecure {
        // As containers' tools: TLS if it answers, else plain HTTP.
        &[Protocol::HttpsUnverified, Protocol::Http]
    } else {
        &[Protocol::Https]
    }
}

/// The names REFERENCE may stand for (short names resolved through CONF),
/// parsed.
fn candidates(conf: &RegistriesConf, reference: &str) -> Result<Vec<Reference>> {
    conf.candidates(reference)?
        .into_iter()
        .map(|n| n.parse().map_err(|_| Error::BadReference(n)))
        .collect()
}

/// The stored image a name stands for, if all its layers are stored.
fn stored(store: &Store, r: &Reference, limits: UnpackLimits) -> Result<Option<Image>> {
    let name = r.whole();
    let known = store.get_ref(&name).or_else(|| {
        r.digest()
            .and_then(|d| d.parse().ok())
            .filter(|d| store.has_blob(d))
    });
    match known.map(|d| Image::open(store, Some(name), d)) {
        Some(Ok(image)) if image.layers()?.iter().all(|l| store.has_blob(l)) => {
            Ok(Some(image.with_unpack_limits(limits)))
        }
        _ => Ok(None),
    }
}

/// The stored image a user-given name stands for (short names resolved as
/// pulls resolve them), by its first candidate that is stored.
pub(crate) fn lookup(store: &Store, name: &str) -> Result<Option<(String, Digest)>> {
    let conf = if is_short(name) {
        registries::load(None)?
    } else {
        RegistriesConf::default()
    };
    for r in candidates(&conf, name)? {
        let name = r.whole();
        if let Some(digest) = store.get_ref(&name) {
            return Ok(Some((name, digest)));
        }
    }
    Ok(None)
}

pub(crate) fn pull(
    store: &Store,
    reference: &str,
    options: &PullOptions,
    progress: &mut dyn FnMut(&Progress),
    cancel: &CancelToken,
) -> Result<Image> {
    // A bad name is reported as given, not as a search registry's candidate.
    reference
        .parse::<Reference>()
        .map_err(|_| Error::BadReference(reference.to_string()))?;
    let conf = registries::load(options.registries_conf.as_deref())?;
    let names = candidates(&conf, reference)?;
    if options.policy != PullPolicy::Always {
        for r in &names {
            if let Some(image) = stored(store, r, options.limits)? {
                return Ok(image);
            }
        }
        if options.policy == PullPolicy::Never {
            let name = names.first().map(Reference::whole).unwrap_or_default();
            return Err(Error::NotFound(format!("{name} (pull policy NEVER)")));
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("start", "pull runtime"))?;
    // Every candidate name, each from its mirrors then its registry, until
    // one serves the manifest; the image then comes wholly from there.
    let mut failures = Vec::new();
    let mut rewritten = names.len() > 1;
    for r in &names {
        let name = r.whole();
        let sources = match conf.sources(&name, r.digest().is_some()) {
            Ok(sources) => sources,
            Err(e) => {
                failures.push((name.clone(), e));
                continue;
            }
        };
        for source in sources {
            rewritten |= source.reference != name;
            let at: Reference = source
                .reference
                .parse()
                .map_err(|_| Error::BadReference(source.reference.clone()))?;
            for &protocol in protocols(at.registry(), source.insecure) {
                if cancel.is_cancelled() {
                    return Err(Error::Cancelled("pull"));
                }
                let puller = Puller::new(store, &at, protocol, options, cancel);
                let manifest = async {
                    puller.login().await?;
                    puller.document(&at).await
                };
                let first = match runtime.block_on(manifest) {
                    Ok(first) => first,
                    Err(Error::Cancelled(op)) => return Err(Error::Cancelled(op)),
                    Err(e) => {
                        tracing::debug!("pull {name} from {}: {e}", at.whole());
                        failures.push((format!("{name} from {}", at.whole()), e));
                        continue;
                    }
                };
                let (digest, built) = runtime.block_on(puller.run(first, progress))?;
                let image = Image::open(store, Some(name.clone()), digest.clone())?
                    .with_unpack_limits(options.limits);
                if !built {
                    image.check_unpack(&options.limits)?;
                }
                store.set_ref(&name, &digest)?;
                return Ok(image);
            }
        }
    }
    Err(match failures.len() {
        // One place tried, as named: its own error, as without a registries.conf.
        1 if !rewritten => failures.remove(0).1,
        _ => Error::Registry {
            registry: reference.to_string(),
            message: failures
                .iter()
                .map(|(what, e)| format!("{what}: {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        },
    })
}

struct Puller<'a> {
    store: &'a Store,
    reference: &'a Reference,
    client: oci_client::Client,
    auth: RegistryAuth,
    platform: Platform,
    limits: UnpackLimits,
    cancel: &'a CancelToken,
}

impl<'a> Puller<'a> {
    fn new(
        store: &'a Store,
        reference: &'a Reference,
        protocol: Protocol,
        options: &PullOptions,
        cancel: &'a CancelToken,
    ) -> Self {
        let registry = reference.resolve_registry().to_string();
        let config = ClientConfig {
            protocol: match protocol {
                Protocol::Http => ClientProtocol::HttpsExcept(vec![registry]),
                Protocol::Https | Protocol::HttpsUnverified => ClientProtocol::Https,
            },
            accept_invalid_certificates: protocol == Protocol::HttpsUnverified,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let auth = match &options.auth {
            Some(a) => RegistryAuth::Basic(a.username.clone(), a.password.clone()),
            None => docker_config_auth(reference.registry()).unwrap_or(RegistryAuth::Anonymous),
        };
        Puller {
            store,
            reference,
            client: oci_client::Client::new(config),
            auth,
            platform: options.platform.clone().unwrap_or_else(host_platform),
            limits: options.limits,
            cancel,
        }
    }

    /// Authenticates as the registry asks (HTTP Basic, or a bearer token
    /// from its token server) before anything is fetched, so refused
    /// credentials are reported as such rather than as a refused download.
    async fn login(&self) -> Result<()> {
        self.client
            .auth(self.reference, &self.auth, RegistryOperation::Pull)
            .await
            .map(drop)
            .map_err(|e| self.oci_error(e))
    }

    /// E, saying when credentials were wanted and none were given.
    fn oci_error(&self, e: OciDistributionError) -> Error {
        match (&e, &self.auth) {
            (
                OciDistributionError::AuthenticationFailure(_)
                | OciDistributionError::UnauthorizedError { .. },
                RegistryAuth::Anonymous,
            ) => self.registry_error(format!("{e} (no credentials given)")),
            _ => self.registry_error(e),
        }
    }

    fn registry_error(&self, e: impl std::fmt::Display) -> Error {
        Error::Registry {
            registry: self.reference.registry().to_string(),
            message: e.to_string(),
        }
    }

    /// Fetches, verifies and stores a manifest or index.
    async fn document(&self, r: &Reference) -> Result<(Digest, Vec<u8>)> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(r, &self.auth, ACCEPT)
            .await
            .map_err(|e| self.oci_error(e))?;
        if bytes.len() as u64 > MAX_DOCUMENT {
            return Err(Error::BadDocument(format!(
                "manifest of {} is too large",
                r.whole()
            )));
        }
        let digest = Digest::of(&bytes);
        if let Some(expected) = r.digest() {
            if expected != digest.to_string() {
                return Err(Error::DigestMismatch {
                    expected: expected.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        self.store.put_document(&bytes)?;
        Ok((digest, bytes.to_vec()))
    }

    /// Given the manifest or index [`Puller::document`] fetched, pulls the
    /// manifest and the blobs missing from the store and, when
    /// the image's root image is not built yet, builds it on a thread of
    /// its own as the layers arrive (which also bounds how far they
    /// expand). Returns the manifest digest and whether it built the root
    /// image; if not, the caller still has to check the layers' expansion.
    async fn run(
        self,
        first: (Digest, Vec<u8>),
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(Digest, bool)> {
        let (mut digest, mut bytes) = first;
        let kind: serde_json::Value = parse(&bytes, "manifest")?;
        if kind.get("manifests").is_some() {
            let index: ImageIndex = parse(&bytes, "index")?;
            let chosen = select(index.manifests(), &self.platform, &self.reference.whole())?;
            let by_digest = self
                .reference
                .clone_with_digest(chosen.digest().to_string());
            (digest, bytes) = self.document(&by_digest).await?;
        }
        let manifest: ImageManifest = parse(&bytes, "manifest")?;
        let blobs: Vec<OciDescriptor> = std::iter::once(manifest.config())
            .chain(manifest.layers())
            .map(|d| OciDescriptor {
                media_type: d.media_type().to_string(),
                digest: d.digest().to_string(),
                size: d.size() as i64,
                ..Default::default()
            })
            .collect();
        let missing: Vec<(usize, &OciDescriptor)> = blobs
            .iter()
            .enumerate()
            .filter(|(_, d)| {
                d.digest
                    .parse()
                    .map(|d| !self.store.has_blob(&d))
                    .unwrap_or(true)
            })
            .collect();
        let mut state = Progress {
            current: 0,
            total: missing.iter().map(|(_, d)| d.size.max(0) as u64).sum(),
            blob: String::new(),
            blob_index: 0,
            blob_count: missing.len(),
            bytes_per_second: 0.0,
            eta: None,
        };
        let started = Instant::now();
        let mut next = missing.iter().enumerate().peekable();
        // The config first: it holds the layers' uncompressed digests.
        if let Some(&(i, (0, config))) = next.peek() {
            next.next();
            state.blob = config.digest.clone();
            state.blob_index = i;
            progress(&state);
            self.blob(config, &mut state, started, progress, None)
                .await?;
        }
        let image = Image::open(self.store, None, digest.clone())?.with_unpack_limits(self.limits);
        if image.erofs_layers()?.contains(&true) || image.has_rootfs()? {
            for (i, &(_, blob)) in next {
                state.blob = blob.digest.clone();
                state.blob_index = i;
                progress(&state);
                self.blob(blob, &mut state, started, progress, None).await?;
            }
            return Ok((digest, false));
        }

        let mut senders = Vec::new();
        let mut streams: Vec<Option<_>> = std::iter::repeat_with(|| None)
            .take(manifest.layers().len())
            .collect();
        for (_, &(layer, _)) in next.clone() {
            let (tx, stream) = crate::stream::channel();
            streams[layer - 1] = Some(stream);
            senders.push(tx);
        }
        let builder = std::thread::Builder::new()
            .name("cc-image-unpack".into())
            .spawn(move || image.stream_rootfs(streams))
            .map_err(Error::io("start", "root image builder"))?;
        let mut downloaded = Ok(());
        for ((i, &(_, blob)), tx) in next.zip(&senders) {
            state.blob = blob.digest.clone();
            state.blob_index = i;
            progress(&state);
            downloaded = self
                .blob(blob, &mut state, started, progress, Some(tx))
                .await;
            if downloaded.is_err() {
                break;
            }
        }
        // Streams not ended verified now end in an error, so the builder
        // stops and publishes nothing.
        drop(senders);
        let built = builder
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // A failed download explains a failed build, not the other way round.
        downloaded?;
        built.map(|_| (digest, true))
    }

    /// Downloads one blob into the store; with `tx`, also hands each chunk
    /// to the root image builder and tells it once the blob is verified.
    async fn blob(
        &self,
        d: &OciDescriptor,
        state: &mut Progress,
        started: Instant,
        progress: &mut dyn FnMut(&Progress),
        mut tx: Option<&tokio::sync::mpsc::Sender<Chunk<Bytes>>>,
    ) -> Result<()> {
        let expected: Digest = d.digest.parse()?;
        // Asked as a range from byte 0, a registry answers 206 and the
        // client does not hash the blob a second time: the writer below
        // checks its digest before anything is published. A registry that
        // refuses ranges is asked again for the whole blob. (An empty blob
        // has no range to ask for.)
        let ranged = if d.size > 0 {
            self.client
                .pull_blob_stream_partial(self.reference, d, 0, None)
                .await
                .ok()
        } else {
            None
        };
        let mut stream = match ranged {
            Some(BlobResponse::Full(s) | BlobResponse::Partial(s)) => s,
            None => self
                .client
                .pull_blob_stream(self.reference, d)
                .await
                .map_err(|e| self.registry_error(e))?,
        };
        let mut writer = self.store.blob_writer(Some(&expected))?;
        let mut written = 0u64;
        // The token's wake-up ends even a download that has stalled.
        let (wake, mut cancelled) = tokio::sync::oneshot::channel::<()>();
        let _wake = self.cancel.on_cancel(move || {
            let _ = wake.send(());
        });
        loop {
            let chunk = tokio::select! {
                chunk = stream.stream.next() => chunk,
                _ = &mut cancelled => return Err(Error::Cancelled("pull")),
            };
            let Some(chunk) = chunk else { break };
            let chunk = chunk.map_err(|e| self.registry_error(e))?;
            if self.cancel.is_cancelled() {
                return Err(Error::Cancelled("pull"));
            }
            let len = chunk.len() as u64;
            written += len;
            if written > d.size.max(0) as u64 {
                // The digest check would fail anyway; stop before the
                // registry fills the disk.
                return Err(self.registry_error(format!(
                    "blob {} is larger than its declared {} bytes",
                    d.digest, d.size
                )));
            }
            writer.write(&chunk)?;
            if let Some(to) = tx {
                if to.send(Chunk::Data(chunk)).await.is_err() {
                    // The builder stopped (it says why); the blob is still
                    // verified and stored, as without a builder.
                    tx = None;
                }
            }
            state.current += len;
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            state.bytes_per_second = state.current as f64 / secs;
            state.eta = (state.bytes_per_second > 0.0).then(|| {
                Duration::from_secs_f64(
                    state.total.saturating_sub(state.current) as f64 / state.bytes_per_second,
                )
            });
            progress(state);
        }
        writer.finish()?;
        if let Some(tx) = tx {
            // Failing only if the builder stopped, which it reports.
            let _ = tx.send(Chunk::Verified).await;
        }
        Ok(())
    }
}

/// Credentials for `registry` from the docker client's config, if any.
fn docker_config_auth(registry: &str) -> Option<RegistryAuth> {
    let path = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".docker")))?
        .join("config.json");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let auths = config.get("auths")?.as_object()?;
    let keys: Vec<String> = match registry {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => {
            vec![
                "https://index.docker.io/v1/".into(),
                "docker.io".into(),
                "index.docker.io".into(),
            ]
        }
        r => vec![r.to_string(), format!("https://{r}"), format!("http://{r}")],
    };
    let entry = keys.iter().find_map(|k| auths.get(k))?;
    if let (Some(u), Some(p)) = (
        entry.get("username").and_then(|v| v.as_str()),
        entry.get("password").and_then(|v| v.as_str()),
    ) {
        return Some(RegistryAuth::Basic(u.into(), p.into()));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry.get("auth")?.as_str()?)
        .ok()?;
    let (u, p) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(RegistryAuth::Basic(u.into(), p.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_use_plain_http() {
        for r in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "[::1]:5000",
            "127.1.2.3",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in [
            "docker.io",
            "ghcr.io",
            "10.0.0.1:5000",
            "localhost.example.com",
        ] {
            assert!(!is_loopback(r), "{r}");
        }
    }

    #[test]
    fn docker_config_credentials() {
        let dir = std::env::temp_dir().join(format!("cc-dockercfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYTpzcw=="},"https://index.docker.io/v1/":{"username":"hub","password":"pw"}}}"#,
        )
        .unwrap();
        std::env::set_var("DOCKER_CONFIG", &dir);
        assert!(
            matches!(docker_config_auth("127.0.0.1:5000"), Some(RegistryAuth::Basic(u, p)) if u == "user" && p == "pa:ss")
        );
        assert!(
            matches!(docker_config_auth("docker.io"), Some(RegistryAuth::Basic(u, _)) if u == "hub")
        );
        assert!(docker_config_auth("ghcr.io").is_none());
        std::env::remove_var("DOCKER_CONFIG");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
