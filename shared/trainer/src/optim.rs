//! AdamW (decoupled weight decay, bias-corrected moments) over the adapter's variables, and
//! the learning-rate schedule: linear warm-up, then linear decay to zero at the last step.

use candle_core::{Result, Tensor, Var};

pub(crate) const BETA1: f64 = 0.9;
pub(crate) const BETA2: f64 = 0.999;
const EPSILON: f64 = 1e-8;

/// The optimizer's state: the moments of each variable and the steps taken.
pub(crate) struct AdamW {
    pub(crate) weight_decay: f64,
    pub(crate) steps: usize,
    /// `(m, v)` per variable, in the adapter's order.
    pub(crate) moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub(crate) fn new(vars: &[&Var], weight_decay: f64) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|v| Ok((v.zeros_like()?, v.zeros_like()?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            weight_decay,
            steps: 0,
            moments,
        })
    }

    /// One update of every variable with its gradient (`None`: no gradient reached it).
    pub(crate) fn step(
        &mut self,
        vars: &[&Var],
        grads: &[Option<Tensor>],
        learning_rate: f64,
    ) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let correct1 = 1.0 - BETA1.powi(t);
        let correct2 = 1.0 - BETA2.powi(t);
        for ((var, grad), (m, v)) in vars.iter().zip(grads).zip(&mut self.moments) {
            let Some(g) = grad else { continue };
            // Detached, so that no step's graph is kept alive by the next.
            let g = g.detach();
            *m = ((&*m * BETA1)? + (&g * (1.0 - BETA1))?)?.detach();
            *v = ((&*v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?.detach();
            let m_hat = (&*m / correct1)?;
            let v_hat = (&*v / correct2)?;
            let update = m_hat.broadcast_div(&(v_hat.sqrt()? + EPSILON)?)?;
            let decayed = (var.as_tensor() * (1.0 - learning_rate * self.weight_decay))?;
            var.set(&(decayed - (update * learning_rate)?)?)?;
        }
        Ok(())
    }
}

/// The learning rate of step `step` (from 0) of `total`: `peak · (step+1)/warmup` during the
/// warm-up, then falling linearly to reach 0 after the last step.
pub(crate) fn learning_rate(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let remaining = total.saturating_sub(step) as f64;
    peak * remaining / total.saturating_sub(warmup).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_schedule_warms_up_then_decays_to_zero() {
        let lr: Vec<f64> = (0..10).map(|s| learning_rate(1.0, s, 2, 10)).collect();
        assert_eq!(lr[0], 0.5);
        assert_eq!(lr[1], 1.0);
        assert_eq!(lr[2], 1.0);
        assert_eq!(lr[9], 1.0 / 8.0);
        assert!(lr[2..].windows(2).all(|w| w[1] < w[0]));
        assert_eq!(learning_rate(1.0, 0, 0, 1), 1.0);
    }

    #[test]
    fn adamw_moves_each_weight_by_the_learning_rate_at_first() {
        // The first bias-corrected step is lr · g / |g| whatever the gradient's size.
        let dev = Device::Cpu;
        let var = Var::from_slice(&[1.0f64, -2.0, 3.0], 3, &dev).unwrap();
        let grad = Tensor::from_slice(&[0.5f64, -1e-3, 0.0], 3, &dev).unwrap();
        let mut adam = AdamW::new(&[&var], 0.0).unwrap();
        adam.step(&[&var], &[Some(grad)], 0.1).unwrap();
        let got: Vec<f64> = var.as_tensor().to_vec1().unwrap();
        assert!((got[0] - 0.9).abs() < 1e-6, "{got:?}");
        assert!((got[1] + 1.9).abs() < 1e-4, "{got:?}");
        assert_eq!(got[2], 3.0);

        let decayed = Var::from_slice(&[2.0f64], 1, &dev).unwrap();
        let mut adam = AdamW::new(&[&decayed], 0.5).unwrap();
        let zero = Tensor::zeros(1, candle_core::DType::F64, &dev).unwrap();
        adam.step(&[&decayed], &[Some(zero)], 0.1).unwrap();
        let got: Vec<f64> = decayed.as_tensor().to_vec1().unwrap();
        assert!((got[0] - 2.0 * 0.95).abs() < 1e-12, "{got:?}");
    }
}
