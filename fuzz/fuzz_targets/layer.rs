//! Arbitrary bytes as a layer tarball: applying it must never panic, and
//! whatever it accepts must build a well-formed image.
#![no_main]

use std::io::Cursor;

use cc_erofs::{Builder, Metadata, Tree};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut tree = Tree::new(Metadata { mode: 0o755, ..Default::default() });
    let mut image = Builder::new(Cursor::new(Vec::new())).expect("in-memory image");
    if cc_image::layers::apply_layer(&mut tree, &mut image, data).is_ok() {
        image.finish(&tree, 0).expect("an accepted layer builds an image");
    }
});
