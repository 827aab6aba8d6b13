//! `tch::Tensor` ⇄ `autopipe.v1.Tensor` (dtype, shape, little-endian row-major bytes).

use crate::v1;
use tch::{Device, Kind, Tensor};

/// A wire tensor that cannot be turned into a `tch::Tensor`, or the reverse.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("unsupported dtype {0}")]
    UnsupportedDType(String),
    #[error("tensor bytes ({got}) do not match dtype {dtype} × shape {shape:?} ({want} bytes)")]
    ByteCount {
        got: usize,
        want: usize,
        dtype: String,
        shape: Vec<i64>,
    },
    #[error("invalid shape {0:?}")]
    Shape(Vec<i64>),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The wire dtype for a tensor kind.
pub fn dtype_from_kind(kind: Kind) -> Result<v1::Dtype, TensorError> {
    Ok(match kind {
        Kind::Float => v1::Dtype::Float32,
        Kind::Half => v1::Dtype::Float16,
        Kind::BFloat16 => v1::Dtype::Bfloat16,
        Kind::Int64 => v1::Dtype::Int64,
        Kind::Int => v1::Dtype::Int32,
        Kind::Uint8 => v1::Dtype::Uint8,
        Kind::Double => v1::Dtype::Float64,
        other => return Err(TensorError::UnsupportedDType(format!("{other:?}"))),
    })
}

/// The tensor kind for a wire dtype.
pub fn kind_from_dtype(dtype: v1::Dtype) -> Result<Kind, TensorError> {
    Ok(match dtype {
        v1::Dtype::Float32 => Kind::Float,
        v1::Dtype::Float16 => Kind::Half,
        v1::Dtype::Bfloat16 => Kind::BFloat16,
        v1::Dtype::Int64 => Kind::Int64,
        v1::Dtype::Int32 => Kind::Int,
        v1::Dtype::Uint8 => Kind::Uint8,
        v1::Dtype::Float64 => Kind::Double,
        v1::Dtype::Unspecified => {
            return Err(TensorError::UnsupportedDType("DTYPE_UNSPECIFIED".into()))
        }
    })
}

/// Serializes a tensor (any device; copied to the CPU, made contiguous).
pub fn tensor_to_wire(t: &Tensor) -> Result<v1::Tensor, TensorError> {
    let kind = t.kind();
    let dtype = dtype_from_kind(kind)?;
    let cpu = t.to_device(Device::Cpu).contiguous();
    let numel = cpu.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    if numel > 0 {
        cpu.f_copy_data_u8(&mut data, numel)?;
    }
    Ok(v1::Tensor {
        dtype: dtype as i32,
        shape: cpu.size(),
        data,
    })
}

/// Deserializes a wire tensor onto `device`, checking that the bytes match dtype × shape.
pub fn tensor_from_wire(w: &v1::Tensor, device: Device) -> Result<Tensor, TensorError> {
    let dtype = v1::Dtype::try_from(w.dtype)
        .map_err(|_| TensorError::UnsupportedDType(w.dtype.to_string()))?;
    let kind = kind_from_dtype(dtype)?;
    if w.shape.iter().any(|&d| d < 0) {
        return Err(TensorError::Shape(w.shape.clone()));
    }
    let numel = w
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .ok_or_else(|| TensorError::Shape(w.shape.clone()))?;
    let want = numel
        .checked_mul(kind.elt_size_in_bytes())
        .ok_or_else(|| TensorError::Shape(w.shape.clone()))?;
    if want != w.data.len() {
        return Err(TensorError::ByteCount {
            got: w.data.len(),
            want,
            dtype: dtype.as_str_name().to_string(),
            shape: w.shape.clone(),
        });
    }
    let t = Tensor::f_from_data_size(&w.data, &w.shape, kind)?;
    Ok(if device == Device::Cpu {
        t
    } else {
        t.to_device(device)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype() {
        let base = Tensor::arange(24, (Kind::Float, Device::Cpu)).reshape([2, 3, 4]) / 7.0;
        for kind in [
            Kind::Float,
            Kind::Half,
            Kind::BFloat16,
            Kind::Int64,
            Kind::Int,
            Kind::Uint8,
            Kind::Double,
        ] {
            let t = base.to_kind(kind);
            let back = tensor_from_wire(&tensor_to_wire(&t).unwrap(), Device::Cpu).unwrap();
            assert_eq!(back.kind(), kind);
            assert_eq!(back.size(), vec![2, 3, 4]);
            assert!(back.equal(&t), "{kind:?} changed on the wire");
        }
    }

    #[test]
    fn rejects_bytes_that_do_not_match_the_shape() {
        let w = v1::Tensor {
            dtype: v1::Dtype::Float32 as i32,
            shape: vec![2, 2],
            data: vec![0; 15],
        };
        let err = tensor_from_wire(&w, Device::Cpu).unwrap_err();
        assert!(
            matches!(
                err,
                TensorError::ByteCount {
                    got: 15,
                    want: 16,
                    ..
                }
            ),
            "{err}"
        );
        let neg = v1::Tensor {
            dtype: v1::Dtype::Float32 as i32,
            shape: vec![-1],
            data: vec![],
        };
        assert!(matches!(
            tensor_from_wire(&neg, Device::Cpu),
            Err(TensorError::Shape(_))
        ));
        let bad = v1::Tensor {
            dtype: 99,
            shape: vec![],
            data: vec![],
        };
        assert!(matches!(
            tensor_from_wire(&bad, Device::Cpu),
            Err(TensorError::UnsupportedDType(_))
        ));
    }
}
