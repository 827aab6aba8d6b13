//! The building blocks families compose: no step knows which family it serves.

pub mod clip_image_processor;
pub mod components;
pub mod controlnet;
pub mod denoise;
pub mod image;
pub mod latent_diffusion;
pub mod latents;
pub mod pil;
pub mod prompt;
pub mod safety_checker;
pub mod schedule;
pub mod tokenizers;
pub mod watermark;
