//! The status page at `GET /` in a real headless Chromium (WebDriver): it loads without
//! console errors, shows the source connected, the subscription's counters moving and its
//! dead letters, retries one and discards another with clicks, and asks for the token
//! when the API has one. `UPDATE_SCREENSHOT=1` writes `docs/status-page.png` from it.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::app::TestApp;
use crate::support::browser::Browser;
use crate::support::peer::open;
use crate::support::project_dir;
use crate::support::scenario::{faye, source, webhook};
use crate::support::webhook::WebhookReceiver;

/// Server-provided text the page must show as text, never run or parse.
const MARKUP: &str = "<img src=x onerror=alert(1)><b>bold</b>";

/// The window the page is shown in (and the screenshot's size).
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;

async fn publish(
    faye_url: String,
    channel: &str,
    messages: impl IntoIterator<Item = Value>,
    pause: Duration,
) {
    let client = open(cometd_bridge::cometd::Client::builder(faye_url)).await;
    for data in messages {
        client.publish(channel, data).await.expect("publish");
        tokio::time::sleep(pause).await;
    }
    client.close().await;
}

/// The page's text in a table cell, e.g. `cell("sources", "demo", ".badge")`.
fn cell(table: &str, key: &str, css: &str) -> String {
    format!("#{table}-body tr[data-key=\"{key}\"] {css}")
}

#[tokio::test]
async fn the_status_page_shows_the_bridge_and_retries_and_discards_dead_letters_with_clicks() {
    let faye = faye().await;
    // Two permanent failures (dead letters at once), then 200.
    let mut receiver = WebhookReceiver::start([400, 400]).await;
    let app =
        TestApp::spawn(&format!("{}{}", source(&faye), webhook("orders", "/orders/**", &receiver.url())))
            .await;
    app.wait_ready().await;

    let response = crate::support::http_client().get(app.url("/")).send().await.expect("GET /");
    assert_eq!(response.status(), 200);
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert_eq!(header("content-type"), "text/html; charset=utf-8");
    assert_eq!(header("cache-control"), "no-cache");
    let policy = header("content-security-policy");
    assert!(policy.starts_with("default-src 'none'; script-src 'sha256-"), "{policy}");
    assert!(policy.contains("connect-src 'self'") && !policy.contains("unsafe"), "{policy}");

    publish(
        faye.url(),
        "/orders/new",
        [json!({ "order": 1, "note": MARKUP }), json!({ "order": 2 })],
        Duration::ZERO,
    )
    .await;
    let first_attempt = receiver.next().await;
    assert_eq!((first_attempt.status, receiver.next().await.status), (400, 400));
    let letters = app.wait_for_dead_letters(2).await;
    let id = |letter: &Value| letter["id"].as_str().expect("id").to_string();
    let (retried, discarded) = (id(&letters[0]), id(&letters[1]));
    assert_eq!(letters[0]["message"]["data"], json!({ "order": 1, "note": MARKUP }));

    let started = std::time::Instant::now();
    let browser = Browser::start(WIDTH, HEIGHT).await;
    let opened = std::time::Instant::now();
    browser.goto(&app.url("/")).await;
    browser
        .wait_for("the source shown as connected", async || {
            (browser.text_of(&cell("sources", "demo", ".badge")).await? == "connected").then_some(())
        })
        .await;
    let loaded = std::time::Instant::now();
    let client_id = browser.text_of(&cell("sources", "demo", "td:nth-child(4)")).await.expect("client id");
    let (_, sources) = app.call("GET", "/api/v1/sources", None).await;
    assert_eq!(client_id, sources[0]["client_id"].as_str().expect("a client id"), "the session's id");
    assert_eq!(browser.text_of("#status-text").await.expect("status").split(" · ").next(), Some("Live"));

    let row = browser.text_of(&cell("subscriptions", "orders", "")).await.expect("the subscription's row");
    for shown in ["orders", "demo", "/orders/**", "webhook", "active"] {
        assert!(row.contains(shown), "{shown:?} missing from the subscription row: {row:?}");
    }
    for dead_letter in [&retried, &discarded] {
        browser
            .wait_for("the dead letters listed", async || {
                browser.text_of(&cell("dead-letters", dead_letter, "")).await
            })
            .await;
    }
    let listed = browser.text_of(&cell("dead-letters", &retried, "")).await.expect("the dead letter's row");
    assert!(listed.contains("orders") && listed.contains("rejected: HTTP 400"), "{listed:?}");
    let shown = browser
        .execute(
            "const pre = document.querySelector(arguments[0]); return [pre.textContent, pre.children.length];",
            vec![json!(cell("dead-letters", &retried, "pre"))],
        )
        .await;
    assert!(shown[0].as_str().is_some_and(|text| text.contains(MARKUP)), "the message as text: {shown}");
    assert_eq!(shown[1], 0, "no markup from the message");

    // Six more messages, delivered: the page follows the counters and draws their rate.
    publish(faye.url(), "/orders/new", (3..9).map(|n| json!({ "order": n })), Duration::from_millis(450))
        .await;
    for _ in 3..9 {
        assert_eq!(receiver.next().await.status, 200);
    }
    browser
        .wait_for("the counters to follow", async || {
            let counters = [".num:nth-child(6)", ".num:nth-child(7)", ".num:nth-child(8)"];
            let mut shown = Vec::new();
            for css in counters {
                shown.push(browser.text_of(&cell("subscriptions", "orders", css)).await?);
            }
            (shown == ["8", "6", "2"]).then_some(())
        })
        .await;
    let rate = browser.execute(
        "return document.querySelector('#subscriptions-body tr[data-key=\"orders\"] .rate').title;",
        vec![],
    );
    let rate = rate.await;
    let rate = rate.as_str().expect("the sparkline's title");
    assert!(rate.starts_with("messages received per second") && !rate.ends_with("peak 0.0/s"), "{rate}");

    let update_screenshot = std::env::var("UPDATE_SCREENSHOT").as_deref() == Ok("1");
    if update_screenshot {
        // A few more refreshes, so that the picture's sparklines have a shape.
        browser
            .wait_for("five rates in the sparkline", async || {
                let title = browser
                    .execute("return document.querySelector('#subscriptions-body .rate').title;", vec![]);
                title.await.as_str()?.contains("over the last 5 refreshes").then_some(())
            })
            .await;
    }
    let screenshot = browser.screenshot().await;
    assert_eq!(&screenshot[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let size = |at: usize| u32::from_be_bytes(screenshot[at..at + 4].try_into().expect("4 bytes"));
    assert_eq!((size(16), size(20)), (WIDTH, HEIGHT), "the screenshot is the window");
    if update_screenshot {
        let path = project_dir().join("docs/status-page.png");
        std::fs::create_dir_all(path.parent().expect("docs")).expect("docs/");
        std::fs::write(&path, &screenshot).expect("write the screenshot");
    }

    receiver.heal();
    browser.click(&browser.find(&cell("dead-letters", &retried, "button.retry")).await).await;
    browser
        .wait_for("the retried dead letter to leave the page", async || {
            browser.try_find(&cell("dead-letters", &retried, "")).await.is_none().then_some(())
        })
        .await;
    let delivered = receiver.next().await;
    assert_eq!(
        (delivered.status, delivered.json()["data"].clone()),
        (200, json!({ "order": 1, "note": MARKUP }))
    );
    assert_eq!(delivered.header("webhook-id"), first_attempt.header("webhook-id"), "the same delivery id");

    // Discarding asks first: Cancel keeps the dead letter, OK discards it.
    let discard = cell("dead-letters", &discarded, "button.discard");
    browser.click(&browser.find(&discard).await).await;
    let question = browser.wait_for("the confirmation", async || browser.alert_text().await).await;
    assert!(question.contains(&discarded) && question.contains("orders"), "{question}");
    browser.dismiss_alert().await;
    assert!(browser.is_displayed(&browser.find(&discard).await).await, "still listed after Cancel");
    assert_eq!(app.dead_letters().await.len(), 1);
    browser.click(&browser.find(&discard).await).await;
    browser.wait_for("the confirmation", async || browser.alert_text().await).await;
    browser.accept_alert().await;
    browser
        .wait_for("no dead letter left on the page", async || {
            browser.shows("#dead-letters .empty").await.then_some(())
        })
        .await;
    assert!(app.dead_letters().await.is_empty());
    assert!(receiver.try_next().is_none(), "the discarded one was not delivered");

    let log = browser.console_log().await;
    let severe: Vec<_> = log.iter().filter(|entry| entry.level == "SEVERE").collect();
    assert!(severe.is_empty(), "console errors: {severe:#?}");
    println!(
        "browser started in {:?}, page showed the source {:?} after opening, whole test {:?}",
        opened - started,
        loaded - opened,
        started.elapsed()
    );

    // The bridge goes away: the page says its refresh fails.
    app.stop().await;
    browser
        .wait_for("the status to say the refresh fails", async || {
            let failing = browser.shows("#status.error").await;
            let text = browser.text_of("#status-text").await?;
            (failing && text.starts_with("Refresh failing since")).then_some(())
        })
        .await;
}

#[tokio::test]
async fn the_status_page_asks_for_the_token_and_keeps_it_for_the_tab() {
    let faye = faye().await;
    let app = TestApp::spawn_in(&source(&faye), tempfile::tempdir().expect("state"), Some("s3cret")).await;
    app.wait_ready().await;
    let page = crate::support::http_client().get(app.url("/")).send().await.expect("GET /");
    assert_eq!(page.status(), 200, "the page itself needs no token");

    let browser = Browser::start(WIDTH, HEIGHT).await;
    browser.goto(&app.url("/")).await;
    browser.wait_for("the token prompt", async || browser.shows("#token").await.then_some(())).await;
    assert!(!browser.shows("#content").await, "no data before the token");
    assert!(!browser.shows("#login-error").await, "no complaint before a token was tried");

    browser.send_keys(&browser.find("#token").await, "wrong").await;
    browser.click(&browser.find("#login-button").await).await;
    let complaint = browser
        .wait_for("the wrong token refused", async || {
            browser.shows("#login-error").await.then_some(())?;
            browser.text_of("#login-error").await
        })
        .await;
    assert!(complaint.contains("refused"), "{complaint}");
    assert!(browser.shows("#token").await && !browser.shows("#content").await, "still asking");
    let stored = browser.execute("return sessionStorage.getItem('cometd-bridge.token');", vec![]).await;
    assert_eq!(stored, Value::Null, "a refused token is not kept");

    browser.send_keys(&browser.find("#token").await, "s3cret").await;
    browser.click(&browser.find("#login-button").await).await;
    let connected =
        async || (browser.text_of(&cell("sources", "demo", ".badge")).await? == "connected").then_some(());
    browser.wait_for("the source shown after the right token", connected).await;
    assert!(!browser.shows("#login").await, "the prompt is gone");
    let stored = browser.execute("return sessionStorage.getItem('cometd-bridge.token');", vec![]).await;
    assert_eq!(stored, "s3cret");

    // The tab keeps it: a reload shows the data without asking.
    browser.goto(&app.url("/")).await;
    browser.wait_for("the source shown after a reload", connected).await;
    assert!(!browser.shows("#login").await, "not asked again");

    // The only console errors are the refused calls (Chromium logs every 401 load).
    let log = browser.console_log().await;
    let unexpected: Vec<_> =
        log.iter().filter(|entry| entry.level == "SEVERE" && !entry.message.contains("401")).collect();
    assert!(unexpected.is_empty(), "console errors: {unexpected:#?}");
    drop(browser);
    app.stop().await;
}
