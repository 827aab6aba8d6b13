//! One module per model family: each composes the shared steps into diffusers' pipelines of that
//! family and registers itself in [`crate::registry`].

pub mod deepfloyd_if;
pub mod kandinsky;
pub mod sdxl;
pub mod stable_diffusion;
