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
    if let Some(u) = v["metrics_url"].as_str() {
        println!("metrics:    {u}");
    }
    if let Some(u) = v["dashboard_url"].as_str() {
        println!("dashboard:  {u}");
    }
    for p in v["pins"].as_array().into_iter().flatten() {
        println!(
            "pinned:     {} ({} of {} bytes here)",
            p["path"].as_str().unwrap_or("?"),
            p["bytes_here"],
            p["bytes_total"]
        );
    }
    print_catch_up(&v["catch_up"]);
    println!(
        "files:      {} inodes, {} commits",
        v["inodes"], v["commits"]
    );
    println!(
        "cache:      {} bytes in {} chunks",
        v["cache_bytes"], v["chunks"]
    );
    let p = &v["passthrough"];
    if p.is_object() {
        println!(
            "passthrough: {}; {} copies, {} bytes; {} opens by passthrough, {} through the daemon",
            if p["enabled"].as_bool().unwrap_or(false) {
                "on"
            } else {
                "off"
            },
            p["backing_files"],
            p["backing_bytes"],
            p["opens_passthrough"],
            p["opens_cached"]
        );
    }
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
        if let Some(why) = r["stopped"].as_str() {
            println!("            RAFT STOPPED on this device: {why}");
            println!("            changes are refused (EIO); fix the cause and restart the daemon");
        }
        let c = &r["changes"];
        if c.is_object() {
            println!(
                "changes:    {} applied here, {} forwarded, {} through raft; {} waiting to commit{}",
                c["applied_here"],
                c["forwarded"],
                c["through_raft"],
                c["pending"],
                match c["conflicts"].as_u64() {
                    Some(n) if n > 0 => format!(", {n} refused at commit (reintegrated)"),
                    _ => String::new(),
                }
            );
            let t = &c["tentative"];
            if t.is_object() {
                let waiting = t["waiting"].as_u64().unwrap_or(0);
                let conflicts = t["conflicts"].as_u64().unwrap_or(0);
                if waiting > 0 || conflicts > 0 || t["made"].as_u64().unwrap_or(0) > 0 {
                    println!(
                        "tentative:  {waiting} waiting for their authority{}; {} made, {} reintegrated; {conflicts} conflicts{}",
                        match t["since"].as_i64() {
                            Some(s) if waiting > 0 => format!(" since {}", utc(s)),
                            _ => String::new(),
                        },
                        t["made"],
                        t["reintegrated"],
                        if conflicts > 0 { " (meshfs conflicts)" } else { "" }
                    );
                }
            }
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

/// `meshfs conflicts`: one line per conflict, oldest first.
#[allow(dead_code)]
pub fn print_conflicts(v: &serde_json::Value) {
    let list = v["conflicts"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no conflicts");
    }
    for c in &list {
        println!(
            "{}  {:<13} {}{}\n    {}",
            utc(c["made"].as_i64().unwrap_or(0)),
            c["kind"].as_str().unwrap_or("?"),
            c["path"].as_str().unwrap_or("?"),
            match c["kept_as"].as_str() {
                Some(k) => format!("  (this device's version: {k})"),
                None => String::new(),
            },
            c["detail"].as_str().unwrap_or("")
        );
    }
    if v["cleared"].as_bool().unwrap_or(false) {
        println!("({} cleared)", list.len());
    }
}

/// `meshfs versions`: the file there now, then the removed ones.
pub fn print_versions(v: &serde_json::Value) {
    let path = v["path"].as_str().unwrap_or("?");
    for f in v["files"].as_array().cloned().unwrap_or_default() {
        match f["deleted"].as_object() {
            None => println!("{path} (resource {})", f["resource"]),
            Some(d) => println!(
                "{path}, removed {} by {} (resource {}; restore with --deleted {})",
                utc(d.get("time").and_then(|t| t.as_i64()).unwrap_or(0)),
                d.get("by").and_then(|b| b.as_str()).unwrap_or("?"),
                f["resource"],
                f["resource"]
            ),
        }
        let rows = f["versions"].as_array().cloned().unwrap_or_default();
        if rows.is_empty() {
            println!("  (no content kept)");
        }
        for r in rows {
            let hash = r["hash"].as_str().unwrap_or("");
            println!(
                "  {:>6}  {}  {:>12}  {:<16}  {}{}",
                r["version"],
                utc(r["time"].as_i64().unwrap_or(0)),
                r["size"],
                r["author"].as_str().unwrap_or("?"),
                &hash[..hash.len().min(16)],
                if r["current"].as_bool().unwrap_or(false) {
                    "  (current)"
                } else {
                    ""
                }
            );
        }
    }
}

/// A Unix time as `YYYY-mm-dd HH:MM:SS UTC`.
fn utc(secs: i64) -> String {
    let (y, m, d, h, mi, s) = crate::civil::civil(secs);
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

/// `meshfs pins`: one line per pinned tree, and catch-up.
pub fn print_pins(v: &serde_json::Value) {
    let mib = |x: &serde_json::Value| x.as_u64().unwrap_or(0) as f64 / 1048576.0;
    let list = v["pins"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no pins");
    }
    for p in &list {
        let state = if !p["present"].as_bool().unwrap_or(true) {
            "gone from the namespace".to_string()
        } else if p["complete"].as_bool().unwrap_or(false) {
            "here".to_string()
        } else {
            "fetching".to_string()
        };
        println!(
            "{}  {} files, {:.1} of {:.1} MiB here ({})",
            p["path"].as_str().unwrap_or("?"),
            p["files"],
            mib(&p["bytes_here"]),
            mib(&p["bytes_total"]),
            state
        );
    }
    print_catch_up(&v["catch_up"]);
}

/// The replication backlog line (nothing when there is none).
fn print_catch_up(c: &serde_json::Value) {
    let missing = c["missing_bytes"].as_u64().unwrap_or(0);
    if missing > 0 {
        let fetched = c["fetched_bytes"].as_u64().unwrap_or(0).min(missing);
        println!(
            "catch-up:   {:.1} of {:.1} MiB fetched for {} files this device should hold",
            fetched as f64 / 1048576.0,
            missing as f64 / 1048576.0,
            c["missing_files"]
        );
    }
}
