//! Runs a schedule from [`crate::algo`] over the [`crate::transport`].
