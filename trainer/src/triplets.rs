//! Triplet sampling (paper section 4.1): for a task, the anchor and the positive share
//! the task's attribute value and the negative does not.
//!
//! The anchor's class is drawn 50/50 (when both classes can anchor), so rare
//! attributes are not swamped by their majority class. Sampling is a pure function of
//! the seed and a stream id: training triplets use one stream per epoch, the test
//! triplets one fixed stream.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, Split};
use crate::{Error, Result};

/// Indices into the dataset: anchor, positive, negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Triplet {
    pub anchor: usize,
    pub positive: usize,
    pub negative: usize,
}

/// The images of one split with and without one attribute.
#[derive(Debug, Clone)]
pub struct Pools {
    with: Vec<usize>,
    without: Vec<usize>,
}

impl Pools {
    /// Splits `split`'s images by attribute `attr`; errors if no triplet can be formed.
    pub fn new(ds: &Dataset, split: Split, attr: usize) -> Result<Self> {
        let (with, without): (Vec<usize>, Vec<usize>) = ds
            .indices(split)
            .into_iter()
            .partition(|&i| ds.label(i, attr));
        let ok =
            (with.len() >= 2 && !without.is_empty()) || (without.len() >= 2 && !with.is_empty());
        if !ok {
            return Err(Error::EmptySplit {
                task: ds.attributes[attr].clone(),
                split: split.to_string(),
                positives: with.len(),
                negatives: without.len(),
            });
        }
        Ok(Pools { with, without })
    }

    /// Draws one triplet.
    pub fn sample(&self, rng: &mut impl Rng) -> Triplet {
        let can_anchor_with = self.with.len() >= 2;
        let can_anchor_without = self.without.len() >= 2;
        let anchor_with = match (can_anchor_with, can_anchor_without) {
            (true, true) => rng.random_bool(0.5),
            (a, _) => a,
        };
        let (same, other) = if anchor_with {
            (&self.with, &self.without)
        } else {
            (&self.without, &self.with)
        };
        let a = rng.random_range(0..same.len());
        let mut p = rng.random_range(0..same.len() - 1);
        if p >= a {
            p += 1;
        }
        Triplet {
            anchor: same[a],
            positive: same[p],
            negative: other[rng.random_range(0..other.len())],
        }
    }
}

/// The stream id of epoch `epoch`'s training triplets.
pub fn train_stream(epoch: usize) -> u64 {
    1000 + epoch as u64
}

/// The stream id of the fixed test triplets.
pub const TEST_STREAM: u64 = 1;

/// Samples `count` triplets for each attribute in `attrs` from `split`, in task order.
pub fn sample(
    ds: &Dataset,
    split: Split,
    attrs: &[usize],
    count: usize,
    seed: u64,
    stream: u64,
) -> Result<Vec<Vec<Triplet>>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    attrs
        .iter()
        .map(|&a| {
            let pools = Pools::new(ds, split, a)?;
            Ok((0..count).map(|_| pools.sample(&mut rng)).collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triplets_obey_the_attribute_and_splits() {
        let ds = Dataset::synthetic(400, 48, 3);
        let attrs: Vec<usize> = (0..20).collect();
        let all = sample(&ds, Split::Train, &attrs, 200, 7, train_stream(0)).expect("sample");
        for (&a, ts) in attrs.iter().zip(&all) {
            let mut anchors_with = 0;
            for t in ts {
                assert_eq!(ds.label(t.anchor, a), ds.label(t.positive, a));
                assert_ne!(ds.label(t.anchor, a), ds.label(t.negative, a));
                assert_ne!(t.anchor, t.positive);
                for i in [t.anchor, t.positive, t.negative] {
                    assert_eq!(ds.splits[i], Split::Train);
                }
                anchors_with += ds.label(t.anchor, a) as usize;
            }
            // Balanced anchor classes: 100 ± 30 of 200.
            assert!(
                (70..=130).contains(&anchors_with),
                "attr {a}: {anchors_with}"
            );
        }
    }

    #[test]
    fn same_seed_same_triplets_and_epochs_differ() {
        let ds = Dataset::synthetic(200, 48, 3);
        let s = |seed, stream| sample(&ds, Split::Train, &[0, 5], 50, seed, stream).expect("s");
        assert_eq!(s(1, 1000), s(1, 1000));
        assert_ne!(s(1, 1000), s(1, 1001));
        assert_ne!(s(1, 1000), s(2, 1000));
    }

    #[test]
    fn rejects_a_split_without_negatives() {
        let mut ds = Dataset::synthetic(50, 48, 3);
        for i in 0..ds.len() {
            ds.labels[i * 20] = true;
        }
        let err = sample(&ds, Split::Test, &[0], 5, 1, TEST_STREAM)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"smiling\"") && err.contains("test split") && err.contains("0 without"),
            "{err}"
        );
    }
}
