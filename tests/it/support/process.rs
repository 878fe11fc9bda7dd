//! A child process that is a real server: started on a loopback port, probed until it
//! answers, killed when dropped (also when the test panics), and restartable on the same
//! port. Freezing (SIGSTOP) simulates a server that stalls without closing connections.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How long a server may take to start before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How a server tells us its port.
#[derive(Clone, Debug)]
pub enum PortReport {
    /// The server prints `LISTENING <port>` on stdout (our node launchers); `{port}` in the
    /// arguments is replaced by the requested port, 0 on the first start.
    StdoutLine,
    /// The server is given a port picked here and is probed with TCP connects.
    Probe,
}

/// The recipe for starting one server, kept so that it can be restarted identically.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub port_report: PortReport,
}

/// A running (or stopped, or frozen) server process.
pub struct ServerProcess {
    recipe: Recipe,
    port: u16,
    child: Option<Child>,
}

impl ServerProcess {
    /// Starts the server on a free loopback port and waits until it accepts connections.
    pub async fn start(recipe: Recipe) -> Self {
        let port = match recipe.port_report {
            PortReport::StdoutLine => 0,
            PortReport::Probe => free_port(),
        };
        let mut server = ServerProcess { recipe, port, child: None };
        server.spawn().await;
        server
    }

    /// The port the server listens on; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The operating-system process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Kills the server and waits until it has exited, so the port is free again.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A frozen process must be thawed before it can handle anything but SIGKILL;
            // SIGKILL works either way.
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port and waits until it answers.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }

    /// Suspends the process (SIGSTOP): connections stay open but nothing is answered.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Resumes a frozen process (SIGCONT).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.pid().expect("the server is not running");
        let pid = libc::pid_t::try_from(pid).expect("pid fits in pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child.
        let result = unsafe { libc::kill(pid, signal) };
        assert_eq!(result, 0, "could not signal {} (pid {pid})", self.recipe.name);
    }

    async fn spawn(&mut self) {
        let recipe = &self.recipe;
        let args: Vec<String> =
            recipe.args.iter().map(|arg| arg.replace("{port}", &self.port.to_string())).collect();
        let mut child = Command::new(&recipe.program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "could not start {} ({}): {error}; run `scripts/setup.sh` to install the test servers",
                    recipe.name,
                    recipe.program.display()
                )
            });
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();

        let ready = async {
            if let PortReport::StdoutLine = recipe.port_report {
                loop {
                    match lines.next_line().await {
                        Ok(Some(line)) => {
                            if let Some(port) = line.strip_prefix("LISTENING ") {
                                self.port = port.trim().parse().expect("LISTENING <port>");
                                break;
                            }
                        }
                        Ok(None) | Err(_) => {
                            let status = child.wait().await;
                            panic!("{} exited before listening: {status:?}", recipe.name);
                        }
                    }
                }
            }
            wait_until_accepting(self.port, &mut child, recipe.name).await;
        };
        tokio::time::timeout(START_TIMEOUT, ready)
            .await
            .unwrap_or_else(|_| panic!("{} did not start within {START_TIMEOUT:?}", recipe.name));

        // Keep draining stdout so that a chatty server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
    }
}

/// Probes the port with TCP connects until one succeeds. Between probes it waits a few
/// milliseconds; the probe, not the pause, decides readiness.
async fn wait_until_accepting(port: u16, child: &mut Child, name: &str) {
    loop {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{name} exited before accepting connections: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}
