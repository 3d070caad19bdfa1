//! The CUDA path gives the CPU path's bits (feature `cuda`): keystreams, marked tensors of each
//! float kind, and trace evidence, on clean, attacked and permuted copies. Needs an NVIDIA GPU;
//! scripts/build-cuda builds these tests on a machine without one.

use agora_watermark::{FloatKind, MasterKey, Options, cuda, embed, stream::TensorStream, trace};
use candle_core::{DType, Device, Tensor as Candle};

use crate::model::{
    Data, Model, Rng, Tensor, add_noise, model_key, prune_random, round_to, shuffle, synthetic, values_mut,
};

fn gpu() -> Option<Device> {
    match cuda::device(0) {
        Ok(device) => Some(device),
        Err(error) => {
            eprintln!("\n*** SKIPPED: no CUDA device here ({error}); the CUDA path is not checked ***\n");
            None
        }
    }
}

#[test]
fn cuda_keystream_is_the_cpu_keystream() {
    let Some(device) = gpu() else { return };
    let stream = TensorStream::new(&[3; 32], "w", FloatKind::Bf16, &[4096, 4096]);
    for (first, words) in [(0, 8), (512 * 77, 8 * 1000), (1 << 24, 8 * 4096)] {
        let mut cpu = vec![0u64; words];
        stream.fill(first, &mut cpu);
        assert_eq!(cuda::keystream(&device, &stream, first, words).unwrap(), cpu, "from element {first}");
    }
}

/// Student-t weights with every edge value of `kind` mixed in: zeros, subnormals, the largest
/// and smallest normal values, infinities and NaN.
fn weights(kind: FloatKind, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let (max, min_normal, subnormal) = match kind {
        FloatKind::Bf16 => (half::bf16::MAX.to_f32(), half::bf16::MIN_POSITIVE.to_f32(), 1e-39),
        FloatKind::F16 => (half::f16::MAX.to_f32(), half::f16::MIN_POSITIVE.to_f32(), 1e-6),
        FloatKind::F32 => (f32::MAX, f32::MIN_POSITIVE, 1e-40),
    };
    let edges = [
        0.0,
        -0.0,
        subnormal,
        -subnormal,
        max,
        -max,
        min_normal,
        -min_normal,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1.0,
        -1.0,
    ];
    (0..n)
        .map(|i| {
            let value =
                if i % 97 == 0 { edges[(i / 97) % edges.len()] } else { (rng.student_t(5) * 0.015) as f32 };
            round_to(kind, value)
        })
        .collect()
}

fn bit_patterns(tensor: &Candle) -> Vec<u32> {
    let flat = tensor.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
    match flat.dtype() {
        DType::BF16 => flat.to_vec1::<half::bf16>().unwrap().iter().map(|v| u32::from(v.to_bits())).collect(),
        DType::F16 => flat.to_vec1::<half::f16>().unwrap().iter().map(|v| u32::from(v.to_bits())).collect(),
        _ => flat.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect(),
    }
}

#[test]
fn cuda_mark_is_the_cpu_mark() {
    let Some(device) = gpu() else { return };
    let model = MasterKey::from_bytes([9; 32]).model_key(&[4; 32]);
    // not a whole number of the kernel's 16,384-element blocks
    let (rows, cols) = (1000, 777);
    let kinds = [(FloatKind::Bf16, DType::BF16), (FloatKind::F16, DType::F16), (FloatKind::F32, DType::F32)];
    // offset 1: a view one row into its storage, which the kernels cannot read 16 bytes at a time
    for ((kind, dtype), offset) in kinds.into_iter().flat_map(|k| [(k, 0), (k, 1)]) {
        for license in [None, Some(model.license(12))] {
            let values = weights(kind, (rows + offset) * cols, 5);
            let stored = Candle::from_vec(values, (rows + offset, cols), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let original = stored.narrow(0, offset, rows).unwrap();
            let mark = cuda::Mark::new(
                &model,
                license.as_ref(),
                "layers.0.mlp.up_proj.weight",
                dtype,
                &[rows, cols],
            )
            .unwrap();
            let on_cpu = original.apply_op1_no_bwd(&mark).unwrap();
            let changed = mark.changed().unwrap();
            let resident = stored.to_device(&device).unwrap().narrow(0, offset, rows).unwrap();
            let on_gpu = resident.apply_op1_no_bwd(&mark).unwrap();
            let what = format!("{kind:?}, license {}, offset {offset}", license.is_some());
            assert_eq!(mark.changed().unwrap(), changed, "{what}: weights changed");
            assert!(changed.0 > 100_000, "{what}: {changed:?}");
            assert_eq!(changed.1 > 0, license.is_some(), "{what}: {changed:?}");
            let (cpu, gpu) = (bit_patterns(&on_cpu), bit_patterns(&on_gpu));
            let differing = cpu.iter().zip(&gpu).filter(|(a, b)| a != b).count();
            assert_eq!(differing, 0, "{what}: {differing} elements differ");
            assert_ne!(cpu, bit_patterns(&original), "{what}: marked");
        }
    }
}

#[test]
fn cuda_trace_is_the_cpu_trace() {
    let Some(device) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut original = synthetic(256, 2, 11);
    // an f16 and an f32 matrix beside the bf16 ones
    for (tensor, kind) in original.tensors.iter_mut().skip(5).take(2).zip([FloatKind::F16, FloatKind::F32]) {
        if let Data::Float(k, values) = &mut tensor.data {
            *k = kind;
            values.iter_mut().for_each(|v| *v = round_to(kind, *v));
        }
    }
    let original_path = dir.path().join("original.safetensors");
    original.save(&original_path);
    let key = model_key(&original_path, 3);
    let marked_path = dir.path().join("marked.safetensors");
    embed(&original_path, &marked_path, &key, Some(&key.license(5)), &Options::default()).unwrap();

    let mut rng = Rng::new(8);
    let noisy = Model::load(&marked_path).attack(|_, _, _, values| {
        add_noise(values, 1e-4, &mut rng);
        prune_random(values, 0.1, &mut rng);
    });
    let mut permuted = Model::load(&marked_path);
    let perm = shuffle(1024, &mut rng);
    let up: &mut Tensor = permuted.tensor_mut("model.layers.0.mlp.up_proj.weight");
    let rows = values_mut(up).clone();
    for (i, &p) in perm.iter().enumerate() {
        values_mut(up)[p * 256..][..256].copy_from_slice(&rows[i * 256..][..256]);
    }
    let copies = [("marked", None), ("noisy", Some(noisy)), ("permuted", Some(permuted))];
    let ids: Vec<u128> = (1..=40).collect();
    for (name, model) in copies {
        let path = match model {
            None => marked_path.clone(),
            Some(model) => {
                let path = dir.path().join(format!("{name}.safetensors"));
                model.save(&path);
                path
            }
        };
        let cpu = trace(&path, &original_path, &key, &ids, &Options::default()).unwrap();
        let gpu = cuda::trace(&device, &path, &original_path, &key, &ids, &Options::default()).unwrap();
        assert_eq!(serde_json::to_string(&gpu).unwrap(), serde_json::to_string(&cpu).unwrap(), "{name}");
        let accused: Vec<_> = gpu.iter().filter(|e| e.verdict).map(|e| e.subject.clone()).collect();
        assert_eq!(accused, [agora_watermark::Subject::License("5".into())], "{name}");
        if name == "permuted" {
            assert_eq!(gpu[0].aligned_tensors, ["model.layers.0.mlp.up_proj.weight"], "{name}");
        }
    }
}
