//! Evaluation in bits per byte, and text sampling.
//!
//! Bits per byte (bpb) divides the summed next-token loss (in bits) by the number of
//! UTF-8 bytes the predicted tokens stand for, so models with different tokenizers
//! compare. Every token but the first of a text is predicted exactly once: windows of
//! `seq_len + 1` tokens overlap by one token.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use tessera_model::Llama;
use tokenizers::Tokenizer;

use crate::data::DataError;
use crate::rng::SplitMix64;

/// Loss and bits per byte over a set of predicted tokens.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy per predicted token, in nats.
    pub loss: f64,
    pub bpb: f64,
    pub tokens: u64,
    pub bytes: u64,
}

/// Sums loss over `windows` (each `seq_len + 1` tokens or shorter), `batch` at a time.
/// `byte_lens[id]` is the number of text bytes token `id` stands for.
pub fn evaluate_windows(
    model: &Llama,
    windows: &[Vec<i64>],
    batch: usize,
    byte_lens: &[u32],
) -> EvalResult {
    let mut nll_sum = 0f64;
    let mut tokens = 0u64;
    let mut bytes = 0u64;
    let mut i = 0;
    while i < windows.len() {
        // Windows of equal length batch together; the last, shorter one goes alone.
        let len = windows[i].len();
        let mut j = i;
        while j < windows.len() && j - i < batch && windows[j].len() == len {
            j += 1;
        }
        let flat: Vec<i64> = windows[i..j].iter().flatten().copied().collect();
        let t = Tensor::from_slice(&flat)
            .view([(j - i) as i64, len as i64])
            .to_device(model.device());
        let nll = model
            .token_nll(&t)
            .to_device(Device::Cpu)
            .to_kind(Kind::Double);
        nll_sum += f64::try_from(nll.sum(Kind::Double)).expect("scalar");
        for w in &windows[i..j] {
            tokens += (w.len() - 1) as u64;
            bytes += w[1..]
                .iter()
                .map(|&id| byte_lens.get(id as usize).copied().unwrap_or(0) as u64)
                .sum::<u64>();
        }
        i = j;
    }
    EvalResult {
        loss: if tokens > 0 {
            nll_sum / tokens as f64
        } else {
            f64::NAN
        },
        bpb: if bytes > 0 {
            nll_sum / std::f64::consts::LN_2 / bytes as f64
        } else {
            f64::NAN
        },
        tokens,
        bytes,
    }
}

/// Cuts a token sequence into windows of `seq_len + 1` overlapping by one token.
pub fn windows_of(tokens: &[u32], seq_len: usize) -> Vec<Vec<i64>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start + 1 < tokens.len() {
        let end = (start + seq_len + 1).min(tokens.len());
        out.push(tokens[start..end].iter().map(|&t| t as i64).collect());
        start = end - 1;
    }
    out
}

/// Evaluates `model` on a text: tokenize, window at the model's context length, score.
pub fn evaluate_text(
    model: &Llama,
    tokenizer: &Tokenizer,
    text: &str,
    batch: usize,
) -> Result<EvalResult, DataError> {
    let tokens = crate::data::encode_text(tokenizer, text)?;
    if let Some(&bad) = tokens
        .iter()
        .find(|&&t| t as usize >= model.config().vocab_size)
    {
        return Err(DataError::Option(format!(
            "the tokenizer produced id {bad}, outside the model's vocabulary of {}; \
             the checkpoint's tokenizer.json does not belong to its model",
            model.config().vocab_size
        )));
    }
    let windows = windows_of(&tokens, model.config().max_position_embeddings);
    let byte_lens = crate::data::token_byte_lengths(tokenizer);
    Ok(evaluate_windows(model, &windows, batch, &byte_lens))
}

/// Sampling settings of `tessera generate`.
#[derive(Debug, Clone, Copy)]
pub struct SampleOptions {
    pub tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: all).
    pub top_p: f64,
    pub seed: u64,
}

/// Picks a token from `logits` under the options, with the generator `rng`.
fn pick(logits: &[f32], opts: &SampleOptions, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap_or(0)
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if opts.top_k > 0 {
        order.truncate(opts.top_k);
    }
    let max = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / opts.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut keep = weights.len();
    if opts.top_p < 1.0 {
        let mut acc = 0.0;
        for (n, w) in weights.iter().enumerate() {
            acc += w / total;
            if acc >= opts.top_p {
                keep = n + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..keep].iter().sum();
    let mut r = rng.next_f64() * kept_total;
    for (n, w) in weights[..keep].iter().enumerate() {
        if r < *w {
            return order[n] as u32;
        }
        r -= w;
    }
    order[keep - 1] as u32
}

/// Continues `prompt` by `opts.tokens` tokens and returns prompt plus continuation.
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompt: &str,
    opts: &SampleOptions,
) -> Result<String, DataError> {
    let mut ids = crate::data::encode_text(tokenizer, prompt)?;
    if ids.is_empty() {
        // An empty prompt starts from the end-of-text token, as after a document.
        ids.push(tokenizer.token_to_id(crate::data::END_OF_TEXT).unwrap_or(0));
    }
    let ctx = model.config().max_position_embeddings;
    let tok_vocab = tokenizer.get_vocab_size(true);
    let mut rng = SplitMix64::new(opts.seed);
    for _ in 0..opts.tokens {
        let window: Vec<i64> = ids[ids.len().saturating_sub(ctx)..]
            .iter()
            .map(|&t| t as i64)
            .collect();
        let input = Tensor::from_slice(&window)
            .view([1, window.len() as i64])
            .to_device(model.device());
        let logits = tch::no_grad(|| model.forward(&input));
        let last = logits
            .select(1, -1)
            .squeeze_dim(0)
            .to_kind(Kind::Float)
            .to_device(Device::Cpu);
        let numel = last.numel();
        let mut row = vec![0f32; numel];
        last.copy_data(&mut row, numel);
        // Ids past the tokenizer's vocabulary (the model pads its table) are never drawn.
        row.truncate(tok_vocab);
        ids.push(pick(&row, opts, &mut rng));
    }
    tokenizer
        .decode(&ids, true)
        .map_err(|e| DataError::Tokenizer {
            path: "<decode>".into(),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_predict_every_token_but_the_first_once() {
        let tokens: Vec<u32> = (0..25).collect();
        let w = windows_of(&tokens, 8);
        let targets: Vec<i64> = w.iter().flat_map(|w| w[1..].to_vec()).collect();
        assert_eq!(targets, (1..25).collect::<Vec<i64>>());
        assert!(windows_of(&[7], 8).is_empty());
    }

    #[test]
    fn sampling_respects_top_k_top_p_and_greedy() {
        let logits = [0.0f32, 5.0, 4.9, -3.0];
        let mut rng = SplitMix64::new(1);
        let greedy = SampleOptions {
            tokens: 1,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        };
        assert_eq!(pick(&logits, &greedy, &mut rng), 1);
        let top2 = SampleOptions {
            temperature: 1.0,
            top_k: 2,
            ..greedy
        };
        let top_p = SampleOptions {
            temperature: 1.0,
            top_p: 0.3,
            ..greedy
        };
        for _ in 0..200 {
            assert!(matches!(pick(&logits, &top2, &mut rng), 1 | 2));
            assert_eq!(pick(&logits, &top_p, &mut rng), 1);
        }
    }
}
