//! Adversarial nodes, **a test tool**: what a dishonest contributor could submit in a
//! round, so that verification (`tessera-verify`) can be measured against it
//! (`tessera experiment byzantine`). No node of a real run uses this module.
//!
//! Each mode is a strategy an adversary might follow to be paid without doing the
//! work, or to damage θ:
//!
//! | mode | trains | submits |
//! |---|---|---|
//! | `zero` | nothing | an all-zero update (free-riding) |
//! | `noise` | its batches | random values with the norm of its honest update |
//! | `scale:K` | its batches | its honest update times K |
//! | `sign-flip` | its batches | its honest update negated |
//! | `copy` | nothing | an update another node committed before it |
//! | `copy-noise` | nothing | that copy plus noise of 10% of its norm |
//! | `stale` | only in its first round | its update from an earlier round |
//! | `wrong-data` | batches it was not assigned | what that training gives |
//! | `lazy:F` | the first ⌈F·H⌉ of its H batches (`lazy` = 0.5) | what that gives |
//! | `collude` | its batches, unless its partner already crafted | one crafted update shared by two colluders: the first colluder's honest update negated |
//!
//! The pure modes work on decoded f32 updates and encode with the run's codec
//! ([`encode_crafted`]); `wrong-data` and `lazy` train through the ordinary
//! [`crate::worker::Worker::train_round`] on other batches or on fewer of them, so their
//! error-feedback residual and moments evolve as a real node's would.

use std::fmt;
use std::str::FromStr;

use tessera_outer::{decode, encode, Codec};

use crate::rng::SplitMix64;

/// How an adversarial node behaves (see the module's table).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Adversary {
    Zero,
    Noise,
    Scale { factor: f32 },
    SignFlip,
    Copy,
    CopyNoise,
    Stale,
    WrongData,
    Lazy { fraction: f64 },
    Collude,
}

/// The noise `copy-noise` adds, relative to the copied update's norm: small enough that
/// the copy keeps the original's value, large enough that the bytes differ.
pub const COPY_NOISE_RELATIVE: f64 = 0.1;
/// The fraction of its steps `lazy` trains when no fraction is given.
pub const LAZY_FRACTION_DEFAULT: f64 = 0.5;

/// Every mode's name as [`FromStr`] takes it, with default parameters.
pub const MODE_NAMES: &[&str] = &[
    "zero",
    "noise",
    "scale:10",
    "sign-flip",
    "copy",
    "copy-noise",
    "stale",
    "wrong-data",
    "lazy",
    "collude",
];

/// A mode name that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("adversary mode `{name}`: {problem}")]
pub struct AdversaryParseError {
    pub name: String,
    pub problem: String,
}

impl FromStr for Adversary {
    type Err = AdversaryParseError;

    fn from_str(name: &str) -> Result<Adversary, AdversaryParseError> {
        let err = |problem: String| AdversaryParseError {
            name: name.to_string(),
            problem,
        };
        let (mode, param) = match name.split_once(':') {
            Some((m, p)) => (m, Some(p)),
            None => (name, None),
        };
        let number = |p: &str| -> Result<f64, AdversaryParseError> {
            p.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| err(format!("`{p}` is not a finite number")))
        };
        let no_param = |a: Adversary| match param {
            None => Ok(a),
            Some(_) => Err(err(format!("`{mode}` takes no parameter"))),
        };
        match mode {
            "zero" => no_param(Adversary::Zero),
            "noise" => no_param(Adversary::Noise),
            "sign-flip" => no_param(Adversary::SignFlip),
            "copy" => no_param(Adversary::Copy),
            "copy-noise" => no_param(Adversary::CopyNoise),
            "stale" => no_param(Adversary::Stale),
            "wrong-data" => no_param(Adversary::WrongData),
            "collude" => no_param(Adversary::Collude),
            "scale" => {
                let p = param.ok_or_else(|| err("expected `scale:K`, e.g. `scale:10`".into()))?;
                Ok(Adversary::Scale {
                    factor: number(p)? as f32,
                })
            }
            "lazy" => {
                let fraction = match param {
                    None => LAZY_FRACTION_DEFAULT,
                    Some(p) => number(p)?,
                };
                if !(fraction > 0.0 && fraction < 1.0) {
                    return Err(err(format!(
                        "the fraction of steps trained must be in (0, 1), got {fraction}"
                    )));
                }
                Ok(Adversary::Lazy { fraction })
            }
            _ => Err(err(format!(
                "unknown mode; expected one of {}, scale:K or lazy:F",
                MODE_NAMES.join(", ")
            ))),
        }
    }
}

impl fmt::Display for Adversary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Adversary::Zero => write!(f, "zero"),
            Adversary::Noise => write!(f, "noise"),
            Adversary::Scale { factor } => write!(f, "scale:{factor}"),
            Adversary::SignFlip => write!(f, "sign-flip"),
            Adversary::Copy => write!(f, "copy"),
            Adversary::CopyNoise => write!(f, "copy-noise"),
            Adversary::Stale => write!(f, "stale"),
            Adversary::WrongData => write!(f, "wrong-data"),
            Adversary::Lazy { fraction } => write!(f, "lazy:{fraction}"),
            Adversary::Collude => write!(f, "collude"),
        }
    }
}

/// What an adversarial node knows when it acts in a round.
#[derive(Debug, Clone, Copy)]
pub struct Knowledge<'a> {
    /// The run's codec.
    pub codec: Codec,
    /// Elements of an update (the model's parameter count).
    pub params: usize,
    /// The batches the round assigned to this node, in order.
    pub assigned: &'a [u64],
    /// Batches this node was not assigned, at least as many as `assigned`
    /// (`wrong-data` trains on these).
    pub unassigned: &'a [u64],
    /// This node's own decoded update from an earlier round, if it has one (`stale`).
    pub earlier: Option<&'a [f32]>,
    /// A decoded update another node committed before this node commits (`copy`).
    pub committed_before: Option<&'a [f32]>,
    /// The crafted update a colluding partner already committed this round.
    pub partner: Option<&'a [f32]>,
    /// Seeds this node's noise this round.
    pub seed: u64,
}

/// What an adversary hands in for a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Submission {
    /// The blob its training produced, unchanged (`wrong-data`, `lazy`, and `stale` in
    /// the round it trains).
    AsTrained,
    /// A blob it made, encoded with the run's codec.
    Crafted(Vec<u8>),
}

impl Adversary {
    /// The batches the node trains this round, or `None` when it trains nothing.
    pub fn batches_to_train(&self, k: &Knowledge<'_>) -> Option<Vec<u64>> {
        match self {
            Adversary::Zero | Adversary::Copy | Adversary::CopyNoise => None,
            Adversary::Noise | Adversary::Scale { .. } | Adversary::SignFlip => {
                Some(k.assigned.to_vec())
            }
            Adversary::Stale => k.earlier.is_none().then(|| k.assigned.to_vec()),
            Adversary::Collude => k.partner.is_none().then(|| k.assigned.to_vec()),
            Adversary::WrongData => {
                assert!(
                    k.unassigned.len() >= k.assigned.len(),
                    "wrong-data needs as many unassigned batches as assigned ones"
                );
                Some(k.unassigned[..k.assigned.len()].to_vec())
            }
            Adversary::Lazy { fraction } => {
                let steps = lazy_steps(*fraction, k.assigned.len());
                Some(k.assigned[..steps].to_vec())
            }
        }
    }

    /// What the node submits, given its decoded update when it trained this round.
    ///
    /// Panics when the knowledge a mode needs is missing (a copier with nothing
    /// committed before it, a mode that trains without a trained update): the caller
    /// arranges both, so that would be a bug in the test harness.
    pub fn submit(&self, k: &Knowledge<'_>, trained: Option<&[f32]>) -> Submission {
        let trained = || trained.expect("this mode trains before it submits");
        let crafted = |delta: &[f32]| Submission::Crafted(encode_crafted(k.codec, delta));
        match self {
            Adversary::WrongData | Adversary::Lazy { .. } => Submission::AsTrained,
            Adversary::Zero => crafted(&vec![0.0; k.params]),
            Adversary::Noise => {
                let honest = trained();
                Submission::Crafted(encode_with_norm(
                    k.codec,
                    &noise(honest.len(), k.seed),
                    l2(honest),
                ))
            }
            Adversary::Scale { factor } => crafted(&scale(trained(), *factor)),
            Adversary::SignFlip => crafted(&scale(trained(), -1.0)),
            Adversary::Copy => crafted(k.committed_before.expect("copy needs an earlier commit")),
            Adversary::CopyNoise => {
                let original = k.committed_before.expect("copy needs an earlier commit");
                crafted(&copy_noise(original, COPY_NOISE_RELATIVE, k.seed))
            }
            Adversary::Stale => match k.earlier {
                Some(earlier) => crafted(earlier),
                None => Submission::AsTrained,
            },
            Adversary::Collude => match k.partner {
                Some(shared) => crafted(shared),
                None => crafted(&scale(trained(), -1.0)),
            },
        }
    }
}

/// Steps `lazy:F` trains out of `h`: ⌈F·h⌉, at least one and fewer than `h` when
/// `h > 1`, so a lazy node always does some work and never all of it.
pub fn lazy_steps(fraction: f64, h: usize) -> usize {
    let steps = (fraction * h as f64).ceil() as usize;
    steps.clamp(1, h.saturating_sub(1).max(1))
}

/// Encodes an update an adversary made, with the run's codec and no error feedback (a
/// zero residual, so the blob carries exactly the codec's view of `delta`).
pub fn encode_crafted(codec: Codec, delta: &[f32]) -> Vec<u8> {
    let mut residual = vec![0.0; delta.len()];
    encode(codec, delta, &mut residual, 1.0)
}

/// Encodes `delta` scaled so that the *decoded* update has L2 norm `norm`: a sparse
/// codec keeps only part of a dense vector, so the scale is measured after one trial
/// encoding.
pub fn encode_with_norm(codec: Codec, delta: &[f32], norm: f64) -> Vec<u8> {
    let trial = encode_crafted(codec, delta);
    let decoded = decode(&trial, delta.len() as u64).expect("our own encoding decodes");
    let got = l2(&decoded);
    if got == 0.0 {
        return trial;
    }
    encode_crafted(codec, &scale(delta, (norm / got) as f32))
}

/// Standard normal values (Box–Muller from SplitMix64), `n` of them.
pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1 = r.next_f64().max(f64::MIN_POSITIVE);
        let u2 = r.next_f64();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        out.push((radius * angle.cos()) as f32);
        if out.len() < n {
            out.push((radius * angle.sin()) as f32);
        }
    }
    out
}

/// `delta` times `factor`.
pub fn scale(delta: &[f32], factor: f32) -> Vec<f32> {
    delta.iter().map(|d| d * factor).collect()
}

/// `original` plus noise on its nonzero entries of `relative` times its norm: the copy
/// a node makes to hide that it copied. Zero entries stay zero so a sparse codec keeps
/// the same positions.
pub fn copy_noise(original: &[f32], relative: f64, seed: u64) -> Vec<f32> {
    let nonzero = original.iter().filter(|v| **v != 0.0).count().max(1);
    let sigma = (relative * l2(original) / (nonzero as f64).sqrt()) as f32;
    let mut out = original.to_vec();
    let z = noise(original.len(), seed);
    for (o, z) in out.iter_mut().zip(z) {
        if *o != 0.0 {
            *o += sigma * z;
        }
    }
    out
}

/// The L2 norm, summed in f64.
pub fn l2(v: &[f32]) -> f64 {
    v.iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CODEC: Codec = Codec::TopK {
        chunk: 64,
        k: 8,
        bits: 4,
    };
    const N: usize = 1024;

    /// A sparse update as an honest node's top-k blob decodes to.
    fn honest(seed: u64) -> Vec<f32> {
        let dense = scale(&noise(N, seed), 0.01);
        decode(&encode_crafted(CODEC, &dense), N as u64).unwrap()
    }

    fn cosine(a: &[f32], b: &[f32]) -> f64 {
        let dot: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        dot / (l2(a) * l2(b))
    }

    fn knowledge<'a>(assigned: &'a [u64], unassigned: &'a [u64]) -> Knowledge<'a> {
        Knowledge {
            codec: CODEC,
            params: N,
            assigned,
            unassigned,
            earlier: None,
            committed_before: None,
            partner: None,
            seed: 7,
        }
    }

    fn crafted(s: Submission) -> Vec<f32> {
        match s {
            Submission::Crafted(blob) => decode(&blob, N as u64).unwrap(),
            Submission::AsTrained => panic!("expected a crafted blob"),
        }
    }

    #[test]
    fn every_mode_name_parses_and_displays_back() {
        for name in MODE_NAMES {
            let a: Adversary = name.parse().unwrap();
            let again: Adversary = a.to_string().parse().unwrap();
            assert_eq!(a, again, "{name}");
        }
        assert_eq!("lazy".parse(), Ok(Adversary::Lazy { fraction: 0.5 }));
        assert_eq!("lazy:0.25".parse(), Ok(Adversary::Lazy { fraction: 0.25 }));
        assert_eq!("scale:-3".parse(), Ok(Adversary::Scale { factor: -3.0 }));
        assert_eq!(Adversary::Lazy { fraction: 0.5 }.to_string(), "lazy:0.5");
        assert_eq!(Adversary::Scale { factor: 10.0 }.to_string(), "scale:10");
    }

    #[test]
    fn bad_names_are_refused_with_the_name() {
        for (name, needle) in [
            ("zeros", "unknown mode"),
            ("scale", "expected `scale:K`"),
            ("scale:x", "`x` is not a finite number"),
            ("scale:inf", "not a finite number"),
            ("lazy:1", "must be in (0, 1)"),
            ("lazy:0", "must be in (0, 1)"),
            ("copy:2", "takes no parameter"),
        ] {
            let e = name.parse::<Adversary>().unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{name}`")) && e.contains(needle),
                "{e}"
            );
        }
    }

    #[test]
    fn each_mode_trains_what_its_table_row_says() {
        let assigned = [10, 11, 12, 13, 14];
        let other = [90, 91, 92, 93, 94, 95];
        let k = knowledge(&assigned, &other);
        let plan = |a: &str, k: &Knowledge| a.parse::<Adversary>().unwrap().batches_to_train(k);
        for mode in ["zero", "copy", "copy-noise"] {
            assert_eq!(plan(mode, &k), None, "{mode}");
        }
        for mode in ["noise", "scale:2", "sign-flip", "stale", "collude"] {
            assert_eq!(plan(mode, &k), Some(assigned.to_vec()), "{mode}");
        }
        assert_eq!(plan("wrong-data", &k), Some(vec![90, 91, 92, 93, 94]));
        assert_eq!(plan("lazy", &k), Some(vec![10, 11, 12]));
        assert_eq!(plan("lazy:0.1", &k), Some(vec![10]));
        assert_eq!(plan("lazy:0.99", &k), Some(vec![10, 11, 12, 13]));
        // Once it has something to resubmit or to share, it stops training.
        let earlier = honest(1);
        let with_earlier = Knowledge {
            earlier: Some(&earlier),
            partner: Some(&earlier),
            ..k
        };
        assert_eq!(plan("stale", &with_earlier), None);
        assert_eq!(plan("collude", &with_earlier), None);
    }

    #[test]
    fn pure_modes_craft_the_update_they_promise() {
        let own = honest(1);
        let other = honest(2);
        let (assigned, unassigned) = ([0u64; 5], [1u64; 5]);
        let k = Knowledge {
            committed_before: Some(&other),
            ..knowledge(&assigned, &unassigned)
        };
        let submit =
            |a: &str, k: &Knowledge| crafted(a.parse::<Adversary>().unwrap().submit(k, Some(&own)));

        assert!(submit("zero", &k).iter().all(|v| *v == 0.0));

        let noise = submit("noise", &k);
        let rel = (l2(&noise) - l2(&own)).abs() / l2(&own);
        assert!(rel < 0.05, "noise norm off by {rel}");
        assert!(cosine(&noise, &own).abs() < 0.2);

        let scaled = submit("scale:10", &k);
        assert!((l2(&scaled) / l2(&own) - 10.0).abs() < 0.5);
        assert!(cosine(&scaled, &own) > 0.99);

        let flipped = submit("sign-flip", &k);
        assert!(cosine(&flipped, &own) < -0.99);

        let copy = submit("copy", &k);
        assert!(cosine(&copy, &other) > 0.999);
        let copy_noise = submit("copy-noise", &k);
        let c = cosine(&copy_noise, &other);
        assert!(c > 0.95 && c < 0.9999, "copy-noise cosine {c}");

        // Stale resubmits its earlier update once it has one, and trains first.
        let stale: Adversary = "stale".parse().unwrap();
        assert_eq!(stale.submit(&k, Some(&own)), Submission::AsTrained);
        let later = Knowledge {
            earlier: Some(&own),
            ..k
        };
        assert!(cosine(&crafted(stale.submit(&later, None)), &own) > 0.999);

        // Two colluders hand in the same blob: the first crafts, the second reuses it.
        let collude: Adversary = "collude".parse().unwrap();
        let first = collude.submit(&k, Some(&own));
        let shared = crafted(first.clone());
        assert!(cosine(&shared, &own) < -0.99);
        let second = collude.submit(
            &Knowledge {
                partner: Some(&shared),
                ..k
            },
            None,
        );
        assert_eq!(first, second);

        for mode in ["wrong-data", "lazy"] {
            let a: Adversary = mode.parse().unwrap();
            assert_eq!(a.submit(&k, Some(&own)), Submission::AsTrained);
        }
    }

    #[test]
    fn noise_is_seeded_and_standard_normal() {
        let a = noise(100_000, 3);
        assert_eq!(a, noise(100_000, 3));
        assert_ne!(a, noise(100_000, 4));
        let mean = a.iter().map(|v| f64::from(*v)).sum::<f64>() / a.len() as f64;
        let var = a
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }
}
