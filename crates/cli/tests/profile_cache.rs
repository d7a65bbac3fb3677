//! The profile cache on a real guest: a first attach derives everything and writes the cache,
//! a second takes it from the cache after checking it against the guest and answers the same;
//! a cache file edited behind our back is noticed and not used.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{BootedGuest, Run};
use serde_json::Value;

fn ms(value: &Value) -> f64 {
    value["secs"].as_f64().unwrap_or(0.0) * 1e3 + value["nanos"].as_f64().unwrap_or(0.0) / 1e6
}

/// `info --json` with the cache in `dir`: the report and the wall time of the whole command.
fn info(guest: &BootedGuest, dir: &Path) -> (Value, Duration) {
    let started = Instant::now();
    let run = guest
        .run(&[
            "--profile-cache",
            dir.to_str().expect("utf-8 path"),
            "--json",
            "info",
        ])
        .ok();
    (run.json(), started.elapsed())
}

fn symbols(guest: &BootedGuest, dir: &Path) -> Run {
    guest
        .run(&[
            "--profile-cache",
            dir.to_str().expect("utf-8 path"),
            "symbols",
        ])
        .ok()
}

fn steps_total(info: &Value) -> f64 {
    info["provenance"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| ms(&s["duration"]))
        .sum()
}

fn report(label: &str, info: &Value, wall: Duration) {
    let cache = &info["profile_cache"];
    eprintln!(
        "{label}: discovery {:.1} ms (steps), `info` {:.0} ms wall; symbols {}, types {}, \
         VMCOREINFO remembered: {}",
        steps_total(info),
        wall.as_secs_f64() * 1e3,
        describe(&cache["symbols"]),
        describe(&cache["types"]),
        cache["vmcoreinfo_remembered"]
    );
    for step in info["provenance"]["steps"].as_array().expect("steps") {
        eprintln!(
            "    {:<24} {:>8.2} ms  {}",
            step["name"].as_str().unwrap_or("?"),
            ms(&step["duration"]),
            step["detail"].as_str().unwrap_or("")
        );
    }
}

fn describe(outcome: &Value) -> String {
    match outcome["outcome"].as_str() {
        Some("hit") => format!(
            "hit (entry read {:.2} ms, guest bytes checked {:.2} ms)",
            ms(&outcome["load"]),
            ms(&outcome["validate"])
        ),
        Some("miss") => format!(
            "miss ({}; written: {})",
            outcome["reason"].as_str().unwrap_or("?"),
            outcome["stored"]
        ),
        other => format!("{other:?}"),
    }
}

fn outcome(info: &Value, part: &str) -> String {
    info["profile_cache"][part]["outcome"]
        .as_str()
        .unwrap_or_else(|| panic!("no {part} outcome: {info}"))
        .to_string()
}

#[test]
fn second_attach_uses_the_checked_cache_and_edits_are_noticed() {
    let guest = BootedGuest::boot(&[]);
    let dir = guest.path("profiles");

    let (miss, miss_wall) = info(&guest, &dir);
    report("first attach (miss)", &miss, miss_wall);
    assert_eq!(outcome(&miss, "symbols"), "miss", "{miss}");
    assert_eq!(miss["profile_cache"]["symbols"]["stored"], true, "{miss}");
    assert_eq!(outcome(&miss, "types"), "miss", "{miss}");
    assert_eq!(miss["profile_cache"]["types"]["stored"], true, "{miss}");
    let build_id = miss["build_id"].as_str().expect("a build id").to_string();
    let file = dir.join(format!("{build_id}.symbols"));
    assert!(file.is_file(), "{}", file.display());

    let (hit, hit_wall) = info(&guest, &dir);
    report("second attach (hit)", &hit, hit_wall);
    assert_eq!(outcome(&hit, "symbols"), "hit", "{hit}");
    assert_eq!(outcome(&hit, "types"), "hit", "{hit}");
    assert_eq!(hit["profile_cache"]["vmcoreinfo_remembered"], true, "{hit}");
    assert_eq!(
        hit["provenance"]["vmcoreinfo"]["kind"], "remembered",
        "{hit}"
    );
    for key in [
        "release",
        "build_id",
        "kaslr_offset",
        "page_table_root",
        "symbols",
        "btf_types",
    ] {
        assert_eq!(miss[key], hit[key], "{key}");
    }
    assert!(
        steps_total(&hit) < steps_total(&miss),
        "the hit is not faster"
    );

    // The same symbols, every one: from a fresh decode and from the cache.
    let uncached = guest.run(&["--no-profile-cache", "symbols"]).ok().stdout;
    let from_cache = symbols(&guest, &dir).stdout;
    assert!(uncached.lines().count() > 50_000, "{}", uncached.len());
    assert!(
        uncached == from_cache,
        "symbols differ between a fresh decode and the cache"
    );

    // Rename a symbol inside the cache file (without fixing its checksum): not used.
    let mut bytes = std::fs::read(&file).expect("cache file");
    let at = bytes
        .windows(12)
        .position(|w| w == b"start_kernel")
        .expect("start_kernel in the cache file");
    bytes[at] = b'S';
    std::fs::write(&file, &bytes).expect("rewriting the cache file");
    let (edited, edited_wall) = info(&guest, &dir);
    report("after editing the cache file", &edited, edited_wall);
    assert_eq!(outcome(&edited, "symbols"), "miss", "{edited}");
    let reason = edited["profile_cache"]["symbols"]["reason"]
        .as_str()
        .unwrap_or("");
    assert!(reason.contains("checksum"), "{reason}");
    // ...and rewritten: the next attach is a hit again, with the true names.
    let (again, _) = info(&guest, &dir);
    assert_eq!(outcome(&again, "symbols"), "hit", "{again}");
    let after = symbols(&guest, &dir).stdout;
    assert!(
        after == uncached,
        "symbols differ after the cache was rewritten"
    );
    assert!(after.contains(" start_kernel\n"));
    assert!(!after.contains("Start_kernel"));

    // Text output says where the profile came from.
    let text = guest
        .run(&["--profile-cache", dir.to_str().expect("utf-8"), "info"])
        .ok()
        .stdout;
    assert!(text.contains("from the cache"), "{text}");

    // Off: no report. Unwritable: a warning, not an error.
    let off = guest
        .run(&["--no-profile-cache", "--json", "info"])
        .ok()
        .json();
    assert!(off["profile_cache"].is_null(), "{off}");
    let blocker = guest.path("not-a-dir");
    std::fs::write(&blocker, b"").expect("blocker file");
    let unwritable = guest
        .run(&[
            "--profile-cache",
            blocker.join("profiles").to_str().expect("utf-8"),
            "info",
        ])
        .ok();
    assert!(
        unwritable
            .stderr
            .contains("kvmaccess: warning: profile cache not written"),
        "{}",
        unwritable.stderr
    );
    assert!(
        !unwritable.stderr.contains("kvmaccess: error:"),
        "{}",
        unwritable.stderr
    );
}
