//! The binary's promises at its boundary: every preset is listed with its exact size,
//! a small run trains, evaluates and samples, and bad input (invalid UTF-8, corrupt or
//! truncated shards, a missing tokenizer, a checkpoint of the wrong shape, bad flags)
//! ends in a clear error message and exit code 1, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = tessera(args);
    assert!(
        out.status.success(),
        "tessera {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail cleanly and returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = tessera(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "tessera {args:?} should fail with 1:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "tessera {args:?} panicked:\n{stderr}"
    );
    assert!(stderr.lines().any(|l| l.starts_with("error: ")), "{stderr}");
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Prepares a small data set and trains `nano` on it for a few steps.
fn small_run(dir: &Path) -> (PathBuf, PathBuf) {
    let corpus = dir.join("corpus.txt");
    let text = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n";
    std::fs::write(&corpus, text.repeat(80)).unwrap();
    let data = dir.join("data");
    ok(&[
        "data",
        "prepare",
        "--input",
        s(&corpus),
        "--out",
        s(&data),
        "--vocab",
        "300",
    ]);
    let run = dir.join("run");
    ok(&[
        "train",
        "--preset",
        "nano",
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--steps",
        "6",
        "--batch",
        "4",
        "--seq",
        "32",
        "--warmup",
        "2",
        "--eval-every",
        "3",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]);
    (data, run)
}

#[test]
fn model_list_reports_every_preset_within_three_percent() {
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&["model", "list", "--json"])).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["nano", "micro", "small", "500m", "1b", "8b", "70b", "405b", "1.4t"]
    );
    for r in &rows {
        if let Some(dev) = r["deviation_from_name"].as_f64() {
            assert!(dev.abs() <= 0.03, "{r}");
        }
        let params = r["params"].as_u64().unwrap();
        assert_eq!(
            r["training_memory_bytes"]["total"].as_u64().unwrap(),
            12 * params
        );
        assert!(r["flops_per_token"].as_u64().unwrap() > 6 * params / 2);
    }
}

#[test]
fn train_eval_generate_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (_, run) = small_run(dir.path());
    let text = dir.path().join("eval.txt");
    std::fs::write(&text, "Now is the winter of our discontent, 東京 🚀\n").unwrap();
    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--checkpoint",
        s(&run),
        "--text",
        s(&text),
        "--json",
    ]))
    .unwrap();
    let bpb = report["bpb"].as_f64().unwrap();
    assert!(bpb.is_finite() && bpb > 0.0, "{report}");
    // Every byte but those of the first token is predicted.
    let bytes = report["bytes"].as_u64().unwrap();
    assert!(
        bytes > 0 && bytes < std::fs::metadata(&text).unwrap().len(),
        "{report}"
    );
    let sample = ok(&[
        "generate",
        "--checkpoint",
        s(&run),
        "--prompt",
        "Now is",
        "--tokens",
        "12",
        "--seed",
        "3",
    ]);
    assert!(
        sample.starts_with("Now is") && sample.trim().len() > "Now is".len(),
        "{sample}"
    );
    // The same seed gives the same text.
    assert_eq!(
        sample,
        ok(&[
            "generate",
            "--checkpoint",
            s(&run),
            "--prompt",
            "Now is",
            "--tokens",
            "12",
            "--seed",
            "3"
        ])
    );
}

#[test]
fn invalid_utf8_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("latin1.txt");
    std::fs::write(&bad, b"caf\xe9 au lait").unwrap();
    let err = fails(&[
        "data",
        "prepare",
        "--input",
        s(&bad),
        "--out",
        s(&dir.path().join("d")),
    ]);
    assert!(
        err.contains("latin1.txt") && err.contains("not valid UTF-8 at byte 3"),
        "{err}"
    );
}

#[test]
fn corrupt_or_truncated_shards_stop_training_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = small_run(dir.path());
    let shard = data.join("train-00000.bin");
    let good = std::fs::read(&shard).unwrap();
    let train = |out: &str| {
        fails(&[
            "train",
            "--preset",
            "nano",
            "--data",
            s(&data),
            "--out",
            s(&dir.path().join(out)),
            "--steps",
            "2",
            "--batch",
            "2",
            "--seq",
            "32",
            "--device",
            "cpu",
        ])
    };
    std::fs::write(&shard, &good[..good.len() - 7]).unwrap();
    let err = train("a");
    assert!(
        err.contains("train-00000.bin") && err.contains("truncated"),
        "{err}"
    );
    let mut flipped = good.clone();
    flipped[100] ^= 0x40;
    std::fs::write(&shard, &flipped).unwrap();
    let err = train("b");
    assert!(err.contains("corrupt"), "{err}");
    std::fs::write(&shard, &good).unwrap();
    std::fs::remove_file(data.join("tokenizer.json")).unwrap();
    let err = train("c");
    assert!(err.contains("tokenizer.json is missing"), "{err}");
}

#[test]
fn wrong_checkpoints_and_bad_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (data, run) = small_run(dir.path());
    let ckpt = run.join(std::fs::read_to_string(run.join("latest")).unwrap().trim());
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "hello there\n").unwrap();

    // A config.json that disagrees with the weights: the tensor is named.
    let config_path = ckpt.join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&original).unwrap();
    config["intermediate_size"] = serde_json::json!(96);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = fails(&["eval", "--checkpoint", s(&ckpt), "--text", s(&text)]);
    assert!(
        err.contains("mlp.gate_proj.weight") && err.contains("shape"),
        "{err}"
    );
    std::fs::write(&config_path, &original).unwrap();

    std::fs::rename(ckpt.join("tokenizer.json"), dir.path().join("tok.json")).unwrap();
    let err = fails(&["generate", "--checkpoint", s(&ckpt), "--prompt", "hi"]);
    assert!(err.contains("no tokenizer.json"), "{err}");

    let err = fails(&[
        "train",
        "--preset",
        "nano",
        "--data",
        s(&data),
        "--out",
        s(&dir.path().join("x")),
        "--steps",
        "2",
        "--seq",
        "999",
    ]);
    assert!(err.contains("--seq 999 exceeds"), "{err}");
    let err = fails(&[
        "train",
        "--preset",
        "9t",
        "--data",
        s(&data),
        "--out",
        s(&dir.path().join("y")),
        "--steps",
        "2",
    ]);
    assert!(err.contains("unknown preset `9t`"), "{err}");
    let err = fails(&[
        "bench", "train", "--preset", "nano", "--seq", "32", "--device", "tpu",
    ]);
    assert!(err.contains("unknown --device `tpu`"), "{err}");
}

#[test]
fn ledger_commands_work_and_refuse_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("l.db");
    let l = |args: &[&str]| {
        let mut full = vec!["ledger", "--db", s(&db)];
        full.extend_from_slice(args);
        full.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let run_ok = |args: &[&str]| ok(&l(args).iter().map(String::as_str).collect::<Vec<_>>());
    let run_fail = |args: &[&str]| fails(&l(args).iter().map(String::as_str).collect::<Vec<_>>());
    run_ok(&["init", "--unbond-delay-hours", "0"]);
    run_ok(&[
        "--id",
        "s1",
        "sale",
        "--buyer",
        "alice",
        "--tokens",
        "100.5",
        "--treasury-tokens",
        "1000",
        "--proceeds",
        "100 USD",
    ]);
    run_ok(&[
        "--id",
        "f1",
        "fund",
        "--run",
        "r1",
        "--model",
        "m1",
        "--tokens",
        "500",
        "--reward-per-round",
        "10",
    ]);
    let work = dir.path().join("work.json");
    std::fs::write(&work, r#"[{"contributor":"alice","tokens":30,"score_ppm":1000000},{"contributor":"bob","tokens":10,"score_ppm":1000000}]"#).unwrap();
    run_ok(&[
        "--id",
        "p0",
        "payout",
        "--run",
        "r1",
        "--round",
        "0",
        "--work",
        s(&work),
    ]);
    let bal: serde_json::Value =
        serde_json::from_str(&run_ok(&["--json", "balance", "contributor:bob"])).unwrap();
    assert_eq!(bal["tokens"], "2.5");
    run_ok(&[
        "--as",
        "contributor:alice",
        "--id",
        "st",
        "stake",
        "--run",
        "r1",
        "--contributor",
        "alice",
        "--tokens",
        "50",
    ]);
    run_ok(&[
        "--id",
        "ub",
        "unbond",
        "--run",
        "r1",
        "--contributor",
        "alice",
        "--tokens",
        "20",
    ]);
    run_ok(&[
        "--id",
        "rel",
        "release",
        "--run",
        "r1",
        "--contributor",
        "alice",
    ]);
    run_ok(&[
        "--id",
        "sl",
        "slash",
        "--run",
        "r1",
        "--contributor",
        "alice",
        "--fraction",
        "0.5",
        "--reason",
        "audit",
    ]);
    run_ok(&[
        "--id",
        "rev",
        "revenue",
        "--model",
        "m1",
        "--payer",
        "alice",
        "--tokens",
        "10",
        "--reinvest",
        "0.2",
    ]);
    let alice: serde_json::Value =
        serde_json::from_str(&run_ok(&["--json", "balance", "contributor:alice"])).unwrap();
    // 100.5 + 7.5 payout - 50 staked + 20 released - 10 revenue paid + 6 revenue share (3/4 of 8).
    assert_eq!(alice["tokens"], "74");
    let proof = dir.path().join("proof.json");
    std::fs::write(&proof, run_ok(&["--json", "prove", "contributor:alice"])).unwrap();
    assert!(run_ok(&["verify", "--proof", s(&proof)]).contains("valid"));
    assert!(run_ok(&["verify"]).starts_with("clean"));

    let err = run_fail(&[
        "--id",
        "x1",
        "stake",
        "--run",
        "r1",
        "--contributor",
        "bob",
        "--tokens",
        "1000",
    ]);
    assert!(err.contains("overdraft"), "{err}");
    let err = run_fail(&[
        "--id",
        "x2",
        "sale",
        "--buyer",
        "bob",
        "--tokens",
        "1.0000000001",
        "--proceeds",
        "x",
    ]);
    assert!(err.contains("malformed amount"), "{err}");
    let err = run_fail(&[
        "--as",
        "contributor:bob",
        "--id",
        "x3",
        "fund",
        "--run",
        "r1",
        "--model",
        "m1",
        "--tokens",
        "1",
        "--reward-per-round",
        "1",
    ]);
    assert!(err.contains("may not fund a run"), "{err}");
    let err = run_fail(&[
        "--id",
        "s1",
        "sale",
        "--buyer",
        "alice",
        "--tokens",
        "1",
        "--proceeds",
        "x",
    ]);
    assert!(
        err.contains("already used for a different request"),
        "{err}"
    );
    let err = run_fail(&["balance", "contributor:nobody"]);
    assert!(err.contains("unknown account"), "{err}");
    let err = run_fail(&["--as", "contributor:bob", "history", "contributor:alice"]);
    assert!(err.contains("only read its own history"), "{err}");
    // Refusals changed nothing.
    let after: serde_json::Value =
        serde_json::from_str(&run_ok(&["--json", "balance", "contributor:alice"])).unwrap();
    assert_eq!(after, alice);
    assert!(run_ok(&["verify"]).starts_with("clean"));
}

/// `tessera sim --json` has the shape scripts read, replays to the same trace hash, and
/// a sweep reports its seeds; bad options are named.
#[test]
fn sim_reports_its_shape_and_replays() {
    let args = [
        "sim", "--nodes", "30", "--rounds", "3", "--seed", "5", "--churn", "0.2", "--json",
    ];
    let a: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    let b: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    assert!(a["trace_hash"].is_string(), "{a}");
    assert_eq!(a["trace_hash"], b["trace_hash"]);
    assert_eq!(a["invariants_ok"], true);
    assert_eq!(a["nodes"], 30);
    let rounds = a["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    for key in [
        "round_ms",
        "members",
        "accepted",
        "late",
        "dropped",
        "bytes_per_node_mean",
        "bytes_per_node_p99",
        "bytes_per_node_max",
        "hub_cpu_ms",
    ] {
        assert!(rounds[0][key].is_number(), "{key} missing: {}", rounds[0]);
    }
    let sweep = ok(&[
        "sim", "--seeds", "0..4", "--nodes", "8", "--rounds", "3", "--faults",
    ]);
    assert!(
        sweep.contains("4 of 4 seeds held every invariant"),
        "{sweep}"
    );
    assert!(fails(&["sim", "--seeds", "5..1"]).contains("--seeds"));
    assert!(fails(&["sim", "--churn", "2"]).contains("--churn"));
    assert!(fails(&["sim", "--nodes", "100000"]).contains("--nodes"));
}

/// Runs a command that must exit 1 with its refusal on stdout, and returns stdout.
fn refused(args: &[&str]) -> String {
    let out = tessera(args);
    assert_eq!(out.status.code(), Some(1), "tessera {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn attest_verify_checks_real_evidence_offline_and_names_refusals() {
    let t = concat!(env!("CARGO_MANIFEST_DIR"), "/../attest/testdata");
    let quote = format!("{t}/tdx_quote");
    let collateral = format!("{t}/tdx_quote_collateral.json");
    let out = ok(&[
        "attest",
        "verify",
        "--quote",
        &quote,
        "--collateral",
        &collateral,
        "--at",
        "2025-06-20T00:00:00Z",
    ]);
    assert!(
        out.contains("valid: tdx evidence, root intel-sgx-root, TCB UpToDate"),
        "{out}"
    );
    // The SEV-SNP sample (hex) with its VCEK, in JSON, at unix seconds.
    let out = ok(&[
        "attest",
        "verify",
        "--quote",
        &format!("{t}/report_milan.hex"),
        "--collateral",
        &format!("{t}/vcek_milan.der"),
        "--at",
        "1750377600",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["verdict"]["root"], "amd-milan");
    // Expired collateral: exit 1, the rule named.
    let out = refused(&[
        "attest",
        "verify",
        "--quote",
        &quote,
        "--collateral",
        &collateral,
        "--at",
        "2025-08-20",
    ]);
    assert!(out.contains("refused (collateral_time)"), "{out}");
    // A policy that allow-lists another MRTD.
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "types = [\"tdx\"]\ntdx_mrtd = [\"{ab}\"]\ntdx_rtmr = [[\"*\", \"{ab}\", \"{ab}\", \"*\"]]\n",
            ab = "ab".repeat(48)
        ),
    )
    .unwrap();
    let out = refused(&[
        "attest",
        "verify",
        "--quote",
        &quote,
        "--collateral",
        &collateral,
        "--at",
        "2025-06-20T00:00:00Z",
        "--policy",
        s(&policy),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["refusal"]["rule"], "tdx_mrtd", "{v}");
    // Bad input is named.
    let e = fails(&[
        "attest",
        "verify",
        "--quote",
        &quote,
        "--collateral",
        &collateral,
        "--at",
        "soon",
    ]);
    assert!(e.contains("--at"), "{e}");
    // A test PKI's quote verifies under the policy it prints, and is refused without it.
    let seed = dir.path().join("pki.seed");
    let policy_text = ok(&["attest", "test-pki", "--out", s(&seed)]);
    std::fs::write(&policy, &policy_text).unwrap();
    let (q, c) = (dir.path().join("q.bin"), dir.path().join("c.json"));
    ok(&[
        "attest",
        "quote",
        "--attest",
        &format!("test:{}", s(&seed)),
        "--out",
        s(&q),
        "--collateral-out",
        s(&c),
    ]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let out = ok(&[
        "attest",
        "verify",
        "--quote",
        s(&q),
        "--collateral",
        s(&c),
        "--at",
        &now,
        "--policy",
        s(&policy),
    ]);
    assert!(out.contains("root test:"), "{out}");
    let out = refused(&[
        "attest",
        "verify",
        "--quote",
        s(&q),
        "--collateral",
        s(&c),
        "--at",
        &now,
    ]);
    assert!(out.contains("refused (root)"), "{out}");
    let e = fails(&["attest", "test-pki", "--out", s(&seed)]);
    assert!(e.contains("exists"), "{e}");
    // An oversized quote file is refused by its size, before it is read.
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![0u8; 1 << 20]).unwrap();
    let e = fails(&[
        "attest",
        "verify",
        "--quote",
        s(&big),
        "--collateral",
        &collateral,
        "--at",
        "0",
    ]);
    assert!(e.contains("larger than any quote"), "{e}");
}

/// `tessera plan` prints the issue's example as JSON with the keys a script reads.
#[test]
fn plan_prints_the_layout_and_cost_as_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "plan",
            "--preset",
            "1.4t",
            "--nodes",
            "10000",
            "--gpu",
            "h100",
            "--link-mbps",
            "1000",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plan"]["params"], 1_409_558_470_656u64);
    assert_eq!(v["plan"]["training_state_bytes"], 12 * 1_409_558_470_656u64);
    assert_eq!(v["plan"]["stages"], 30);
    assert!(v["plan"]["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(v["assumptions"]["mfu"], 0.4);
    let bad = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["plan", "--preset", "1.4t", "--gpu", "tpu"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown GPU kind `tpu`"));
}

/// `tessera experiment sweep` keeps each row under its settings: a second run of the
/// same grid computes nothing, a row cut short by a kill is computed again on its own
/// line, and the table marks the frontier and the best row near the baseline.
#[test]
fn sweep_resumes_from_its_file_and_prints_the_frontier() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let text = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n";
    std::fs::write(&corpus, text.repeat(80)).unwrap();
    let data = dir.path().join("data");
    ok(&[
        "data",
        "prepare",
        "--input",
        s(&corpus),
        "--out",
        s(&data),
        "--vocab",
        "300",
    ]);
    let out = dir.path().join("sweep.jsonl");
    let sweep = |codecs: &str| {
        tessera(&[
            "experiment",
            "sweep",
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--preset",
            "nano",
            "--steps",
            "4",
            "--batch",
            "2",
            "--seq",
            "32",
            "--warmup",
            "1",
            "--inner-steps",
            "2",
            "--codecs",
            codecs,
            "--device",
            "cpu",
            "--threads",
            "1",
        ])
    };
    let first = sweep("none,topk");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(stderr.contains("3 grid row(s), 0 already in"), "{stderr}");
    let table = String::from_utf8_lossy(&first.stdout);
    assert!(
        table.contains("ddp-equivalent") && table.contains("topk44/4096-4bit"),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with('*')),
        "no frontier row:\n{table}"
    );
    assert!(table.contains("within 3% of the baseline"), "{table}");
    let written = std::fs::read_to_string(&out).unwrap();
    assert_eq!(written.lines().count(), 3);

    // A kill in the middle of writing the last row leaves half a line.
    let last = written.lines().last().unwrap();
    std::fs::write(&out, &written[..written.len() - 1 - last.len() / 2]).unwrap();
    let second = sweep("none,topk");
    assert!(second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("unreadable line(s) [3]"), "{stderr}");
    assert!(stderr.contains("3 grid row(s), 2 already in"), "{stderr}");
    let rewritten = std::fs::read_to_string(&out).unwrap();
    assert_eq!(rewritten.lines().count(), 4);
    // The same row again, to the θ hash (only the time it took differs).
    let timeless = |l: &str| l[..l.find("\"seconds\"").unwrap()].to_string();
    assert_eq!(timeless(rewritten.lines().last().unwrap()), timeless(last));

    // --no-run reports what a larger grid still lacks and computes nothing.
    let mut args = vec![
        "experiment",
        "sweep",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--preset",
        "nano",
        "--steps",
        "4",
        "--batch",
        "2",
        "--seq",
        "32",
        "--warmup",
        "1",
        "--inner-steps",
        "2",
        "--codecs",
        "none,topk,sparseloco",
        "--device",
        "cpu",
        "--threads",
        "1",
    ];
    args.push("--no-run");
    let report = tessera(&args);
    assert!(report.status.success());
    let stderr = String::from_utf8_lossy(&report.stderr);
    assert!(stderr.contains("4 grid row(s), 3 already in"), "{stderr}");
    assert!(
        stderr.contains("unmeasured: sparseloco (topk64/4096-2bit) H=2"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&report.stdout).contains("topk44/4096-4bit"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), rewritten);

    let third = sweep("none,topk");
    assert!(String::from_utf8_lossy(&third.stderr).contains("3 grid row(s), 3 already in"));
    let bad = tessera(&[
        "experiment",
        "sweep",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--codecs",
        "sparse-loco",
    ]);
    // A bad flag is clap's usage error (exit code 2), naming the value.
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown format \"sparse-loco\""));
}
