//! What one request may ask of a public-facing server: request bytes, image pixels (inputs and
//! output), prompt bytes, images, denoising steps, concurrent streams per connection and how long
//! it may run. Each refusal names the field, the limit and the flag that sets it, before any work:
//! input images are measured from their headers, never decoded past them.

use autopipe_proto::v1;
use std::time::Duration;
use tonic::Status;

/// The operator's limits (`--max-*` flags on `autopipe-orchestrator` and `autopipe serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// Largest request message, in bytes (images included); larger ones are RESOURCE_EXHAUSTED.
    #[arg(long, env = "AUTOPIPE_MAX_REQUEST_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Most pixels (width × height) of the output and of every input image.
    #[arg(long, env = "AUTOPIPE_MAX_IMAGE_PIXELS", default_value_t = 2048 * 2048)]
    pub max_image_pixels: u64,
    /// Longest prompt or negative prompt, in bytes (CLIP reads 77 tokens of it anyway).
    #[arg(long, env = "AUTOPIPE_MAX_PROMPT_BYTES", default_value_t = 4096)]
    pub max_prompt_bytes: usize,
    /// Most images one request may generate (num_images_per_prompt).
    #[arg(long, env = "AUTOPIPE_MAX_IMAGES_PER_REQUEST", default_value_t = 4)]
    pub max_images_per_request: u32,
    /// Most denoising steps of any loop a request runs (num_inference_steps, the prior's, the
    /// upscale stage's).
    #[arg(long, env = "AUTOPIPE_MAX_STEPS", default_value_t = 150)]
    pub max_steps: u32,
    /// Most Generate/GenerateStream/Resolve calls in flight on one client connection.
    #[arg(long, env = "AUTOPIPE_MAX_CONCURRENT_STREAMS", default_value_t = 16)]
    pub max_concurrent_streams: u32,
    /// Longest a request may run, in seconds, whatever deadline (grpc-timeout) the client set.
    #[arg(long, env = "AUTOPIPE_MAX_DEADLINE", default_value_t = 600)]
    pub max_deadline: u64,
}

impl Limits {
    /// No limits beyond the request validation's own bounds (a process that is its own operator).
    pub fn unlimited() -> Self {
        Self {
            max_request_bytes: autopipe_proto::transport::MAX_MESSAGE_BYTES,
            max_image_pixels: u64::MAX,
            max_prompt_bytes: usize::MAX,
            max_images_per_request: u32::MAX,
            max_steps: u32::MAX,
            max_concurrent_streams: u32::MAX,
            max_deadline: u64::MAX,
        }
    }

    /// The cap on a request's run time.
    pub fn max_deadline(&self) -> Duration {
        Duration::from_secs(self.max_deadline)
    }

    /// Checks a `Generate` request against every limit but the transport's (bytes, streams).
    pub fn check(&self, req: &v1::GenerateRequest) -> Result<(), Status> {
        for (field, text) in [
            ("prompt", &req.prompt),
            ("negative_prompt", &req.negative_prompt),
            ("prompt_2", &req.prompt_2),
            ("negative_prompt_2", &req.negative_prompt_2),
        ] {
            if text.len() > self.max_prompt_bytes {
                return Err(over(
                    field,
                    format!("{} bytes", text.len()),
                    self.max_prompt_bytes,
                    "bytes",
                    "--max-prompt-bytes",
                ));
            }
        }
        if let Some(n) = req.num_images_per_prompt {
            if n > self.max_images_per_request {
                return Err(over(
                    "num_images_per_prompt",
                    format!("{n} images"),
                    self.max_images_per_request,
                    "images",
                    "--max-images-per-request",
                ));
            }
        }
        for (field, steps) in [
            ("num_inference_steps", req.num_inference_steps),
            ("prior_num_inference_steps", req.prior_num_inference_steps),
            (
                "upscale_num_inference_steps",
                req.upscale_num_inference_steps,
            ),
        ] {
            if let Some(n) = steps.filter(|&n| n > self.max_steps) {
                return Err(over(
                    field,
                    format!("{n} steps"),
                    self.max_steps,
                    "steps",
                    "--max-steps",
                ));
            }
        }
        let pixels = u64::from(req.width) * u64::from(req.height);
        if pixels > self.max_image_pixels {
            return Err(over(
                "width",
                format!("{}x{} = {pixels} pixels", req.width, req.height),
                self.max_image_pixels,
                "pixels",
                "--max-image-pixels",
            ));
        }
        let inputs = [("image", &req.image), ("mask_image", &req.mask_image)]
            .into_iter()
            .map(|(f, b)| (f.to_string(), b))
            .chain(
                req.control_image
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (format!("control_image[{i}]"), b)),
            );
        for (field, bytes) in inputs {
            // An undecodable header is left to validation, which names what is wrong with it.
            if let Some((w, h)) = dimensions(bytes) {
                let pixels = u64::from(w) * u64::from(h);
                if pixels > self.max_image_pixels {
                    return Err(over(
                        &field,
                        format!("{w}x{h} = {pixels} pixels"),
                        self.max_image_pixels,
                        "pixels",
                        "--max-image-pixels",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The status for a request message over `--max-request-bytes`.
    pub fn request_too_large(&self) -> Status {
        Status::resource_exhausted(format!(
            "request: the message is over this server's limit of {} bytes (--max-request-bytes)",
            self.max_request_bytes
        ))
    }

    /// The status for one call too many on a connection.
    pub fn too_many_streams(&self) -> Status {
        Status::resource_exhausted(format!(
            "streams: this connection already has {} calls in flight, the limit (--max-concurrent-streams)",
            self.max_concurrent_streams
        ))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::unlimited()
    }
}

fn over(field: &str, got: String, limit: impl std::fmt::Display, unit: &str, flag: &str) -> Status {
    Status::invalid_argument(format!(
        "{field}: {got} is over this server's limit of {limit} {unit} ({flag})"
    ))
}

/// An encoded image's width and height from its header alone.
fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.is_empty() {
        return None;
    }
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()
}
