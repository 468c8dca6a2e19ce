//! A dependency's panic as an error: tract indexes out of bounds on some
//! malformed graphs instead of returning an error, and a package or model file
//! is user input.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::sync::Once;

thread_local! {
    /// Set while this thread runs inside [`catch_panic`]: its panics are caught,
    /// so the panic hook stays quiet for them.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

static QUIET_HOOK: Once = Once::new();

/// Runs `f`; a panic inside it comes back as `Err(its message)` instead of
/// unwinding further, and is not printed (other threads' panics still are).
/// For code this project does not own; its own code returns errors.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CATCHING.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let outer = CATCHING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_values_pass_through() {
        assert_eq!(catch_panic(|| 7), Ok(7));
        let v: Vec<u8> = Vec::new();
        let err = catch_panic(|| v[3]).expect_err("out of bounds");
        assert!(err.contains("index out of bounds"), "{err}");
        #[allow(clippy::panic)]
        let err = catch_panic(|| -> u8 { panic!("graph {} is bad", 2) }).expect_err("formatted");
        assert_eq!(err, "graph 2 is bad");
        // Nested: the inner catch leaves the outer one catching.
        let err = catch_panic(|| {
            let _ = catch_panic(|| v[1]);
            v[2]
        })
        .expect_err("outer");
        assert!(err.contains("index out of bounds"), "{err}");
    }
}
