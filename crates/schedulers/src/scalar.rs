//! 0-d float32 tensors for the schedulers' coefficient arithmetic.
//!
//! diffusers computes its step coefficients on 0-d torch tensors (`alphas_cumprod[t]`,
//! `sigmas[i]`). libtorch's CPU `sqrt`/`log`/`exp` are vectorised MKL/SLEEF kernels whose results
//! differ from libm's in the last bit, and a 0-d tensor written in front of a half-precision tensor
//! (`sigma * model_output`) is first rounded to that precision. Doing the same arithmetic on the
//! same kind of tensors with the same libtorch reproduces diffusers bit for bit.

use std::ops::{Add, Div, Mul, Neg, Sub};

use tch::{Device, Kind, Tensor};

/// A 0-d float32 CPU tensor standing for one of diffusers' scalar coefficients.
#[derive(Debug)]
pub(crate) struct S(pub(crate) Tensor);

impl S {
    /// `torch.tensor(value)` (float32).
    pub fn new(value: f32) -> Self {
        S(Tensor::from(value))
    }

    /// `table[i]` of a 1-D float32 tensor.
    pub fn at(table: &Tensor, i: usize) -> Self {
        S(table
            .get(i as i64)
            .to_kind(Kind::Float)
            .to_device(Device::Cpu))
    }

    /// The tensor, for arithmetic with full tensors in diffusers' operand order.
    pub fn t(&self) -> &Tensor {
        &self.0
    }

    /// The value.
    pub fn value(&self) -> f32 {
        self.0.double_value(&[]) as f32
    }

    /// `x ** 0.5`.
    pub fn sqrt(&self) -> S {
        S(self.0.pow_tensor_scalar(0.5))
    }

    /// `x ** 2`.
    pub fn sq(&self) -> S {
        S(self.0.pow_tensor_scalar(2))
    }

    /// `torch.log(x)`.
    pub fn ln(&self) -> S {
        S(self.0.log())
    }

    /// `torch.exp(x)`.
    pub fn exp(&self) -> S {
        S(self.0.exp())
    }

    /// `torch.clamp(x, min=min)`.
    pub fn clamp_min(&self, min: f64) -> S {
        S(self.0.clamp_min(min))
    }

    /// `value / x` for a Python float `value` (torch: `x.reciprocal() * value`).
    pub fn rdiv(&self, value: f64) -> S {
        S(self.0.reciprocal() * value)
    }

    /// `value - x` for a Python number `value`.
    pub fn rsub(&self, value: f64) -> S {
        S(-(&self.0 - value))
    }
}

impl Clone for S {
    fn clone(&self) -> Self {
        S(self.0.shallow_clone())
    }
}

impl Neg for &S {
    type Output = S;
    fn neg(self) -> S {
        S(-&self.0)
    }
}

impl Neg for S {
    type Output = S;
    fn neg(self) -> S {
        -&self
    }
}

macro_rules! binary {
    ($trait:ident, $func:ident) => {
        impl $trait<&S> for &S {
            type Output = S;
            fn $func(self, rhs: &S) -> S {
                S((&self.0).$func(&rhs.0))
            }
        }
        impl $trait<S> for &S {
            type Output = S;
            fn $func(self, rhs: S) -> S {
                self.$func(&rhs)
            }
        }
        impl $trait<&S> for S {
            type Output = S;
            fn $func(self, rhs: &S) -> S {
                (&self).$func(rhs)
            }
        }
        impl $trait<S> for S {
            type Output = S;
            fn $func(self, rhs: S) -> S {
                (&self).$func(&rhs)
            }
        }
        impl $trait<f64> for &S {
            type Output = S;
            fn $func(self, rhs: f64) -> S {
                S((&self.0).$func(rhs))
            }
        }
        impl $trait<f64> for S {
            type Output = S;
            fn $func(self, rhs: f64) -> S {
                (&self).$func(rhs)
            }
        }
    };
}

binary!(Add, add);
binary!(Sub, sub);
binary!(Mul, mul);
binary!(Div, div);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_follows_the_tensor_ops() {
        let a = S::new(4.0);
        let b = S::new(2.0);
        assert_eq!((&a / &b).value(), 2.0);
        assert_eq!(a.sqrt().value(), 2.0);
        assert_eq!(b.sq().value(), 4.0);
        assert_eq!(b.rsub(1.0).value(), -1.0);
        assert_eq!(b.rdiv(1.0).value(), 0.5);
        assert_eq!((&a + 1.0).value(), 5.0);
    }
}
