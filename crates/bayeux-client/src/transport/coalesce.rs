//! Read coalescing for a busy websocket.
//!
//! Servers such as faye write one frame per message, so a client that keeps up is woken by
//! the kernel once per message, and most of its CPU goes to those wake-ups rather than to
//! the messages. When a socket has woken its reader more than
//! [`ReadCoalescing::wakeups_per_window`] times in one [`WINDOW`], the stream leaves the
//! runtime's readiness polling and reads on a timer instead, every
//! [`ReadCoalescing::interval`], taking whatever has arrived in one go. It goes back to
//! readiness polling after three ticks in a row find the socket empty, or when a window's
//! bytes fall to half of those of the window that made it busy. A quiet or moderate stream
//! keeps its latency; a busy one trades up to about two intervals of delay (the runtime's timer
//! has millisecond resolution) for a fraction of the wake-ups.

use std::future::Future;
use std::io::{Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// The period over which a socket's wake-ups and bytes are counted.
pub const WINDOW: Duration = Duration::from_millis(10);

/// Consecutive empty ticks after which a timed socket goes back to readiness polling: a
/// busy stream has short gaps (a server's garbage collection, say) that should not end it.
const EMPTY_TICKS: u32 = 3;

/// When a busy websocket switches to timed reads, and how often it reads then. See
/// [`ClientOptions::read_coalescing`](crate::ClientOptions::read_coalescing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadCoalescing {
    /// Wake-ups within one 10 ms window that make the socket busy.
    pub wakeups_per_window: u32,
    /// How often a busy socket is read.
    pub interval: Duration,
}

impl Default for ReadCoalescing {
    /// Busy from 20,000 wake-ups a second; read every millisecond while busy.
    fn default() -> Self {
        ReadCoalescing { wakeups_per_window: 200, interval: Duration::from_millis(1) }
    }
}

/// A client's coalescing policy and the count of its sockets' switches to timed reads
/// ([`Client::timed_read_switches`](crate::Client::timed_read_switches)), handed to every
/// websocket connection it opens.
#[derive(Clone, Debug)]
pub(crate) struct Coalescing {
    pub(crate) policy: Option<ReadCoalescing>,
    pub(crate) switches: Arc<AtomicU64>,
}

/// A TCP stream that reads on a timer while busy (see the module docs). Without a policy
/// it is the plain stream.
pub(crate) struct CoalescingStream {
    mode: Mode,
    policy: Option<ReadCoalescing>,
    /// The current window: when it started, and the wake-ups and bytes in it.
    window_start: Instant,
    wakeups: u32,
    bytes: usize,
    /// Whether the last polled read found the socket empty: the next data is a wake-up.
    drained: bool,
    /// While timed: a window with fewer bytes than this goes back to readiness polling.
    quiet_bytes: usize,
    /// While timed: whether the current tick has read anything yet.
    tick_read: bool,
    /// While timed: ticks in a row that found nothing.
    empty_ticks: u32,
    /// While timed: the reader's waker. A write that has to go back to readiness polling
    /// wakes it, so that the reader registers for readiness too.
    reader: Option<Waker>,
    /// Counts each switch to timed reads, for the client that owns the stream.
    switches: Option<Arc<AtomicU64>>,
}

enum Mode {
    /// Readiness polling through the runtime.
    Polled(TcpStream),
    /// Out of the runtime's poller; read when `tick` fires.
    Timed { socket: std::net::TcpStream, tick: Pin<Box<Sleep>> },
    /// Only after switching failed: the socket is gone.
    Lost,
}

fn lost() -> std::io::Error {
    std::io::Error::other("the socket was lost switching between polled and timed reads")
}

impl CoalescingStream {
    /// Wraps a connected stream; with `policy` `None` it never coalesces.
    pub(crate) fn new(stream: TcpStream, policy: Option<ReadCoalescing>) -> Self {
        CoalescingStream {
            mode: Mode::Polled(stream),
            policy,
            window_start: Instant::now(),
            wakeups: 0,
            bytes: 0,
            drained: false,
            quiet_bytes: 0,
            tick_read: false,
            empty_ticks: 0,
            reader: None,
            switches: None,
        }
    }

    /// Wraps a connected stream with a client's policy, counting its switches there.
    pub(crate) fn counted(stream: TcpStream, coalescing: &Coalescing) -> Self {
        CoalescingStream {
            switches: Some(coalescing.switches.clone()),
            ..Self::new(stream, coalescing.policy)
        }
    }

    /// Whether the stream is reading on its timer.
    #[cfg(test)]
    pub(crate) fn is_timed(&self) -> bool {
        matches!(self.mode, Mode::Timed { .. })
    }

    fn start_window(&mut self, now: Instant) {
        self.window_start = now;
        self.wakeups = 0;
        self.bytes = 0;
    }

    /// Counts a polled read; returns whether the window it closed was busy.
    fn count_polled(&mut self, read: usize, wakeup: bool) -> bool {
        let now = Instant::now();
        let mut busy = false;
        if now.duration_since(self.window_start) >= WINDOW {
            if let Some(policy) = self.policy
                && self.wakeups >= policy.wakeups_per_window
            {
                busy = true;
                self.quiet_bytes = self.bytes / 2;
            }
            self.start_window(now);
        }
        self.bytes += read;
        self.wakeups += u32::from(wakeup);
        busy
    }

    fn switch_to_timed(&mut self, interval: Duration) -> std::io::Result<()> {
        if let Mode::Polled(stream) = std::mem::replace(&mut self.mode, Mode::Lost) {
            let socket = stream.into_std()?;
            self.mode = Mode::Timed { socket, tick: Box::pin(tokio::time::sleep(interval)) };
            self.tick_read = false;
            self.empty_ticks = 0;
            self.start_window(Instant::now());
            if let Some(switches) = &self.switches {
                switches.fetch_add(1, Ordering::Relaxed);
            }
            tracing::trace!("websocket busy: reading on a timer");
        }
        Ok(())
    }

    fn switch_to_polled(&mut self) -> std::io::Result<()> {
        if let Mode::Timed { socket, .. } = std::mem::replace(&mut self.mode, Mode::Lost) {
            self.mode = Mode::Polled(TcpStream::from_std(socket)?);
            self.start_window(Instant::now());
            self.drained = false;
            if let Some(reader) = self.reader.take() {
                reader.wake();
            }
            tracing::trace!("websocket quiet: reading on readiness");
        }
        Ok(())
    }

    fn poll_read_polled(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let Mode::Polled(stream) = &mut self.mode else { return Poll::Ready(Err(lost())) };
        let before = buf.filled().len();
        match Pin::new(stream).poll_read(cx, buf) {
            Poll::Pending => {
                self.drained = true;
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                let wakeup = std::mem::take(&mut self.drained);
                if self.count_polled(read, wakeup)
                    && let Some(policy) = self.policy
                {
                    self.switch_to_timed(policy.interval)?;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
        }
    }

    fn poll_read_timed(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let interval = self.policy.map_or(Duration::from_millis(1), |policy| policy.interval);
        loop {
            let Mode::Timed { socket, tick } = &mut self.mode else { return Poll::Ready(Err(lost())) };
            if !self.tick_read {
                self.reader = Some(cx.waker().clone());
                if tick.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            match (&*socket).read(buf.initialize_unfilled()) {
                Ok(read) => {
                    buf.advance(read);
                    self.tick_read = true;
                    self.bytes += read;
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    // This tick has taken everything there was.
                    let now = Instant::now();
                    let window_over = now.duration_since(self.window_start) >= WINDOW;
                    self.empty_ticks = if self.tick_read { 0 } else { self.empty_ticks + 1 };
                    if self.empty_ticks >= EMPTY_TICKS || (window_over && self.bytes < self.quiet_bytes) {
                        self.switch_to_polled()?;
                        return self.poll_read_polled(cx, buf);
                    }
                    tick.as_mut().reset(tokio::time::Instant::now() + interval);
                    if window_over {
                        self.start_window(now);
                    }
                    self.tick_read = false;
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncRead for CoalescingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match this.mode {
            Mode::Polled(_) => this.poll_read_polled(cx, buf),
            Mode::Timed { .. } => this.poll_read_timed(cx, buf),
            Mode::Lost => Poll::Ready(Err(lost())),
        }
    }
}

impl AsyncWrite for CoalescingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if let Mode::Timed { socket, .. } = &mut this.mode {
            match (&*socket).write(data) {
                Ok(written) => return Poll::Ready(Ok(written)),
                // A full send buffer needs the runtime to say when it drains.
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => this.switch_to_polled()?,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
        match &mut this.mode {
            Mode::Polled(stream) => Pin::new(stream).poll_write(cx, data),
            _ => Poll::Ready(Err(lost())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.mode {
            Mode::Polled(stream) => Pin::new(stream).poll_flush(cx),
            // TCP has nothing to flush.
            Mode::Timed { .. } => Poll::Ready(Ok(())),
            Mode::Lost => Poll::Ready(Err(lost())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.mode {
            Mode::Polled(stream) => Pin::new(stream).poll_shutdown(cx),
            Mode::Timed { socket, .. } => Poll::Ready(socket.shutdown(std::net::Shutdown::Write)),
            Mode::Lost => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair on loopback: our stream with `policy`, and the server's end.
    async fn pair(policy: Option<ReadCoalescing>) -> (CoalescingStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (client, server) = tokio::join!(TcpStream::connect(address), listener.accept());
        let client = client.expect("connect");
        client.set_nodelay(true).expect("nodelay");
        let (server, _) = server.expect("accept");
        server.set_nodelay(true).expect("nodelay");
        (CoalescingStream::new(client, policy), server)
    }

    /// Sends numbered 4-byte chunks one at a time, each read before the next is sent, so
    /// that every chunk wakes the reader, until the stream reads on its timer (at most
    /// 5 s). Returns the next number.
    async fn make_busy(stream: &mut CoalescingStream, server: &mut TcpStream) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut next = 0u32;
        while !stream.is_timed() {
            assert!(Instant::now() < deadline, "the stream never switched to timed reads");
            server.write_all(&next.to_be_bytes()).await.expect("write");
            let mut chunk = [0; 4];
            stream.read_exact(&mut chunk).await.expect("read");
            assert_eq!(u32::from_be_bytes(chunk), next);
            next += 1;
        }
        next
    }

    const EAGER: ReadCoalescing =
        ReadCoalescing { wakeups_per_window: 2, interval: Duration::from_millis(1) };

    #[tokio::test]
    async fn a_busy_socket_reads_on_its_timer_and_loses_nothing() {
        let (mut stream, mut server) = pair(Some(EAGER)).await;
        let first = make_busy(&mut stream, &mut server).await;
        // A burst while timed arrives whole and in order.
        let burst: Vec<u8> = (first..first + 10_000).flat_map(u32::to_be_bytes).collect();
        let writer = tokio::spawn(async move {
            server.write_all(&burst).await.expect("write");
            server
        });
        let mut received = vec![0; 40_000];
        stream.read_exact(&mut received).await.expect("read");
        let numbers: Vec<u32> =
            received.chunks(4).map(|chunk| u32::from_be_bytes(chunk.try_into().expect("4 bytes"))).collect();
        assert_eq!(numbers, (first..first + 10_000).collect::<Vec<_>>());
        // Writes go out while timed.
        let mut server = writer.await.expect("writer");
        stream.write_all(b"ping").await.expect("write");
        let mut ping = [0; 4];
        server.read_exact(&mut ping).await.expect("read");
        assert_eq!(&ping, b"ping");
    }

    #[tokio::test]
    async fn a_quiet_socket_goes_back_to_readiness() {
        let (mut stream, mut server) = pair(Some(EAGER)).await;
        make_busy(&mut stream, &mut server).await;
        // Nothing arrives: the next tick finds the socket empty.
        let mut chunk = [0; 4];
        let waited = tokio::time::timeout(Duration::from_millis(50), stream.read_exact(&mut chunk)).await;
        assert!(waited.is_err(), "nothing was sent");
        assert!(!stream.is_timed(), "an empty tick returns the socket to readiness polling");
        server.write_all(b"late").await.expect("write");
        stream.read_exact(&mut chunk).await.expect("read");
        assert_eq!(&chunk, b"late");
    }

    #[tokio::test]
    async fn without_a_policy_the_stream_never_switches() {
        let (mut stream, mut server) = pair(None).await;
        let deadline = Instant::now() + Duration::from_millis(100);
        let mut chunk = [0; 4];
        while Instant::now() < deadline {
            server.write_all(b"tick").await.expect("write");
            stream.read_exact(&mut chunk).await.expect("read");
            assert!(!stream.is_timed());
        }
    }

    #[tokio::test]
    async fn a_write_that_must_wait_wakes_the_timed_reader() {
        let (mut stream, mut server) = pair(Some(EAGER)).await;
        make_busy(&mut stream, &mut server).await;
        let (mut reader, mut writer) = tokio::io::split(stream);
        // The reader waits on the timer; the writer fills the send buffer, which sends the
        // stream back to readiness polling while the reader is parked on the timer.
        let read = tokio::spawn(async move {
            let mut chunk = [0; 4];
            reader.read_exact(&mut chunk).await.map(|_| chunk)
        });
        let big = vec![7u8; 16 * 1024 * 1024];
        let write = tokio::spawn(async move { writer.write_all(&big).await });
        let mut drained = 0;
        let mut buffer = vec![0; 64 * 1024];
        while drained < 16 * 1024 * 1024 {
            drained += server.read(&mut buffer).await.expect("read");
        }
        write.await.expect("writer task").expect("write");
        server.write_all(b"done").await.expect("write");
        let chunk = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("the reader was woken after the switch")
            .expect("reader task")
            .expect("read");
        assert_eq!(&chunk, b"done");
    }
}
