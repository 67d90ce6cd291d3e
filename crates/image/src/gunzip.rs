//! Gzip decompression of layers, member after member as `gunzip` reads
//! them, without the CRC-32 of each member's contents: a layer's bytes are
//! verified by digest before anything built from them is published, so
//! the checksum would only cost a tenth of the decompression time (the
//! one step of building a root image that has a core to itself).

use std::io::{self, BufRead, Read};

use flate2::{Decompress, FlushDecompress, Status};

const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;

/// The decompressed contents of the gzip members in `R`.
pub(crate) struct Gunzip<R> {
    input: R,
    inflate: Decompress,
    /// Inside a member's deflate data (else before a header or at the end).
    in_member: bool,
}

impl<R: BufRead> Gunzip<R> {
    pub(crate) fn new(input: R) -> Self {
        Gunzip {
            input,
            inflate: Decompress::new(false),
            in_member: false,
        }
    }

    /// Reads a member header (RFC 1952, 2.3.1), leaving the input at its
    /// deflate data.
    fn header(&mut self) -> io::Result<()> {
        let mut fixed = [0u8; 10];
        self.input.read_exact(&mut fixed).map_err(truncated)?;
        let flags = fixed[3];
        if fixed[..3] != [0x1f, 0x8b, 8] || flags & 0xe0 != 0 {
            return Err(invalid("not a gzip member header"));
        }
        if flags & FEXTRA != 0 {
            let mut len = [0u8; 2];
            self.input.read_exact(&mut len).map_err(truncated)?;
            self.skip(u64::from(u16::from_le_bytes(len)))?;
        }
        for flag in [FNAME, FCOMMENT] {
            if flags & flag != 0 {
                let mut field = Vec::new();
                (&mut self.input).take(64 << 10).read_until(0, &mut field)?;
                if field.last() != Some(&0) {
                    return Err(invalid("gzip header name or comment too long"));
                }
            }
        }
        if flags & FHCRC != 0 {
            self.skip(2)?;
        }
        Ok(())
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        let skipped = io::copy(&mut (&mut self.input).take(n), &mut io::sink())?;
        if skipped < n {
            return Err(truncated(io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(())
    }
}

impl<R: BufRead> Read for Gunzip<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_member {
                // Another member, or the end.
                if self.input.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                self.header()?;
                self.inflate.reset(false);
                self.in_member = true;
            }
            let input = self.input.fill_buf()?;
            let at_end = input.is_empty();
            let (before_in, before_out) = (self.inflate.total_in(), self.inflate.total_out());
            let status = self
                .inflate
                .decompress(input, out, FlushDecompress::None)
                .map_err(|e| invalid(&format!("corrupt deflate data: {e}")))?;
            let consumed = (self.inflate.total_in() - before_in) as usize;
            let produced = (self.inflate.total_out() - before_out) as usize;
            self.input.consume(consumed);
            if status == Status::StreamEnd {
                // The trailer's CRC-32 and length go unchecked (see above).
                self.skip(8)?;
                self.in_member = false;
            } else if produced == 0 && (at_end || consumed == 0) {
                return Err(truncated(io::ErrorKind::UnexpectedEof.into()));
            }
            if produced > 0 {
                return Ok(produced);
            }
        }
    }
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

fn truncated(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(e.kind(), "truncated gzip data")
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8], name: Option<&str>) -> Vec<u8> {
        let mut b = flate2::GzBuilder::new().extra(vec![1, 2, 3]);
        if let Some(name) = name {
            b = b.filename(name).comment("c");
        }
        let mut gz = b.write(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    fn gunzip(bytes: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        // A small buffer, so headers and trailers straddle refills.
        Gunzip::new(io::BufReader::with_capacity(7, bytes)).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn members_follow_one_another() {
        let a: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut both = gzip(&a, Some("a"));
        both.extend(gzip(b"second", None));
        both.extend(gzip(b"", None));
        let mut expected = a.clone();
        expected.extend(b"second");
        assert_eq!(gunzip(&both).unwrap(), expected);
        assert_eq!(gunzip(b"").unwrap(), b"");
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        let gz = gzip(&[7u8; 50_000], Some("name"));
        for cut in [3, 12, gz.len() / 2, gz.len() - 4] {
            let err = gunzip(&gz[..cut]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{cut}");
        }
        let mut trailing = gz;
        trailing.extend(b"garbage!!!!");
        assert_eq!(
            gunzip(&trailing).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
