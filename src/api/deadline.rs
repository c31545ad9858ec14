//! A client connection's read side under a deadline, and its place among the listener's
//! connections: the first bytes must arrive within `header_timeout` of the accept, and
//! afterwards the client may be silent for at most `idle_timeout` (the servers ping live
//! HTTP/2 clients well within it, and every client answers a ping). A connection past its
//! deadline ends with `TimedOut`; its `ConnectionSlot` is freed with it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::limits::ConnectionSlot;

/// Told which deadline ended a connection (`header_timeout`, `idle_timeout`).
pub type OnTimeout = Arc<dyn Fn(&'static str) + Send + Sync>;

pub struct ReadDeadline<S> {
    inner: S,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    started: bool,
    on_timeout: Option<OnTimeout>,
    _slot: Option<ConnectionSlot>,
}

impl<S> ReadDeadline<S> {
    pub fn new(
        inner: S,
        header_timeout: Duration,
        idle_timeout: Duration,
        slot: Option<ConnectionSlot>,
        on_timeout: Option<OnTimeout>,
    ) -> Self {
        Self {
            inner,
            idle: idle_timeout,
            sleep: Box::pin(tokio::time::sleep(header_timeout)),
            started: false,
            on_timeout,
            _slot: slot,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadDeadline<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.started = true;
                    this.sleep.as_mut().reset(Instant::now() + this.idle);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let which = if this.started { "idle_timeout" } else { "header_timeout" };
                    if let Some(f) = &this.on_timeout {
                        f(which);
                    }
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, format!("connection closed: {which}"))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadDeadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for ReadDeadline<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_closed_at_the_header_timeout_and_a_talking_one_at_the_idle_timeout() {
        let (client, server) = tokio::io::duplex(64);
        let timeouts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = timeouts.clone();
        let on: OnTimeout = Arc::new(move |w| seen.lock().unwrap().push(w));
        let mut conn =
            ReadDeadline::new(server, Duration::from_secs(10), Duration::from_secs(60), None, Some(on.clone()));
        let mut buf = [0u8; 8];
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(*timeouts.lock().unwrap(), vec!["header_timeout"]);
        drop(client);

        let (mut client, server) = tokio::io::duplex(64);
        let mut conn = ReadDeadline::new(server, Duration::from_secs(10), Duration::from_secs(60), None, Some(on));
        // Talking every 30 s keeps it open past both timeouts.
        for _ in 0..4 {
            client.write_all(b"x").await.unwrap();
            assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        let start = Instant::now();
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(30), "60 s after the last byte");
        assert_eq!(timeouts.lock().unwrap().last(), Some(&"idle_timeout"));
    }
}
