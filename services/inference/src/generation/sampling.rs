//! Choosing the next token from logits: logit bias, repetition, frequency and presence
//! penalties, then greedy (temperature 0) or sampling with temperature, top-k, top-p and min-p,
//! from a seeded generator so the same seed gives the same output.

use kiln_core::Error;
use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A request's sampling settings (the OpenAI-style fields, validated).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// (0, 1].
    pub top_p: f32,
    /// 0: off.
    pub top_k: usize,
    /// 0: off.
    pub min_p: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// 1: off.
    pub repetition_penalty: f32,
    pub logit_bias: HashMap<u32, f32>,
    pub seed: Option<u64>,
    /// Alternatives to report per token (0..=5).
    pub top_logprobs: usize,
    /// Report each sampled token's log-probability: a pass over the vocabulary per token
    /// (0.15 ms for 49,152 tokens on one core), so only when asked for.
    pub logprobs: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: HashMap::new(),
            seed: None,
            top_logprobs: 0,
            logprobs: false,
        }
    }
}

/// The request fields sampling reads, as they arrive (unset: the default).
#[derive(Debug, Clone, Default)]
pub struct SamplingFields<'a> {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<&'a HashMap<i32, f32>>,
    pub seed: Option<i64>,
    pub top_logprobs: Option<i32>,
    /// The field name top_logprobs arrives as (`logprobs` for completions).
    pub top_logprobs_field: &'a str,
    /// Whether the answer reports the sampled tokens' log-probabilities.
    pub logprobs: bool,
}

impl SamplingParams {
    /// Validates the fields, naming the first bad one; `vocab` bounds logit_bias keys.
    pub fn from_fields(fields: SamplingFields<'_>, vocab: usize) -> Result<Self, Error> {
        let mut p = Self::default();
        let range = |field: &str, v: f32, lo: f32, hi: f32| -> Result<f32, Error> {
            if v.is_finite() && v >= lo && v <= hi {
                Ok(v)
            } else {
                Err(Error::invalid(
                    field,
                    format!("must be between {lo} and {hi}, got {v}"),
                ))
            }
        };
        if let Some(t) = fields.temperature {
            p.temperature = range("temperature", t, 0.0, 2.0)?;
        }
        if let Some(v) = fields.top_p {
            if !(v > 0.0 && v <= 1.0) {
                return Err(Error::invalid(
                    "top_p",
                    format!("must be in (0, 1], got {v}"),
                ));
            }
            p.top_p = v;
        }
        if let Some(k) = fields.top_k {
            p.top_k = usize::try_from(k)
                .map_err(|_| Error::invalid("top_k", format!("must not be negative, got {k}")))?;
        }
        if let Some(v) = fields.min_p {
            p.min_p = range("min_p", v, 0.0, 1.0)?;
        }
        if let Some(v) = fields.frequency_penalty {
            p.frequency_penalty = range("frequency_penalty", v, -2.0, 2.0)?;
        }
        if let Some(v) = fields.presence_penalty {
            p.presence_penalty = range("presence_penalty", v, -2.0, 2.0)?;
        }
        if let Some(v) = fields.repetition_penalty {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::invalid(
                    "repetition_penalty",
                    format!("must be positive, got {v}"),
                ));
            }
            p.repetition_penalty = v;
        }
        if let Some(bias) = fields.logit_bias {
            for (&token, &b) in bias {
                let field = format!("logit_bias[{token}]");
                let id = u32::try_from(token)
                    .ok()
                    .filter(|&t| (t as usize) < vocab)
                    .ok_or_else(|| {
                        Error::invalid(
                            &field,
                            format!("token {token} is outside the vocabulary of {vocab}"),
                        )
                    })?;
                p.logit_bias.insert(id, range(&field, b, -100.0, 100.0)?);
            }
        }
        p.seed = fields.seed.map(|s| s as u64);
        if let Some(n) = fields.top_logprobs {
            if !(0..=5).contains(&n) {
                return Err(Error::invalid(
                    fields.top_logprobs_field,
                    format!("must be between 0 and 5, got {n}"),
                ));
            }
            p.top_logprobs = n as usize;
        }
        p.logprobs = fields.logprobs;
        Ok(p)
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// One chosen token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// NaN unless the parameters ask for log-probabilities.
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// The sampling state of one sequence: its generator and the tokens it has seen.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Tokens of the prompt (the repetition penalty covers them).
    prompt: std::collections::HashSet<u32>,
    /// Generated tokens and how often each came.
    generated: HashMap<u32, u32>,
}

impl Sampler {
    /// `stream`: which of a request's `n` choices this is, so choices of one seeded request
    /// differ from each other but repeat across requests.
    pub fn new(params: SamplingParams, prompt: &[u32], stream: u64) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            prompt: prompt.iter().copied().collect(),
            generated: HashMap::new(),
        }
    }

    /// Chooses the next token from `logits` (changed in place) and remembers it.
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        self.adjust(logits);
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        *self.generated.entry(token).or_default() += 1;
        if !self.params.logprobs && self.params.top_logprobs == 0 {
            return Sampled {
                token,
                logprob: f32::NAN,
                top: Vec::new(),
            };
        }
        // The whole distribution only when alternatives are asked for; the sampled token's
        // log-probability needs just the normalizer (a vocabulary-sized vector a token less).
        let log_sum = log_sum_exp(logits);
        let top = if self.params.top_logprobs > 0 {
            let logprobs: Vec<f32> = logits.iter().map(|&l| l - log_sum).collect();
            top_n(&logprobs, self.params.top_logprobs)
        } else {
            Vec::new()
        };
        Sampled {
            token,
            logprob: logits[token as usize] - log_sum,
            top,
        }
    }

    fn adjust(&self, logits: &mut [f32]) {
        let p = &self.params;
        for (&token, &bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &token in self.prompt.iter().chain(self.generated.keys()) {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&token, &count) in &self.generated {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -= count as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
    }

    /// Samples from the tempered distribution restricted by top-k, top-p and min-p.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let keep = if p.top_k > 0 {
            p.top_k.min(order.len())
        } else {
            order.len()
        };
        // Only the kept head needs sorting.
        if keep < order.len() {
            order.select_nth_unstable_by(keep - 1, |&a, &b| {
                logits[b as usize].total_cmp(&logits[a as usize])
            });
            order.truncate(keep);
        }
        order.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let max = logits[order[0] as usize];
        let mut probs: Vec<f32> = order
            .iter()
            .map(|&t| ((logits[t as usize] - max) / p.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        let mut cut = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p {
                    cut = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            cut = cut.min(probs.iter().take_while(|&&x| x >= floor).count().max(1));
        }
        let total: f32 = probs[..cut].iter().sum();
        let mut target = self.rng.random::<f32>() * total;
        for (i, &x) in probs[..cut].iter().enumerate() {
            if target < x {
                return order[i];
            }
            target -= x;
        }
        order[cut - 1]
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-probabilities of logits (temperature 1).
/// `ln Σ exp(logits)`, computed from the largest logit so nothing overflows.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    sum.ln() + max
}

#[cfg(test)]
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let log_sum = log_sum_exp(logits);
    logits.iter().map(|&l| l - log_sum).collect()
}

fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut order: Vec<u32> = (0..logprobs.len() as u32).collect();
    let n = n.min(order.len());
    order.select_nth_unstable_by(n - 1, |&a, &b| {
        logprobs[b as usize].total_cmp(&logprobs[a as usize])
    });
    order.truncate(n);
    order.sort_unstable_by(|&a, &b| logprobs[b as usize].total_cmp(&logprobs[a as usize]));
    order
        .into_iter()
        .map(|t| (t, logprobs[t as usize]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn log_probabilities_only_when_asked_for() {
        let greedy = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let out = Sampler::new(greedy.clone(), &[], 0).sample(&mut logits());
        assert_eq!(out.token, 1);
        assert!(out.logprob.is_nan() && out.top.is_empty(), "{out:?}");
        let asked = SamplingParams {
            logprobs: true,
            ..greedy
        };
        let out = Sampler::new(asked, &[], 0).sample(&mut logits());
        assert_eq!(out.logprob, log_softmax(&logits())[1]);
        assert!(out.top.is_empty());
    }

    #[test]
    fn greedy_takes_the_largest_and_reports_its_logprob() {
        let params = SamplingParams {
            temperature: 0.0,
            top_logprobs: 2,
            ..Default::default()
        };
        let mut s = Sampler::new(params, &[], 0);
        let out = s.sample(&mut logits());
        assert_eq!(out.token, 1);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 4]);
        let probs: f32 = log_softmax(&logits()).iter().map(|l| l.exp()).sum();
        assert!((probs - 1.0).abs() < 1e-5);
        assert!((out.logprob - log_softmax(&logits())[1]).abs() < 1e-6);
    }

    #[test]
    fn the_same_seed_repeats_and_other_seeds_differ() {
        let run = |seed: u64| {
            let params = SamplingParams {
                seed: Some(seed),
                ..Default::default()
            };
            let mut s = Sampler::new(params, &[], 0);
            (0..64)
                .map(|_| s.sample(&mut [0.0; 50]).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_choice() {
        for _ in 0..200 {
            let params = SamplingParams {
                top_k: 2,
                ..Default::default()
            };
            let t = Sampler::new(params, &[], 0).sample(&mut logits()).token;
            assert!(t == 1 || t == 4, "{t}");
            let params = SamplingParams {
                top_p: 0.01,
                ..Default::default()
            };
            assert_eq!(Sampler::new(params, &[], 0).sample(&mut logits()).token, 1);
        }
    }

    #[test]
    fn penalties_and_bias_move_the_choice() {
        let greedy = |params: SamplingParams, prompt: &[u32]| {
            let mut s = Sampler::new(
                SamplingParams {
                    temperature: 0.0,
                    ..params
                },
                prompt,
                0,
            );
            s.sample(&mut logits()).token
        };
        let bias = HashMap::from([(3u32, 10.0)]);
        assert_eq!(
            greedy(
                SamplingParams {
                    logit_bias: bias,
                    ..Default::default()
                },
                &[]
            ),
            3
        );
        // Token 1 was in the prompt: dividing its logit by 2 leaves token 4 ahead.
        assert_eq!(
            greedy(
                SamplingParams {
                    repetition_penalty: 2.0,
                    ..Default::default()
                },
                &[1]
            ),
            4
        );
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                presence_penalty: 2.0,
                ..Default::default()
            },
            &[],
            0,
        );
        assert_eq!(s.sample(&mut logits()).token, 1);
        assert_eq!(
            s.sample(&mut logits()).token,
            4,
            "token 1 is penalised once it appeared"
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let err = SamplingParams::from_fields(
            SamplingFields {
                temperature: Some(3.0),
                ..Default::default()
            },
            10,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("temperature:"), "{err}");
        let bias = HashMap::from([(10, 1.0)]);
        let err = SamplingParams::from_fields(
            SamplingFields {
                logit_bias: Some(&bias),
                ..Default::default()
            },
            10,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("logit_bias[10]:"), "{err}");
        let err = SamplingParams::from_fields(
            SamplingFields {
                top_logprobs: Some(9),
                top_logprobs_field: "logprobs",
                ..Default::default()
            },
            10,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("logprobs:"), "{err}");
    }
}
