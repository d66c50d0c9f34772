//! Fused CPU kernels for the elementwise stretches of the training forward: RMSNorm, the
//! rotary embedding, the causal softmax of attention and SwiGLU, each one pass over its rows
//! forward and one backward. Written with candle's composed operations (see `model.rs`),
//! each of these is five to eight graph nodes, and candle's backward pass allocates, zeroes
//! and adds a gradient buffer for every node: most of a training step's time went there rather
//! than to the matrix products. Contiguous f32 or f64 tensors only; other devices and types
//! take the composed path.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
    bail,
};
use rayon::prelude::*;

/// The float types the kernels run in.
trait Real: WithDType + num_traits::Float {}
impl Real for f32 {}
impl Real for f64 {}

/// `x / √(mean(x²) + eps) · weight` over the rows of `x [rows, d]`; `weight [d]` is frozen.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        RmsNorm {
            eps: f64::from(eps),
        },
    )
}

/// HF's half rotation of `x [rows, heads · head_dim]`, whose row `r` holds position
/// `r % seq`, with the `[seq, head_dim]` tables of `cos` and `sin`.
pub(crate) fn rope(x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        tables: tables.clone(),
        sign: 1.0,
    })
}

/// The attention probabilities of `scores [.., seq]` (rows of width `seq`, row `r` the query
/// at position `r % seq`): softmax of `scale · scores` over the keys up to the query's
/// position, 0 after it.
pub(crate) fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax { scale })
}

/// `silu(gate) · up` of `gate_up [rows, 2 · ffn]` (gate | up, as the fused product gives
/// them): no narrowed views, whose backward candle pads to the whole width.
pub(crate) fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    gate_up.contiguous()?.apply_op1(SwiGlu)
}

/// The rotary tables, `[seq · head_dim]` each, shared by every layer's op.
#[derive(Clone)]
pub(crate) struct RopeTables {
    pub(crate) seq: usize,
    pub(crate) head_dim: usize,
    pub(crate) cos: Arc<Vec<f64>>,
    pub(crate) sin: Arc<Vec<f64>>,
}

/// The contiguous values of a kernel's input.
fn values<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => bail!("a fused op takes contiguous tensors"),
    }
}

/// Runs `$kernel::<T>` for the storage's float type.
macro_rules! by_dtype {
    ($storage:expr, $kernel:ident ( $($arg:expr),* )) => {
        match $storage.dtype() {
            DType::F32 => $kernel::<f32>($($arg),*),
            DType::F64 => $kernel::<f64>($($arg),*),
            other => bail!("fused ops run in f32 or f64, not {other:?}"),
        }
    };
}

/// `out`, filled a row of `width` at a time by `fill(row, out_row)`, rows in parallel.
fn by_rows<T: Real>(len: usize, width: usize, fill: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); len];
    out.par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(r, row)| fill(r, row));
    out
}

fn last_dim(layout: &Layout) -> Result<usize> {
    Ok(*layout.shape().dims().last().unwrap_or(&1))
}

struct RmsNorm {
    eps: f64,
}

fn rms_norm_fwd<T: Real>(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
    eps: f64,
) -> Result<CpuStorage> {
    let (x, w, d) = (values::<T>(x, xl)?, values::<T>(w, wl)?, last_dim(xl)?);
    let eps = T::from_f64(eps);
    let n = T::from_f64(d as f64);
    Ok(T::to_cpu_storage_owned(by_rows(x.len(), d, |r, out| {
        let x = &x[r * d..][..d];
        let r = (x.iter().fold(T::zero(), |s, &v| s + v * v) / n + eps)
            .sqrt()
            .recip();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
            *o = v * r * w;
        }
    })))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(x, rms_norm_fwd(x, xl, w, wl, self.eps))?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3(w, &grad.contiguous()?, RmsNormGrad { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

/// `dx = r·g∘w − x · r³ · (Σ g∘w∘x) / d`, with `r = 1/√(mean(x²) + eps)`.
struct RmsNormGrad {
    eps: f64,
}

fn rms_norm_bwd<T: Real>(
    (x, xl): (&CpuStorage, &Layout),
    (w, wl): (&CpuStorage, &Layout),
    (g, gl): (&CpuStorage, &Layout),
    eps: f64,
) -> Result<CpuStorage> {
    let (x, w, g, d) = (
        values::<T>(x, xl)?,
        values::<T>(w, wl)?,
        values::<T>(g, gl)?,
        last_dim(xl)?,
    );
    let eps = T::from_f64(eps);
    let n = T::from_f64(d as f64);
    Ok(T::to_cpu_storage_owned(by_rows(x.len(), d, |r, out| {
        let (x, g) = (&x[r * d..][..d], &g[r * d..][..d]);
        let r = (x.iter().fold(T::zero(), |s, &v| s + v * v) / n + eps)
            .sqrt()
            .recip();
        let dot = x
            .iter()
            .zip(g)
            .zip(w)
            .fold(T::zero(), |s, ((&x, &g), &w)| s + g * w * x);
        let k = r * r * r * dot / n;
        for (((o, &x), &g), &w) in out.iter_mut().zip(x).zip(g).zip(w) {
            *o = r * g * w - x * k;
        }
    })))
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(x, rms_norm_bwd((x, xl), (w, wl), (g, gl), self.eps))?;
        Ok((out, xl.shape().clone()))
    }
}

/// `x∘cos + sign · rotate(x)∘sin`; its backward is the same op with the sign flipped (HF's
/// tables repeat each angle in both halves, so the rotation's transpose meets the same `sin`).
struct Rope {
    tables: RopeTables,
    sign: f64,
}

fn rope_fwd<T: Real>(x: &CpuStorage, xl: &Layout, t: &RopeTables, sign: f64) -> Result<CpuStorage> {
    let (x, width, d) = (values::<T>(x, xl)?, last_dim(xl)?, t.head_dim);
    if width % d != 0 || d % 2 != 0 {
        bail!("rope: rows of {width} are not heads of {d}");
    }
    let half = d / 2;
    Ok(T::to_cpu_storage_owned(by_rows(
        x.len(),
        width,
        |r, out| {
            let pos = r % t.seq;
            let (cos, sin) = (&t.cos[pos * d..][..d], &t.sin[pos * d..][..d]);
            let x = &x[r * width..][..width];
            for (x, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                for i in 0..d {
                    let rotated = if i < half { -x[i + half] } else { x[i - half] };
                    out[i] = x[i] * T::from_f64(cos[i]) + rotated * T::from_f64(sign * sin[i]);
                }
            }
        },
    )))
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(x, rope_fwd(x, xl, &self.tables, self.sign))?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope {
            tables: self.tables.clone(),
            sign: -self.sign,
        };
        Ok(Some(grad.contiguous()?.apply_op1(inverse)?))
    }
}

struct CausalSoftmax {
    scale: f64,
}

fn causal_softmax_fwd<T: Real>(s: &CpuStorage, sl: &Layout, scale: f64) -> Result<CpuStorage> {
    let (s, seq) = (values::<T>(s, sl)?, last_dim(sl)?);
    let scale = T::from_f64(scale);
    Ok(T::to_cpu_storage_owned(by_rows(s.len(), seq, |r, out| {
        let visible = &s[r * seq..][..r % seq + 1];
        let max = visible
            .iter()
            .fold(T::neg_infinity(), |m, &v| num_traits::Float::max(m, v));
        let mut sum = T::zero();
        for (o, &v) in out.iter_mut().zip(visible) {
            *o = ((v - max) * scale).exp();
            sum += *o;
        }
        let inv = sum.recip();
        for o in &mut out[..visible.len()] {
            *o *= inv;
        }
    })))
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, sl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(s, causal_softmax_fwd(s, sl, self.scale))?;
        Ok((out, sl.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, p: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(p.apply_op2(&grad, SoftmaxGrad { scale: self.scale })?))
    }
}

/// `ds = scale · p∘(g − Σ g∘p)` per row.
struct SoftmaxGrad {
    scale: f64,
}

fn softmax_bwd<T: Real>(
    p: &CpuStorage,
    pl: &Layout,
    g: &CpuStorage,
    gl: &Layout,
    scale: f64,
) -> Result<CpuStorage> {
    let (p, g, w) = (values::<T>(p, pl)?, values::<T>(g, gl)?, last_dim(pl)?);
    let scale = T::from_f64(scale);
    Ok(T::to_cpu_storage_owned(by_rows(p.len(), w, |r, out| {
        let (p, g) = (&p[r * w..][..w], &g[r * w..][..w]);
        let dot = p.iter().zip(g).fold(T::zero(), |s, (&p, &g)| s + p * g);
        for ((o, &p), &g) in out.iter_mut().zip(p).zip(g) {
            *o = scale * p * (g - dot);
        }
    })))
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(p, softmax_bwd(p, pl, g, gl, self.scale))?;
        Ok((out, pl.shape().clone()))
    }
}

struct SwiGlu;

fn swiglu_fwd<T: Real>(x: &CpuStorage, xl: &Layout) -> Result<CpuStorage> {
    let (x, w) = (values::<T>(x, xl)?, last_dim(xl)? / 2);
    Ok(T::to_cpu_storage_owned(by_rows(
        x.len() / 2,
        w,
        |r, out| {
            let (a, b) = x[r * 2 * w..][..2 * w].split_at(w);
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o = a / (T::one() + (-a).exp()) * b;
            }
        },
    )))
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(x, swiglu_fwd(x, xl))?;
        let mut dims = xl.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last /= 2;
        }
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, gate_up: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gate_up.apply_op2(&grad.contiguous()?, SwiGluGrad)?))
    }
}

/// `[d gate | d up]` side by side: `g·up·σ(a)(1 + a(1 − σ(a)))` and `g·a·σ(a)`.
struct SwiGluGrad;

fn swiglu_bwd<T: Real>(
    x: &CpuStorage,
    xl: &Layout,
    g: &CpuStorage,
    gl: &Layout,
) -> Result<CpuStorage> {
    let (x, g, w) = (values::<T>(x, xl)?, values::<T>(g, gl)?, last_dim(xl)? / 2);
    Ok(T::to_cpu_storage_owned(by_rows(
        x.len(),
        2 * w,
        |r, out| {
            let (a, b) = x[r * 2 * w..][..2 * w].split_at(w);
            let g = &g[r * w..][..w];
            let (da, db) = out.split_at_mut(w);
            for i in 0..w {
                let sigmoid = (T::one() + (-a[i]).exp()).recip();
                da[i] = g[i] * b[i] * sigmoid * (T::one() + a[i] * (T::one() - sigmoid));
                db[i] = g[i] * a[i] * sigmoid;
            }
        },
    )))
}

impl CustomOp2 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(x, swiglu_bwd(x, xl, g, gl))?;
        Ok((out, xl.shape().clone()))
    }
}
