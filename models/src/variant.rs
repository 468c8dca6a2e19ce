//! [`Variant`]: the methods the paper compares (section 4.2).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Modulation, NetSpec, StageShape};

/// A training variant. The names are the command line's (`--variant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Ours: per-task modulation vectors after blocks N..5 and fc.
    Modulated,
    /// FSN: one fully shared network for all tasks.
    Shared,
    /// ITN: one independent network per task.
    Independent,
    /// IB-K: the shared network, then a per-task linear layer embedding → K.
    Branch { k: usize },
    /// Conditional Similarity Networks: a learned per-task mask on the embedding.
    Csn,
    /// Shared weights frozen (from another checkpoint), only modulation learned.
    OnlyMask,
}

impl Variant {
    /// Whether the network applies per-task modulation vectors.
    pub fn is_modulated(self) -> bool {
        matches!(self, Variant::Modulated | Variant::OnlyMask)
    }

    /// The stage outputs each task scales by its own numbers: every modulated
    /// stage, CSN's fc output (its masks), none for the rest.
    pub fn task_scaled_stages(self, spec: &NetSpec) -> Vec<StageShape> {
        match self {
            _ if self.is_modulated() => spec.modulated_stages(),
            Variant::Csn => spec
                .stages()
                .into_iter()
                .filter(|s| s.name == "fc")
                .collect(),
            _ => Vec::new(),
        }
    }

    /// How many numbers of its own each task feeds a package's runtime switch, one
    /// entry per input: per scaled stage `C` (or `C²` for projection modulation),
    /// and for `branch:K` its head, `K·E` weights then `K` biases. Empty for the
    /// shared network, whose switch takes the features alone.
    pub fn task_numbers(self, spec: &NetSpec) -> Vec<usize> {
        if let Variant::Branch { k } = self {
            return vec![k * spec.embedding, k];
        }
        let square = self.is_modulated() && spec.modulation == Modulation::Projection;
        self.task_scaled_stages(spec)
            .iter()
            .map(|s| {
                if square {
                    s.channels * s.channels
                } else {
                    s.channels
                }
            })
            .collect()
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Variant::Modulated => f.write_str("modulated"),
            Variant::Shared => f.write_str("shared"),
            Variant::Independent => f.write_str("independent"),
            Variant::Branch { k } => write!(f, "branch:{k}"),
            Variant::Csn => f.write_str("csn"),
            Variant::OnlyMask => f.write_str("only-mask"),
        }
    }
}

impl FromStr for Variant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let unknown = || Error::UnknownVariant { name: s.into() };
        match s.to_ascii_lowercase().as_str() {
            "modulated" | "ours" => Ok(Variant::Modulated),
            "shared" | "fsn" => Ok(Variant::Shared),
            "independent" | "itn" => Ok(Variant::Independent),
            "csn" => Ok(Variant::Csn),
            "only-mask" | "only_mask" => Ok(Variant::OnlyMask),
            other => {
                let k = other
                    .strip_prefix("branch:")
                    .or_else(|| other.strip_prefix("ib-"))
                    .ok_or_else(unknown)?;
                match k.parse::<usize>() {
                    Ok(k) if k > crate::NetSpec::MAX_EMBEDDING => Err(Error::InvalidSpec(format!(
                        "{s}: a branch of {k} dimensions is over the {} an embedding may have; use a smaller K",
                        crate::NetSpec::MAX_EMBEDDING
                    ))),
                    Ok(1) => Err(Error::InvalidSpec(format!(
                        "{s}: a one-number branch, L2-normalised, is always ±1 and ranks nothing; use K of at least 2"
                    ))),
                    Ok(k) if k > 0 => Ok(Variant::Branch { k }),
                    _ => Err(unknown()),
                }
            }
        }
    }
}

impl Serialize for Variant {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Variant {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for v in [
            Variant::Modulated,
            Variant::Shared,
            Variant::Independent,
            Variant::Branch { k: 25 },
            Variant::Csn,
            Variant::OnlyMask,
        ] {
            assert_eq!(v.to_string().parse::<Variant>().expect("parse"), v);
        }
        assert_eq!(
            "IB-256".parse::<Variant>().expect("ib"),
            Variant::Branch { k: 256 }
        );
    }

    #[test]
    fn rejects_unknown_and_zero_branch() {
        for bad in ["mixed", "branch:0", "branch:x"] {
            let err = bad.parse::<Variant>().unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("modulated"), "{err}");
        }
        let err = "branch:99999999999999"
            .parse::<Variant>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("over the 16384"), "{err}");
        assert!("branch:16384".parse::<Variant>().is_ok());
        let err = "branch:1".parse::<Variant>().unwrap_err().to_string();
        assert!(
            err.contains("always ±1") && err.contains("at least 2"),
            "{err}"
        );
        assert!("branch:2".parse::<Variant>().is_ok());
    }
}
