//! Redirects are never followed: a 307 from the Bayeux URL (either transport) or from the
//! Salesforce login URL is an error naming where it points, and nothing (no header, no
//! password) reaches the other host. Hand-written listeners: a real server does not
//! redirect on demand.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cometd_bridge::cometd::{
    Client, ConnectionType, Error, SalesforceAuth, SalesforceCredentials, SalesforceFlow, TransportErrorKind,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::peer::WAIT;

/// A listener that counts every connection made to it (and answers nothing).
async fn other_host() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://127.0.0.1:{}/elsewhere", listener.local_addr().expect("address").port());
    let reached = Arc::new(AtomicUsize::new(0));
    let counted = reached.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (url, reached)
}

/// A listener that answers every request with `307` to `location`.
async fn redirector(location: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://127.0.0.1:{}/cometd", listener.local_addr().expect("address").port());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let location = location.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let answer = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn a_redirect_from_the_bayeux_url_is_not_followed() {
    for kind in [ConnectionType::LongPolling, ConnectionType::WebSocket] {
        let (elsewhere, reached) = other_host().await;
        let url = redirector(elsewhere.clone()).await;
        let client = Client::builder(url)
            .connection_types([kind])
            .header("authorization", "Bearer secret")
            .connection_timeout(Some(Duration::from_secs(5)))
            .build()
            .expect("options");
        let error =
            tokio::time::timeout(WAIT, client.open()).await.expect("open gives up").expect_err("redirected");
        assert_eq!(
            error.transport_kind(),
            Some(&TransportErrorKind::Redirect { status: 307, location: elsewhere.clone() }),
            "{kind}: {error}"
        );
        assert!(error.to_string().contains(&elsewhere), "{kind}: names the location: {error}");
        assert_eq!(reached.load(Ordering::SeqCst), 0, "{kind}: nothing reached the other host");
    }
}

#[tokio::test]
async fn a_redirect_from_the_login_url_is_not_followed() {
    let (elsewhere, reached) = other_host().await;
    let login = redirector(format!("{elsewhere}/services/oauth2/token")).await;
    let auth = SalesforceAuth::new(SalesforceCredentials {
        login_url: login,
        client_id: "app".into(),
        client_secret: Some("client-secret".into()),
        flow: SalesforceFlow::Password { username: "user".into(), password: "password".into() },
    })
    .expect("credentials");
    let error =
        tokio::time::timeout(WAIT, auth.login()).await.expect("login gives up").expect_err("redirected");
    assert!(matches!(error, Error::Authentication { retryable: false, .. }), "{error}");
    assert!(error.to_string().contains("307") && error.to_string().contains(&elsewhere), "{error}");
    assert_eq!(reached.load(Ordering::SeqCst), 0, "the password went nowhere else");
}
