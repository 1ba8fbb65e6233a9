//! Test-only entry point for the fuzz targets in `fuzz/`, compiled only with
//! `--cfg fuzzing` (which cargo-fuzz sets): one client connection's input
//! side, without a socket.
//!
//! It drives the types the server's reader thread uses for a client
//! ([`Decoder::feed`] and [`Decoder::next_item`], [`Session::handle`],
//! without passed file descriptors) and
//! turns each decoded item into the line that thread sends, as
//! `Client::read_loop` in `server.rs` does.

use std::sync::Arc;

use crate::decoder::{Decoder, Item};
use crate::dispatcher::Dispatcher;
use crate::session::{error_line, Session};

/// One client connection as the server's reader thread drives it.
#[doc(hidden)]
pub struct FuzzSession {
    decoder: Decoder,
    session: Session,
    max_message_size: usize,
    closed: bool,
}

impl FuzzSession {
    /// A connection that has not negotiated yet; messages longer than
    /// `max_message_size` bytes close it (the server uses
    /// [`crate::MAX_MESSAGE_SIZE`]).
    pub fn new(dispatcher: Arc<dyn Dispatcher>, max_message_size: usize) -> Self {
        FuzzSession {
            decoder: Decoder::new(max_message_size),
            session: Session::new(dispatcher),
            max_message_size,
            closed: false,
        }
    }

    /// Takes one chunk of the client's bytes, as one `read` returns it, and
    /// returns the lines the server sends in answer, in order. After an
    /// oversized message the server stops reading: later chunks are ignored.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        if self.closed {
            return lines;
        }
        self.decoder.feed(chunk);
        while let Some(item) = self.decoder.next_item() {
            match item {
                // No descriptors come with the bytes: `getfd` fails cleanly.
                Item::Value(message) => lines.push(self.session.handle(message, Vec::new())),
                Item::Error(desc) => lines.push(error_line(desc)),
                Item::TooLarge => {
                    lines.push(error_line(format!(
                        "JSON parse error, message exceeds the limit of {} bytes",
                        self.max_message_size
                    )));
                    self.closed = true;
                    break;
                }
            }
        }
        lines
    }

    /// Whether `qmp_capabilities` succeeded.
    pub fn negotiated(&self) -> bool {
        self.session.negotiated()
    }

    /// Whether the server has stopped reading (after an oversized message).
    pub fn closed(&self) -> bool {
        self.closed
    }
}
