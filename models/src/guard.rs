//! A dependency's panic as an error: tract indexes out of bounds on some
//! malformed graphs instead of returning an error, and a package or model file
//! is user input.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, PanicHookInfo};
use std::sync::{Mutex, Once};

/// The dependencies whose panics a running [`catch_panic`] catches (one entry
/// per running call): the panic hook stays quiet for panics in their source,
/// on any thread (tract's own pool threads included), and only for those.
static CATCHING: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

static QUIET_HOOK: Once = Once::new();

thread_local! {
    /// How many [`catch_panic`] calls run on this thread.
    static GUARDS: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f`, which calls into the dependency whose source files' paths contain
/// `dependency` (`"/tract-"`); a panic comes back as `Err(its message)` instead
/// of unwinding further. While it runs, that dependency's panics are not
/// printed, nor those the standard library raises on this thread on its behalf
/// (`capacity overflow`, an overflowing `sum`: their location is the standard
/// library's own source); every other panic still is. For code this project
/// does not own: its own code returns errors.
pub fn catch_panic<T>(dependency: &'static str, f: impl FnOnce() -> T) -> Result<T, String> {
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !caught(info) {
                previous(info);
            }
        }));
    });
    catching().push(dependency);
    GUARDS.with(|g| g.set(g.get() + 1));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    GUARDS.with(|g| g.set(g.get() - 1));
    let mut active = catching();
    if let Some(i) = active.iter().position(|d| *d == dependency) {
        active.swap_remove(i);
    }
    drop(active);
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

fn catching() -> std::sync::MutexGuard<'static, Vec<&'static str>> {
    CATCHING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a running [`catch_panic`] catches a panic at `info`'s location.
fn caught(info: &PanicHookInfo) -> bool {
    info.location().is_some_and(|l| quiet(l.file()))
}

/// Whether a panic in source file `file` on this thread is a guarded
/// dependency's: in its source on any thread, or in the standard library's on a
/// thread running a guard.
fn quiet(file: &str) -> bool {
    catching().iter().any(|d| file.contains(d)) || (GUARDS.with(Cell::get) > 0 && in_std(file))
}

/// Whether `file` is the standard library's source as panics name it
/// (`/rustc/<commit>/library/alloc/src/raw_vec/mod.rs`).
fn in_std(file: &str) -> bool {
    ["core", "alloc", "std"]
        .iter()
        .any(|c| file.contains(&format!("library/{c}/src/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_values_pass_through() {
        assert_eq!(catch_panic("/none-", || 7), Ok(7));
        let v: Vec<u8> = Vec::new();
        let err = catch_panic("/none-", || v[3]).expect_err("out of bounds");
        assert!(err.contains("index out of bounds"), "{err}");
        #[allow(clippy::panic)]
        let err = catch_panic("/none-", || -> u8 { panic!("graph {} is bad", 2) })
            .expect_err("formatted");
        assert_eq!(err, "graph 2 is bad");
    }

    /// Quiet for the guarded dependency's files while a guard runs (a nested
    /// one included), for nothing else, and not after.
    #[test]
    fn only_the_guarded_dependencys_panics_are_quiet() {
        let tract = "/root/.cargo/registry/src/x/tract-core-0.23.9/src/ops/cnn/padding.rs";
        let ours = "runtime/src/model.rs";
        let inside = catch_panic("/tract-", || {
            let nested = catch_panic("/tract-", || quiet(tract)).expect("nested");
            (nested, quiet(tract), quiet(ours))
        });
        assert_eq!(inside, Ok((true, true, false)));
        // Other tests may guard "/none-" meanwhile, never "/tract-".
        assert!(!quiet(tract));
    }

    /// The standard library's panics are quiet on a thread running a guard
    /// only, and come back as the error.
    #[test]
    fn the_standard_librarys_panics_are_quiet_under_a_guard_only() {
        let alloc = "/rustc/5980761/library/alloc/src/raw_vec/mod.rs";
        assert!(!quiet(alloc));
        let inside = catch_panic("/none-", || {
            let here = quiet(alloc);
            let elsewhere = std::thread::spawn(move || quiet(alloc)).join();
            (here, elsewhere.expect("thread"))
        });
        assert_eq!(inside, Ok((true, false)));
        assert!(!quiet(alloc));
        let err = catch_panic("/none-", || {
            let v: Vec<u64> = Vec::with_capacity(usize::MAX);
            v.len()
        })
        .expect_err("too large");
        assert!(err.contains("capacity overflow"), "{err}");
        assert!(!quiet(alloc), "the guard count is back after a panic");
    }
}
