//! OCI image layouts (directories and archives) and `docker save` archives,
//! in and out of the store.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::Path;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use serde_json::json;

use crate::erofs_layer;
use crate::error::untrusted;
use crate::image::parse;
use crate::platform::{host_platform, select, Platform};
use crate::store::{HashingWrite, MAX_DOCUMENT};
use crate::{
    normalize_name, CancelToken, Digest, Error, Image, Result, Store, UnpackLimits, TAR_LAYER,
};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const FULL_NAME: &str = "io.containerd.image.name";
const MANIFEST_OCI: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_OCI: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST_LIST_DOCKER: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Where layout blobs come from: a directory, or what an archive already
/// put into the store.
enum BlobSource<'a> {
    Dir(&'a Path, &'a CancelToken),
    Stored,
}

impl BlobSource<'_> {
    fn ensure(&self, store: &Store, d: &Descriptor) -> Result<Digest> {
        let digest: Digest = d.digest().to_string().parse()?;
        if store.has_blob(&digest) {
            return Ok(digest);
        }
        match self {
            BlobSource::Dir(dir, cancel) => {
                let path = dir.join("blobs/sha256").join(digest.hex());
                let file = File::open(&path).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => Error::MissingBlob(digest.to_string()),
                    _ => Error::io("open", &path)(e),
                })?;
                store.write_blob(Some(&digest), file.take(d.size()), |_| {
                    !cancel.is_cancelled()
                })?;
                Ok(digest)
            }
            BlobSource::Stored => Err(Error::MissingBlob(digest.to_string())),
        }
    }
}

/// Loads the image an OCI layout directory holds (the host platform's,
/// when it holds several).
pub(crate) fn load_dir(
    store: &Store,
    dir: &Path,
    platform: Option<&Platform>,
    limits: &UnpackLimits,
    cancel: &CancelToken,
) -> Result<Image> {
    let index_path = dir.join("index.json");
    let index = read_bounded(&index_path)?;
    let (name, digest) = load_index(store, &index, &BlobSource::Dir(dir, cancel), dir, platform)?;
    finish(store, name, digest, limits)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(Error::io("open", path))?;
    let mut bytes = Vec::new();
    file.take(MAX_DOCUMENT + 1)
        .read_to_end(&mut bytes)
        .map_err(Error::io("read", path))?;
    if bytes.len() as u64 > MAX_DOCUMENT {
        return Err(Error::BadDocument(format!(
            "{} is too large",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Names the stored image `digest` as `name`, once its layers unpack
/// within `limits`.
fn finish(
    store: &Store,
    name: Option<String>,
    digest: Digest,
    limits: &UnpackLimits,
) -> Result<Image> {
    let image = Image::open(store, name.clone(), digest.clone())?.with_unpack_limits(*limits);
    image.check_unpack(limits)?;
    if let Some(name) = &name {
        store.set_ref(name, &digest)?;
    }
    Ok(image)
}

fn load_index(
    store: &Store,
    index: &[u8],
    blobs: &BlobSource<'_>,
    origin: &Path,
    platform: Option<&Platform>,
) -> Result<(Option<String>, Digest)> {
    let index: ImageIndex = parse(index, "index.json")?;
    let wanted = platform.cloned().unwrap_or_else(host_platform);
    let entry = match index.manifests().as_slice() {
        [] => return Err(Error::BadDocument("index.json lists no image".into())),
        [only] => only,
        many => select(many, &wanted, &origin.display().to_string())?,
    };
    let name = entry.annotations().as_ref().and_then(|a| {
        a.get(FULL_NAME).cloned().or_else(|| {
            a.get(REF_NAME).map(|tag| match tag.contains(['/', ':']) {
                true => tag.clone(),
                false => format!(
                    "localhost/{}:{tag}",
                    origin
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .unwrap_or("image")
                ),
            })
        })
    });
    let mut digest = blobs.ensure(store, entry)?;
    let media = entry.media_type().to_string();
    if media == INDEX_OCI || media == MANIFEST_LIST_DOCKER {
        let nested: ImageIndex = parse(&store.read_document(&digest)?, "index")?;
        let chosen = select(nested.manifests(), &wanted, &origin.display().to_string())?;
        digest = blobs.ensure(store, chosen)?;
    }
    let manifest: ImageManifest = parse(&store.read_document(&digest)?, "manifest")?;
    blobs.ensure(store, manifest.config())?;
    for layer in manifest.layers() {
        blobs.ensure(store, layer)?;
    }
    let name = name.map(|n| normalize_name(&n)).transpose()?;
    Ok((name, digest))
}

/// Loads an OCI layout archive or a `docker save` archive.
pub(crate) fn load_tar(
    store: &Store,
    path: &Path,
    platform: Option<&Platform>,
    limits: &UnpackLimits,
    cancel: &CancelToken,
) -> Result<Image> {
    let file = File::open(path).map_err(Error::io("open", path))?;
    let mut archive = tar::Archive::new(io::BufReader::new(file));
    let mut documents: HashMap<String, Vec<u8>> = HashMap::new();
    // Archive paths of non-blob files (docker save) and their digests.
    let mut by_path: HashMap<String, (Digest, u64)> = HashMap::new();
    let mut aliases: HashMap<String, String> = HashMap::new();
    for entry in archive.entries().map_err(untrusted("read", path))? {
        let mut entry = entry.map_err(untrusted("read", path))?;
        if cancel.is_cancelled() {
            return Err(Error::Cancelled("load"));
        }
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let name = raw.trim_start_matches("./").to_string();
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            tar::EntryType::Symlink => {
                if let Some(target) = entry.link_name_bytes() {
                    let target = String::from_utf8_lossy(&target).into_owned();
                    let base = Path::new(&name)
                        .parent()
                        .unwrap_or(Path::new(""))
                        .join(target);
                    aliases.insert(name, normalize_archive_path(&base));
                }
                continue;
            }
            _ => continue,
        }
        if matches!(name.as_str(), "index.json" | "manifest.json" | "oci-layout") {
            let mut bytes = Vec::new();
            (&mut entry)
                .take(MAX_DOCUMENT + 1)
                .read_to_end(&mut bytes)
                .map_err(Error::io("read", path))?;
            if bytes.len() as u64 > MAX_DOCUMENT {
                return Err(Error::BadDocument(format!(
                    "{name} in {} is too large",
                    path.display()
                )));
            }
            documents.insert(name, bytes);
        } else if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            let expected: Digest = format!("sha256:{hex}").parse()?;
            let (digest, size) =
                store.write_blob(Some(&expected), &mut entry, |_| !cancel.is_cancelled())?;
            by_path.insert(name, (digest, size));
        } else if name.ends_with(".tar") || name.ends_with(".json") {
            let (digest, size) = store.write_blob(None, &mut entry, |_| !cancel.is_cancelled())?;
            by_path.insert(name, (digest, size));
        }
    }
    if let Some(index) = documents.get("index.json") {
        let (name, digest) = load_index(store, index, &BlobSource::Stored, path, platform)?;
        return finish(store, name, digest, limits);
    }
    let manifest = documents.get("manifest.json").ok_or_else(|| {
        Error::BadDocument(format!(
            "{} is neither an OCI layout archive nor a docker save archive",
            path.display()
        ))
    })?;
    let resolve = |p: &str| -> Result<(Digest, u64)> {
        let p = p.trim_start_matches("./");
        let p = aliases.get(p).map(String::as_str).unwrap_or(p);
        by_path
            .get(p)
            .cloned()
            .ok_or_else(|| Error::MissingBlob(crate::printable(p)))
    };
    let (name, digest) = load_docker_save(store, manifest, resolve)?;
    finish(store, name, digest, limits)
}

fn normalize_archive_path(p: &Path) -> String {
    let mut out: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    out.join("/")
}

/// `docker save`'s `manifest.json`: an OCI manifest is made for its first
/// image from the config and the (uncompressed) layer tars.
fn load_docker_save(
    store: &Store,
    manifest: &[u8],
    resolve: impl Fn(&str) -> Result<(Digest, u64)>,
) -> Result<(Option<String>, Digest)> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        #[serde(default)]
        repo_tags: Option<Vec<String>>,
        layers: Vec<String>,
    }
    let entries: Vec<Entry> = parse(manifest, "manifest.json")?;
    let first = entries
        .first()
        .ok_or_else(|| Error::BadDocument("manifest.json lists no image".into()))?;
    let (config, config_size) = resolve(&first.config)?;
    let mut layers = Vec::new();
    for l in &first.layers {
        let (digest, size) = resolve(l)?;
        layers.push(json!({"mediaType": TAR_LAYER, "digest": digest.to_string(), "size": size}));
    }
    let doc = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_OCI,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": config_size},
        "layers": layers,
    });
    let digest = store
        .put_document(&serde_json::to_vec(&doc).map_err(|e| Error::BadDocument(e.to_string()))?)?;
    let name = first
        .repo_tags
        .as_ref()
        .and_then(|t| t.first())
        .map(|n| normalize_name(n))
        .transpose()?;
    Ok((name, digest))
}

/// Writes `image` as an OCI layout at `dir` (created; must be empty if it
/// exists), readable by `load_dir`, skopeo and other OCI tools.
pub(crate) fn export_dir(store: &Store, image: &Image, dir: &Path) -> Result<()> {
    if dir.exists()
        && fs::read_dir(dir)
            .map_err(Error::io("read", dir))?
            .next()
            .is_some()
    {
        return Err(Error::Io {
            op: "export to".into(),
            path: dir.display().to_string(),
            source: io::Error::new(io::ErrorKind::AlreadyExists, "directory is not empty"),
        });
    }
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(Error::io("create", &blobs))?;
    let manifest = image.manifest();
    let config: Digest = manifest.config().digest().to_string().parse()?;
    // Erofs layers leave the store as tar: (index, digest, size) of each.
    let mut converted = Vec::new();
    for (i, (layer, erofs)) in image
        .layers()?
        .iter()
        .zip(image.erofs_layers()?)
        .enumerate()
    {
        if erofs {
            let (digest, size) = export_erofs_layer(store, layer, &blobs)?;
            converted.push((i, digest, size));
        } else {
            link_or_copy(store, layer, &blobs)?;
        }
    }
    let (manifest_digest, manifest_bytes) = if converted.is_empty() {
        link_or_copy(store, &config, &blobs)?;
        link_or_copy(store, image.digest(), &blobs)?;
        (image.digest().clone(), store.read_document(image.digest())?)
    } else {
        let mut config: serde_json::Value = parse(&store.read_document(&config)?, "config")?;
        let mut doc: serde_json::Value = parse(&store.read_document(image.digest())?, "manifest")?;
        for (i, digest, size) in &converted {
            config["rootfs"]["diff_ids"][*i] = json!(digest.to_string());
            doc["layers"][*i] =
                json!({"mediaType": TAR_LAYER, "digest": digest.to_string(), "size": size});
        }
        let config = write_document(&blobs, &config)?;
        doc["config"]["digest"] = json!(config.0.to_string());
        doc["config"]["size"] = json!(config.1.len());
        write_document(&blobs, &doc)?
    };
    let media = manifest
        .media_type()
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_else(|| MANIFEST_OCI.to_string());
    let mut annotations = serde_json::Map::new();
    if let Some(name) = image.name() {
        let tag = name
            .rsplit_once(':')
            .filter(|(repo, _)| !repo.contains('@'))
            .map(|(_, t)| t)
            .unwrap_or("latest");
        annotations.insert(REF_NAME.into(), tag.into());
        annotations.insert(FULL_NAME.into(), name.into());
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_OCI,
        "manifests": [{
            "mediaType": media,
            "digest": manifest_digest.to_string(),
            "size": manifest_bytes.len(),
            "annotations": annotations,
        }],
    });
    let write = |name: &str, value: &serde_json::Value| {
        let path = dir.join(name);
        fs::write(&path, serde_json::to_vec_pretty(value).unwrap_or_default())
            .map_err(Error::io("write", &path))
    };
    write("oci-layout", &json!({"imageLayoutVersion": "1.0.0"}))?;
    write("index.json", &index)
}

/// Puts the stored blob `digest` in the layout's `blobs`: a hard link where
/// the filesystem allows, else a copy.
fn link_or_copy(store: &Store, digest: &Digest, blobs: &Path) -> Result<()> {
    let from = store.blob_path(digest);
    let to = blobs.join(digest.hex());
    if fs::hard_link(&from, &to).is_err() {
        fs::copy(&from, &to).map_err(Error::io("copy", &from))?;
    }
    Ok(())
}

/// Writes the erofs layer `layer` into `blobs` as a tar layer; returns the
/// tar's digest and size.
fn export_erofs_layer(store: &Store, layer: &Digest, blobs: &Path) -> Result<(Digest, u64)> {
    let temp = blobs.join(format!(".{}.tar", layer.hex()));
    let file = File::create(&temp).map_err(Error::io("create", &temp))?;
    let mut out = HashingWrite::new(io::BufWriter::with_capacity(1 << 20, file));
    if let Err(e) = erofs_layer::write_tar(&store.blob_path(layer), &mut out) {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    let (digest, len) = out.finish();
    let to = blobs.join(digest.hex());
    fs::rename(&temp, &to).map_err(Error::io("rename", &to))?;
    Ok((digest, len))
}

/// Writes a JSON document into `blobs` under its digest; returns both.
fn write_document(blobs: &Path, doc: &serde_json::Value) -> Result<(Digest, Vec<u8>)> {
    let bytes = serde_json::to_vec(doc).map_err(|e| Error::BadDocument(e.to_string()))?;
    let digest = Digest::of(&bytes);
    let path = blobs.join(digest.hex());
    fs::write(&path, &bytes).map_err(Error::io("write", &path))?;
    Ok((digest, bytes))
}
