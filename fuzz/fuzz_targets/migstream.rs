//! Arbitrary bytes as a saved guest's migration stream, split into a RAM
//! file and a device stream. No input may panic; memory stays bounded by
//! the input (the RAM file is sparse and only written where the stream
//! carries pages).
#![no_main]

use std::fs::File;
use std::sync::OnceLock;

use cc_engine::migstream::split;
use libfuzzer_sys::fuzz_target;

/// One unlinked file reused by every run.
fn ram() -> &'static File {
    static RAM: OnceLock<File> = OnceLock::new();
    RAM.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("cc-fuzz-ram-{}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    })
}

fuzz_target!(|data: &[u8]| {
    let ram = ram();
    ram.set_len(0).unwrap();
    let mut devices = Vec::new();
    let _ = split(&mut &data[..], "mem", ram, &mut devices);
    assert!(devices.len() <= data.len() * 2 + 4096);
});
