//! The README's first command: `scripts/demo.sh` runs end to end and shows the messages
//! arriving on NATS and at the webhook.

use crate::support::project_dir;

#[tokio::test]
async fn the_demo_shows_messages_on_nats_and_at_the_webhook() {
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(180),
        tokio::process::Command::new("bash")
            .arg(project_dir().join("scripts/demo.sh"))
            .env("COMETD_BRIDGE_BIN", env!("CARGO_BIN_EXE_cometd-bridge"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the demo finishes")
    .expect("run the demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("curl -X POST http://127.0.0.1:"), "the REST call is shown:\n{stdout}");
    assert!(stdout.contains("\"origin\":\"api\",\"state\":\"active\""), "and answered 201 active:\n{stdout}");
    for n in 1..=3 {
        let line = format!("NATS cometd.demo.orders.eu.new {{\"order\":{n}}} CometD-Channel=/orders/eu/new");
        assert!(stdout.contains(&line), "missing {line:?} in:\n{stdout}");
    }
    assert!(stdout.contains("\"data\":{\"level\":\"high\"}"), "{stdout}");
    assert!(stdout.contains("signature=ok"), "{stdout}");
    assert!(
        stdout.contains("cometd_bridge_messages_forwarded_total{subscription=\"orders\",sink=\"nats\"} 3"),
        "{stdout}"
    );
}
