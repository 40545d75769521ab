//! Every utrace event has a site in each supported kernel, and the site is
//! where the kernel's own System.map puts that function (minimal kernel).

use hvtrace_tests::*;
use serde_json::Value;

const EVENTS: [&str; 15] = [
    "SYSCALL_ENTRY",
    "SYSCALL_EXIT",
    "CLONE",
    "EXEC",
    "EXIT",
    "DEATH",
    "REAP",
    "SIGNAL",
    "SIGNAL_FATAL",
    "JCTL",
    "JCTL_CONTINUE",
    "SIGNAL_TAKEN",
    "QUIESCE",
    "STEP",
    "DOORBELL",
];

fn sites(kernel: &str) -> Value {
    let out = hvtrace(&["sites", "--kernel", kernel, "--json"]);
    assert!(
        out.status.success(),
        "hvtrace sites --kernel {kernel}: {}",
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn every_event_has_a_site_in_every_supported_kernel() {
    for kernel in ["minimal", "debian-6.1", "debian-6.12"] {
        let v = sites(kernel);
        let mut got: Vec<&str> = v["sites"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["event"].as_str().unwrap())
            .collect();
        // QUIESCE lists every function holding a copy of its code.
        got.dedup();
        assert_eq!(got, EVENTS, "{kernel}: {v:#}");
        assert_eq!(v["errors"].as_array().unwrap().len(), 0, "{kernel}");
    }
}

#[test]
fn minimal_kernel_sites_match_its_system_map() {
    let map =
        std::fs::read_to_string(script_path("kernel-config/build.sh", &[]).join("System.map"))
            .unwrap();
    let v = sites("minimal");
    for s in v["sites"].as_array().unwrap() {
        let name = s["symbol"].as_str().unwrap();
        let line = map
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(name))
            .unwrap_or_else(|| panic!("{name} is not in System.map"));
        let mut w = line.split_whitespace();
        let addr = u64::from_str_radix(w.next().unwrap(), 16).unwrap();
        let kind = w.next().unwrap();
        assert!(
            kind == "T" || kind == "t",
            "{name} is a {kind} symbol, not a function"
        );
        assert_eq!(s["addr"].as_u64(), Some(addr), "{name}");
    }
}
