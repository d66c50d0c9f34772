//! One ONNX Runtime call the `ort` crate offers no safe form of: a run whose outputs are all
//! caller-owned values, some of them also inputs. A decoder whose attention appends to its
//! key/value cache in place (ONNX Runtime's GroupQueryAttention writes into `present` when it
//! is the very buffer of `past`) then neither copies its cache in nor out, and nothing is
//! allocated per step. `ort` refuses borrowed values as bound outputs and copies borrowed
//! inputs it binds; `Run` itself takes any value for both.

use std::ffi::{CString, c_char};

use ort::AsPointer;
use ort::session::Session;
use ort::sys::OrtValue;
use ort::value::TensorRefMut;

/// A value ONNX Runtime reads (any `ort` value or tensor view).
pub type ValuePtr<'a> = &'a dyn AsPointer<Sys = OrtValue>;

/// A float32 tensor that is both an input and an output of the run (a cache updated in place):
/// a view of memory the caller borrows mutably for as long as the view lives.
pub struct InPlace<'a, 'v> {
    pub input: &'a str,
    pub output: &'a str,
    pub value: &'a mut TensorRefMut<'v, f32>,
}

/// Runs `session` on `inputs` and `in_place`, writing the outputs named in `outputs` and
/// `in_place` into their values (only those outputs are computed). Each value's shape and
/// element type must be what the graph produces there (ONNX Runtime checks, and fails the
/// run otherwise); they must be CPU tensors.
#[allow(unsafe_code)] // the FFI call below, and reading its status
pub fn run_into(
    session: &mut Session,
    inputs: &[(&str, ValuePtr<'_>)],
    in_place: &mut [InPlace<'_, '_>],
    outputs: &mut [(&str, &mut TensorRefMut<'_, f32>)],
) -> ort::Result<()> {
    let cstr = |name: &str| CString::new(name).map_err(|e| ort::Error::new(e.to_string()));
    let mut input_names = Vec::with_capacity(inputs.len() + in_place.len());
    let mut input_values: Vec<*const OrtValue> = Vec::with_capacity(input_names.capacity());
    for (name, value) in inputs {
        input_names.push(cstr(name)?);
        input_values.push(value.ptr());
    }
    let mut output_names = Vec::with_capacity(outputs.len() + in_place.len());
    let mut output_values: Vec<*mut OrtValue> = Vec::with_capacity(output_names.capacity());
    for cache in in_place.iter_mut() {
        input_names.push(cstr(cache.input)?);
        input_values.push(cache.value.ptr());
        output_names.push(cstr(cache.output)?);
        output_values.push(cache.value.ptr().cast_mut());
    }
    for (name, value) in outputs.iter_mut() {
        output_names.push(cstr(name)?);
        output_values.push(value.ptr().cast_mut());
    }
    let input_name_ptrs: Vec<*const c_char> = input_names.iter().map(|n| n.as_ptr()).collect();
    let output_name_ptrs: Vec<*const c_char> = output_names.iter().map(|n| n.as_ptr()).collect();
    let run = ort::api().Run;
    // SAFETY: every pointer is valid for the call: the session and the values are borrowed
    // for its duration (the outputs and in-place values mutably, so nothing else reads them
    // while ONNX Runtime writes), the names are NUL-terminated strings that outlive it, and
    // the arrays hold exactly the lengths passed. Every output entry is a caller-owned value,
    // so ONNX Runtime allocates none for the caller to release. An in-place value appears as
    // an input and an output of the same run: ONNX Runtime reads and writes it through one
    // pointer, which is what an operator that appends in place expects.
    let status = unsafe {
        run(
            session.ptr_mut(),
            std::ptr::null(),
            input_name_ptrs.as_ptr(),
            input_values.as_ptr(),
            input_values.len(),
            output_name_ptrs.as_ptr(),
            output_name_ptrs.len(),
            output_values.as_mut_ptr(),
        )
    };
    // SAFETY: `status` was just returned by the ONNX Runtime API and is read once.
    unsafe { ort::Error::result_from_status(status) }
}
