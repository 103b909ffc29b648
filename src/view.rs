//! How `meshfs status` and `meshfs stat` show their JSON to people. Shared
//! by both binaries (`meshfsd`, and the thin `meshfs` that answers these two
//! without loading the daemon's libraries), so it uses nothing of the
//! meshfs library: only the JSON the daemon sends.

/// `meshfs stat` for people: one line per fact.
pub fn print_stat(path: &std::path::Path, v: &serde_json::Value) {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    println!(
        "{}: {} r{}, {} bytes, version {}",
        path.display(),
        s("kind"),
        v["resource"],
        v["size"],
        v["version"]
    );
    println!(
        "  authority: {} (epoch {}){}",
        v["authority"]["name"].as_str().unwrap_or("?"),
        v["epoch"],
        match v["pending_changes"].as_u64() {
            Some(n) if n > 0 => format!(", {n} change(s) here not yet committed"),
            _ => String::new(),
        }
    );
    let holders: Vec<&str> = v["holders"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h.as_str())
        .collect();
    if !holders.is_empty() {
        println!("  holders: {}", holders.join(", "));
    }
    println!(
        "  temperature: {:.2}",
        v["temperature"].as_f64().unwrap_or(0.0)
    );
    for r in v["reputation"].as_array().into_iter().flatten() {
        println!(
            "  reputation {}: {:.2} (usage {:.2} x quality {:.2} x uptime {:.2})",
            r["device"].as_str().unwrap_or("?"),
            r["score"].as_f64().unwrap_or(0.0),
            r["usage"].as_f64().unwrap_or(0.0),
            r["quality"].as_f64().unwrap_or(0.0),
            r["uptime"].as_f64().unwrap_or(0.0),
        );
    }
    for q in v["quality"].as_array().into_iter().flatten() {
        println!(
            "  quality {}: {:.2}{} (bad chunks {}, failed requests {})",
            q["device"].as_str().unwrap_or("?"),
            q["factor"].as_f64().unwrap_or(0.0),
            if q["up"] == true { "" } else { ", down" },
            q["chunks_bad"],
            q["requests_failed"],
        );
    }
    for p in v["proximity"].as_array().into_iter().flatten() {
        println!(
            "  proximity to {}: {:.3} (rtt {} ms)",
            p["device"].as_str().unwrap_or("?"),
            p["weight"].as_f64().unwrap_or(0.0),
            p["rtt_ms"]
                .as_f64()
                .map_or("?".into(), |r| format!("{r:.2}")),
        );
    }
}

/// `meshfs status` for people.
pub fn print_status(v: &serde_json::Value) {
    let running = v["running"].as_bool().unwrap_or(false);
    println!(
        "device:     {} ({})",
        v["name"].as_str().unwrap_or("?"),
        v["id"].as_str().unwrap_or("?")
    );
    if !running {
        println!("state:      not running");
        return;
    }
    println!(
        "state:      running, pid {}, up {} s",
        v["pid"], v["uptime_s"]
    );
    println!("mountpoint: {}", v["mountpoint"].as_str().unwrap_or("?"));
    println!(
        "files:      {} inodes, {} commits",
        v["inodes"], v["commits"]
    );
    println!(
        "cache:      {} bytes in {} chunks",
        v["cache_bytes"], v["chunks"]
    );
    let r = &v["raft"];
    if r.is_object() {
        let names = |k: &str| {
            r[k].as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "raft:       leader {}, term {}; this device is {}, applied index {}{}",
            r["leader"].as_str().unwrap_or("none"),
            r["term"],
            r["state"].as_str().unwrap_or("?"),
            r["applied_index"],
            if r["degraded"].as_bool().unwrap_or(false) {
                " - DEGRADED: no quorum; changes to what other devices govern and fsync fail"
            } else {
                ""
            }
        );
        let c = &r["changes"];
        if c.is_object() {
            println!(
                "changes:    {} applied here, {} forwarded, {} through raft; {} waiting to commit{}",
                c["applied_here"],
                c["forwarded"],
                c["through_raft"],
                c["pending"],
                match c["conflicts"].as_u64() {
                    Some(n) if n > 0 => format!(", {n} refused at commit (conflicts, see the log)"),
                    _ => String::new(),
                }
            );
        }
        println!("voters:     {}", names("voters"));
        let learners = names("learners");
        if !learners.is_empty() {
            println!("learners:   {learners}");
        }
    }
    for d in v["devices"].as_array().into_iter().flatten() {
        let rtt = d["rtt_ms"]
            .as_f64()
            .map(|r| format!("{r:.2} ms"))
            .unwrap_or_else(|| "-".into());
        println!(
            "device:     {:<16} {:<5} rtt {:<10} holds {} files, load {}% cpu, {} transfers",
            d["name"].as_str().unwrap_or("?"),
            if d["up"].as_bool().unwrap_or(false) {
                "up"
            } else {
                "down"
            },
            rtt,
            d["holdings"],
            d["load"]["cpu_percent"],
            d["load"]["active_transfers"],
        );
    }
}
