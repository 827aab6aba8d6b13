//! The building blocks families compose: no step knows which family it serves.

pub mod components;
pub mod controlnet;
pub mod denoise;
pub mod image;
pub mod latent_diffusion;
pub mod latents;
pub mod prompt;
pub mod schedule;
pub mod tokenizers;
