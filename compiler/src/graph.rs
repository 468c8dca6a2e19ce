//! A small ONNX graph writer over tract-onnx's protobuf types (`tract_onnx::pb`),
//! encoded with prost: no protoc, no Python.
//!
//! Shapes: graph inputs and outputs may use one symbolic dimension (a batch); no
//! `value_info` is emitted, so nothing can clash with the concrete input shapes a
//! runtime fixes at load time.

use half::f16;
use modkit_models::Precision;
use prost::Message;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataType, tensor_shape_proto, type_proto,
};

/// The ONNX opset the graphs target.
pub const OPSET: i64 = 13;

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    Symbol(&'static str),
}

/// An attribute value.
#[derive(Debug, Clone)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// Builds one ONNX graph.
#[derive(Debug)]
pub struct GraphBuilder {
    graph: GraphProto,
    precision: Precision,
    counter: usize,
    /// Parameters stored, for accounting.
    pub params: usize,
}

fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
                Dim::Symbol(s) => tensor_shape_proto::dimension::Value::DimParam(s.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl GraphBuilder {
    /// An empty graph whose float weights are stored at `precision`.
    pub fn new(name: &str, precision: Precision) -> Self {
        GraphBuilder {
            graph: GraphProto {
                name: name.into(),
                ..Default::default()
            },
            precision,
            counter: 0,
            params: 0,
        }
    }

    /// Declares a float graph input.
    pub fn input(&mut self, name: &str, dims: &[Dim]) -> String {
        self.graph.input.push(value_info(name, dims));
        name.into()
    }

    /// Declares a float graph output.
    pub fn output(&mut self, name: &str, dims: &[Dim]) {
        self.graph.output.push(value_info(name, dims));
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    /// Adds float weights; at `f16` precision they are stored as half and cast back
    /// to float by a `Cast` node that the runtime folds at load time.
    pub fn weights(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        self.params += data.len();
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        match self.precision {
            Precision::F32 => {
                self.graph.initializer.push(TensorProto {
                    name: name.into(),
                    dims,
                    data_type: DataType::Float as i32,
                    raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ..Default::default()
                });
                name.into()
            }
            Precision::F16 => {
                let half_name = format!("{name}.f16");
                self.graph.initializer.push(TensorProto {
                    name: half_name.clone(),
                    dims,
                    data_type: DataType::Float16 as i32,
                    raw_data: data
                        .iter()
                        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                        .collect(),
                    ..Default::default()
                });
                self.node(
                    "Cast",
                    &[&half_name],
                    name,
                    &[("to", Attr::Int(DataType::Float as i64))],
                );
                name.into()
            }
        }
    }

    /// Adds an f32 constant that is not a weight: stored as f32 at every precision
    /// (f16 would round the L2 norm's 1e-12 to 0) and not counted as parameters.
    pub fn constant(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        self.graph.initializer.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    /// Adds an int64 constant (shapes, axes); not counted as parameters.
    pub fn ints(&mut self, hint: &str, values: &[i64]) -> String {
        let name = self.fresh(hint);
        self.graph.initializer.push(TensorProto {
            name: name.clone(),
            dims: vec![values.len() as i64],
            data_type: DataType::Int64 as i32,
            int64_data: values.to_vec(),
            ..Default::default()
        });
        name
    }

    /// Adds a node with one output named `output`.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        output: &str,
        attrs: &[(&str, Attr)],
    ) -> String {
        let attribute = attrs
            .iter()
            .map(|(name, a)| {
                let mut p = AttributeProto {
                    name: name.to_string(),
                    ..Default::default()
                };
                match a {
                    Attr::Int(i) => {
                        p.i = *i;
                        p.r#type = AttributeType::Int as i32;
                    }
                    Attr::Ints(v) => {
                        p.ints = v.clone();
                        p.r#type = AttributeType::Ints as i32;
                    }
                    Attr::Float(f) => {
                        p.f = *f;
                        p.r#type = AttributeType::Float as i32;
                    }
                }
                p
            })
            .collect();
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            name: output.into(),
            op_type: op.into(),
            attribute,
            ..Default::default()
        });
        output.into()
    }

    /// Adds a node whose output gets a fresh name from `hint`.
    pub fn op(&mut self, op: &str, inputs: &[&str], hint: &str, attrs: &[(&str, Attr)]) -> String {
        let out = self.fresh(hint);
        self.node(op, inputs, &out, attrs)
    }

    /// The encoded model.
    pub fn finish(self) -> Vec<u8> {
        self.finish_with(&[])
    }

    /// The encoded model with `metadata` as its `metadata_props` (key, value).
    pub fn finish_with(self, metadata: &[(&str, String)]) -> Vec<u8> {
        ModelProto {
            metadata_props: metadata
                .iter()
                .map(|(key, value)| StringStringEntryProto {
                    key: key.to_string(),
                    value: value.clone(),
                })
                .collect(),
            ir_version: 7,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "modc".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(self.graph),
            ..Default::default()
        }
        .encode_to_vec()
    }
}
