//! Times one training step of the tiny spec, split into forward, backward and update.
//! `cargo run --release -p modkit-trainer --example step_profile`
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use modkit_models::{NetSpec, Variant};
use modkit_trainer::data::Dataset;
use modkit_trainer::eval::batch_images;
use modkit_trainer::net::{Network, init_varmap};
use modkit_trainer::train::triplet_loss;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> modkit_trainer::Result<()> {
    let spec = NetSpec::tiny();
    let tasks: Vec<String> = modkit_models::tasks::CELEBA_20
        .iter()
        .map(|s| s.to_string())
        .collect();
    let ds = Dataset::synthetic(300, spec.input_size, 0);
    let vm = init_varmap(&spec, Variant::Modulated, &tasks, 0, &Device::Cpu)?;
    let net = Network::new(
        &spec,
        Variant::Modulated,
        &tasks,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    let k = 4;
    let idx: Vec<usize> = (0..3 * k * 20).map(|i| i % 300).collect();
    let groups: Vec<(usize, usize)> = (0..20).map(|t| (t, 3 * k)).collect();
    let x = batch_images(&ds, &idx, &Default::default(), &Device::Cpu)?;
    for _ in 0..3 {
        let t0 = Instant::now();
        let emb = net.forward_grouped(&x, &groups, true)?;
        let (loss, _) = triplet_loss(&emb, 20, k, 0.2)?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let _g = loss.backward()?;
        let t2 = Instant::now();
        eprintln!("forward {:?} backward {:?}", t1 - t0, t2 - t1);
    }
    Ok(())
}
