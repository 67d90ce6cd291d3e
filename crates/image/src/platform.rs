//! Platforms (`os/arch[/variant]`) and choosing one from an index.

use std::fmt;
use std::str::FromStr;

use oci_spec::image::Descriptor;

use crate::{Error, Result};

/// An OS, CPU architecture and optional variant, as OCI names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = Error;

    fn from_str(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &&str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(Error::BadPlatform(s.to_string())),
        }
    }
}

/// The platform guests run on here: Linux on the host's architecture.
pub fn host_platform() -> Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    Platform {
        os: "linux".into(),
        architecture: architecture.into(),
        variant: None,
    }
}

/// The entry of `manifests` for `wanted`. A wanted variant must match; with
/// none wanted, any variant of the architecture does.
pub(crate) fn select<'a>(
    manifests: &'a [Descriptor],
    wanted: &Platform,
    reference: &str,
) -> Result<&'a Descriptor> {
    manifests
        .iter()
        .find(|d| {
            d.platform().as_ref().is_some_and(|p| {
                p.os().to_string() == wanted.os
                    && p.architecture().to_string() == wanted.architecture
                    && (wanted.variant.is_none()
                        || p.variant().as_deref() == wanted.variant.as_deref())
            })
        })
        .ok_or_else(|| Error::NoPlatform {
            reference: reference.to_string(),
            wanted: wanted.to_string(),
            available: manifests
                .iter()
                .filter_map(|d| d.platform().as_ref())
                .map(|p| {
                    let mut s = format!("{}/{}", p.os(), p.architecture());
                    if let Some(v) = p.variant() {
                        s = format!("{s}/{v}");
                    }
                    s
                })
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!("linux/amd64".parse::<Platform>().unwrap().variant, None);
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }

    #[test]
    fn selects_by_platform_and_lists_what_exists() {
        let index: oci_spec::image::ImageIndex = serde_json::from_str(r#"{"schemaVersion":2,"manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1,"platform":{"os":"linux","architecture":"amd64"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":1,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}}]}"#).unwrap();
        let m = index.manifests();
        assert!(select(m, &"linux/amd64".parse().unwrap(), "x")
            .unwrap()
            .digest()
            .to_string()
            .contains("1111"));
        assert!(select(m, &"linux/arm64".parse().unwrap(), "x")
            .unwrap()
            .digest()
            .to_string()
            .contains("2222"));
        assert!(select(m, &"linux/arm64/v8".parse().unwrap(), "x").is_ok());
        let err = select(m, &"linux/riscv64".parse().unwrap(), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("linux/amd64, linux/arm64/v8"), "{err}");
    }
}
