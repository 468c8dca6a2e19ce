//! The network of the paper's Table 2 in candle, with the modulation module of
//! section 3.2 and the variants of section 4.2.
//!
//! Every conv (and fc) is followed by BatchNorm when the spec says so, as in the
//! authors' released code. A block is `conv → BN → ReLU → 2×2 max-pool`, then a
//! residual block `y + BN(conv(ReLU(BN(conv(y)))))` and a ReLU. Modulation multiplies
//! the output of blocks N..5 and of fc by `ReLU(w_t)` (vector) or `W_t` (projection)
//! of each sample's task. The embedding is L2-normalised.
//!
//! Variables live under the names of [`modkit_models::names`], so a `VarMap` saved
//! by name *is* a checkpoint.

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{BatchNorm, BatchNormConfig, ModuleT, VarBuilder, VarMap};
use modkit_models::names::{self, TensorEntry};
use modkit_models::{Modulation, NetSpec, Variant};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::Result;
use crate::ops::{ConvBnParams, conv3x3_channel_major, max_pool2x2};

fn bn_config() -> BatchNormConfig {
    BatchNormConfig {
        eps: modkit_models::BATCH_NORM_EPS,
        remove_mean: true,
        affine: true,
        momentum: 0.1,
    }
}

/// BatchNorm over channel 1 of `[B, C, …]`: in training mode on the CPU the fused
/// kernel of [`crate::ops::batch_norm_train`] (with the following ReLU folded in),
/// otherwise candle-nn's. Both update the same running statistics.
#[derive(Debug)]
struct Norm {
    inner: BatchNorm,
    running_mean: Var,
    running_var: Var,
    /// Part of a fixed network (`only-mask`): outside batch statistics, an
    /// affine map per channel on constant statistics ([`Norm::frozen_affine`]).
    frozen: bool,
}

impl Norm {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let inner = candle_nn::batch_norm(channels, bn_config(), vb)?;
        // The VarMap's own variables: setting these updates the checkpoint's values.
        let running_mean = Var::from_tensor(inner.running_mean())?;
        let running_var = Var::from_tensor(inner.running_var())?;
        Ok(Norm {
            inner,
            running_mean,
            running_var,
            frozen: false,
        })
    }

    /// `(x − mean) · γ/√(var + ε) + β` on the running statistics, which are
    /// constants here, broadcast over `x` along `axis`; `None` without γ and β.
    /// Gradients reach `x`, γ and β (whose products the UCR compares), not the
    /// statistics.
    fn frozen_affine(&self, x: &Tensor, axis: usize) -> Result<Option<Tensor>> {
        let Some((gamma, beta)) = self.inner.weight_and_bias() else {
            return Ok(None);
        };
        let mut shape = vec![1; x.rank()];
        shape[axis] = x.dim(axis)?;
        let var = self.running_var.as_tensor().detach();
        let mean = self
            .running_mean
            .as_tensor()
            .detach()
            .reshape(shape.clone())?;
        let scale = (gamma / (var + self.inner.eps())?.sqrt()?)?.reshape(shape.clone())?;
        let y = x.broadcast_sub(&mean)?.broadcast_mul(&scale)?;
        Ok(Some(y.broadcast_add(&beta.reshape(shape)?)?))
    }

    /// [`Norm::frozen_affine`] where this BatchNorm is part of a frozen network
    /// and runs on its running statistics, in training and evaluation alike.
    /// candle-nn's evaluation form also differentiates the statistics, on the
    /// transposed layout, and made only-mask's backward ~6× the modulated
    /// network's.
    fn frozen_forward(&self, x: &Tensor, axis: usize) -> Result<Option<Tensor>> {
        if !self.frozen {
            return Ok(None);
        }
        self.frozen_affine(x, axis)
    }

    /// `BN(x) (+ skip) (→ ReLU when relu)` of channel-major `xc: [C, B, …]`; the
    /// result is batch-major `[B, C, …]`.
    fn forward(
        &self,
        xc: &Tensor,
        train: bool,
        relu: bool,
        skip: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let Some(y) = self.frozen_forward(xc, 0)? {
            return skip_relu(y.transpose(0, 1)?, relu, skip);
        }
        let Some((gamma, beta)) = self.fused_affine(xc, train) else {
            return self.forward_batch_major(&xc.transpose(0, 1)?, train, relu, skip);
        };
        let eps = self.inner.eps();
        let (y, stats) = crate::ops::batch_norm_train(xc, gamma, beta, eps, relu, skip)?;
        self.update_running(&stats, xc.device())?;
        Ok(y)
    }

    /// [`Norm::forward`] of batch-major `x: [B, C, …]`, off the fused CPU kernels:
    /// cuDNN's BatchNorm where it applies, candle-nn's otherwise.
    fn forward_batch_major(
        &self,
        x: &Tensor,
        train: bool,
        relu: bool,
        skip: Option<&Tensor>,
    ) -> Result<Tensor> {
        let y = match self.frozen_forward(x, 1)? {
            Some(y) => y,
            None => match self.gpu_forward(x, train)? {
                Some(y) => y,
                None => self.inner.forward_t(x, train)?,
            },
        };
        skip_relu(y, relu, skip)
    }

    /// Training-mode BatchNorm of batch-major `x` through cuDNN, with the running
    /// averages updated, where it applies ([`crate::ops::batch_norm_train_gpu`]).
    fn gpu_forward(&self, x: &Tensor, train: bool) -> Result<Option<Tensor>> {
        let Some((gamma, beta)) = self.inner.weight_and_bias().filter(|_| train) else {
            return Ok(None);
        };
        let eps = self.inner.eps();
        let Some((y, mean, var)) = crate::ops::batch_norm_train_gpu(x, gamma, beta, eps)? else {
            return Ok(None);
        };
        self.update_running_from(&mean, &var, x.elem_count() / mean.elem_count().max(1))?;
        Ok(Some(y))
    }

    /// γ and β when a fused CPU node applies to `x` ([`fused_applies`]).
    fn fused_affine(&self, x: &Tensor, train: bool) -> Option<(&Tensor, &Tensor)> {
        self.inner
            .weight_and_bias()
            .filter(|_| fused_applies(x, train))
    }

    /// What a fused conv + BatchNorm node takes besides the weight: γ, β, and a
    /// frozen network's running statistics as constants.
    fn affine(&self) -> Result<Option<Affine>> {
        let Some((gamma, beta)) = self.inner.weight_and_bias() else {
            return Ok(None);
        };
        let fixed = if self.frozen {
            let var = self.running_var.as_tensor().detach();
            let invstd = (var + self.inner.eps())?.sqrt()?.recip()?;
            Some((self.running_mean.as_tensor().detach(), invstd))
        } else {
            None
        };
        Ok(Some(Affine {
            gamma: gamma.clone(),
            beta: beta.clone(),
            fixed,
        }))
    }

    /// Moves the running averages towards one batch's statistics, as candle-nn does
    /// (the unbiased variance).
    fn update_running(&self, stats: &crate::ops::BatchStats, dev: &Device) -> Result<()> {
        let mean = Tensor::new(stats.mean.as_slice(), dev)?;
        let var = Tensor::new(stats.var.as_slice(), dev)?;
        self.update_running_from(&mean, &var, stats.count)
    }

    /// The same from the batch's per-channel `mean` and biased `var` over `count`
    /// values per channel.
    fn update_running_from(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        let momentum = self.inner.momentum();
        let n = count as f64;
        self.running_mean
            .set(&((self.running_mean.as_tensor() * (1.0 - momentum))? + (mean * momentum)?)?)?;
        self.running_var.set(
            &((self.running_var.as_tensor() * (1.0 - momentum))?
                + (var * (momentum * n / (n - 1.0).max(1.0)))?)?,
        )?;
        Ok(())
    }
}

/// Whether the fused CPU nodes apply to `x`: a training step (gradients wanted),
/// the CPU kernels, f32.
fn fused_applies(x: &Tensor, train: bool) -> bool {
    train && crate::ops::cpu_kernels(x) && x.dtype() == DType::F32
}

/// γ, β and the constants that a fused CPU node of one [`ConvBn`] takes besides
/// its weight ([`ConvBn::affine`]).
struct Affine {
    gamma: Tensor,
    beta: Tensor,
    /// `(μ, 1/σ)` to normalise with: a frozen BatchNorm's running statistics, or
    /// 0 and 1 for a bias (γ = 1, β the bias).
    fixed: Option<(Tensor, Tensor)>,
}

/// `y` (+ skip) (→ ReLU when `relu`).
fn skip_relu(y: Tensor, relu: bool, skip: Option<&Tensor>) -> Result<Tensor> {
    let y = match skip {
        Some(skip) => (y + skip)?,
        None => y,
    };
    Ok(if relu { y.relu()? } else { y })
}

/// A 3×3 conv (stride 1) followed by BatchNorm, or with a bias when BN is off.
#[derive(Debug)]
struct ConvBn {
    weight: Tensor,
    bias: Option<Tensor>,
    bn: Option<Norm>,
    pad: usize,
}

impl ConvBn {
    fn new(cin: usize, cout: usize, pad: usize, bn: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((cout, cin, 3, 3), "weight")?;
        let (bias, bn) = if bn {
            (None, Some(Norm::new(cout, vb.pp("bn"))?))
        } else {
            (Some(vb.get(cout, "bias")?), None)
        };
        Ok(ConvBn {
            weight,
            bias,
            bn,
            pad,
        })
    }

    /// The fused CPU nodes' γ, β and constants where they apply
    /// ([`fused_applies`]): the BatchNorm's ([`Norm::affine`]), or for a bias
    /// without BatchNorm, γ = 1, β = the bias, normalised with μ = 0, 1/σ = 1.
    fn affine(&self, x: &Tensor, train: bool) -> Result<Option<Affine>> {
        if !fused_applies(x, train) {
            return Ok(None);
        }
        match (&self.bn, &self.bias) {
            (Some(bn), _) => bn.affine(),
            (None, Some(bias)) => {
                let ones = bias.ones_like()?;
                Ok(Some(Affine {
                    gamma: ones.clone(),
                    beta: bias.clone(),
                    fixed: Some((bias.zeros_like()?, ones)),
                }))
            }
            (None, None) => Ok(None),
        }
    }

    /// This conv's parameters for a fused node, with `affine`'s values.
    fn params<'a>(&'a self, affine: &'a Affine) -> ConvBnParams<'a> {
        let params = ConvBnParams::new(&self.weight, &affine.gamma, &affine.beta);
        match &affine.fixed {
            Some((mean, invstd)) => params.fixed(mean, invstd),
            None => params,
        }
    }

    fn eps(&self) -> f64 {
        self.bn
            .as_ref()
            .map_or(modkit_models::BATCH_NORM_EPS, |bn| bn.inner.eps())
    }

    /// Moves the running averages towards a fused node's batch statistics, where
    /// it computed them.
    fn update_running(&self, stats: Option<crate::ops::BatchStats>, dev: &Device) -> Result<()> {
        match (&self.bn, stats) {
            (Some(bn), Some(stats)) => bn.update_running(&stats, dev),
            _ => Ok(()),
        }
    }

    /// conv → BN (+ skip) (→ ReLU when `relu`).
    fn forward(
        &self,
        x: &Tensor,
        train: bool,
        relu: bool,
        skip: Option<&Tensor>,
    ) -> Result<Tensor> {
        // One graph node on the CPU in training ([`crate::ops::conv_bn_train`]).
        if let Some(affine) = self.affine(x, train)? {
            let params = self.params(&affine);
            let (y, stats) =
                crate::ops::conv_bn_train(x, params, self.pad, self.eps(), relu, skip)?;
            self.update_running(stats, x.device())?;
            return Ok(y);
        }
        // Off the CPU kernels (CUDA; the generic path in tests) the convolution and
        // BatchNorm meet batch-major, with no transposes between them whose
        // gradients candle would copy.
        if !crate::ops::cpu_kernels(x) {
            let y = crate::ops::conv3x3(x, &self.weight, self.pad)?;
            return match &self.bn {
                Some(bn) => bn.forward_batch_major(&y, train, relu, skip),
                None => self.biased(y, relu, skip),
            };
        }
        let yc = conv3x3_channel_major(x, &self.weight, self.pad)?;
        match (&self.bn, &self.bias) {
            (Some(bn), _) => bn.forward(&yc, train, relu, skip),
            // The bias added channel-major, before the transpose: its gradient
            // then sums contiguous rows, not a strided batch-major view.
            (None, Some(b)) => {
                let yc = yc.broadcast_add(&b.reshape(((), 1, 1, 1))?)?;
                skip_relu(yc.transpose(0, 1)?, relu, skip)
            }
            (None, None) => skip_relu(yc.transpose(0, 1)?, relu, skip),
        }
    }

    /// Batch-major `y` plus the bias (without BatchNorm) (+ skip) (→ ReLU).
    fn biased(&self, y: Tensor, relu: bool, skip: Option<&Tensor>) -> Result<Tensor> {
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            None => y,
        };
        skip_relu(y, relu, skip)
    }

    /// conv → BN → ReLU → 2×2 max-pool: one graph node where [`ConvBn::forward`]'s
    /// is ([`crate::ops::conv_bn_pool_train`]).
    fn forward_pooled(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(affine) = self.affine(x, train)? {
            let params = self.params(&affine);
            let (y, stats) = crate::ops::conv_bn_pool_train(x, params, self.pad, self.eps())?;
            self.update_running(stats, x.device())?;
            return Ok(y);
        }
        Ok(max_pool2x2(&self.forward(x, train, true, None)?)?)
    }
}

/// Conv-Pool-ResnetBlock.
#[derive(Debug)]
struct Block {
    conv: ConvBn,
    res1: ConvBn,
    res2: ConvBn,
}

impl Block {
    fn new(cin: usize, c: usize, bn: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Block {
            conv: ConvBn::new(cin, c, 0, bn, vb.pp("conv"))?,
            res1: ConvBn::new(c, c, 1, bn, vb.pp("res1"))?,
            res2: ConvBn::new(c, c, 1, bn, vb.pp("res2"))?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv.forward_pooled(x, train)?;
        if let Some(out) = self.res_pair(&y, train)? {
            return Ok(out);
        }
        let r = self.res1.forward(&y, train, true, None)?;
        // ReLU(y + BN(conv(r))), fused.
        self.res2.forward(&r, train, true, Some(&y))
    }

    /// The residual pair as one graph node ([`crate::ops::res_pair_train`]) where
    /// both stages' fused nodes apply.
    fn res_pair(&self, y: &Tensor, train: bool) -> Result<Option<Tensor>> {
        let (Some(a1), Some(a2)) = (self.res1.affine(y, train)?, self.res2.affine(y, train)?)
        else {
            return Ok(None);
        };
        let (first, second) = (self.res1.params(&a1), self.res2.params(&a2));
        let (out, [s1, s2]) = crate::ops::res_pair_train(y, first, second, self.res1.eps())?;
        self.res1.update_running(s1, y.device())?;
        self.res2.update_running(s2, y.device())?;
        Ok(Some(out))
    }
}

/// One plain network: conv1, block2..block5, fc.
#[derive(Debug)]
struct Backbone {
    conv1: ConvBn,
    blocks: Vec<Block>,
    fc_weight: Tensor,
    fc_bias: Option<Tensor>,
    fc_bn: Option<Norm>,
}

impl Backbone {
    fn new(spec: &NetSpec, vb: VarBuilder) -> Result<Self> {
        let w = spec.widths;
        let bn = spec.batch_norm;
        let blocks = (2..=5)
            .map(|k| Block::new(w[k - 2], w[k - 1], bn, vb.pp(format!("block{k}"))))
            .collect::<Result<_>>()?;
        let fc = vb.pp("fc");
        let (fc_bias, fc_bn) = if bn {
            (None, Some(Norm::new(spec.embedding, fc.pp("bn"))?))
        } else {
            (Some(fc.get(spec.embedding, "bias")?), None)
        };
        Ok(Backbone {
            conv1: ConvBn::new(spec.in_channels, w[0], 0, bn, vb.pp("conv1"))?,
            blocks,
            fc_weight: fc.get((spec.embedding, spec.fc_inputs()), "weight")?,
            fc_bias,
            fc_bn,
        })
    }

    /// Fixes the network (`only-mask`): BatchNorm always on its running
    /// statistics, which training then leaves as they are.
    fn freeze(&mut self) {
        let convs = std::iter::once(&mut self.conv1).chain(
            self.blocks
                .iter_mut()
                .flat_map(|b| [&mut b.conv, &mut b.res1, &mut b.res2]),
        );
        let norms = convs
            .filter_map(|c| c.bn.as_mut())
            .chain(self.fc_bn.as_mut());
        for norm in norms {
            norm.frozen = true;
        }
    }

    /// Stage `k`: 1 is conv1 (with its ReLU), 2..=5 the blocks.
    ///
    /// Outside training the output is detached, for callers that evaluate a
    /// network built over variables (`Trainer::evaluate` builds one over plain
    /// tensors instead, which also frees the intermediates inside a stage):
    /// candle records the op graph of anything computed from a variable, and the
    /// last stage's output would keep every intermediate tensor of the forward
    /// alive. Evaluating the tiny spec's test set that way peaked at 1.29 GB.
    fn stage(&self, k: usize, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = if k == 1 {
            self.conv1.forward(x, train, true, None)?
        } else {
            self.blocks[k - 2].forward(x, train)?
        };
        Ok(if train { y } else { y.detach() })
    }

    fn fc(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = x.flatten_from(1)?.matmul(&self.fc_weight.t()?)?;
        Ok(match (&self.fc_bias, &self.fc_bn) {
            (_, Some(bn)) if crate::ops::cpu_kernels(&y) => {
                bn.forward(&y.t()?, train, false, None)?
            }
            (_, Some(bn)) => bn.forward_batch_major(&y, train, false, None)?,
            (Some(b), None) => y.broadcast_add(b)?,
            (None, None) => y,
        })
    }
}

/// A network of any [`Variant`] over a fixed task list.
#[derive(Debug)]
pub struct Network {
    spec: NetSpec,
    tasks: usize,
    /// One backbone, or one per task for `independent`.
    nets: Vec<Backbone>,
    /// Per modulated stage (blocks N..=5, then fc): `[T, C]` or `[T, C, C]`.
    modulation: Vec<Tensor>,
    branch: Option<(Tensor, Tensor)>,
    csn: Option<Tensor>,
}

impl Network {
    /// Builds the network on the variables of `vb` (see [`init_varmap`]).
    pub fn new(spec: &NetSpec, variant: Variant, tasks: &[String], vb: VarBuilder) -> Result<Self> {
        spec.validate()?;
        let t = tasks.len();
        let nets = if variant == Variant::Independent {
            tasks
                .iter()
                .map(|task| Backbone::new(spec, vb.pp(format!("task.{task}"))))
                .collect::<Result<_>>()?
        } else {
            let mut net = Backbone::new(spec, vb.clone())?;
            // Only-mask learns the modulation on a fixed network, statistics included.
            if variant == Variant::OnlyMask {
                net.freeze();
            }
            vec![net]
        };
        let modulation = if variant.is_modulated() {
            spec.modulated_stages()
                .iter()
                .map(|s| {
                    let name = names::modulation(s.name);
                    Ok(match spec.modulation {
                        Modulation::Vector => vb.get((t, s.channels), &name)?,
                        Modulation::Projection => vb.get((t, s.channels, s.channels), &name)?,
                    })
                })
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let branch = match variant {
            Variant::Branch { k } => Some((
                vb.get((t, k, spec.embedding), names::BRANCH_WEIGHT)?,
                vb.get((t, k), names::BRANCH_BIAS)?,
            )),
            _ => None,
        };
        let csn = match variant {
            Variant::Csn => Some(vb.get((t, spec.embedding), names::CSN_MASKS)?),
            _ => None,
        };
        Ok(Network {
            spec: spec.clone(),
            tasks: t,
            nets,
            modulation,
            branch,
            csn,
        })
    }

    /// Whether one trunk serves all tasks (every variant but `independent`).
    pub fn has_shared_trunk(&self) -> bool {
        self.nets.len() == 1
    }

    /// Number of tasks.
    pub fn num_tasks(&self) -> usize {
        self.tasks
    }

    /// conv1..block N of the shared backbone (or of task `task`'s for `independent`):
    /// the task-independent part.
    pub fn trunk(&self, x: &Tensor, task: usize, train: bool) -> Result<Tensor> {
        let net = &self.nets[if self.has_shared_trunk() { 0 } else { task }];
        let mut x = x.clone();
        for k in 1..=self.spec.first_modulated {
            x = net.stage(k, &x, train)?;
        }
        Ok(x)
    }

    /// CSN's mask penalty, `mean over tasks of ‖ReLU(mask)‖₁` (the mean over a
    /// minibatch's triplets, whose tasks are balanced), as its authors' training
    /// adds it with weight [`CSN_MASK_PENALTY`]; `None` for other variants.
    pub fn csn_mask_norm(&self) -> Result<Option<Tensor>> {
        let Some(masks) = &self.csn else {
            return Ok(None);
        };
        let t = masks.dim(0)? as f64;
        Ok(Some(masks.relu()?.sum_all()?.affine(1.0 / t, 0.0)?))
    }

    /// `[T, P]`: each task's modulation as the network applies it (vectors after
    /// their ReLU, projection matrices as they are), every modulated layer's
    /// concatenated; `None` for variants without modulation.
    pub fn task_vectors(&self) -> Result<Option<Tensor>> {
        if self.modulation.is_empty() {
            return Ok(None);
        }
        let parts = self
            .modulation
            .iter()
            .map(|w| {
                let w = w.flatten_from(1)?;
                match self.spec.modulation {
                    Modulation::Vector => w.relu(),
                    Modulation::Projection => Ok(w),
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&parts, 1)?))
    }

    /// Block N+1..5 and fc with each sample's task modulation, then the variant's
    /// head and L2 normalisation. `ids` holds one task index per sample (u32); for
    /// `independent` all samples must share `task`.
    pub fn tail(&self, feats: &Tensor, ids: &Tensor, task: usize, train: bool) -> Result<Tensor> {
        let net = &self.nets[if self.has_shared_trunk() { 0 } else { task }];
        let mut m = self.modulation.iter();
        let mut x = self.modulate(feats, m.next(), ids)?;
        for k in self.spec.first_modulated + 1..=5 {
            x = net.stage(k, &x, train)?;
            x = self.modulate(&x, m.next(), ids)?;
        }
        let mut e = net.fc(&x, train)?;
        e = self.modulate(&e, m.next(), ids)?;
        if let Some((w, b)) = &self.branch {
            let w = w.index_select(ids, 0)?;
            e = w.matmul(&e.unsqueeze(2)?)?.squeeze(2)?;
            e = (e + b.index_select(ids, 0)?)?;
        }
        if let Some(masks) = &self.csn {
            e = (e * masks.relu()?.index_select(ids, 0)?)?;
        }
        l2_normalize(&e)
    }

    fn modulate(&self, x: &Tensor, w: Option<&Tensor>, ids: &Tensor) -> Result<Tensor> {
        let Some(w) = w else { return Ok(x.clone()) };
        let b = x.dim(0)?;
        Ok(match self.spec.modulation {
            Modulation::Vector => {
                let s = w.relu()?.index_select(ids, 0)?;
                if x.rank() == 4 {
                    x.broadcast_mul(&s.reshape((b, (), 1, 1))?)?
                } else {
                    (x * s)?
                }
            }
            Modulation::Projection => {
                let p = w.index_select(ids, 0)?;
                if x.rank() == 4 {
                    let (_, c, h, ww) = x.dims4()?;
                    p.matmul(&x.reshape((b, c, h * ww))?)?
                        .reshape((b, c, h, ww))?
                } else {
                    p.matmul(&x.unsqueeze(2)?)?.squeeze(2)?
                }
            }
        })
    }

    /// Embeds a batch whose samples are grouped by task: `groups[i] = (task, count)`
    /// covers the next `count` rows of `x`. Returns `[B, embedding]`, L2-normalised.
    pub fn forward_grouped(
        &self,
        x: &Tensor,
        groups: &[(usize, usize)],
        train: bool,
    ) -> Result<Tensor> {
        let device = x.device();
        let ids_of = |gs: &[(usize, usize)]| -> Result<Tensor> {
            let ids: Vec<u32> = gs
                .iter()
                .flat_map(|&(t, n)| std::iter::repeat_n(t as u32, n))
                .collect();
            Ok(Tensor::new(ids, device)?)
        };
        if self.has_shared_trunk() {
            let f = self.trunk(x, 0, train)?;
            return self.tail(&f, &ids_of(groups)?, 0, train);
        }
        let mut outs = Vec::with_capacity(groups.len());
        let mut start = 0;
        for &(t, n) in groups {
            let xi = x.narrow(0, start, n)?;
            let f = self.trunk(&xi, t, train)?;
            outs.push(self.tail(&f, &ids_of(&[(t, n)])?, t, train)?);
            start += n;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Embeds every image of `x` for every task: the trunk once, then each task's
    /// tail. Returns `[T·B, embedding]`, task-major (row `t·B + i` is image `i` for
    /// task `t`). Needs a shared trunk (every variant but `independent`).
    pub fn forward_all_tasks(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !self.has_shared_trunk() {
            return Err(crate::Error::Config(
                "embedding all tasks from one trunk pass needs a shared trunk; the independent variant has one per task".into(),
            ));
        }
        let (b, t) = (x.dim(0)?, self.tasks);
        let f = self.trunk(x, 0, train)?;
        let rep: Vec<u32> = (0..t).flat_map(|_| 0..b as u32).collect();
        let f = f.index_select(&Tensor::new(rep, x.device())?, 0)?;
        let ids: Vec<u32> = (0..t as u32)
            .flat_map(|task| std::iter::repeat_n(task, b))
            .collect();
        self.tail(&f, &Tensor::new(ids, x.device())?, 0, train)
    }
}

/// `e / ‖e‖` per row.
pub fn l2_normalize(e: &Tensor) -> Result<Tensor> {
    let norm = (e.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(e.broadcast_div(&norm)?)
}

/// The weight of CSN's mask penalty ([`Network::csn_mask_norm`]): the default of
/// its authors' code (`--mask_loss 5e-4`). Their embedding-norm penalty has no
/// counterpart: the embedding here is L2-normalised.
pub const CSN_MASK_PENALTY: f64 = 5e-4;

/// CSN's masks `[T, E]` as its authors' code starts learned ones (paper §4.3:
/// "manually initializes the 1-dimensional mask for each attribute to be
/// non-overlapping"): 1 on task `t`'s own block of `E / T` numbers, 0.1 elsewhere.
/// The trainer refuses more tasks than numbers, where a block would be empty.
pub fn csn_masks(tasks: usize, e: usize) -> Vec<f32> {
    let block = e / tasks.max(1);
    (0..tasks * e)
        .map(|i| {
            let (t, j) = (i / e, i % e);
            if j / block.max(1) == t && block > 0 {
                1.0
            } else {
                0.1
            }
        })
        .collect()
}

/// Creates every variable of the schema with a deterministic initialisation from
/// `seed`: He-normal convs, LeCun-normal fc and branches, BN scale 1 / shift 0,
/// running mean 0 / variance 1, modulation vectors 1 (paper 4.1), projection
/// matrices the identity, CSN masks disjoint ([`csn_masks`]).
pub fn init_varmap(
    spec: &NetSpec,
    variant: Variant,
    tasks: &[String],
    seed: u64,
    device: &Device,
) -> Result<VarMap> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(2);
    let varmap = VarMap::new();
    let mut data = varmap
        .data()
        .lock()
        .map_err(|_| crate::Error::Config("poisoned VarMap".into()))?;
    for TensorEntry { name, shape, .. } in names::schema(spec, &variant, tasks) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.starts_with("modulation.") && shape.len() == 3 {
            let c = shape[1];
            (0..n)
                .map(|i| {
                    if (i % (c * c)) % (c + 1) == 0 {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect()
        } else if name == names::CSN_MASKS {
            csn_masks(shape[0], shape[1])
        } else if name.starts_with("modulation.")
            || name.ends_with("running_var")
            || name.ends_with("bn.weight")
        {
            vec![1.0; n]
        } else if name.ends_with("bias") || name.ends_with("running_mean") {
            vec![0.0; n]
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let gain = if shape.len() == 4 { 2.0 } else { 1.0 };
            let std = (gain / fan_in as f64).sqrt() as f32;
            (0..n)
                .map(|_| {
                    let z: f32 = StandardNormal.sample(&mut rng);
                    z * std
                })
                .collect()
        };
        let t = Tensor::from_vec(values, shape, device)?.to_dtype(DType::F32)?;
        data.insert(name, Var::from_tensor(&t)?);
    }
    drop(data);
    Ok(varmap)
}

/// The network stored in `ckpt`, in evaluation form (weights, BatchNorm statistics
/// and task vectors as trained).
pub fn network_from_checkpoint(
    ckpt: &modkit_models::Checkpoint,
    device: &Device,
) -> Result<(VarMap, Network)> {
    let h = &ckpt.header;
    let varmap = init_varmap(&h.spec, h.variant, &h.tasks, 0, device)?;
    {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| crate::Error::Config("poisoned VarMap".into()))?;
        for (name, var) in data.iter() {
            let t = ckpt.tensor(name)?;
            var.set(&Tensor::from_slice(&t.data, t.shape.as_slice(), device)?)?;
        }
    }
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let net = Network::new(&h.spec, h.variant, &h.tasks, vb)?;
    Ok((varmap, net))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// A frozen network's BatchNorm is candle-nn's evaluation form in either
    /// layout, and differentiates the input, γ and β but not the statistics.
    #[test]
    fn frozen_batch_norm_is_the_evaluation_form_on_fixed_statistics() {
        use crate::ops::test_util::{grads_of, rand, rel_diff};
        let mut varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let mut norm = Norm::new(3, vb).expect("norm");
        let mut set = |name: &str, t: Tensor| varmap.set_one(name, t).expect(name);
        set("weight", (rand(&[3], 1) + 1.0).expect("gamma"));
        set("bias", rand(&[3], 2));
        set("running_mean", rand(&[3], 3));
        set("running_var", (rand(&[3], 4) + 1.0).expect("var"));
        let x = Var::from_tensor(&rand(&[2, 3, 4, 5], 5)).expect("x");
        let reference = norm.inner.forward_t(x.as_tensor(), false).expect("eval");
        norm.frozen = true;
        let xc = x
            .as_tensor()
            .transpose(0, 1)
            .and_then(|t| t.contiguous())
            .expect("xc");
        let stats = |n: &Norm| {
            [&n.running_mean, &n.running_var]
                .map(|v| v.as_tensor().to_vec1::<f32>().expect("stats"))
        };
        let before = stats(&norm);
        // In training too: a frozen BatchNorm never takes the batch's statistics,
        // nor moves its running ones.
        let mut batch_major = reference.clone();
        for train in [false, true] {
            batch_major = norm
                .forward_batch_major(x.as_tensor(), train, false, None)
                .expect("batch-major");
            let channel_major = norm
                .forward(&xc, train, false, None)
                .expect("channel-major");
            assert!(rel_diff(&batch_major, &reference) < 1e-6, "train {train}");
            assert!(rel_diff(&channel_major, &reference) < 1e-6, "train {train}");
            assert_eq!(stats(&norm), before, "train {train}");
        }
        // ∂/∂x = γ / √(var + ε) per channel, ∂/∂β = Σ up; nothing for the statistics.
        let up = rand(&[2, 3, 4, 5], 6);
        let grads = grads_of(&batch_major, &up);
        let (gamma, beta) = norm.inner.weight_and_bias().expect("affine");
        let var = norm.running_var.as_tensor();
        let scale = (gamma
            / (var + modkit_models::BATCH_NORM_EPS)
                .and_then(|v| v.sqrt())
                .expect("std"))
        .and_then(|s| s.reshape((1, 3, 1, 1)))
        .expect("scale");
        let ones = scale.ones_like().expect("ones");
        assert!(
            rel_diff(&scale, &ones) > 0.05,
            "the statistics set above apply"
        );
        let want = up.broadcast_mul(&scale).expect("want");
        assert!(rel_diff(grads.get(x.as_tensor()).expect("∂x"), &want) < 1e-6);
        let want = up.sum((0, 2, 3)).expect("Σ up");
        assert!(rel_diff(grads.get(beta).expect("∂β"), &want) < 1e-6);
        assert!(grads.get(gamma).is_some());
        assert!(grads.get(norm.running_var.as_tensor()).is_none());
        assert!(grads.get(norm.running_mean.as_tensor()).is_none());
    }

    fn small_spec() -> NetSpec {
        let mut s = NetSpec::tiny();
        s.widths = [4, 4, 8, 8, 8];
        s.embedding = 8;
        s
    }

    fn build(variant: Variant, tasks: &[String]) -> (VarMap, Network) {
        let spec = small_spec();
        let vm = init_varmap(&spec, variant, tasks, 1, &Device::Cpu).expect("init");
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let net = Network::new(&spec, variant, tasks, vb).expect("net");
        (vm, net)
    }

    /// A block in training mode computed with candle-nn's BatchNorm and plain ops.
    fn reference_block(block: &Block, x: &Tensor) -> Tensor {
        let convbn = |cb: &ConvBn, x: &Tensor| {
            let y = crate::ops::conv3x3(x, &cb.weight, cb.pad).expect("conv");
            cb.bn
                .as_ref()
                .expect("bn")
                .inner
                .forward_t(&y, true)
                .expect("bn")
        };
        let y = max_pool2x2(&convbn(&block.conv, x).relu().expect("relu")).expect("pool");
        let r = convbn(&block.res1, &y).relu().expect("relu");
        (y + convbn(&block.res2, &r))
            .and_then(|t| t.relu())
            .expect("add")
    }

    /// Without BatchNorm a convolution adds its bias (in training, the fused node
    /// with γ = 1 and β = the bias; in evaluation, channel-major before the
    /// transpose): the same values and gradients as candle's conv2d plus a
    /// batch-major bias, with a skip and a ReLU.
    #[test]
    fn biased_convolution_equals_candle_in_value_and_gradient() {
        use crate::ops::test_util::{grads_of, rand, rel_diff};
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let conv = ConvBn::new(3, 4, 1, false, vb).expect("conv");
        let bias = conv.bias.clone().expect("bias");
        vm.data().lock().expect("lock")["bias"]
            .set(&rand(&[4], 7))
            .expect("set");
        let x = Var::from_tensor(&rand(&[2, 3, 5, 6], 8)).expect("x");
        let skip = Var::from_tensor(&rand(&[2, 4, 5, 6], 9)).expect("skip");
        let reference = x
            .as_tensor()
            .conv2d(&conv.weight, 1, 1, 1, 1)
            .and_then(|y| y.broadcast_add(&bias.reshape((1, 4, 1, 1))?))
            .and_then(|y| y + skip.as_tensor())
            .and_then(|y| y.relu())
            .expect("reference");
        let up = rand(&[2, 4, 5, 6], 10);
        let g2 = grads_of(&reference, &up);
        for train in [true, false] {
            let ours = conv
                .forward(x.as_tensor(), train, true, Some(skip.as_tensor()))
                .expect("ours");
            assert!(rel_diff(&ours, &reference) < 1e-6, "train {train}");
            let g1 = grads_of(&ours, &up);
            for (name, t) in [
                ("x", x.as_tensor()),
                ("skip", skip.as_tensor()),
                ("weight", &conv.weight),
                ("bias", &bias),
            ] {
                let (a, b) = (g1.get(t).expect(name), g2.get(t).expect(name));
                assert!(rel_diff(a, b) < 1e-5, "train {train}: gradient of {name}");
            }
        }
    }

    /// A frozen network's block (`only-mask`) and a block without BatchNorm take
    /// the fused nodes in training, with constants for the normalisation: the
    /// same values and gradients (x, weights, γ and β or the biases) as their
    /// unfused evaluation forms, and the running statistics stay as they were.
    #[test]
    fn fixed_normalisation_fuses_as_its_unfused_form() {
        use crate::ops::test_util::{grads_of, rand, rel_diff};
        for bn in [true, false] {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            let mut block = Block::new(3, 4, bn, vb).expect("block");
            for (seed, (name, var)) in vm.data().lock().expect("lock").iter().enumerate() {
                let shift = if name.ends_with("running_var") || name.ends_with("bn.weight") {
                    1.0
                } else {
                    0.0
                };
                let t = rand(var.dims(), seed as u64 + 1)
                    .affine(0.5, shift)
                    .expect("t");
                var.set(&t).expect("set");
            }
            for c in [&mut block.conv, &mut block.res1, &mut block.res2] {
                if let Some(norm) = c.bn.as_mut() {
                    norm.frozen = true;
                }
            }
            let running = |vm: &VarMap| -> Vec<Vec<f32>> {
                let data = vm.data().lock().expect("lock");
                let mut stats: Vec<_> = data
                    .iter()
                    .filter(|(n, _)| n.contains("running"))
                    .map(|(n, v)| (n.clone(), v.flatten_all().and_then(|t| t.to_vec1())))
                    .collect();
                stats.sort_by(|a, b| a.0.cmp(&b.0));
                stats.into_iter().map(|(_, v)| v.expect("stats")).collect()
            };
            let before = running(&vm);
            let x = Var::from_tensor(&rand(&[2, 3, 10, 10], 50)).expect("x");
            // Every conv of the block takes a fused node, with constants.
            for c in [&block.conv, &block.res1, &block.res2] {
                let affine = c.affine(&x, true).expect("affine").expect("fused");
                assert!(affine.fixed.is_some(), "bn {bn}: no constants");
                assert!(c.affine(&x, false).expect("eval").is_none(), "bn {bn}");
            }
            let fused = block.forward(&x, true).expect("fused");
            let unfused = block.forward(&x, false).expect("unfused");
            assert!(rel_diff(&fused, &unfused) < 1e-5, "bn {bn}: output");
            assert_eq!(running(&vm), before, "bn {bn}: running statistics moved");
            let up = rand(fused.dims(), 51);
            let (g1, g2) = (grads_of(&fused, &up), grads_of(&unfused, &up));
            let data = vm.data().lock().expect("lock");
            let mut checked = 0;
            for (name, t) in data
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_tensor()))
                .chain([("x", x.as_tensor())])
            {
                if name.contains("running") {
                    assert!(g1.get(t).is_none(), "bn {bn}: a gradient for {name}");
                    continue;
                }
                let (a, b) = (g1.get(t).expect(name), g2.get(t).expect(name));
                let d = rel_diff(a, b);
                assert!(d < 1e-4, "bn {bn}: gradient of {name} differs by {d}");
                checked += 1;
            }
            // x and 3 weights, with 3 γ and 3 β or with 3 biases.
            assert_eq!(checked, if bn { 10 } else { 7 }, "bn {bn}");
        }
    }

    #[test]
    fn fused_batch_norm_block_equals_candle_nn_in_value_and_gradient() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let block = Block::new(3, 4, true, vb).expect("block");
        // Non-trivial γ, β so that the affine part is exercised.
        for (name, var) in vm.data().lock().expect("lock").iter() {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|i| 0.6 + 0.3 * ((i * 7 + name.len()) % 5) as f32)
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).expect("t"))
                .expect("set");
        }
        let data: Vec<f32> = (0..2 * 3 * 9 * 9)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(data, (2, 3, 9, 9), &Device::Cpu).expect("x"))
            .expect("x");
        let w: Vec<f32> = (0..2 * 4 * 3 * 3).map(|i| (i % 7) as f32 - 3.0).collect();
        let w = Tensor::from_vec(w, (2, 4, 3, 3), &Device::Cpu).expect("w");
        let fused = block.forward(&x, true).expect("fused");
        let reference = reference_block(&block, &x);
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff")
        };
        assert!(diff(&fused, &reference) < 1e-4);
        let g1 = (&fused * &w)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("bwd");
        let g2 = (&reference * &w)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("bwd");
        let data = vm.data().lock().expect("lock");
        let mut checked = 0;
        for (name, var) in data
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_tensor()))
            .chain([("x", x.as_tensor())])
        {
            let (Some(a), Some(b)) = (g1.get(var), g2.get(var)) else {
                continue;
            };
            assert!(
                diff(a, b) < 1e-3,
                "gradient of {name} differs by {}",
                diff(a, b)
            );
            checked += 1;
        }
        // x, 3 conv weights, 3 γ and 3 β.
        assert_eq!(checked, 10);
    }

    #[test]
    fn only_training_records_the_graph() {
        let tasks: Vec<String> = vec!["a".into(), "b".into()];
        let (_vm, net) = build(Variant::Modulated, &tasks);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 48, 48), &Device::Cpu).expect("x");
        // Evaluation keeps no stage's intermediate tensors alive through the graph.
        let f = net.trunk(&x, 0, false).expect("trunk");
        assert!(!f.track_op(), "an evaluation trunk recorded its graph");
        let ids = Tensor::new(&[0u32, 1], &Device::Cpu).expect("ids");
        let e = net.tail(&f, &ids, 0, false).expect("tail");
        // The same values as the training graph's forward, in evaluation mode.
        let tracked = net
            .forward_grouped(&x, &[(0, 1), (1, 1)], false)
            .expect("fwd");
        let diff = (e - &tracked)
            .and_then(|t| t.abs())
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("diff");
        assert!(diff < 1e-6, "detached evaluation differs by {diff}");
        // Training keeps the graph that backward needs.
        assert!(net.trunk(&x, 0, true).expect("trunk").track_op());
    }

    #[test]
    fn every_variant_embeds_to_unit_vectors_and_uses_only_schema_variables() {
        let tasks: Vec<String> = vec!["a".into(), "b".into()];
        for variant in [
            Variant::Modulated,
            Variant::Shared,
            Variant::Independent,
            Variant::Branch { k: 5 },
            Variant::Csn,
        ] {
            let (vm, net) = build(variant, &tasks);
            let n_schema = names::schema(&small_spec(), &variant, &tasks).len();
            assert_eq!(
                vm.all_vars().len(),
                n_schema,
                "{variant}: extra variables created"
            );
            let x = Tensor::randn(0f32, 1.0, (6, 3, 48, 48), &Device::Cpu).expect("x");
            let e = net
                .forward_grouped(&x, &[(0, 3), (1, 3)], true)
                .expect("forward");
            let dim = if let Variant::Branch { k } = variant {
                k
            } else {
                8
            };
            assert_eq!(e.dims(), &[6, dim]);
            let norms = e
                .sqr()
                .and_then(|t| t.sum(1))
                .and_then(|t| t.to_vec1::<f32>())
                .expect("n");
            for n in norms {
                assert!((n - 1.0).abs() < 1e-4, "{variant}: norm² {n}");
            }
        }
    }

    #[test]
    fn modulation_vectors_of_one_make_tasks_identical_until_trained() {
        let tasks: Vec<String> = vec!["a".into(), "b".into()];
        let (vm, net) = build(Variant::Modulated, &tasks);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 48, 48), &Device::Cpu).expect("x");
        let x2 = Tensor::cat(&[&x, &x], 0).expect("cat");
        let e = net
            .forward_grouped(&x2, &[(0, 2), (1, 2)], false)
            .expect("fwd");
        let diff = (e.narrow(0, 0, 2).expect("a") - e.narrow(0, 2, 2).expect("b"))
            .and_then(|t| t.abs())
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("diff");
        assert!(diff < 1e-6, "tasks differ before training: {diff}");
        // Zeroing one task's fc vector channel changes only that task.
        let data = vm.data().lock().expect("lock");
        let v = data.get("modulation.fc").expect("mod");
        let mut w = v.as_tensor().to_vec2::<f32>().expect("w");
        w[1][0] = 0.0;
        v.set(&Tensor::new(w, &Device::Cpu).expect("t"))
            .expect("set");
        drop(data);
        let e2 = net
            .forward_grouped(&x2, &[(0, 2), (1, 2)], false)
            .expect("fwd");
        let d = |a: &Tensor, b: &Tensor| {
            (a - b)
                .and_then(|t| t.abs())
                .and_then(|t| t.max_all())
                .and_then(|t| t.to_scalar::<f32>())
                .expect("d")
        };
        assert!(
            d(
                &e.narrow(0, 0, 2).expect("a"),
                &e2.narrow(0, 0, 2).expect("a")
            ) < 1e-6
        );
        assert!(
            d(
                &e.narrow(0, 2, 2).expect("b"),
                &e2.narrow(0, 2, 2).expect("b")
            ) > 1e-4
        );
    }

    #[test]
    fn all_tasks_from_one_trunk_pass_equal_per_task_embeddings() {
        let tasks: Vec<String> = vec!["a".into(), "b".into()];
        let (vm, net) = build(Variant::Modulated, &tasks);
        {
            // Distinct task vectors, so the two tasks' embeddings differ.
            let data = vm.data().lock().expect("lock");
            let v = &data["modulation.fc"];
            let w = Tensor::new(
                &[[1f32; 8], [0.5, 2., 1., 0., 1., 3., 1., 1.]],
                &Device::Cpu,
            )
            .expect("w");
            v.set(&w).expect("set");
        }
        let x = Tensor::randn(0f32, 1.0, (3, 3, 48, 48), &Device::Cpu).expect("x");
        let all = net.forward_all_tasks(&x, false).expect("all");
        let x2 = Tensor::cat(&[&x, &x], 0).expect("cat");
        let grouped = net
            .forward_grouped(&x2, &[(0, 3), (1, 3)], false)
            .expect("grouped");
        let diff = (all - grouped)
            .and_then(|t| t.abs())
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("diff");
        assert!(diff < 1e-6, "max diff {diff}");
        let (_, ind) = build(Variant::Independent, &tasks);
        assert!(ind.forward_all_tasks(&x, false).is_err());
    }

    #[test]
    fn initialisation_is_deterministic() {
        let tasks: Vec<String> = vec!["a".into()];
        let get = || {
            let (vm, _) = build(Variant::Modulated, &tasks);
            let data = vm.data().lock().expect("lock");
            data["block3.conv.weight"]
                .as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("v")
        };
        assert_eq!(get(), get());
    }
}
