//! kolo: collective communication for data-parallel training over TCP.
//!
//! Ranks find each other through a small rendezvous store, connect in a full
//! mesh, and run collectives (allreduce, allgather, reduce-scatter, broadcast,
//! alltoall, barrier) as *schedules* ([`algo`]) executed over non-blocking
//! sockets ([`transport`]) with reductions from [`reduce`].
//!
//! ```no_run
//! use kolo::{Communicator, ReduceOp};
//! let comm = Communicator::from_env()?; // under kolorun, torchrun, mpirun or srun
//! let mut grad = vec![comm.rank() as f32; 1024];
//! comm.allreduce(&mut grad, ReduceOp::Avg)?;
//! # Ok::<(), kolo::Error>(())
//! ```

#![warn(missing_docs)]

pub mod algo;
pub mod auth;
pub mod calibrate;
pub mod comm;
pub mod compress;
pub mod config;
pub mod elastic;
pub mod element;
pub mod engine;
pub mod error;
pub mod exec;
pub mod host;
pub mod net;
pub mod reduce;
pub mod rendezvous;
pub mod report;
pub mod simulate;
#[cfg(feature = "torch")]
pub mod torch;
pub mod transport;

pub use comm::Communicator;
pub use config::Config;
pub use element::{DType, Element};
pub use error::{Error, Result};
pub use reduce::ReduceOp;

/// Entry points for the fuzz targets (`tests/fuzz/`) and the corpus replay
/// test (`tests/fuzz_corpus.rs`): each decodes untrusted bytes the way a
/// listening socket does and returns whether they were accepted. Not part of
/// the supported API.
#[doc(hidden)]
pub mod fuzzing {
    /// Decode `data` as a data-frame header (the first 48 bytes); accepted
    /// headers must survive an encode/decode round trip.
    pub fn frame_header(data: &[u8]) -> bool {
        use crate::transport::frame::{Header, HEADER_LEN};
        let Some(raw) = data.get(..HEADER_LEN) else {
            return false;
        };
        let raw: &[u8; HEADER_LEN] = raw.try_into().expect("sliced to length");
        match Header::decode(raw) {
            Ok(h) => {
                assert_eq!(Header::decode(&h.encode()), Ok(h), "round trip");
                true
            }
            Err(_) => false,
        }
    }

    /// Feed `data` as everything a client sends to a data listener's
    /// handshake (rank 1 of 4, job 0x1234, a fixed key and server nonce);
    /// whether it was accepted.
    pub fn handshake(data: &[u8]) -> bool {
        crate::auth::fuzzing::handshake(data)
    }

    /// An unkeyed data-connection hello (see `auth`), e.g. from an older
    /// membership epoch.
    pub fn data_hello(comm_id: u64, from: u32, to: u32, size: u32) -> Vec<u8> {
        crate::auth::fuzzing::data_hello(comm_id, from, to, size)
    }

    /// A legitimate client's bytes (hello and proof) for [`handshake`].
    pub fn valid_handshake(from: u32, nonce: [u8; 32]) -> Vec<u8> {
        crate::auth::fuzzing::valid_client_transcript(from, nonce)
    }

    /// Decode `data` as one rendezvous request frame (header and body, the
    /// way the store reads it after the handshake); whether it is valid.
    pub fn store_request(data: &[u8]) -> bool {
        crate::rendezvous::fuzz_request(data)
    }

    /// One valid frame of each store command, for seeding.
    pub fn valid_store_requests() -> Vec<(&'static str, Vec<u8>)> {
        crate::rendezvous::sample_requests()
    }
}

/// Version of this crate.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
