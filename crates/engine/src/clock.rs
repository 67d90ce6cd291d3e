//! The guest's clock under software emulation.
//!
//! A TCG guest on a microvm machine has no timer it can calibrate its TSC
//! against (no PIT answer, no HPET, no ACPI PM timer), so Linux falls back
//! to the jiffies clocksource: every clock in the guest then moves in 4 ms
//! steps, timers run in low-resolution mode, and nothing can be timed
//! inside the guest. TCG's TSC is the host's TSC, so the engine measures
//! its rate once per host boot and tells the kernel (`tsc_early_khz`,
//! `tsc=reliable`): the guest gets a nanosecond clock and high-resolution
//! timers. Under KVM the guest has kvm-clock and needs none of this.

use std::fs;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::Accel;

/// How long the host's TSC is watched. Reads are bracketed to within a
/// few microseconds, so the error is a few parts in 10⁵.
const CALIBRATION: Duration = Duration::from_millis(50);

/// Kernel parameters that give a guest on `accel` a precise clock; empty
/// when it has one anyway or the host's TSC rate cannot be known.
pub(crate) fn guest_params(accel: Accel, cache: &Path) -> Vec<String> {
    match (accel, host_tsc_khz(cache)) {
        (Accel::Tcg, Some(khz)) => vec![format!("tsc_early_khz={khz}"), "tsc=reliable".into()],
        _ => Vec::new(),
    }
}

/// The host TSC's rate in kHz, measured once per host boot and kept in
/// `<cache>/host-tsc` (the rate of an invariant TSC never changes while
/// the host runs).
fn host_tsc_khz(cache: &Path) -> Option<u32> {
    // Once per process too: every start would read the same files.
    static KHZ: OnceLock<Option<u32>> = OnceLock::new();
    *KHZ.get_or_init(|| measured_tsc_khz(cache))
}

fn measured_tsc_khz(cache: &Path) -> Option<u32> {
    if !invariant_tsc() {
        return None;
    }
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let boot = boot.trim();
    let file = cache.join("host-tsc");
    if let Some(khz) = fs::read_to_string(&file)
        .ok()
        .and_then(|s| cached(&s, boot))
    {
        return Some(khz);
    }
    let khz = snap(calibrate()?);
    // A cache that cannot be written costs another calibration next time.
    let _ = fs::create_dir_all(cache);
    let tmp = cache.join(format!(".host-tsc.{}", std::process::id()));
    if fs::write(&tmp, format!("{boot} {khz}\n")).is_ok() {
        let _ = fs::rename(&tmp, &file);
    }
    Some(khz)
}

fn cached(contents: &str, boot: &str) -> Option<u32> {
    let (id, khz) = contents.trim().split_once(' ')?;
    (id == boot).then(|| khz.parse().ok()).flatten()
}

/// Whether the CPU says its TSC ticks at one rate whatever the power state.
fn invariant_tsc() -> bool {
    cfg!(target_arch = "x86_64")
        && fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .take(1)
                .any(|l| l.split_whitespace().any(|f| f == "constant_tsc"))
        })
}

#[cfg(target_arch = "x86_64")]
fn calibrate() -> Option<f64> {
    let (t0, c0) = bracketed()?;
    std::thread::sleep(CALIBRATION);
    let (t1, c1) = bracketed()?;
    let khz = c1.checked_sub(c0)? as f64 / t1.duration_since(t0).as_secs_f64() / 1000.0;
    (khz > 0.0 && khz < f64::from(u32::MAX)).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn calibrate() -> Option<f64> {
    None
}

/// A TSC reading and the instant it was taken, from a pair of clock reads
/// at most a few microseconds apart (a preempted try is retried).
#[cfg(target_arch = "x86_64")]
fn bracketed() -> Option<(Instant, u64)> {
    for _ in 0..100 {
        let before = Instant::now();
        // SAFETY: RDTSC exists on every x86-64 CPU and only reads a
        // counter.
        let tsc = unsafe { std::arch::x86_64::_rdtsc() };
        let after = Instant::now();
        let window = after.duration_since(before);
        if window < Duration::from_micros(5) {
            return Some((before + window / 2, tsc));
        }
    }
    None
}

/// Rounds to whole MHz when within 50 ppm of it: TSCs mostly tick at a
/// whole number of MHz, and the measurement is only that precise.
fn snap(khz: f64) -> u32 {
    let mhz = (khz / 1000.0).round() * 1000.0;
    let chosen = if ((khz - mhz) / mhz).abs() < 50e-6 {
        mhz
    } else {
        khz.round()
    };
    chosen as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_near_a_whole_mhz_snap_to_it() {
        assert_eq!(snap(2_299_910.3), 2_300_000);
        assert_eq!(snap(2_300_090.0), 2_300_000);
        assert_eq!(snap(2_294_686.4), 2_294_686);
    }

    #[test]
    fn the_cached_rate_counts_only_for_the_same_host_boot() {
        assert_eq!(cached("abc 2300000\n", "abc"), Some(2_300_000));
        assert_eq!(cached("abc 2300000\n", "def"), None);
        assert_eq!(cached("garbage", "abc"), None);
        assert_eq!(cached("abc x", "abc"), None);
    }

    #[test]
    fn only_tcg_guests_get_clock_parameters() {
        let cache = std::env::temp_dir().join(format!("cc-clock-{}", std::process::id()));
        assert!(guest_params(Accel::Kvm, &cache).is_empty());
        let params = guest_params(Accel::Tcg, &cache);
        if invariant_tsc() {
            assert_eq!(params.len(), 2, "{params:?}");
            assert!(params[0].starts_with("tsc_early_khz="));
            // Later calls give the rate the first measured.
            assert_eq!(guest_params(Accel::Tcg, &cache), params);
        }
        let _ = fs::remove_dir_all(&cache);
    }
}
