//! [`NetSpec`]: the network of the paper's Table 2, made configurable.
//!
//! ```text
//! input  3×S×S
//! conv1  3×3 valid conv, ReLU                        → w0 × (S−2)
//! block2 3×3 valid conv, ReLU, 2×2 max-pool (floor),
//!        residual block (two 3×3 same convs)         → w1 × ⌊(S−4)/2⌋
//! block3..block5 likewise                            → w2, w3, w4
//! fc     flatten → embedding, L2-normalised
//! ```
//!
//! Modulation (paper section 3.2) scales the output of every block from
//! `first_modulated` (the paper's N) on, and the fc output, by a per-task vector
//! (or a C×C projection). Everything before the first modulated block output is
//! task-independent: the *trunk* (conv1..block N); the rest is the per-task *tail*.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How a task modulates a feature map (paper section 3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Modulation {
    /// Equation 5: `x'[c] = x[c] · w[c]`, C numbers per task and layer.
    Vector,
    /// Equation 4: `x'[i] = Σ_j x[j] · w[i, j]`, C×C numbers per task and layer.
    Projection,
}

/// The network description shared by trainer, compiler and runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSpec {
    /// Preset name (`paper`, `tiny`) or `custom`.
    pub name: String,
    /// Square input side in pixels.
    pub input_size: usize,
    /// Input channels (3 for RGB).
    pub in_channels: usize,
    /// Output channels of conv1, block2, block3, block4, block5.
    pub widths: [usize; 5],
    /// Embedding size (fc output).
    pub embedding: usize,
    /// The first block whose output is modulated (the paper's N, 2..=5).
    pub first_modulated: usize,
    /// Channel-wise vector (the paper's default) or projection.
    pub modulation: Modulation,
    /// BatchNorm after every conv and fc, as the authors' released code does.
    /// With BatchNorm the conv and fc layers carry no bias.
    pub batch_norm: bool,
}

/// One stage's output shape: `channels × size × size` (size 1 for fc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageShape {
    /// `conv1`, `block2`..`block5`, `fc`.
    pub name: &'static str,
    pub channels: usize,
    pub size: usize,
}

/// The BatchNorm epsilon of every BN layer (trainer and compiler must agree).
pub const BATCH_NORM_EPS: f64 = 1e-5;

const BLOCK_NAMES: [&str; 4] = ["block2", "block3", "block4", "block5"];
const PRESETS: &str = "paper, tiny";

impl NetSpec {
    /// The paper's Table 2: 3×150×150, widths 32, 64, 128, 128, 128, fc 256,
    /// modulation from block 4, BatchNorm (as in the authors' code).
    pub fn paper() -> Self {
        NetSpec {
            name: "paper".into(),
            input_size: 150,
            in_channels: 3,
            widths: [32, 64, 128, 128, 128],
            embedding: 256,
            first_modulated: 4,
            modulation: Modulation::Vector,
            batch_norm: true,
        }
    }

    /// Same topology, small enough to train on two CPU cores in minutes: 3×48×48,
    /// widths 8, 16, 32, 32, 32, embedding 32.
    pub fn tiny() -> Self {
        NetSpec {
            name: "tiny".into(),
            input_size: 48,
            in_channels: 3,
            widths: [8, 16, 32, 32, 32],
            embedding: 32,
            first_modulated: 4,
            modulation: Modulation::Vector,
            batch_norm: true,
        }
    }

    /// A preset by name.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "paper" => Ok(Self::paper()),
            "tiny" => Ok(Self::tiny()),
            _ => Err(Error::UnknownPreset {
                name: name.into(),
                available: PRESETS.into(),
            }),
        }
    }

    /// Checks that every stage has at least one pixel and the fields are in range.
    pub fn validate(&self) -> Result<()> {
        if !(2..=5).contains(&self.first_modulated) {
            return Err(Error::InvalidSpec(format!(
                "first modulated block is {}, use 2, 3, 4 or 5",
                self.first_modulated
            )));
        }
        if self.widths.contains(&0) || self.embedding == 0 || self.in_channels == 0 {
            return Err(Error::InvalidSpec(format!(
                "widths {:?}, embedding {} and input channels {} must all be positive",
                self.widths, self.embedding, self.in_channels
            )));
        }
        if self.embedding == 1 {
            return Err(Error::InvalidSpec(
                "embedding 1: one number, L2-normalised, is always ±1 and ranks nothing; use at least 2".into(),
            ));
        }
        let bounds = [
            ("input size", self.input_size, Self::MAX_INPUT),
            ("embedding", self.embedding, Self::MAX_EMBEDDING),
            (
                "width",
                self.widths.into_iter().max().unwrap_or(0),
                Self::MAX_WIDTH,
            ),
        ];
        for (what, value, max) in bounds {
            if value > max {
                return Err(Error::InvalidSpec(format!(
                    "{what} {value} is over the {max} a network may have; use a smaller one"
                )));
            }
        }
        let mut size = self.input_size as i64 - 2;
        let mut stage = "conv1";
        if size >= 1 {
            for name in BLOCK_NAMES {
                stage = name;
                size = (size - 2) / 2;
                if size < 1 {
                    break;
                }
            }
        }
        if size < 1 {
            return Err(Error::InputTooSmall {
                what: self.name.clone(),
                input: self.input_size,
                reached: size.max(0),
                stage,
                minimum: Self::MIN_INPUT,
            });
        }
        let params = crate::ParamCount::base_network(self);
        if params > Self::MAX_PARAMS {
            return Err(Error::InvalidSpec(format!(
                "widths {:?}, embedding {} at {}×{} make {params} parameters, over the {} a network may have; use smaller widths, embedding or input size",
                self.widths,
                self.embedding,
                self.input_size,
                self.input_size,
                Self::MAX_PARAMS
            )));
        }
        Ok(())
    }

    /// The largest input side (the paper's is 150).
    pub const MAX_INPUT: usize = 1024;
    /// The most channels of a layer (the paper's widest is 128).
    pub const MAX_WIDTH: usize = 4096;
    /// The largest embedding (the paper's is 256); also bounds `branch:K`.
    pub const MAX_EMBEDDING: usize = 16384;
    /// The most parameters of one network (1 GB of f32; the paper's has 2.9M).
    pub const MAX_PARAMS: usize = 250_000_000;

    /// The smallest input side for which block5 still has one pixel.
    pub const MIN_INPUT: usize = 48;

    /// Output shapes of conv1, block2..block5 and fc, in order.
    /// Call [`NetSpec::validate`] first: sizes saturate at 0 for invalid specs.
    pub fn stages(&self) -> Vec<StageShape> {
        let mut size = self.input_size.saturating_sub(2);
        let mut out = vec![StageShape {
            name: "conv1",
            channels: self.widths[0],
            size,
        }];
        for (i, name) in BLOCK_NAMES.iter().enumerate() {
            size = size.saturating_sub(2) / 2;
            out.push(StageShape {
                name,
                channels: self.widths[i + 1],
                size,
            });
        }
        out.push(StageShape {
            name: "fc",
            channels: self.embedding,
            size: 1,
        });
        out
    }

    /// The flattened input length of fc: block5's `C·H·W`.
    pub fn fc_inputs(&self) -> usize {
        let s = &self.stages()[4];
        s.channels * s.size * s.size
    }

    /// The stages whose outputs are modulated: blocks `first_modulated..=5`, then fc.
    pub fn modulated_stages(&self) -> Vec<StageShape> {
        self.stages()
            .into_iter()
            .skip(self.first_modulated - 1)
            .collect()
    }

    /// Numbers one task adds: the sum over modulated stages of C (vector) or C² (projection).
    pub fn task_params(&self) -> usize {
        self.modulated_stages()
            .iter()
            .map(|s| match self.modulation {
                Modulation::Vector => s.channels,
                Modulation::Projection => s.channels * s.channels,
            })
            .sum()
    }

    /// Multiply-accumulates per image: `(trunk, tail)`, where the trunk is conv1..block N
    /// and the tail is block N+1..5 plus fc.
    pub fn macs(&self) -> (u64, u64) {
        let stages = self.stages();
        let conv = |cin: usize, cout: usize, size: usize| (cin * 9 * cout * size * size) as u64;
        let mut per_stage = vec![conv(self.in_channels, self.widths[0], stages[0].size)];
        for pair in stages[..5].windows(2) {
            let (prev, s) = (&pair[0], &pair[1]);
            let conv_size = prev.size.saturating_sub(2);
            per_stage.push(
                conv(prev.channels, s.channels, conv_size)
                    + 2 * conv(s.channels, s.channels, s.size),
            );
        }
        let fc = (self.fc_inputs() * self.embedding) as u64;
        let trunk: u64 = per_stage[..self.first_modulated].iter().sum();
        let tail: u64 = per_stage[self.first_modulated..].iter().sum::<u64>() + fc;
        (trunk, tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_stage_sizes_match_table_2() {
        let got: Vec<_> = NetSpec::paper()
            .stages()
            .iter()
            .map(|s| (s.name, s.channels, s.size))
            .collect();
        assert_eq!(
            got,
            vec![
                ("conv1", 32, 148),
                ("block2", 64, 73),
                ("block3", 128, 35),
                ("block4", 128, 16),
                ("block5", 128, 7),
                ("fc", 256, 1),
            ]
        );
        assert_eq!(NetSpec::paper().fc_inputs(), 6272);
    }

    #[test]
    fn paper_trunk_and_tail_macs_match_design() {
        let (trunk, tail) = NetSpec::paper().macs();
        assert_eq!(trunk / 10_000_000, 177, "trunk {trunk}");
        assert_eq!(tail / 1_000_000, 44, "tail {tail}");
    }

    /// Sizes past any real network are refused before anything is allocated
    /// (they used to abort on allocation, or overflow).
    #[test]
    fn oversized_networks_are_refused() {
        type Change = fn(&mut NetSpec);
        let cases: [(Change, &str); 6] = [
            (
                |s| s.input_size = usize::MAX,
                "input size 18446744073709551615",
            ),
            (|s| s.embedding = 100_000_000_000, "embedding 100000000000"),
            (|s| s.embedding = 1, "embedding 1: one number"),
            (|s| s.widths[1] = 100_000_000, "width 100000000"),
            (|s| s.widths = [4096; 5], "parameters"),
            (
                |s| {
                    s.input_size = 1024;
                    s.embedding = 16384;
                },
                "parameters",
            ),
        ];
        for (change, want) in cases {
            let mut s = NetSpec::tiny();
            change(&mut s);
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        let mut s = NetSpec::paper();
        s.input_size = NetSpec::MAX_INPUT;
        s.validate().expect("the largest input");
    }

    #[test]
    fn presets_validate_and_minimum_input_is_tight() {
        NetSpec::paper().validate().expect("paper");
        NetSpec::tiny().validate().expect("tiny");
        let mut s = NetSpec::tiny();
        s.input_size = NetSpec::MIN_INPUT;
        s.validate().expect("minimum");
        s.input_size = NetSpec::MIN_INPUT - 1;
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("47×47") && err.contains("at least 48"),
            "{err}"
        );
    }

    #[test]
    fn rejects_out_of_range_modulation_start() {
        let mut s = NetSpec::paper();
        s.first_modulated = 1;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("use 2, 3, 4 or 5")
        );
    }

    #[test]
    fn unknown_preset_lists_presets() {
        let err = NetSpec::preset("huge").unwrap_err().to_string();
        assert!(err.contains("paper, tiny"), "{err}");
    }

    #[test]
    fn serde_round_trip() {
        let s = NetSpec::paper();
        let json = serde_json::to_string(&s).expect("ser");
        assert_eq!(serde_json::from_str::<NetSpec>(&json).expect("de"), s);
    }
}
