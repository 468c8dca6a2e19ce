//! Exact parameter counting per variant: what is shared and what each task adds.

use crate::{NetSpec, Variant};

/// Trainable parameters of a spec and variant (BatchNorm running statistics are
/// buffers and not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCount {
    /// Parameters every task uses.
    pub shared: usize,
    /// Parameters each task adds.
    pub per_task: usize,
    /// Number of tasks.
    pub tasks: usize,
}

impl ParamCount {
    /// Counts the parameters of `variant` on `spec` for `tasks` tasks.
    pub fn of(spec: &NetSpec, variant: &Variant, tasks: usize) -> Self {
        let base = Self::base_network(spec);
        let (shared, per_task) = match variant {
            Variant::Modulated | Variant::OnlyMask => (base, spec.task_params()),
            Variant::Shared => (base, 0),
            Variant::Independent => (0, base),
            Variant::Branch { k } => (base, spec.embedding * k + k),
            Variant::Csn => (base, spec.embedding),
        };
        ParamCount {
            shared,
            per_task,
            tasks,
        }
    }

    /// Parameters of one plain network of `spec`.
    pub fn base_network(spec: &NetSpec) -> usize {
        let w = spec.widths;
        // Each layer: weights, then a bias, or BatchNorm's scale and shift.
        let extra = if spec.batch_norm { 2 } else { 1 };
        let layer = |cin: usize, cout: usize| cin * cout + extra * cout;
        let mut n = layer(spec.in_channels * 9, w[0]);
        for k in 1..5 {
            n += layer(w[k - 1] * 9, w[k]) + 2 * layer(w[k] * 9, w[k]);
        }
        n + layer(spec.fc_inputs(), spec.embedding)
    }

    /// All task-specific parameters: `per_task × tasks`.
    pub fn task_specific(&self) -> usize {
        self.per_task * self.tasks
    }

    /// Everything: shared plus task-specific.
    pub fn total(&self) -> usize {
        self.shared + self.task_specific()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::schema;
    use crate::tasks::CELEBA_20;

    fn tasks(n: usize) -> Vec<String> {
        CELEBA_20[..n].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn paper_numbers() {
        let mut spec = NetSpec::paper();
        spec.batch_norm = false;
        // Table 2 with biases: 2,953,664 parameters, "about 3M".
        assert_eq!(ParamCount::base_network(&spec), 2_953_664);
        spec.batch_norm = true;
        // BatchNorm drops the biases and adds scale and shift: one extra number per channel.
        assert_eq!(ParamCount::base_network(&spec), 2_955_296);

        let m = ParamCount::of(&spec, &Variant::Modulated, 20);
        assert_eq!(m.per_task, 512);
        assert_eq!(m.task_specific(), 10_240); // "10k"
        let itn = ParamCount::of(&spec, &Variant::Independent, 20);
        assert_eq!(itn.shared, 0);
        assert_eq!(itn.total() / 1_000_000, 59); // 20 networks
        let ib256 = ParamCount::of(&spec, &Variant::Branch { k: 256 }, 20);
        assert_eq!(ib256.task_specific(), 1_315_840); // "1.3M"
        let ib25 = ParamCount::of(&spec, &Variant::Branch { k: 25 }, 20);
        assert_eq!(ib25.task_specific(), 128_500); // "128k"
        assert_eq!(
            ParamCount::of(&spec, &Variant::Shared, 20).task_specific(),
            0
        );
    }

    #[test]
    fn modulation_from_block2_and_projection() {
        let mut spec = NetSpec::paper();
        spec.first_modulated = 2;
        assert_eq!(
            ParamCount::of(&spec, &Variant::Modulated, 1).per_task,
            64 + 128 * 3 + 256
        );
        spec.first_modulated = 4;
        spec.modulation = crate::Modulation::Projection;
        assert_eq!(
            ParamCount::of(&spec, &Variant::Modulated, 1).per_task,
            128 * 128 * 2 + 256 * 256
        );
    }

    #[test]
    fn counts_agree_with_the_checkpoint_schema() {
        for spec in [NetSpec::paper(), NetSpec::tiny()] {
            for variant in [
                Variant::Modulated,
                Variant::Shared,
                Variant::Independent,
                Variant::Branch { k: 25 },
                Variant::Csn,
                Variant::OnlyMask,
            ] {
                let t = tasks(3);
                let from_schema: usize = schema(&spec, &variant, &t)
                    .iter()
                    .filter(|e| e.trainable)
                    .map(|e| e.shape.iter().product::<usize>())
                    .sum();
                assert_eq!(
                    from_schema,
                    ParamCount::of(&spec, &variant, 3).total(),
                    "{} {variant}",
                    spec.name
                );
            }
        }
    }
}
