//! Payloads between ranks of one host through shared memory: one ring per
//! direction and connection, created by the receiver in `/dev/shm`. A bulk
//! frame's header still travels on its TCP connection (so ordering, aborts,
//! deadlines and every error path stay the socket's), but the payload is
//! copied once into the ring and once out of it instead of going through
//! the kernel's TCP stack. A payload that does not fit the ring's free space
//! goes inline on the socket as before, so nothing ever waits on a ring.
//!
//! One producer and one consumer per ring: `head` (bytes ever written) is
//! the sender's, `tail` (bytes ever read) the receiver's.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes before the data: `head` (and the creator's pid) and `tail` on
/// cache lines of their own.
const META: usize = 128;
/// Where the creator's pid is kept, for [`sweep_stale`].
const PID_AT: usize = 16;
/// Frames ([`Ring::push_frame`]) start on a cache line of the ring, so a
/// reduction reading one in place reads lines of its own: one frame of an
/// odd length would otherwise leave every later one misaligned.
pub const LINE: usize = 64;
/// The names of rings start so in `/dev/shm`.
const PREFIX: &str = "kolo-";

/// A ring buffer in a shared mapping.
pub struct Ring {
    base: *mut u8,
    cap: usize,
    /// Set on the creator until [`Ring::unlink`] removed the name.
    path: Option<PathBuf>,
}

// SAFETY: the mapping lives as long as the ring; only the owning transport
// touches it from this process.
unsafe impl Send for Ring {}

fn map(file: &File, len: usize) -> io::Result<*mut u8> {
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh shared mapping of a file we hold open, of its size.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            // Fault every page in now, not on the first pass of the data.
            libc::MAP_SHARED | libc::MAP_POPULATE,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// Back every byte of the file now: a page of tmpfs that cannot be had
/// fails here, as an error, instead of as SIGBUS on the first write to it.
fn reserve(file: &File, len: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a descriptor we hold.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Open `path` only if it is a regular file of this user that nobody else
/// may read or write: never through a link, never blocking on a FIFO.
fn open_checked(path: &Path, write: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.file_type().is_file() || meta.uid() != me || meta.mode() & 0o777 != 0o600 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{}: not a ring of this user", path.display()),
        ));
    }
    Ok(file)
}

/// Bytes free for this user in the file system of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` is writable.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl Ring {
    /// Create the ring at `path` (which must not exist) with `cap` data bytes,
    /// readable only by this user.
    ///
    /// ```
    /// use kolo::transport::shm::Ring;
    /// let path = std::env::temp_dir().join(format!("kolo-doc-ring-{}", std::process::id()));
    /// let mut rx = Ring::create(&path, 64)?;
    /// let tx = Ring::open(&path)?;
    /// rx.unlink();
    /// assert!(tx.push(&[b"hello", b" ring"]));
    /// let mut out = [0u8; 10];
    /// rx.pop(&mut out).unwrap();
    /// assert_eq!(&out, b"hello ring");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn create(path: &Path, cap: usize) -> io::Result<Ring> {
        if cap == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a ring of 0 bytes",
            ));
        }
        // O_EXCL never follows a planted link; O_NOFOLLOW says so twice.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        let made = reserve(&file, META + cap).and_then(|_| map(&file, META + cap));
        match made {
            Ok(base) => {
                let ring = Ring {
                    base,
                    cap,
                    path: Some(path.to_path_buf()),
                };
                ring.counter(PID_AT)
                    .store(u64::from(std::process::id()), Ordering::Relaxed);
                Ok(ring)
            }
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// Open a ring a peer created, checking that this user owns it and
    /// nobody else may read it.
    pub fn open(path: &Path) -> io::Result<Ring> {
        let file = open_checked(path, true)?;
        let len = file.metadata()?.len() as usize;
        if len <= META {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: too short for a ring", path.display()),
            ));
        }
        Ok(Ring {
            base: map(&file, len)?,
            cap: len - META,
            path: None,
        })
    }

    /// Remove the ring's name (the creator does, once the peer has opened
    /// it); the mapping stays.
    pub fn unlink(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }

    fn counter(&self, at: usize) -> &AtomicU64 {
        // SAFETY: `at` is 0, PID_AT or 64, inside the mapping and 8-aligned
        // (mmap returns page-aligned memory).
        unsafe { &*self.base.add(at).cast::<AtomicU64>() }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: the data follows the counters inside the mapping.
        unsafe { self.base.add(META) }
    }

    /// Producer: append the concatenation of `parts` if it fits in the free
    /// space; false (and nothing written) if it does not.
    pub fn push(&self, parts: &[&[u8]]) -> bool {
        self.push_from(self.counter(0).load(Ordering::Relaxed), parts)
    }

    /// Producer: [`Ring::push`] starting on a cache line (skipping up to
    /// [`LINE`] - 1 bytes), for a consumer that calls
    /// [`Ring::skip_to_line`] before the first byte.
    ///
    /// ```
    /// use kolo::transport::shm::Ring;
    /// let path = std::env::temp_dir().join(format!("kolo-doc-frame-{}", std::process::id()));
    /// let mut rx = Ring::create(&path, 256)?;
    /// let tx = Ring::open(&path)?;
    /// rx.unlink();
    /// assert!(tx.push_frame(&[b"odd"]) && tx.push_frame(&[b"next"]));
    /// let mut a = [0u8; 3];
    /// rx.skip_to_line();
    /// rx.pop(&mut a).unwrap();
    /// rx.skip_to_line();
    /// assert_eq!(rx.front_split(4).unwrap(), (&b"next"[..], &b""[..]));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn push_frame(&self, parts: &[&[u8]]) -> bool {
        let head = self.counter(0).load(Ordering::Relaxed);
        self.push_from(self.line_up(head), parts)
    }

    /// Consumer: skip to where the next [`Ring::push_frame`] started.
    pub fn skip_to_line(&self) {
        let tail = self.counter(64).load(Ordering::Relaxed);
        self.counter(64)
            .store(self.line_up(tail), Ordering::Release);
    }

    /// `pos` rounded up to the next cache line of the ring (unchanged when
    /// the capacity is not a multiple of [`LINE`]: no position is then).
    fn line_up(&self, pos: u64) -> u64 {
        if self.cap % LINE != 0 {
            return pos;
        }
        pos.div_ceil(LINE as u64) * LINE as u64
    }

    /// Write `parts` from `start` (at or past `head`; the bytes between are
    /// skipped), if they fit.
    fn push_from(&self, start: u64, parts: &[&[u8]]) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let tail = self.counter(64).load(Ordering::Acquire);
        let used = start.wrapping_sub(tail) as usize;
        if used > self.cap || len > self.cap - used {
            return false;
        }
        let head = start;
        let mut at = (head % self.cap as u64) as usize;
        for p in parts {
            let mut src: &[u8] = p;
            while !src.is_empty() {
                let k = src.len().min(self.cap - at);
                // SAFETY: `at + k <= cap`; the range is free (the consumer is
                // past it), so only this producer touches it until `head` moves.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.data().add(at), k) };
                src = &src[k..];
                at = (at + k) % self.cap;
            }
        }
        self.counter(0)
            .store(head.wrapping_add(len as u64), Ordering::Release);
        true
    }

    /// Consumer: the next `len` bytes in place, as the piece up to the
    /// ring's end and the piece after it from the start (empty unless they
    /// wrap). An error if fewer have been written. Nothing is taken until
    /// [`Ring::advance`].
    pub fn front_split(&self, len: usize) -> Result<(&[u8], &[u8]), String> {
        let tail = self.counter(64).load(Ordering::Relaxed);
        let head = self.counter(0).load(Ordering::Acquire);
        let have = head.wrapping_sub(tail);
        if have > self.cap as u64 || (len as u64) > have {
            return Err(format!(
                "its shared-memory ring holds {have} bytes, the frame needs {len}"
            ));
        }
        let at = (tail % self.cap as u64) as usize;
        let first = len.min(self.cap - at);
        // SAFETY: both ranges lie inside the data, were written by the
        // producer before `head` (acquired above) moved past them, and are
        // not rewritten before `tail` moves past them.
        Ok(unsafe {
            (
                std::slice::from_raw_parts(self.data().add(at), first),
                std::slice::from_raw_parts(self.data(), len - first),
            )
        })
    }

    /// Consumer: release the next `len` bytes (seen through
    /// [`Ring::front_split`]).
    pub fn advance(&self, len: usize) {
        let tail = self.counter(64).load(Ordering::Relaxed);
        self.counter(64)
            .store(tail.wrapping_add(len as u64), Ordering::Release);
    }

    /// Consumer: take the next `dst.len()` bytes. An error (nothing taken)
    /// if fewer have been written: a peer that announced a payload it did
    /// not put here.
    pub fn pop(&self, dst: &mut [u8]) -> Result<(), String> {
        let tail = self.counter(64).load(Ordering::Relaxed);
        let head = self.counter(0).load(Ordering::Acquire);
        let have = head.wrapping_sub(tail);
        if have > self.cap as u64 || (dst.len() as u64) > have {
            return Err(format!(
                "its shared-memory ring holds {have} bytes, the frame needs {}",
                dst.len()
            ));
        }
        let len = dst.len();
        let mut at = (tail % self.cap as u64) as usize;
        let mut out: &mut [u8] = dst;
        while !out.is_empty() {
            let k = out.len().min(self.cap - at);
            // SAFETY: `at + k <= cap`, written by the producer before `head`
            // (acquired above) moved past it.
            unsafe { std::ptr::copy_nonoverlapping(self.data().add(at), out.as_mut_ptr(), k) };
            out = &mut out[k..];
            at = (at + k) % self.cap;
        }
        self.counter(64)
            .store(tail.wrapping_add(len as u64), Ordering::Release);
        Ok(())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.unlink();
        // SAFETY: the mapping made in `create`/`open`, of this length.
        unsafe { libc::munmap(self.base.cast(), META + self.cap) };
    }
}

/// Remove the rings in `dir` (`/dev/shm`) that this user's processes
/// created and that outlived them. A ring's name is removed once the peer
/// has opened it, a moment after the communicator starts; a rank killed in
/// that moment leaves it behind, so every communicator start sweeps.
pub fn sweep_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        // A FIFO, a link or another user's file planted under the prefix is
        // skipped without blocking and without being followed.
        let Ok(file) = open_checked(&e.path(), false) else {
            continue;
        };
        let mut raw = [0u8; 8];
        use std::os::unix::fs::FileExt;
        if file.read_exact_at(&mut raw, PID_AT as u64).is_err() {
            continue;
        }
        let pid = u64::from_le_bytes(raw);
        // SAFETY: signal 0 only asks whether the process exists.
        let gone = pid > 0
            && pid <= i32::MAX as u64
            && unsafe { libc::kill(pid as i32, 0) } == -1
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Where rings are made.
pub const DIR: &str = "/dev/shm";

/// The name of the ring carrying frames from `from` to `to` on connection
/// `lane` of the communicator whose ranks agreed on `key`: a random number
/// per communicator, so no name can be planted in advance.
///
/// ```
/// let p = kolo::transport::shm::ring_path(0xab, 1, 2, 0);
/// assert_eq!(p.to_str(), Some("/dev/shm/kolo-00000000000000ab-1-2-0"));
/// ```
pub fn ring_path(key: u64, from: usize, to: usize, lane: usize) -> PathBuf {
    Path::new(DIR).join(format!("{PREFIX}{key:016x}-{from}-{to}-{lane}"))
}

/// Rings per peer (outer) and connection (inner); `None` where there is none.
pub type Rings = Vec<Vec<Option<Ring>>>;

/// A ring per peer `p` with `local[p]` (this rank excluded) and connection,
/// from `make(p, lane)`; `None` where it fails.
fn per_peer(
    rank: usize,
    local: &[bool],
    lanes: usize,
    make: impl Fn(usize, usize) -> io::Result<Ring>,
) -> Rings {
    (0..local.len())
        .map(|p| {
            (0..lanes)
                .map(|lane| {
                    (local[p] && p != rank)
                        .then(|| make(p, lane).ok())
                        .flatten()
                })
                .collect()
        })
        .collect()
}

/// The most ring memory one rank creates: rings are populated at creation,
/// so with many ranks on a host each ring shrinks to fit (128 ranks: 512 KiB
/// each, 64 MiB per rank) rather than the host's memory growing with the
/// square of the ranks.
pub const BUDGET: usize = 64 << 20;

/// The size of each ring a rank creates for `rings` rings when asked for
/// `want` bytes each: within [`BUDGET`], and 0 (none) when that leaves too
/// little for more than one bulk frame (over 64 KiB) at a time.
///
/// ```
/// use kolo::transport::shm::ring_size;
/// assert_eq!(ring_size(1 << 20, 3), 1 << 20);
/// assert_eq!(ring_size(1 << 20, 127), (64 << 20) / 127);
/// assert_eq!(ring_size(1 << 20, 1000), 0);
/// ```
pub fn ring_size(want: usize, rings: usize) -> usize {
    let cap = want.min(BUDGET / rings.max(1));
    if cap < 2 * super::DUPLEX_MAX {
        0
    } else {
        cap
    }
}

/// Create this rank's incoming rings, from every peer `p` with `local[p]`,
/// on each of `lanes` connections, `want` bytes each as [`ring_size`] allows
/// (none if it is 0). A ring that cannot be made (no `/dev/shm`, a name
/// taken) is left out: that peer then sends inline.
pub fn create_incoming(key: u64, rank: usize, local: &[bool], lanes: usize, want: usize) -> Rings {
    let peers = (0..local.len()).filter(|&p| local[p] && p != rank).count();
    let rings = peers * lanes;
    let cap = ring_size(want, rings);
    if cap == 0 {
        return Vec::new();
    }
    // Leave half of the space to other users of /dev/shm (a DataLoader's
    // workers, say) and share the rest among this host's ranks.
    let free = free_bytes(Path::new(DIR)).unwrap_or(0);
    let share = free / 2 / (peers as u64 + 1);
    let fit = ring_size(cap.min((share / rings as u64) as usize), rings);
    if fit == 0 {
        eprintln!(
            "kolo: rank {rank}: {DIR} has {free} bytes free, too few for shared-memory rings: \
             frames from this host's ranks go over TCP"
        );
        return Vec::new();
    }
    let made = per_peer(rank, local, lanes, |p, lane| {
        Ring::create(&ring_path(key, p, rank, lane), fit)
    });
    let made_n = made.iter().flatten().filter(|r| r.is_some()).count();
    let missing = rings - made_n;
    if missing > 0 {
        eprintln!(
            "kolo: rank {rank}: {missing} of {rings} shared-memory rings could not be made in {DIR} \
             (full?): those peers' frames go over TCP"
        );
    }
    made
}

/// Open the rings that peers created for frames from this rank (after every
/// rank created its own: once the connections are up). Missing ones are
/// left out: this rank then sends inline.
pub fn open_outgoing(key: u64, rank: usize, local: &[bool], lanes: usize) -> Rings {
    per_peer(rank, local, lanes, |p, lane| {
        Ring::open(&ring_path(key, rank, p, lane))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(cap: usize) -> (Ring, Ring) {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "kolo-ring-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut rx = Ring::create(&path, cap).unwrap();
        let tx = Ring::open(&path).unwrap();
        rx.unlink();
        assert!(!path.exists());
        (tx, rx)
    }

    #[test]
    fn wraps_around_and_refuses_what_does_not_fit() {
        let (tx, rx) = pair(10);
        assert!(tx.push(&[b"abcdef"]));
        assert!(!tx.push(&[b"ghijk"]), "6 + 5 > 10");
        let mut a = [0u8; 4];
        rx.pop(&mut a).unwrap();
        assert_eq!(&a, b"abcd");
        // 2 bytes left, 8 free: this one wraps.
        assert!(tx.push(&[b"gh", b"ijklm"]));
        let mut b = [0u8; 9];
        rx.pop(&mut b).unwrap();
        assert_eq!(&b, b"efghijklm");
        assert!(rx.pop(&mut [0u8; 1]).is_err(), "nothing left");
        assert!(tx.push(&[&[7u8; 10]]), "a full ring's worth once empty");
        let mut c = [0u8; 10];
        rx.pop(&mut c).unwrap();
        assert_eq!(c, [7u8; 10]);
    }

    #[test]
    fn a_stream_through_a_small_ring_arrives_in_order() {
        let (tx, rx) = pair(4096);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (mut sent, mut got) = (0, 0);
        let mut out = vec![0u8; data.len()];
        while got < data.len() {
            let k = (data.len() - sent).min(1000);
            if k > 0 && tx.push(&[&data[sent..sent + k]]) {
                sent += k;
            }
            let k = (sent - got).min(777);
            rx.pop(&mut out[got..got + k]).unwrap();
            got += k;
        }
        assert_eq!(out, data);
    }

    #[test]
    fn frames_start_on_a_line_and_wrapped_ones_come_in_two_pieces() {
        let (tx, rx) = pair(4 * LINE);
        let data: Vec<u8> = (0..=255u8).collect();
        // Frames of odd lengths: each starts on a line, so each line holds
        // one frame's bytes, and one of them wraps round the end.
        let mut at = 0u64;
        for (k, len) in [3usize, 70, 100, 61, 129].into_iter().enumerate() {
            assert!(tx.push_frame(&[&data[..len]]), "frame {k} fits");
            rx.skip_to_line();
            let (a, b) = rx.front_split(len).unwrap();
            let start = at.div_ceil(LINE as u64) * LINE as u64;
            assert_eq!(
                rx.data() as usize + (start % (4 * LINE) as u64) as usize,
                a.as_ptr() as usize,
                "frame {k} starts on a line"
            );
            assert_eq!([a, b].concat(), &data[..len], "frame {k}");
            assert_eq!(
                b.is_empty(),
                (start % (4 * LINE) as u64) as usize + len <= 4 * LINE
            );
            rx.advance(len);
            at = start + len as u64;
        }
        // The ring is empty; the skip to the next line counts against its room.
        let pad = (at.div_ceil(LINE as u64) * LINE as u64 - at) as usize;
        assert!(pad > 0);
        assert!(!tx.push_frame(&[&vec![0u8; 4 * LINE - pad + 1]]));
        assert!(rx.front_split(1).is_err(), "nothing was written");
        assert!(tx.push_frame(&[&vec![1u8; 4 * LINE - pad]]));
        rx.skip_to_line();
        let (a, b) = rx.front_split(4 * LINE - pad).unwrap();
        assert!([a, b].concat().iter().all(|&x| x == 1));
    }

    #[test]
    fn sweep_removes_the_rings_of_dead_processes_only() {
        let dir = std::env::temp_dir().join(format!("kolo-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mine = dir.join("kolo-live");
        let ring = Ring::create(&mine, 64).unwrap();
        // A ring whose creator has exited: a child that made it.
        let dead = dir.join("kolo-dead");
        std::fs::copy(&mine, &dead).unwrap();
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let mut child = child;
        child.wait().unwrap();
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new().write(true).open(&dead).unwrap();
        f.write_all_at(&u64::from(pid).to_le_bytes(), PID_AT as u64)
            .unwrap();
        let other = dir.join("not-a-ring");
        std::fs::write(&other, b"x").unwrap();
        sweep_stale(&dir);
        assert!(mine.exists(), "this process is alive");
        assert!(!dead.exists(), "its creator is gone");
        assert!(other.exists(), "not kolo's");
        drop(ring);
        assert!(!mine.exists(), "the creator unlinks on drop");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn open_refuses_what_others_may_read_and_create_a_taken_name() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("kolo-ring-mode-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Ring::open(&path).is_err());
        assert!(Ring::create(&path, 64).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
