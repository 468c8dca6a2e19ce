//! Emits the ONNX graphs of a package from a [`PlainNet`]: the trunk, the switch
//! tail, folded tails and the single-task export model.
//!
//! Each block is `Conv → ReLU → MaxPool(2, 2) → [Conv → ReLU → Conv] + skip → ReLU`,
//! fc is `Flatten → Gemm`, and the embedding is `e / √(Σe² + 1e-12)`, exactly as
//! the trainer computes it.

use modkit_models::{Fit, NetSpec, Precision, Preprocess, StageShape};

use crate::fold_batch_norm::{Affine, PlainNet};
use crate::graph::{Attr, Dim, GraphBuilder};

/// Input names of the switch tail.
pub const FEATURES: &str = "features";
/// The image input of the trunk and the export model.
pub const IMAGE: &str = "image";
/// The output of tails and the export model.
pub const EMBEDDING: &str = "embedding";

/// The switch tail's vector input for a modulated stage.
pub fn vector_input(stage: &str) -> String {
    format!("mod.{stage}")
}

/// A per-task linear head after fc (the `branch:K` variant): `[K, E]` and `[K]`.
#[derive(Debug, Clone)]
pub struct Head {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub k: usize,
}

fn conv(g: &mut GraphBuilder, x: &str, name: &str, layer: &Affine, pad: i64) -> String {
    let w = g.weights(&format!("{name}.weight"), &layer.dims, &layer.weight);
    let b = g.weights(&format!("{name}.bias"), &[layer.outputs()], &layer.bias);
    g.op(
        "Conv",
        &[x, &w, &b],
        name,
        &[
            ("kernel_shape", Attr::Ints(vec![3, 3])),
            ("pads", Attr::Ints(vec![pad, pad, pad, pad])),
            ("strides", Attr::Ints(vec![1, 1])),
        ],
    )
}

fn relu(g: &mut GraphBuilder, x: &str) -> String {
    g.op("Relu", &[x], "relu", &[])
}

/// Stage `k`: 1 = conv1, 2..=5 = blocks.
fn stage(g: &mut GraphBuilder, net: &PlainNet, k: usize, x: &str) -> String {
    let l = |n: &str| &net.layers[n];
    if k == 1 {
        let c = conv(g, x, "conv1", l("conv1"), 0);
        return relu(g, &c);
    }
    let p = format!("block{k}");
    let c = conv(g, x, &format!("{p}.conv"), l(&format!("{p}.conv")), 0);
    let c = relu(g, &c);
    let y = g.op(
        "MaxPool",
        &[&c],
        &format!("{p}.pool"),
        &[
            ("kernel_shape", Attr::Ints(vec![2, 2])),
            ("strides", Attr::Ints(vec![2, 2])),
        ],
    );
    let r = conv(g, &y, &format!("{p}.res1"), l(&format!("{p}.res1")), 1);
    let r = relu(g, &r);
    let r = conv(g, &r, &format!("{p}.res2"), l(&format!("{p}.res2")), 1);
    let s = g.op("Add", &[&y, &r], &format!("{p}.add"), &[]);
    relu(g, &s)
}

fn fc(g: &mut GraphBuilder, net: &PlainNet, x: &str) -> String {
    let l = &net.layers["fc"];
    let f = g.op("Flatten", &[x], "flatten", &[("axis", Attr::Int(1))]);
    let w = g.weights("fc.weight", &l.dims, &l.weight);
    let b = g.weights("fc.bias", &[l.outputs()], &l.bias);
    g.op("Gemm", &[&f, &w, &b], "fc", &[("transB", Attr::Int(1))])
}

fn head(g: &mut GraphBuilder, e: &str, h: &Head, embedding: usize) -> String {
    let w = g.weights("branch.weight", &[h.k, embedding], &h.weight);
    let b = g.weights("branch.bias", &[h.k], &h.bias);
    g.op("Gemm", &[e, &w, &b], "branch", &[("transB", Attr::Int(1))])
}

/// The initializer of the L2 norm's epsilon: a constant, not a parameter.
pub const L2_EPS: &str = "l2.eps";

fn l2_normalize(g: &mut GraphBuilder, e: &str) {
    let ss = g.op(
        "ReduceSumSquare",
        &[e],
        "sumsq",
        &[("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(1))],
    );
    let eps = g.constant(L2_EPS, &[1], &[1e-12]);
    let ss = g.op("Add", &[&ss, &eps], "sumsq_eps", &[]);
    let n = g.op("Sqrt", &[&ss], "norm", &[]);
    g.node("Div", &[e, &n], EMBEDDING, &[]);
}

/// The embedding size of a head, or the spec's.
fn out_dim(spec: &NetSpec, h: Option<&Head>) -> usize {
    h.map_or(spec.embedding, |h| h.k)
}

/// The shape of the trunk's output (block N).
pub fn features_shape(spec: &NetSpec) -> (usize, usize) {
    let s = &spec.stages()[spec.first_modulated - 1];
    (s.channels, s.size)
}

/// Declares the image input `[N, 3, S, S]` and emits conv1..block N; returns the
/// features' name.
fn trunk_body(g: &mut GraphBuilder, spec: &NetSpec, net: &PlainNet) -> String {
    let s = spec.input_size;
    let mut x = g.input(
        IMAGE,
        &[
            Dim::Symbol("N"),
            Dim::Fixed(3),
            Dim::Fixed(s),
            Dim::Fixed(s),
        ],
    );
    for k in 1..=spec.first_modulated {
        x = stage(g, net, k, &x);
    }
    x
}

/// image `[N, 3, S, S]` → features `[N, C, H, W]` (conv1..block N).
pub fn trunk(spec: &NetSpec, net: &PlainNet, precision: Precision) -> (Vec<u8>, usize) {
    let mut g = GraphBuilder::new("trunk", precision);
    let x = trunk_body(&mut g, spec, net);
    g.node("Identity", &[&x], FEATURES, &[]);
    let (c, h) = features_shape(spec);
    g.output(
        FEATURES,
        &[
            Dim::Symbol("N"),
            Dim::Fixed(c),
            Dim::Fixed(h),
            Dim::Fixed(h),
        ],
    );
    let params = g.params;
    (g.finish(), params)
}

fn tail_body(
    g: &mut GraphBuilder,
    spec: &NetSpec,
    net: &PlainNet,
    mut x: String,
    h: Option<&Head>,
) {
    for k in spec.first_modulated + 1..=5 {
        x = stage(g, net, k, &x);
    }
    let mut e = fc(g, net, &x);
    if let Some(h) = h {
        e = head(g, &e, h, spec.embedding);
    }
    l2_normalize(g, &e);
}

/// features `[N, C, H, W]` → embedding `[N, E]`, the task folded into `net`.
pub fn folded_tail(
    spec: &NetSpec,
    net: &PlainNet,
    h: Option<&Head>,
    precision: Precision,
) -> (Vec<u8>, usize) {
    let mut g = GraphBuilder::new("tail", precision);
    let (c, hw) = features_shape(spec);
    let x = g.input(
        FEATURES,
        &[
            Dim::Symbol("N"),
            Dim::Fixed(c),
            Dim::Fixed(hw),
            Dim::Fixed(hw),
        ],
    );
    tail_body(&mut g, spec, net, x, h);
    g.output(EMBEDDING, &[Dim::Symbol("N"), Dim::Fixed(out_dim(spec, h))]);
    let params = g.params;
    (g.finish(), params)
}

/// The runtime switch: features `[1, C, H, W]` of one image plus, per stage of
/// `stages`, `B` task vectors `[B, C_s]` (ReLU applied) → embeddings `[B, E]`. The
/// batch of tasks starts at the first multiply, so the image's features are shared.
/// `stages` are the outputs the tasks scale, in network order: every modulated
/// stage ([`NetSpec::modulated_stages`]), or fc's alone (CSN's masks).
pub fn switch_tail(
    spec: &NetSpec,
    net: &PlainNet,
    stages: &[StageShape],
    precision: Precision,
) -> (Vec<u8>, usize) {
    let mut g = GraphBuilder::new("switch_tail", precision);
    let (c, hw) = features_shape(spec);
    let mut x = g.input(
        FEATURES,
        &[Dim::Fixed(1), Dim::Fixed(c), Dim::Fixed(hw), Dim::Fixed(hw)],
    );
    let vectors: Vec<String> = stages
        .iter()
        .map(|s| {
            g.input(
                &vector_input(s.name),
                &[Dim::Symbol("B"), Dim::Fixed(s.channels)],
            )
        })
        .collect();
    let modulate = |g: &mut GraphBuilder, x: &str, v: &str, channels: usize, spatial: bool| {
        let v = if spatial {
            let shape = g.ints("shape", &[-1, channels as i64, 1, 1]);
            g.op("Reshape", &[v, &shape], "vec4d", &[])
        } else {
            v.to_string()
        };
        g.op("Mul", &[x, &v], "modulate", &[])
    };
    // Stage `name`'s vectors, if the tasks scale it.
    let input_of = |name: &str| {
        stages
            .iter()
            .position(|s| s.name == name)
            .map(|i| (vectors[i].clone(), stages[i].channels))
    };
    let all = spec.stages();
    if let Some((v, channels)) = input_of(all[spec.first_modulated - 1].name) {
        x = modulate(&mut g, &x, &v, channels, true);
    }
    for k in spec.first_modulated + 1..=5 {
        x = stage(&mut g, net, k, &x);
        if let Some((v, channels)) = input_of(all[k - 1].name) {
            x = modulate(&mut g, &x, &v, channels, true);
        }
    }
    let mut e = fc(&mut g, net, &x);
    if let Some((v, channels)) = input_of("fc") {
        e = modulate(&mut g, &e, &v, channels, false);
    }
    l2_normalize(&mut g, &e);
    g.output(EMBEDDING, &[Dim::Symbol("B"), Dim::Fixed(spec.embedding)]);
    let params = g.params;
    (g.finish(), params)
}

/// `branch:K`'s runtime switch: features `[1, C, H, W]` of one image plus `B`
/// tasks' heads, weights `[B, K·E]` and biases `[B, K]` → embeddings `[B, K]`. The
/// shared network runs once; the batch starts at the heads' product.
pub fn branch_switch_tail(
    spec: &NetSpec,
    net: &PlainNet,
    k: usize,
    precision: Precision,
) -> (Vec<u8>, usize) {
    let mut g = GraphBuilder::new("switch_tail", precision);
    let (c, hw) = features_shape(spec);
    let e = spec.embedding;
    let mut x = g.input(
        FEATURES,
        &[Dim::Fixed(1), Dim::Fixed(c), Dim::Fixed(hw), Dim::Fixed(hw)],
    );
    let w = g.input(
        &vector_input("branch.weight"),
        &[Dim::Symbol("B"), Dim::Fixed(k * e)],
    );
    let b = g.input(
        &vector_input("branch.bias"),
        &[Dim::Symbol("B"), Dim::Fixed(k)],
    );
    for s in spec.first_modulated + 1..=5 {
        x = stage(&mut g, net, s, &x);
    }
    let shared = fc(&mut g, net, &x);
    let column = g.ints("shape", &[e as i64, 1]);
    let column = g.op("Reshape", &[&shared, &column], "embedding_column", &[]);
    let heads = g.ints("shape", &[-1, k as i64, e as i64]);
    let heads = g.op("Reshape", &[&w, &heads], "heads", &[]);
    let y = g.op("MatMul", &[&heads, &column], "branch", &[]);
    let rows = g.ints("shape", &[-1, k as i64]);
    let y = g.op("Reshape", &[&y, &rows], "branch_rows", &[]);
    let y = g.op("Add", &[&y, &b], "branch_bias", &[]);
    l2_normalize(&mut g, &y);
    g.output(EMBEDDING, &[Dim::Symbol("B"), Dim::Fixed(k)]);
    let params = g.params;
    (g.finish(), params)
}

/// One task as a single standard model: image `[N, 3, S, S]` → embedding `[N, E]`,
/// with `metadata` ([`export_metadata`]) as its `metadata_props`.
pub fn export_model(
    spec: &NetSpec,
    net: &PlainNet,
    h: Option<&Head>,
    precision: Precision,
    metadata: &[(&str, String)],
) -> Vec<u8> {
    let mut g = GraphBuilder::new("modkit_task", precision);
    let x = trunk_body(&mut g, spec, net);
    tail_body(&mut g, spec, net, x, h);
    g.output(EMBEDDING, &[Dim::Symbol("N"), Dim::Fixed(out_dim(spec, h))]);
    g.finish_with(metadata)
}

/// What another runtime must know to feed an exported model: the task and how an
/// image becomes its input (the graph starts after normalisation).
pub fn export_metadata(
    spec: &NetSpec,
    preprocess: &Preprocess,
    task: &str,
) -> Vec<(&'static str, String)> {
    let list = |v: &[f32; 3]| v.map(|x| x.to_string()).join(",");
    let fit = match preprocess.fit {
        Fit::Crop => "crop",
        Fit::Pad => "pad",
    };
    vec![
        ("modkit.task", task.to_string()),
        ("modkit.input_size", spec.input_size.to_string()),
        ("modkit.fit", fit.to_string()),
        ("modkit.mean", list(&preprocess.mean)),
        ("modkit.std", list(&preprocess.std)),
        (
            "modkit.input",
            format!(
                "RGB, squared by {} (crop: centre square; pad: centred on white), resized to {s}x{s}, each pixel p in 0..=255 as (p/255 - mean[c]) / std[c], layout [N, 3, {s}, {s}]",
                fit,
                s = spec.input_size
            ),
        ),
    ]
}
