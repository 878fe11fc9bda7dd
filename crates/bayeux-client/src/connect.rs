//! One `/meta/connect`: held back by the application's room and by the extensions, timed
//! from the server's advised hold.

use std::sync::Arc;
use std::time::Duration;

use super::error::Error;
use super::exchange::Context;
use super::message::{Advice, META_CONNECT, Message, Protocol};
use super::transport::Transport;

/// How long the server holds a `/meta/connect` when it has not said (faye's default).
const DEFAULT_CONNECT_HOLD: Duration = Duration::from_secs(60);

/// The longest the extensions may hold a `/meta/connect` back (also at most a quarter of
/// `connection_timeout`).
const MAX_CONNECT_HOLD_BACK: Duration = Duration::from_secs(1);

/// One `/meta/connect`. A probe (after a handshake or a failure) asks the server not to hold it, so
/// `open` returns at once; later ones are timed from the advised hold plus a margin.
pub(crate) async fn connect(
    ctx: Context,
    transport: Arc<Transport>,
    client_id: String,
    hold: Option<Duration>,
    probe: bool,
) -> Result<Message, Error> {
    if !probe {
        // Backpressure: ask for more events only when the application has room for them.
        ctx.shared.queue.wait_for_space().await;
    }
    // Extensions that hold the connect back (acknowledgements) wait here, bounded, and
    // outside the outgoing hooks' request_timeout.
    let options = &ctx.shared.options;
    if !options.extensions.is_empty() {
        let max_wait = options.connection_timeout.map_or(MAX_CONNECT_HOLD_BACK, |timeout| timeout / 4);
        let max_wait = max_wait.min(MAX_CONNECT_HOLD_BACK);
        for extension in &options.extensions {
            extension.before_connect(max_wait).await;
        }
    }
    let mut request =
        Message { client_id: Some(client_id), ..Message::new(META_CONNECT) }.with_protocol(Protocol {
            connection_type: Some(transport.connection_type().as_str().into()),
            ..Protocol::default()
        });
    let timeout = if probe {
        request.protocol_mut().advice = Some(Advice { timeout: Some(0), ..Advice::default() });
        ctx.shared.options.request_timeout
    } else {
        let hold = hold.unwrap_or(DEFAULT_CONNECT_HOLD);
        hold + hold / 5 + Duration::from_secs(2)
    };
    let mut replies = ctx.exchange(&transport, vec![request], timeout).await?;
    Ok(replies.remove(0))
}
