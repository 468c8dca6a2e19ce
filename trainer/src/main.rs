//! `modtrain`: generate the built-in dataset, train and evaluate modulated
//! multi-task retrieval networks. See `modtrain --help`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

// candle allocates and frees large buffers on every op; glibc returns them to the
// kernel each time (mmap/munmap and page faults, measured as much system as user
// time). mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2 and v3 alike: after
/// `eager_commit_delay` = 14, before `use_numa_nodes` = 16); libmimalloc-sys names
/// neither.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory instead of handing it back to the kernel after 10 ms.
///
/// A training step allocates and frees the same few hundred MB every time
/// (im2col columns and their gradients). Returned pages come back zero-filled by
/// the kernel on the next step: at the paper spec that was 36% of a step's samples
/// in `clear_page_erms`, and the step took 5.2 s instead of 4.1 s (`perf` and
/// `modtrain bench-step --spec paper --size 64`, one thread). Memory stays at the
/// peak of one step; it is not leaked.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: sets a plain integer option; mimalloc reads options atomically and
    // accepts changes at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// How long candle's element-wise worker threads spin for more work before they
/// sleep, unless the user set it: candle's default (25 000 spins, about half a
/// millisecond here) kept its pool spinning after each of the backward's gradient
/// additions while rayon's threads (the convolutions, BatchNorm) waited for the same
/// two cores. tiny@48 step, median of 4 runs: 167 → 144 ms with 1000 spins (146
/// with none, 142 with candle's pool off); paper@64 unchanged.
const CANDLE_SPIN_LIMIT: &str = "1000";

#[allow(unsafe_code)]
fn short_candle_spin() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // SAFETY: runs first in `main`, before any thread exists that could read the
        // environment concurrently.
        unsafe { std::env::set_var(VAR, CANDLE_SPIN_LIMIT) };
    }
}

/// Runs `f` on a thread of a rayon pool (`RAYON_NUM_THREADS` threads, like the
/// global one), so that the parallel loops it starts (every convolution and
/// BatchNorm, ~160 per tiny training step) begin on the calling thread: from outside
/// a pool, each one wakes a worker and puts the caller to sleep until it is done.
/// tiny@48 with 2 threads: 5× fewer context switches (`perf stat`), step median
/// 56.2 → 55.0 ms (`scripts/ab_step.sh`, 6 alternating rounds).
fn on_worker_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

fn main() -> ExitCode {
    short_candle_spin();
    keep_freed_memory();
    let args = cli::Cli::parse();
    let result = match modkit_models::threads::check_rayon_env() {
        Err(e) => Err(e.into()),
        Ok(()) => on_worker_thread(|| args.run()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed pipe (`modtrain eval … | head`) is not a failure.
            if err.chain().any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("modtrain: {}", modkit_models::one_line(err.as_ref()));
            ExitCode::from(2)
        }
    }
}
