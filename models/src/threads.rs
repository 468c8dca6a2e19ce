//! Thread counts the commands accept: `modrt --threads N` and the
//! `RAYON_NUM_THREADS` every command's parallel loops read. A count far past
//! any CPU's only costs memory and start-up time, and one past the system's
//! limit made the thread pool panic; both are refused with one line instead.

use crate::{Error, Result};

/// The most threads a command starts, on a machine with fewer cores than
/// this: far above what helps, and low enough to start everywhere.
pub const MAX_THREADS: usize = 256;

/// The most threads a command starts here: [`MAX_THREADS`], or the core count
/// where that is more.
pub fn max_threads() -> usize {
    MAX_THREADS.max(cores())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Checks a thread count given as `what` (`--threads 4`): 1 to
/// [`max_threads`].
pub fn check(n: usize, what: &str) -> Result<()> {
    let (cores, max) = (cores(), max_threads());
    match n {
        0 => Err(Error::Threads(format!("{what}: use at least 1 thread"))),
        n if n > max => Err(Error::Threads(format!(
            "{what}: at most {max} threads; this machine has {cores} cores, so {cores} is a good choice"
        ))),
        _ => Ok(()),
    }
}

/// Checks `RAYON_NUM_THREADS` and `RAYON_RS_NUM_CPUS`, which size every
/// parallel loop's pool, before that pool starts: a count rayon would use
/// must be 1 to [`max_threads`]. rayon ignores what is not a number (or is 0)
/// and uses every core, so those pass.
pub fn check_rayon_env() -> Result<()> {
    for var in ["RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS"] {
        let Some(value) = std::env::var_os(var) else {
            continue;
        };
        let text = value.to_string_lossy();
        // As rayon reads it: the whole value, as a number.
        if let Ok(n @ 1..) = text.parse::<usize>() {
            check(n, &format!("{var}={text}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_past_the_limit_are_refused() {
        assert!(check(1, "--threads 1").is_ok());
        assert!(check(MAX_THREADS, "--threads").is_ok());
        assert!(check(max_threads(), "--threads").is_ok());
        let err = check(0, "--threads 0").unwrap_err().to_string();
        assert!(err.contains("--threads 0: use at least 1"), "{err}");
        let err = check(100_000, "--threads 100000").unwrap_err().to_string();
        assert!(
            err.contains(&format!("--threads 100000: at most {}", max_threads()))
                && err.contains("cores"),
            "{err}"
        );
    }
}
