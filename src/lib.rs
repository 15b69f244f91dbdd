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
pub mod calibrate;
pub mod comm;
pub mod compress;
pub mod config;
pub mod elastic;
pub mod element;
pub mod engine;
pub mod error;
pub mod exec;
pub mod net;
pub mod reduce;
pub mod rendezvous;
pub mod simulate;
#[cfg(feature = "torch")]
pub mod torch;
pub mod transport;

pub use comm::Communicator;
pub use config::Config;
pub use element::{DType, Element};
pub use error::{Error, Result};
pub use reduce::ReduceOp;

/// Version of this crate.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
