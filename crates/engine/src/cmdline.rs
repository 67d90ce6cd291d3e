//! The QEMU command line, built as pure data so it is tested without QEMU.

use std::ffi::OsString;

use crate::{Accel, VmSpec};

/// Kernel parameters every guest gets. `reboot=t` makes a guest reboot a
/// triple fault, which `-no-reboot` turns into an immediate QEMU exit;
/// `panic=-1` reboots (so exits) at once on a kernel panic. A disk's
/// request pool is as deep as its ring, 1024 on virtio-mmio; 128 requests
/// in flight are more than a guest vCPU issues, in about 0.3 MiB less guest
/// RAM per disk.
pub const KERNEL_PARAMS: &str = "console=ttyS0 quiet reboot=t panic=-1 virtio_blk.queue_depth=128";

/// Where QEMU finds each of its inputs. Every host file reaches it as a
/// descriptor the engine opened and QEMU inherited, so a confined QEMU
/// needs no path to anything on the host: files by `/proc/self/fd/N`,
/// disks through fd sets (`/dev/fdset/N`), sockets by number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wiring {
    /// The agent channel's guest end (a connected socket).
    pub agent_fd: i32,
    /// QMP (a connected socket).
    pub qmp_fd: i32,
    /// The serial console (a connected socket the engine drains).
    pub console_fd: i32,
    /// The guest kernel and initramfs, as paths QEMU opens; none for a
    /// guest that arrives by migration ([`VmSpec::incoming`]).
    pub boot: Option<BootFiles>,
    /// The RAM file, when [`VmSpec::memory_file`] is set.
    pub memory_file: Option<String>,
    /// The descriptors of each [`VmSpec::disks`] entry: one read-only, and
    /// for a writable disk also one read-write (QEMU opens a writable disk
    /// read-only first, and takes from its fd set the descriptor whose
    /// access mode matches).
    pub disk_fds: Vec<Vec<i32>>,
    /// The read-only descriptor of each disk's backing image, if it has one.
    pub backing_fds: Vec<Option<i32>>,
    /// One path per [`VmSpec::shares`] entry.
    pub shares: Vec<String>,
    /// The network backend's socket (length-prefixed Ethernet frames),
    /// when the guest has a network interface.
    pub net_fd: Option<i32>,
    /// Turn on QEMU's seccomp filter.
    pub seccomp: bool,
}

/// The files a cold boot reads, as paths QEMU opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    pub kernel: String,
    pub initrd: String,
}

/// The id of the guest's RAM, which names its block in a migration
/// stream: the machine's own name for RAM it made itself (`anonymous`),
/// else ours for a memory backend we gave it.
pub fn ram_block_id(anonymous: bool) -> &'static str {
    if anonymous {
        "microvm.ram"
    } else {
        "mem"
    }
}

/// The path QEMU opens to reach inherited descriptor `fd`.
pub fn fd_path(fd: i32) -> String {
    format!("/proc/self/fd/{fd}")
}

/// QEMU's CPU model for `accel`. Under TCG, every feature QEMU emulates
/// except ERMS: with it, the guest kernel's copies and page clearing and
/// libc's large `memcpy`s use `rep movsb`/`rep stosb`, which TCG runs a
/// byte at a time; without it they use word and vector loops that TCG
/// translates to the host's (64 MiB into tmpfs: 0.45 s → 0.15 s).
pub fn cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max,-erms",
    }
}

/// The kernel command line `spec` boots with (QEMU appends its devices).
/// A template keeps a guest booted with it, so it is part of the key.
pub(crate) fn kernel_command_line(spec: &VmSpec) -> String {
    let mut append = KERNEL_PARAMS.to_string();
    for extra in &spec.kernel_params {
        append.push(' ');
        append.push_str(extra);
    }
    append
}

/// Arguments for `qemu-system-x86_64` to boot `spec` wired as `w`. Nothing
/// listens on a path: nothing can connect first, and no guest byte is lost
/// before the host is there.
pub fn qemu_args(spec: &VmSpec, w: &Wiring) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let accel = match spec.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let cpu = cpu_model(spec.accel);
    let memory = spec.memory_mb.to_string();
    let cpus = spec.cpus.to_string();
    let append = kernel_command_line(spec);
    if w.seccomp {
        push(&mut a, &["-sandbox", crate::confine::SANDBOX_ARG]);
    }
    let machine = match (&spec.memory_file, &w.memory_file) {
        (Some(file), Some(path)) => {
            // RAM in a file: a template's source shares it (its pages are
            // the template), a restore maps it privately (never written).
            let id = ram_block_id(file.anonymous_name);
            push(
                &mut a,
                &[
                    "-object",
                    &format!(
                        "memory-backend-file,id={id},size={memory}M,share={},mem-path={}",
                        if file.shared { "on" } else { "off" },
                        opt_value(path)
                    ),
                ],
            );
            format!("microvm,acpi=off,memory-backend={id}")
        }
        _ if spec.named_ram => {
            let id = ram_block_id(false);
            push(
                &mut a,
                &[
                    "-object",
                    &format!("memory-backend-ram,id={id},size={memory}M"),
                ],
            );
            format!("microvm,acpi=off,memory-backend={id}")
        }
        _ => "microvm,acpi=off".to_string(),
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
    // A migrated guest's kernel is already in its RAM: reading the
    // vmlinux again costs QEMU's start-up 5 to 10 ms for nothing.
    if let Some(boot) = &w.boot {
        push(&mut a, &["-kernel", &boot.kernel, "-initrd", &boot.initrd]);
        push(&mut a, &["-append", &append]);
    }
    push(
        &mut a,
        &[
            "-chardev",
            &format!("socket,id=con,fd={}", w.console_fd),
            "-serial",
            "chardev:con",
        ],
    );
    push(
        &mut a,
        &[
            "-chardev",
            &format!("socket,id=qmp,fd={}", w.qmp_fd),
            "-mon",
            "chardev=qmp,mode=control",
        ],
    );
    // Port 0 is reserved for a console and the agent's is port 1, so two
    // ports: the guest makes a ring pair for each of QEMU's default 31,
    // 1024 entries each on virtio-mmio, 3.5 MiB of guest RAM for nothing.
    push(&mut a, &["-device", "virtio-serial-device,max_ports=2"]);
    push(
        &mut a,
        &["-chardev", &format!("socket,id=agent,fd={}", w.agent_fd)],
    );
    push(
        &mut a,
        &[
            "-device",
            &format!(
                "virtserialport,chardev=agent,name={}",
                opt_value(&spec.agent_port)
            ),
        ],
    );
    push(&mut a, &["-device", "virtio-rng-device"]);
    for (i, ((disk, fds), backing)) in spec
        .disks
        .iter()
        .zip(&w.disk_fds)
        .zip(&w.backing_fds)
        .enumerate()
    {
        let ro = if disk.read_only { "on" } else { "off" };
        // cache=unsafe: the writable layer dies with the instance, so its
        // flushes need not reach the host disk.
        let cache = if disk.read_only {
            "writeback"
        } else {
            "unsafe"
        };
        let set = i + 1;
        for fd in fds {
            push(&mut a, &["-add-fd", &format!("fd={fd},set={set}")]);
        }
        // A qcow2 overlay reads its backing image from a set of its own
        // (sets after the disks'), never by the path its header names.
        let format = match backing {
            Some(fd) => {
                let base = spec.disks.len() + 1 + i;
                push(&mut a, &["-add-fd", &format!("fd={fd},set={base}")]);
                format!("qcow2,backing.driver=raw,backing.file.filename=/dev/fdset/{base},backing.file.locking=off")
            }
            None => "raw".to_string(),
        };
        // No image locks: every writable image is this VM's own, and QEMU
        // 7.2 cannot take them back after an outgoing migration when the
        // fdset holds two descriptors ("Failed to get shared \"write\"
        // lock" on `cont`), which a branch's source needs.
        push(
            &mut a,
            &[
                "-drive",
                &format!(
                    "id=d{i},file=/dev/fdset/{set},format={format},if=none,readonly={ro},cache={cache},discard=unmap,file.locking=off"
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
    if let Some(fd) = w.net_fd {
        let netdev = crate::vm::NETDEV_ID;
        push(&mut a, &["-netdev", &format!("socket,id={netdev},fd={fd}")]);
        // No self-announcement after a restore: the gratuitous ARPs it
        // has the guest send would start the network relay of every
        // instance that never uses the network, and cost the restored
        // guest a wake-up per round.
        push(
            &mut a,
            &[
                "-device",
                &format!("virtio-net-device,netdev={netdev},guest_announce=off"),
            ],
        );
    }
    for (i, (share, path)) in spec.shares.iter().zip(&w.shares).enumerate() {
        // security_model=none: files keep the host's ownership and the guest
        // cannot change it, which is what sharing a user's directory means.
        let ro = if share.read_only { ",readonly=on" } else { "" };
        push(
            &mut a,
            &[
                "-fsdev",
                &format!(
                    "local,id=fs{i},path={},security_model=none{ro}",
                    opt_value(path)
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
                    backing: None,
                },
                Disk {
                    path: PathBuf::from("/r/upper.img"),
                    serial: "ccupper".into(),
                    read_only: false,
                    backing: None,
                },
            ],
            shares: vec![Share {
                tag: "ccm0".into(),
                path: PathBuf::from("/h/data"),
                read_only: true,
            }],
            network: Some(Default::default()),
            kernel_params: vec!["cc.debug=1".into()],
            memory_file: None,
            named_ram: false,
            incoming: false,
            agent_port: "cc.agent".into(),
            confine: crate::ConfineMode::default(),
            console_log_max: crate::CONSOLE_LOG_MAX,
        }
    }

    fn wiring(spec: &VmSpec) -> Wiring {
        Wiring {
            agent_fd: 3,
            qmp_fd: 4,
            console_fd: 5,
            boot: (!spec.incoming).then(|| BootFiles {
                kernel: fd_path(6),
                initrd: fd_path(7),
            }),
            memory_file: spec.memory_file.as_ref().map(|_| "/t/k,1/ram".into()),
            disk_fds: vec![vec![10], vec![11, 12]],
            backing_fds: vec![None, None],
            shares: spec
                .shares
                .iter()
                .map(|_| "/proc/self/fd/20".into())
                .collect(),
            net_fd: spec.network.as_ref().map(|_| 8),
            seccomp: false,
        }
    }

    fn joined(spec: &VmSpec) -> String {
        joined_with(spec, &wiring(spec))
    }

    fn joined_with(spec: &VmSpec, w: &Wiring) -> String {
        let args = qemu_args(spec, w);
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn microvm_with_the_agent_port_and_disks_by_serial() {
        let cmd = joined(&spec());
        assert!(
            cmd.starts_with("-accel tcg -cpu max,-erms -M microvm,acpi=off"),
            "{cmd}"
        );
        assert!(cmd.contains("-m 256 -smp 2"));
        assert!(cmd.contains("-no-reboot"));
        assert!(cmd.contains(
            "-append console=ttyS0 quiet reboot=t panic=-1 virtio_blk.queue_depth=128 cc.debug=1"
        ));
        assert!(cmd.contains("-chardev socket,id=agent,fd=3"));
        assert!(cmd.contains("-chardev socket,id=qmp,fd=4 -mon chardev=qmp,mode=control"));
        assert!(
            !cmd.contains("server"),
            "QEMU must use the connected sockets: {cmd}"
        );
        assert!(cmd.contains(
            "-device virtio-serial-device,max_ports=2 -chardev socket,id=agent,fd=3 \
             -device virtserialport,chardev=agent,name=cc.agent"
        ));
        assert!(!cmd.contains("-incoming") && !cmd.contains("memory-backend"));
        assert!(cmd.contains(
            "-add-fd fd=10,set=1 -drive id=d0,file=/dev/fdset/1,format=raw,if=none,readonly=on"
        ));
        assert!(cmd.contains(
            "-add-fd fd=11,set=2 -add-fd fd=12,set=2 -drive id=d1,file=/dev/fdset/2,format=raw,if=none,readonly=off"
        ));
        assert!(
            cmd.contains("discard=unmap,file.locking=off -device"),
            "{cmd}"
        );
        assert!(cmd.contains("virtio-blk-device,drive=d1,serial=ccupper"));
        assert!(cmd.contains("-chardev socket,id=con,fd=5 -serial chardev:con"));
        assert!(cmd.contains("-kernel /proc/self/fd/6 -initrd /proc/self/fd/7"));
        assert!(!cmd.contains("-sandbox"));
    }

    #[test]
    fn no_host_path_reaches_qemu_and_seccomp_is_on_when_asked() {
        let s = spec();
        let mut w = wiring(&s);
        w.seccomp = true;
        let cmd = joined_with(&s, &w);
        assert!(
            cmd.starts_with(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny "
            ),
            "{cmd}"
        );
        for host_path in ["/k/", "/c/", "/r/", "/h/"] {
            assert!(!cmd.contains(host_path), "{host_path} in {cmd}");
        }
    }

    #[test]
    fn shares_are_9p_devices_read_only_on_the_host() {
        let cmd = joined(&spec());
        assert!(
            cmd.contains(
                "-fsdev local,id=fs0,path=/proc/self/fd/20,security_model=none,readonly=on"
            ),
            "{cmd}"
        );
        assert!(
            cmd.contains("-device virtio-9p-device,fsdev=fs0,mount_tag=ccm0"),
            "{cmd}"
        );
    }

    #[test]
    fn network_is_a_frame_socket_on_virtio_net() {
        let cmd = joined(&spec());
        assert!(
            cmd.contains(
                "-netdev socket,id=net0,fd=8 -device virtio-net-device,netdev=net0,guest_announce=off"
            ),
            "{cmd}"
        );
        let mut s = spec();
        s.network = None;
        assert!(!joined(&s).contains("-netdev"));
    }

    #[test]
    fn commas_in_values_are_escaped() {
        let mut s = spec();
        s.disks[1].serial = "a,b".into();
        let cmd = joined(&s);
        assert!(cmd.contains("serial=a,,b"), "{cmd}");
    }

    #[test]
    fn templates_put_ram_in_a_file_and_restores_wait_for_state() {
        let mut s = spec();
        s.memory_file = Some(crate::MemoryFile {
            path: PathBuf::from("/t/k,1/ram"),
            shared: true,
            anonymous_name: false,
        });
        let cmd = joined(&s);
        assert!(
            cmd.starts_with(
                "-object memory-backend-file,id=mem,size=256M,share=on,mem-path=/t/k,,1/ram \
                 -accel tcg -cpu max,-erms -M microvm,acpi=off,memory-backend=mem -m 256"
            ),
            "{cmd}"
        );
        s.memory_file.as_mut().unwrap().shared = false;
        s.incoming = true;
        let cmd = joined(&s);
        assert!(cmd.contains("share=off,"), "{cmd}");
        assert!(cmd.contains("-m 256 -incoming defer"), "{cmd}");
        // A branch's RAM file keeps the name of a cold source's RAM.
        s.memory_file.as_mut().unwrap().anonymous_name = true;
        let cmd = joined(&s);
        assert!(
            cmd.starts_with(
                "-object memory-backend-file,id=microvm.ram,size=256M,share=off,mem-path=/t/k,,1/ram \
                 -accel tcg -cpu max,-erms -M microvm,acpi=off,memory-backend=microvm.ram"
            ),
            "{cmd}"
        );
    }

    #[test]
    fn parked_guests_load_into_anonymous_ram_named_like_a_file_backed_one() {
        let mut s = spec();
        s.named_ram = true;
        s.incoming = true;
        let cmd = joined(&s);
        assert!(
            cmd.starts_with(
                "-object memory-backend-ram,id=mem,size=256M \
                 -accel tcg -cpu max,-erms -M microvm,acpi=off,memory-backend=mem -m 256 -incoming defer"
            ),
            "{cmd}"
        );
    }

    #[test]
    fn a_migrated_guest_starts_without_kernel_initramfs_or_command_line() {
        let mut s = spec();
        s.incoming = true;
        let cmd = joined(&s);
        for absent in ["-kernel", "-initrd", "-append"] {
            assert!(!cmd.contains(absent), "{cmd}");
        }
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let mut s = spec();
        s.accel = Accel::Kvm;
        assert!(joined(&s).starts_with("-accel kvm -cpu host"));
    }
}
