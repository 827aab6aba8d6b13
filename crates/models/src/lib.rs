//! Diffusion model components as libtorch (`tch`) modules, built from diffusers' `config.json`
//! and loaded from its safetensors files with the checkpoint's own parameter paths.

pub mod attention;
pub mod clip;
pub mod controlnet;
pub mod embeddings;
pub mod error;
pub mod if_safety;
pub mod layers;
pub mod prior_transformer;
pub mod resnet;
pub mod safety_checker;
pub mod t5;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
pub mod vq_model;
pub mod weights;
pub mod xlm_roberta;

pub use error::{Error, Result};
