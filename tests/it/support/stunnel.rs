//! A real TLS terminator for the `https://` proxy tests: Debian's stunnel (installed by
//! `scripts/setup.sh`), on a free loopback port, taking TLS with a given certificate and
//! passing the plain bytes on to a loopback port (tinyproxy's). Stopped when dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::process::free_port;

/// A running stunnel in front of a loopback port.
pub struct Stunnel {
    pub port: u16,
    _dir: tempfile::TempDir,
    _child: Child,
}

impl Stunnel {
    /// Starts stunnel accepting TLS on a free port with the certificate and key in
    /// `cert` and `key` (PEM files), forwarding to `127.0.0.1:upstream`; waits until it
    /// listens.
    pub async fn start(upstream: u16, cert: &Path, key: &Path) -> Stunnel {
        let program = ["/usr/bin/stunnel", "/usr/bin/stunnel4"]
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.is_file());
        let program = program.unwrap_or_else(|| {
            panic!("stunnel is missing (/usr/bin/stunnel): run `scripts/setup.sh` (it installs Debian's stunnel4), or `apt-get install -y stunnel4`")
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = dir.path().join("stunnel.conf");
        std::fs::write(
            &config,
            format!(
                "foreground = yes\npid =\noutput = {}\n[https-proxy]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{upstream}\ncert = {}\nkey = {}\n",
                dir.path().join("stunnel.log").display(),
                cert.display(),
                key.display()
            ),
        )
        .expect("write the stunnel configuration");
        let child = Command::new(program)
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start stunnel");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "stunnel did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Stunnel { port, _dir: dir, _child: child }
    }
}
