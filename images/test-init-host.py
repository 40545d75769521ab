#!/usr/bin/env python3
"""Host-side test of the guest image's /init and control protocol.

Runs the image's own /init (busybox ash) and programs natively, without a
kernel boot: the image is unpacked into a temporary directory, ttyS1-3 are
pseudo-terminals bind-mounted into its /dev, and /init runs chrooted as PID 1
of new mount, UTS and PID namespaces (so its mounts, hostname and
`poweroff -f` stay inside them: reboot(2) in a child PID namespace only ends
that namespace). This script then plays the VMM's side of the protocol
described in images/README.md.

Needs root (unshare, mount, chroot). Usage:
    images/test-init-host.py [path/to/initramfs.cpio]   (default: build it)
Prints one line per check and 'N passed, N failed' at the end; exits 0 only
if everything passed.
"""
import base64
import os
import select
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 30.0

passed = 0
failed = 0


def check(ok, what, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {what}")
    else:
        failed += 1
        print(f"FAIL {what} {detail}")


class Port:
    """Host end of one guest serial port (a pty master)."""

    def __init__(self, name):
        self.name = name
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        self.buf = b""

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([self.master], [], [], left)
        if not r:
            return False
        try:
            data = os.read(self.master, 4096)
        except OSError:
            return False
        self.buf += data
        return bool(data)

    def line(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if not self._fill(deadline):
                return None
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def drain(self, settle=0.3):
        """Everything that arrives until the port is quiet for `settle` s."""
        while self._fill(time.monotonic() + settle):
            pass
        out, self.buf = self.buf, b""
        return out

    def send(self, text):
        os.write(self.master, text.encode())


def start_init(root, ctl, out, err, console):
    """Run root's /init as PID 1 of new namespaces, ttyS1-3 on the ports."""
    # Refuse to go on unless we really are PID 1 of a new PID namespace, so
    # that /init's `poweroff -f` can never reach the host.
    setup = f"""
set -e
[ "$$" = 1 ]
R={shlex.quote(root)}
mount -t tmpfs -o mode=0755 tmpfs "$R/dev"
for n in 1 2 3; do : >"$R/dev/ttyS$n"; done
: >"$R/dev/null"
mount --bind {shlex.quote(ctl.path)} "$R/dev/ttyS1"
mount --bind {shlex.quote(out.path)} "$R/dev/ttyS2"
mount --bind {shlex.quote(err.path)} "$R/dev/ttyS3"
mount --bind /dev/null "$R/dev/null"
exec chroot "$R" /init
"""
    return subprocess.Popen(["unshare", "--mount", "--uts", "--pid", "--fork",
                             "--propagation", "private", "sh", "-c", setup],
                            stdin=subprocess.DEVNULL, stdout=console, stderr=console)


def mount_error_scenario(root, tmp):
    """/run is a file, so its mount fails: /init must say so and go on."""
    run_dir = os.path.join(root, "run")
    os.rmdir(run_dir)
    open(run_dir, "w").close()
    ctl, out, err = Port("ttyS1"), Port("ttyS2"), Port("ttyS3")
    console = open(os.path.join(tmp, "console2.log"), "w+b")
    proc = start_init(root, ctl, out, err, console)
    try:
        check(ctl.line() == "HVTRACE-ERROR mount tmpfs on /run failed", "mount failure reported")
        check((ctl.line() or "").startswith("HVTRACE-BOOTED "), "BOOTED after a mount failure")
        check(ctl.line() == "HVTRACE-READY", "READY after a mount failure")
        ctl.send("RUN " + base64.b64encode(b"echo still-here").decode() + "\n")
        check(ctl.line() == "HVTRACE-EXIT 0", "RUN after a mount failure")
        check(out.drain() == b"still-here\n", "output after a mount failure")
        check(ctl.line() == "HVTRACE-READY", "READY again")
        ctl.send("POWEROFF\n")
        check(ctl.line() == "HVTRACE-POWEROFF", "POWEROFF acknowledged")
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main():
    if os.geteuid() != 0:
        print("test-init-host.py needs root (unshare, mount, chroot)")
        return 2
    if len(sys.argv) > 1:
        image = sys.argv[1]
    else:
        image = subprocess.run([os.path.join(HERE, "build.sh")], check=True,
                               stdout=subprocess.PIPE, text=True).stdout.strip()
    tmp = tempfile.mkdtemp(prefix="hvtrace-init-test.")
    root = os.path.join(tmp, "root")
    os.mkdir(root)
    with open(image, "rb") as f:
        subprocess.run(["cpio", "-id", "--quiet"], stdin=f, cwd=root, check=True)

    ctl, out, err = Port("ttyS1"), Port("ttyS2"), Port("ttyS3")
    console = open(os.path.join(tmp, "console.log"), "w+b")
    proc = start_init(root, ctl, out, err, console)
    def request(line):
        ctl.send(line)
        reply = ctl.line()
        return reply

    def run(cmd, expect_status=0, what=None, crlf=False, legacy=False):
        """Send shell text `cmd` as SH (one line, what hvtrace sends) or,
        with `legacy` or for several lines, as RUN <base64>; return
        (status line, stdout, stderr)."""
        end = "\r\n" if crlf else "\n"
        body = cmd[:-1] if cmd.endswith("\n") else cmd
        if legacy or "\n" in body:
            b64 = base64.b64encode(cmd.encode()).decode()
            reply = request(f"RUN {b64}" + end)
        else:
            reply = request(f"SH {body}" + end)
        stdout, stderr = out.drain(), err.drain()
        ready = ctl.line()
        what = what or cmd.strip()
        check(reply == f"HVTRACE-EXIT {expect_status}", f"RUN {what!r} -> {reply!r}",
              f"(stdout {stdout!r}, stderr {stderr!r})")
        check(ready == "HVTRACE-READY", f"READY after {what!r}", repr(ready))
        return reply, stdout.decode(errors="replace"), stderr.decode(errors="replace")

    try:
        first = ctl.line()
        errors = []
        while first is not None and first.startswith("HVTRACE-ERROR "):
            errors.append(first)
            first = ctl.line()
        for e in errors:
            # Expected here only for what a container may refuse (sysfs).
            print(f"note {e}")
        check(first is not None and first.startswith("HVTRACE-BOOTED "), "BOOTED line", repr(first))
        if first:
            up = first.split(" ", 1)[1]
            try:
                float(up)
                check(True, f"BOOTED uptime {up} is a number")
            except ValueError:
                check(False, "BOOTED uptime is a number", repr(up))
        check(ctl.line() == "HVTRACE-READY", "first READY")

        _, o, _ = run("'echo' 'hi there'\n")
        check(o == "hi there\n", "stdout on ttyS2, no \\r added", repr(o))
        _, o, e = run("echo oops >&2; echo out; exit 3\n", expect_status=3)
        check(o == "out\n" and e == "oops\n", "stdout/stderr split across ttyS2/ttyS3",
              repr((o, e)))
        _, o, _ = run("'printf' '%s|' 'a b' \"it's\" '$HOME' '*'\n")
        check(o == "a b|it's|$HOME|*|", "shell-quoted argv arrives verbatim", repr(o))
        _, o, _ = run("hostname; id -u; pwd; echo $PATH; echo $HOME\n")
        check(o == "hvtrace-guest\n0\n/\n/sbin:/usr/sbin:/bin:/usr/bin\n/root\n",
              "hostname, root, cwd /, PATH, HOME", repr(o))
        _, o, _ = run("cat; echo stdin-done\n")
        check(o == "stdin-done\n", "command stdin is /dev/null", repr(o))
        _, o, _ = run("[ -e /proc/self/fd/3 ] && echo leaked || echo closed\n")
        check(o == "closed\n", "control fd 3 not inherited", repr(o))
        _, o, _ = run("echo crlf-ok\n", crlf=True, what="CRLF-terminated request")
        check(o == "crlf-ok\n", "a trailing \\r is ignored", repr(o))
        _, o, _ = run("", what="empty script")
        _, o, _ = run("while read -r a b c; do echo $b; done </proc/mounts\n")
        for m in ("/proc", "/tmp", "/run", "/dev"):
            check(m in o.split(), f"{m} mounted", repr(o))
        _, o, _ = run("ls -l /tmp/.hvtrace-cmd; stty -F /dev/ttyS2 -a\n")
        check("-opost" in o and "-echo" in o and "-icanon" in o, "ttyS2 raw -echo -opost", repr(o))

        _, o, _ = run("'printf' '%s|' 'a b' \"it's\"\n", legacy=True, what="RUN (older hvtrace)")
        check(o == "a b|it's|", "RUN <base64> still served", repr(o))
        _, o, _ = run("echo one\necho two\n", what="two-line RUN script")
        check(o == "one\ntwo\n", "a RUN script of several lines", repr(o))
        _, o, _ = run("'printf' '%s|' $'a\\012b' $'tab\\011x'\n", what="SH with $'...' escapes")
        check(o == "a\nb|tab\tx|", "control characters spelled $'\\NNN' arrive", repr(o))
        _, o, _ = run("'sh' '-c' 'echo \"[$CTL$OUT$CMD]\"'\n", what="init's variables")
        check(o == "[]\n", "init's own variables are not exported", repr(o))
        _, o, _ = run("exec 'sh' '-c' 'echo $$ > /tmp/p; echo exec-ok'\n", what="SH exec")
        check(o == "exec-ok\n", "SH exec runs the command", repr(o))

        big = "echo " + "x" * 6000 + "\n"
        _, o, _ = run(big, what="6000-byte script")
        check(o == "x" * 6000 + "\n", "long request line", repr(o[:40]))

        for prog, args in [("hv-getpid-loop", "10"), ("hv-forkexec-loop", "2"), ("hv-fileio", ""),
                           ("hv-threads", ""), ("hv-signals", ""), ("hv-sleeper", "0.1"),
                           ("hv-spin", "0.1"), ("hv-cpus", "")]:
            _, o, e = run(f"{prog} {args}\n")
            print("     | " + o.strip().replace("\n", "\n     | "))
        _, o, _ = run("hv-fileio\n")
        check("from /etc/hostname: hvtrace-guest\n" in o, "hv-fileio reads the image's hostname")
        _, o, _ = run("hv-getpid-loop\n")
        check(o.startswith("getpid x 1000 done\n"), "hv-getpid-loop default", repr(o))
        _, o, _ = run("hv-sleeper --read & sleep 0.3; kill $!; wait $!\n", expect_status=143,
                      what="hv-sleeper --read, killed")
        check("blocking in read(0)" in o, "hv-sleeper --read blocks", repr(o))
        run("grep -q '^guest:x:1000:1000:' /etc/passwd && grep -q '^guest:x:1000:' /etc/group\n",
            what="guest user uid 1000")

        check(request("HELLO\n") == "HVTRACE-ERROR unknown request", "unknown request")
        check(ctl.line() == "HVTRACE-READY", "READY after unknown request")
        check(request("RUN ab$$\n") == "HVTRACE-ERROR bad base64", "bad base64 characters")
        check(ctl.line() == "HVTRACE-READY", "READY after bad base64")
        check(request("RUN aGk\n") == "HVTRACE-ERROR bad base64", "truncated base64")
        check(ctl.line() == "HVTRACE-READY", "READY after truncated base64")
        run("exit 0\n", what="still serving after errors")

        check(request("POWEROFF\n") == "HVTRACE-POWEROFF", "POWEROFF acknowledged")
        try:
            proc.wait(timeout=TIMEOUT)
            check(True, "init ended by poweroff -f (PID namespace)")
        except subprocess.TimeoutExpired:
            check(False, "init ended by poweroff -f")
        mount_error_scenario(root, tmp)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        console.seek(0)
        log = console.read().decode(errors="replace").strip()
        if log:
            print("console output:\n  " + log.replace("\n", "\n  "))
        subprocess.run(["rm", "-rf", tmp])
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
