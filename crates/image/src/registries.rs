//! `containers-registries.conf` (version 2): the registry configuration
//! users of podman, skopeo and buildah already have.
//!
//! Honoured: `unqualified-search-registries`, `[aliases]`, and `[[registry]]`
//! tables with `prefix` (longest match wins, `*.example.com` wildcards),
//! `location`, `insecure`, `blocked`, `mirror-by-digest-only` and
//! `[[registry.mirror]]` (`location`, `insecure`, `pull-from-mirror`).
//! Ignored: `short-name-mode` (short names are never prompted for: every
//! search registry is tried in order, as in `permissive` mode without a
//! terminal), `credential-helpers` and any other key, so files written for
//! newer versions keep working. The version 1 format is refused.
//!
//! Parsing is pure ([`parse`]); [`load`] finds and reads the files.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;
use serde::Deserialize;
use toml::Spanned;

use crate::{Error, Result};

/// Names a registries.conf to use instead of the default files.
pub(crate) const ENV: &str = "CC_REGISTRIES_CONF";
/// The variable containers' own tools read for the same purpose.
const CONTAINERS_ENV: &str = "CONTAINERS_REGISTRIES_CONF";
const SYSTEM_FILE: &str = "/etc/containers/registries.conf";

/// The merged configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RegistriesConf {
    /// `unqualified-search-registries`; `None` when no file sets it (short
    /// names then mean Docker Hub, as without any file).
    pub search: Option<Vec<String>>,
    /// Where `search` was set, for messages.
    pub search_origin: String,
    /// `[aliases]`: short name → fully qualified repository.
    pub aliases: BTreeMap<String, String>,
    pub registries: Vec<RegistryConf>,
}

/// One `[[registry]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RegistryConf {
    pub prefix: String,
    /// Empty for a wildcard prefix without one: the name is not rewritten.
    pub location: String,
    pub insecure: bool,
    pub blocked: bool,
    pub mirrors: Vec<MirrorConf>,
    /// The file that defined it, for messages.
    pub origin: String,
}

/// One `[[registry.mirror]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MirrorConf {
    pub location: String,
    pub insecure: bool,
    pub pull_from: PullFrom,
}

/// `pull-from-mirror`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum PullFrom {
    #[default]
    All,
    DigestOnly,
    TagOnly,
}

/// A place to pull a fully qualified reference from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    /// The reference to ask for there.
    pub reference: String,
    /// Plain HTTP (and unverified TLS) allowed.
    pub insecure: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawFile {
    unqualified_search_registries: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    aliases: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    registry: Vec<Spanned<RawRegistry>>,
    /// Only to refuse the version 1 format.
    registries: Option<Spanned<IgnoredAny>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawRegistry {
    prefix: Option<Spanned<String>>,
    location: Option<Spanned<String>>,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    blocked: bool,
    #[serde(default)]
    mirror_by_digest_only: bool,
    #[serde(default)]
    mirror: Vec<RawMirror>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawMirror {
    location: Spanned<String>,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    pull_from_mirror: Option<PullFrom>,
}

/// Parses one file's TEXT; PATH names it in errors (with the line).
pub(crate) fn parse(text: &str, path: &Path) -> Result<RegistriesConf> {
    let origin = path.display().to_string();
    let error = |span: Option<std::ops::Range<usize>>, message: String| Error::RegistriesConf {
        path: origin.clone(),
        line: span.map(|s| line_of(text, s.start)),
        message,
    };
    let raw: RawFile =
        toml::from_str(text).map_err(|e| error(e.span(), e.message().trim().to_string()))?;
    if let Some(v1) = raw.registries {
        return Err(error(
            Some(v1.span()),
            "the version 1 format ([registries.*]) is not supported; use version 2".into(),
        ));
    }
    let mut conf = RegistriesConf::default();
    if let Some(search) = raw.unqualified_search_registries {
        let span = search.span();
        for host in search.get_ref() {
            if host.is_empty() || host.contains('/') || host.contains("://") {
                return Err(error(
                    Some(span),
                    format!("unqualified-search-registries: {host:?} is not a host[:port]"),
                ));
            }
        }
        conf.search = Some(search.into_inner());
        conf.search_origin = origin.clone();
    }
    for (name, value) in raw.aliases {
        if !is_short(&name) || name.contains([':', '@']) {
            return Err(error(
                Some(value.span()),
                format!("alias {name:?} is not a short name without tag or digest"),
            ));
        }
        // An empty value erases an alias of an earlier file.
        conf.aliases.insert(name, value.into_inner());
    }
    for entry in raw.registry {
        let span = entry.span();
        let raw = entry.into_inner();
        let location = raw
            .location
            .map(|l| host_path(l, &error))
            .transpose()?
            .filter(|l| !l.is_empty());
        let prefix = match raw.prefix {
            Some(p) => host_path(p, &error)?,
            None => location.clone().ok_or_else(|| {
                error(
                    Some(span.clone()),
                    "[[registry]] has neither prefix nor location".into(),
                )
            })?,
        };
        let wildcard_ok = |p: &str| {
            p.strip_prefix("*.")
                .is_some_and(|d| !d.is_empty() && !d.contains(['*', '/', ':']))
        };
        if prefix.contains('*') && !wildcard_ok(&prefix) {
            return Err(error(
                Some(span),
                format!("prefix {prefix:?}: a wildcard prefix is *.domain, nothing more"),
            ));
        }
        if conf.registries.iter().any(|r| r.prefix == prefix) {
            return Err(error(
                Some(span),
                format!("prefix {prefix:?} is defined twice"),
            ));
        }
        let mut mirrors = Vec::new();
        for m in raw.mirror {
            if raw.mirror_by_digest_only && m.pull_from_mirror.is_some() {
                return Err(error(
                    Some(m.location.span()),
                    "pull-from-mirror is not allowed with mirror-by-digest-only".into(),
                ));
            }
            let pull_from = match raw.mirror_by_digest_only {
                true => PullFrom::DigestOnly,
                false => m.pull_from_mirror.unwrap_or_default(),
            };
            mirrors.push(MirrorConf {
                location: host_path(m.location, &error)?,
                insecure: m.insecure,
                pull_from,
            });
        }
        let location = match location {
            Some(l) => l,
            None if prefix.starts_with("*.") => String::new(),
            None => prefix.clone(),
        };
        conf.registries.push(RegistryConf {
            prefix,
            location,
            insecure: raw.insecure,
            blocked: raw.blocked,
            mirrors,
            origin: origin.clone(),
        });
    }
    Ok(conf)
}

/// A `location` or `prefix` value without a trailing slash; a URL scheme is
/// an error (HTTP is chosen with `insecure`).
fn host_path(
    value: Spanned<String>,
    error: &impl Fn(Option<std::ops::Range<usize>>, String) -> Error,
) -> Result<String> {
    let span = value.span();
    let text = value.into_inner();
    if text.contains("://") {
        return Err(error(
            Some(span),
            format!("{text:?}: no scheme here (set insecure = true for plain HTTP)"),
        ));
    }
    Ok(text.trim_end_matches('/').to_string())
}

/// The 1-based line of byte OFFSET in TEXT.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Whether NAME has no registry host: its first component has no `.` or
/// `:`, is not `localhost` and is lowercase (Docker's rule).
pub(crate) fn is_short(name: &str) -> bool {
    match name.split_once('/') {
        None => true,
        Some((first, _)) => {
            !first.contains(['.', ':']) && first != "localhost" && first.to_lowercase() == first
        }
    }
}

impl RegistriesConf {
    /// Layers a later file (a drop-in) over this one: it replaces the search
    /// list if it sets one, aliases by name, registries by prefix.
    pub fn merge(&mut self, later: RegistriesConf) {
        if later.search.is_some() {
            self.search = later.search;
            self.search_origin = later.search_origin;
        }
        for (name, value) in later.aliases {
            self.aliases.insert(name, value);
        }
        for reg in later.registries {
            match self.registries.iter_mut().find(|r| r.prefix == reg.prefix) {
                Some(slot) => *slot = reg,
                None => self.registries.push(reg),
            }
        }
        self.aliases.retain(|_, v| !v.is_empty());
    }

    /// The names a user-given NAME may stand for, in the order to try them:
    /// itself when qualified; else its alias, or each search registry's
    /// `registry/NAME`; else (no search list anywhere) NAME as is, which
    /// the reference parser puts on Docker Hub.
    pub fn candidates(&self, name: &str) -> Result<Vec<String>> {
        if !is_short(name) {
            return Ok(vec![name.to_string()]);
        }
        let cut = name.find(['@', ':']).unwrap_or(name.len());
        if let Some(alias) = self.aliases.get(&name[..cut]).filter(|a| !a.is_empty()) {
            return Ok(vec![format!("{alias}{}", &name[cut..])]);
        }
        match &self.search {
            None => Ok(vec![name.to_string()]),
            Some(list) if list.is_empty() => Err(Error::RegistriesConf {
                path: self.search_origin.clone(),
                line: None,
                message: format!(
                    "unqualified-search-registries is empty, so the short name {name:?} names no registry"
                ),
            }),
            Some(list) => Ok(list.iter().map(|host| format!("{host}/{name}")).collect()),
        }
    }

    /// The `[[registry]]` whose prefix matches the fully qualified
    /// REFERENCE longest, with the length of the matched part.
    fn find(&self, reference: &str) -> Option<(&RegistryConf, usize)> {
        self.registries
            .iter()
            .filter_map(|r| prefix_match(reference, &r.prefix).map(|n| (r, n)))
            .max_by_key(|&(_, n)| n)
    }

    /// Where to pull the fully qualified REFERENCE from, in order: its
    /// registry's mirrors that apply, then the registry's location.
    pub fn sources(&self, reference: &str, by_digest: bool) -> Result<Vec<Source>> {
        let Some((reg, matched)) = self.find(reference) else {
            return Ok(vec![Source {
                reference: reference.to_string(),
                insecure: false,
            }]);
        };
        if reg.blocked {
            return Err(Error::Blocked {
                reference: reference.to_string(),
                prefix: reg.prefix.clone(),
                path: reg.origin.clone(),
            });
        }
        let rest = &reference[matched..];
        let mut out: Vec<Source> = reg
            .mirrors
            .iter()
            .filter(|m| match m.pull_from {
                PullFrom::All => true,
                PullFrom::DigestOnly => by_digest,
                PullFrom::TagOnly => !by_digest,
            })
            .map(|m| Source {
                reference: format!("{}{rest}", m.location),
                insecure: m.insecure,
            })
            .collect();
        let primary = match reg.location.as_str() {
            "" => reference.to_string(),
            location => format!("{location}{rest}"),
        };
        out.push(Source {
            reference: primary,
            insecure: reg.insecure,
        });
        Ok(out)
    }
}

/// How much of REFERENCE the registries.conf PREFIX matches: all of the
/// prefix, ending where the reference ends or at `/`, `:` or `@`; a
/// `*.domain` prefix matches any subdomain of the host.
fn prefix_match(reference: &str, prefix: &str) -> Option<usize> {
    let boundary = |n: usize| {
        (n == reference.len() || matches!(reference.as_bytes()[n], b'/' | b':' | b'@')).then_some(n)
    };
    match prefix.strip_prefix('*') {
        Some(suffix) => {
            let host_end = reference.find('/').unwrap_or(reference.len());
            let at = reference[..host_end].rfind(suffix)?;
            // The domain must end the host name (a port may follow).
            boundary(at + suffix.len()).filter(|&n| n <= host_end && at > 0)
        }
        None => reference
            .starts_with(prefix)
            .then(|| boundary(prefix.len()))
            .flatten(),
    }
}

/// Reads the configuration: EXPLICIT, else the file `$CC_REGISTRIES_CONF`
/// or `$CONTAINERS_REGISTRIES_CONF` names (alone), else containers' files:
/// `~/.config/containers/registries.conf` and its `registries.conf.d` if
/// that file exists, else `/etc/containers/registries.conf`, then the
/// drop-ins in `/etc/containers/registries.conf.d` and the user's. Missing
/// default files are no configuration; a named file must exist.
pub(crate) fn load(explicit: Option<&Path>) -> Result<RegistriesConf> {
    let named = explicit.map(Path::to_path_buf).or_else(|| {
        [ENV, CONTAINERS_ENV]
            .into_iter()
            .filter_map(std::env::var_os)
            .find(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(path) = named {
        let text = fs::read_to_string(&path).map_err(Error::io("read", &path))?;
        return parse(&text, &path);
    }
    let config_home = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")));
    load_default(Path::new(SYSTEM_FILE), config_home.as_deref())
}

/// containers' files: CONFIG_HOME's `containers/registries.conf` and its
/// drop-ins if that file exists, else SYSTEM and its drop-ins, then the
/// user's drop-ins.
fn load_default(system: &Path, config_home: Option<&Path>) -> Result<RegistriesConf> {
    let user = config_home.map(|h| h.join("containers/registries.conf"));
    let user_dir = user.as_ref().map(|u| u.with_extension("conf.d"));
    let (file, dirs) = match &user {
        Some(u) if u.exists() => (u.clone(), vec![user_dir]),
        _ => (
            system.to_path_buf(),
            vec![Some(system.with_extension("conf.d")), user_dir],
        ),
    };
    let mut conf = read_optional(&file)?.unwrap_or_default();
    for dir in dirs.into_iter().flatten() {
        let mut files: Vec<PathBuf> = match fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "conf"))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("read", &dir)(e)),
        };
        files.sort();
        for f in files {
            if let Some(drop_in) = read_optional(&f)? {
                conf.merge(drop_in);
            }
        }
    }
    Ok(conf)
}

fn read_optional(path: &Path) -> Result<Option<RegistriesConf>> {
    match fs::read_to_string(path) {
        Ok(text) => parse(&text, path).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> RegistriesConf {
        parse(text, Path::new("/t/registries.conf")).unwrap()
    }

    fn refs(conf: &RegistriesConf, reference: &str, by_digest: bool) -> Vec<(String, bool)> {
        conf.sources(reference, by_digest)
            .unwrap()
            .into_iter()
            .map(|s| (s.reference, s.insecure))
            .collect()
    }

    #[test]
    fn longest_prefix_wins_at_a_boundary() {
        let c = conf(
            r#"
[[registry]]
prefix = "example.com"
location = "a.test"
[[registry]]
prefix = "example.com/foo"
location = "b.test/bar"
[[registry]]
location = "example.com/foo/baz:1"
insecure = true
"#,
        );
        let one = |r: &str| refs(&c, r, false).pop().unwrap();
        assert_eq!(one("example.com/x:1"), ("a.test/x:1".into(), false));
        assert_eq!(one("example.com/foo/x:1"), ("b.test/bar/x:1".into(), false));
        assert_eq!(
            one("example.com/foo/baz:1"),
            ("example.com/foo/baz:1".into(), true)
        );
        // Not at a component boundary: the shorter prefix applies.
        assert_eq!(
            one("example.com/foobar/x:1"),
            ("a.test/foobar/x:1".into(), false)
        );
        assert_eq!(one("example.com:5000/x:1").0, "a.test:5000/x:1");
        // No match: unchanged.
        assert_eq!(one("example.community/x:1").0, "example.community/x:1");
        assert_eq!(one("other.test/x@sha256:00").0, "other.test/x@sha256:00");
    }

    #[test]
    fn wildcard_prefixes_match_subdomains_only() {
        let c = conf(
            r#"
[[registry]]
prefix = "*.example.com"
insecure = true
[[registry.mirror]]
location = "mirror.test"
[[registry]]
prefix = "*.internal.example.com"
blocked = true
"#,
        );
        assert_eq!(
            refs(&c, "a.example.com/x:1", false),
            [
                ("mirror.test/x:1".into(), false),
                ("a.example.com/x:1".into(), true)
            ]
        );
        assert_eq!(
            refs(&c, "a.b.example.com:5000/x:1", false)[1],
            ("a.b.example.com:5000/x:1".into(), true)
        );
        assert_eq!(
            refs(&c, "example.com/x:1", false),
            [("example.com/x:1".into(), false)]
        );
        assert_eq!(
            refs(&c, "aexample.com/x:1", false),
            [("aexample.com/x:1".into(), false)]
        );
        assert_eq!(
            refs(&c, "x.test/a.example.com/x:1", false),
            [("x.test/a.example.com/x:1".into(), false)]
        );
        // The longer wildcard wins.
        assert!(matches!(
            c.sources("r.internal.example.com/x:1", false),
            Err(Error::Blocked { .. })
        ));
    }

    #[test]
    fn mirrors_in_order_then_the_location() {
        let c = conf(
            r#"
[[registry]]
prefix = "docker.io/library"
location = "canonical.test/lib"
[[registry.mirror]]
location = "m1.test/cache/"
[[registry.mirror]]
location = "m2.test"
insecure = true
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "m3.test"
pull-from-mirror = "tag-only"
"#,
        );
        assert_eq!(
            refs(&c, "docker.io/library/alpine:3", false),
            [
                ("m1.test/cache/alpine:3".into(), false),
                ("m3.test/alpine:3".into(), false),
                ("canonical.test/lib/alpine:3".into(), false),
            ]
        );
        assert_eq!(
            refs(&c, "docker.io/library/alpine@sha256:ab", true),
            [
                ("m1.test/cache/alpine@sha256:ab".into(), false),
                ("m2.test/alpine@sha256:ab".into(), true),
                ("canonical.test/lib/alpine@sha256:ab".into(), false),
            ]
        );
        let digest_only = conf(
            "[[registry]]\nlocation = \"r.test\"\nmirror-by-digest-only = true\n[[registry.mirror]]\nlocation = \"m.test\"\n",
        );
        assert_eq!(
            refs(&digest_only, "r.test/x:1", false),
            [("r.test/x:1".into(), false)]
        );
        assert_eq!(refs(&digest_only, "r.test/x@sha256:ab", true).len(), 2);
    }

    #[test]
    fn blocked_names_its_file() {
        let c = conf("[[registry]]\nprefix = \"bad.test\"\nblocked = true\n");
        let err = c.sources("bad.test/x:1", false).unwrap_err();
        assert!(
            matches!(&err, Error::Blocked { prefix, .. } if prefix == "bad.test"),
            "{err}"
        );
        assert!(err.to_string().contains("/t/registries.conf"), "{err}");
        assert!(c.sources("good.test/x:1", false).is_ok());
    }

    #[test]
    fn short_names_use_aliases_then_search_registries() {
        let none = conf("");
        assert_eq!(none.candidates("alpine").unwrap(), ["alpine"]);
        let c = conf(
            "unqualified-search-registries = [\"a.test\", \"b.test:5000\"]\n[aliases]\n\"busybox\" = \"c.test/lib/busybox\"\n",
        );
        assert_eq!(
            c.candidates("alpine:3").unwrap(),
            ["a.test/alpine:3", "b.test:5000/alpine:3"]
        );
        assert_eq!(c.candidates("busybox:1").unwrap(), ["c.test/lib/busybox:1"]);
        assert_eq!(c.candidates("x.test/alpine").unwrap(), ["x.test/alpine"]);
        assert_eq!(
            c.candidates("localhost/alpine").unwrap(),
            ["localhost/alpine"]
        );
        assert_eq!(
            c.candidates("user/app").unwrap(),
            ["a.test/user/app", "b.test:5000/user/app"]
        );
        let empty = conf("unqualified-search-registries = []");
        let err = empty.candidates("alpine").unwrap_err();
        assert!(
            err.to_string().contains("unqualified-search-registries"),
            "{err}"
        );
        assert!(is_short("alpine@sha256:00") && !is_short("Host/x") && !is_short("h:1/x"));
    }

    #[test]
    fn drop_ins_override_by_prefix() {
        let mut c = conf(
            "unqualified-search-registries = [\"a.test\"]\n[aliases]\n\"x\" = \"a.test/x\"\n[[registry]]\nlocation = \"a.test\"\n[[registry]]\nlocation = \"b.test\"\n",
        );
        c.merge(conf(
            "[aliases]\n\"x\" = \"\"\n[[registry]]\nlocation = \"a.test\"\nblocked = true\n",
        ));
        assert_eq!(c.search.as_deref(), Some(&["a.test".to_string()][..]));
        assert!(c.aliases.is_empty());
        assert_eq!(c.registries.len(), 2);
        assert!(c.registries[0].blocked);
    }

    #[test]
    fn the_user_file_replaces_the_system_files() {
        let root = std::env::temp_dir().join(format!("cc-registries-conf-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let system = root.join("etc/registries.conf");
        let home = root.join("home");
        let write = |path: &Path, text: &str| {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        };
        let etc = root.join("etc/registries.conf.d");
        for (path, text) in [
            (
                system.clone(),
                "unqualified-search-registries = [\"system.test\"]\n",
            ),
            (
                etc.join("10-a.conf"),
                "[[registry]]\nlocation = \"a.test\"\n",
            ),
            (
                etc.join("20-b.conf"),
                "[[registry]]\nlocation = \"a.test\"\nblocked = true\n",
            ),
            (etc.join("ignored.txt"), "not toml ["),
            (
                home.join("containers/registries.conf.d/x.conf"),
                "unqualified-search-registries = [\"drop-in.test\"]\n",
            ),
        ] {
            write(&path, text);
        }
        // No user file: the system file, its drop-ins in name order, the user's.
        let c = load_default(&system, Some(&home)).unwrap();
        assert_eq!(c.search, Some(vec!["drop-in.test".to_string()]));
        assert_eq!(c.registries.len(), 1);
        assert!(c.registries[0].blocked);
        assert!(c.registries[0].origin.ends_with("20-b.conf"));
        // A user file: the system files are not read at all.
        write(
            &home.join("containers/registries.conf"),
            "unqualified-search-registries = [\"user.test\"]\n",
        );
        let c = load_default(&system, Some(&home)).unwrap();
        assert_eq!(c.search, Some(vec!["drop-in.test".to_string()]));
        assert!(c.registries.is_empty());
        fs::remove_file(home.join("containers/registries.conf.d/x.conf")).unwrap();
        let c = load_default(&system, Some(&home)).unwrap();
        assert_eq!(c.search, Some(vec!["user.test".to_string()]));
        // No files at all: no configuration.
        assert_eq!(
            load_default(&root.join("none"), None).unwrap(),
            RegistriesConf::default()
        );
        // A malformed drop-in is an error naming it.
        write(
            &root.join("etc/registries.conf.d/30-bad.conf"),
            "[[registry]\n",
        );
        fs::remove_file(home.join("containers/registries.conf")).unwrap();
        let err = load_default(&system, Some(&home)).unwrap_err();
        assert!(err.to_string().contains("30-bad.conf line 1"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let c = conf(
            "short-name-mode = \"enforcing\"\ncredential-helpers = [\"x\"]\n[[registry]]\nlocation = \"a.test\"\nfuture-key = 1\n",
        );
        assert_eq!(c.registries.len(), 1);
    }

    fn bad(text: &str) -> (Option<usize>, String) {
        match parse(text, Path::new("/etc/x/registries.conf")) {
            Err(Error::RegistriesConf {
                path,
                line,
                message,
            }) => {
                assert_eq!(path, "/etc/x/registries.conf");
                (line, message)
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn malformed_files_name_the_line() {
        assert_eq!(bad("\n\n[[registry]\nlocation = \"a\"\n").0, Some(3));
        let (line, message) = bad("[[registry]]\nlocation = \"a.test\"\ninsecure = \"yes\"\n");
        assert_eq!(line, Some(3));
        assert!(message.contains("bool"), "{message}");
        assert_eq!(
            bad("unqualified-search-registries = \"a.test\"\n").0,
            Some(1)
        );
        assert_eq!(bad("[[registry]]\ninsecure = true\n").0, Some(1));
        assert_eq!(
            bad("[[registry]]\nlocation = \"a\"\n[[registry.mirror]]\nlocation = \"m\"\npull-from-mirror = \"sometimes\"\n").0,
            Some(5)
        );
        assert_eq!(
            bad("[[registry]]\nlocation = \"https://a.test\"\n").0,
            Some(2)
        );
        assert_eq!(bad("[[registry]]\nprefix = \"a.*.test\"\n").0, Some(1));
        assert_eq!(bad("[[registry]]\nprefix = \"*.test/x\"\n").0, Some(1));
        assert_eq!(
            bad("[[registry]]\nlocation = \"a\"\n[[registry]]\nprefix = \"a\"\n").0,
            Some(3)
        );
        assert_eq!(
            bad("unqualified-search-registries = [\"a/b\"]\n").0,
            Some(1)
        );
        assert_eq!(bad("[aliases]\n\"a.test/x\" = \"b.test/x\"\n").0, Some(2));
        let (line, message) = bad("[registries.search]\nregistries = [\"a\"]\n");
        assert_eq!(line, Some(1));
        assert!(message.contains("version 1"), "{message}");
        // Not TOML at all.
        assert!(bad("\u{0}\u{1}").0.is_some());
    }
}
