//! A spawned process of the benchmark, with its stdout lines and what it used (CPU, memory).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

pub fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

pub fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// User + system CPU time of a running process, in microseconds.
pub fn cpu_us(pid: u32) -> u64 {
    let (user, system) = cpu_split_us(pid);
    user + system
}

/// A process's user and kernel CPU time so far, in µs (from `/proc`, 10 ms ticks).
pub fn cpu_split_us(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) * 1_000_000 / 100, ticks(12) * 1_000_000 / 100)
}

/// A spawned process, its stdout lines, and its resource use once reaped.
pub struct Proc {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
    /// Set once `wait4` has reaped it, so that dropping it does not signal a pid that may
    /// have been reused.
    reaped: bool,
}

impl Drop for Proc {
    /// A process the run did not stop (it panicked on the way) is killed, not left running
    /// with the run's output pipe open.
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a process used, from the kernel at reaping (wait4).
pub struct Usage {
    pub user_us: u64,
    pub system_us: u64,
    pub max_rss_kb: u64,
}

impl Proc {
    pub fn spawn(mut command: Command) -> Proc {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Proc { child, lines, reaped: false }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line (`None` at end of output).
    pub fn line(&mut self) -> Option<String> {
        self.lines.next().and_then(Result::ok)
    }

    pub fn expect_ready(&mut self) {
        let line = self.line();
        assert_eq!(line.as_deref(), Some("READY"), "a READY line");
    }

    /// Waits for the process to end and returns what it used.
    pub fn reap(mut self) -> Usage {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value to be overwritten.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child with valid out-pointers.
        unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        self.reaped = true;
        let micros = |time: libc::timeval| time.tv_sec as u64 * 1_000_000 + time.tv_usec as u64;
        Usage {
            user_us: micros(usage.ru_utime),
            system_us: micros(usage.ru_stime),
            max_rss_kb: usage.ru_maxrss as u64,
        }
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.reap();
    }
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn me() -> Command {
    Command::new(std::env::current_exe().expect("current exe"))
}
