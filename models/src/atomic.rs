//! Crash-safe file writes: write a temporary sibling, sync, rename.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Whether `path` lies under `/dev` or `/proc`: device and process files, which
/// are written to in place, never replaced, and where a command should not put
/// files beside its output. `..` is folded first (`/tmp/../dev/null` is under
/// `/dev`).
pub fn is_system_path(path: &Path) -> bool {
    let Ok(absolute) = std::path::absolute(path) else {
        return false;
    };
    let mut folded = std::path::PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::ParentDir => {
                folded.pop();
            }
            std::path::Component::CurDir => {}
            other => folded.push(other),
        }
    }
    folded.starts_with("/dev") || folded.starts_with("/proc")
}

/// Writes `bytes` to `path` so that a crash never leaves a half-written file:
/// the data goes to a temporary file in the same directory, is synced, and is then
/// renamed over `path` (atomic on POSIX file systems). A device or a pipe
/// (`/dev/null`, a FIFO), and any path under `/dev` or `/proc` (`/dev/stdout`
/// redirected to a file), is written to, never replaced by a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    // `/dev/stdout` redirected to a file, `/proc/self/fd/3`: links that a
    // rename would replace (as root) or cannot replace; the file behind them is
    // written in place.
    if is_system_path(path) || std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        return std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(io);
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_existing_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.bin");
        write_atomic(&p, b"first").expect("write");
        write_atomic(&p, b"second").expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"second");
        let entries: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(entries.len(), 1, "temporary file left behind");
    }

    /// A FIFO stays a FIFO: the bytes go through it (as they would into
    /// `/dev/null`, which a rename by root would have replaced with a file).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_pipe_is_written_to_not_replaced() {
        use std::io::Read;
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        const O_NONBLOCK: i32 = 0o4000;
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("skipped: no mkfifo");
            return;
        }
        // Opened without waiting for a writer, so nothing blocks if the pipe is
        // replaced instead of written.
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_NONBLOCK)
            .open(&fifo)
            .expect("open the pipe");
        write_atomic(&fifo, b"through").expect("write");
        let mut got = Vec::new();
        reader.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"through");
        let kind = std::fs::symlink_metadata(&fifo).expect("stat").file_type();
        assert!(kind.is_fifo(), "replaced by {kind:?}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    /// `/dev/stdout` redirected to a file is `/proc/self/fd/1`: the file behind
    /// the link is written (a rename there fails, or as root replaces the link).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_file_behind_proc_self_fd_is_written_in_place() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("redirected");
        std::fs::write(&file, b"an older, longer content").expect("write");
        let open = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("open");
        let link = std::path::PathBuf::from(format!("/proc/self/fd/{}", open.as_raw_fd()));
        write_atomic(&link, b"through").expect("write through the link");
        assert_eq!(std::fs::read(&file).expect("read"), b"through");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn system_paths_are_found_past_dot_dot() {
        for path in [
            "/dev/null",
            "/proc/self/fd/1",
            "/tmp/../dev/null",
            "/dev/./x",
        ] {
            assert!(is_system_path(Path::new(path)), "{path}");
        }
        for path in [
            "/tmp/dev/null",
            "/device",
            "/dev/../tmp/x",
            "runs/x.safetensors",
        ] {
            assert!(!is_system_path(Path::new(path)), "{path}");
        }
        // A relative path climbing out of the working folder (never above `/`).
        let up = "../".repeat(64) + "dev/null";
        assert!(is_system_path(Path::new(&up)), "{up}");
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_path() {
        let err = write_atomic(Path::new("/nonexistent-dir-xyz/a.bin"), b"x").unwrap_err();
        assert!(err.to_string().contains("nonexistent-dir-xyz"), "{err}");
    }
}
