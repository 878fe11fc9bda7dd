//! The `cometd-bridge run` binary as a user starts it, with its JSON logs read as events.

use std::path::Path;
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::peer::WAIT;

/// A running daemon.
pub struct Daemon {
    pub child: Child,
    /// The admin server's address (from its start-up log line).
    pub admin: String,
    /// Its log events, read continuously so the pipe never fills.
    events: mpsc::UnboundedReceiver<Value>,
}

impl Daemon {
    /// Starts `cometd-bridge run --log-format json --config <config>` and waits until it
    /// logs its admin address.
    pub async fn start(config: &Path) -> Daemon {
        Self::start_with_env(config, &[]).await
    }

    /// [`Daemon::start`] with these environment variables set (proxies, say).
    pub async fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cometd-bridge"))
            .args(["run", "--log-format", "json", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the daemon");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let (sender, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let event = serde_json::from_str(&line).unwrap_or_else(|_| panic!("a JSON log line: {line}"));
                let _ = sender.send(event);
            }
        });
        let mut daemon = Daemon { child, admin: String::new(), events };
        let started = daemon.wait_for_log("cometd-bridge started").await;
        daemon.admin = started["fields"]["admin"].as_str().expect("the admin address").to_string();
        daemon
    }

    /// Waits for the log event whose message is `message`, and returns it.
    pub async fn wait_for_log(&mut self, message: &str) -> Value {
        loop {
            let event = tokio::time::timeout(WAIT, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no {message:?} log within the wait"))
                .unwrap_or_else(|| panic!("the daemon ended before logging {message:?}"));
            if event["fields"]["message"] == message {
                return event;
            }
        }
    }

    /// The log events not read yet (to explain a failure).
    pub fn unread_logs(&mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.events.try_recv().ok()).collect()
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id().expect("running")).expect("pid");
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Kills it without warning (`kill -9`) and waits until it is gone.
    pub async fn kill_9(mut self) {
        self.child.start_kill().expect("kill -9");
        self.child.wait().await.expect("killed");
    }
}
