//! The frame header that starts every message: it identifies the job
//! (communicator id), the collective (sequence number and descriptor) and the
//! payload length, so a frame that belongs to another op or job is caught
//! before its payload is used.

use bytes::{Buf, BufMut};

/// "KOLO" in ASCII.
pub const MAGIC: u32 = 0x4b4f_4c4f;
/// Wire format version; bumped on any incompatible change (2: connections
/// start with the authenticated handshake of [`crate::auth`]).
pub const VERSION: u16 = 2;
/// Encoded header size in bytes.
pub const HEADER_LEN: usize = 48;
/// Offset of the frame kind in an encoded header (after magic and version),
/// so a sender can retag a header it has already encoded.
pub const KIND_AT: usize = 6;
/// Largest abort message accepted (its text is read into memory).
pub const MAX_ABORT_LEN: u64 = 64 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A piece of a collective's payload.
    Data = 1,
    /// The sender failed the collective; the payload is its error text.
    Abort = 2,
    /// A piece of a collective's payload that is not on the connection: the
    /// sender put its `len` bytes in the shared-memory ring of this
    /// connection ([`super::shm`]), in frame order.
    Shm = 3,
}

/// What every rank must agree on for one collective call.
///
/// ```
/// use kolo::transport::frame::Desc;
/// let d = Desc { coll: 1, dtype: 6, op: 1, root: 0, count: 10 };
/// assert_eq!(d.diff(&d), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Desc {
    /// Collective code.
    pub coll: u8,
    /// Dtype code ([`crate::DType::code`]).
    pub dtype: u8,
    /// Reduce-op code ([`crate::ReduceOp::code`]), 0 when it does not reduce.
    pub op: u8,
    /// Root rank (broadcast), else 0.
    pub root: u32,
    /// Element count as the caller passed it.
    pub count: u64,
}

impl Desc {
    /// Names the fields in which `theirs` differs from `self` (ours), or `None`.
    /// Codes are decoded to names by `name`.
    pub fn diff(&self, theirs: &Desc) -> Option<Vec<(&'static str, u64, u64)>> {
        let fields = [
            ("collective", self.coll as u64, theirs.coll as u64),
            ("dtype", self.dtype as u64, theirs.dtype as u64),
            ("op", self.op as u64, theirs.op as u64),
            ("root", self.root as u64, theirs.root as u64),
            ("count", self.count, theirs.count),
        ];
        let d: Vec<_> = fields.into_iter().filter(|(_, a, b)| a != b).collect();
        (!d.is_empty()).then_some(d)
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Data or abort.
    pub kind: Kind,
    /// The collective's arguments.
    pub desc: Desc,
    /// Identifies the communicator (and so the job).
    pub comm_id: u64,
    /// Sequence number of the collective on its communicator.
    pub seq: u64,
    /// Payload bytes that follow.
    pub len: u64,
}

impl Header {
    /// Encode into the fixed wire layout (little endian).
    ///
    /// ```
    /// use kolo::transport::frame::*;
    /// let h = Header { kind: Kind::Data, desc: Desc::default(), comm_id: 7, seq: 3, len: 16 };
    /// assert_eq!(Header::decode(&h.encode()), Ok(h));
    /// ```
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let mut b = &mut out[..];
        b.put_u32_le(MAGIC);
        b.put_u16_le(VERSION);
        b.put_u8(self.kind as u8);
        b.put_u8(self.desc.coll);
        b.put_u8(self.desc.dtype);
        b.put_u8(self.desc.op);
        b.put_u16_le(0);
        b.put_u32_le(self.desc.root);
        b.put_u64_le(self.comm_id);
        b.put_u64_le(self.seq);
        b.put_u64_le(self.desc.count);
        b.put_u64_le(self.len);
        out
    }

    /// Decode, rejecting anything that is not a kolo frame of this version.
    pub fn decode(raw: &[u8; HEADER_LEN]) -> Result<Header, String> {
        let mut b = &raw[..];
        let magic = b.get_u32_le();
        if magic != MAGIC {
            return Err(format!("bad magic {magic:#010x} (not a kolo frame)"));
        }
        let version = b.get_u16_le();
        if version != VERSION {
            return Err(format!(
                "wire version {version}, this build speaks {VERSION}"
            ));
        }
        let kind = match b.get_u8() {
            1 => Kind::Data,
            2 => Kind::Abort,
            3 => Kind::Shm,
            k => return Err(format!("unknown frame kind {k}")),
        };
        let coll = b.get_u8();
        let dtype = b.get_u8();
        let op = b.get_u8();
        let _reserved = b.get_u16_le();
        let root = b.get_u32_le();
        let comm_id = b.get_u64_le();
        let seq = b.get_u64_le();
        let count = b.get_u64_le();
        let len = b.get_u64_le();
        if kind == Kind::Abort && len > MAX_ABORT_LEN {
            return Err(format!(
                "abort frame of {len} bytes exceeds {MAX_ABORT_LEN}"
            ));
        }
        Ok(Header {
            kind,
            desc: Desc {
                coll,
                dtype,
                op,
                root,
                count,
            },
            comm_id,
            seq,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_at_is_where_encode_puts_the_kind() {
        for kind in [Kind::Data, Kind::Abort, Kind::Shm] {
            let h = Header {
                kind,
                desc: Desc::default(),
                comm_id: 1,
                seq: 2,
                len: 3,
            };
            assert_eq!(h.encode()[KIND_AT], kind as u8);
        }
    }

    #[test]
    fn rejects_garbage() {
        let mut raw = Header {
            kind: Kind::Data,
            desc: Desc::default(),
            comm_id: 1,
            seq: 1,
            len: 1,
        }
        .encode();
        raw[0] ^= 1;
        assert!(Header::decode(&raw).unwrap_err().contains("magic"));
        let mut raw = Header {
            kind: Kind::Abort,
            desc: Desc::default(),
            comm_id: 1,
            seq: 1,
            len: MAX_ABORT_LEN + 1,
        }
        .encode();
        assert!(Header::decode(&raw).is_err());
        raw[4] = 9;
        assert!(Header::decode(&raw).unwrap_err().contains("version"));
    }
}
