//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use protege::backend::cpu::CpuBackend;
use protege::model::Qwen2;
use safetensors::SafeTensors;

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// The fixture models: (directory, description).
pub const MODELS: [&str; 3] = ["tiny", "tiny-untied", "odd"];

pub fn load(name: &str) -> (CpuBackend, Qwen2<CpuBackend>) {
    let be = CpuBackend::new();
    let model = Qwen2::load(&be, &fixture(name)).unwrap_or_else(|e| panic!("loading {name}: {e:#}"));
    (be, model)
}

pub struct Tensors(Vec<u8>);

impl Tensors {
    pub fn open(path: &Path) -> Self {
        Self(std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.0).unwrap()
    }
    pub fn i64s(&self, name: &str) -> Vec<i64> {
        self.st()
            .tensor(name)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    pub fn has(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }
    pub fn u32s(&self, name: &str) -> Vec<u32> {
        self.i64s(name).into_iter().map(|v| v as u32).collect()
    }
    pub fn f32s(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        (t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(), t.shape().to_vec())
    }
}

/// Largest absolute difference; panics on a length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) })
}

/// A random, non-zero rank-4 LoRA adapter on every module of the fixture model `name`, written
/// in PEFT's format to `dir`.
pub fn write_random_adapter(name: &str, dir: &Path) {
    use protege::backend::Backend;
    use protege::model::lora::{Lora, LoraConfig, Target};
    use rand::{Rng, SeedableRng};
    let (be, mut model) = load(name);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let cfg: LoraConfig =
        serde_json::from_value(serde_json::json!({"rank": 4, "alpha": 8.0, "targets": Target::ALL})).unwrap();
    let lora = Lora::try_from_fn(&model.cfg, &cfg, |_, shape| {
        Ok(be.upload_f32(&(0..shape.iter().product()).map(|_| rng.gen_range(-0.2..0.2)).collect::<Vec<f32>>()))
    })
    .unwrap();
    model.lora = Some(lora);
    protege::model::export::export_peft(&be, &model, name, dir).unwrap();
}
