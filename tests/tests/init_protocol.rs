//! The guest image's /init and control protocol, run natively (no kernel
//! boot): `images/test-init-host.py` starts the image's own /init as PID 1
//! of new namespaces with pseudo-terminals for its serial ports and plays
//! the VMM's side of every request (SH, RUN, POWEROFF, bad requests,
//! start-up failures).

use hvtrace_tests::*;

#[test]
fn init_serves_the_control_protocol() {
    let image = default_image();
    let script = root().join("images/test-init-host.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&image)
        .output()
        .expect("run images/test-init-host.py");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(" 0 failed"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
