//! `tessera experiment sweep`: rows of the DiLoCo experiment kept in a JSON-lines file,
//! one row per line, each under the settings that produced it (its [`SweepKey`]).
//!
//! The design choice is that a row's settings are its identity: a sweep computes only
//! the grid points whose key is not yet in the file, so a sweep can be killed at any
//! moment and run again with the same (or a larger) grid, and rows measured by earlier
//! sweeps are reused. A line cut short by a kill is skipped on reading (and reported),
//! and the next row starts on a new line. This module is the pure part: parsing,
//! which rows are pending, and the frontier of bytes against bits per byte. Training
//! is [`crate::diloco::run`]; files are the caller's.

use serde::{Deserialize, Serialize};

use crate::data::Manifest;
use crate::diloco::{ExperimentRow, RowSpec};

/// Everything a row's result depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepKey {
    /// The prepared data set: [`data_id`] of its manifest.
    pub data: String,
    pub preset: String,
    /// Inner steps in total (the baseline's global steps).
    pub steps: u64,
    pub workers: usize,
    /// Sequences per worker per step.
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    pub seed: u64,
    pub aggregator: String,
    /// The DiLoCo settings; `None` for the DDP-equivalent baseline.
    pub diloco: Option<DilocoKey>,
}

/// The settings of one DiLoCo row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DilocoKey {
    /// The format's name as the command line gives it (`topk`, `sparseloco`, …).
    pub format: String,
    /// Inner steps per round (H).
    pub inner_steps: u64,
    pub overlap: bool,
    pub row: RowSpec,
}

impl SweepKey {
    /// The key of the baseline these settings are compared with.
    pub fn baseline(&self) -> SweepKey {
        SweepKey {
            diloco: None,
            ..self.clone()
        }
    }

    /// The key as a file gives it back: written and read through the same text, so a
    /// float compares equal to its stored form even where reading a decimal is off by
    /// an ulp (serde_json's default float parsing is not exact). Compare keys from a
    /// file with this.
    pub fn read_back(&self) -> SweepKey {
        serde_json::from_str(&serde_json::to_string(self).expect("a sweep key serializes"))
            .expect("a sweep key reads back")
    }

    /// Whether `other` was trained on the same work (data, model, steps, batch, inner
    /// optimizer, seed, aggregator), whatever its DiLoCo settings.
    pub fn same_work(&self, other: &SweepKey) -> bool {
        self.baseline() == other.baseline()
    }
}

/// One line of a sweep file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepLine {
    pub key: SweepKey,
    pub row: ExperimentRow,
}

impl SweepLine {
    /// A row with its gap to the baseline's bpb (0 for the baseline itself).
    ///
    /// Story: the experiment leaves a row's gap NaN when it ran without its baseline,
    /// JSON writes NaN as `null`, and every DiLoCo row of the first sweep was written
    /// unreadable: the sweep would have recomputed them forever.
    pub fn new(key: SweepKey, mut row: ExperimentRow, baseline_bpb: f64) -> SweepLine {
        row.bpb_gap = if key.diloco.is_none() {
            0.0
        } else {
            (row.val_bpb - baseline_bpb) / baseline_bpb
        };
        SweepLine { key, row }
    }

    /// The line's text, without its newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a sweep line serializes")
    }
}

/// What reading a sweep file found.
#[derive(Debug, Default)]
pub struct Parsed {
    pub lines: Vec<SweepLine>,
    /// 1-based numbers of lines that are not sweep rows (a line cut short by a kill,
    /// or a row of another version); they are skipped, never rewritten.
    pub unreadable: Vec<usize>,
}

/// Reads a sweep file's text. Blank lines are ignored.
pub fn parse(text: &str) -> Parsed {
    let mut out = Parsed::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<SweepLine>(line) {
            Ok(l) => out.lines.push(l),
            Err(_) => out.unreadable.push(i + 1),
        }
    }
    out
}

/// What to write before appending a row to a file holding `text`: a newline when the
/// last line was cut short, so the new row starts a line of its own.
pub fn append_prefix(text: &str) -> &'static str {
    if text.is_empty() || text.ends_with('\n') {
        ""
    } else {
        "\n"
    }
}

/// The grid's keys that no line holds yet, in grid order, each once.
pub fn pending(grid: &[SweepKey], done: &[SweepLine]) -> Vec<SweepKey> {
    let mut out: Vec<SweepKey> = Vec::new();
    for key in grid {
        let read = key.read_back();
        if !done.iter().any(|l| l.key == read) && !out.contains(key) {
            out.push(key.clone());
        }
    }
    out
}

/// Identifies a prepared data set: blake3 over its tokenizer's hash and every shard's
/// hash, in manifest order (16 hex digits). Preparing the same text with the same
/// settings gives the same id wherever it is stored.
pub fn data_id(manifest: &Manifest) -> String {
    let mut h = blake3::Hasher::new();
    h.update(manifest.tokenizer_blake3.as_bytes());
    for shard in manifest.train.iter().chain(&manifest.val) {
        h.update(b"\n");
        h.update(shard.blake3.as_bytes());
    }
    h.finalize().to_hex()[..16].to_string()
}

/// The rows on the frontier of bytes per node against bits per byte: those no other
/// row beats on one without losing on the other. Indices into `rows`, fewest bytes
/// first; of rows with equal bytes and bpb, the first is kept.
pub fn frontier(rows: &[&ExperimentRow]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| {
        rows[a]
            .bytes_per_node
            .cmp(&rows[b].bytes_per_node)
            .then(rows[a].val_bpb.total_cmp(&rows[b].val_bpb))
            .then(a.cmp(&b))
    });
    let mut best = f64::INFINITY;
    let mut out = Vec::new();
    for i in order {
        if rows[i].val_bpb < best {
            best = rows[i].val_bpb;
            out.push(i);
        }
    }
    out
}

/// The row with the largest reduction against DDP among those whose bpb is within
/// `tolerance` (0.03 = 3%) of `baseline_bpb`; ties go to the lower bpb. `None` when no
/// row is that close.
pub fn best_within(rows: &[&ExperimentRow], baseline_bpb: f64, tolerance: f64) -> Option<usize> {
    let limit = baseline_bpb * (1.0 + tolerance);
    (0..rows.len())
        .filter(|&i| rows[i].val_bpb <= limit)
        .max_by(|&a, &b| {
            rows[a]
                .reduction_vs_ddp
                .total_cmp(&rows[b].reduction_vs_ddp)
                .then(rows[b].val_bpb.total_cmp(&rows[a].val_bpb))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outer::Codec;

    fn key(k: u32, lr: f32) -> SweepKey {
        SweepKey {
            data: "d".into(),
            preset: "micro".into(),
            steps: 1000,
            workers: 4,
            batch_size: 8,
            seq_len: 128,
            lr: 3e-3,
            warmup_steps: 25,
            seed: 0,
            aggregator: "clipped_mean".into(),
            diloco: Some(DilocoKey {
                format: "topk".into(),
                inner_steps: 5,
                overlap: false,
                row: RowSpec {
                    label: format!("topk{k}"),
                    codec: Codec::TopK {
                        chunk: 4096,
                        k,
                        bits: 4,
                    },
                    outer_lr: lr,
                    outer_momentum: 0.0,
                    ef_decay: 0.95,
                },
            }),
        }
    }

    fn row(bpb: f64, bytes: u64) -> ExperimentRow {
        let ddp = 1_000_000;
        ExperimentRow {
            name: format!("{bpb}/{bytes}"),
            val_loss: bpb,
            val_bpb: bpb,
            bpb_gap: 0.0,
            bytes_per_node: bytes,
            ddp_bytes_per_node: ddp,
            reduction_vs_ddp: ddp as f64 / bytes as f64,
            rounds: 200,
            theta_hash: "h".into(),
            seconds: 1.0,
        }
    }

    fn line(key: SweepKey, bpb: f64, bytes: u64) -> SweepLine {
        SweepLine {
            key,
            row: row(bpb, bytes),
        }
    }

    #[test]
    fn a_row_in_the_file_is_not_recomputed_and_a_cut_line_is_skipped() {
        let a = key(44, 2.5);
        let b = key(64, 2.5);
        let c = key(44, 1.0);
        let mut text = format!("{}\n", line(a.clone(), 2.6, 100).to_line());
        // A kill mid-write leaves half of b's line.
        let cut = line(b.clone(), 2.7, 50).to_line();
        text.push_str(&cut[..cut.len() / 2]);
        let parsed = parse(&text);
        assert_eq!(parsed.lines.len(), 1);
        assert_eq!(parsed.unreadable, vec![2]);
        // The grid names a twice and the baseline once: a is done, b was cut.
        let grid = [a.clone(), b.clone(), a.baseline(), c.clone(), b.clone()];
        assert_eq!(
            pending(&grid, &parsed.lines),
            vec![b.clone(), a.baseline(), c]
        );
        // Appending b after the cut line starts a new line, and then b is done.
        text.push_str(append_prefix(&text));
        text.push_str(&line(b.clone(), 2.7, 50).to_line());
        text.push('\n');
        let again = parse(&text);
        assert_eq!(again.lines.len(), 2);
        assert_eq!(again.unreadable, vec![2]);
        assert!(pending(&[a, b], &again.lines).is_empty());
        assert_eq!(append_prefix(&text), "");
        assert_eq!(append_prefix(""), "");
    }

    #[test]
    fn keys_differ_in_every_setting_and_share_a_baseline_across_diloco_settings() {
        let a = key(44, 2.5);
        let mut steps = a.clone();
        steps.steps = 2000;
        let mut data = a.clone();
        data.data = "e".into();
        let mut overlap = a.clone();
        overlap.diloco.as_mut().unwrap().overlap = true;
        for other in [&steps, &data, &overlap, &key(64, 2.5), &key(44, 1.0)] {
            assert_ne!(&a, other);
            assert!(pending(std::slice::from_ref(other), &[line(a.clone(), 2.6, 1)]).len() == 1);
        }
        assert!(a.same_work(&key(64, 1.0)) && a.same_work(&overlap) && a.same_work(&a.baseline()));
        assert!(!a.same_work(&steps) && !a.same_work(&data));
        // A key read from a file is the key as `read_back` gives it.
        let l = line(a.clone(), 2.5727, 15_920_999);
        assert_eq!(parse(&l.to_line()).lines[0].key, a.read_back());
        // A row run without its baseline has a NaN gap; its line must still read back.
        let mut lone = row(2.6, 100);
        lone.bpb_gap = f64::NAN;
        let l = SweepLine::new(a.clone(), lone, 2.5);
        assert!((l.row.bpb_gap - 0.04).abs() < 1e-12);
        let back = parse(&l.to_line());
        assert_eq!(back.unreadable, Vec::<usize>::new());
        assert!((back.lines[0].row.bpb_gap - 0.04).abs() < 1e-12);
        assert_eq!(
            SweepLine::new(a.baseline(), row(2.5, 1), 2.4).row.bpb_gap,
            0.0
        );
    }

    #[test]
    fn the_frontier_keeps_rows_no_other_beats_on_both_bytes_and_bpb() {
        let rows = [
            row(2.60, 100), // 0: beaten by 3 (fewer bytes, lower bpb)
            row(2.50, 400), // 1: on the frontier (lowest bpb)
            row(2.70, 20),  // 2: on the frontier (fewest bytes)
            row(2.55, 90),  // 3: on the frontier
            row(2.55, 90),  // 4: a repeat of 3: only the first is kept
            row(2.52, 400), // 5: same bytes as 1, higher bpb
        ];
        let refs: Vec<&ExperimentRow> = rows.iter().collect();
        assert_eq!(frontier(&refs), vec![2, 3, 1]);
        assert!(frontier(&[]).is_empty());
    }

    #[test]
    fn the_best_ratio_within_tolerance_is_the_fewest_bytes_close_enough() {
        let rows = [
            row(2.58, 100), // +3.2% of 2.5: too far
            row(2.57, 200), // +2.8%: within, 5000×
            row(2.51, 400), // within, 2500×
            row(2.56, 200), // within, 5000×, lower bpb than row 1: wins the tie
            row(2.90, 10),  // far
        ];
        let refs: Vec<&ExperimentRow> = rows.iter().collect();
        assert_eq!(best_within(&refs, 2.5, 0.03), Some(3));
        assert_eq!(best_within(&refs, 2.5, 0.001), None);
        assert_eq!(best_within(&refs, 2.5, 0.2), Some(4));
    }
}
