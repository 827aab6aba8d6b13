//! Prompt encoders: text in, the UNet's text conditioning out, classifier-free guidance included
//! (`[negative; positive]` along the batch when guiding), each prompt repeated per image.

use crate::steps::components::Components;
use crate::{PipelineError, Result};
use autopipe_tokenizer::{ClipTokenizer, T5Tokenizer};
use std::sync::Arc;
use tch::Tensor;

/// The prompts of one request, as diffusers' `encode_prompt` takes them.
pub struct Prompts<'a> {
    pub prompt: &'a str,
    pub prompt_2: Option<&'a str>,
    pub negative_prompt: Option<&'a str>,
    pub negative_prompt_2: Option<&'a str>,
    pub num_images: i64,
    /// Classifier-free guidance (`guidance_scale > 1`): the negative half is computed.
    pub guide: bool,
}

/// The text conditioning.
pub struct PromptEmbeds {
    /// `encoder_hidden_states`: [batch (×2 when guiding), T, D].
    pub embeds: Tensor,
    /// Pooled embeddings (SDXL's `text_embeds`), batched like `embeds`.
    pub pooled: Option<Tensor>,
}

/// Turns prompts into text conditioning.
pub trait PromptEncoder {
    fn encode(
        &self,
        components: &Components,
        prompts: &Prompts,
        warnings: &mut Vec<String>,
    ) -> Result<PromptEmbeds>;
}

/// Token ids for `texts` (padded to the tokenizer's length) as one [N, T] batch, with diffusers'
/// truncation warning for the positive prompt.
fn token_batch(
    tokenizer: &ClipTokenizer,
    texts: &[&str],
    warn_for: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<Tensor> {
    let max_len = tokenizer.model_max_length();
    let mut ids = Vec::with_capacity(texts.len() * max_len);
    for text in texts {
        let enc = tokenizer.encode(text)?;
        if enc.truncated && warn_for == Some(*text) {
            let warning = format!(
                "The following part of your input was truncated because CLIP can only handle sequences up to {max_len} tokens: {}",
                enc.removed_text
            );
            if !warnings.contains(&warning) {
                warnings.push(warning);
            }
        }
        ids.extend(enc.input_ids);
    }
    Ok(Tensor::from_slice(&ids).reshape([texts.len() as i64, max_len as i64]))
}

/// Repeats each row of a [B, …] batch `n` times in place (`repeat(1, n, 1).view(B*n, …)`), as
/// diffusers duplicates embeddings per image.
fn per_image(t: &Tensor, n: i64) -> Tensor {
    if n == 1 {
        return t.shallow_clone();
    }
    let rows: Vec<Tensor> = (0..t.size()[0])
        .map(|i| {
            let row = t.get(i).unsqueeze(0);
            let mut reps = vec![1i64; row.dim()];
            reps[0] = n;
            row.repeat(reps.as_slice())
        })
        .collect();
    Tensor::cat(&rows, 0)
}

/// Stable Diffusion's `encode_prompt`: one CLIP text encoder's last hidden state.
pub struct ClipPrompt {
    pub tokenizer: Arc<ClipTokenizer>,
    /// The leased text encoder's name.
    pub encoder: &'static str,
}

impl PromptEncoder for ClipPrompt {
    fn encode(
        &self,
        components: &Components,
        prompts: &Prompts,
        warnings: &mut Vec<String>,
    ) -> Result<PromptEmbeds> {
        let negative = prompts.negative_prompt.unwrap_or("");
        let texts: &[&str] = if prompts.guide {
            &[negative, prompts.prompt]
        } else {
            &[prompts.prompt]
        };
        let ids = token_batch(&self.tokenizer, texts, Some(prompts.prompt), warnings)?;
        let out = components.text_encoder(self.encoder).encode(ids)?;
        Ok(PromptEmbeds {
            embeds: per_image(&out.last_hidden_state, prompts.num_images),
            pooled: None,
        })
    }
}

/// SDXL's `encode_prompt`: the penultimate hidden states of each text encoder (`text_encoder`,
/// `text_encoder_2`; the refiner has only the second), concatenated along the features; the pooled
/// `text_embeds` of the projection encoder; `prompt_2` / `negative_prompt_2` for the second
/// encoder; zero negative embeddings when no negative prompt is given and the checkpoint says
/// `force_zeros_for_empty_prompt`.
pub struct DualClipPrompt {
    /// (tokenizer, leased encoder name) in order; one entry for a refiner.
    pub encoders: Vec<(Arc<ClipTokenizer>, &'static str)>,
    pub force_zeros_for_empty_prompt: bool,
}

impl PromptEncoder for DualClipPrompt {
    fn encode(
        &self,
        components: &Components,
        prompts: &Prompts,
        warnings: &mut Vec<String>,
    ) -> Result<PromptEmbeds> {
        // diffusers zips [prompt, prompt_2] with the encoders present: a refiner's only encoder
        // reads `prompt`.
        let prompt_2 = prompts.prompt_2.unwrap_or(prompts.prompt);
        let zero_negative = prompts.negative_prompt.is_none() && self.force_zeros_for_empty_prompt;
        let negative = prompts.negative_prompt.unwrap_or("");
        let negative_2 = prompts.negative_prompt_2.unwrap_or(negative);
        let encode_negative = prompts.guide && !zero_negative;

        let mut hidden = Vec::new();
        let mut pooled = None;
        for (i, (tokenizer, encoder)) in self.encoders.iter().enumerate() {
            let (text, negative) = if i == 0 {
                (prompts.prompt, negative)
            } else {
                (prompt_2, negative_2)
            };
            let texts: &[&str] = if encode_negative {
                &[negative, text]
            } else {
                &[text]
            };
            let ids = token_batch(tokenizer, texts, Some(text), warnings)?;
            let out = components.text_encoder(encoder).encode(ids)?;
            if let Some(text_embeds) = out.text_embeds {
                pooled = Some(text_embeds);
            }
            hidden.push(out.penultimate_hidden_state);
        }
        let pooled = pooled.ok_or_else(|| {
            PipelineError::invalid(
                "model",
                "SDXL needs a CLIPTextModelWithProjection text encoder for the pooled embeddings",
            )
        })?;
        let mut embeds = Tensor::cat(&hidden, -1);
        let mut pooled = pooled;
        if prompts.guide && zero_negative {
            embeds = Tensor::cat(&[embeds.zeros_like(), embeds], 0);
            pooled = Tensor::cat(&[pooled.zeros_like(), pooled], 0);
        }
        Ok(PromptEmbeds {
            embeds: per_image(&embeds, prompts.num_images),
            pooled: Some(per_image(&pooled, prompts.num_images)),
        })
    }
}

/// DeepFloyd IF's `_text_preprocessing` with `clean_caption=False`: `text.lower().strip()`, with
/// Python's notion of whitespace (Unicode White_Space plus the separators U+001C..U+001F).
pub fn if_text_preprocessing(text: &str) -> String {
    let python_space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    text.to_lowercase().trim_matches(python_space).to_string()
}

/// DeepFloyd IF's `encode_prompt`: each text preprocessed ([`if_text_preprocessing`]), tokenized
/// to 77 T5 tokens with its attention mask and encoded by the T5 encoder, the negative ("" when
/// none is given) in its own call as diffusers makes it.
pub struct T5Prompt {
    pub tokenizer: Arc<T5Tokenizer>,
    /// The leased text encoder's name.
    pub encoder: &'static str,
}

impl T5Prompt {
    fn encode_one(
        &self,
        components: &Components,
        text: &str,
        warn: bool,
        warnings: &mut Vec<String>,
    ) -> Result<Tensor> {
        let enc = self.tokenizer.encode(&if_text_preprocessing(text))?;
        if warn && enc.truncated {
            let warning = format!(
                "The following part of your input was truncated because CLIP can only handle sequences up to {} tokens: {}",
                self.tokenizer.max_length(),
                enc.removed_text
            );
            if !warnings.contains(&warning) {
                warnings.push(warning);
            }
        }
        let shape = [1, enc.input_ids.len() as i64];
        components.t5_encoder(self.encoder).encode(
            Tensor::from_slice(&enc.input_ids).reshape(shape),
            Tensor::from_slice(&enc.attention_mask).reshape(shape),
        )
    }
}

impl PromptEncoder for T5Prompt {
    fn encode(
        &self,
        components: &Components,
        prompts: &Prompts,
        warnings: &mut Vec<String>,
    ) -> Result<PromptEmbeds> {
        let positive = self.encode_one(components, prompts.prompt, true, warnings)?;
        let positive = per_image(&positive, prompts.num_images);
        let embeds = if prompts.guide {
            let negative = prompts.negative_prompt.unwrap_or("");
            let negative = self.encode_one(components, negative, false, warnings)?;
            Tensor::cat(&[per_image(&negative, prompts.num_images), positive], 0)
        } else {
            positive
        };
        Ok(PromptEmbeds {
            embeds,
            pooled: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_preprocessing_lowers_and_strips_as_python() {
        // Python: "  A Photo\x1f ".lower().strip() == "a photo"; "ΟΔΟΣ".lower() == "οδος" (final sigma).
        assert_eq!(if_text_preprocessing("  A Photo\u{1f} "), "a photo");
        assert_eq!(if_text_preprocessing("ΟΔΟΣ"), "οδος");
        assert_eq!(if_text_preprocessing("\u{a0}Über\u{2003}"), "über");
    }
}
