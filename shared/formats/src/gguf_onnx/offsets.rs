//! Q4_1's block offsets folded into the 4-bit product. A Q4_1 weight is `d·q + m` per block of
//! 32 inputs; ONNX Runtime's fast MatMulNBits computes `d·(q − 8)` only, so each output also
//! needs `Σ_blocks mean(x over the block) · 32·(m + 8d)`. Run as kernels of their own (block
//! sums, a float MatMul, an Add per linear) that took a quarter of a one-sequence decode step.
//! Folded, the block means ride along as extra input columns of the same MatMulNBits: it reads
//! `[x, means, means]` against rows `[q, hi, lo]`, where each row's offsets are quantized to
//! 8 bits per group of 32 blocks and split into two 4-bit digits, `hi` with 16 times `lo`'s
//! scale. One kernel per linear, ~1.2x the decode steps a second, and the offsets keep 8 bits
//! (0.7% of `d` off on average for SmolLM2).

use super::builder::{Builder, attr_int, attr_ints};
use super::graph::nbits_matmul;

/// Inputs a block covers, in the checkpoint and in MatMulNBits.
const BLOCK: usize = 32;
/// The 8-bit code of offset 0: the digits' implicit zero points (8 each, the hi digit's
/// counting 16) sum to it.
const ZERO: f64 = 136.0;

/// Columns of one segment of block means for `inputs` inputs: its blocks, padded to whole
/// blocks.
fn segment(inputs: usize) -> usize {
    (inputs / BLOCK).div_ceil(BLOCK) * BLOCK
}

/// K of the folded MatMulNBits for a linear of `inputs` inputs: the inputs, then two segments
/// of block means.
pub(crate) fn folded_inputs(inputs: usize) -> usize {
    inputs + 2 * segment(inputs)
}

/// The inputs of the linear whose folded MatMulNBits has K `folded` (the inverse of
/// [`folded_inputs`], which is strictly increasing); `None` if no linear folds to it.
pub(crate) fn unfolded_inputs(folded: usize) -> Option<usize> {
    (1..)
        .map(|groups| folded.checked_sub(2 * BLOCK * groups))
        .take_while(Option::is_some)
        .flatten()
        .find(|&inputs| inputs % BLOCK == 0 && folded_inputs(inputs) == folded)
}

/// The rows of a Q4_1 linear with its offsets folded in: `packed` (`[outputs, blocks, 16]`) and
/// `scales` (`[outputs, blocks]`) each gain a `hi` then a `lo` segment per row; `offsets` is
/// `[outputs, blocks]` (`m + 8d`). The segments' scales include the 32 that turns a block mean
/// back into its sum.
fn fold(
    outputs: usize,
    inputs: usize,
    packed: &[u8],
    scales: &[f32],
    offsets: &[f32],
) -> (Vec<u8>, Vec<f32>) {
    let blocks = inputs / BLOCK;
    let groups = segment(inputs) / BLOCK;
    let per_row = blocks + 2 * groups;
    let mut folded_packed = Vec::with_capacity(outputs * per_row * BLOCK / 2);
    let mut folded_scales = Vec::with_capacity(outputs * per_row);
    for o in 0..outputs {
        let row = o * blocks..(o + 1) * blocks;
        folded_packed.extend_from_slice(&packed[row.start * BLOCK / 2..row.end * BLOCK / 2]);
        folded_scales.extend_from_slice(&scales[row.clone()]);
        let (mut hi, mut lo) = (Vec::new(), Vec::new());
        let (mut hi_scales, mut lo_scales) = (Vec::new(), Vec::new());
        for group in offsets[row].chunks(BLOCK) {
            let (codes, step) = quantize(group);
            hi.extend(codes.iter().map(|c| c >> 4));
            lo.extend(codes.iter().map(|c| c & 15));
            hi_scales.push((16.0 * BLOCK as f64 * step) as f32);
            lo_scales.push((BLOCK as f64 * step) as f32);
        }
        for digits in [hi, lo] {
            folded_packed.extend(digits.chunks_exact(2).map(|p| p[0] | (p[1] << 4)));
        }
        folded_scales.extend(hi_scales.into_iter().chain(lo_scales));
    }
    (folded_packed, folded_scales)
}

/// Up to 32 offsets as 8-bit codes (padded to 32 with the code of 0) and their step:
/// `offset ≈ step · (code − 136)`.
fn quantize(offsets: &[f32]) -> ([u8; BLOCK], f64) {
    let (low, high) = offsets.iter().fold((0f64, 0f64), |(low, high), &v| {
        (low.min(f64::from(v)), high.max(f64::from(v)))
    });
    let step = (high / (255.0 - ZERO)).max(-low / ZERO);
    let step = if step > 0.0 { step } else { 1.0 };
    let mut codes = [ZERO as u8; BLOCK];
    for (code, &v) in codes.iter_mut().zip(offsets) {
        *code = (f64::from(v) / step + ZERO).round().clamp(0.0, 255.0) as u8;
    }
    (codes, step)
}

/// A Q4_1 linear repacked for MatMulNBits (see [`super::graph::Linear::Blocks`]).
pub(super) struct Q41<'a> {
    pub(super) inputs: usize,
    pub(super) outputs: usize,
    pub(super) packed: &'a [u8],
    pub(super) scales: &'a [f32],
    /// `[outputs, blocks]`: `m + 8d`.
    pub(super) offsets: &'a [f32],
}

/// `x · W` for Q4_1 blocks: the block means of `x` beside it, into one MatMulNBits. `init`
/// names the weight's initializers, `hint` the intermediate values.
pub(super) fn folded_matmul(
    b: &mut Builder,
    x: &str,
    w: Q41<'_>,
    init: &str,
    hint: &str,
) -> String {
    let Q41 {
        inputs, outputs, ..
    } = w;
    let (packed, scales) = fold(outputs, inputs, w.packed, w.scales, w.offsets);
    // [batch, seq, inputs] is AveragePool's [N, C, L]: one mean per block of the last axis.
    let block = [BLOCK as i64];
    let means = b.op(
        "AveragePool",
        &[x],
        vec![
            attr_ints("kernel_shape", &block),
            attr_ints("strides", &block),
        ],
        hint,
    );
    let pad = segment(inputs) - inputs / BLOCK;
    let means = if pad == 0 {
        means
    } else {
        let pads = b.i64_tensor(
            &format!("{init}.means_pads"),
            &[6],
            &[0, 0, 0, 0, 0, pad as i64],
        );
        b.op("Pad", &[&means, &pads], vec![], hint)
    };
    let joined = b.op(
        "Concat",
        &[x, &means, &means],
        vec![attr_int("axis", -1)],
        hint,
    );
    let shape = [folded_inputs(inputs), outputs, 4];
    nbits_matmul(b, &joined, init, hint, shape, packed, &scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_inputs_invert() {
        for inputs in (32..8192).step_by(32) {
            assert_eq!(
                unfolded_inputs(folded_inputs(inputs)),
                Some(inputs),
                "{inputs}"
            );
        }
        assert_eq!(folded_inputs(576), 576 + 64);
        assert_eq!(folded_inputs(1536), 1536 + 128);
        assert_eq!(unfolded_inputs(577), None);
        assert_eq!(unfolded_inputs(600), None);
        assert_eq!(unfolded_inputs(0), None);
    }

    /// What MatMulNBits computes from the folded rows, in float: `Σ scale · (q − 8) · x'`.
    fn product(packed: &[u8], scales: &[f32], x: &[f64]) -> f64 {
        let mut sum = 0.0;
        for (k, &v) in x.iter().enumerate() {
            let byte = packed[k / 2];
            let q = if k % 2 == 0 { byte & 15 } else { byte >> 4 };
            sum += f64::from(scales[k / BLOCK]) * (f64::from(q) - 8.0) * v;
        }
        sum
    }

    /// `Σ_blocks offset · block sum`.
    fn offsets_term(offsets: &[f32], means: &[f64]) -> f64 {
        (offsets.iter().zip(means))
            .map(|(&m, s)| f64::from(m) * s * BLOCK as f64)
            .sum()
    }

    #[test]
    fn folded_rows_compute_the_q4_1_product() {
        // Two outputs of 48 blocks (two groups, the second padded), offsets of both signs.
        let (outputs, inputs) = (2, 1536);
        let blocks = inputs / BLOCK;
        let packed: Vec<u8> = (0..outputs * blocks * 16)
            .map(|i| (i * 37 % 256) as u8)
            .collect();
        let scales: Vec<f32> = (0..outputs * blocks)
            .map(|i| 0.01 + (i % 7) as f32 * 0.003)
            .collect();
        let offsets: Vec<f32> = (0..outputs * blocks)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.004)
            .collect();
        let (folded, folded_scales) = fold(outputs, inputs, &packed, &scales, &offsets);
        let k = folded_inputs(inputs);
        assert_eq!(folded.len(), outputs * k / 2);
        assert_eq!(folded_scales.len(), outputs * k / BLOCK);
        let x: Vec<f64> = (0..inputs)
            .map(|i| ((i * 7 % 11) as f64 - 5.0) * 0.1)
            .collect();
        let means: Vec<f64> = (0..segment(inputs))
            .map(|b| match x.get(b * BLOCK..(b + 1) * BLOCK) {
                Some(block) => block.iter().sum::<f64>() / BLOCK as f64,
                None => 0.0,
            })
            .collect();
        let joined: Vec<f64> = x.iter().chain(&means).chain(&means).copied().collect();
        for o in 0..outputs {
            let row = o * blocks..(o + 1) * blocks;
            let exact = product(
                &packed[row.start * 16..row.end * 16],
                &scales[row.clone()],
                &x,
            ) + offsets_term(&offsets[row.clone()], &means);
            let got = product(
                &folded[o * k / 2..(o + 1) * k / 2],
                &folded_scales[o * k / BLOCK..(o + 1) * k / BLOCK],
                &joined,
            );
            // The offsets' 8 bits: each off by at most half a step (a step is at most the
            // largest |offset|, 0.056, over 119).
            let bound: f64 = means
                .iter()
                .map(|s| s.abs() * BLOCK as f64 * 0.056 / 119.0 / 2.0)
                .sum();
            assert!((got - exact).abs() <= bound, "{o}: {got} against {exact}");
            // And exactly the offsets' 8-bit codes: the digits and their scales add up.
            let coded: f64 = offsets[row]
                .chunks(BLOCK)
                .zip(means.chunks(BLOCK))
                .map(|(group, means)| {
                    let (codes, step) = quantize(group);
                    let step = f64::from((BLOCK as f64 * step) as f32) / BLOCK as f64;
                    (codes.iter().zip(means))
                        .map(|(&c, s)| step * (f64::from(c) - ZERO) * s * BLOCK as f64)
                        .sum::<f64>()
                })
                .sum();
            let main = exact - offsets_term(&offsets[o * blocks..(o + 1) * blocks], &means);
            assert!(
                (got - main - coded).abs() < 1e-6,
                "{o}: {got} against {}",
                main + coded
            );
        }
    }

    #[test]
    fn offsets_quantize_to_8_bits() {
        let offsets = [-0.5f32, 0.0, 0.25, 0.4];
        let (codes, step) = quantize(&offsets);
        for (&v, &c) in offsets.iter().zip(&codes) {
            assert!((step * (f64::from(c) - ZERO) - f64::from(v)).abs() <= step / 2.0);
        }
        assert_eq!(codes[0], 0, "the most negative offset takes code 0");
        assert!(
            codes[4..].iter().all(|&c| f64::from(c) == ZERO),
            "padding is offset 0"
        );
        // All zero: every code is 0's.
        let (codes, _) = quantize(&[0.0; 3]);
        assert!(codes.iter().all(|&c| f64::from(c) == ZERO));
    }
}
