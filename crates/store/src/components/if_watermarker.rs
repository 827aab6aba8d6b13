//! diffusers' IFWatermarker (`pipelines/deepfloyd_if/watermark.py`): a component that only holds
//! the RGBA `watermark_image` buffer. `watermark_image` returns it as the pipelines paste it
//! (`[62, 62, 4]` uint8); the resize and paste run in the pipeline on its PIL images.

use super::{ComponentClass, Method};
use autopipe_models::if_safety;
use std::path::Path;
use tch::{Device, Kind};

/// IFWatermarker: the mark DeepFloyd IF pastes into every output image.
pub(super) struct IFWatermarker(if_safety::IFWatermarker);

// SAFETY: methods only read the buffer (see `ComponentClass`).
unsafe impl Sync for IFWatermarker {}

impl ComponentClass for IFWatermarker {
    const NAME: &'static str = "IFWatermarker";
    const METHODS: &'static [Method<Self>] = &[Method {
        name: "watermark_image",
        required: &[],
        optional: &[],
        outputs: &["watermark_image"],
        run: |m, _| Ok(vec![("watermark_image".to_string(), m.0.watermark_image())]),
    }];

    fn load(
        dir: &Path,
        variant: Option<&str>,
        kind: Kind,
        device: Device,
    ) -> Result<Self, autopipe_models::Error> {
        if_safety::IFWatermarker::load(dir, variant, kind, device).map(Self)
    }
}
