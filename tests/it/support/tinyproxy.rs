//! A real HTTP proxy for the proxy tests: Debian's tinyproxy (installed by
//! `scripts/setup.sh`), on a free loopback port, with Basic authentication, its log read
//! to see what went through it. Stopped when dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::process::free_port;

/// The user and password the proxy requires.
pub const USER: &str = "bridge";
pub const PASSWORD: &str = "proxy-secret";

/// A running tinyproxy.
pub struct TinyProxy {
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
    _child: Child,
}

impl TinyProxy {
    /// Starts tinyproxy requiring [`USER`] and [`PASSWORD`], and waits until it listens.
    pub async fn start() -> TinyProxy {
        let program = Path::new("/usr/bin/tinyproxy");
        assert!(
            program.is_file(),
            "tinyproxy is missing ({}): run `scripts/setup.sh` (it installs Debian's tinyproxy)",
            program.display()
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let log = dir.path().join("tinyproxy.log");
        let config = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 100\nLogLevel Info\nLogFile \"{}\"\nBasicAuth {USER} {PASSWORD}\nDisableViaHeader Yes\n",
                log.display()
            ),
        )
        .expect("write the tinyproxy configuration");
        let child = Command::new(program)
            .arg("-d")
            .arg("-c")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start tinyproxy");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "tinyproxy did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        TinyProxy { port, log, _dir: dir, _child: child }
    }

    /// The proxy URL with the right credentials.
    pub fn url(&self) -> String {
        format!("http://{USER}:{PASSWORD}@127.0.0.1:{}", self.port)
    }

    /// The proxy URL with a wrong password.
    pub fn url_with_wrong_password(&self) -> String {
        format!("http://{USER}:wrong@127.0.0.1:{}", self.port)
    }

    /// The requests the proxy received so far, as it logged them (`CONNECT host:port
    /// HTTP/1.1`, `POST http://host:port/path HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split_once("): ").filter(|_| line.contains("Request (file descriptor")))
            .map(|(_, request)| request.to_string())
            .collect()
    }
}
