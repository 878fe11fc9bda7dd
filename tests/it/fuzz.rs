//! The admin API fuzzed from its own OpenAPI document by schemathesis (PyPI, installed by
//! `scripts/setup.sh` in `.tools/schemathesis`): no request may get a 5xx answer, and the
//! daemon must still be up afterwards. Bounded by a fixed seed and example count.

use crate::support::app::TestApp;
use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::project_dir;

#[tokio::test]
async fn schemathesis_finds_no_server_error() {
    let schemathesis = project_dir().join(".tools/schemathesis/bin/schemathesis");
    assert!(
        schemathesis.is_file(),
        "schemathesis is missing ({}); run `scripts/setup.sh`",
        schemathesis.display()
    );
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    // No message is published during the run, so subscriptions the fuzzer creates (with
    // whatever webhook URL it makes up) never send a request anywhere.
    let app = TestApp::spawn(&format!("[[sources]]\nname = \"demo\"\nurl = \"{}\"\n", faye.url())).await;
    app.wait_ready().await;
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(600),
        tokio::process::Command::new(&schemathesis)
            .args(["run", &app.url("/api/v1/openapi.json")])
            .args(["--checks", "not_a_server_error", "--max-examples", "40", "--seed", "1", "--workers", "1"])
            .args(["--request-timeout", "30", "--no-color"])
            .env("SCHEMATHESIS_HOOKS", "")
            // Its crash cache goes under the build directory, not into the source tree.
            .current_dir(env!("CARGO_TARGET_TMPDIR"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("schemathesis finishes within 10 minutes")
    .expect("run schemathesis");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found server errors:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("Tested: 15"), "every operation was exercised:\n{report}");
    let (status, _) = app.call("GET", "/healthz", None).await;
    assert_eq!(status, 200, "the daemon is still up");
    app.stop().await;
}
