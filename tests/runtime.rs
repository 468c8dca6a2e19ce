//! The runtime against the rest of the pipeline: a checkpoint trained by
//! `modkit-trainer` on the built-in faces, compiled by `modkit-compiler`, run by
//! `modkit-runtime` (tract) on the PNG files of a CelebA-layout gallery.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use modkit_compiler::compile::{CompileOptions, FoldTasks, compile};
use modkit_models::{Checkpoint, Fit, Variant};
use modkit_runtime::index::{self, GalleryIndex};
use modkit_runtime::{Error, Model};
use modkit_trainer::data::{celeba, zappos};
use modkit_trainer::eval::batch_images;
use modkit_trainer::net::network_from_checkpoint;
use modkit_trainer::train::{TrainConfig, Trainer};

use crate::common::small as spec;

const TASKS: [&str; 3] = ["smiling", "young", "mouth_slightly_open"];
const GALLERY: usize = 80;

struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    ckpt: PathBuf,
    switch: PathBuf,
    folded: PathBuf,
}

/// Trains one small checkpoint (one short epoch) and compiles it both ways.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tmp");
        let data = dir.path().join("data");
        celeba::write_synthetic(&data, GALLERY, 48, 11, &|_| {}).expect("synth");
        let ds = celeba::load(&data, 48, None).expect("load");
        let cfg = TrainConfig {
            spec: spec(),
            variant: Variant::Modulated,
            tasks: TASKS.map(String::from).to_vec(),
            epochs: 1,
            triplets_per_task: 8,
            batch_per_task: 4,
            test_triplets_per_task: 10,
            ..TrainConfig::default()
        };
        let ckpt = dir.path().join("m.safetensors");
        Trainer::new(cfg, &ds, Device::Cpu)
            .expect("trainer")
            .run(&ds, &ckpt)
            .expect("train");
        let c = Checkpoint::load(&ckpt).expect("ckpt");
        let switch = dir.path().join("switch.modpack");
        compile(&c, &CompileOptions::default())
            .expect("compile")
            .save(&switch)
            .expect("save");
        let folded = dir.path().join("folded.modpack");
        let opts = CompileOptions {
            fold: FoldTasks::All,
            ..CompileOptions::default()
        };
        compile(&c, &opts)
            .expect("fold")
            .save(&folded)
            .expect("save");
        Fixture {
            _dir: dir,
            data,
            ckpt,
            switch,
            folded,
        }
    })
}

fn build(
    model: &Model,
    dir: &Path,
    existing: Option<GalleryIndex>,
) -> (GalleryIndex, index::Report) {
    let tasks: Vec<usize> = (0..model.tasks().len()).collect();
    index::build(model, dir, &tasks, existing, &|_, _| {}).expect("index")
}

#[test]
fn runtime_embeddings_of_png_files_equal_the_checkpoints() {
    let f = fixture();
    let ckpt = Checkpoint::load(&f.ckpt).expect("ckpt");
    let (_vm, net) = network_from_checkpoint(&ckpt, &Device::Cpu).expect("net");
    let ds = celeba::load(&f.data, 48, None).expect("load");
    let rows: Vec<usize> = (0..6).collect();
    let x = batch_images(&ds, &rows, &ckpt.header.preprocess, &Device::Cpu).expect("batch");
    for package in [&f.switch, &f.folded] {
        let model = Model::load(package).expect("model");
        let all: Vec<usize> = (0..TASKS.len()).collect();
        for &i in &rows {
            let path = f.data.join(celeba::IMAGES).join(&ds.files[i]);
            let got = model
                .embed_all(
                    &model
                        .trunk(&model.load_image(&path).expect("img"))
                        .expect("trunk"),
                    &all,
                )
                .expect("embed");
            for (t, got) in got.iter().enumerate() {
                let xi = x.narrow(0, i, 1).expect("row");
                let e: Tensor = net.forward_grouped(&xi, &[(t, 1)], false).expect("candle");
                let want: Vec<f32> = e.flatten_all().and_then(|e| e.to_vec1()).expect("vec");
                let err = want
                    .iter()
                    .zip(got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-4, "{package:?} image {i} task {t}: {err}");
                // One task alone equals the same task inside the batch.
                let alone = model
                    .embed(
                        &model
                            .trunk(&model.load_image(&path).expect("img"))
                            .expect("t"),
                        t,
                    )
                    .expect("one");
                assert_eq!(alone.len(), got.len());
                assert!(alone.iter().zip(got).all(|(a, b)| (a - b).abs() < 1e-6));
            }
        }
    }
}

#[test]
fn switch_and_folded_packages_rank_the_gallery_alike() {
    let f = fixture();
    let switch = Model::load(&f.switch).expect("switch");
    let folded = Model::load(&f.folded).expect("folded");
    let (a, _) = build(&switch, &f.data, None);
    let (b, _) = build(&folded, &f.data, None);
    assert_eq!(a.ids, b.ids);
    for (ta, tb) in a.tasks.iter().zip(&b.tasks) {
        assert_eq!(ta.labels, tb.labels);
        for q in 0..5 {
            let query = &ta.rows[q * a.dim..(q + 1) * a.dim];
            let ra: Vec<usize> = a
                .search(ta, query, 10, Some(q))
                .iter()
                .map(|h| h.row)
                .collect();
            let rb: Vec<usize> = b
                .search(tb, query, 10, Some(q))
                .iter()
                .map(|h| h.row)
                .collect();
            assert_eq!(ra, rb, "task {} query {q}", ta.task);
        }
    }
}

#[test]
fn index_round_trips_appends_and_refuses_other_models_and_damage() {
    let f = fixture();
    let model = Model::load(&f.switch).expect("model");
    let tmp = tempfile::tempdir().expect("tmp");
    // A CelebA-layout copy holding the first 60 images, then all 80.
    let images = f.data.join(celeba::IMAGES);
    let gallery = tmp.path().join("g");
    std::fs::create_dir_all(gallery.join(celeba::IMAGES)).expect("mkdir");
    std::fs::create_dir_all(gallery.join("Anno")).expect("mkdir");
    std::fs::copy(
        f.data.join(celeba::ATTR_FILE),
        gallery.join(celeba::ATTR_FILE),
    )
    .expect("attr");
    let mut names: Vec<String> = std::fs::read_dir(&images)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in &names[..60] {
        std::fs::copy(images.join(n), gallery.join(celeba::IMAGES).join(n)).expect("cp");
    }
    let (first, report) = build(&model, &gallery, None);
    assert_eq!((report.added, report.kept, first.ids.len()), (60, 0, 60));
    assert!(
        first.tasks[0].labels.iter().all(|&l| l == 1 || l == -1),
        "labels come from Anno/"
    );
    let path = tmp.path().join("g.modidx");
    first.save(&path).expect("save");
    assert_eq!(GalleryIndex::load_for(&path, &model).expect("load"), first);

    for n in &names[60..] {
        std::fs::copy(images.join(n), gallery.join(celeba::IMAGES).join(n)).expect("cp");
    }
    let (appended, report) = build(&model, &gallery, Some(first.clone()));
    assert_eq!((report.added, report.kept), (20, 60));
    let (fresh, _) = build(&model, &gallery, None);
    assert_eq!(appended.ids, fresh.ids);
    for (a, b) in appended.tasks.iter().zip(&fresh.tasks) {
        assert_eq!(a.labels, b.labels);
        let err = a
            .rows
            .iter()
            .zip(&b.rows)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-6, "appended rows equal a fresh build: {err}");
    }

    // Another package's index is refused, with the way out in the message.
    let other = Model::load(&f.folded).expect("folded");
    let err = GalleryIndex::load_for(&path, &other).unwrap_err();
    assert!(matches!(err, Error::WrongModel { .. }), "{err}");
    assert!(err.to_string().contains("modrt index"), "{err}");

    // A flipped byte and a cut file are named as such.
    let mut bytes = std::fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write");
    let err = GalleryIndex::load(&path).unwrap_err().to_string();
    assert!(err.contains("corrupt"), "{err}");
    bytes[mid] ^= 0x40;
    std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("write");
    let err = GalleryIndex::load(&path).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
    // A package is not an index.
    let err = GalleryIndex::load(&f.switch).unwrap_err().to_string();
    assert!(err.contains("not a modkit gallery index"), "{err}");
}

#[test]
fn odd_images_are_embedded_and_unreadable_ones_skipped() {
    let f = fixture();
    let model = Model::load(&f.switch).expect("model");
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let face = image::open(f.data.join(celeba::IMAGES).join("000001.png")).expect("face");
    face.resize_exact(100, 61, image::imageops::FilterType::Triangle)
        .to_rgb8()
        .save(dir.join("wide.jpg"))
        .expect("jpg");
    face.to_luma8().save(dir.join("grey.png")).expect("grey");
    face.to_rgba8().save(dir.join("alpha.PNG")).expect("rgba");
    std::fs::create_dir(dir.join("sub")).expect("mkdir");
    face.resize_exact(7, 9, image::imageops::FilterType::Nearest)
        .to_rgb8()
        .save(dir.join("sub/tiny.png"))
        .expect("tiny");
    std::fs::write(dir.join("empty.png"), b"").expect("empty");
    std::fs::write(dir.join("text.jpg"), b"hello, not a jpeg").expect("text");
    std::fs::write(dir.join("notes.txt"), b"ignored").expect("txt");
    let (idx, report) = build(&model, dir, None);
    assert_eq!(
        idx.ids,
        ["alpha.PNG", "grey.png", "sub/tiny.png", "wide.jpg"]
    );
    let skipped: Vec<&str> = report.skipped.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(skipped, ["empty.png", "text.jpg"]);
    assert!(
        report
            .skipped
            .iter()
            .all(|(_, why)| why.contains("JPEG or PNG"))
    );
    // No attribute file here: labels are unknown.
    assert!(idx.tasks.iter().all(|t| t.labels.iter().all(|&l| l == 0)));
    // An RGBA copy of an image embeds like the RGB original.
    let a = &idx.tasks[0].rows[..idx.dim];
    let rgb = model
        .embed(
            &model
                .trunk(&model.prepare(&face).expect("prep"))
                .expect("trunk"),
            0,
        )
        .expect("embed");
    let err = a
        .iter()
        .zip(&rgb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-6, "{err}");

    let empty = tempfile::tempdir().expect("tmp");
    let tasks = [0usize];
    let err = index::build(&model, empty.path(), &tasks, None, &|_, _| {}).unwrap_err();
    assert!(err.to_string().contains("holds no images"), "{err}");
}

/// A package whose task vector holds an infinity (made by hand: `modc compile`
/// refuses a non-finite checkpoint) in its last stage, where no ReLU follows to
/// absorb it, embeds nothing for that task: indexing and queries stop, naming
/// the task and image, instead of ranking NaN distances.
#[test]
fn a_package_whose_embeddings_are_not_finite_is_refused() {
    let f = fixture();
    let c = Checkpoint::load(&f.ckpt).expect("ckpt");
    let mut pkg = compile(&c, &CompileOptions::default()).expect("compile");
    let last = pkg.task_vectors[1].len() - 1;
    pkg.task_vectors[1][last][0] = f32::INFINITY;
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("nan.modpack");
    pkg.save(&path).expect("save");
    let model = Model::load(&path).expect("loads");
    let tasks: Vec<usize> = (0..model.tasks().len()).collect();
    let err = index::build(&model, &f.data, &tasks, None, &|_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{} embedding is not finite", TASKS[1])) && err.contains(".png: "),
        "{err}"
    );
    let image = model
        .load_image(&f.data.join(celeba::IMAGES).join("000001.png"))
        .expect("image");
    let features = model.trunk(&image).expect("trunk");
    assert!(
        model.embed(&features, 0).is_ok(),
        "the other tasks still embed"
    );
    assert!(model.embed(&features, 1).is_err());
}

#[test]
fn unknown_tasks_are_listed() {
    let f = fixture();
    let model = Model::load(&f.switch).expect("model");
    let err = model.task_index("smile").unwrap_err().to_string();
    assert!(
        err.contains("\"smile\"") && err.contains("smiling, young, mouth_slightly_open"),
        "{err}"
    );
    assert_eq!(model.task_index("Smiling").expect("case"), 0);
}

/// The shipped model retrieves faces that share the query's smiling value far
/// more often than chance (the gallery is balanced: chance is about 0.5).
#[test]
fn pretrained_model_retrieves_by_smiling() {
    let pkg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/pretrained/tiny-faces.modpack");
    let model = Model::load(&pkg).expect("pretrained package");
    let tmp = tempfile::tempdir().expect("tmp");
    // Faces the model never saw: another seed than its training set's.
    celeba::write_synthetic(tmp.path(), 400, model.input_size(), 4242, &|_| {}).expect("synth");
    let smiling = model.task_index("smiling").expect("task");
    let (idx, report) =
        index::build(&model, tmp.path(), &[smiling], None, &|_, _| {}).expect("index");
    assert_eq!(report.added, 400);
    let rows = &idx.tasks[0];
    let queries = 60;
    let mut same = 0;
    for q in 0..queries {
        let query = &rows.rows[q * idx.dim..(q + 1) * idx.dim];
        let hits = idx.search(rows, query, 5, Some(q));
        same += hits
            .iter()
            .filter(|h| rows.labels[h.row] == rows.labels[q])
            .count();
    }
    let precision = same as f64 / (5 * queries) as f64;
    let positives = rows.labels.iter().filter(|&&l| l == 1).count() as f64 / 400.0;
    let chance = positives * positives + (1.0 - positives) * (1.0 - positives);
    eprintln!("precision@5 for smiling: {precision:.3} (chance {chance:.3})");
    assert!(
        precision >= 0.8,
        "precision@5 {precision:.3}, chance {chance:.3}"
    );
}

/// `n` shoes in UT-Zappos50K's layout, 60×40 (wider than tall, as the original
/// photos), each a coloured sole that reaches the left and right edges: cropped to
/// a square, the sole's ends are cut off; padded, they are kept.
fn zappos_tree(dir: &Path, n: usize) {
    let images = dir.join("ut-zap50k-images/Shoes/Oxfords/Brand");
    std::fs::create_dir_all(&images).expect("dirs");
    std::fs::create_dir_all(dir.join("ut-zap50k-data")).expect("dirs");
    let mut meta = String::from("CID,Category,HeelHeight,Gender\n");
    for i in 0..n {
        let colour = [[200u8, 30, 30], [30, 200, 30], [30, 30, 200]][i % 3];
        let img = image::RgbImage::from_fn(60, 40, |x, y| {
            let end = !(6..54).contains(&x);
            if (y >= 24 - 4 * (i as u32 % 2) && y < 34) || (end && y > 10) {
                image::Rgb(colour)
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        img.save(images.join(format!("{}.{}.jpg", 100 + i, i % 5)))
            .expect("save");
        meta.push_str(&format!(
            "{}-{},{},{},{}\n",
            100 + i,
            i % 5,
            ["Boots", "Shoes", "Sandals"][i % 3],
            ["Flat", "High heel"][i % 2],
            ["Men", "Women"][i / 3 % 2]
        ));
    }
    std::fs::write(dir.join("ut-zap50k-data/meta-data.csv"), meta).expect("meta");
}

#[test]
fn padded_training_data_is_padded_at_query_time() {
    let dir = tempfile::tempdir().expect("tmp");
    zappos_tree(dir.path(), 40);
    let ds = zappos::load(dir.path(), 48, None).expect("zappos");
    assert_eq!(ds.fit, Fit::Pad);
    let cfg = TrainConfig {
        spec: spec(),
        variant: Variant::Modulated,
        tasks: vec!["category".into(), "heel_height".into()],
        epochs: 1,
        triplets_per_task: 8,
        batch_per_task: 4,
        test_triplets_per_task: 4,
        ..TrainConfig::default()
    };
    let ckpt = dir.path().join("shoes.safetensors");
    Trainer::new(cfg, &ds, Device::Cpu)
        .expect("trainer")
        .run(&ds, &ckpt)
        .expect("train");
    let c = Checkpoint::load(&ckpt).expect("ckpt");
    assert_eq!(c.header.preprocess.fit, Fit::Pad);
    let package = dir.path().join("shoes.modpack");
    compile(&c, &CompileOptions::default())
        .expect("compile")
        .save(&package)
        .expect("save");
    let model = Model::load(&package).expect("model");
    assert_eq!(model.preprocess().fit, Fit::Pad);

    // The runtime's input for each shoe file is the trainer's, to the bit.
    let root = dir.path().join(zappos::IMAGE_DIRS[1]);
    let rows: Vec<usize> = (0..4).collect();
    let x = batch_images(&ds, &rows, &c.header.preprocess, &Device::Cpu).expect("batch");
    let cropping = modkit_models::Preprocess {
        fit: Fit::Crop,
        ..c.header.preprocess
    };
    for &i in &rows {
        let path = root.join(&ds.files[i]);
        let want: Vec<f32> = x
            .narrow(0, i, 1)
            .and_then(|r| r.flatten_all())
            .and_then(|r| r.to_vec1())
            .expect("row");
        let got = model.load_image(&path).expect("shoe");
        assert_eq!(got.as_slice(), want.as_slice(), "{path:?}");
        // Cropped, the same file gives other input: the check can fail.
        let img = modkit_runtime::input::open(&path).expect("open");
        let cropped = modkit_runtime::input::prepare(&img, 48, &cropping).expect("crop");
        assert_ne!(cropped.as_slice(), want.as_slice());
    }
}

#[test]
fn every_variant_route_and_precision_runs_in_the_runtime_as_in_candle() {
    use modkit_compiler::compile::FoldTasks;
    use modkit_models::Precision;
    let dir = tempfile::tempdir().expect("tmp");
    let tasks = ["smiling", "young", "bangs"];
    let cases = [
        (
            "mixed",
            Variant::Modulated,
            FoldTasks::Some(vec!["young".into()]),
            Precision::F32,
            1e-4,
        ),
        (
            "f16 switch",
            Variant::Modulated,
            FoldTasks::None,
            Precision::F16,
            2e-2,
        ),
        (
            "shared",
            Variant::Shared,
            FoldTasks::None,
            Precision::F32,
            1e-4,
        ),
        (
            "branch:4",
            Variant::Branch { k: 4 },
            FoldTasks::All,
            Precision::F32,
            1e-4,
        ),
        ("csn", Variant::Csn, FoldTasks::All, Precision::F32, 1e-4),
        (
            "csn switch",
            Variant::Csn,
            FoldTasks::None,
            Precision::F32,
            1e-4,
        ),
        (
            "branch:4 switch",
            Variant::Branch { k: 4 },
            FoldTasks::None,
            Precision::F32,
            1e-4,
        ),
    ];
    for (name, variant, fold, precision, tolerance) in cases {
        let ckpt = crate::common::checkpoint(&spec(), variant, &tasks);
        let path = dir.path().join(format!("{name}.modpack"));
        let opts = CompileOptions {
            fold,
            precision,
            ..CompileOptions::default()
        };
        compile(&ckpt, &opts)
            .expect("compile")
            .save(&path)
            .expect("save");
        let model = Model::load(&path).expect("model");
        let (_vm, net) = network_from_checkpoint(&ckpt, &Device::Cpu).expect("net");
        for i in 0..2 {
            let face = modkit_trainer::data::synth::face(7, i, 48);
            let img = image::RgbImage::from_raw(48, 48, face.pixels).expect("face");
            let input = model
                .prepare(&image::DynamicImage::ImageRgb8(img))
                .expect("input");
            let got = model
                .embed_all(&model.trunk(&input).expect("trunk"), &[0, 1, 2])
                .expect("embed");
            let x = Tensor::from_slice(input.as_slice(), (1, 3, 48, 48), &Device::Cpu).expect("x");
            for (t, got) in got.iter().enumerate() {
                let e: Tensor = net.forward_grouped(&x, &[(t, 1)], false).expect("candle");
                let want: Vec<f32> = e.flatten_all().and_then(|e| e.to_vec1()).expect("vec");
                let err = modkit_compiler::verify::max_abs_diff(&want, got);
                assert!(
                    want.len() == got.len() && err <= tolerance,
                    "{name}, image {i}, task {t}: {} values against {}, error {err}",
                    got.len(),
                    want.len()
                );
            }
        }
    }
}
