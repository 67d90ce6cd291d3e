//! `Stats` of a task: the VM's memory and CPU use from the guest's
//! `/proc`, as a cgroup v2 `Metrics` (the type `ctr task metrics` and the
//! CRI decode). The VM is the container, so its totals are the task's.

use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};

/// The `Any` type containerd registers for cgroup v2 metrics.
const TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";
/// Microseconds per clock tick of `/proc/stat` (`USER_HZ` is 100 on Linux).
const USEC_PER_TICK: u64 = 10_000;

/// Memory in use and in total, in bytes, from `/proc/meminfo`: used is
/// what is not available (free plus reclaimable cache).
pub fn memory(meminfo: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kb = rest.trim().strip_suffix("kB")?.trim();
            kb.parse::<u64>().ok()?.checked_mul(1024)
        })
    };
    let (total, available) = (field("MemTotal")?, field("MemAvailable")?);
    Some((total.saturating_sub(available), total))
}

/// CPU time of user and system, in microseconds, from `/proc/stat`'s
/// `cpu` line (user and nice; system, irq and softirq).
pub fn cpu(stat: &str) -> Option<(u64, u64)> {
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let t = |i: usize| ticks.get(i).copied().unwrap_or(0);
    if ticks.len() < 4 {
        return None;
    }
    let usec = |n: u64| n.saturating_mul(USEC_PER_TICK);
    Some((
        usec(t(0).saturating_add(t(1))),
        usec(t(2).saturating_add(t(5)).saturating_add(t(6))),
    ))
}

/// The metrics message, packed as containerd expects it.
pub fn pack(memory: Option<(u64, u64)>, cpu: Option<(u64, u64)>) -> Any {
    let mut m = Metrics::new();
    if let Some((usage, limit)) = memory {
        m.memory = MessageField::some(MemoryStat {
            usage,
            usage_limit: limit,
            ..Default::default()
        });
    }
    if let Some((user, system)) = cpu {
        m.cpu = MessageField::some(CPUStat {
            usage_usec: user.saturating_add(system),
            user_usec: user,
            system_usec: system,
            ..Default::default()
        });
    }
    Any {
        type_url: TYPE_URL.into(),
        value: m.write_to_bytes().unwrap_or_default(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_in_use_is_total_less_available() {
        let meminfo = "MemTotal:         500000 kB\nMemFree:          300000 kB\n\
                       MemAvailable:     400000 kB\nBuffers:            1000 kB\n";
        assert_eq!(memory(meminfo), Some((100_000 * 1024, 500_000 * 1024)));
    }

    #[test]
    fn malformed_meminfo_gives_nothing() {
        assert_eq!(memory(""), None);
        assert_eq!(memory("MemTotal: 5 kB\n"), None);
        assert_eq!(memory("MemTotal: x kB\nMemAvailable: 1 kB\n"), None);
        assert_eq!(memory("MemTotalX: 5 kB\nMemAvailable: 1 kB\n"), None);
        assert_eq!(memory("MemTotal: 5\nMemAvailable: 1 kB\n"), None);
    }

    #[test]
    fn cpu_time_is_summed_from_the_cpu_line_in_microseconds() {
        let stat = "cpu  10 2 30 400 5 6 7 0 0 0\ncpu0 10 2 30 400 5 6 7 0 0 0\nintr 1\n";
        assert_eq!(cpu(stat), Some((120_000, 430_000)));
    }

    #[test]
    fn malformed_stat_gives_nothing() {
        assert_eq!(cpu(""), None);
        assert_eq!(cpu("cpu0 1 2 3 4\n"), None);
        assert_eq!(cpu("cpu  1 2\n"), None);
        assert_eq!(cpu("cpu  1 x 3 4\n"), None);
    }

    #[test]
    fn metrics_decode_as_cgroup_v2() {
        let any = pack(Some((7, 9)), Some((1, 2)));
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!((m.memory.usage, m.memory.usage_limit), (7, 9));
        assert_eq!(m.cpu.usage_usec, 3);
    }
}
