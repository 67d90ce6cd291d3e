//! A stored image: its manifest, its config, and its root filesystem.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read};
use std::path::PathBuf;
use std::thread::Scope;

use crate::digest::Sha256;
use cc_erofs::{Builder, Metadata, Tree};
use oci_spec::image::{ImageConfiguration, ImageManifest};

use crate::erofs_layer;
use crate::layers::{apply_layer_with, Limited, Whiteouts};
use crate::stream::{LayerStream, ReadAhead};
use crate::{Digest, Error, ImageConfig, Result, Store};

/// Version of the root filesystem conversion; part of every image key, so
/// a change to it rebuilds instead of reusing old images.
const ROOTFS_FORMAT: &str = "cc-erofs-1";

/// How far an image's layers may expand when unpacked: a small
/// compressed layer that inflates to gigabytes (a decompression bomb)
/// would otherwise fill the host's disk with its root image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// A layer may expand to this many times its compressed size (default 100)...
    pub max_ratio: u64,
    /// ...or to this many bytes, whichever is more, so small layers of
    /// very compressible files are fine (default 64 MiB).
    pub ratio_floor: u64,
    /// Bound on one layer's unpacked size (default 32 GiB).
    pub max_layer_bytes: u64,
    /// Bound on all of an image's layers unpacked (default 32 GiB).
    pub max_image_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_ratio: 100,
            ratio_floor: 64 << 20,
            max_layer_bytes: 32 << 30,
            max_image_bytes: 32 << 30,
        }
    }
}

impl UnpackLimits {
    /// Refuses zero limits, which would refuse every image.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("max_ratio", self.max_ratio),
            ("max_layer_bytes", self.max_layer_bytes),
            ("max_image_bytes", self.max_image_bytes),
        ] {
            if value == 0 {
                return Err(Error::BadLimit(format!("{name} must be positive")));
            }
        }
        Ok(())
    }

    /// How far a layer of `compressed` bytes may expand when `used` bytes
    /// of its image are already unpacked, and which limit that is.
    fn for_layer(&self, compressed: u64, used: u64) -> (u64, &'static str) {
        let by_ratio = compressed
            .saturating_mul(self.max_ratio)
            .max(self.ratio_floor);
        let left = self.max_image_bytes.saturating_sub(used);
        [
            (by_ratio, "expansion ratio"),
            (self.max_layer_bytes, "per-layer limit"),
            (left, "whole-image limit"),
        ]
        .into_iter()
        .min_by_key(|(bytes, _)| *bytes)
        .unwrap_or((0, ""))
    }
}

/// An image whose manifest and config are in the store.
#[derive(Debug, Clone)]
pub struct Image {
    store: Store,
    name: Option<String>,
    digest: Digest,
    manifest: ImageManifest,
    config: ImageConfiguration,
    limits: UnpackLimits,
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
            limits: UnpackLimits::default(),
        })
    }

    /// This image with `limits` on building its root image.
    pub fn with_unpack_limits(mut self, limits: UnpackLimits) -> Image {
        self.limits = limits;
        self
    }

    /// The limits its root image is built under: those of the pull or
    /// load that stored it in this process, else the defaults.
    pub fn unpack_limits(&self) -> &UnpackLimits {
        &self.limits
    }

    /// A client on the store this image lives in, with its limits.
    pub fn client(&self) -> crate::Client {
        let mut client = crate::Client::from_store(self.store.clone());
        client.set_unpack_limits(self.limits);
        client
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

    /// The layers as root images are built from them, bottom first.
    fn layer_blobs(&self) -> Result<Vec<LayerBlob>> {
        self.manifest
            .layers()
            .iter()
            .map(|l| {
                Ok(LayerBlob {
                    digest: l.digest().to_string().parse()?,
                    size: l.size(),
                    erofs: l.media_type().to_string() == erofs_layer::MEDIA_TYPE,
                })
            })
            .collect()
    }

    /// Whether each layer, bottom first, is an erofs root image rather
    /// than a tarball (see [`crate::Client::erofs_image`]).
    pub(crate) fn erofs_layers(&self) -> Result<Vec<bool>> {
        Ok(self.layer_blobs()?.iter().map(|l| l.erofs).collect())
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

    /// Host bytes this image takes in the store: the blobs it uses
    /// (manifest, config, layers) plus the root images built from them.
    /// Content shared with other images counts for each.
    pub fn disk_usage(&self) -> Result<u64> {
        let config: Digest = self.manifest.config().digest().to_string().parse()?;
        let blobs = [self.digest.clone(), config]
            .into_iter()
            .chain(self.layers()?)
            .map(|d| self.store.blob_path(&d));
        let roots = self
            .rootfs_keys()?
            .into_iter()
            .map(|k| self.store.rootfs_path(&k));
        Ok(blobs.chain(roots).map(|p| allocated(&p)).sum())
    }

    /// The read-only erofs image of the root filesystem, built from the
    /// layers on first use (by the pull itself, for a pulled image) and
    /// cached by the layer digests, under
    /// [`Image::unpack_limits`].
    pub fn rootfs(&self) -> Result<PathBuf> {
        self.rootfs_prefix(self.manifest.layers().len())
    }

    /// Unpacks every layer without storing anything, so a layer that
    /// expands past `limits` is refused before the image is named. Erofs
    /// layers are refused: only this store makes them, from images it
    /// wrote, and it exports them as tar.
    pub(crate) fn check_unpack(&self, limits: &UnpackLimits) -> Result<()> {
        if self.erofs_layers()?.contains(&true) {
            return Err(Error::Unsupported(format!(
                "layers of type {} come only from crumblecracker's own store",
                erofs_layer::MEDIA_TYPE
            )));
        }
        let mut used = 0u64;
        for layer in self.layer_blobs()? {
            let mut budget =
                Budget::open(&self.store, &layer.digest, layer.size, used, limits, None)?;
            io::copy(&mut budget.reader, &mut io::sink())
                .map_err(|e| budget.error(e, &self.store.blob_path(&layer.digest)))?;
            used += budget.reader.read;
        }
        Ok(())
    }

    /// The root image of only the bottom `count` layers: what a snapshot's
    /// own layers are stacked on. An erofs layer alone is its own root
    /// image.
    pub fn rootfs_prefix(&self, count: usize) -> Result<PathBuf> {
        self.build_rootfs::<Vec<u8>>(count, Vec::new())
    }

    /// Whether [`Image::rootfs`] is already built.
    pub(crate) fn has_rootfs(&self) -> Result<bool> {
        Ok(self
            .store
            .rootfs_path(&rootfs_key(&self.layers()?))
            .is_file())
    }

    /// Builds [`Image::rootfs`] while its layers download: layer `i` is
    /// read from `streams[i]` when that is `Some`, else from the store.
    pub(crate) fn stream_rootfs<B: AsRef<[u8]> + Send>(
        &self,
        streams: Vec<Option<LayerStream<B>>>,
    ) -> Result<PathBuf> {
        self.build_rootfs(self.manifest.layers().len(), streams)
    }

    fn build_rootfs<B: AsRef<[u8]> + Send>(
        &self,
        count: usize,
        streams: Vec<Option<LayerStream<B>>>,
    ) -> Result<PathBuf> {
        let layers = self.layer_blobs()?;
        let layers = &layers[..count.min(layers.len())];
        if let [only] = layers {
            if only.erofs {
                return Ok(self.store.blob_path(&only.digest));
            }
        }
        let digests: Vec<Digest> = layers.iter().map(|l| l.digest.clone()).collect();
        let path = self.store.rootfs_path(&rootfs_key(&digests));
        let diff_ids = self.config.rootfs().diff_ids();
        build_erofs_from(
            &self.store,
            &path,
            layers,
            diff_ids,
            Whiteouts::Apply,
            &self.limits,
            streams,
        )?;
        Ok(path)
    }
}

/// Bytes `path` takes on disk (0 when it does not exist).
pub(crate) fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// A layer's uncompressed stream, cut off where `limits` say it must end.
struct Budget<'a> {
    reader: Limited<Box<dyn Read + Send + 'a>>,
    layer: Digest,
    compressed: u64,
    why: &'static str,
}

impl<'a> Budget<'a> {
    fn open(
        store: &Store,
        layer: &Digest,
        compressed: u64,
        used: u64,
        limits: &UnpackLimits,
        ahead: Option<&'a Scope<'a, '_>>,
    ) -> Result<Budget<'a>> {
        let blob = store.blob_path(layer);
        let file = File::open(&blob).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::MissingBlob(layer.to_string()),
            _ => Error::io("open", &blob)(e),
        })?;
        let input = BufReader::with_capacity(1 << 20, file);
        Budget::new(input, layer, compressed, used, limits, ahead)
    }

    /// The budget of a layer whose (compressed) blob is read from `input`,
    /// decompressed on a thread of `ahead` if given.
    fn new(
        input: impl io::BufRead + Send + 'a,
        layer: &Digest,
        compressed: u64,
        used: u64,
        limits: &UnpackLimits,
        ahead: Option<&'a Scope<'a, '_>>,
    ) -> Result<Budget<'a>> {
        let (limit, why) = limits.for_layer(compressed, used);
        let mut reader = decompress(input)?;
        if let Some(scope) = ahead {
            reader = Box::new(ReadAhead::spawn(scope, reader));
        }
        Ok(Budget {
            reader: Limited::new(reader, limit),
            layer: layer.clone(),
            compressed,
            why,
        })
    }

    fn exceeded(&self) -> bool {
        self.reader.read > self.reader.limit
    }

    /// What a read failure means: the layer is too large once the limit
    /// was passed, whatever the unpacker made of the cut-off stream.
    fn error(&self, e: io::Error, blob: &std::path::Path) -> Error {
        if self.exceeded() {
            self.too_large()
        } else {
            Error::io("read layer", blob)(e)
        }
    }

    fn too_large(&self) -> Error {
        Error::LayerTooLarge {
            layer: self.layer.to_string(),
            compressed: self.compressed,
            limit: self.reader.limit,
            why: self.why,
        }
    }
}

/// A layer blob to build a root image from.
#[derive(Debug, Clone)]
pub(crate) struct LayerBlob {
    pub(crate) digest: Digest,
    /// Its size in the store (compressed, for a tarball).
    pub(crate) size: u64,
    /// An erofs root image rather than a tarball.
    pub(crate) erofs: bool,
}

/// Builds the erofs image of `layers` (bottom first) at `path` unless it
/// exists, verifying each tar layer's uncompressed digest against
/// `diff_ids`. An erofs layer may only be the bottom one; its files are
/// copied from it as they are (the store verified its digest).
pub(crate) fn build_erofs(
    store: &Store,
    path: &std::path::Path,
    layers: &[LayerBlob],
    diff_ids: &[String],
    whiteouts: Whiteouts,
    limits: &UnpackLimits,
) -> Result<()> {
    let streams: Vec<Option<LayerStream<Vec<u8>>>> = Vec::new();
    build_erofs_from(store, path, layers, diff_ids, whiteouts, limits, streams)
}

/// [`build_erofs`], reading tar layer `i` from `streams[i]` where that is
/// `Some` (as it downloads) rather than from the store. The image is
/// published only after every stream ended verified.
fn build_erofs_from<B: AsRef<[u8]> + Send>(
    store: &Store,
    path: &std::path::Path,
    layers: &[LayerBlob],
    diff_ids: &[String],
    whiteouts: Whiteouts,
    limits: &UnpackLimits,
    mut streams: Vec<Option<LayerStream<B>>>,
) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    let mut temp = store.temp()?;
    let temp_path = temp.path.clone();
    let out = BufWriter::with_capacity(
        1 << 20,
        Writeback::new(
            temp.file()
                .try_clone()
                .map_err(Error::io("open", &temp_path))?,
        ),
    );
    let mut builder = Builder::new(out).map_err(Error::io("write", &temp_path))?;
    let mut tree = Tree::new(Metadata {
        mode: 0o755,
        ..Default::default()
    });
    let mut used = 0u64;
    for (i, layer) in layers.iter().enumerate() {
        let blob = store.blob_path(&layer.digest);
        if layer.erofs {
            if i > 0 {
                return Err(Error::BadDocument(format!(
                    "erofs layer {} is not the image's bottom layer",
                    layer.digest
                )));
            }
            tree = erofs_layer::copy_into(&blob, &mut builder)?;
            continue;
        }
        let mut stream = streams.get_mut(i).and_then(Option::take);
        let (read, hasher) = std::thread::scope(|scope| {
            let (layer, size) = (&layer.digest, layer.size);
            let mut budget = match &mut stream {
                Some(s) => Budget::new(s, layer, size, used, limits, Some(scope))?,
                None => Budget::open(store, layer, size, used, limits, Some(scope))?,
            };
            let mut hashing = Hashing::new(&mut budget.reader);
            let applied = apply_layer_with(&mut tree, &mut builder, &mut hashing, whiteouts);
            // The diff id covers the whole tar stream, padding included.
            let tail = applied.map_err(Error::from).and_then(|()| {
                io::copy(&mut hashing, &mut io::sink())
                    .map(drop)
                    .map_err(Error::io("read layer", &blob))
            });
            let hasher = hashing.hasher;
            if budget.exceeded() {
                return Err(budget.too_large());
            }
            tail?;
            Ok((budget.reader.read, hasher))
        })?;
        used += read;
        if let Some(s) = &mut stream {
            s.wait_verified().map_err(Error::io("read layer", &blob))?;
        }
        let actual = hasher.finalize();
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
    key.finalize().hex()[..32].to_string()
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::BadDocument(format!("{what}: {e}")))
}

/// A layer's uncompressed stream, by its magic bytes: gzip, zstd or plain.
fn decompress<'a>(mut r: impl io::BufRead + Send + 'a) -> Result<Box<dyn Read + Send + 'a>> {
    let head = r.fill_buf().map_err(Error::io("read", "layer"))?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(crate::gunzip::Gunzip::new(r))
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

/// Bytes written between two starts of writeback.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// A file that starts the writeback of what was written to it every
/// [`WRITEBACK_EVERY`] bytes, so the sync before publishing waits only for
/// the last few megabytes rather than the whole root image.
struct Writeback {
    file: File,
    unstarted: u64,
}

impl Writeback {
    fn new(file: File) -> Self {
        Writeback { file, unstarted: 0 }
    }
}

impl io::Write for Writeback {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unstarted += n as u64;
        if self.unstarted >= WRITEBACK_EVERY {
            self.unstarted = 0;
            use std::os::fd::AsRawFd;
            // SAFETY: a valid descriptor; offset 0 and length 0 ask for
            // the whole file. Only a hint: a failure is not an error (the
            // sync before publishing reports real ones).
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
            };
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl io::Seek for Writeback {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}
