//! The outer optimizer: SGD with Nesterov momentum over θ.

use serde::{Deserialize, Serialize};

/// SGD with Nesterov momentum on θ, as `torch.optim.SGD(nesterov=True)`:
/// `v ← μv + g; θ ← θ − lr (g + μv)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nesterov {
    pub lr: f32,
    pub momentum: f32,
    pub velocity: Vec<f32>,
}

impl Nesterov {
    /// An optimizer for `n` parameters with zero velocity.
    pub fn new(n: usize, lr: f32, momentum: f32) -> Nesterov {
        Nesterov {
            lr,
            momentum,
            velocity: vec![0.0; n],
        }
    }

    /// One outer step. The two updates are written as separate multiplies and adds,
    /// which Rust never fuses, so every node computes the same θ.
    pub fn step(&mut self, theta: &mut [f32], pseudo_gradient: &[f32]) {
        assert_eq!(theta.len(), pseudo_gradient.len());
        for ((t, v), g) in theta
            .iter_mut()
            .zip(self.velocity.iter_mut())
            .zip(pseudo_gradient)
        {
            *v = self.momentum * *v + g;
            *t -= self.lr * (g + self.momentum * *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesterov_matches_the_torch_formula() {
        let mut theta = vec![1.0f32, -2.0];
        let mut opt = Nesterov::new(2, 0.7, 0.9);
        opt.step(&mut theta, &[0.1, 0.2]);
        // v = g; θ = θ - lr (g + μ g) = θ - 0.7 * 1.9 g
        assert!((theta[0] - (1.0 - 0.7 * 1.9 * 0.1)).abs() < 1e-7);
        opt.step(&mut theta, &[0.1, 0.2]);
        // v = 0.9·0.1 + 0.1 = 0.19; θ -= 0.7 (0.1 + 0.9·0.19)
        assert!((theta[0] - (1.0 - 0.133 - 0.7 * (0.1 + 0.171))).abs() < 1e-6);
    }
}
