//! Each accepted gRPC connection as the server watches it: the GOAWAY frames it sends, counted by
//! error code as they leave, and a hard end at MAX_CONNECTION_AGE plus its grace.
//!
//! A GOAWAY with an error ends every call in flight on the connection: behind Envoy, which
//! multiplexes its requests over few connections, that is a burst of fail-open. hyper and tonic
//! log the reason only at debug, so the connection's bytes are read on their way out instead:
//! the server's side of an HTTP/2 connection is nothing but frames (no preface), each a 9-byte
//! header saying its length and type, so following the frame boundaries costs a few comparisons
//! per write. The wrapper sits inside TLS, on the plaintext.
//!
//! `NO_ERROR` is the orderly kind (shutdown, MAX_CONNECTION_AGE); anything else is a connection
//! torn down by this server (h2's flood guards say ENHANCE_YOUR_CALM) and is logged, sampled.
//!
//! The hard end is here because tonic 0.14's own (`max_connection_age_grace`) replaces the
//! graceful close instead of following it: with a grace set, a connection got no GOAWAY at its
//! age, only a cut at age + grace, failing every call in flight on it (found by this counter).
//! So tonic is given the age alone (a GOAWAY, then the connection ends when its calls have), and
//! a connection still open at age + grace (a client that ignores the GOAWAY, a quota stream that
//! never ends) fails its reads and writes here, which ends it.

use std::future::Future as _;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use crate::telemetry::names;

/// HTTP/2 error codes (RFC 9113 section 7), as metric labels; anything later is "other".
const CODES: [&str; 14] = [
    "no_error",
    "protocol_error",
    "internal_error",
    "flow_control_error",
    "settings_timeout",
    "stream_closed",
    "frame_size_error",
    "refused_stream",
    "cancel",
    "compression_error",
    "connect_error",
    "enhance_your_calm",
    "inadequate_security",
    "http_1_1_required",
];

const HEADER: usize = 9;
const GOAWAY: u8 = 0x7;
/// A GOAWAY's payload starts with the last stream id, then the error code.
const GOAWAY_FIXED: usize = 8;

/// `sluicegate_goaways_total{reason}`, registered at 0 for every code, and the sampled log.
pub struct GoawayCounters {
    by_code: Vec<Counter>,
    other: Counter,
    sampler: crate::telemetry::DenialSampler,
}

impl Default for GoawayCounters {
    fn default() -> Self {
        let c = |reason: &'static str| metrics::counter!(names::GOAWAYS, "reason" => reason);
        Self {
            by_code: CODES.iter().map(|&r| c(r)).collect(),
            other: c("other"),
            sampler: crate::telemetry::DenialSampler::new(1),
        }
    }
}

impl GoawayCounters {
    fn sent(&self, code: u32) {
        let (counter, name) = match self.by_code.get(code as usize) {
            Some(c) => (c, CODES[code as usize]),
            None => (&self.other, "other"),
        };
        counter.increment(1);
        if code != 0
            && let Some(left_out) = self.sampler.admit()
        {
            tracing::warn!(
                reason = name,
                left_out,
                "sent GOAWAY: a connection torn down, its calls in flight failed"
            );
        }
    }
}

/// Where the scan is in the stream of frames.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Scan {
    /// Reading a frame header: its bytes so far.
    Header { buf: [u8; HEADER], have: usize },
    /// Reading a GOAWAY's last-stream-id and error code, then `rest` more payload bytes.
    Goaway {
        buf: [u8; GOAWAY_FIXED],
        have: usize,
        rest: usize,
    },
    /// Passing over a payload.
    Skip(usize),
}

/// Follows frame boundaries through the bytes written; yields each GOAWAY's error code.
#[derive(Debug)]
struct FrameScan(Scan);

const FRESH: Scan = Scan::Header {
    buf: [0; HEADER],
    have: 0,
};

impl Default for FrameScan {
    fn default() -> Self {
        FrameScan(FRESH)
    }
}

/// Copies into `buf` (which holds `have` bytes) what `bytes` has of the rest; how many it took.
fn fill<const N: usize>(buf: &mut [u8; N], have: usize, bytes: &[u8]) -> usize {
    let k = (N - have).min(bytes.len());
    buf[have..have + k].copy_from_slice(&bytes[..k]);
    k
}

/// Passing over `n` bytes of payload (none: the next frame's header).
fn skip(n: usize) -> Scan {
    if n == 0 { FRESH } else { Scan::Skip(n) }
}

impl FrameScan {
    fn feed(&mut self, mut bytes: &[u8], mut goaway: impl FnMut(u32)) {
        while !bytes.is_empty() {
            let taken;
            (self.0, taken) = match self.0 {
                Scan::Skip(n) => {
                    let k = n.min(bytes.len());
                    (skip(n - k), k)
                }
                Scan::Header { mut buf, have } => {
                    let k = fill(&mut buf, have, bytes);
                    let next = if have + k < HEADER {
                        Scan::Header {
                            buf,
                            have: have + k,
                        }
                    } else {
                        let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                        match buf[3] {
                            GOAWAY if len >= GOAWAY_FIXED => Scan::Goaway {
                                buf: [0; GOAWAY_FIXED],
                                have: 0,
                                rest: len - GOAWAY_FIXED,
                            },
                            _ => skip(len),
                        }
                    };
                    (next, k)
                }
                Scan::Goaway {
                    mut buf,
                    have,
                    rest,
                } => {
                    let k = fill(&mut buf, have, bytes);
                    if have + k < GOAWAY_FIXED {
                        (
                            Scan::Goaway {
                                buf,
                                have: have + k,
                                rest,
                            },
                            k,
                        )
                    } else {
                        goaway(u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]));
                        (skip(rest), k)
                    }
                }
            };
            bytes = &bytes[taken..];
        }
    }
}

/// Wraps each accepted connection of a listener's stream; `lifetime` is the age plus its grace,
/// when connections have a maximum age.
pub fn watch<S>(
    counters: &Arc<GoawayCounters>,
    lifetime: Option<std::time::Duration>,
) -> impl FnMut(std::io::Result<S>) -> std::io::Result<Watched<S>> + use<S> {
    let counters = counters.clone();
    move |conn| {
        conn.map(|c| Watched {
            inner: c,
            scan: FrameScan::default(),
            counters: counters.clone(),
            end: lifetime.map(|l| Box::pin(tokio::time::sleep_until(Instant::now() + l))),
        })
    }
}

/// A server connection whose outgoing GOAWAY frames are counted, and which fails at its end.
pub struct Watched<S> {
    inner: S,
    scan: FrameScan,
    counters: Arc<GoawayCounters>,
    end: Option<Pin<Box<Sleep>>>,
}

impl<S> Watched<S> {
    /// An error once the connection's end has come (and the waker set to learn of it).
    fn ended(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let end = self.end.as_mut()?;
        end.as_mut().poll(cx).is_ready().then(|| {
            tracing::debug!("connection closed: past MAX_CONNECTION_AGE and its grace");
            std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "past MAX_CONNECTION_AGE and its grace",
            )
        })
    }

    fn wrote(&mut self, bytes: &[u8]) {
        let counters = &self.counters;
        self.scan.feed(bytes, |code| counters.sent(code));
    }
}

impl<S: Connected> Connected for Watched<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.ended(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if let Some(e) = this.ended(cx) {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.wrote(&buf[..n]);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if let Some(e) = this.ended(cx) {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = r {
            for b in bufs {
                if n == 0 {
                    break;
                }
                let k = n.min(b.len());
                this.wrote(&b[..k]);
                n -= k;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, 0, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    }

    fn goaway(code: u32, debug: &[u8]) -> Vec<u8> {
        let mut p = 7u32.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(debug);
        frame(GOAWAY, &p)
    }

    /// Settings, data whose bytes look like a GOAWAY header, an empty frame, then two GOAWAYs:
    /// only the real ones are seen, however the bytes are cut into writes.
    #[test]
    fn finds_goaways_across_any_cut_of_the_writes() {
        let mut wire = frame(0x4, &[0, 3, 0, 0, 0, 128]);
        wire.extend(frame(0x0, &goaway(99, b"fake")));
        wire.extend(frame(0x6, &[]));
        wire.extend(goaway(11, b"too_many_resets"));
        wire.extend(frame(0x0, &[1; 300]));
        wire.extend(goaway(0, b""));
        for cut in [1, 2, 5, 8, 9, 13, 64, wire.len()] {
            let mut scan = FrameScan::default();
            let mut seen = Vec::new();
            for chunk in wire.chunks(cut) {
                scan.feed(chunk, |c| seen.push(c));
            }
            assert_eq!(seen, vec![11, 0], "cut into writes of {cut}");
            assert_eq!(scan.0, FRESH);
        }
    }
}
