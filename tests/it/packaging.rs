//! What can be checked of the packaging without a Docker engine: the paths, user, port and
//! entrypoint the Dockerfile names match what the binary and the configuration expect, and
//! every shipped configuration (examples, Compose, Kubernetes) passes `cometd-bridge check`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::support::project_dir;

fn read(path: &str) -> String {
    std::fs::read_to_string(project_dir().join(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// The Dockerfile's instructions of the final stage, joined across line continuations.
fn final_stage() -> Vec<(String, String)> {
    let text = read("Dockerfile").replace("\\\n", " ");
    let stages: Vec<&str> = text.split("\nFROM ").collect();
    stages
        .last()
        .expect("a stage")
        .lines()
        .filter(|line| !line.trim_start().starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let line = line.trim();
            line.split_once(' ').map(|(keyword, rest)| (keyword.to_uppercase(), rest.trim().to_string()))
        })
        .collect()
}

fn instruction<'a>(stage: &'a [(String, String)], keyword: &str) -> Vec<&'a str> {
    stage.iter().filter(|(k, _)| k == keyword).map(|(_, v)| v.as_str()).collect()
}

fn image_env(stage: &[(String, String)]) -> BTreeMap<String, String> {
    instruction(stage, "ENV")
        .iter()
        .flat_map(|rest| rest.split_whitespace())
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// Runs `cometd-bridge check` on `config` with `env`, asserting it is valid.
fn assert_valid(config: &Path, env: &[(&str, &str)], what: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_cometd-bridge"))
        .args(["check", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .expect("run check");
    assert!(output.status.success(), "{what} is not valid:\n{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn the_dockerfile_matches_the_binary_and_the_configuration() {
    let build = read("Dockerfile");
    assert!(build.contains("cargo build --release --locked"), "a locked release build");
    let stage = final_stage();
    let env = image_env(&stage);

    let entrypoint: Vec<String> =
        serde_json::from_str(instruction(&stage, "ENTRYPOINT")[0]).expect("exec-form ENTRYPOINT");
    let copies = instruction(&stage, "COPY");
    let binary = copies
        .iter()
        .find(|copy| copy.starts_with("--from=build") && copy.contains("target/release/cometd-bridge"))
        .and_then(|copy| copy.split_whitespace().last())
        .expect("the binary is copied from the build stage");
    assert_eq!(entrypoint, [binary], "the entrypoint is the copied binary");
    assert!(copies.iter().any(|copy| copy.contains("target/release/cometd-bridge")));
    let cmd: Vec<String> = serde_json::from_str(instruction(&stage, "CMD")[0]).expect("exec-form CMD");
    assert_eq!(cmd, ["run"]);

    let config_path = "/etc/cometd-bridge/config.toml";
    assert_eq!(env.get("COMETD_BRIDGE_CONFIG").map(String::as_str), Some(config_path));
    assert!(copies.contains(&format!("config/default.toml {config_path}").as_str()), "{copies:?}");

    let state = env.get("COMETD_BRIDGE__STATE__PATH").expect("the state path is set");
    assert_eq!(instruction(&stage, "VOLUME"), [state.as_str()], "the state directory is the volume");
    assert!(
        read("Dockerfile").contains(&format!("chown 10001:10001 {state}")),
        "the user can write its state"
    );

    let listen = env.get("COMETD_BRIDGE__ADMIN__LISTEN").expect("the admin address is set");
    let port = listen.rsplit(':').next().expect("a port");
    assert_eq!(instruction(&stage, "EXPOSE"), [port]);

    // Numeric, so that Kubernetes' runAsNonRoot can check it; the group the manifests'
    // fsGroup names.
    let user = instruction(&stage, "USER");
    assert_eq!(user, ["10001:10001"], "runs as uid and gid 10001, not root");
    let manifest = read("deploy/kubernetes/deployment.yaml");
    for setting in ["runAsUser: 10001", "fsGroup: 10001"] {
        assert!(manifest.contains(setting), "the manifest says {setting}");
    }
    // The dependencies are built in a layer of their own, before the sources are copied.
    let build = read("Dockerfile");
    let dependencies = build.find("cargo build --release --locked --bin cometd-bridge").expect("a build");
    let sources = build.find("COPY src ./src").expect("the sources are copied");
    assert!(dependencies < sources, "the dependency layer comes before the sources");
    let client =
        build.find("COPY crates/bayeux-client/Cargo.toml").expect("the client crate's manifest is copied");
    assert!(client < dependencies, "the workspace's client crate is in the dependency layer");

    // The image's environment on top of the configuration it ships is a valid setup once
    // the admin token is given (its API listens on every interface), and refused without.
    let dir = tempfile::tempdir().expect("temp dir");
    let state_dir = dir.path().join("state");
    let state_text = state_dir.display().to_string();
    let image = [
        ("COMETD_BRIDGE__STATE__PATH", state_text.as_str()),
        ("COMETD_BRIDGE__ADMIN__LISTEN", listen.as_str()),
    ];
    assert_valid(
        &project_dir().join("config/default.toml"),
        &[image[0], image[1], ("COMETD_BRIDGE__ADMIN__TOKEN", "a-token")],
        "the image's default configuration with a token",
    );
    let refused = Command::new(env!("CARGO_BIN_EXE_cometd-bridge"))
        .args(["run", "--config"])
        .arg(project_dir().join("config/default.toml"))
        .envs(image)
        .env_remove("RUST_LOG")
        .output()
        .expect("run");
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("admin.token: required"), "{refused:?}");

    // The image's health check is the binary's own `health`, which asks /readyz on the
    // configured listen address: the image has no shell nor curl.
    let health = instruction(&stage, "HEALTHCHECK");
    assert_eq!(health.len(), 1, "one HEALTHCHECK");
    assert!(
        health[0].contains(r#"CMD ["/usr/local/bin/cometd-bridge", "health"]"#),
        "the HEALTHCHECK runs `cometd-bridge health`: {}",
        health[0]
    );
    let systemd = read("deploy/systemd/cometd-bridge.service");
    assert!(systemd.contains("ExecReload=/bin/kill -HUP $MAINPID"), "systemctl reload sends SIGHUP");

    let ignored = read(".dockerignore");
    for needless in ["target", ".tools", "**/node_modules"] {
        assert!(ignored.lines().any(|line| line.trim() == needless), ".dockerignore leaves out {needless}");
    }
    for needed in ["src", "Cargo.toml", "Cargo.lock", "config", "crates", "crates/bayeux-client"] {
        assert!(!ignored.lines().any(|line| line.trim() == needed), ".dockerignore keeps {needed}");
    }
}

#[test]
fn every_shipped_configuration_is_valid() {
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("write");
    let webhooks = read("config/webhooks.toml")
        .replace("/run/secrets/pager-webhook-secret", &secret.display().to_string());
    let webhooks_file = dir.path().join("webhooks.toml");
    std::fs::write(&webhooks_file, webhooks).expect("write");
    let env = [
        ("ADMIN_TOKEN", "t"),
        ("SHOP_AUTHORIZATION", "Bearer t"),
        ("DEMO_HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ];
    for path in
        ["config/default.toml", "config/demo.toml", "config/jetstream.toml", "deploy/compose/config.toml"]
    {
        assert_valid(&project_dir().join(path), &env, path);
    }
    assert_valid(&webhooks_file, &env, "config/webhooks.toml");
    // A key made for the tests only stands in for the JWT flow's key.
    let key = project_dir().join("tests/peers/test-only-rsa.pem");
    let salesforce =
        read("config/salesforce.toml").replace("/run/secrets/salesforce-jwt.pem", &key.display().to_string());
    let salesforce_file = dir.path().join("salesforce.toml");
    std::fs::write(&salesforce_file, salesforce).expect("write");
    assert_valid(&salesforce_file, &env, "config/salesforce.toml");
}

/// Parses the Kubernetes manifests in `deploy/kubernetes/<dir>` with PyYAML (from
/// `.tools/schemathesis`, which `scripts/setup.sh` installs) into JSON documents.
fn kubernetes_documents(dir: &str) -> Vec<Value> {
    let python = project_dir().join(".tools/schemathesis/bin/python");
    assert!(python.is_file(), "{} is missing; run `scripts/setup.sh`", python.display());
    let script = "import glob, json, sys, yaml\n\
                  docs = [d for f in sorted(glob.glob(sys.argv[1] + '/*.yaml')) for d in yaml.safe_load_all(open(f))]\n\
                  print(json.dumps(docs))";
    let output = Command::new(python)
        .args(["-c", script])
        .arg(project_dir().join("deploy/kubernetes").join(dir))
        .output()
        .expect("run python");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("JSON")
}

#[test]
fn the_kubernetes_manifests_probe_and_configure_the_bridge() {
    let documents = kubernetes_documents("");
    let kind =
        |kind: &str| documents.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("a {kind}"));
    let deployment = kind("Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(deployment["spec"]["replicas"], 1);
    let env: BTreeMap<String, Value> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().expect("name").to_string(), e["value"].clone()))
        .collect();
    let stage = final_stage();
    let image = image_env(&stage);
    for name in ["COMETD_BRIDGE_CONFIG", "COMETD_BRIDGE__STATE__PATH", "COMETD_BRIDGE__ADMIN__LISTEN"] {
        assert_eq!(env[name].as_str(), image.get(name).map(String::as_str), "{name} matches the image");
    }
    let mounts = container["volumeMounts"].as_array().expect("mounts");
    assert!(mounts.iter().any(|m| m["mountPath"] == "/var/lib/cometd-bridge"), "the state is on a volume");
    assert!(mounts.iter().any(|m| m["mountPath"] == "/etc/cometd-bridge"), "the configuration is mounted");
    assert_eq!(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"], 10001);

    let config = kind("ConfigMap")["data"]["config.toml"].as_str().expect("config.toml").to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, config).expect("write");
    let state = dir.path().join("state").display().to_string();
    assert_valid(&file, &[("ADMIN_TOKEN", "t"), ("COMETD_BRIDGE__STATE__PATH", &state)], "the ConfigMap");
    assert!(kind("Service")["spec"]["ports"][0]["port"] == 8080);
    assert!(kind("PersistentVolumeClaim")["spec"]["resources"].is_object());
}

/// The 3-replica variant: a StatefulSet of three whose pods name themselves after the pod,
/// on a NATS state with three copies, ready on a standby, a disruption budget of one, and
/// time to hand the sources over on SIGTERM; every resource the kustomization lists.
#[test]
fn the_kubernetes_replicas_variant_runs_three_replicas_on_a_nats_state() {
    let documents = kubernetes_documents("replicas");
    let kind =
        |kind: &str| documents.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("a {kind}"));
    let listed = kind("Kustomization")["resources"].as_array().expect("resources").len();
    assert_eq!(listed + 1, documents.len(), "the kustomization lists every manifest");
    let set = kind("StatefulSet");
    assert_eq!(set["spec"]["replicas"], 3);
    let pods = &set["spec"]["template"];
    let labels = &pods["metadata"]["labels"];
    assert_eq!(&set["spec"]["selector"]["matchLabels"], labels);
    let container = &pods["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let env = container["env"].as_array().expect("env");
    let named =
        |name: &str| env.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("{name} is set"));
    assert_eq!(
        named("COMETD_BRIDGE__CLUSTER__REPLICA")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name",
        "each replica is named after its pod"
    );
    let budget = kind("PodDisruptionBudget");
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    assert_eq!(&budget["spec"]["selector"]["matchLabels"], labels, "the budget covers the replicas");
    assert_eq!(&kind("Service")["spec"]["selector"], labels);
    assert_eq!(set["spec"]["serviceName"], kind("Service")["metadata"]["name"]);

    // The configuration is valid as each pod sees it, on the NATS state with three copies.
    let config = kind("ConfigMap")["data"]["config.toml"].as_str().expect("config.toml").to_string();
    for setting in ["backend = \"nats\"", "replicas = 3"] {
        assert!(config.contains(setting), "the ConfigMap sets {setting}");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, &config).expect("write");
    let value = |name: &str| named(name)["value"].as_str().expect("a value").to_string();
    let (state, listen) = (value("COMETD_BRIDGE__STATE__PATH"), value("COMETD_BRIDGE__ADMIN__LISTEN"));
    assert_valid(
        &file,
        &[
            ("ADMIN_TOKEN", "t"),
            ("COMETD_BRIDGE__STATE__PATH", &state),
            ("COMETD_BRIDGE__ADMIN__LISTEN", &listen),
            ("COMETD_BRIDGE__CLUSTER__REPLICA", "cometd-bridge-0"),
        ],
        "the replicas' ConfigMap",
    );

    // SIGTERM drains within shutdown_grace, then the leases are released: the pod is given
    // more than the grace and the hand-over wait together.
    let grace = set["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().expect("a grace");
    let seconds = |key: &str, default: u64| {
        config
            .lines()
            .find_map(|line| {
                line.trim()
                    .strip_prefix(key)?
                    .trim()
                    .strip_prefix('=')?
                    .trim()
                    .strip_prefix('"')?
                    .strip_suffix("s\"")?
                    .parse()
                    .ok()
            })
            .unwrap_or(default)
    };
    let (shutdown_grace, handover_wait) = (seconds("shutdown_grace", 8), seconds("handover_wait", 5));
    assert!(grace > shutdown_grace + handover_wait, "terminationGracePeriodSeconds {grace} covers the drain");
}

#[test]
fn the_systemd_unit_runs_the_daemon_with_its_configuration() {
    let unit = read("deploy/systemd/cometd-bridge.service");
    assert!(
        unit.contains("ExecStart=/usr/local/bin/cometd-bridge run --config /etc/cometd-bridge/config.toml")
    );
    assert!(
        unit.contains(
            "ExecStartPre=/usr/local/bin/cometd-bridge check --config /etc/cometd-bridge/config.toml"
        )
    );
    assert!(
        unit.contains("StateDirectory=cometd-bridge")
            && unit.contains("COMETD_BRIDGE__STATE__PATH=/var/lib/cometd-bridge")
    );
    assert!(unit.contains("RestartPreventExitStatus=2"), "no restart loop on a bad configuration");
}
