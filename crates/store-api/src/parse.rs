//! The names operators and requests give dtypes, devices and memory budgets.

use crate::{Code, StoreError};
use tch::{Device, Kind};

/// The dtypes components load in: diffusers/torch name, the short names also accepted, the kind.
const DTYPES: [(&str, &[&str], Kind); 3] = [
    ("float32", &["fp32", "float"], Kind::Float),
    ("float16", &["fp16", "half"], Kind::Half),
    ("bfloat16", &["bf16"], Kind::BFloat16),
];

/// The dtype names for messages: `float32, float16 or bfloat16`.
fn dtype_names() -> String {
    let names: Vec<&str> = DTYPES.iter().map(|(name, _, _)| *name).collect();
    match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// The diffusers/torch name of a component dtype (`float16`); any other kind is an error.
pub fn kind_name(kind: Kind) -> Result<&'static str, StoreError> {
    DTYPES
        .iter()
        .find(|(_, _, k)| *k == kind)
        .map(|(name, _, _)| *name)
        .ok_or_else(|| {
            StoreError::new(
                Code::InvalidArgument,
                format!(
                    "dtype: {kind:?} is not a component dtype ({})",
                    dtype_names()
                ),
            )
        })
}

/// A dtype name (`float32`, `float16`, `bfloat16`, or `fp32`/`fp16`/`bf16`); empty = none.
pub fn parse_kind_opt(name: &str) -> Result<Option<Kind>, String> {
    let name = name.trim().to_ascii_lowercase();
    if name.is_empty() {
        return Ok(None);
    }
    DTYPES
        .iter()
        .find(|(canonical, short, _)| *canonical == name || short.contains(&name.as_str()))
        .map(|(_, _, kind)| Some(*kind))
        .ok_or_else(|| format!("unknown dtype {name:?} ({})", dtype_names()))
}

/// A required dtype name, as [`parse_kind_opt`].
pub fn parse_kind(name: &str) -> Result<Kind, String> {
    parse_kind_opt(name)?.ok_or_else(|| format!("a dtype is required ({})", dtype_names()))
}

/// A device name: `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, String> {
    Ok(match s.trim() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(i) => Device::Cuda(i),
            None => return Err(format!("expected cpu, cuda or cuda:N, got {other:?}")),
        },
    })
}

/// A device name parsed and checked against this process: `cuda` needs a libtorch built with
/// CUDA (linked, not only present on disk) and a visible device of that index, so a server that
/// cannot compute there refuses to start instead of failing every request's first load.
pub fn open_device(s: &str) -> Result<Device, String> {
    let device = parse_device(s)?;
    if let Device::Cuda(i) = device {
        if !cuda_backend_loaded() {
            return Err(format!(
                "{s}: this binary's libtorch has no CUDA support (libtorch_cuda is not linked)"
            ));
        }
        let visible = if tch::Cuda::is_available() {
            tch::Cuda::device_count()
        } else {
            0
        };
        if i as i64 >= visible {
            return Err(format!(
                "{s}: no such CUDA device ({visible} visible to this process: no GPU, or no driver)"
            ));
        }
    }
    Ok(device)
}

/// Whether libtorch's CUDA backend is in this process (libtorch_cuda loaded), whether or not a
/// GPU and a driver are there: libtorch's own checks (`hasCUDA`, `hasCUDART`) answer false for
/// both causes alike.
fn cuda_backend_loaded() -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .map(|maps| maps.contains("/libtorch_cuda.so"))
        .unwrap_or(false)
}

/// A memory budget: bytes (`8000000000`, `8G`, `512M`, `64K`) or a percentage of the device's
/// memory (`80%`; host RAM for the CPU).
pub fn parse_budget(s: &str, device: Device) -> Result<u64, String> {
    parse_budget_of(s, device_memory(device))
}

fn parse_budget_of(s: &str, total: Option<u64>) -> Result<u64, String> {
    let s = s.trim();
    if let Some(p) = s.strip_suffix('%') {
        let p: f64 = p
            .parse()
            .map_err(|_| format!("{s:?} is not a percentage"))?;
        if !(0.0..=100.0).contains(&p) {
            return Err(format!("{s:?}: a percentage must be in 0..=100"));
        }
        let total =
            total.ok_or("device memory size unknown; give bytes instead of a percentage")?;
        return Ok((total as f64 * p / 100.0) as u64);
    }
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{s:?} must be a non-negative byte count"));
    }
    Ok((n * mult as f64) as u64)
}

/// Total memory of a device, where it can be known: host RAM for the CPU.
fn device_memory(device: Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
                .map(|kb| kb * 1024)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_devices_and_dtypes() {
        assert_eq!(parse_budget_of("1024", None).unwrap(), 1024);
        assert_eq!(parse_budget_of("2G", None).unwrap(), 2 << 30);
        assert_eq!(parse_budget_of("50%", Some(1000)).unwrap(), 500);
        for bad in ["50%", "lots", "-1", "120%"] {
            assert!(
                parse_budget_of(bad, if bad == "120%" { Some(1) } else { None }).is_err(),
                "{bad}"
            );
        }
        assert_eq!(parse_device("cuda:1").unwrap(), Device::Cuda(1));
        assert!(parse_device("tpu").is_err());
        assert_eq!(parse_kind_opt(" BF16 ").unwrap(), Some(Kind::BFloat16));
        assert_eq!(parse_kind_opt("").unwrap(), None);
        assert!(parse_kind("int8").is_err());
    }

    #[test]
    fn dtype_names_round_trip_and_unknown_kinds_are_errors() {
        for (name, short, kind) in DTYPES {
            assert_eq!(kind_name(kind).unwrap(), name);
            assert_eq!(parse_kind(name).unwrap(), kind);
            for s in short {
                assert_eq!(parse_kind(s).unwrap(), kind, "{s}");
            }
        }
        let err = kind_name(Kind::Int64).unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);
        assert!(
            err.message.starts_with("dtype:")
                && err.message.contains("float32, float16 or bfloat16"),
            "{err}"
        );
        assert_eq!(
            parse_kind_opt("int8").unwrap_err(),
            "unknown dtype \"int8\" (float32, float16 or bfloat16)"
        );
    }
}
