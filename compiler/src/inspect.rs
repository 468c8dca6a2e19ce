//! `modc inspect`: what a package holds, in parameters and bytes, shared versus per
//! task. The parts add up to the file size less the container overhead (framing,
//! postcard lengths, names and the spec).

use modkit_models::{Package, container};
use prost::Message;
use serde::Serialize;
use tract_onnx::pb::{ModelProto, tensor_proto::DataType};

/// Parameters and bytes of one part.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Part {
    pub params: usize,
    pub bytes: usize,
}

/// The breakdown of a package.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub tasks: Vec<String>,
    /// `switch`, `folded` or `mixed`.
    pub mode: &'static str,
    pub precision: String,
    pub variant: String,
    pub spec: String,
    pub trunk: Part,
    pub switch_tail: Option<Part>,
    /// Task vectors: per task (equal for all tasks).
    pub vectors_per_task: Part,
    pub folded_tails: Vec<(String, Part)>,
    /// Everything but the trunk that one task needs: its folded tail in `folded`
    /// mode, else its vectors (a mixed package's folded tasks are in `folded_tails`).
    pub per_task: Part,
    pub file_bytes: usize,
    /// File bytes not in any graph or vector: framing, names, spec.
    pub overhead_bytes: usize,
}

/// Parameters (float initializers, any precision) of an ONNX graph.
pub fn graph_params(onnx: &[u8]) -> usize {
    let Ok(m) = ModelProto::decode(onnx) else {
        return 0;
    };
    m.graph
        .map(|g| {
            g.initializer
                .iter()
                .filter(|t| {
                    t.data_type == DataType::Float as i32 || t.data_type == DataType::Float16 as i32
                })
                .filter(|t| t.name != crate::emit::L2_EPS)
                .map(|t| t.dims.iter().product::<i64>() as usize)
                .sum()
        })
        .unwrap_or(0)
}

fn part(onnx: &[u8]) -> Part {
    Part {
        params: graph_params(onnx),
        bytes: onnx.len(),
    }
}

/// Breaks `pkg` (whose file is `file_bytes` long) down.
pub fn inspect(pkg: &Package, file_bytes: usize) -> Inspection {
    let trunk = part(&pkg.trunk);
    let switch_tail = pkg.tails.switch.as_deref().map(part);
    let folded_tails: Vec<(String, Part)> = pkg
        .tails
        .folded
        .iter()
        .map(|(t, g)| (t.clone(), part(g)))
        .collect();
    let v = pkg
        .task_vectors
        .first()
        .map_or(0, |v| v.iter().map(Vec::len).sum::<usize>());
    let vectors_per_task = Part {
        params: v,
        bytes: 4 * v,
    };
    let mode = match (switch_tail.is_some(), folded_tails.is_empty()) {
        (true, true) => "switch",
        (false, _) => "folded",
        (true, false) => "mixed",
    };
    let per_task = match (mode, folded_tails.first()) {
        ("folded", Some((_, p))) => p.clone(),
        _ => vectors_per_task.clone(),
    };
    let accounted = trunk.bytes
        + switch_tail.as_ref().map_or(0, |p| p.bytes)
        + folded_tails.iter().map(|(_, p)| p.bytes).sum::<usize>()
        + vectors_per_task.bytes * pkg.tasks.len();
    Inspection {
        tasks: pkg.tasks.clone(),
        mode,
        precision: format!("{:?}", pkg.precision).to_lowercase(),
        variant: pkg.variant.to_string(),
        spec: pkg.spec.name.clone(),
        trunk,
        switch_tail,
        vectors_per_task,
        folded_tails,
        per_task,
        file_bytes,
        overhead_bytes: file_bytes.saturating_sub(accounted),
    }
}

impl Inspection {
    /// A human-readable report.
    pub fn render(&self) -> String {
        let mut s = format!(
            "package: {} spec, {} variant, {} tasks, {} mode, {} weights\n",
            self.spec,
            self.variant,
            self.tasks.len(),
            self.mode,
            self.precision
        );
        s += &format!("{:<28} {:>12} {:>12}\n", "part", "parameters", "bytes");
        let mut row =
            |name: &str, p: &Part| s += &format!("{name:<28} {:>12} {:>12}\n", p.params, p.bytes);
        row("trunk (shared)", &self.trunk);
        if let Some(p) = &self.switch_tail {
            row("switch tail (shared)", p);
        }
        row("task vectors (each task)", &self.vectors_per_task);
        for (t, p) in &self.folded_tails {
            row(&format!("folded tail: {t}"), p);
        }
        let total_params = self.trunk.params
            + self.switch_tail.as_ref().map_or(0, |p| p.params)
            + self
                .folded_tails
                .iter()
                .map(|(_, p)| p.params)
                .sum::<usize>()
            + self.vectors_per_task.params * self.tasks.len();
        s += &format!(
            "{:<28} {:>12} {:>12}\n",
            "container overhead", "", self.overhead_bytes
        );
        s += &format!(
            "{:<28} {:>12} {:>12}\n",
            "file", total_params, self.file_bytes
        );
        s += &format!(
            "per task beyond the shared parts: {} parameters, {} bytes (framing: {} bytes)\n",
            self.per_task.params,
            self.per_task.bytes,
            container::HEADER_LEN + container::TRAILER_LEN
        );
        if let ("mixed", Some((_, p))) = (self.mode, self.folded_tails.first()) {
            s += &format!(
                "  (that is a switch-routed task; a folded one adds its tail as well: {} parameters, {} bytes)\n",
                p.params, p.bytes
            );
        }
        s
    }
}
