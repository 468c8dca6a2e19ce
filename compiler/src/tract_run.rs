//! Runs ONNX bytes with tract on concrete input shapes (verify and tests; the
//! shipped runtime is `modkit-runtime`).

use tract_onnx::prelude::*;

use crate::{Error, Result};

/// A float tensor: shape and row-major data.
pub type Array = (Vec<usize>, Vec<f32>);

/// Runs `onnx` on `inputs` (in graph input order); returns the first output.
pub fn run(graph: &str, onnx: &[u8], inputs: &[Array]) -> Result<Array> {
    let err = |source: anyhow::Error| Error::Tract {
        graph: graph.into(),
        source,
    };
    let run = || -> TractResult<Array> {
        let mut model = tract_onnx::onnx().model_for_read(&mut &onnx[..])?;
        for (i, (shape, _)) in inputs.iter().enumerate() {
            model = model.with_input_fact(i, f32::fact(shape).into())?;
        }
        let plan = model.into_optimized()?.into_runnable()?;
        let values: TVec<TValue> = inputs
            .iter()
            .map(|(shape, data)| Ok(Tensor::from_shape(shape, data)?.into_tvalue()))
            .collect::<TractResult<_>>()?;
        let out = plan.run(values)?;
        let view = out[0].to_plain_array_view::<f32>()?;
        Ok((view.shape().to_vec(), view.iter().copied().collect()))
    };
    guarded(run).map_err(err)
}

/// `f`, with a tract panic (some malformed graphs index out of bounds instead of
/// failing) as an error like tract's own.
fn guarded<T>(f: impl FnOnce() -> TractResult<T>) -> TractResult<T> {
    modkit_models::guard::catch_panic("/tract-", f)
        .unwrap_or_else(|msg| Err(anyhow::anyhow!("tract failed on a malformed graph ({msg})")))
}

/// Multiply-adds one run of `onnx` costs at the given input shapes, by tract's own
/// cost model of the decluttered graph (convolutions and matrix products): the
/// work a query does, counted, not timed.
pub fn fmas(graph: &str, onnx: &[u8], shapes: &[Vec<usize>]) -> Result<u64> {
    let count = || -> TractResult<u64> {
        let mut model = tract_onnx::onnx().model_for_read(&mut &onnx[..])?;
        for (i, shape) in shapes.iter().enumerate() {
            model = model.with_input_fact(i, f32::fact(shape).into())?;
        }
        let typed = model.into_typed()?.into_decluttered()?;
        let mut total = 0u64;
        for node in typed.nodes() {
            let facts = node
                .inputs
                .iter()
                .map(|o| typed.outlet_fact(*o))
                .collect::<TractResult<TVec<_>>>()?;
            for (cost, n) in node.op.cost(&facts)? {
                if matches!(cost, tract_onnx::tract_core::ops::Cost::FMA(_)) {
                    total += u64::try_from(n.to_i64()?)?;
                }
            }
        }
        Ok(total)
    };
    guarded(count).map_err(|source| Error::Tract {
        graph: graph.into(),
        source,
    })
}
