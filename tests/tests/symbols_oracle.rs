//! Symbols hvtrace recovers from Debian's stripped kernels equal what an
//! independent tool recovers from the same image: `kallsyms-finder` of
//! vmlinux-to-elf (installed by scripts/python-tools.sh), run on the payload
//! the kernel's own `scripts/extract-vmlinux` unpacks. hvtrace reads the
//! vmlinuz itself (its own decompressor and kallsyms decoder).

use std::path::Path;
use std::process::Command;

use hvtrace_tests::*;

/// The kernel's scripts/extract-vmlinux, taken from linux-source-6.1.
fn extract_vmlinux(vmlinuz: &Path, out: &Path) {
    let dir = out.with_extension("src");
    std::fs::create_dir_all(&dir).unwrap();
    let tar = Command::new("tar")
        .args([
            "-C",
            dir.to_str().unwrap(),
            "-xf",
            "/usr/src/linux-source-6.1.tar.xz",
        ])
        .arg("linux-source-6.1/scripts/extract-vmlinux")
        .status()
        .expect("tar (linux-source-6.1 is installed by scripts/setup.sh)");
    assert!(tar.success(), "cannot unpack extract-vmlinux");
    let script = dir.join("linux-source-6.1/scripts/extract-vmlinux");
    let o = Command::new("sh")
        .arg(&script)
        .arg(vmlinuz)
        .output()
        .unwrap();
    assert!(
        o.status.success() && !o.stdout.is_empty(),
        "extract-vmlinux failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(out, &o.stdout).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

fn listing(text: &str) -> Vec<(u64, char, String)> {
    let mut v: Vec<_> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (a, k, n) = (w.next()?, w.next()?, w.next()?);
            Some((
                u64::from_str_radix(a, 16).ok()?,
                k.chars().next()?,
                n.to_string(),
            ))
        })
        .collect();
    v.sort();
    v
}

fn compare(kernel: &str) {
    let vmlinuz = script_path(
        "kernel-config/debian.sh",
        &[kernel.trim_start_matches("debian-")],
    );
    let elf = temp_path(&format!("{}.elf", kernel.replace('.', "_")));
    extract_vmlinux(&vmlinuz, &elf);
    let tools = script_path("scripts/python-tools.sh", &[]);
    let theirs = Command::new(tools.join("kallsyms-finder"))
        .arg(&elf)
        .output()
        .unwrap();
    assert!(
        theirs.status.success(),
        "kallsyms-finder failed: {}",
        String::from_utf8_lossy(&theirs.stderr)
    );
    let theirs = listing(&String::from_utf8_lossy(&theirs.stdout));

    let ours = hvtrace(&["symbols", "--kernel", kernel]);
    assert!(ours.status.success(), "{}", stderr(&ours));
    assert!(
        stderr(&ours).contains("kallsyms recovered from the kernel image"),
        "{}",
        stderr(&ours)
    );
    let ours = listing(&stdout(&ours));

    let only_ours: Vec<_> = ours
        .iter()
        .filter(|l| theirs.binary_search(l).is_err())
        .take(10)
        .collect();
    let only_theirs: Vec<_> = theirs
        .iter()
        .filter(|l| ours.binary_search(l).is_err())
        .take(10)
        .collect();
    eprintln!(
        "{kernel}: hvtrace {} symbols, kallsyms-finder {}",
        ours.len(),
        theirs.len()
    );
    assert!(ours.len() > 50_000, "too few symbols");
    assert!(
        only_ours.is_empty() && only_theirs.is_empty() && ours.len() == theirs.len(),
        "{kernel}: listings differ\nonly hvtrace: {only_ours:?}\nonly kallsyms-finder: {only_theirs:?}"
    );
    let _ = std::fs::remove_file(elf);
}

#[test]
fn debian_6_1_symbols_match_kallsyms_finder() {
    compare("debian-6.1");
}

#[test]
fn debian_6_12_symbols_match_kallsyms_finder() {
    compare("debian-6.12");
}
