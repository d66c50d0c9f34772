//! Kiln's LoRA trainer: supervised fine-tuning of a LoRA adapter on a frozen llama-family
//! base, on candle (CPU; CUDA with the `cuda` feature).
//!
//! - [`Base`]: the base's weights as the serving graph uses them (from
//!   `kiln_formats::read_llama_checkpoint`) and a forward that is differentiable end to end.
//! - [`Adapter`]: the trained `A`/`B` pairs, initialised as PEFT does, written as PEFT does.
//! - [`Trainer`]: AdamW with warm-up and linear decay, one step at a time, gradient
//!   accumulation over passes that fit a token budget, evaluation, checkpoints.
//!
//! What the examples are (which tokens are learned) is the caller's: the trainer sees token
//! ids and a mask.

mod adapter;
mod frozen;
mod fused;
mod model;
mod optim;
mod train;

pub use adapter::{Adapter, LoraConfig, Module};
pub use candle_core::{DType, Device, Error, Result, Tensor};
pub use model::Base;
pub use train::{Example, Progress, TrainOptions, Trainer};

// Only for its x86-v4 feature: candle's matrix products then use AVX-512.
use gemm as _;

#[cfg(test)]
mod tests;
