//! A stored image: its manifest, its config, and its root filesystem.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read};
use std::path::PathBuf;

use cc_erofs::{Builder, Metadata, Tree};
use oci_spec::image::{ImageConfiguration, ImageManifest};
use sha2::{Digest as _, Sha256};

use crate::layers::{apply_layer_with, Limited, Whiteouts};
use crate::{Digest, Error, ImageConfig, Result, Store};

/// Version of the root filesystem conversion; part of every image key, so
/// a change to it rebuilds instead of reusing old images.
const ROOTFS_FORMAT: &str = "cc-erofs-1";

/// An image whose manifest and config are in the store.
#[derive(Debug, Clone)]
pub struct Image {
    store: Store,
    name: Option<String>,
    digest: Digest,
    manifest: ImageManifest,
    config: ImageConfiguration,
}

impl Image {
    /// Opens the image manifest `digest` (which must not be an index).
    pub(crate) fn open(store: &Store, name: Option<String>, digest: Digest) -> Result<Image> {
        let manifest: ImageManifest = parse(&store.read_document(&digest)?, "manifest")?;
        let config_digest: Digest = manifest.config().digest().to_string().parse()?;
        let config: ImageConfiguration = parse(&store.read_document(&config_digest)?, "config")?;
        Ok(Image {
            store: store.clone(),
            name,
            digest,
            manifest,
            config,
        })
    }

    /// A client on the store this image lives in.
    pub fn client(&self) -> crate::Client {
        crate::Client::from_store(self.store.clone())
    }

    /// The name it was pulled or loaded as, if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The manifest digest: the image's identity.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn config(&self) -> ImageConfig {
        ImageConfig::from_oci(&self.config)
    }

    /// The cache key of the root image: the conversion format and the
    /// layer digests, so images sharing a layer stack share one root image.
    /// Keys of every root image this image's layers may have built: each
    /// bottom-up prefix, and each layer alone in overlay form.
    pub(crate) fn rootfs_keys(&self) -> Result<Vec<String>> {
        let layers = self.layers()?;
        let prefixes = (1..=layers.len()).map(|k| rootfs_key(&layers[..k]));
        Ok(prefixes.chain(layers.iter().map(overlay_key)).collect())
    }

    pub(crate) fn manifest(&self) -> &ImageManifest {
        &self.manifest
    }

    /// Digests of the layer blobs, bottom first.
    pub fn layers(&self) -> Result<Vec<Digest>> {
        self.manifest
            .layers()
            .iter()
            .map(|l| l.digest().to_string().parse())
            .collect()
    }

    /// Compressed size of all layers.
    pub fn size(&self) -> u64 {
        self.manifest.layers().iter().map(|l| l.size()).sum()
    }

    /// The read-only erofs image of the root filesystem, built from the
    /// layers on first use and cached by the layer digests. Layers may
    /// expand to at most `max_layer_bytes` each.
    pub fn rootfs(&self, max_layer_bytes: u64) -> Result<PathBuf> {
        self.rootfs_prefix(self.manifest.layers().len(), max_layer_bytes)
    }

    /// The root image of only the bottom `count` layers: what a snapshot's
    /// own layers are stacked on.
    pub fn rootfs_prefix(&self, count: usize, max_layer_bytes: u64) -> Result<PathBuf> {
        let layers = self.layers()?;
        let layers = &layers[..count.min(layers.len())];
        let path = self.store.rootfs_path(&rootfs_key(layers));
        let diff_ids = self.config.rootfs().diff_ids();
        build_erofs(
            &self.store,
            &path,
            layers,
            diff_ids,
            Whiteouts::Apply,
            max_layer_bytes,
        )?;
        Ok(path)
    }
}

/// Builds the erofs image of `layers` (bottom first) at `path` unless it
/// exists, verifying each layer's uncompressed digest against `diff_ids`.
pub(crate) fn build_erofs(
    store: &Store,
    path: &std::path::Path,
    layers: &[Digest],
    diff_ids: &[String],
    whiteouts: Whiteouts,
    max_layer_bytes: u64,
) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    let mut temp = store.temp()?;
    let temp_path = temp.path.clone();
    let out = BufWriter::with_capacity(
        1 << 20,
        temp.file()
            .try_clone()
            .map_err(Error::io("open", &temp_path))?,
    );
    let mut builder = Builder::new(out).map_err(Error::io("write", &temp_path))?;
    let mut tree = Tree::new(Metadata {
        mode: 0o755,
        ..Default::default()
    });
    for (i, layer) in layers.iter().enumerate() {
        let blob = store.blob_path(layer);
        let file = File::open(&blob).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::MissingBlob(layer.to_string()),
            _ => Error::io("open", &blob)(e),
        })?;
        let mut hashing = Hashing::new(Limited::new(
            decompress(BufReader::with_capacity(1 << 20, file))?,
            max_layer_bytes,
        ));
        apply_layer_with(&mut tree, &mut builder, &mut hashing, whiteouts).map_err(
            |e| match e {
                crate::layers::LayerError::Io(io) if io.kind() == io::ErrorKind::FileTooLarge => {
                    crate::layers::LayerError::TooLarge {
                        limit: max_layer_bytes,
                    }
                    .into()
                }
                other => Error::from(other),
            },
        )?;
        // The diff id covers the whole tar stream, padding included.
        io::copy(&mut hashing, &mut io::sink()).map_err(Error::io("read layer", &blob))?;
        let actual = Digest::sha256(&hashing.hasher.finalize_reset());
        if let Some(expected) = diff_ids.get(i) {
            if *expected != actual.to_string() {
                return Err(Error::DigestMismatch {
                    expected: expected.clone(),
                    actual: actual.to_string(),
                });
            }
        }
    }
    // Build time 0: the same layers always give the same image.
    let (out, _) = builder.finish(&tree, 0)?;
    out.into_inner()
        .map_err(|e| Error::io("write", &temp_path)(e.into_error()))?;
    temp.publish(path)
}

/// Key of the overlay-form root image of one layer.
pub(crate) fn overlay_key(layer: &Digest) -> String {
    Digest::of(format!("cc-erofs-overlay-1 {layer}").as_bytes()).hex()[..32].to_string()
}

fn rootfs_key(layers: &[Digest]) -> String {
    let mut key = Sha256::new();
    key.update(ROOTFS_FORMAT);
    for l in layers {
        key.update(l.to_string());
    }
    Digest::sha256(&key.finalize()).hex()[..32].to_string()
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::BadDocument(format!("{what}: {e}")))
}

/// A layer's uncompressed stream, by its magic bytes: gzip, zstd or plain.
fn decompress(mut r: BufReader<File>) -> Result<Box<dyn Read>> {
    use io::BufRead;
    let head = r.fill_buf().map_err(Error::io("read", "layer"))?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(r).map_err(Error::io("read", "zstd layer"))?,
        )
    } else {
        Box::new(r)
    })
}

/// Hashes what is read through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
        }
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}
