//! The QEMU command line, built as pure data so it is tested without QEMU.

use std::ffi::OsString;
use std::path::Path;

use crate::{Accel, VmSpec};

/// Kernel parameters every guest gets. `reboot=t` makes a guest reboot a
/// triple fault, which `-no-reboot` turns into an immediate QEMU exit;
/// `panic=-1` reboots (so exits) at once on a kernel panic.
const KERNEL_PARAMS: &str = "console=ttyS0 quiet reboot=t panic=-1";

/// Arguments for `qemu-system-x86_64` to boot `spec`. The agent channel and
/// QMP are already-connected sockets QEMU inherits as `agent_fd`/`qmp_fd`:
/// nothing listens on a path, so nothing can connect first or be lost.
pub fn qemu_args(spec: &VmSpec, agent_fd: i32, qmp_fd: i32, console_log: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let (accel, cpu) = match spec.accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg", "max"),
    };
    let memory = spec.memory_mb.to_string();
    let cpus = spec.cpus.to_string();
    let mut append = KERNEL_PARAMS.to_string();
    for extra in &spec.kernel_params {
        append.push(' ');
        append.push_str(extra);
    }
    let machine = match &spec.memory_file {
        None => "microvm,acpi=off".to_string(),
        Some(file) => {
            // RAM in a file: a template's source shares it (its pages are
            // the template), a restore maps it privately (never written).
            push(
                &mut a,
                &[
                    "-object",
                    &format!(
                        "memory-backend-file,id=mem,size={memory}M,share={},mem-path={}",
                        if file.shared { "on" } else { "off" },
                        opt_path(&file.path)
                    ),
                ],
            );
            "microvm,acpi=off,memory-backend=mem".to_string()
        }
    };
    push(
        &mut a,
        &["-accel", accel, "-cpu", cpu, "-M", &machine, "-m", &memory],
    );
    if spec.incoming {
        push(&mut a, &["-incoming", "defer"]);
    }
    push(
        &mut a,
        &[
            "-smp",
            &cpus,
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ],
    );
    a.extend([
        "-kernel".into(),
        spec.kernel.clone().into(),
        "-initrd".into(),
        spec.initrd.clone().into(),
    ]);
    push(&mut a, &["-append", &append]);
    push(
        &mut a,
        &["-serial", &format!("file:{}", opt_path(console_log))],
    );
    push(
        &mut a,
        &[
            "-chardev",
            &format!("socket,id=qmp,fd={qmp_fd}"),
            "-mon",
            "chardev=qmp,mode=control",
        ],
    );
    push(&mut a, &["-device", "virtio-serial-device"]);
    push(
        &mut a,
        &["-chardev", &format!("socket,id=agent,fd={agent_fd}")],
    );
    push(
        &mut a,
        &[
            "-device",
            &format!(
                "virtserialport,chardev=agent,name={}",
                cc_protocol::AGENT_PORT_NAME
            ),
        ],
    );
    push(&mut a, &["-device", "virtio-rng-device"]);
    for (i, disk) in spec.disks.iter().enumerate() {
        let ro = if disk.read_only { "on" } else { "off" };
        // cache=unsafe: the writable layer dies with the instance, so its
        // flushes need not reach the host disk.
        let cache = if disk.read_only {
            "writeback"
        } else {
            "unsafe"
        };
        push(
            &mut a,
            &[
                "-drive",
                &format!(
                    "id=d{i},file={},format=raw,if=none,readonly={ro},cache={cache},discard=unmap",
                    opt_path(&disk.path)
                ),
            ],
        );
        push(
            &mut a,
            &[
                "-device",
                &format!(
                    "virtio-blk-device,drive=d{i},serial={}",
                    opt_value(&disk.serial)
                ),
            ],
        );
    }
    if spec.network {
        let netdev = crate::vm::NETDEV_ID;
        push(&mut a, &["-netdev", &format!("user,id={netdev}")]);
        push(
            &mut a,
            &["-device", &format!("virtio-net-device,netdev={netdev}")],
        );
    }
    for (i, share) in spec.shares.iter().enumerate() {
        // security_model=none: files keep the host's ownership and the guest
        // cannot change it, which is what sharing a user's directory means.
        let ro = if share.read_only { ",readonly=on" } else { "" };
        push(
            &mut a,
            &[
                "-fsdev",
                &format!(
                    "local,id=fs{i},path={},security_model=none{ro}",
                    opt_path(&share.path)
                ),
            ],
        );
        push(
            &mut a,
            &[
                "-device",
                &format!(
                    "virtio-9p-device,fsdev=fs{i},mount_tag={}",
                    opt_value(&share.tag)
                ),
            ],
        );
    }
    a
}

/// A path inside a QEMU option value: commas are doubled.
fn push(args: &mut Vec<OsString>, parts: &[&str]) {
    args.extend(parts.iter().map(OsString::from));
}

fn opt_path(p: &Path) -> String {
    opt_value(&p.to_string_lossy())
}

fn opt_value(v: &str) -> String {
    v.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Disk, Share};
    use std::path::PathBuf;

    fn spec() -> VmSpec {
        VmSpec {
            kernel: PathBuf::from("/k/vmlinux"),
            initrd: PathBuf::from("/k/initrd.cpio"),
            memory_mb: 256,
            cpus: 2,
            accel: Accel::Tcg,
            disks: vec![
                Disk {
                    path: PathBuf::from("/c/ro,ot.erofs"),
                    serial: "ccroot".into(),
                    read_only: true,
                },
                Disk {
                    path: PathBuf::from("/r/upper.img"),
                    serial: "ccupper".into(),
                    read_only: false,
                },
            ],
            shares: vec![Share {
                tag: "ccm0".into(),
                path: PathBuf::from("/h/data"),
                read_only: true,
            }],
            network: true,
            kernel_params: vec!["cc.debug=1".into()],
            memory_file: None,
            incoming: false,
        }
    }

    fn joined(spec: &VmSpec) -> String {
        let args = qemu_args(spec, 3, 4, Path::new("/r/console.log"));
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn microvm_with_the_agent_port_and_disks_by_serial() {
        let cmd = joined(&spec());
        assert!(
            cmd.starts_with("-accel tcg -cpu max -M microvm,acpi=off"),
            "{cmd}"
        );
        assert!(cmd.contains("-m 256 -smp 2"));
        assert!(cmd.contains("-no-reboot"));
        assert!(cmd.contains("-append console=ttyS0 quiet reboot=t panic=-1 cc.debug=1"));
        assert!(cmd.contains("-chardev socket,id=agent,fd=3"));
        assert!(cmd.contains("-chardev socket,id=qmp,fd=4 -mon chardev=qmp,mode=control"));
        assert!(
            !cmd.contains("server"),
            "QEMU must use the connected sockets: {cmd}"
        );
        assert!(cmd.contains("virtserialport,chardev=agent,name=cc.agent"));
        assert!(!cmd.contains("-incoming") && !cmd.contains("memory-backend"));
        assert!(cmd.contains("file=/c/ro,,ot.erofs,format=raw,if=none,readonly=on"));
        assert!(cmd.contains("virtio-blk-device,drive=d1,serial=ccupper"));
        assert!(cmd.contains("-serial file:/r/console.log"));
    }

    #[test]
    fn shares_are_9p_devices_read_only_on_the_host() {
        let cmd = joined(&spec());
        assert!(
            cmd.contains("-fsdev local,id=fs0,path=/h/data,security_model=none,readonly=on"),
            "{cmd}"
        );
        assert!(
            cmd.contains("-device virtio-9p-device,fsdev=fs0,mount_tag=ccm0"),
            "{cmd}"
        );
    }

    #[test]
    fn network_is_a_user_mode_stack_on_virtio_net() {
        let cmd = joined(&spec());
        assert!(
            cmd.contains("-netdev user,id=net0 -device virtio-net-device,netdev=net0"),
            "{cmd}"
        );
        let mut s = spec();
        s.network = false;
        assert!(!joined(&s).contains("-netdev"));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let cmd = joined(&spec());
        assert!(cmd.contains("file=/c/ro,,ot.erofs,"), "{cmd}");
        assert!(cmd.contains("-initrd /k/initrd.cpio"));
    }

    #[test]
    fn templates_put_ram_in_a_file_and_restores_wait_for_state() {
        let mut s = spec();
        s.memory_file = Some(crate::MemoryFile {
            path: PathBuf::from("/t/k,1/ram"),
            shared: true,
        });
        let cmd = joined(&s);
        assert!(
            cmd.starts_with(
                "-object memory-backend-file,id=mem,size=256M,share=on,mem-path=/t/k,,1/ram \
                 -accel tcg -cpu max -M microvm,acpi=off,memory-backend=mem -m 256"
            ),
            "{cmd}"
        );
        s.memory_file.as_mut().unwrap().shared = false;
        s.incoming = true;
        let cmd = joined(&s);
        assert!(cmd.contains("share=off,"), "{cmd}");
        assert!(cmd.contains("-m 256 -incoming defer"), "{cmd}");
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let mut s = spec();
        s.accel = Accel::Kvm;
        assert!(joined(&s).starts_with("-accel kvm -cpu host"));
    }
}
