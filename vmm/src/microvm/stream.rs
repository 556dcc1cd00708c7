//! The endpoint stream: the byte pipe between a VM's stream port (docs/guest-abi.md) and the
//! client connections the agent accepts on the VM's published address.
//!
//! A migration must move it without losing or repeating a byte. At the source's pause the
//! stream is frozen: what the guest has not yet read goes into the saved device state, and
//! bytes that arrive from the client afterwards are held back. If the migration completes, the
//! held bytes go to the target after the state (so in order); if it fails, they are appended
//! to the receive queue and the guest reads on. Output the guest wrote before the pause stays
//! here and reaches the client before anything the target sends.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Most bytes queued for the guest before a client's sender waits.
pub const RX_LIMIT: usize = 64 << 10;
/// Most bytes of guest output queued before the guest's writes are dropped (no client reads).
pub const TX_LIMIT: usize = 1 << 20;

#[derive(Debug, Default)]
struct Inner {
    rx: VecDeque<u8>,
    tx: VecDeque<u8>,
    /// Between the source's pause and the end of the migration.
    frozen: bool,
    /// Client bytes received while frozen.
    hold: Vec<u8>,
    /// The VM left this host: the stream only drains its output.
    moved: bool,
    tx_dropped: u64,
}

/// What [`Stream::deliver`] did with client bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Queued for the guest (or held while frozen).
    Queued,
    /// The VM moved away; the caller must forward these bytes itself.
    Moved,
}

/// One VM's endpoint stream.
#[derive(Debug, Default)]
pub struct Stream {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Stream {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues bytes received in the saved state of a migrated or restored VM, ahead of
    /// anything a client sends here.
    pub fn preload(&self, bytes: &[u8]) {
        let mut inner = self.lock();
        let later: Vec<u8> = inner.rx.drain(..).collect();
        inner.rx.extend(bytes);
        inner.rx.extend(later);
        self.changed.notify_all();
    }

    /// The guest reads a byte.
    pub fn guest_read(&self) -> Option<u8> {
        let mut inner = self.lock();
        let b = inner.rx.pop_front();
        if b.is_some() {
            self.changed.notify_all();
        }
        b
    }

    /// The guest writes a byte.
    pub fn guest_write(&self, b: u8) {
        let mut inner = self.lock();
        if inner.tx.len() >= TX_LIMIT {
            inner.tx_dropped += 1;
            return;
        }
        inner.tx.push_back(b);
        self.changed.notify_all();
    }

    /// Client bytes for the guest; waits while the guest's queue is full.
    pub fn deliver(&self, bytes: &[u8]) -> Delivered {
        let mut inner = self.lock();
        loop {
            if inner.moved {
                return Delivered::Moved;
            }
            if inner.frozen {
                inner.hold.extend_from_slice(bytes);
                return Delivered::Queued;
            }
            if inner.rx.len() < RX_LIMIT {
                inner.rx.extend(bytes);
                return Delivered::Queued;
            }
            inner = self
                .changed
                .wait_timeout(inner, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Guest output for the client: waits up to `timeout` for some. `None` when the VM moved
    /// away and all its output here has been taken.
    pub fn take_output(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut inner = self.lock();
        if inner.tx.is_empty() && !inner.moved {
            inner = self
                .changed
                .wait_timeout(inner, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if inner.tx.is_empty() && inner.moved {
            return None;
        }
        Some(inner.tx.drain(..).collect())
    }

    /// Output the guest wrote that no client took back (a client reconnecting gets it).
    pub fn pending_output(&self) -> usize {
        self.lock().tx.len()
    }

    /// At the source's pause: stop queueing client bytes for the guest; returns what the guest
    /// has not read yet, for the saved state.
    pub fn freeze(&self) -> Vec<u8> {
        let mut inner = self.lock();
        inner.frozen = true;
        inner.rx.iter().copied().collect()
    }

    /// What the guest has not read yet (for a snapshot of a running stream).
    pub fn unread(&self) -> Vec<u8> {
        self.lock().rx.iter().copied().collect()
    }

    /// The migration failed and the VM runs on here: bytes held meanwhile follow the rest.
    pub fn thaw(&self) {
        let mut inner = self.lock();
        let held = std::mem::take(&mut inner.hold);
        inner.rx.extend(held);
        inner.frozen = false;
        self.changed.notify_all();
    }

    /// The migration completed: the VM's stream continues on the target. Returns the client
    /// bytes held since the freeze, which must reach the target after its saved state.
    pub fn detach(&self) -> Vec<u8> {
        let mut inner = self.lock();
        inner.moved = true;
        inner.frozen = false;
        inner.rx.clear();
        self.changed.notify_all();
        std::mem::take(&mut inner.hold)
    }

    pub fn is_moved(&self) -> bool {
        self.lock().moved
    }

    /// Guest output dropped because no client read it.
    pub fn dropped(&self) -> u64 {
        self.lock().tx_dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_pass_both_ways_in_order() {
        let s = Stream::new();
        assert_eq!(s.deliver(b"ab"), Delivered::Queued);
        assert_eq!(s.guest_read(), Some(b'a'));
        s.guest_write(b'x');
        s.guest_write(b'y');
        assert_eq!(
            s.take_output(Duration::from_millis(1)),
            Some(b"xy".to_vec())
        );
        assert_eq!(s.guest_read(), Some(b'b'));
        assert_eq!(s.guest_read(), None);
    }

    #[test]
    fn a_failed_migration_loses_nothing() {
        let s = Stream::new();
        s.deliver(b"12");
        assert_eq!(s.guest_read(), Some(b'1'));
        assert_eq!(s.freeze(), b"2");
        s.deliver(b"34");
        s.thaw();
        let got: Vec<u8> = std::iter::from_fn(|| s.guest_read()).collect();
        assert_eq!(got, b"234");
    }

    #[test]
    fn a_completed_migration_hands_over_held_bytes_once() {
        let source = Stream::new();
        source.deliver(b"ab");
        source.guest_write(b'!');
        let state = source.freeze();
        source.deliver(b"cd");
        let held = source.detach();
        assert_eq!(source.deliver(b"ef"), Delivered::Moved);
        // Output written before the pause still drains, then the stream reports the move.
        assert_eq!(
            source.take_output(Duration::from_millis(1)),
            Some(b"!".to_vec())
        );
        assert_eq!(source.take_output(Duration::from_millis(1)), None);

        let target = Stream::new();
        target.preload(&state);
        target.deliver(&held);
        target.deliver(b"ef");
        let got: Vec<u8> = std::iter::from_fn(|| target.guest_read()).collect();
        assert_eq!(got, b"abcdef");
    }

    #[test]
    fn preload_goes_ahead_of_bytes_already_delivered() {
        let s = Stream::new();
        s.deliver(b"later");
        s.preload(b"first ");
        let got: Vec<u8> = std::iter::from_fn(|| s.guest_read()).collect();
        assert_eq!(got, b"first later");
    }
}
