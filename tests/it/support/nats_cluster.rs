//! A 3-node NATS cluster with JetStream on loopback: three nats-server processes, each
//! its own store directory, joined by `cluster { routes }` on free ports, so that buckets
//! and streams can have three replicas and one node can be killed and restarted.

use std::time::Duration;

use tempfile::TempDir;

use super::nats::locate_nats_server;
use super::peer::WAIT;
use super::process::{PortReport, Recipe, ServerProcess, free_port};

/// How many nodes the cluster has.
pub const NODES: usize = 3;

/// A running 3-node cluster; the nodes are killed when it is dropped.
pub struct NatsCluster {
    nodes: Vec<ServerProcess>,
    _dir: TempDir,
}

impl NatsCluster {
    /// Starts the three nodes and waits until JetStream can place a stream on all three.
    ///
    /// # Panics
    /// When nats-server cannot be found (with instructions to install it), or the cluster
    /// does not form within the wait.
    pub async fn start() -> Self {
        let program = locate_nats_server(None).unwrap_or_else(|hint| panic!("{hint}"));
        let dir = tempfile::tempdir().expect("temporary directory for the cluster");
        let routes: Vec<u16> = (0..NODES).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for (index, route) in routes.iter().enumerate() {
            let node = dir.path().join(format!("n{index}"));
            std::fs::create_dir_all(&node).expect("node directory");
            let others: Vec<String> = routes
                .iter()
                .filter(|port| *port != route)
                .map(|port| format!("\"nats-route://127.0.0.1:{port}\""))
                .collect();
            let file = node.join("nats-server.conf");
            std::fs::write(
                &file,
                format!(
                    "server_name: n{index}\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{\n  name: bridge-test\n  listen: \"127.0.0.1:{route}\"\n  routes: [{}]\n}}\n",
                    node.join("jetstream").display(),
                    others.join(", ")
                ),
            )
            .expect("write the node's configuration");
            let recipe = Recipe {
                name: "nats-server (cluster node)",
                program: program.clone(),
                args: vec![
                    "--config".into(),
                    file.display().to_string(),
                    "--addr".into(),
                    "127.0.0.1".into(),
                    "--port".into(),
                    "{port}".into(),
                    "--log".into(),
                    node.join("nats-server.log").display().to_string(),
                ],
                port_report: PortReport::Probe,
            };
            nodes.push(ServerProcess::start(recipe).await);
        }
        let cluster = NatsCluster { nodes, _dir: dir };
        cluster.wait_for_jetstream().await;
        cluster
    }

    /// Every node's URL, comma-separated (what a client is given).
    pub fn urls(&self) -> String {
        (0..NODES).map(|index| self.url(index)).collect::<Vec<_>>().join(",")
    }

    /// Node `index`'s URL.
    pub fn url(&self, index: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[index].port())
    }

    /// A client connected to the cluster (any node, reconnecting to the others).
    pub async fn client(&self) -> async_nats::Client {
        let urls: Vec<async_nats::ServerAddr> =
            (0..NODES).map(|index| self.url(index).parse().expect("a server address")).collect();
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(urls)
            .await
            .expect("connect to the cluster")
    }

    /// The index of the node named `name` (`n0`, `n1`, `n2`, as the servers call
    /// themselves in stream and meta information).
    pub fn index_of(name: &str) -> usize {
        name.strip_prefix('n').and_then(|index| index.parse().ok()).expect("a node name n<index>")
    }

    /// Kills node `index` (`kill -9`), its store kept.
    pub async fn kill(&mut self, index: usize) {
        self.nodes[index].stop().await;
    }

    /// Starts node `index` again, on the same ports and store, and waits until JetStream
    /// can place a stream on all three nodes again.
    pub async fn restart(&mut self, index: usize) {
        self.nodes[index].restart().await;
        self.wait_for_jetstream().await;
    }

    /// Waits until a 3-replica stream can be created (and removes it): a meta leader is
    /// elected and every node takes part.
    async fn wait_for_jetstream(&self) {
        let client = self.client().await;
        let jetstream = async_nats::jetstream::new(client);
        let name = format!("probe-{:08x}", fastrand::u32(..));
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        loop {
            let created = jetstream
                .create_stream(async_nats::jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![format!("{name}.>")],
                    num_replicas: NODES,
                    storage: async_nats::jetstream::stream::StorageType::Memory,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(_) => {
                    jetstream.delete_stream(&name).await.expect("remove the probe stream");
                    return;
                }
                Err(error) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the NATS cluster has no JetStream on {NODES} nodes: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
