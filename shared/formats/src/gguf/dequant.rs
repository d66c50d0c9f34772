//! ggml's storage types to f32: F32, F16, Q4_0, Q4_1 and Q8_0 (blocks of 32 values with an
//! f16 scale, and for Q4_1 an f16 minimum).

const BLOCK: usize = 32;

/// Bytes that `elements` values of `ggml_type` take, or `None` for a type Kiln cannot read
/// (or a size past `usize`).
pub(crate) fn byte_size(ggml_type: u32, elements: usize) -> Option<usize> {
    let blocks = elements.div_ceil(BLOCK);
    match ggml_type {
        0 => elements.checked_mul(4),
        1 => elements.checked_mul(2),
        2 => blocks.checked_mul(18),
        3 => blocks.checked_mul(20),
        8 => blocks.checked_mul(34),
        _ => None,
    }
}

/// IEEE half to single precision.
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let frac = (bits & 0x3ff) as u32;
    let value = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalise it.
            let shift = f.leading_zeros() - 21;
            let f = (f << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (f << 13)
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(value)
}

fn half(b: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// The values of `raw` (holding `elements` values of `ggml_type`).
pub(crate) fn dequantize(ggml_type: u32, raw: &[u8], elements: usize) -> Option<Vec<f32>> {
    if raw.len() != byte_size(ggml_type, elements)? {
        return None;
    }
    let mut out = Vec::with_capacity(elements);
    match ggml_type {
        0 => out.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4"))),
        ),
        1 => out.extend(raw.chunks_exact(2).map(half)),
        2 => {
            for block in raw.chunks_exact(18) {
                let d = half(&block[..2]);
                let q = &block[2..];
                out.extend(q.iter().map(|b| ((b & 0x0f) as i32 - 8) as f32 * d));
                out.extend(q.iter().map(|b| ((b >> 4) as i32 - 8) as f32 * d));
            }
        }
        3 => {
            for block in raw.chunks_exact(20) {
                let d = half(&block[..2]);
                let m = half(&block[2..4]);
                let q = &block[4..];
                out.extend(q.iter().map(|b| (b & 0x0f) as f32 * d + m));
                out.extend(q.iter().map(|b| (b >> 4) as f32 * d + m));
            }
        }
        8 => {
            for block in raw.chunks_exact(34) {
                let d = half(&block[..2]);
                out.extend(block[2..].iter().map(|&b| b as i8 as f32 * d));
            }
        }
        _ => return None,
    }
    out.truncate(elements);
    Some(out)
}

/// Blocks repacked for ONNX Runtime's `MatMulNBits` without zero points (its fast kernels):
/// per block, the quantized values in element order (4-bit: two per byte, the first in the
/// low nibble; 8-bit: one per byte), its scale, and what the implicit zero point
/// (2^(bits-1)) leaves over: MatMulNBits computes `(q - 8)·d`, so a Q4_1 block `d·q + m`
/// needs `m + 8·d` added per block (`offsets`, times the block's input sum: folded into the
/// same MatMulNBits by `gguf_onnx`'s offsets module). Q8_0 `d·q` (q signed) maps exactly with `q + 128`.
pub(crate) struct NBits {
    pub(crate) bits: u32,
    pub(crate) packed: Vec<u8>,
    pub(crate) scales: Vec<f32>,
    pub(crate) offsets: Option<Vec<f32>>,
}

/// Repacks Q4_1 (4-bit) or Q8_0 (8-bit) blocks; `None` for other types.
pub(crate) fn to_nbits(ggml_type: u32, raw: &[u8]) -> Option<NBits> {
    match ggml_type {
        3 => {
            let blocks = raw.len() / 20;
            let mut packed = Vec::with_capacity(blocks * 16);
            let mut scales = Vec::with_capacity(blocks);
            let mut offsets = Vec::with_capacity(blocks);
            for block in raw.chunks_exact(20) {
                let d = half(&block[..2]);
                let m = half(&block[2..4]);
                let mut q = [0u8; 32];
                for (j, b) in block[4..].iter().enumerate() {
                    q[j] = b & 0x0f;
                    q[j + 16] = b >> 4;
                }
                packed.extend(q.chunks_exact(2).map(|p| p[0] | (p[1] << 4)));
                scales.push(d);
                offsets.push(m + 8.0 * d);
            }
            Some(NBits {
                bits: 4,
                packed,
                scales,
                offsets: Some(offsets),
            })
        }
        8 => {
            let blocks = raw.len() / 34;
            let mut packed = Vec::with_capacity(blocks * 32);
            let mut scales = Vec::with_capacity(blocks);
            for block in raw.chunks_exact(34) {
                scales.push(half(&block[..2]));
                packed.extend(block[2..].iter().map(|&b| (b as i8 as i16 + 128) as u8));
            }
            Some(NBits {
                bits: 8,
                packed,
                scales,
                offsets: None,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_convert() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn q4_1_and_q8_0_blocks_decode() {
        // Q4_1: d = 0.5, m = -1; nibbles 0..15 low, 15..0 high.
        let mut block = vec![0x00, 0x38, 0x00, 0xbc];
        block.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let v = dequantize(3, &block, 32).unwrap();
        assert_eq!(v[0], -1.0);
        assert_eq!(v[15], 6.5);
        assert_eq!(v[16], 6.5);
        assert_eq!(v[31], -1.0);
        // Q8_0: d = 2, values -3 and 4.
        let mut block = vec![0x00, 0x40];
        block.extend([253u8, 4].repeat(16));
        let v = dequantize(8, &block, 32).unwrap();
        assert_eq!(&v[..2], &[-6.0, 8.0]);
        assert_eq!(dequantize(8, &block[..10], 32), None);
    }

    #[test]
    fn nbits_repacking_reproduces_the_ggml_values() {
        let mut q41 = vec![0x00, 0x38, 0x00, 0xbc];
        q41.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let mut q80 = vec![0x00, 0x40];
        q80.extend([253u8, 4].repeat(16));
        for (ty, raw) in [(3u32, q41), (8, q80)] {
            let want = dequantize(ty, &raw, 32).unwrap();
            let n = to_nbits(ty, &raw).unwrap();
            let values: Vec<u8> = if n.bits == 4 {
                n.packed.iter().flat_map(|b| [b & 0x0f, b >> 4]).collect()
            } else {
                n.packed.clone()
            };
            let zero = f32::from(1u8 << (n.bits - 1));
            let offset = n.offsets.as_ref().map_or(0.0, |o| o[0]);
            let got: Vec<f32> = values
                .iter()
                .map(|&q| (q as f32 - zero) * n.scales[0] + offset)
                .collect();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "type {ty}: {got:?} vs {want:?}");
            }
        }
    }
}
