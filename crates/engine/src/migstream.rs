//! Splits a saved guest, QEMU's precopy migration stream with every page
//! of its RAM, into RAM-file form without a QEMU: the main RAM block's
//! pages written into a sparse file at their offsets (zero pages left as
//! holes), and the rest, a stream that loads with `x-ignore-shared` into
//! a VM whose RAM is that file, as a template's saved device state does.
//!
//! Only the stream QEMU writes for a plain save is understood: no
//! postcopy, multifd, compression, XBZRLE or RDMA, and no iterative
//! section but `ram`. Anything else is [`SplitError::Unsupported`], for
//! the caller to hand the stream to QEMU instead; a stream cut short or
//! inconsistent is [`SplitError::Malformed`]. Lengths are bounded by the
//! blocks the stream itself declared, so a bad stream costs no memory.
//!
//! The format (QEMU's `migration/savevm.c` and `migration/ram.c`):
//! the magic and version, a configuration section, then sections. The
//! `ram` section starts with the block list (name and length of each) and
//! goes on in parts, each a run of page records ended by an end-of-section
//! flag: an offset with flags in its low bits, the block's name unless it
//! continues the previous record's block, and a fill byte (a page of one
//! byte) or the page itself. The device sections that follow have no
//! length; the split copies them through unread.

use std::fs::File;
use std::io::{self, BufRead, Write};
use std::os::unix::fs::FileExt;

/// The guest's page size, the unit of RAM records.
const PAGE: usize = 4096;

const MAGIC: u32 = 0x5145_564d;
const VERSION: u32 = 3;

const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const EOF: u8 = 0x10;
const FOOTER: u8 = 0x7e;

const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
/// The bits of a record's first word that hold flags, not the offset.
const FLAGS: u64 = PAGE as u64 - 1;

/// The configuration subsection that makes the destination check that
/// `x-ignore-shared` is on, as QEMU writes it when saving with it.
const CAPABILITIES: &[u8] = b"configuration/capabilities";
const IGNORE_SHARED: &[u8] = b"x-ignore-shared";

/// The name of the BIOS ROM's RAM block, and where it is mapped: below 4 GiB.
const BIOS: &[u8] = b"pc.bios";
const FOUR_GIB: u64 = 1 << 32;

/// Why a stream was not split.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// A stream this splitter does not know how to read.
    #[error("unsupported migration stream: {0}")]
    Unsupported(String),
    /// A stream cut short or inconsistent with itself.
    #[error("malformed migration stream: {0}")]
    Malformed(String),
    /// Reading the stream or writing a result failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What a split wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Split {
    /// Length of the main RAM block, to which the RAM file is sized.
    pub ram_bytes: u64,
    /// Pages written into the RAM file (the others are holes).
    pub pages_written: u64,
}

/// A RAM block the stream declared.
struct Block {
    name: Vec<u8>,
    len: u64,
}

/// Splits `stream` (a save of a guest whose main RAM block is named
/// `ram_block`) into `ram`, an empty file grown to the block's size with
/// its non-zero pages, and `devices`, the stream without them.
pub fn split(
    stream: &mut impl BufRead,
    ram_block: &str,
    ram: &File,
    devices: &mut impl Write,
) -> Result<Split, SplitError> {
    let mut s = Splitter {
        input: stream,
        out: devices,
        ram,
        ram_block: ram_block.as_bytes(),
        blocks: Vec::new(),
        ram_section: None,
        last_block: None,
        last_kept: None,
        ram_ended: false,
        split: Split::default(),
    };
    s.header()?;
    loop {
        let kind = s.u8()?;
        match kind {
            SECTION_START => s.ram_start()?,
            SECTION_PART | SECTION_END => s.ram_part(kind)?,
            SECTION_FULL | EOF => {
                if !s.ram_ended {
                    return Err(malformed("device state before the end of the RAM"));
                }
                // Device state to the end, copied as it is.
                s.out.write_all(&[kind])?;
                io::copy(s.input, s.out)?;
                return Ok(s.split);
            }
            other => return Err(unsupported(format!("section type {other:#04x}"))),
        }
    }
}

struct Splitter<'a, R, W> {
    input: &'a mut R,
    out: &'a mut W,
    ram: &'a File,
    ram_block: &'a [u8],
    blocks: Vec<Block>,
    /// The `ram` section's id, once started.
    ram_section: Option<u32>,
    /// The block of the last page record, for records that continue it.
    last_block: Option<usize>,
    /// The block of the last page record written out.
    last_kept: Option<usize>,
    /// Whether the `ram` section's end was read.
    ram_ended: bool,
    split: Split,
}

impl<R: BufRead, W: Write> Splitter<'_, R, W> {
    fn header(&mut self) -> Result<(), SplitError> {
        if self.u32()? != MAGIC {
            return Err(malformed("not a QEMU migration stream"));
        }
        let version = self.u32()?;
        if version != VERSION {
            return Err(unsupported(format!("version {version}")));
        }
        self.put_u32(MAGIC)?;
        self.put_u32(VERSION)?;
        if self.u8()? != CONFIGURATION {
            return Err(unsupported("no configuration section"));
        }
        let len = self.u32()?;
        if len > 255 {
            return Err(malformed("machine name too long"));
        }
        let name = self.bytes(len as usize)?;
        if self.peek()? == SUBSECTION {
            return Err(unsupported("a configuration subsection"));
        }
        self.out.write_all(&[CONFIGURATION])?;
        self.put_u32(len)?;
        self.out.write_all(&name)?;
        self.out.write_all(&[SUBSECTION])?;
        self.put_name(CAPABILITIES)?;
        // Subsection version, then the one capability.
        self.put_u32(1)?;
        self.put_u32(1)?;
        self.put_name(IGNORE_SHARED)
    }

    /// The `ram` section's start: the block list, written back with each
    /// block's address, which a stream saved with `x-ignore-shared` has.
    fn ram_start(&mut self) -> Result<(), SplitError> {
        let id = self.u32()?;
        let name = self.name()?;
        let instance = self.u32()?;
        let version = self.u32()?;
        if name != b"ram" {
            return Err(unsupported(format!(
                "iterative section {:?}",
                String::from_utf8_lossy(&name)
            )));
        }
        if self.ram_section.is_some() {
            return Err(malformed("the RAM section started twice"));
        }
        let first = self.u64()?;
        if first & FLAGS != FLAG_MEM_SIZE {
            return Err(unsupported(format!("RAM setup flags {:#x}", first & FLAGS)));
        }
        let total = first & !FLAGS;
        let mut declared = 0u64;
        while declared < total {
            let name = self.name()?;
            let len = self.u64()?;
            if len % PAGE as u64 != 0 || len > total - declared {
                return Err(malformed("RAM block lengths do not add up"));
            }
            declared += len;
            self.blocks.push(Block { name, len });
        }
        if self.u64()? != FLAG_EOS {
            return Err(unsupported("more RAM setup than the block list"));
        }
        self.footer(id)?;
        let main = self
            .blocks
            .iter()
            .find(|b| b.name == self.ram_block)
            .ok_or_else(|| malformed("no main RAM block"))?;
        self.split.ram_bytes = main.len;
        self.ram.set_len(main.len)?;
        self.ram_section = Some(id);
        self.out.write_all(&[SECTION_START])?;
        self.put_u32(id)?;
        self.put_name(&name)?;
        self.put_u32(instance)?;
        self.put_u32(version)?;
        self.put_u64(first)?;
        for i in 0..self.blocks.len() {
            let address = self.address(i)?;
            let block = &self.blocks[i];
            let (name, len) = (block.name.clone(), block.len);
            self.put_name(&name)?;
            self.put_u64(len)?;
            self.put_u64(address)?;
        }
        self.put_u64(FLAG_EOS)?;
        self.put_footer(id)
    }

    /// Where block `i` is mapped in the guest: the main RAM at 0, the
    /// BIOS just below 4 GiB. A destination checks it only for blocks it
    /// ignores, which a VM given the RAM file has none of; it is written
    /// as QEMU would.
    fn address(&self, i: usize) -> Result<u64, SplitError> {
        let block = &self.blocks[i];
        if block.name == self.ram_block {
            Ok(0)
        } else if block.name == BIOS && block.len <= FOUR_GIB {
            Ok(FOUR_GIB - block.len)
        } else {
            Err(unsupported(format!(
                "RAM block {:?}",
                String::from_utf8_lossy(&block.name)
            )))
        }
    }

    /// A part (or the end) of the `ram` section: the main block's pages go
    /// to the RAM file, the others' stay in the stream.
    fn ram_part(&mut self, kind: u8) -> Result<(), SplitError> {
        let id = self.u32()?;
        if Some(id) != self.ram_section {
            return Err(unsupported(format!("iterative section {id}")));
        }
        if self.ram_ended {
            return Err(malformed("RAM after the end of its section"));
        }
        self.ram_ended = kind == SECTION_END;
        self.out.write_all(&[kind])?;
        self.put_u32(id)?;
        let mut page = vec![0u8; PAGE];
        loop {
            let word = self.u64()?;
            let flags = word & FLAGS;
            let offset = word & !FLAGS;
            if flags == FLAG_EOS {
                break;
            }
            let fill = flags & FLAG_ZERO != 0;
            if flags & !FLAG_CONTINUE != FLAG_ZERO && flags & !FLAG_CONTINUE != FLAG_PAGE {
                return Err(unsupported(format!("RAM record flags {flags:#x}")));
            }
            let continued = flags & FLAG_CONTINUE != 0;
            let named = if continued { None } else { Some(self.name()?) };
            let block = match &named {
                Some(name) => self
                    .blocks
                    .iter()
                    .position(|b| &b.name == name)
                    .ok_or_else(|| malformed("a page of an undeclared RAM block"))?,
                None => self
                    .last_block
                    .ok_or_else(|| malformed("a page continuing no block"))?,
            };
            if offset >= self.blocks[block].len {
                return Err(malformed("a page past the end of its block"));
            }
            self.last_block = Some(block);
            let byte = if fill {
                let b = self.u8()?;
                page.fill(b);
                b
            } else {
                self.input.read_exact(&mut page).map_err(cut)?;
                0
            };
            if self.blocks[block].name == self.ram_block {
                if !fill || byte != 0 {
                    self.ram.write_all_at(&page, offset)?;
                    self.split.pages_written += 1;
                }
                continue;
            }
            // Kept, continuing only the block of the last record kept: the
            // one before it in the stream may have been the main block's.
            if self.last_kept == Some(block) {
                self.put_u64(word | FLAG_CONTINUE)?;
            } else {
                self.put_u64(word & !FLAG_CONTINUE)?;
                let name = self.blocks[block].name.clone();
                self.put_name(&name)?;
                self.last_kept = Some(block);
            }
            if fill {
                self.out.write_all(&[byte])?;
            } else {
                self.out.write_all(&page)?;
            }
        }
        self.put_u64(FLAG_EOS)?;
        self.footer(id)?;
        self.put_footer(id)
    }

    fn footer(&mut self, id: u32) -> Result<(), SplitError> {
        if self.u8()? != FOOTER || self.u32()? != id {
            return Err(malformed("a section without its footer"));
        }
        Ok(())
    }

    fn put_footer(&mut self, id: u32) -> Result<(), SplitError> {
        self.out.write_all(&[FOOTER])?;
        self.put_u32(id)
    }

    fn peek(&mut self) -> Result<u8, SplitError> {
        match self.input.fill_buf()?.first() {
            Some(&b) => Ok(b),
            None => Err(malformed("cut short")),
        }
    }

    fn u8(&mut self) -> Result<u8, SplitError> {
        let mut b = [0u8; 1];
        self.input.read_exact(&mut b).map_err(cut)?;
        Ok(b[0])
    }

    fn u32(&mut self) -> Result<u32, SplitError> {
        let mut b = [0u8; 4];
        self.input.read_exact(&mut b).map_err(cut)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, SplitError> {
        let mut b = [0u8; 8];
        self.input.read_exact(&mut b).map_err(cut)?;
        Ok(u64::from_be_bytes(b))
    }

    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, SplitError> {
        let mut b = vec![0u8; n];
        self.input.read_exact(&mut b).map_err(cut)?;
        Ok(b)
    }

    /// A name: a length byte, then that many bytes.
    fn name(&mut self) -> Result<Vec<u8>, SplitError> {
        let len = self.u8()?;
        self.bytes(len.into())
    }

    fn put_name(&mut self, name: &[u8]) -> Result<(), SplitError> {
        let len = u8::try_from(name.len()).map_err(|_| malformed("a name too long"))?;
        self.out.write_all(&[len])?;
        Ok(self.out.write_all(name)?)
    }

    fn put_u32(&mut self, v: u32) -> Result<(), SplitError> {
        Ok(self.out.write_all(&v.to_be_bytes())?)
    }

    fn put_u64(&mut self, v: u64) -> Result<(), SplitError> {
        Ok(self.out.write_all(&v.to_be_bytes())?)
    }
}

fn unsupported(what: impl Into<String>) -> SplitError {
    SplitError::Unsupported(what.into())
}

fn malformed(what: impl Into<String>) -> SplitError {
    SplitError::Malformed(what.into())
}

/// A read that hit the end is a stream cut short.
fn cut(e: io::Error) -> SplitError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        malformed("cut short")
    } else {
        SplitError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    //! Streams built here in QEMU's encoding (no QEMU). The branch and
    //! park VM tests load what real splits make.
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Encodes the pieces of a stream.
    #[derive(Default)]
    struct Enc(Vec<u8>);

    impl Enc {
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn name(mut self, n: &[u8]) -> Self {
            self.0.push(n.len() as u8);
            self.0.extend_from_slice(n);
            self
        }
        fn raw(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn header(self) -> Self {
            self.u32(MAGIC)
                .u32(VERSION)
                .u8(CONFIGURATION)
                .u32(7)
                .raw(b"microvm")
        }
        fn section(self, kind: u8, id: u32) -> Self {
            self.u8(kind).u32(id)
        }
        fn footer(self, id: u32) -> Self {
            self.u8(FOOTER).u32(id)
        }
        /// The `ram` section's start, section id 2: `mem` of `pages`
        /// pages and a one-page BIOS.
        fn ram_start(self, pages: u64, addresses: bool) -> Self {
            let mem = pages * PAGE as u64;
            let e = self
                .section(SECTION_START, 2)
                .name(b"ram")
                .u32(0)
                .u32(4)
                .u64((mem + PAGE as u64) | FLAG_MEM_SIZE)
                .name(b"mem")
                .u64(mem);
            let e = if addresses { e.u64(0) } else { e };
            let e = e.name(BIOS).u64(PAGE as u64);
            let e = if addresses {
                e.u64(FOUR_GIB - PAGE as u64)
            } else {
                e
            };
            e.u64(FLAG_EOS).footer(2)
        }
        /// A page record's head: named by `block`, else continuing.
        fn record(self, offset: u64, kind: u64, block: Option<&[u8]>) -> Self {
            match block {
                Some(b) => self.u64(offset | kind).name(b),
                None => self.u64(offset | kind | FLAG_CONTINUE),
            }
        }
        /// The end of a `ram` section part (section id 2).
        fn eos(self) -> Self {
            self.u64(FLAG_EOS).footer(2)
        }
        /// The `ram` section's end, empty, and the device state.
        fn ram_end_and_devices(self) -> Self {
            self.section(SECTION_END, 2).eos().raw(DEVICES)
        }
        fn page(self, offset: u64, block: Option<&[u8]>, fill: u8) -> Self {
            self.record(offset, FLAG_PAGE, block).raw(&[fill; PAGE])
        }
        fn zero(self, offset: u64, block: Option<&[u8]>, fill: u8) -> Self {
            self.record(offset, FLAG_ZERO, block).u8(fill)
        }
    }

    const DEVICES: &[u8] = b"\x04\x00\x00\x00\x03\x06serial\x00\x00\x00\x00\x00\x00\x00\x01state\x7e\x00\x00\x00\x03\x10";

    /// A save of a 4-page guest: page 0 data, page 1 zero, page 2 filled
    /// with 0xab, page 3 never sent; the BIOS page among them, sent
    /// twice.
    fn full_stream() -> Vec<u8> {
        Enc::default()
            .header()
            .ram_start(4, false)
            .section(SECTION_PART, 2)
            .page(0, Some(b"mem"), 7)
            .zero(PAGE as u64, None, 0)
            .page(0, Some(BIOS), 9)
            .zero(2 * PAGE as u64, Some(b"mem"), 0xab)
            .zero(0, Some(BIOS), 3)
            .eos()
            .ram_end_and_devices()
            .0
    }

    fn ram_file() -> File {
        let dir = std::env::temp_dir().join(format!(
            "cc-migstream-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dir)
            .unwrap();
        std::fs::remove_file(&dir).unwrap();
        f
    }

    fn run(stream: &[u8]) -> (Result<Split, SplitError>, File, Vec<u8>) {
        let ram = ram_file();
        let mut out = Vec::new();
        let r = split(&mut &stream[..], "mem", &ram, &mut out);
        (r, ram, out)
    }

    #[test]
    fn pages_of_the_main_block_go_to_the_file_and_the_rest_loads_ignoring_it() {
        let (r, ram, out) = run(&full_stream());
        assert_eq!(
            r.unwrap(),
            Split {
                ram_bytes: 4 * PAGE as u64,
                pages_written: 2
            }
        );
        assert_eq!(ram.metadata().unwrap().len(), 4 * PAGE as u64);
        let mut page = vec![0u8; PAGE];
        for (i, want) in [7u8, 0, 0xab, 0].into_iter().enumerate() {
            ram.read_exact_at(&mut page, (i * PAGE) as u64).unwrap();
            assert!(page.iter().all(|&b| b == want), "page {i}");
        }
        // As QEMU saves with x-ignore-shared: the capability in the
        // configuration, each block's address, only the BIOS's pages (the
        // second continuing the first, as no main block page is between).
        let want = Enc::default()
            .header()
            .u8(SUBSECTION)
            .name(CAPABILITIES)
            .u32(1)
            .u32(1)
            .name(IGNORE_SHARED)
            .ram_start(4, true)
            .section(SECTION_PART, 2)
            .page(0, Some(BIOS), 9)
            .zero(0, None, 3)
            .eos()
            .ram_end_and_devices()
            .0;
        assert_eq!(out, want);
    }

    #[test]
    fn a_stream_cut_anywhere_before_the_devices_is_malformed() {
        let full = full_stream();
        let devices_at = full.len() - DEVICES.len();
        for len in 0..=devices_at {
            match run(&full[..len]).0 {
                Err(SplitError::Malformed(_)) => {}
                other => panic!("cut at {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn pages_outside_the_declared_blocks_are_malformed() {
        let cases = [
            (
                "past the end",
                Enc::default().page(4 * PAGE as u64, Some(b"mem"), 1),
            ),
            ("undeclared", Enc::default().page(0, Some(b"rom"), 1)),
            ("continuing nothing", Enc::default().page(0, None, 1)),
        ];
        for (what, records) in cases {
            let stream = Enc::default()
                .header()
                .ram_start(4, false)
                .section(SECTION_PART, 2)
                .raw(&records.0)
                .u64(FLAG_EOS)
                .footer(2)
                .0;
            assert!(
                matches!(run(&stream).0, Err(SplitError::Malformed(_))),
                "{what}"
            );
        }
    }

    #[test]
    fn inconsistent_setup_and_devices_before_the_ram_ends_are_malformed() {
        let not_qemu = Enc::default().u32(0x1234_5678).u32(VERSION).0;
        let blocks_too_long = Enc::default()
            .header()
            .section(SECTION_START, 2)
            .name(b"ram")
            .u32(0)
            .u32(4)
            .u64(PAGE as u64 | FLAG_MEM_SIZE)
            .name(b"mem")
            .u64(2 * PAGE as u64)
            .0;
        let early_devices = Enc::default().header().ram_start(4, false).raw(DEVICES).0;
        for stream in [not_qemu, blocks_too_long, early_devices] {
            assert!(matches!(run(&stream).0, Err(SplitError::Malformed(_))));
        }
    }

    #[test]
    fn what_a_plain_save_never_has_is_unsupported() {
        let version_2 = Enc::default().u32(MAGIC).u32(2).0;
        let subsection = Enc::default().header().u8(SUBSECTION).0;
        let other_iterative = Enc::default()
            .header()
            .section(SECTION_START, 3)
            .name(b"block")
            .u32(0)
            .u32(1)
            .0;
        let compressed = Enc::default()
            .header()
            .ram_start(4, false)
            .section(SECTION_PART, 2)
            .u64(0x100)
            .0;
        let command = Enc::default().header().u8(0x08).0;
        for stream in [version_2, subsection, other_iterative, compressed, command] {
            assert!(matches!(run(&stream).0, Err(SplitError::Unsupported(_))));
        }
    }

    #[test]
    fn no_corrupted_byte_panics_or_grows_the_file_past_its_block() {
        let full = full_stream();
        for at in 0..full.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut stream = full.clone();
                stream[at] ^= flip;
                let (r, ram, out) = run(&stream);
                if let Ok(split) = r {
                    assert_eq!(ram.metadata().unwrap().len(), split.ram_bytes);
                    assert!(out.len() <= 2 * stream.len() + 4096);
                }
            }
        }
    }
}
