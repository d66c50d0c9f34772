//! ONNX graphs: their interface (opset, producer, inputs and outputs, read without the
//! weights), and whether it fits the task a model serves.

mod interface;
mod task;
#[cfg(test)]
mod tests;

pub use interface::{OnnxInfo, read_onnx};
pub use task::{Task, check_task};
