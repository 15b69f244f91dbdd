//! Moves bytes between ranks over TCP with mio. Knows nothing of reductions.
