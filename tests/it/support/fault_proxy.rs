//! A fault-injecting TCP proxy (a small toxiproxy): it listens on a free loopback port and
//! forwards every connection to one upstream address, while the test cuts connections,
//! blackholes them, delays them or cuts one after a number of bytes. Every control works
//! on live connections; [`FaultProxy::watch`] publishes counters the test awaits instead
//! of sleeping. Dropping the proxy stops every task it spawned and closes its sockets.
//!
//! Faults, as a client sees them:
//! - a cut resets both sockets (RST, through a zero linger), so both ends notice at once,
//!   as when a NAT or load balancer drops a flow. What was on its way is lost with it, as
//!   on a real broken link: bytes the proxy had not read yet, or had read and not written
//!   (latency queues included). [`ProxyStats::dropped_down`] counts those bound for the
//!   client;
//! - a blackhole swallows bytes both ways and answers nothing, without closing anything;
//! - latency delays every chunk in each direction by the same amount, in order, without
//!   slowing throughput down (a queue of chunks with their due times per direction).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The largest chunk read at once; latency and byte counts apply per chunk read.
const CHUNK: usize = 16 * 1024;

/// Counters the test can await, through [`FaultProxy::watch`] or [`FaultProxy::wait_for`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted from clients so far, blackholed ones included.
    pub accepted: u64,
    /// Connections open now.
    pub live: u64,
    /// Connections the proxy has cut (by [`FaultProxy::cut_all`] or
    /// [`FaultProxy::cut_after`]).
    pub cut: u64,
    /// Bytes from upstream that cuts kept from clients (what a broken link loses in
    /// flight): waiting in the upstream socket, read and not written yet, or written and
    /// not sent yet.
    pub dropped_down: u64,
}

/// The faults in force; each connection reads them as it goes.
#[derive(Clone, Debug, Default)]
struct Faults {
    blackhole: bool,
    latency: Duration,
    /// Bumped by `cut_all`: a connection accepted under an older value is cut.
    cut_epoch: u64,
}

struct Shared {
    upstream: SocketAddr,
    faults: watch::Sender<Faults>,
    stats: watch::Sender<ProxyStats>,
    /// Bytes that may still pass upstream→client before the connection carrying the last
    /// of them is cut; `None` when no cut is armed.
    cut_budget: Mutex<Option<u64>>,
}

/// A running proxy; see the module docs.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Starts forwarding connections from a free `127.0.0.1` port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            upstream,
            faults: watch::Sender::new(Faults::default()),
            stats: watch::Sender::new(ProxyStats::default()),
            cut_budget: Mutex::new(None),
        });
        let stop = CancellationToken::new();
        tokio::spawn(stop.clone().run_until_cancelled_owned(accept(listener, shared.clone(), stop.clone())));
        FaultProxy { addr, shared, stop }
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<proxy><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `ws://<proxy><path>`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Resets every connection open now, both ways. Later connections are not affected.
    pub fn cut_all(&self) {
        self.shared.faults.send_modify(|faults| faults.cut_epoch += 1);
    }

    /// Blackholes (`true`) or restores (`false`) the link. While on, open connections
    /// swallow what they read both ways, and new ones are accepted but never connected
    /// upstream; none is closed. A connection that swallowed bytes stays blackholed after
    /// it is turned off, since its byte streams have holes; the others, and connections
    /// opened afterwards, are forwarded again.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.faults.send_modify(|faults| faults.blackhole = on);
    }

    /// Delays each chunk read from now on, in each direction, by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults.send_modify(|faults| faults.latency = latency);
    }

    /// Arms a one-shot cut: once `bytes` more bytes have passed upstream→client (counted
    /// over all connections, open now or later), the connection carrying the last of them
    /// forwards exactly up to that byte and is cut; then the proxy forwards normally
    /// again. Client→upstream bytes are not counted.
    pub fn cut_after(&self, bytes: u64) {
        *self.shared.cut_budget.lock().expect("budget lock") = Some(bytes);
    }

    /// The counters now.
    pub fn stats(&self) -> ProxyStats {
        *self.shared.stats.borrow()
    }

    /// A receiver that sees every change of the counters.
    pub fn watch(&self) -> watch::Receiver<ProxyStats> {
        self.shared.stats.subscribe()
    }

    /// Waits until the counters satisfy `condition` and returns them; fails the test after
    /// `within`, naming `what`.
    pub async fn wait_for(
        &self,
        what: &str,
        within: Duration,
        condition: impl FnMut(&ProxyStats) -> bool,
    ) -> ProxyStats {
        let mut stats = self.watch();
        match tokio::time::timeout(within, stats.wait_for(condition)).await {
            Ok(Ok(stats)) => *stats,
            _ => panic!("the proxy did not see {what} within {within:?}; it saw {:?}", self.stats()),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        // A failed accept is one connection's failure (the client gave up), not the proxy's.
        let Ok((client, _)) = listener.accept().await else { continue };
        shared.stats.send_modify(|stats| {
            stats.accepted += 1;
            stats.live += 1;
        });
        let shared = shared.clone();
        tokio::spawn(stop.clone().run_until_cancelled_owned(async move {
            let cut = serve(client, &shared).await;
            shared.stats.send_modify(|stats| {
                stats.live -= 1;
                stats.cut += u64::from(cut);
            });
        }));
    }
}

/// How one direction of a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The source closed its side; that was passed on.
    Eof,
    /// The armed byte budget ran out here.
    Cut,
    /// A socket failed, or a blackholed client gave up.
    Failed,
}

/// One connection's state shared by its two directions.
#[derive(Default)]
struct Connection {
    /// Set once the connection has swallowed bytes: from then on it swallows everything.
    holed: AtomicBool,
    /// Bytes read from upstream and not written to the client yet.
    in_flight_down: AtomicU64,
}

/// Forwards one connection until it ends; returns whether the proxy cut it.
async fn serve(mut client: TcpStream, shared: &Shared) -> bool {
    let mut faults = shared.faults.subscribe();
    let (epoch, blackhole) = {
        let faults = faults.borrow_and_update();
        (faults.cut_epoch, faults.blackhole)
    };
    let cut_signal = async move {
        let _ = faults.wait_for(|faults| faults.cut_epoch != epoch).await;
    };
    let connection = Connection { holed: AtomicBool::new(blackhole), ..Connection::default() };
    if blackhole {
        let (from, _) = client.split();
        let cut = tokio::select! {
            _ = cut_signal => true,
            _ = pipe(from, None, shared, &connection, Direction::Up) => false,
        };
        reset(cut, &[&client]);
        return cut;
    }
    let Ok(mut upstream) = TcpStream::connect(shared.upstream).await else {
        reset(true, &[&client]);
        return false;
    };
    // Written means sent: Nagle's algorithm would hold small writes back, and a cut would
    // then destroy bytes the proxy had already "forwarded".
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (cut, failed) = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let up = pipe(client_read, Some(upstream_write), shared, &connection, Direction::Up);
        let down = pipe(upstream_read, Some(client_write), shared, &connection, Direction::Down);
        tokio::pin!(up, down, cut_signal);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let end = tokio::select! {
                _ = &mut cut_signal => End::Cut,
                end = &mut up, if !up_done => { up_done = true; end }
                end = &mut down, if !down_done => { down_done = true; end }
            };
            match end {
                End::Eof if up_done && down_done => break (false, false),
                End::Eof => {}
                End::Cut => break (true, false),
                End::Failed => break (false, true),
            }
        }
    };
    if cut {
        let dropped = connection.in_flight_down.load(Ordering::Relaxed)
            + queued(&upstream, libc::FIONREAD)
            + queued(&client, libc::SIOCOUTQNSD);
        shared.stats.send_modify(|stats| stats.dropped_down += dropped);
    }
    reset(cut || failed, &[&client, &upstream]);
    cut
}

/// The bytes `stream` holds: received and not read yet (`FIONREAD`), or written and not
/// sent yet (`SIOCOUTQNSD`).
fn queued(stream: &TcpStream, request: libc::Ioctl) -> u64 {
    let mut bytes: libc::c_int = 0;
    // SAFETY: both requests write one c_int through the pointer, which points to one; the
    // descriptor stays open while `stream` is borrowed.
    let result = unsafe { libc::ioctl(stream.as_raw_fd(), request, &mut bytes) };
    if result == 0 { u64::try_from(bytes).unwrap_or(0) } else { 0 }
}

/// When `now`, sets a zero linger on `streams`, so that dropping them sends RST.
fn reset(now: bool, streams: &[&TcpStream]) {
    if now {
        for stream in streams {
            let _ = stream.set_zero_linger();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Client → upstream.
    Up,
    /// Upstream → client: the direction `cut_after` counts.
    Down,
}

/// A chunk on its way, due at `at`; `cut` ends the connection once it is written.
struct Delayed {
    at: Instant,
    chunk: Bytes,
    cut: bool,
}

/// Copies `from` into `to` through a queue that holds each chunk until it is due. Once the
/// connection is `holed` (and always without `to`: a connection accepted while
/// blackholed) everything read is swallowed.
async fn pipe(
    mut from: ReadHalf<'_>,
    to: Option<WriteHalf<'_>>,
    shared: &Shared,
    connection: &Connection,
    direction: Direction,
) -> End {
    let holed = &connection.holed;
    let (queue, mut due) = mpsc::unbounded_channel::<Delayed>();
    let read = async move {
        let mut buffer = vec![0; CHUNK];
        loop {
            let Ok(read) = from.read(&mut buffer).await else { return End::Failed };
            let latency = {
                let faults = shared.faults.borrow();
                if faults.blackhole {
                    holed.store(true, Ordering::Relaxed);
                }
                faults.latency
            };
            if holed.load(Ordering::Relaxed) {
                match (read, direction) {
                    // Upstream closing a blackholed connection must not show; the client
                    // closing it ends it.
                    (0, Direction::Down) => return std::future::pending().await,
                    (0, Direction::Up) => return End::Failed,
                    _ => continue,
                }
            }
            if read == 0 {
                return End::Eof;
            }
            if direction == Direction::Down {
                connection.in_flight_down.fetch_add(read as u64, Ordering::Relaxed);
            }
            let mut chunk = Bytes::copy_from_slice(&buffer[..read]);
            let cut = direction == Direction::Down && spend(&shared.cut_budget, &mut chunk);
            let _ = queue.send(Delayed { at: Instant::now() + latency, chunk, cut });
            if cut {
                return End::Eof;
            }
        }
    };
    let write = async move {
        let Some(mut to) = to else { return std::future::pending().await };
        while let Some(delayed) = due.recv().await {
            tokio::time::sleep_until(delayed.at).await;
            if to.write_all(&delayed.chunk).await.is_err() {
                return End::Failed;
            }
            if direction == Direction::Down {
                connection.in_flight_down.fetch_sub(delayed.chunk.len() as u64, Ordering::Relaxed);
            }
            if delayed.cut {
                return End::Cut;
            }
        }
        // The reader is done and everything it queued is written: pass the close on.
        match to.shutdown().await {
            Ok(()) => End::Eof,
            Err(_) => End::Failed,
        }
    };
    tokio::pin!(read, write);
    tokio::select! {
        end = &mut read => match end {
            End::Eof => write.await,
            other => other,
        },
        end = &mut write => end,
    }
}

/// Takes `chunk` out of the armed budget; when it runs out, shortens `chunk` to what was
/// left, disarms the budget and returns true.
fn spend(budget: &Mutex<Option<u64>>, chunk: &mut Bytes) -> bool {
    let mut budget = budget.lock().expect("budget lock");
    let Some(left) = *budget else { return false };
    let length = chunk.len() as u64;
    if length < left {
        *budget = Some(left - length);
        return false;
    }
    chunk.truncate(usize::try_from(left).expect("fits, being below a chunk's length"));
    *budget = None;
    true
}
