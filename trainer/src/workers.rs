//! Keeping rayon's workers awake through a training step.
//!
//! A step starts ~160 parallel loops (every convolution and BatchNorm), with
//! candle's own work (autograd, small ops) on the calling thread in between. When
//! such a gap lasts longer than rayon's idle spin (a few dozen `yield`s), the other
//! workers go to sleep, and the next loop waits for the kernel to wake them: 25–130
//! µs each time on this machine (timed around the 1×1 convolutions of the tiny
//! spec, whose work takes 3 µs), ~26 times a tiny step (`perf stat`: 52 context
//! switches a step). OpenMP runtimes avoid the same cost by spinning between
//! parallel regions (`OMP_WAIT_POLICY=active`, Intel's 200 ms `KMP_BLOCKTIME`);
//! [`keep_awake`] does that for the span of a closure.

use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `f` while every other worker of the current rayon pool spins, taking the
/// pool's work as soon as there is any, instead of sleeping between parallel loops.
///
/// Called outside a rayon pool, or in a pool of one thread, it just runs `f`. The
/// results do not depend on it: it changes which thread runs a job and when, not
/// what the job computes. The spinning threads use their CPUs for as long as `f`
/// runs, so it is meant for spans of dense parallel work (a training step's batch,
/// forward and backward). Work that runs on other threads than rayon's (candle's
/// element-wise pool, which the optimizer's update uses) would compete with them.
pub fn keep_awake<R>(f: impl FnOnce() -> R) -> R {
    let Some(owner) = rayon::current_thread_index() else {
        return f();
    };
    let others = rayon::current_num_threads() - 1;
    if others == 0 {
        return f();
    }
    let stop = AtomicBool::new(false);
    rayon::in_place_scope(|scope| {
        for _ in 0..others {
            let stop = &stop;
            scope.spawn(move |_| {
                // A spinner that its own owner picks up (while `f` waits on a
                // parallel loop, say) would spin until `f` ends, which then never
                // comes: it leaves at once instead.
                if rayon::current_thread_index() == Some(owner) {
                    return;
                }
                while !stop.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        let r = f();
        stop.store(true, Ordering::Release);
        r
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use rayon::prelude::*;

    use super::*;

    /// Parallel loops inside run to completion and on several threads, nested
    /// calls and calls from outside a pool return, and the spinners stop.
    #[test]
    fn parallel_work_inside_completes_on_all_threads() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("pool");
        let threads: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        let sum = pool.install(|| {
            keep_awake(|| {
                (0..200)
                    .map(|round| {
                        let inner: u64 = keep_awake(|| {
                            (0..64u64)
                                .into_par_iter()
                                .map(|i| {
                                    let t = rayon::current_thread_index().expect("worker");
                                    threads[t].fetch_add(1, Ordering::Relaxed);
                                    // Long enough that one thread cannot take them all.
                                    let spin = std::time::Instant::now();
                                    while spin.elapsed().as_micros() < 20 {}
                                    i + round
                                })
                                .sum()
                        });
                        inner
                    })
                    .sum::<u64>()
            })
        });
        let want: u64 = (0..200u64)
            .map(|r| (0..64).map(|i| i + r).sum::<u64>())
            .sum();
        assert_eq!(sum, want);
        let busy = threads
            .iter()
            .filter(|t| t.load(Ordering::Relaxed) > 0)
            .count();
        assert!(busy >= 2, "jobs ran on {busy} thread(s)");
        assert_eq!(keep_awake(|| 7), 7, "outside a pool");
    }

    /// With the other worker busy, the spinner stays in the owner's queue, and the
    /// owner, looking for work inside `f`, takes it: it must leave at once, or `f`
    /// never ends. Run on a thread of its own with a deadline, so that the bug is a
    /// failure, not a hang.
    #[test]
    fn the_owner_never_spins() {
        let (done, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .expect("pool");
            let got = pool.install(|| {
                let (started, release) = (AtomicBool::new(false), AtomicBool::new(false));
                rayon::scope(|s| {
                    s.spawn(|_| {
                        started.store(true, Ordering::Release);
                        while !release.load(Ordering::Acquire) {
                            std::hint::spin_loop();
                        }
                    });
                    // The other worker takes the blocker (the owner keeps spinning
                    // here rather than running it itself).
                    while !started.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                    let got = keep_awake(|| {
                        // The owner runs what is queued: the spinner.
                        let ran = rayon::yield_now();
                        (ran, 5)
                    });
                    release.store(true, Ordering::Release);
                    got
                })
            });
            let _ = done.send(got);
        });
        let got = wait
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("keep_awake did not return: the owner ran its own spinner");
        assert_eq!(got, (Some(rayon::Yield::Executed), 5));
    }
}
