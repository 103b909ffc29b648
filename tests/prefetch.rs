//! The prefetch harness and trace tools through the real `meshfs` binary:
//! `meshfs trace gen` and `meshfs prefetch-eval` on a generated trace, and
//! clear errors on bad input.

use std::process::Command;

fn meshfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshfs"))
}

#[test]
fn harness_scores_every_predictor_on_a_generated_trace() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("routine.jsonl");
    let out = meshfs()
        .args(["trace", "gen", "routine", "--events", "1500", "--seed", "4"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&trace, &out.stdout).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1500);

    let out = meshfs()
        .args(["prefetch-eval", "--trace"])
        .arg(&trace)
        .args(["--cache-mb", "8", "--top", "3", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["predictor"] == name)
            .unwrap_or_else(|| panic!("no row for {name}: {rows:?}"))
            .clone()
    };
    for name in [
        "last-successor",
        "markov",
        "markov-2",
        "markov-8",
        "gru",
        "gru+markov",
        "selector",
    ] {
        let r = row(name);
        for k in ["top1", "top5", "local_hit_rate"] {
            let v = r[k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{name}.{k} = {v}");
        }
        assert!(r["wasted_bytes"].as_u64().is_some(), "{name}");
        assert!(r["top5"].as_f64() >= r["top1"].as_f64(), "{name}");
    }
    // The routine repeats daily with noise: context beats the last resource
    // alone, and the GRU learns it within 1,500 events.
    let top1 = |name: &str| row(name)["top1"].as_f64().unwrap();
    assert!(top1("markov-2") > top1("last-successor"), "{rows:?}");
    assert!(top1("gru") > 0.5, "{rows:?}");
    assert!(
        row("markov")["local_hit_rate"].as_f64().unwrap() > 0.5,
        "{rows:?}"
    );

    // The table form names the same predictors.
    let out = meshfs()
        .args(["prefetch-eval", "--no-learned", "--trace"])
        .arg(&trace)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("markov-8") && text.contains("1500 events"),
        "{text}"
    );
}

#[test]
fn bad_traces_and_arguments_get_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("bad.jsonl");
    std::fs::write(
        &trace,
        "{\"ts_ms\":1,\"device\":\"a\",\"user\":\"u\",\"path\":\"/p\",\"size\":1}\n{\"ts_ms\":\n",
    )
    .unwrap();
    let out = meshfs()
        .args(["prefetch-eval", "--trace"])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.lines().count() == 1, "{err}");

    let out = meshfs()
        .args(["prefetch-eval", "--trace", "/nonexistent/trace"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open trace"));

    std::fs::write(&trace, "\n").unwrap();
    let out = meshfs()
        .args(["prefetch-eval", "--trace"])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no events"));

    let out = meshfs().args(["trace", "gen", "nosuch"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown workload"));

    let out = meshfs()
        .args(["prefetch-eval", "--trace", "x", "--top", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap refuses --top 0");
}
