//! Thread counts the commands accept: `modrt --threads N` and the
//! `RAYON_NUM_THREADS` every command's parallel loops read. A count far past
//! any CPU's only costs memory and start-up time, and one past the system's
//! limit made the thread pool panic; both are refused with one line instead.

use crate::{Error, Result};

/// The most threads a command starts: far above the cores of any machine these
/// commands run on, and low enough to start everywhere.
pub const MAX_THREADS: usize = 256;

/// Checks a thread count given as `what` (`--threads 4`): 1 to [`MAX_THREADS`].
pub fn check(n: usize, what: &str) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    match n {
        0 => Err(Error::Threads(format!("{what}: use at least 1 thread"))),
        n if n > MAX_THREADS => Err(Error::Threads(format!(
            "{what}: at most {MAX_THREADS} threads; this machine has {cores} cores, so {cores} is a good choice"
        ))),
        _ => Ok(()),
    }
}

/// Checks `RAYON_NUM_THREADS`, which sizes every parallel loop's pool, before
/// that pool starts: unset, empty or 0 (rayon's default: one per core) or 1 to
/// [`MAX_THREADS`].
pub fn check_rayon_env() -> Result<()> {
    const VAR: &str = "RAYON_NUM_THREADS";
    let Some(value) = std::env::var_os(VAR) else {
        return Ok(());
    };
    let text = value.to_string_lossy();
    let what = format!("{VAR}={text}");
    match text.trim() {
        "" | "0" => Ok(()),
        t => match t.parse::<usize>() {
            Ok(n) => check(n, &what),
            Err(_) => Err(Error::Threads(format!(
                "{what}: not a thread count; set a number from 1 to {MAX_THREADS}, or unset it to use every core"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_past_the_limit_are_refused() {
        assert!(check(1, "--threads 1").is_ok());
        assert!(check(MAX_THREADS, "--threads").is_ok());
        let err = check(0, "--threads 0").unwrap_err().to_string();
        assert!(err.contains("--threads 0: use at least 1"), "{err}");
        let err = check(100_000, "--threads 100000").unwrap_err().to_string();
        assert!(
            err.contains("--threads 100000: at most 256") && err.contains("cores"),
            "{err}"
        );
    }
}
