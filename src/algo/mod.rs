//! Collective algorithms as schedules: plain data computed from (rank, size,
//! counts, segment size). No sockets here; [`crate::exec`] runs them.
