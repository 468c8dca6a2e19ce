//! `modrt bench`: median latencies of the trunk, one tail, all tasks' tails in one
//! batched call, and the naive alternative (a full pass per task), all measured in
//! one run so their ratios are meaningful on a noisy machine.

use std::time::Instant;

use serde::Serialize;

use crate::{Error, Input, Model, Result};

/// Medians in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tasks: usize,
    pub runs: usize,
    pub threads: usize,
    pub trunk_ms: f64,
    pub one_tail_ms: f64,
    pub all_tails_ms: f64,
    /// Trunk + one task's tail: one task's embedding of one image.
    pub one_task_ms: f64,
    /// Trunk + all tasks' tails batched: every task's embedding of one image.
    pub all_tasks_ms: f64,
    /// A full pass (trunk + tail) per task.
    pub naive_ms: f64,
    /// Gallery rows searched by [`search_ms`](Report::search_ms).
    pub search_rows: usize,
    /// Exact top-5 search of one task over `search_rows` embeddings.
    pub search_ms: f64,
}

impl Report {
    /// All tasks ÷ one task (theory for the paper spec, 20 tasks, N = 4: ≈ 1.5).
    pub fn all_over_one(&self) -> f64 {
        self.all_tasks_ms / self.one_task_ms
    }

    /// Naive ÷ all tasks (theory for the paper spec, 20 tasks, N = 4: ≈ 13.6).
    pub fn naive_over_all(&self) -> f64 {
        self.naive_ms / self.all_tasks_ms
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The most timed calls per measurement `--runs` may ask for.
pub const MAX_RUNS: usize = 100_000;

/// Median milliseconds of each of `fs` over `runs` rounds, after one warm-up call
/// each. Every round calls each of them once, in turn, so a slow stretch of a
/// noisy machine falls on all of them alike and their ratios hold.
fn time_interleaved<const N: usize>(
    runs: usize,
    mut fs: [&mut dyn FnMut() -> Result<()>; N],
) -> Result<[f64; N]> {
    for f in fs.iter_mut() {
        f()?;
    }
    let mut out: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(runs));
    for _ in 0..runs {
        for (f, times) in fs.iter_mut().zip(&mut out) {
            let t = Instant::now();
            f()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(out.map(median))
}

/// `n` pseudo-random unit rows of `dim` numbers (a fixed LCG: the same every run).
fn random_rows(n: usize, dim: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_u32;
    let mut rows: Vec<f32> = (0..n * dim)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect();
    for r in rows.chunks_mut(dim.max(1)) {
        let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|x| *x /= norm);
    }
    rows
}

/// The largest random gallery [`run`] builds: 4 GiB of embeddings.
pub const MAX_GALLERY_BYTES: usize = 4 << 30;

/// Measures `model` on `image` for `tasks` (package indices), `runs` times each,
/// and a top-5 search over `gallery` random embeddings.
pub fn run(
    model: &Model,
    image: &Input,
    tasks: &[usize],
    runs: usize,
    threads: usize,
    gallery: usize,
) -> Result<Report> {
    if !(1..=MAX_RUNS).contains(&runs) {
        return Err(Error::Invalid(format!(
            "--runs {runs}: time 1 to {MAX_RUNS} calls per measurement (10 is the default)"
        )));
    }
    let dim = model.embedding_dim();
    let most = MAX_GALLERY_BYTES / (4 * dim.max(1));
    if gallery == 0 || gallery > most {
        return Err(Error::Invalid(format!(
            "--gallery {gallery}: the search timing needs 1 to {most} random embeddings of {dim} numbers (4 GiB); 100000 is the default"
        )));
    }
    let features = model.trunk(image)?;
    let first = tasks.first().copied().unwrap_or(0);
    let rows = random_rows(gallery, dim);
    let query = model.embed(&features, first)?;
    let [
        trunk_ms,
        one_tail_ms,
        all_tails_ms,
        one_task_ms,
        all_tasks_ms,
        naive_ms,
    ] = time_interleaved(
        runs,
        [
            &mut || model.trunk(image).map(drop),
            &mut || model.embed(&features, first).map(drop),
            &mut || model.embed_all(&features, tasks).map(drop),
            &mut || model.embed_image(image, first).map(drop),
            &mut || {
                let f = model.trunk(image)?;
                model.embed_all(&f, tasks).map(drop)
            },
            &mut || {
                for &t in tasks {
                    model.embed_image(image, t)?;
                }
                Ok(())
            },
        ],
    )?;
    // On its own: a pass over the whole gallery between the model's calls would
    // leave them a cold cache.
    let [search_ms] = time_interleaved(
        runs,
        [&mut || {
            std::hint::black_box(crate::search::nearest(&rows, dim, &query, 5, |_| false));
            Ok(())
        }],
    )?;
    Ok(Report {
        tasks: tasks.len(),
        runs,
        threads,
        trunk_ms,
        one_tail_ms,
        all_tails_ms,
        one_task_ms,
        all_tasks_ms,
        naive_ms,
        search_rows: gallery,
        search_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
