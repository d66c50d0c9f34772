//! GGUF checkpoints: what Kiln needs to know of one ([`GgufInfo`], from the header alone, for
//! validating uploads) and its tensors' data ([`file::GgufFile`], for preparing it into an ONNX
//! bundle). Both read the header with the one parser of [`header`], under the same limits.

mod dequant;
mod file;
mod header;
mod info;
#[cfg(test)]
pub(crate) mod testdata;
#[cfg(test)]
mod tests;

use std::io::Read;

use crate::error::FormatError;
pub(crate) use dequant::{f16_to_f32, to_nbits};
pub(crate) use file::GgufFile;
pub use header::GgufTensor;
pub(crate) use header::Value;
use header::{Keep, read_header};
pub use info::GgufInfo;

/// Reads the header of a GGUF file. `file` names it in errors. The reader is read up to the end
/// of the tensor infos and no further; wrap files in a [`std::io::BufReader`].
pub fn read_gguf(file: &str, reader: impl Read) -> Result<GgufInfo, FormatError> {
    info::summarize(file, &read_header(file, reader, Keep::Summary)?)
}
