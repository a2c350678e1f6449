//! `tessera experiment byzantine` at its boundary: the JSON has one row per honest
//! reference and per mode with every field, copiers and free riders are caught, unpaid
//! and ejected (a free rider by the replay its refused update gets) without touching an
//! honest node, a row whose adversaries are all refused ends at the honest-only
//! reference's θ bit for bit (aggregation in node order, the training memo exact), and
//! a row does not depend on how many workers train at once (each runs libtorch on one
//! thread).

use std::path::Path;
use std::process::Command;

fn tessera(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tessera {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn data(dir: &Path) -> String {
    let corpus = dir.join("corpus.txt");
    let text = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n\
                And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n";
    std::fs::write(&corpus, text.repeat(60)).unwrap();
    let data = dir.join("data");
    let (c, d) = (corpus.to_str().unwrap(), data.to_str().unwrap());
    tessera(&[
        "data", "prepare", "--input", c, "--out", d, "--vocab", "300",
    ]);
    d.to_string()
}

fn run(data: &str, threads: &str) -> serde_json::Value {
    let out = tessera(&[
        "experiment",
        "byzantine",
        "--data",
        data,
        "--preset",
        "nano",
        "--batch",
        "2",
        "--seq",
        "32",
        "--rounds",
        "2",
        "--modes",
        "copy,zero",
        "--json",
        "--device",
        "cpu",
        "--threads",
        threads,
    ]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn rows_catch_copies_and_free_riders_and_do_not_depend_on_threads() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let two = run(&data, "2");
    let rows = two["rows"].as_array().unwrap();
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["honest-8", "honest-6", "copy", "zero"]);
    for r in rows {
        for field in [
            "caught_fraction",
            "rounds_to_eject",
            "honest_downweighted_fraction",
            "adversary_payout_share",
            "bpb_gap",
            "verification_flops_fraction",
            "seconds",
        ] {
            assert!(r.get(field).is_some(), "{field} missing in {r}");
        }
        assert_eq!(r["honest_slashed"], 0, "{r}");
        assert!(r["verification_flops_fraction"].as_f64().unwrap() > 0.0);
    }
    assert!(rows[0]["caught_fraction"].is_null());
    assert_eq!(rows[0]["bpb_gap"], 0.0);
    for r in &rows[2..] {
        assert_eq!(r["adversary_updates"].as_u64(), Some(2));
        assert_eq!(r["caught_fraction"], 1.0, "{r}");
        assert_eq!(r["adversary_payout_share"], 0.0, "{r}");
    }
    // Copiers are ejected in the round they copy; so are free riders: a zero update is
    // refused on its norm, and every update refused on a measurement is replayed.
    for r in &rows[2..] {
        assert_eq!(r["rounds_to_eject"], 1, "{r}");
        assert_eq!(r["adversaries_ejected"], 2, "{r}");
    }
    for r in &rows[2..] {
        assert_eq!(r["val_bpb"], rows[1]["val_bpb"], "{r}");
        assert!(r["rounds_memoized"].as_u64().unwrap() > 0, "{r}");
    }

    let one = run(&data, "1");
    for (a, b) in rows.iter().zip(one["rows"].as_array().unwrap()) {
        assert_eq!(
            a["val_bpb"], b["val_bpb"],
            "{} differs by thread count",
            a["mode"]
        );
    }
}
