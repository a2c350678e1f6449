//! The Prometheus text exposition format (version 0.0.4), written and checked.
//!
//! [`Exposition`] writes each metric's `# HELP` and `# TYPE` once before its samples,
//! escapes label values, and writes non-finite values as Prometheus spells them.
//! [`check`] is a strict reader of the same format, used by the tests to hold
//! `/metrics` to the naming conventions (`tessera_` prefix, `_total` on counters and
//! only on counters, units in names, no series twice).

use std::collections::BTreeSet;
use std::fmt::Write;

/// Labels of one sample and its value.
pub type Sample = (Vec<(&'static str, String)>, f64);

#[derive(Default)]
pub struct Exposition {
    out: String,
}

fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str, samples: &[Sample]) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(self.out, "{name} {}", value(*v));
            } else {
                let l: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                let _ = writeln!(self.out, "{name}{{{}}} {}", l.join(","), value(*v));
            }
        }
    }

    pub fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.family(name, "gauge", help, &[(vec![], v)]);
    }

    pub fn counter(&mut self, name: &str, help: &str, v: f64) {
        self.family(name, "counter", help, &[(vec![], v)]);
    }

    pub fn gauge_labelled(&mut self, name: &str, help: &str, samples: &[Sample]) {
        self.family(name, "gauge", help, samples);
    }

    pub fn counter_labelled(&mut self, name: &str, help: &str, samples: &[Sample]) {
        self.family(name, "counter", help, samples);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// Checks `text` as a Prometheus exposition and Tessera's conventions; returns the
/// metric names it declares, or the first problem found with its line.
pub fn check(text: &str) -> Result<BTreeSet<String>, String> {
    let mut declared: BTreeSet<String> = BTreeSet::new();
    let mut series: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<(String, String)> = None; // (name, type)
    let mut helped: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let at = |why: &str| format!("line {}: {why}: {line}", i + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest
                .split_once(' ')
                .ok_or_else(|| at("HELP without text"))?;
            if help.trim().is_empty() {
                return Err(at("empty HELP"));
            }
            helped = Some(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| at("TYPE without a type"))?;
            if helped.as_deref() != Some(name) {
                return Err(at("TYPE not right after its HELP"));
            }
            if !is_name(name) || !name.starts_with("tessera_") {
                return Err(at("name outside tessera_[a-z0-9_]"));
            }
            if !declared.insert(name.to_string()) {
                return Err(at("metric declared twice"));
            }
            match kind {
                "counter" if !name.ends_with("_total") => {
                    return Err(at("a counter's name must end in _total"))
                }
                "gauge" if name.ends_with("_total") => {
                    return Err(at("only counters end in _total"))
                }
                "counter" | "gauge" => {}
                _ => return Err(at("type other than counter or gauge")),
            }
            current = Some((name.to_string(), kind.to_string()));
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            return Err(at("unexpected comment or blank line"));
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(p) => line.split_at(p),
            None => return Err(at("a sample without a value")),
        };
        let Some((family, kind)) = &current else {
            return Err(at("sample before any TYPE"));
        };
        if name != family {
            return Err(at("sample of another metric than the last TYPE"));
        }
        let (labels, v) = if let Some(r) = rest.strip_prefix('{') {
            let close = r.rfind("} ").ok_or_else(|| at("unclosed labels"))?;
            (&r[..close], &r[close + 2..])
        } else {
            ("", rest.trim_start())
        };
        let mut names = BTreeSet::new();
        let mut l = labels;
        while !l.is_empty() {
            let (k, r) = l
                .split_once("=\"")
                .ok_or_else(|| at("label without a value"))?;
            if !is_name(k) || k.starts_with("__") || !names.insert(k) {
                return Err(at("bad or repeated label name"));
            }
            let mut end = None;
            let mut esc = false;
            for (j, ch) in r.char_indices() {
                match (esc, ch) {
                    (true, '\\' | '"' | 'n') => esc = false,
                    (true, _) => return Err(at("bad escape in a label value")),
                    (false, '\\') => esc = true,
                    (false, '"') => {
                        end = Some(j);
                        break;
                    }
                    (false, '\n') => return Err(at("newline in a label value")),
                    _ => {}
                }
            }
            let end = end.ok_or_else(|| at("unterminated label value"))?;
            l = &r[end + 1..];
            l = match l.strip_prefix(',') {
                Some(x) => x,
                None if l.is_empty() => l,
                None => return Err(at("labels not separated by commas")),
            };
        }
        let v: f64 = match v {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse().map_err(|_| at("value is not a number"))?,
        };
        if kind == "counter" && (v.is_nan() || v < 0.0) {
            return Err(at("a counter below zero or not a number"));
        }
        if !series.insert(format!("{name}{{{labels}}}")) {
            return Err(at("series twice"));
        }
    }
    Ok(declared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_it_writes_it_reads_back() {
        let mut m = Exposition::default();
        m.counter("tessera_x_total", "X.", 3.0);
        m.gauge_labelled(
            "tessera_y_ratio",
            "Y.",
            &[
                (vec![("node", "a\"b\\c\nd".into())], 0.5),
                (vec![("node", "e".into())], f64::NAN),
            ],
        );
        let text = m.finish();
        let names = check(&text).unwrap();
        assert_eq!(names.len(), 2, "{text}");
    }

    #[test]
    fn the_checker_refuses_what_breaks_the_conventions() {
        let bad = [
            "# HELP tessera_x X.\n# TYPE tessera_x counter\ntessera_x 1\n",
            "# HELP tessera_x_total X.\n# TYPE tessera_x_total gauge\ntessera_x_total 1\n",
            "# HELP other X.\n# TYPE other gauge\nother 1\n",
            "# TYPE tessera_x gauge\ntessera_x 1\n",
            "# HELP tessera_x X.\n# TYPE tessera_x gauge\ntessera_x 1\ntessera_x 2\n",
            "# HELP tessera_x X.\n# TYPE tessera_x gauge\ntessera_x{a=\"1\",a=\"2\"} 1\n",
            "# HELP tessera_x X.\n# TYPE tessera_x gauge\ntessera_x{a=\"1} 1\n",
            "# HELP tessera_x X.\n# TYPE tessera_x gauge\ntessera_y 1\n",
            "# HELP tessera_x_total X.\n# TYPE tessera_x_total counter\ntessera_x_total -1\n",
            "# HELP tessera_x X.\n# TYPE tessera_x gauge\ntessera_x one\n",
        ];
        for text in bad {
            assert!(check(text).is_err(), "accepted: {text}");
        }
    }
}
