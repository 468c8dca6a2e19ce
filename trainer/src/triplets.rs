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

use crate::data::{Dataset, MISSING, Split};
use crate::{Error, Result};

/// Indices into the dataset: anchor, positive, negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Triplet {
    pub anchor: usize,
    pub positive: usize,
    pub negative: usize,
}

/// The images of one split by their class of one attribute.
#[derive(Debug, Clone)]
pub struct Pools {
    /// Images per class (class index = position); images whose class is missing
    /// are in none.
    classes: Vec<Vec<usize>>,
}

impl Pools {
    /// Sorts `split`'s images by their class of attribute `attr`; errors if no
    /// triplet can be formed.
    pub fn new(ds: &Dataset, split: Split, attr: usize) -> Result<Self> {
        let mut classes: Vec<Vec<usize>> = vec![Vec::new(); 2];
        for i in ds.indices(split) {
            let c = ds.class(i, attr);
            if c == MISSING {
                continue;
            }
            if classes.len() <= c as usize {
                classes.resize(c as usize + 1, Vec::new());
            }
            classes[c as usize].push(i);
        }
        let total: usize = classes.iter().map(Vec::len).sum();
        let largest = classes.iter().map(Vec::len).max().unwrap_or(0);
        let ok = classes.iter().any(|c| c.len() >= 2 && c.len() < total);
        if !ok {
            return Err(Error::EmptySplit {
                task: ds.attributes[attr].clone(),
                split: split.to_string(),
                positives: largest,
                negatives: total - largest,
            });
        }
        Ok(Pools { classes })
    }

    /// Draws one triplet: the anchor's class uniformly among those that can
    /// anchor, the positive from it, the negative uniformly among the images of
    /// the other classes.
    pub fn sample(&self, rng: &mut impl Rng) -> Triplet {
        if let [without, with] = self.classes.as_slice() {
            return Self::sample_binary(with, without, rng);
        }
        let total: usize = self.classes.iter().map(Vec::len).sum();
        let anchors: Vec<usize> = (0..self.classes.len())
            .filter(|&c| self.classes[c].len() >= 2 && self.classes[c].len() < total)
            .collect();
        let ca = anchors[rng.random_range(0..anchors.len())];
        let same = &self.classes[ca];
        let (anchor, positive) = Self::pair(same, rng);
        let mut n = rng.random_range(0..total - same.len());
        let negative = self
            .classes
            .iter()
            .enumerate()
            .filter(|&(c, _)| c != ca)
            .find_map(|(_, imgs)| {
                if n < imgs.len() {
                    Some(imgs[n])
                } else {
                    n -= imgs.len();
                    None
                }
            })
            .unwrap_or(same[0]);
        Triplet {
            anchor,
            positive,
            negative,
        }
    }

    /// Binary attributes: the anchor's class 50/50 where both can anchor.
    fn sample_binary(with: &[usize], without: &[usize], rng: &mut impl Rng) -> Triplet {
        let can_anchor_with = with.len() >= 2 && !without.is_empty();
        let can_anchor_without = without.len() >= 2 && !with.is_empty();
        let anchor_with = match (can_anchor_with, can_anchor_without) {
            (true, true) => rng.random_bool(0.5),
            (a, _) => a,
        };
        let (same, other) = if anchor_with {
            (with, without)
        } else {
            (without, with)
        };
        let (anchor, positive) = Self::pair(same, rng);
        Triplet {
            anchor,
            positive,
            negative: other[rng.random_range(0..other.len())],
        }
    }

    /// Two different images of `same`.
    fn pair(same: &[usize], rng: &mut impl Rng) -> (usize, usize) {
        let a = rng.random_range(0..same.len());
        let mut p = rng.random_range(0..same.len() - 1);
        if p >= a {
            p += 1;
        }
        (same[a], same[p])
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
            ds.labels[i * 20] = 1;
        }
        let err = sample(&ds, Split::Test, &[0], 5, 1, TEST_STREAM)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"smiling\"")
                && err.contains("test split")
                && err.contains("0 in the others"),
            "{err}"
        );
    }

    #[test]
    fn multi_class_triplets_skip_missing_labels() {
        // One attribute with classes 0, 1, 2 and some unknown values.
        let n = 60;
        let labels: Vec<u16> = (0..n)
            .map(|i| if i % 7 == 0 { MISSING } else { (i % 3) as u16 })
            .collect();
        let ds = Dataset {
            attributes: vec!["heel".into()],
            files: (0..n).map(|i| format!("{i}.jpg")).collect(),
            labels,
            classes: vec![vec!["flat".into(), "low".into(), "high".into()]],
            splits: vec![Split::Train; n],
            image_size: 1,
            fit: crate::data::Fit::Crop,
            pixels: vec![0; n * 3],
            notes: Vec::new(),
            csn_splits: None,
        };
        let ts = sample(&ds, Split::Train, &[0], 600, 3, 0).expect("sample");
        let mut anchors = [0usize; 3];
        let mut negatives = [0usize; 3];
        for t in &ts[0] {
            let (a, p, q) = (
                ds.class(t.anchor, 0),
                ds.class(t.positive, 0),
                ds.class(t.negative, 0),
            );
            assert!(a != MISSING && q != MISSING, "{t:?}");
            assert_eq!(a, p);
            assert_ne!(a, q);
            assert_ne!(t.anchor, t.positive);
            anchors[a as usize] += 1;
            negatives[q as usize] += 1;
        }
        for c in 0..3 {
            assert!(
                (150..=250).contains(&anchors[c]),
                "anchor classes {anchors:?}"
            );
            assert!(negatives[c] > 100, "negative classes {negatives:?}");
        }
        // Only one known class in the split: no triplet.
        let mut one = ds.clone();
        one.labels
            .iter_mut()
            .for_each(|l| *l = if *l == MISSING { 2 } else { MISSING });
        let err = sample(&one, Split::Train, &[0], 5, 3, 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"heel\"") && err.contains("0 in the others"),
            "{err}"
        );
    }
}
