//! Runs the `pgferry` binary and reports its peak memory: the `VmHWM` (high-water mark of its
//! resident set) in `/proc/<pid>/status`, read every 5 ms until it exits.
//!
//! Not `wait4(2)`'s `ru_maxrss`: Linux carries the parent's resident set across fork and exec
//! into the child's figure (exec records the old address space's high-water mark), so a child
//! of a 270 MiB test process "peaked" at 270 MiB whatever it did (measured: a child `true` of
//! a Python holding 500 MiB reports 510 MiB). That is why this test used to read 266–276 MiB
//! beside the other tests and less alone. Growth in the last 5 ms before exit can be missed.

use std::io::Read;
use std::path::Path;
use std::process::Stdio;

use super::env::{assert_no_secret, Run, TestEnv};

/// What a measured run printed, how it ended, and its peak resident set.
pub struct Measured {
    pub run: Run,
    pub max_rss_bytes: u64,
}

/// Runs `pgferry --config CONFIG ARGS…` with `env`'s variables to completion, reaping it with
/// `waitpid` while sampling its peak RSS; fails the test if a secret shows in its output.
pub async fn pgferry_measured(env: &TestEnv, config: &Path, args: &[&str]) -> Measured {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgferry"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .envs(env.env_vars())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let secrets = env.secrets();
    tokio::task::spawn_blocking(move || {
        // Reaped by waitpid below, between samples of its /proc status.
        #[allow(clippy::zombie_processes)]
        let mut child = cmd.spawn().expect("start pgferry");
        let mut out = child.stdout.take().expect("stdout piped");
        let mut err = child.stderr.take().expect("stderr piped");
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let pid = child.id() as libc::pid_t;
        let mut status: libc::c_int = 0;
        let mut peak_kib = 0u64;
        loop {
            // Read before each reap attempt, so every read is of our own child (alive or a
            // zombie, whose pid cannot be reused yet).
            if let Some(kib) = vm_hwm_kib(pid) {
                peak_kib = peak_kib.max(kib);
            }
            // SAFETY: `pid` is our own unreaped child (std's `Child` is never waited on), and
            // `status` is a live local.
            let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            assert!(
                reaped >= 0,
                "waitpid failed: {}",
                std::io::Error::last_os_error()
            );
            if reaped == pid {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        };
        let run = Run {
            code,
            stdout: out_reader.join().expect("stdout reader"),
            stderr: err_reader.join().expect("stderr reader"),
        };
        assert_no_secret(&run.output(), &secrets);
        Measured {
            run,
            max_rss_bytes: peak_kib * 1024,
        }
    })
    .await
    .expect("the measured run panicked")
}

/// The `VmHWM` line of `/proc/<pid>/status`, in KiB; None once the process has no memory
/// (a zombie) or is gone.
fn vm_hwm_kib(pid: libc::pid_t) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
