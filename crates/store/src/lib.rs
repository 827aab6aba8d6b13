//! The component store: loads each diffusers component once per (content digest, dtype, device),
//! leases it out, evicts what no lease holds when the memory budget needs room, and runs component
//! forward passes so that weights never leave the process holding them.
//!
//! [`ComponentStore`] is the one interface pipelines use; [`Store`] implements it in-process and the
//! orchestrator's gRPC client implements it for a remote `autopipe-store`.

pub mod allocator;
mod component;
mod digest;
mod error;
mod executor;
mod store;

pub use component::{load_component, Component, Tensors, SUPPORTED_CLASSES};
pub use error::{Code, StoreError};
pub use store::{ComponentStats, Pinned, Store, StoreConfig, StoreObserver, StoreStats};

use std::time::Duration;

/// One component of a checkpoint to acquire: `<path>` holds its `config.json` and weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentSpec {
    /// `model_index.json` key, e.g. `unet`.
    pub name: String,
    /// diffusers/transformers class name, e.g. `UNet2DConditionModel`.
    pub class_name: String,
    /// The component folder on the store's filesystem.
    pub path: std::path::PathBuf,
    /// Weight-file variant (`fp16`), if any.
    pub variant: Option<String>,
}

/// What `acquire` asks for.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub components: Vec<ComponentSpec>,
    /// Weight dtype; `None` = the store's default.
    pub kind: Option<tch::Kind>,
    pub request_id: String,
}

/// A leased, resident component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    pub name: String,
    pub id: String,
    pub class_name: String,
}

/// Components held for a caller until released or expired.
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: String,
    pub handles: Vec<Handle>,
    pub ttl: Duration,
}

impl Lease {
    /// The handle of the component acquired under `name`.
    pub fn handle(&self, name: &str) -> Result<&Handle, StoreError> {
        self.handles.iter().find(|h| h.name == name).ok_or_else(|| {
            StoreError::new(
                Code::Internal,
                format!("lease {} holds no component {name:?}", self.id),
            )
        })
    }
}

/// The store's operations, in-process or over gRPC: the interface pipelines are written against.
pub trait ComponentStore: Send + Sync {
    /// Loads (or finds) the components and leases them.
    fn acquire(&self, request: &AcquireRequest) -> Result<Lease, StoreError>;
    /// Extends a lease; returns its new time to live.
    fn renew(&self, lease_id: &str) -> Result<Duration, StoreError>;
    /// Ends a lease.
    fn release(&self, lease_id: &str) -> Result<(), StoreError>;
    /// Runs `method` of a leased component.
    fn invoke(
        &self,
        lease_id: &str,
        handle_id: &str,
        method: &str,
        inputs: Tensors,
        request_id: &str,
    ) -> Result<Tensors, StoreError>;
}

/// A dtype name (`float32`, `float16`, `bfloat16`, or `fp32`/`fp16`/`bf16`); empty = none.
pub fn parse_kind_opt(name: &str) -> Result<Option<tch::Kind>, String> {
    Ok(match name.trim().to_ascii_lowercase().as_str() {
        "" => None,
        "float32" | "fp32" | "float" => Some(tch::Kind::Float),
        "float16" | "fp16" | "half" => Some(tch::Kind::Half),
        "bfloat16" | "bf16" => Some(tch::Kind::BFloat16),
        other => {
            return Err(format!(
                "unknown dtype {other:?} (float32, float16 or bfloat16)"
            ))
        }
    })
}

/// A required dtype name, as [`parse_kind_opt`].
pub fn parse_kind(name: &str) -> Result<tch::Kind, String> {
    parse_kind_opt(name)?
        .ok_or_else(|| "a dtype is required (float32, float16 or bfloat16)".to_string())
}

/// A device name: `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<tch::Device, String> {
    Ok(match s.trim() {
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(i) => tch::Device::Cuda(i),
            None => return Err(format!("expected cpu, cuda or cuda:N, got {other:?}")),
        },
    })
}

/// A memory budget: bytes (`8000000000`, `8G`, `512M`, `64K`) or a percentage of the device's
/// memory (`80%`; host RAM for the CPU).
pub fn parse_budget(s: &str, device: tch::Device) -> Result<u64, String> {
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
fn device_memory(device: tch::Device) -> Option<u64> {
    match device {
        tch::Device::Cpu => {
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
mod parse_tests {
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
        assert_eq!(parse_device("cuda:1").unwrap(), tch::Device::Cuda(1));
        assert!(parse_device("tpu").is_err());
        assert_eq!(parse_kind_opt(" BF16 ").unwrap(), Some(tch::Kind::BFloat16));
        assert_eq!(parse_kind_opt("").unwrap(), None);
        assert!(parse_kind("int8").is_err());
    }
}
