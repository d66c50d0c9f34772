//! The LoRA adapter being trained: per adapted linear, `A [in, r]` and `B [r, out]` as candle
//! variables, so that the branch is `(x · A) · B · alpha / r`; written out in PEFT's layout.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use kiln_formats::{LORA_MODULES, LlamaConfig, LoraLinear, LoraWeights};
use rand::{Rng, SeedableRng};

/// A linear layer of a llama block that LoRA can adapt (in [`LORA_MODULES`]'s order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    /// PEFT's name: `q_proj`, …, `down_proj`.
    pub fn peft_name(self) -> &'static str {
        LORA_MODULES[self as usize].0
    }

    /// The GGUF tensor's infix: `attn_q`, …, `ffn_down`.
    pub fn gguf_name(self) -> &'static str {
        LORA_MODULES[self as usize].2
    }

    /// The module PEFT calls `name`.
    pub fn from_peft_name(name: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.peft_name() == name)
    }

    /// `(in, out)` of this linear in a model of `config`.
    pub fn shape(self, config: &LlamaConfig) -> (usize, usize) {
        let kv = config.kv_heads * config.head_dim();
        match self {
            Module::Q | Module::O => (config.hidden, config.hidden),
            Module::K | Module::V => (config.hidden, kv),
            Module::Gate | Module::Up => (config.hidden, config.ffn),
            Module::Down => (config.ffn, config.hidden),
        }
    }
}

/// The adapter's shape: rank, alpha and the modules it adapts in every layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub modules: Vec<Module>,
}

impl LoraConfig {
    /// PEFT's scale of the branch.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The trainable weights.
pub struct Adapter {
    pub(crate) config: LoraConfig,
    linears: BTreeMap<(usize, Module), (Var, Var)>,
}

impl Adapter {
    /// A fresh adapter as PEFT starts one: `A` Kaiming-uniform (bound `1/√in`), `B` zero, so
    /// the adapted model starts as the base.
    pub fn init(
        config: LoraConfig,
        model: &LlamaConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut linears = BTreeMap::new();
        for layer in 0..model.layers {
            for &module in &config.modules {
                let (inputs, outputs) = module.shape(model);
                let bound = 1.0 / (inputs as f64).sqrt();
                let a: Vec<f64> = (0..inputs * config.rank)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Tensor::from_vec(a, (inputs, config.rank), device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((config.rank, outputs), dtype, device)?;
                linears.insert(
                    (layer, module),
                    (Var::from_tensor(&a)?, Var::from_tensor(&b)?),
                );
            }
        }
        Ok(Self { config, linears })
    }

    /// An adapter to go on training (warm start) from `weights` as read by
    /// `kiln_formats::read_lora_weights` (B scaled by `alpha / r`, which is taken out again).
    pub fn from_weights(
        weights: &LoraWeights,
        alpha: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let rank = weights.rank;
        let config = LoraConfig {
            rank,
            alpha,
            modules: Module::ALL
                .into_iter()
                .filter(|m| weights.linears.keys().any(|(_, n)| *n == m.peft_name()))
                .collect(),
        };
        let unscale = 1.0 / config.scale();
        let mut linears = BTreeMap::new();
        for (&(layer, name), linear) in &weights.linears {
            let module = Module::from_peft_name(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("unknown module {name}")))?;
            let a = Tensor::from_slice(&linear.a, (rank, linear.inputs), device)?
                .t()?
                .contiguous()?
                .to_dtype(dtype)?;
            let b = (Tensor::from_slice(&linear.b, (linear.outputs, rank), device)?
                .t()?
                .contiguous()?
                .to_dtype(dtype)?
                * unscale)?;
            linears.insert(
                (layer, module),
                (Var::from_tensor(&a)?, Var::from_tensor(&b)?),
            );
        }
        Ok(Self { config, linears })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Every variable, in a fixed order (A then B of each linear, by layer and module).
    pub fn vars(&self) -> Vec<&Var> {
        self.linears.values().flat_map(|(a, b)| [a, b]).collect()
    }

    /// The names [`Adapter::vars`] go by in a checkpoint.
    pub(crate) fn var_names(&self) -> Vec<String> {
        self.linears
            .keys()
            .flat_map(|(layer, module)| {
                let m = module.peft_name();
                [format!("{layer}.{m}.a"), format!("{layer}.{m}.b")]
            })
            .collect()
    }

    /// The branch `(x · A) · B · scale` of `module` in `layer` for `x [rows, in]`, when the
    /// adapter adapts it.
    pub(crate) fn branch(
        &self,
        layer: usize,
        module: Module,
        x: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.linears.get(&(layer, module)) else {
            return Ok(None);
        };
        // The scale on the rank-wide product: r columns rather than `out`.
        let low = (x.matmul(a.as_tensor())? * self.config.scale())?;
        Ok(Some(low.matmul(b.as_tensor())?))
    }

    /// The adapter in PEFT's files: `(adapter_config.json, adapter_model.safetensors)`.
    pub fn to_peft(&self, base_model: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        let mut linears = BTreeMap::new();
        for (&(layer, module), (a, b)) in &self.linears {
            let (inputs, rank) = a.as_tensor().dims2()?;
            let outputs = b.as_tensor().dims2()?.1;
            let pytorch = |t: &Tensor| -> Result<Vec<f32>> {
                t.t()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
            };
            debug_assert_eq!(rank, self.config.rank);
            linears.insert(
                (layer, module.peft_name()),
                LoraLinear {
                    inputs,
                    outputs,
                    a: pytorch(a.as_tensor())?,
                    b: pytorch(b.as_tensor())?,
                },
            );
        }
        Ok(kiln_formats::write_peft_adapter(
            self.config.rank,
            self.config.alpha,
            base_model,
            &linears,
        ))
    }
}
