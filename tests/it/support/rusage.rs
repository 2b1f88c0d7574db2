//! Runs the `pgferry` binary and reports its peak memory: the `ru_maxrss` that `wait4(2)`
//! returns for the child (the largest resident set it had, in KiB on Linux). Reaped
//! grandchildren (pg_dump) count through the same figure when they were bigger.

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
/// `wait4` to read its peak RSS; fails the test if a secret shows in its output.
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
        // Reaped by wait4 below, which std's Child cannot do (it has no rusage).
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
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our own unreaped child (std's `Child` is never waited on), and
        // both out-pointers point at live locals of the right types.
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(
            reaped,
            pid,
            "wait4 failed: {}",
            std::io::Error::last_os_error()
        );
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
            max_rss_bytes: usage.ru_maxrss as u64 * 1024,
        }
    })
    .await
    .expect("the measured run panicked")
}
