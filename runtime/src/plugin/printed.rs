//! What a plugin prints: its stdout and stderr, kept per instance (the last [`KEEP`] bytes) so
//! the host can put them where a person reads them.
//!
//! A plugin written in JavaScript or Python reports an uncaught exception or a traceback on
//! stderr and then traps; the trap itself says only "unreachable instruction executed". The host
//! therefore gives every instance a [`Printed`] as both stdout and stderr: after a call that
//! trapped, what the plugin printed goes into the trap's error (and so into the log and into the
//! dead letter's reason of a poison row); after any other call it is logged as a warning, with
//! the step's name. Either way once: [`Printed::take`] empties it.
//!
//! Bounded: a plugin printing in a loop costs the host at most twice [`KEEP`] bytes an instance,
//! and its writes never fail (a failed write to stderr would trap the plugin).

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// The most of a call's output the host keeps: its end, where an exception's message or a
/// traceback's last line is.
pub(crate) const KEEP: usize = 4096;

/// One instance's stdout and stderr, interleaved as written.
#[derive(Clone, Default)]
pub(crate) struct Printed(Arc<Mutex<Tail>>);

#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    /// Bytes dropped from the front since the last `take`.
    dropped: usize,
}

impl Printed {
    fn lock(&self) -> MutexGuard<'_, Tail> {
        // A panic while holding the lock leaves bytes, never a broken invariant.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, bytes: &[u8]) {
        let mut tail = self.lock();
        tail.bytes.extend_from_slice(bytes);
        if tail.bytes.len() > 2 * KEEP {
            let cut = tail.bytes.len() - KEEP;
            tail.bytes.drain(..cut);
            tail.dropped += cut;
        }
    }

    /// What was printed since the last call, trimmed, as text (invalid UTF-8 replaced); `None`
    /// if nothing (or only white space) was.
    pub(crate) fn take(&self) -> Option<String> {
        let mut tail = self.lock();
        let mut start = tail.bytes.len().saturating_sub(KEEP);
        // Start on a character boundary: skip UTF-8 continuation bytes.
        while start < tail.bytes.len() && start > 0 && tail.bytes[start] & 0xC0 == 0x80 {
            start += 1;
        }
        let dropped = tail.dropped + start;
        let text = String::from_utf8_lossy(&tail.bytes[start..])
            .trim()
            .to_string();
        tail.bytes.clear();
        tail.dropped = 0;
        if text.is_empty() {
            return None;
        }
        Some(if dropped > 0 {
            format!("[{dropped} earlier bytes left out] {text}")
        } else {
            text
        })
    }
}

impl IsTerminal for Printed {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Printed {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// How much a plugin may write at once (WASI's streams grant ~64 KiB).
const PERMIT: usize = 64 * 1024;

impl OutputStream for Printed {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Printed {
    async fn ready(&mut self) {}
}

impl AsyncWrite for Printed {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_take_returns_what_was_printed_once() {
        let printed = Printed::default();
        assert_eq!(printed.take(), None);
        printed.push(b"Error: boom\n");
        printed.push(b"    at process (plugin.js:3:9)\n");
        assert_eq!(
            printed.take().as_deref(),
            Some("Error: boom\n    at process (plugin.js:3:9)")
        );
        assert_eq!(printed.take(), None, "taken once");
        printed.push(b" \n\t");
        assert_eq!(printed.take(), None, "white space is nothing");
    }

    #[test]
    fn a_plugin_printing_in_a_loop_keeps_the_end_and_says_how_much_was_left_out() {
        let printed = Printed::default();
        for i in 0..10_000 {
            printed.push(format!("line {i}\n").as_bytes());
        }
        printed.push("the last line: é\n".as_bytes());
        assert!(printed.lock().bytes.len() <= 2 * KEEP, "bounded");
        let text = printed.take().expect("printed");
        assert!(text.ends_with("the last line: é"), "{text}");
        assert!(text.starts_with('['), "{text}");
        assert!(text.contains("earlier bytes left out"), "{text}");
        assert!(text.len() <= KEEP + 64, "{}", text.len());
        assert!(!text.contains('\u{FFFD}'), "cut on a character boundary");
    }
}
