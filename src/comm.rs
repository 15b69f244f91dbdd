//! The public blocking API: a [`Communicator`] over a full mesh of TCP connections.
use crate::config::Config;
use crate::element::Element;
use crate::error::Result;
use crate::reduce::ReduceOp;

/// A group of ranks that run collectives together. Methods take `&self`;
/// calls from several threads are serialised internally.
pub struct Communicator {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
}

#[allow(unused_variables)]
impl Communicator {
    pub fn from_env() -> Result<Communicator> {
        Communicator::init(Config::from_env()?)
    }
    pub fn init(cfg: Config) -> Result<Communicator> {
        Ok(Communicator { rank: cfg.rank, size: cfg.size, local_rank: cfg.local_rank, local_size: cfg.local_size })
    }
    pub fn rank(&self) -> usize { self.rank }
    pub fn size(&self) -> usize { self.size }
    pub fn local_rank(&self) -> usize { self.local_rank }
    pub fn local_size(&self) -> usize { self.local_size }
    pub fn allreduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> { unimplemented!("stub") }
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> { unimplemented!("stub") }
    pub fn allgather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> { unimplemented!("stub") }
    pub fn allgatherv<T: Element>(&self, send: &[T], recv: &mut [T], counts: &[usize]) -> Result<()> { unimplemented!("stub") }
    pub fn reduce_scatter<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> { unimplemented!("stub") }
    pub fn alltoall<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> { unimplemented!("stub") }
    pub fn barrier(&self) -> Result<()> { unimplemented!("stub") }
}
