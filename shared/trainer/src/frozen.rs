//! `x · W` for a weight that is not trained. candle's own matmul computes the gradient of
//! both operands whenever one of them needs one, which for the base model's linears is a
//! second matmul as large as the forward one, thrown away; this op returns only `x`'s.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct FrozenMatmul;

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (_, n) = w_layout.shape().dims2()?;
        let product = x.matmul(w, (1, m, n, k), x_layout, w_layout)?;
        Ok((product, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        w: &candle_core::CudaStorage,
        w_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (_, n) = w_layout.shape().dims2()?;
        let product = x.matmul(w, (1, m, n, k), x_layout, w_layout)?;
        Ok((product, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _product: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&w.t()?)?), None))
    }
}

/// `x [m, k] · w [k, n]`, with a gradient for `x` only. `w` must be contiguous.
pub(crate) fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(w, FrozenMatmul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn it_is_a_matmul_whose_weight_gets_no_gradient() {
        let dev = Device::Cpu;
        let x = Var::randn(0f64, 1., (3, 4), &dev).unwrap();
        let w = Tensor::randn(0f64, 1., (4, 5), &dev).unwrap();
        let frozen = frozen_matmul(x.as_tensor(), &w).unwrap();
        let plain = x.as_tensor().matmul(&w).unwrap();
        let diff = (&frozen - &plain)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);

        let grads = frozen.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let expected = plain.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let got = grads.get(x.as_tensor()).unwrap();
        let want = expected.get(x.as_tensor()).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
        assert!(grads.get(&w).is_none(), "the frozen weight has no gradient");
        assert_eq!(frozen.dtype(), DType::F64);
    }
}
