//! The shim's operators against libtorch's own `conv2d` / `linear` on the same weights: a
//! prepacked convolution must give libtorch's result bit for bit (same oneDNN kernel, the reorder
//! only moves values), whatever the batch size the weight was packed for.

use autopipe_torch_ext::{
    conv_pointwise, linear_pointwise, reorder_conv_weight, reorder_linear_weight, ConvParams,
};
use tch::{Device, Kind, Tensor};

fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

#[test]
fn prepacked_conv_matches_conv2d() {
    tch::manual_seed(0);
    for kind in [Kind::Float, Kind::BFloat16] {
        for (cin, cout, k, stride, pad) in [(32, 64, 3, 1, 1), (64, 32, 1, 1, 0), (4, 32, 3, 2, 1)]
        {
            let w = channels_last(&Tensor::randn([cout, cin, k, k], (kind, Device::Cpu)));
            let b = Tensor::randn([cout], (kind, Device::Cpu));
            let params = ConvParams {
                padding: [pad, pad],
                stride: [stride, stride],
                dilation: [1, 1],
                groups: 1,
            };
            let packed = reorder_conv_weight(&w, &params, Some([2, cin, 16, 16])).unwrap();
            for n in [1, 2, 5] {
                let x = channels_last(&Tensor::randn([n, cin, 16, 16], (kind, Device::Cpu)));
                let want = x.conv2d(&w, Some(&b), [stride], [pad], [1], 1);
                let got = conv_pointwise(&x, &packed, Some(&b), &params).unwrap();
                assert_eq!(got.size(), want.size());
                let diff = f64::try_from((&got - &want).abs().max().to_kind(Kind::Float)).unwrap();
                // libtorch runs fp32 1×1 convolutions of a single image natively, not in oneDNN.
                let tol = if kind == Kind::Float { 1e-4 } else { 0.0 };
                assert!(
                    diff <= tol,
                    "{kind:?} {cin}->{cout} k{k} n{n}: max |diff| {diff}"
                );
            }
        }
    }
}

#[test]
fn prepacked_linear_matches_linear() {
    tch::manual_seed(0);
    for kind in [Kind::Float, Kind::BFloat16] {
        let w = Tensor::randn([96, 64], (kind, Device::Cpu));
        let b = Tensor::randn([96], (kind, Device::Cpu));
        let packed = reorder_linear_weight(&w, Some(4)).unwrap();
        for shape in [vec![1, 64], vec![7, 64], vec![2, 77, 64]] {
            let x = Tensor::randn(shape.as_slice(), (kind, Device::Cpu));
            let want = x.linear(&w, Some(&b));
            let got = linear_pointwise(&x, &packed, Some(&b)).unwrap();
            let none = linear_pointwise(&x, &packed, None).unwrap();
            assert_eq!(got.size(), want.size());
            let scale = f64::try_from(want.abs().max().to_kind(Kind::Float)).unwrap();
            let diff = f64::try_from((&got - &want).abs().max().to_kind(Kind::Float)).unwrap();
            // MKL's sgemm (fp32 linear) and oneDNN sum in different orders.
            let tol = if kind == Kind::Float {
                1e-5 * scale
            } else {
                0.0
            };
            assert!(diff <= tol, "{kind:?} {shape:?}: max |diff| {diff}");
            let diff =
                f64::try_from((&none + &b - &want).abs().max().to_kind(Kind::Float)).unwrap();
            assert!(diff <= 1e-5 * scale + 0.5 * (kind == Kind::BFloat16) as i64 as f64);
        }
    }
}

#[test]
fn errors_come_back_as_messages() {
    let w = Tensor::randn([8, 4, 3], (Kind::Float, Device::Cpu));
    let params = ConvParams {
        padding: [1, 1],
        stride: [1, 1],
        dilation: [1, 1],
        groups: 1,
    };
    assert!(reorder_conv_weight(&w, &params, None).is_err());
    let w = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
    let packed = reorder_linear_weight(&w, None).unwrap();
    let x = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
    let err = linear_pointwise(&x, &packed, None).unwrap_err();
    assert!(!err.to_string().is_empty());
}
