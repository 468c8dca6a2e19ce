//! [`Model`]: a loaded `.modpack`, its graphs planned by tract with fixed shapes.
//!
//! ```text
//! image ──trunk (once)──▶ features ─┬─ switch tail + vectors of B tasks ─▶ B embeddings
//!                                   └─ folded tail of task t ───────────▶ 1 embedding
//! ```
//!
//! The switch tail takes the features of one image and the modulation vectors of
//! a batch of tasks: the batch starts at the first task-specific multiply, so the
//! image's features are computed once and every task's tail runs in one call.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use modkit_models::{NetSpec, Package, Precision, Preprocess, Variant};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::RunOptions;

use crate::input::{self, Input};
use crate::{Error, Result};

type Plan = Arc<TypedRunnableModel>;

/// How a task's embedding is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The task's own tail, its vectors folded into the weights.
    Folded,
    /// The shared switch tail, fed the task's vectors.
    Switch,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Folded => "folded",
            Route::Switch => "switch",
        }
    }
}

/// The trunk's output for one image, `[1, C, H, W]`.
#[derive(Debug, Clone)]
pub struct Features(TValue);

impl Features {
    pub fn shape(&self) -> &[usize] {
        self.0.shape()
    }
}

/// Load-time settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Threads for tract's matrix products (1: tract's default single thread).
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { threads: 1 }
    }
}

/// The switch tail, planned once per task-batch size.
#[derive(Debug)]
struct Switch {
    onnx: Vec<u8>,
    /// Whether the graph takes task vectors (modulated) or only features (shared).
    takes_vectors: bool,
    plans: Mutex<HashMap<usize, Plan>>,
}

/// A loaded, planned package.
#[derive(Debug)]
pub struct Model {
    spec: NetSpec,
    variant: Variant,
    tasks: Vec<String>,
    preprocess: Preprocess,
    precision: Precision,
    fingerprint: u64,
    task_vectors: Vec<Vec<Vec<f32>>>,
    features_shape: Vec<usize>,
    embedding: usize,
    trunk: Plan,
    folded: Vec<Option<Plan>>,
    switch: Option<Switch>,
    run_options: RunOptions,
}

impl Model {
    /// Reads, checks and plans `path` with default [`Options`].
    pub fn load(path: &Path) -> Result<Model> {
        Model::load_with(path, &Options::default())
    }

    /// Reads, checks and plans `path`.
    pub fn load_with(path: &Path, options: &Options) -> Result<Model> {
        let (pkg, fingerprint) = Package::load(path)?;
        Model::from_package(pkg, fingerprint, options)
    }

    /// Plans an in-memory package.
    pub fn from_package(pkg: Package, fingerprint: u64, options: &Options) -> Result<Model> {
        let n = options.threads;
        let what = format!("--threads {n}");
        modkit_models::threads::check(n, &what).map_err(|e| Error::Invalid(e.to_string()))?;
        // Built here, not by tract's `Executor::multithread`, which panics where
        // the system cannot start the threads.
        let executor = match n {
            1 => None,
            n => Some(tract_linalg::multithread::Executor::MultiThread(
                std::sync::Arc::new(
                    rayon::ThreadPoolBuilder::new()
                        .thread_name(|i| format!("modrt-{i}"))
                        .num_threads(n)
                        .build()
                        .map_err(|e| {
                            Error::Invalid(format!("{what}: cannot start them ({e}); use fewer"))
                        })?,
                ),
            )),
        };
        let run_options = RunOptions {
            executor,
            ..RunOptions::default()
        };
        let s = pkg.spec.input_size;
        let trunk = plan("trunk", &pkg.trunk, &[vec![1, 3, s, s]], &run_options)?;
        let features_shape = output_shape("trunk", &trunk)?;
        let mut folded = Vec::with_capacity(pkg.tasks.len());
        for task in &pkg.tasks {
            folded.push(match pkg.tails.folded(task) {
                Some(onnx) => Some(plan(
                    &format!("folded tail of {task:?}"),
                    onnx,
                    std::slice::from_ref(&features_shape),
                    &run_options,
                )?),
                None => None,
            });
        }
        let switch = pkg.tails.switch.clone().map(|onnx| Switch {
            onnx,
            takes_vectors: !pkg.variant.task_numbers(&pkg.spec).is_empty(),
            plans: Mutex::new(HashMap::new()),
        });
        let mut model = Model {
            spec: pkg.spec,
            variant: pkg.variant,
            tasks: pkg.tasks,
            preprocess: pkg.preprocess,
            precision: pkg.precision,
            fingerprint,
            task_vectors: pkg.task_vectors,
            features_shape,
            embedding: 0,
            trunk,
            folded,
            switch,
            run_options,
        };
        if model.switch.is_some() {
            if model.task_vectors.len() != model.tasks.len()
                && model.switch.as_ref().is_some_and(|s| s.takes_vectors)
            {
                return Err(Error::Invalid(format!(
                    "the package holds vectors for {} tasks but names {}; compile it again",
                    model.task_vectors.len(),
                    model.tasks.len()
                )));
            }
            // Plan the two batch sizes every caller needs: one task, all switch tasks.
            let switch_tasks = (0..model.tasks.len())
                .filter(|&t| model.route(t) == Route::Switch)
                .count();
            model.switch_plan(1)?;
            if model.switch.as_ref().is_some_and(|s| s.takes_vectors) && switch_tasks > 1 {
                model.switch_plan(switch_tasks)?;
            }
        }
        let probe = match model.folded.iter().flatten().next() {
            Some(p) => output_shape("folded tail", p)?,
            None => output_shape("switch tail", &model.switch_plan(1)?)?,
        };
        model.embedding = probe.last().copied().unwrap_or(0);
        Ok(model)
    }

    pub fn spec(&self) -> &NetSpec {
        &self.spec
    }

    /// How images are squared and normalised for this model.
    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    pub fn variant(&self) -> &Variant {
        &self.variant
    }

    /// The package's task names, in package order.
    pub fn tasks(&self) -> &[String] {
        &self.tasks
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The package's checksum; a gallery index records it.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Embedding dimension.
    pub fn embedding_dim(&self) -> usize {
        self.embedding
    }

    /// The input side in pixels.
    pub fn input_size(&self) -> usize {
        self.spec.input_size
    }

    /// The index of `task` (case-insensitive), or an error listing the tasks.
    pub fn task_index(&self, task: &str) -> Result<usize> {
        Ok(modkit_models::tasks::select(&[task.to_string()], &self.tasks)?[0])
    }

    /// Indices of `names`, or of every task when `names` is empty.
    pub fn select_tasks(&self, names: &[String]) -> Result<Vec<usize>> {
        if names.is_empty() {
            return Ok((0..self.tasks.len()).collect());
        }
        Ok(modkit_models::tasks::select(names, &self.tasks)?)
    }

    /// How `task` is computed.
    pub fn route(&self, task: usize) -> Route {
        if self.folded.get(task).is_some_and(Option::is_some) {
            Route::Folded
        } else {
            Route::Switch
        }
    }

    /// Decodes and preprocesses an image file.
    pub fn load_image(&self, path: &Path) -> Result<Input> {
        self.prepare(&input::open(path)?)
    }

    /// Preprocesses a decoded image.
    pub fn prepare(&self, img: &image::DynamicImage) -> Result<Input> {
        input::prepare(img, self.spec.input_size, &self.preprocess)
    }

    /// Runs the shared trunk on one image.
    pub fn trunk(&self, image: &Input) -> Result<Features> {
        let out = run("trunk", &self.trunk, tvec![image.0.clone().into_tvalue()])?;
        Ok(Features(out))
    }

    /// The embedding of one task.
    pub fn embed(&self, features: &Features, task: usize) -> Result<Vec<f32>> {
        Ok(self.embed_all(features, &[task])?.remove(0))
    }

    /// The embeddings of `tasks` (in that order): every switch task in one batched
    /// call, each folded task through its own tail.
    pub fn embed_all(&self, features: &Features, tasks: &[usize]) -> Result<Vec<Vec<f32>>> {
        self.check_features(features)?;
        let mut out = vec![Vec::new(); tasks.len()];
        let mut switch = Vec::new();
        for (slot, &t) in tasks.iter().enumerate() {
            if t >= self.tasks.len() {
                return Err(Error::Invalid(format!(
                    "task index {t} is out of range: the package has {} tasks",
                    self.tasks.len()
                )));
            }
            match &self.folded[t] {
                Some(p) => {
                    let e = run("folded tail", p, tvec![features.0.clone()])?;
                    out[slot] = rows(&e, 1)?.remove(0);
                }
                None => switch.push((slot, t)),
            }
        }
        if !switch.is_empty() {
            let embedded = self.run_switch(features, &switch)?;
            for ((slot, _), e) in switch.iter().zip(embedded) {
                out[*slot] = e;
            }
        }
        // A NaN would rank anywhere (or nowhere) in a search: a broken package.
        for (e, &t) in out.iter().zip(tasks) {
            if e.iter().any(|v| !v.is_finite()) {
                return Err(Error::Invalid(format!(
                    "the package's {} embedding is not finite (NaN or infinity): the package is broken; compile it again, or check it with `modc verify`",
                    self.tasks[t]
                )));
            }
        }
        Ok(out)
    }

    /// The full pass for one task: trunk, then its tail (what a per-task network
    /// would cost; [`crate::bench`] compares it with [`Model::embed_all`]).
    pub fn embed_image(&self, image: &Input, task: usize) -> Result<Vec<f32>> {
        self.embed(&self.trunk(image)?, task)
    }

    fn check_features(&self, features: &Features) -> Result<()> {
        if features.shape() != self.features_shape.as_slice() {
            return Err(Error::Invalid(format!(
                "features of shape {:?} do not fit this model's tails ({:?}); compute them with this model's trunk",
                features.shape(),
                self.features_shape
            )));
        }
        Ok(())
    }

    fn run_switch(&self, features: &Features, tasks: &[(usize, usize)]) -> Result<Vec<Vec<f32>>> {
        let switch = self.switch.as_ref().ok_or_else(|| {
            Error::Invalid("the package has no switch tail for these tasks".to_string())
        })?;
        if !switch.takes_vectors {
            // A shared embedding: every task gets the same vector.
            let e = run(
                "switch tail",
                &self.switch_plan(1)?,
                tvec![features.0.clone()],
            )?;
            let e = rows(&e, 1)?.remove(0);
            return Ok(vec![e; tasks.len()]);
        }
        let b = tasks.len();
        let mut inputs = tvec![features.0.clone()];
        let stages = self.task_vectors[tasks[0].1].len();
        for stage in 0..stages {
            let c = self.task_vectors[tasks[0].1][stage].len();
            let mut data = Vec::with_capacity(b * c);
            for &(_, t) in tasks {
                data.extend_from_slice(&self.task_vectors[t][stage]);
            }
            let v = Tensor::from_shape(&[b, c], &data).map_err(tract_err("task vectors"))?;
            inputs.push(v.into_tvalue());
        }
        let e = run("switch tail", &self.switch_plan(b)?, inputs)?;
        rows(&e, b)
    }

    /// The switch tail planned for `b` tasks at once (cached).
    fn switch_plan(&self, b: usize) -> Result<Plan> {
        let switch = self
            .switch
            .as_ref()
            .ok_or_else(|| Error::Invalid("the package has no switch tail".to_string()))?;
        let mut plans = switch
            .plans
            .lock()
            .map_err(|_| Error::Invalid("a previous tail run panicked".to_string()))?;
        if let Some(p) = plans.get(&b) {
            return Ok(p.clone());
        }
        let mut shapes = vec![self.features_shape.clone()];
        if switch.takes_vectors {
            let first = self.task_vectors.first().map(Vec::as_slice).unwrap_or(&[]);
            shapes.extend(first.iter().map(|v| vec![b, v.len()]));
        }
        let p = plan(
            &format!("switch tail for {b} tasks"),
            &switch.onnx,
            &shapes,
            &self.run_options,
        )?;
        plans.insert(b, p.clone());
        Ok(p)
    }
}

fn tract_err(graph: &str) -> impl FnOnce(anyhow::Error) -> Error + '_ {
    move |source| Error::Tract {
        graph: graph.into(),
        source,
    }
}

/// `f`, with a tract panic (some malformed graphs index out of bounds instead of
/// failing) as an error like tract's own.
fn guarded<T>(f: impl FnOnce() -> TractResult<T>) -> TractResult<T> {
    modkit_models::guard::catch_panic("/tract-", f)
        .unwrap_or_else(|msg| Err(anyhow::anyhow!("tract failed on a malformed graph ({msg})")))
}

/// Reads ONNX bytes and plans them for fixed input shapes.
fn plan(graph: &str, onnx: &[u8], shapes: &[Vec<usize>], options: &RunOptions) -> Result<Plan> {
    let build = || -> TractResult<Plan> {
        let mut model = tract_onnx::onnx().model_for_read(&mut &onnx[..])?;
        for (i, shape) in shapes.iter().enumerate() {
            model = model.with_input_fact(i, f32::fact(shape).into())?;
        }
        model.into_optimized()?.into_runnable_with_options(options)
    };
    guarded(build).map_err(tract_err(graph))
}

fn output_shape(graph: &str, plan: &Plan) -> Result<Vec<usize>> {
    let fact = plan
        .model()
        .output_fact(0)
        .map_err(tract_err(graph))?
        .shape
        .as_concrete()
        .map(<[usize]>::to_vec);
    fact.ok_or_else(|| Error::Invalid(format!("{graph}: output shape is not fixed")))
}

fn run(graph: &str, plan: &Plan, inputs: TVec<TValue>) -> Result<TValue> {
    let mut out = guarded(|| plan.run(inputs)).map_err(tract_err(graph))?;
    Ok(out.remove(0))
}

/// Splits a `[B, E]` output into `B` rows.
fn rows(e: &TValue, b: usize) -> Result<Vec<Vec<f32>>> {
    let data = e
        .try_as_plain_ram()
        .and_then(|v| v.as_slice::<f32>())
        .map_err(tract_err("embedding"))?;
    if b == 0 || data.len() % b != 0 {
        return Err(Error::Invalid(format!(
            "the tail returned {} numbers for {b} tasks",
            data.len()
        )));
    }
    Ok(data.chunks(data.len() / b).map(<[f32]>::to_vec).collect())
}
