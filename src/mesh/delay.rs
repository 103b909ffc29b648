//! A test-only delay line for mesh connections (`MESHFS_TEST_DELAY_MS`):
//! every byte read from the socket is held back for the given time after it
//! arrived, which is what a long link does to one direction of traffic.
//! The kernel here has no netem, so tests and `scripts/netns-mesh` use this
//! to measure latency-bound behaviour. With both ends delaying what they
//! receive, the round trip grows by twice the delay. Writes pass through.
//! Delay 0 (every normal run) is a plain pass-through.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

/// Most bytes held back at once; beyond it the socket is not read, so TCP
/// flow control slows the sender as a real bottleneck would.
const MAX_HELD: usize = 16 << 20;

pub struct Delayed<S> {
    inner: S,
    delay: Duration,
    held: VecDeque<(Instant, Vec<u8>, usize)>,
    held_bytes: usize,
    timer: Option<Pin<Box<Sleep>>>,
    eof: bool,
}

impl<S> Delayed<S> {
    pub fn new(inner: S, delay: Duration) -> Self {
        Delayed {
            inner,
            delay,
            held: VecDeque::new(),
            held_bytes: 0,
            timer: None,
            eof: false,
        }
    }
}

/// The delay tests ask for, from the environment (0 when unset).
pub fn from_env() -> Duration {
    std::env::var("MESHFS_TEST_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or_default()
}

impl<S: AsyncRead + Unpin> AsyncRead for Delayed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.delay.is_zero() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        // Take in everything that has arrived, stamped with its release time.
        while !this.eof && this.held_bytes < MAX_HELD {
            let mut chunk = vec![0u8; 64 * 1024];
            match Pin::new(&mut this.inner).poll_read(cx, &mut chunk) {
                Poll::Ready(Ok(0)) => this.eof = true,
                Poll::Ready(Ok(n)) => {
                    chunk.truncate(n);
                    this.held_bytes += n;
                    this.held.push_back((Instant::now() + this.delay, chunk, 0));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        let Some((due, _, _)) = this.held.front() else {
            return if this.eof {
                Poll::Ready(Ok(0))
            } else {
                Poll::Pending
            };
        };
        let due = *due;
        if due > Instant::now() {
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            timer.as_mut().reset(due);
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let Some((_, chunk, pos)) = this.held.front_mut() else {
            return Poll::Pending;
        };
        let n = buf.len().min(chunk.len() - *pos);
        buf[..n].copy_from_slice(&chunk[*pos..*pos + n]);
        *pos += n;
        if *pos == chunk.len() {
            this.held.pop_front();
        }
        this.held_bytes -= n;
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Delayed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::AsyncReadExt;

    #[tokio::test]
    async fn bytes_arrive_after_the_delay_and_in_order() {
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut d = Delayed::new(
            futures::io::Cursor::new(data.clone()),
            Duration::from_millis(50),
        );
        let t = Instant::now();
        let mut out = Vec::new();
        d.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, data);
        assert!(t.elapsed() >= Duration::from_millis(50));
    }
}
