//! Progress display for training: a bar on a terminal, periodic lines otherwise
//! (logs, CI, the demo's child processes).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tessera_train::Event;

/// How often a line is printed when stderr is not a terminal.
const LINE_INTERVAL: Duration = Duration::from_secs(15);

pub struct TrainProgress {
    bar: Option<ProgressBar>,
    last_line: Instant,
    last_eval: String,
}

impl TrainProgress {
    pub fn new() -> TrainProgress {
        TrainProgress {
            bar: None,
            last_line: Instant::now(),
            last_eval: String::new(),
        }
    }

    fn bar(&mut self, total: u64) -> Option<&ProgressBar> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::new(total.max(1));
            bar.set_style(
                ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len} {msg} ETA {eta}")
                    .expect("valid template"),
            );
            bar
        });
        if total > 0 && bar.length() != Some(total) {
            bar.set_length(total);
        }
        Some(bar)
    }

    pub fn on_event(&mut self, event: &Event) {
        match event {
            Event::Started {
                resumed_from,
                total_steps,
                params,
            } => {
                match resumed_from {
                    Some(step) => eprintln!("resuming from step {step}"),
                    None => eprintln!("starting: {params} parameters"),
                }
                if *total_steps == 0 {
                    eprintln!("timing the first steps to turn the minute budget into a step count");
                }
            }
            Event::Step {
                step,
                total_steps,
                loss,
                lr,
                tokens_per_second,
            } => {
                let msg = format!(
                    "loss {loss:.4} lr {lr:.2e} {tokens_per_second:.0} tok/s{}",
                    self.last_eval
                );
                if let Some(bar) = self.bar(*total_steps) {
                    bar.set_position(*step);
                    bar.set_message(msg);
                } else if self.last_line.elapsed() >= LINE_INTERVAL || step == total_steps {
                    self.last_line = Instant::now();
                    let total = if *total_steps == 0 {
                        "?".to_string()
                    } else {
                        total_steps.to_string()
                    };
                    eprintln!("step {step}/{total} {msg}");
                }
            }
            Event::Eval { step, result } => {
                self.last_eval = format!(" val bpb {:.3}", result.bpb);
                let line = format!(
                    "step {step}: validation loss {:.4}, {:.4} bits per byte",
                    result.loss, result.bpb
                );
                match &self.bar {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
            }
            Event::Checkpoint { .. } => {}
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
