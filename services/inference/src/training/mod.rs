//! Fine-tuning on the node: datasets into examples, and a training run from them to a PEFT
//! adapter.

pub mod examples;
pub mod run;
