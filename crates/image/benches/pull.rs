//! Pull + unpack of the Debian minbase test image from a loopback registry
//! into a cold store, against `skopeo copy` of the same image to an OCI
//! directory, interleaved in one run. Prints medians and the ratio.
//!
//! A pull into a cold store builds the root image as the layers download,
//! so the pull is nearly all of it and `rootfs()` afterwards only finds
//! the image built; skopeo only copies (and verifies) the blobs.

use std::process::Command;
use std::time::{Duration, Instant};

use cc_image::{CancelToken, Client, PullOptions};
use cc_testsupport::{debian_image, Auth, Registry};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("CC_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let layout = debian_image();
    let registry = Registry::start(Auth::Anonymous);
    registry.push(&layout, "bookworm", "bench/debian:bookworm");
    let reference = format!("{}/bench/debian:bookworm", registry.addr());
    let scratch = std::env::temp_dir().join(format!("cc-bench-pull-{}", std::process::id()));

    let (mut pull, mut rootfs, mut ours, mut skopeo) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut size = 0;
    for i in 0..runs {
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).unwrap();
        let t = Instant::now();
        let out = Command::new("skopeo")
            .args([
                "--insecure-policy",
                "copy",
                "--quiet",
                "--src-tls-verify=false",
            ])
            .arg(format!("docker://{reference}"))
            .arg(format!(
                "oci:{}:bookworm",
                scratch.join(format!("skopeo-{i}")).display()
            ))
            .output()
            .expect("skopeo (apt-get install skopeo)");
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        skopeo.push(t.elapsed());

        let client = Client::open(scratch.join(format!("store-{i}"))).unwrap();
        let t = Instant::now();
        let image = client
            .pull(
                &reference,
                &PullOptions::default(),
                &mut |_| {},
                &CancelToken::new(),
            )
            .unwrap();
        let pulled = t.elapsed();
        image.rootfs().unwrap();
        let total = t.elapsed();
        size = image.size();
        pull.push(pulled);
        rootfs.push(total - pulled);
        ours.push(total);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (ours, skopeo) = (median(ours), median(skopeo));
    println!(
        "Debian minbase, {:.1} MB compressed, {runs} runs, cold store each run",
        size as f64 / 1e6
    );
    println!(
        "{:<34} {:>9.1} ms",
        "pull (download, verify, build)",
        ms(median(pull))
    );
    println!(
        "{:<34} {:>9.1} ms",
        "rootfs() after the pull",
        ms(median(rootfs))
    );
    println!("{:<34} {:>9.1} ms", "pull + unpack", ms(ours));
    println!(
        "{:<34} {:>9.1} ms",
        "skopeo copy → OCI dir (baseline)",
        ms(skopeo)
    );
    println!(
        "pull + unpack / skopeo = {:.2}x (target ≤ 1.2x)",
        ours.as_secs_f64() / skopeo.as_secs_f64()
    );
}
