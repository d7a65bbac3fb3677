//! The counter that tells translation caches guest memory may have changed under them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A counter a backend bumps whenever guest memory may have changed under cached translations
/// (typically on every resume or reset of a paused guest). Caches that share it notice the bump
/// on their next lookup and drop everything, for the cost of one atomic load per lookup.
#[derive(Clone, Debug, Default)]
pub struct InvalidationEpoch(Arc<AtomicU64>);

impl InvalidationEpoch {
    /// A new epoch at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Invalidate every cache sharing this epoch.
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }

    /// The current value.
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}
