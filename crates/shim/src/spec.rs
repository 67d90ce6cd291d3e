//! The bundle's `config.json` (an OCI runtime spec) mapped to what one
//! crumblecracker VM runs: the process, the host directories to share, and
//! a refusal naming the field for whatever a VM cannot honour. Pure: the
//! caller reads the file.

use std::path::PathBuf;

use oci_spec::runtime::{Capability, LinuxNamespaceType, Process, Spec};

/// Why a bundle cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("config.json is malformed: {0}")]
    Malformed(String),
    #[error("refused: {0}")]
    Refused(String),
}

/// A process to run: the init process or an exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessPlan {
    pub args: Vec<String>,
    /// `KEY=VALUE` entries split, in order.
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// `uid:gid`.
    pub user: String,
    pub terminal: bool,
    /// Initial terminal size (rows, columns), when the spec gives one.
    pub console: Option<(u16, u16)>,
    /// `process.rlimits` as (`RLIMIT_*` name, soft, hard), in order.
    pub rlimits: Vec<(String, u64, u64)>,
}

/// A host directory bound into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

/// What a bundle asks for that a VM runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub process: ProcessPlan,
    /// The root filesystem directory as the spec names it (relative to the
    /// bundle unless absolute), used when containerd passes no mounts.
    pub root: PathBuf,
    pub mounts: Vec<BindMount>,
    /// The container's place in a pod, from CRI's annotations.
    pub pod: Option<PodRole>,
}

/// CRI's annotation naming a container's kind: `sandbox` or `container`.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming the pod sandbox a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// What CRI's annotations make of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// The pod's sandbox (its pause container): it boots the pod's VM.
    Sandbox,
    /// A container of the pod whose sandbox has this id: it runs in the
    /// sandbox's VM.
    Member(String),
}

/// The pod role the annotations give; `None` outside a pod.
pub fn pod_role(annotations: &std::collections::HashMap<String, String>) -> Option<PodRole> {
    match annotations.get(CONTAINER_TYPE).map(String::as_str) {
        Some("sandbox") => Some(PodRole::Sandbox),
        Some("container") => annotations
            .get(SANDBOX_ID)
            .filter(|id| !id.is_empty())
            .map(|id| PodRole::Member(id.clone())),
        _ => None,
    }
}

/// The sandbox id whose shim serves the bundle of `config_json` (a pod's
/// member container), read leniently: `None` for anything else.
pub fn shim_group(config_json: &[u8]) -> Option<String> {
    let spec: Spec = serde_json::from_slice(config_json).ok()?;
    match pod_role(spec.annotations().as_ref()?)? {
        PodRole::Member(sandbox) => Some(sandbox),
        PodRole::Sandbox => None,
    }
}

/// Mount types the guest provides itself: skipped.
const GUEST_PROVIDED: &[&str] = &["proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"];
/// tmpfs destinations the guest provides itself.
const GUEST_TMPFS: &[&str] = &["/dev", "/dev/shm", "/run"];

/// Parses and maps a bundle's `config.json`.
pub fn plan(config_json: &[u8]) -> Result<Plan, SpecError> {
    let spec: Spec =
        serde_json::from_slice(config_json).map_err(|e| SpecError::Malformed(e.to_string()))?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| SpecError::Refused("process is missing".into()))?;
    refuse_privileged(&spec, process)?;
    refuse_host_namespaces(&spec)?;
    if let Some(linux) = spec.linux() {
        if linux.devices().as_ref().is_some_and(|d| !d.is_empty()) {
            return Err(SpecError::Refused(
                "linux.devices: host devices cannot reach a VM".into(),
            ));
        }
    }
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    Ok(Plan {
        process: process_plan(process)?,
        root,
        mounts: bind_mounts(&spec)?,
        pod: spec.annotations().as_ref().and_then(pod_role),
    })
}

/// Maps an OCI process (the init's or an exec's `spec`, JSON).
pub fn exec_plan(process_json: &[u8]) -> Result<ProcessPlan, SpecError> {
    let process: Process = serde_json::from_slice(process_json)
        .map_err(|e| SpecError::Malformed(format!("exec process: {e}")))?;
    process_plan(&process)
}

fn process_plan(p: &Process) -> Result<ProcessPlan, SpecError> {
    let args = p.args().clone().unwrap_or_default();
    if args.first().is_none_or(|a| a.is_empty()) {
        return Err(SpecError::Refused("process.args is empty".into()));
    }
    let env = p
        .env()
        .iter()
        .flatten()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let cwd = p.cwd().to_string_lossy().into_owned();
    let user = format!("{}:{}", p.user().uid(), p.user().gid());
    let console = p.console_size().map(|b| {
        let clamp = |n: u64| n.clamp(1, u64::from(cc::MAX_TERMINAL_SIZE)) as u16;
        (clamp(b.height()), clamp(b.width()))
    });
    Ok(ProcessPlan {
        args,
        env,
        cwd: if cwd.is_empty() { "/".into() } else { cwd },
        user,
        terminal: p.terminal().unwrap_or(false),
        console,
        rlimits: p
            .rlimits()
            .iter()
            .flatten()
            .map(|r| (r.typ().to_string(), r.soft(), r.hard()))
            .collect(),
    })
}

/// `ctr --privileged` and CRI's privileged containers: every capability
/// (so `CAP_SYS_ADMIN`) and every device allowed. A VM cannot give the
/// host's devices, and pretending would be worse than saying no.
fn refuse_privileged(spec: &Spec, p: &Process) -> Result<(), SpecError> {
    let sys_admin = p
        .capabilities()
        .as_ref()
        .and_then(|c| c.bounding().as_ref())
        .is_some_and(|b| b.contains(&Capability::SysAdmin));
    let all_devices = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.devices().as_ref())
        .is_some_and(|rules| {
            rules.iter().any(|r| {
                r.allow()
                    && r.major().is_none()
                    && r.minor().is_none()
                    && r.typ().is_none_or(|t| t.as_str() == "a")
            })
        });
    if sys_admin && all_devices {
        return Err(SpecError::Refused(
            "privileged containers are not supported".into(),
        ));
    }
    Ok(())
}

/// A missing pid, network or ipc namespace means the host's, which a VM
/// cannot share; a namespace path means joining another container's.
fn refuse_host_namespaces(spec: &Spec) -> Result<(), SpecError> {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for (typ, name) in [
        (LinuxNamespaceType::Pid, "PID"),
        (LinuxNamespaceType::Network, "network"),
        (LinuxNamespaceType::Ipc, "IPC"),
    ] {
        match namespaces.iter().find(|n| n.typ() == typ) {
            None => {
                return Err(SpecError::Refused(format!(
                    "the host {name} namespace cannot be shared with a VM"
                )))
            }
            Some(n) if n.path().is_some() => {
                return Err(SpecError::Refused(format!(
                    "joining the {name} namespace at {} is not supported",
                    n.path().as_ref().expect("checked").display()
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn bind_mounts(spec: &Spec) -> Result<Vec<BindMount>, SpecError> {
    let mut binds = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let dest = m.destination().to_string_lossy().into_owned();
        let typ = m.typ().as_deref().unwrap_or("");
        let options = m.options().clone().unwrap_or_default();
        let is_bind = typ == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
        if is_bind {
            let source = m
                .source()
                .clone()
                .ok_or_else(|| SpecError::Refused(format!("mount {dest}: bind without source")))?;
            binds.push(BindMount {
                source,
                destination: dest,
                read_only: options.iter().any(|o| o == "ro"),
            });
        } else if GUEST_PROVIDED.contains(&typ)
            || (typ == "tmpfs" && GUEST_TMPFS.contains(&dest.as_str()))
        {
            continue;
        } else {
            return Err(SpecError::Refused(format!(
                "mount {dest}: type {typ:?} is not supported"
            )));
        }
    }
    Ok(binds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// What `ctr run` writes, trimmed to what the mapping reads.
    fn base() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "user": {"uid": 1000, "gid": 100},
                "args": ["sh", "-c", "echo hi"],
                "env": ["PATH=/bin", "FOO=a=b"],
                "cwd": "/data",
                "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"]}
            },
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "mount"}],
                "resources": {"devices": [{"allow": false, "access": "rwm"}]}
            }
        })
    }

    fn plan_of(v: &Value) -> Result<Plan, SpecError> {
        plan(&serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn cri_annotations_place_a_container_in_its_pod() {
        let mut v = base();
        assert_eq!(plan_of(&v).unwrap().pod, None);
        v["annotations"] = json!({CONTAINER_TYPE: "sandbox", SANDBOX_ID: "p1"});
        assert_eq!(plan_of(&v).unwrap().pod, Some(PodRole::Sandbox));
        assert_eq!(shim_group(&serde_json::to_vec(&v).unwrap()), None);
        v["annotations"] = json!({CONTAINER_TYPE: "container", SANDBOX_ID: "p1"});
        assert_eq!(plan_of(&v).unwrap().pod, Some(PodRole::Member("p1".into())));
        assert_eq!(
            shim_group(&serde_json::to_vec(&v).unwrap()),
            Some("p1".into())
        );
        // A member naming no sandbox is a container of its own.
        v["annotations"] = json!({CONTAINER_TYPE: "container", SANDBOX_ID: ""});
        assert_eq!(plan_of(&v).unwrap().pod, None);
        assert_eq!(shim_group(b"not json"), None);
    }

    #[test]
    fn maps_process_and_skips_guest_mounts() {
        let p = plan_of(&base()).unwrap();
        assert_eq!(p.process.args, ["sh", "-c", "echo hi"]);
        assert_eq!(
            p.process.env,
            [("PATH".into(), "/bin".into()), ("FOO".into(), "a=b".into())]
        );
        assert_eq!(p.process.cwd, "/data");
        assert_eq!(p.process.user, "1000:100");
        assert!(!p.process.terminal);
        assert_eq!(p.root, PathBuf::from("rootfs"));
        assert!(p.mounts.is_empty());
    }

    #[test]
    fn bind_mounts_keep_read_only() {
        let mut v = base();
        v["mounts"].as_array_mut().unwrap().extend([
            json!({"destination": "/d", "type": "bind", "source": "/srv/d", "options": ["rbind", "ro"]}),
            json!({"destination": "/w", "source": "/srv/w", "options": ["rbind", "rw"]}),
        ]);
        let p = plan_of(&v).unwrap();
        assert_eq!(
            p.mounts,
            [
                BindMount {
                    source: "/srv/d".into(),
                    destination: "/d".into(),
                    read_only: true
                },
                BindMount {
                    source: "/srv/w".into(),
                    destination: "/w".into(),
                    read_only: false
                },
            ]
        );
    }

    #[test]
    fn terminal_size_is_taken_and_clamped() {
        let mut v = base();
        v["process"]["terminal"] = json!(true);
        v["process"]["consoleSize"] = json!({"height": 40, "width": 100000});
        let p = plan_of(&v).unwrap().process;
        assert!(p.terminal);
        assert_eq!(p.console, Some((40, cc::MAX_TERMINAL_SIZE)));
    }

    fn refusal(v: &Value) -> String {
        match plan_of(v) {
            Err(SpecError::Refused(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn privileged_is_refused() {
        let mut v = base();
        v["process"]["capabilities"]["bounding"] = json!(["CAP_SYS_ADMIN"]);
        v["linux"]["resources"]["devices"] = json!([{"allow": true, "access": "rwm"}]);
        assert!(refusal(&v).contains("privileged"));
    }

    #[test]
    fn host_and_joined_namespaces_are_refused() {
        let mut v = base();
        v["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "ipc"}]);
        assert!(refusal(&v).contains("host network namespace"));
        let mut v = base();
        v["linux"]["namespaces"][0] = json!({"type": "pid", "path": "/proc/1/ns/pid"});
        assert!(refusal(&v).contains("/proc/1/ns/pid"));
    }

    #[test]
    fn devices_unknown_mounts_and_empty_args_are_refused() {
        let mut v = base();
        v["linux"]["devices"] =
            json!([{"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232}]);
        assert!(refusal(&v).contains("linux.devices"));
        let mut v = base();
        v["mounts"][0] = json!({"destination": "/x", "type": "nfs", "source": "h:/x"});
        assert!(refusal(&v).contains("\"nfs\""));
        let mut v = base();
        v["process"]["args"] = json!([]);
        assert!(refusal(&v).contains("process.args"));
    }

    #[test]
    fn malformed_json_is_named() {
        for bad in [&b"{"[..], b"\"x\"", b"{\"ociVersion\": 1}", b"\xff"] {
            assert!(matches!(plan(bad), Err(SpecError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn exec_process_maps_like_init() {
        let p = exec_plan(br#"{"args":["ls"],"cwd":"/","user":{"uid":0,"gid":0},"terminal":true}"#)
            .unwrap();
        assert_eq!(p.args, ["ls"]);
        assert!(p.terminal);
        assert!(p.rlimits.is_empty());
        let p = exec_plan(
            br#"{"args":["ls"],"cwd":"/","user":{"uid":0,"gid":0},
                "rlimits":[{"type":"RLIMIT_NOFILE","soft":100,"hard":200},
                           {"type":"RLIMIT_CORE","soft":0,"hard":0}]}"#,
        )
        .unwrap();
        assert_eq!(
            p.rlimits,
            [
                ("RLIMIT_NOFILE".to_string(), 100, 200),
                ("RLIMIT_CORE".to_string(), 0, 0)
            ]
        );
        assert!(matches!(exec_plan(b"nope"), Err(SpecError::Malformed(_))));
    }
}
