//! The framed container shared by modkit's binary files (`.modpack`, `.modidx`).
//!
//! ```text
//! offset   size  field
//! 0        8     magic (names the file kind)
//! 8        4     format version, u32 little endian
//! 12       8     payload length N, u64 little endian
//! 20       N     payload (postcard)
//! 20+N     8     XXH3-64 of the payload, u64 little endian
//! ```
//!
//! The checksum doubles as the file's *fingerprint*: a gallery index records the
//! fingerprint of the package it was built with.

use std::path::Path;

use xxhash_rust::xxh3::xxh3_64;

use crate::{Error, Result};

/// Bytes before the payload.
pub const HEADER_LEN: usize = 20;
/// Bytes after the payload.
pub const TRAILER_LEN: usize = 8;

/// Describes one file kind for framing and error messages.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub magic: [u8; 8],
    /// The newest version this build reads and the one it writes.
    pub version: u32,
    /// `"modkit package"`, for messages.
    pub what: &'static str,
    /// What to do when handed the wrong kind of file.
    pub hint: &'static str,
}

/// Frames `payload`.
pub fn frame(kind: &Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&kind.magic);
    out.extend_from_slice(&kind.version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&xxh3_64(payload).to_le_bytes());
    out
}

/// Checks magic, version, length and checksum; returns the payload, its version and
/// the fingerprint. `path` only names the file in errors.
pub fn unframe<'a>(kind: &Kind, bytes: &'a [u8], path: &Path) -> Result<(&'a [u8], u32, u64)> {
    if bytes.len() < 8 || bytes[..8] != kind.magic {
        return Err(Error::BadMagic {
            path: path.into(),
            what: kind.what,
            hint: kind.hint,
        });
    }
    let truncated = |expected: u64| Error::Truncated {
        path: path.into(),
        expected,
        found: bytes.len() as u64,
    };
    if bytes.len() < HEADER_LEN {
        return Err(truncated(HEADER_LEN as u64));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version == 0 {
        return Err(Error::Damaged {
            path: path.into(),
            detail: format!(
                "its header says version 0; {} versions start at 1",
                kind.what
            ),
        });
    }
    if version > kind.version {
        return Err(Error::FutureVersion {
            path: path.into(),
            what: kind.what,
            found: version,
            supported: kind.version,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[12..20]);
    let n = u64::from_le_bytes(len);
    let total = (HEADER_LEN as u64)
        .saturating_add(n)
        .saturating_add(TRAILER_LEN as u64);
    if (bytes.len() as u64) < total {
        return Err(truncated(total));
    }
    if bytes.len() as u64 > total {
        return Err(Error::Damaged {
            path: path.into(),
            detail: match bytes.len() as u64 - total {
                1 => format!("1 byte follows the end its header gives ({total} bytes)"),
                n => format!("{n} bytes follow the end its header gives ({total} bytes)"),
            },
        });
    }
    let end = HEADER_LEN + n as usize;
    let payload = &bytes[HEADER_LEN..end];
    let mut stored = [0u8; 8];
    stored.copy_from_slice(&bytes[end..end + TRAILER_LEN]);
    let stored = u64::from_le_bytes(stored);
    let found = xxh3_64(payload);
    if found != stored {
        return Err(Error::BadChecksum {
            path: path.into(),
            found,
            stored,
        });
    }
    Ok((payload, version, found))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIND: Kind = Kind {
        magic: *b"MODTEST\0",
        version: 2,
        what: "test file",
        hint: "make one with the test",
    };

    #[test]
    fn round_trip() {
        let framed = frame(&KIND, b"hello");
        let (payload, version, fp) = unframe(&KIND, &framed, Path::new("t")).expect("unframe");
        assert_eq!(
            (payload, version, fp),
            (&b"hello"[..], 2, xxh3_64(b"hello"))
        );
    }

    #[test]
    fn rejects_bad_magic() {
        let mut framed = frame(&KIND, b"hello");
        framed[0] = b'X';
        let err = unframe(&KIND, &framed, Path::new("t")).unwrap_err();
        assert!(matches!(err, Error::BadMagic { .. }), "{err}");
        assert!(err.to_string().contains("make one with the test"), "{err}");
    }

    #[test]
    fn rejects_future_version() {
        let mut framed = frame(&KIND, b"hello");
        framed[8] = 3;
        let err = unframe(&KIND, &framed, Path::new("t")).unwrap_err();
        assert!(
            matches!(
                err,
                Error::FutureVersion {
                    found: 3,
                    supported: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn rejects_truncated() {
        let framed = frame(&KIND, b"hello world");
        for cut in [9, 19, 25, framed.len() - 1] {
            let err = unframe(&KIND, &framed[..cut], Path::new("t")).unwrap_err();
            assert!(matches!(err, Error::Truncated { .. }), "cut {cut}: {err}");
        }
    }

    /// Bytes after the checksum (a file appended to, or two files run together)
    /// and version 0 (which no build wrote) are damage, not ignored.
    #[test]
    fn rejects_trailing_bytes_and_version_0() {
        let mut framed = frame(&KIND, b"hello world");
        framed.push(0);
        let err = unframe(&KIND, &framed, Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("1 byte follows the end"), "{err}");
        let mut framed = frame(&KIND, b"hello world");
        framed[8] = 0;
        let err = unframe(&KIND, &framed, Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("version 0"), "{err}");
    }

    #[test]
    fn rejects_bad_checksum() {
        let mut framed = frame(&KIND, b"hello world");
        framed[HEADER_LEN + 3] ^= 1;
        let err = unframe(&KIND, &framed, Path::new("t")).unwrap_err();
        assert!(matches!(err, Error::BadChecksum { .. }), "{err}");
    }
}
