//! Exact k-nearest-neighbour search: squared L2 over contiguous f32 rows, a
//! branch-free inner loop the compiler vectorises, and a bounded max-heap so the
//! cost is `O(n·d + n·log k)` with `k` entries of extra memory.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One result: the row and its squared distance to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub row: usize,
    pub distance: f32,
}

/// Heap order: larger distance first, ties broken by the larger row, so the
/// result is a total order (deterministic for equal distances).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Worst(Hit);

impl Eq for Worst {}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .distance
            .total_cmp(&other.0.distance)
            .then(self.0.row.cmp(&other.0.row))
    }
}

/// Squared Euclidean distance; 8 independent accumulators let it vectorise.
#[inline]
pub fn squared_l2(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| (x - y) * (x - y)).sum();
    acc.iter().sum::<f32>() + tail
}

/// The `k` rows of `rows` (`n × dim`, row-major) nearest to `query`, nearest
/// first; rows for which `skip(row)` is true are left out.
pub fn nearest(
    rows: &[f32],
    dim: usize,
    query: &[f32],
    k: usize,
    skip: impl Fn(usize) -> bool,
) -> Vec<Hit> {
    if k == 0 || dim == 0 || query.len() != dim {
        return Vec::new();
    }
    // More than the gallery is the gallery (and `-k 1e18` no allocation failure).
    let k = k.min(rows.len() / dim);
    let mut heap: BinaryHeap<Worst> = BinaryHeap::with_capacity(k + 1);
    for (row, r) in rows.chunks_exact(dim).enumerate() {
        // A NaN (a broken embedding) ranks last, whatever its sign bit.
        let distance = match squared_l2(r, query) {
            d if d.is_nan() => f32::INFINITY,
            d => d,
        };
        if heap.len() == k {
            // `peek` is Some: the heap holds k ≥ 1 entries.
            if let Some(worst) = heap.peek()
                && distance >= worst.0.distance
            {
                continue;
            }
        }
        if skip(row) {
            continue;
        }
        heap.push(Worst(Hit { row, distance }));
        if heap.len() > k {
            heap.pop();
        }
    }
    heap.into_sorted_vec().into_iter().map(|w| w.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(rows: &[f32], dim: usize, q: &[f32], k: usize) -> Vec<usize> {
        let mut all: Vec<(f32, usize)> = rows
            .chunks(dim)
            .enumerate()
            .map(|(i, r)| (r.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum(), i))
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        all.into_iter().take(k).map(|x| x.1).collect()
    }

    #[test]
    fn matches_a_full_sort() {
        // A fixed pseudo-random table (an LCG) with odd dim to exercise the remainder.
        let (n, dim) = (1000, 13);
        let mut s = 12345u32;
        let rows: Vec<f32> = (0..n * dim)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1 << 24) as f32
            })
            .collect();
        let q = &rows[17 * dim..18 * dim].to_vec();
        for k in [1, 5, 64, 1000, 5000] {
            let got: Vec<usize> = nearest(&rows, dim, q, k, |_| false)
                .iter()
                .map(|h| h.row)
                .collect();
            assert_eq!(got, brute(&rows, dim, q, k), "k={k}");
        }
        let hits = nearest(&rows, dim, q, 3, |r| r == 17);
        assert!(hits.iter().all(|h| h.row != 17));
        assert!(hits.windows(2).all(|w| w[0].distance <= w[1].distance));
    }

    #[test]
    fn nan_distances_rank_last() {
        let negative_nan = f32::from_bits(0xFFC0_0000);
        for nan in [f32::NAN, negative_nan] {
            let rows = [nan, 0.5, 3.0];
            let hits: Vec<usize> = nearest(&rows, 1, &[0.0], 3, |_| false)
                .iter()
                .map(|h| h.row)
                .collect();
            assert_eq!(hits, [1, 2, 0]);
        }
    }

    #[test]
    fn ties_are_ordered_by_row_and_k_zero_is_empty() {
        let rows = vec![1.0, 1.0, 0.0, 1.0];
        let hits = nearest(&rows, 1, &[1.0], 3, |_| false);
        assert_eq!(hits.iter().map(|h| h.row).collect::<Vec<_>>(), [0, 1, 3]);
        assert!(nearest(&rows, 1, &[1.0], 0, |_| false).is_empty());
        // A k past any allocation is the whole gallery.
        assert_eq!(nearest(&rows, 1, &[1.0], usize::MAX, |_| false).len(), 4);
    }
}
