//! The parts of an image's configuration that decide how it runs.

use std::collections::BTreeMap;

use oci_spec::image::ImageConfiguration;

/// How an image wants to be run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub user: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl ImageConfig {
    pub(crate) fn from_oci(c: &ImageConfiguration) -> ImageConfig {
        let mut out = ImageConfig {
            architecture: c.architecture().to_string(),
            os: c.os().to_string(),
            ..Default::default()
        };
        if let Some(cfg) = c.config() {
            out.env = cfg.env().clone().unwrap_or_default();
            out.working_dir = cfg.working_dir().clone().filter(|d| !d.is_empty());
            out.entrypoint = cfg.entrypoint().clone().unwrap_or_default();
            out.cmd = cfg.cmd().clone().unwrap_or_default();
            out.user = cfg.user().clone().filter(|u| !u.is_empty());
            out.labels = cfg
                .labels()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect();
        }
        out
    }

    /// The argv of the image's entrypoint command: `Entrypoint + args`, or
    /// `Entrypoint + Cmd` when `args` is empty.
    pub fn entrypoint_argv(&self, args: &[String]) -> Vec<String> {
        let tail = if args.is_empty() { &self.cmd } else { args };
        self.entrypoint.iter().chain(tail).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_style_configs_and_builds_entrypoint_argv() {
        let json = r#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"],"Entrypoint":["/bin/echo","x"],"Cmd":["dflt"],"WorkingDir":"/w","User":"alice","Labels":{"k":"v"}},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let c = ImageConfig::from_oci(&serde_json::from_str(json).unwrap());
        assert_eq!((c.architecture.as_str(), c.os.as_str()), ("amd64", "linux"));
        assert_eq!(c.env, ["A=1"]);
        assert_eq!(c.working_dir.as_deref(), Some("/w"));
        assert_eq!(c.user.as_deref(), Some("alice"));
        assert_eq!(c.labels["k"], "v");
        assert_eq!(c.entrypoint_argv(&[]), ["/bin/echo", "x", "dflt"]);
        assert_eq!(c.entrypoint_argv(&["a".into()]), ["/bin/echo", "x", "a"]);
    }
}
