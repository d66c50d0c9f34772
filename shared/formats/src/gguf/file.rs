//! A whole GGUF checkpoint opened for preparation: every metadata value (the tokenizer's token
//! and merge arrays included) and each tensor's data, raw or dequantized to f32.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use super::dequant;
use super::header::{GgufTensor, Keep, Value, read_header};
use super::info::{GgufInfo, summarize};
use crate::error::FormatError;

/// An opened checkpoint.
pub(crate) struct GgufFile<R> {
    reader: R,
    file: String,
    pub info: GgufInfo,
    metadata: HashMap<String, Value>,
    data_start: u64,
    /// The stream's length: no tensor may reach past it.
    len: u64,
}

impl<R: Read + Seek> GgufFile<R> {
    /// Reads the header of the checkpoint `reader` holds from its current position. `file`
    /// names it in errors.
    pub(crate) fn open(file: &str, mut reader: R) -> Result<Self, FormatError> {
        let start = reader
            .stream_position()
            .map_err(|e| FormatError::new(file, format!("read error: {e}")))?;
        let header = read_header(file, &mut reader, Keep::Everything)?;
        let info = summarize(file, &header)?;
        let end = reader
            .seek(SeekFrom::End(0))
            .map_err(|e| FormatError::new(file, format!("read error: {e}")))?;
        Ok(Self {
            reader,
            file: file.to_owned(),
            info,
            metadata: header.metadata,
            data_start: start + header.data_start,
            len: end,
        })
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub(crate) fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.info.tensor(name)
    }

    fn err(&self, problem: String) -> FormatError {
        FormatError::new(&self.file, problem)
    }

    /// A tensor's stored bytes: (dims, ggml type, data).
    pub(crate) fn tensor_raw(
        &mut self,
        name: &str,
    ) -> Result<(Vec<u64>, u32, Vec<u8>), FormatError> {
        let tensor = self
            .tensor(name)
            .cloned()
            .ok_or_else(|| self.err(format!("the checkpoint has no tensor {name}")))?;
        let size = usize::try_from(tensor.element_count())
            .ok()
            .and_then(|elements| dequant::byte_size(tensor.ggml_type, elements))
            .ok_or_else(|| {
                self.err(format!(
                    "tensor {name} has ggml type {}, which Kiln cannot read",
                    tensor.ggml_type
                ))
            })?;
        let start = self.data_start.checked_add(tensor.offset);
        let end = start.and_then(|s| s.checked_add(size as u64));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(self.err(format!(
                "tensor {name} has an absurd offset {}",
                tensor.offset
            )));
        };
        if end > self.len {
            return Err(self.err(format!(
                "tensor {name} (bytes {start}..{end}) reaches past the end of the file ({} bytes)",
                self.len
            )));
        }
        let mut raw = vec![0u8; size];
        self.reader
            .seek(SeekFrom::Start(start))
            .and_then(|_| self.reader.read_exact(&mut raw))
            .map_err(|e| FormatError::new(&self.file, format!("reading tensor {name}: {e}")))?;
        Ok((tensor.dims, tensor.ggml_type, raw))
    }

    /// A tensor's values as f32, in ggml order (dims[0] fastest).
    pub(crate) fn tensor_f32(&mut self, name: &str) -> Result<(Vec<u64>, Vec<f32>), FormatError> {
        let (dims, ggml_type, raw) = self.tensor_raw(name)?;
        let elements = dims.iter().product::<u64>() as usize;
        let values = dequant::dequantize(ggml_type, &raw, elements)
            .ok_or_else(|| self.err(format!("tensor {name}: bad data")))?;
        Ok((dims, values))
    }
}
