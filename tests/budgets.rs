//! Size and latency regression checks on compiled packages, in numbers that do not
//! depend on the machine: bytes of the `.modpack`, and multiply-adds per query by
//! tract's cost model of the graphs the runtime runs. Wall-clock latency is
//! `modrt bench`'s (ratios taken in one run), never a test's.

use modkit_compiler::compile::{CompileOptions, FoldTasks, compile};
use modkit_compiler::emit::features_shape;
use modkit_compiler::tract_run::fmas;
use modkit_models::{NetSpec, Package, Precision, Variant, tasks::CELEBA_20};

use crate::common;

fn package(tasks: &[&str], fold: FoldTasks, precision: Precision) -> Package {
    let ckpt = common::checkpoint(&NetSpec::paper(), Variant::Modulated, tasks);
    compile(
        &ckpt,
        &CompileOptions {
            fold,
            precision,
            ..Default::default()
        },
    )
    .expect("compile")
}

fn bytes(pkg: &Package) -> usize {
    pkg.to_bytes().expect("bytes").len()
}

/// Multiply-adds of the trunk on one image, and of the tails of the first `batch`
/// tasks of one image: the switch tail once with their vectors as a batch, or each
/// task's own folded tail.
fn work(pkg: &Package, batch: usize) -> (u64, u64) {
    let s = pkg.spec.input_size;
    let trunk = fmas("trunk", &pkg.trunk, &[vec![1, 3, s, s]]).expect("trunk");
    let (c, hw) = features_shape(&pkg.spec);
    let mut shapes = vec![vec![1, c, hw, hw]];
    let tail = match &pkg.tails.switch {
        Some(switch) => {
            shapes.extend(pkg.task_vectors[0].iter().map(|v| vec![batch, v.len()]));
            fmas("switch tail", switch, &shapes).expect("switch")
        }
        None => pkg.tails.folded[..batch]
            .iter()
            .map(|(_, tail)| fmas("folded tail", tail, &shapes).expect("folded"))
            .sum(),
    };
    (trunk, tail)
}

#[test]
fn paper_spec_queries_cost_what_the_design_says() {
    // DESIGN.md: for N = 4 the trunk is 1.77 GMAC (shared), the tail 0.045 GMAC
    // (per task), so all 20 tasks of one image cost ≈ 1.47 × one task, not 20 ×.
    let t = CELEBA_20.len();
    for fold in [FoldTasks::None, FoldTasks::All] {
        let pkg = package(&CELEBA_20, fold.clone(), Precision::F32);
        let (trunk, one_tail) = work(&pkg, 1);
        let (_, all_tails) = work(&pkg, t);
        let g = |n: u64| n as f64 / 1e9;
        assert!(
            (1.76..1.79).contains(&g(trunk)) && (0.044..0.046).contains(&g(one_tail)),
            "{fold:?}: trunk {:.4} GMAC, tail {:.4} GMAC",
            g(trunk),
            g(one_tail)
        );
        // Everything after the first task-specific multiply runs per task, nothing
        // before it.
        assert_eq!(all_tails, t as u64 * one_tail, "{fold:?}");
        let (one, all) = ((trunk + one_tail) as f64, (trunk + all_tails) as f64);
        let naive = t as f64 * one;
        eprintln!(
            "{fold:?}: trunk {:.4} GMAC, tail {:.4} GMAC per task; all ÷ one {:.3}, naive ÷ all {:.2}",
            g(trunk),
            g(one_tail),
            all / one,
            naive / all
        );
        assert!(
            (1.45..1.50).contains(&(all / one)),
            "{fold:?}: all ÷ one = {}",
            all / one
        );
        assert!(
            naive / all > 13.0,
            "{fold:?}: naive ÷ all = {}",
            naive / all
        );
    }
}

#[test]
fn paper_spec_packages_stay_within_their_byte_budgets() {
    // 4 bytes per shared parameter (2,953,664 with BatchNorm folded), 2 with f16,
    // 512 task numbers per task, and under 0.1% + 16 KiB of graph structure,
    // names and framing.
    const SHARED: usize = 2_953_664;
    const FOLDED_TAIL: usize = 2_048_640;
    const TRUNK: usize = SHARED - FOLDED_TAIL;
    let t = CELEBA_20.len();
    let budget = |floats: usize, width: usize| (floats * width) * 1001 / 1000 + 16 * 1024;
    let cases = [
        (
            "switch f32",
            FoldTasks::None,
            Precision::F32,
            SHARED * 4 + t * 512 * 4,
            4,
        ),
        (
            "switch f16",
            FoldTasks::None,
            Precision::F16,
            SHARED * 2 + t * 512 * 4,
            2,
        ),
        (
            "folded f32",
            FoldTasks::All,
            Precision::F32,
            (TRUNK + t * FOLDED_TAIL) * 4 + t * 512 * 4,
            4,
        ),
    ];
    for (name, fold, precision, floor, width) in cases {
        let size = bytes(&package(&CELEBA_20, fold, precision));
        eprintln!("{name}: {size} bytes (floor {floor})");
        assert!(
            size >= floor && size <= budget(floor / width, width),
            "{name}: {size} bytes, floor {floor}, budget {}",
            budget(floor / width, width)
        );
    }
    // One more task in switch mode costs its 512 numbers and its name, nothing else.
    let fewer = bytes(&package(
        &CELEBA_20[..t - 1],
        FoldTasks::None,
        Precision::F32,
    ));
    let all = bytes(&package(&CELEBA_20, FoldTasks::None, Precision::F32));
    assert!(
        all > fewer && all - fewer <= 512 * 4 + 64,
        "a task adds {} bytes",
        all as i64 - fewer as i64
    );
}

#[test]
fn the_shipped_model_is_the_size_its_card_says() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/pretrained");
    let card = std::fs::read_to_string(dir.join("MODEL_CARD.md")).expect("card");
    let said: usize = card
        .lines()
        .find_map(|l| l.strip_prefix("| package | ")?.strip_suffix(" bytes |"))
        .and_then(|n| n.parse().ok())
        .expect("the card's `| package | N bytes |` row");
    let size = std::fs::metadata(dir.join("tiny-faces.modpack"))
        .expect("package")
        .len();
    assert_eq!(size as usize, said);
    // And it loads, in the format it was written in.
    Package::load(&dir.join("tiny-faces.modpack")).expect("loads");
}
