//! Rendezvous: a small TCP key-value store that rank 0 (or the launcher) serves.
use crate::error::Result;
use std::net::SocketAddr;
use std::time::Instant;

/// Serves the store on a background thread until dropped.
pub struct StoreServer {
    addr: SocketAddr,
}

impl StoreServer {
    /// Bind and start serving (`addr` like "0.0.0.0:29500" or "127.0.0.1:0").
    pub fn bind(addr: &str) -> Result<StoreServer> {
        let _ = addr;
        unimplemented!("stub")
    }
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A connection to the store.
pub struct StoreClient {
    rank: usize,
}

impl StoreClient {
    /// Connect, retrying until `deadline` (the store may start after us).
    pub fn connect(addr: &str, rank: usize, deadline: Instant) -> Result<StoreClient> {
        let _ = (addr, deadline);
        Ok(StoreClient { rank })
    }
    /// Set `key` to `value`.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let _ = (key, value, self.rank);
        unimplemented!("stub")
    }
    /// Wait until `key` exists (or `deadline`) and return its value.
    pub fn get(&mut self, key: &str, deadline: Instant) -> Result<Vec<u8>> {
        let _ = (key, deadline);
        unimplemented!("stub")
    }
    /// Atomically add `delta` to the integer at `key` (absent = 0); returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        let _ = (key, delta);
        unimplemented!("stub")
    }
}

/// Publish this rank's listen address under `prefix` and fetch every rank's;
/// on deadline the error lists the ranks that never arrived.
pub fn exchange_addresses(
    client: &mut StoreClient,
    prefix: &str,
    rank: usize,
    size: usize,
    mine: SocketAddr,
    deadline: Instant,
) -> Result<Vec<SocketAddr>> {
    let _ = (client, prefix, rank, size, mine, deadline);
    unimplemented!("stub")
}
