//! How ranks exchange data: the [`Transport`] trait and the in-process [`ThreadTransport`].
//!
//! Messages are byte buffers with a tag; a receive names its source, its tag and its exact
//! length, and anything else (a different tag, a different length, a peer that left, nothing
//! within the timeout) is an error naming the peer. The collectives are written once, over
//! send / receive, in a fixed order, so every rank computes the same result bit for bit:
//! - `all_gather`: rank r's buffer lands at `out[r * n .. (r + 1) * n]` on every rank;
//! - `all_to_all`: chunk j of rank i's send buffer lands in chunk i of rank j's receive buffer;
//! - `all_reduce_sum` (f32): `x <- sum_{r = 0 .. P-1} x_r`, summed in rank order on every rank;
//! - `barrier`: returns once every rank has entered it.
//!
//! [`Sub`] is a view of a transport restricted to some of its ranks (renumbered 0 .. m-1), with
//! its tags moved into a range of their own: the groups of a hybrid scheme (USP's Ulysses groups
//! and ring groups) run any scheme or collective over the same transport.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Error, Result};

/// Tags at and above this value are the collectives' own.
const COLLECTIVE_TAG: u32 = 0xffff_0000;

/// The tag of an abort notice ([`Transport::abort`]): its bytes are the reason, in UTF-8.
pub const ABORT_TAG: u32 = 0xffff_ffff;

/// Point-to-point messages between the ranks of one group, and the collectives built on them.
pub trait Transport: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sends `data` to rank `to` under `tag` (does not wait for the receiver).
    fn send(&self, to: usize, tag: u32, data: &[u8]) -> Result<()>;
    /// Receives the next message from rank `from` into `out`: it must carry `tag` and exactly
    /// `out.len()` bytes.
    fn recv(&self, from: usize, tag: u32, out: &mut [u8]) -> Result<()>;

    /// Every rank's `data` (all of one length n) concatenated in rank order into `out`
    /// (`P x n` bytes).
    fn all_gather(&self, data: &[u8], out: &mut [u8]) -> Result<()> {
        let (p, r, n) = (self.world(), self.rank(), data.len());
        if out.len() != p * n {
            return Err(self.err(format!(
                "all_gather: output holds {} bytes, expected {p} ranks x {n}",
                out.len()
            )));
        }
        for to in (0..p).filter(|&to| to != r) {
            self.send(to, COLLECTIVE_TAG, data)?;
        }
        out[r * n..(r + 1) * n].copy_from_slice(data);
        for from in (0..p).filter(|&f| f != r) {
            self.recv(from, COLLECTIVE_TAG, &mut out[from * n..(from + 1) * n])?;
        }
        Ok(())
    }

    /// Chunk j of `send` (P equal chunks) goes to rank j; chunk i of `recv` comes from rank i.
    fn all_to_all(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let (p, r) = (self.world(), self.rank());
        if !send.len().is_multiple_of(p) || recv.len() != send.len() {
            return Err(self.err(format!(
                "all_to_all: {} bytes to send and {} to receive; both must be the same multiple of {p} ranks",
                send.len(),
                recv.len()
            )));
        }
        let n = send.len() / p;
        for to in (0..p).filter(|&to| to != r) {
            self.send(to, COLLECTIVE_TAG + 1, &send[to * n..(to + 1) * n])?;
        }
        recv[r * n..(r + 1) * n].copy_from_slice(&send[r * n..(r + 1) * n]);
        for from in (0..p).filter(|&f| f != r) {
            self.recv(
                from,
                COLLECTIVE_TAG + 1,
                &mut recv[from * n..(from + 1) * n],
            )?;
        }
        Ok(())
    }

    /// `x <- sum over ranks of x` (f32, summed in rank order: the same bits on every rank).
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<()> {
        let p = self.world();
        let mine: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut all = vec![0u8; p * mine.len()];
        self.all_gather(&mine, &mut all)?;
        for (i, v) in x.iter_mut().enumerate() {
            *v = (0..p)
                .map(|r| {
                    let o = r * mine.len() + 4 * i;
                    f32::from_le_bytes(all[o..o + 4].try_into().expect("4 bytes"))
                })
                .fold(0.0f32, |a, b| a + b);
        }
        Ok(())
    }

    /// Returns once every rank has entered it.
    fn barrier(&self) -> Result<()> {
        let mut out = vec![0u8; self.world()];
        self.all_gather(&[1], &mut out)
    }

    /// Tells every peer that this rank gives up, and why (its error): a peer waiting for this
    /// rank then fails at once with the reason instead of its own timeout, so a failure's
    /// cause (the rank that stalled or left) reaches every rank. Best effort: peers that have
    /// left are skipped.
    fn abort(&self, why: &str) {
        for to in (0..self.world()).filter(|&to| to != self.rank()) {
            let _ = self.send(to, ABORT_TAG, why.as_bytes());
        }
    }

    /// An error of this rank.
    fn err(&self, msg: String) -> Error {
        Error::Comm {
            rank: self.rank(),
            world: self.world(),
            msg,
        }
    }
}

/// A transport that counts what passes through it: the bytes and messages this rank sends and
/// receives (collectives included: they are built on send / receive).
pub struct Counted<T: Transport> {
    pub inner: T,
    sent: AtomicU64,
    received: AtomicU64,
    messages: AtomicU64,
}

/// What a [`Counted`] transport saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
    /// Messages sent.
    pub messages: u64,
}

impl<T: Transport> Counted<T> {
    pub fn new(inner: T) -> Counted<T> {
        Counted {
            inner,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            messages: AtomicU64::new(0),
        }
    }
    pub fn traffic(&self) -> Traffic {
        Traffic {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
        }
    }
}

impl<T: Transport> Transport for Counted<T> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn send(&self, to: usize, tag: u32, data: &[u8]) -> Result<()> {
        self.inner.send(to, tag, data)?;
        self.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.messages.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn recv(&self, from: usize, tag: u32, out: &mut [u8]) -> Result<()> {
        self.inner.recv(from, tag, out)?;
        self.received.fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// A transport restricted to the ranks `members` of another (`members[i]` is the view's rank i):
/// a send to rank i goes to rank `members[i]` of the whole group. The view's tags are moved by
/// its `salt` (1 ..= 127) into their own range, `tag ^ (salt << 24)`: the schemes' small tags
/// and the collectives' tags (top byte 0xff) land in ranges no other salt and no tag of the
/// whole group uses (the abort tag stays the abort tag), so a message meant for one group is
/// never taken for another's (the ranks' views must still not talk to the same peer at the same
/// time: messages between two ranks are received in order). Errors name the whole group's ranks
/// (the underlying transport reports the peers by their rank there) and the view.
pub struct Sub<'a> {
    inner: &'a dyn Transport,
    members: Vec<usize>,
    rank: usize,
    salt: u32,
    name: String,
}

impl<'a> Sub<'a> {
    /// The view of `inner` over `members` (distinct ranks of `inner`, this rank among them),
    /// named `name` in its errors.
    pub fn new(
        inner: &'a dyn Transport,
        members: Vec<usize>,
        salt: u32,
        name: &str,
    ) -> Result<Sub<'a>> {
        let me = inner.rank();
        let distinct = members
            .iter()
            .enumerate()
            .all(|(i, a)| members[..i].iter().all(|b| a != b));
        let rank = members.iter().position(|&m| m == me);
        match rank {
            Some(rank)
                if distinct
                    && (1..=127).contains(&salt)
                    && members.iter().all(|&m| m < inner.world()) =>
            {
                Ok(Sub {
                    inner,
                    members,
                    rank,
                    salt,
                    name: name.to_string(),
                })
            }
            _ => Err(inner.err(format!(
                "{name}: ranks {members:?} (salt {salt}) are not a group of distinct ranks of 0..{} holding this rank {me} (salts 1 ..= 127)",
                inner.world()
            ))),
        }
    }

    /// The whole group's ranks of this view, in the view's order.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    fn tag(&self, tag: u32) -> u32 {
        if tag == ABORT_TAG {
            tag
        } else {
            tag ^ (self.salt << 24)
        }
    }

    fn peer(&self, i: usize, what: &str) -> Result<usize> {
        self.members.get(i).copied().ok_or_else(|| {
            self.err(format!(
                "{what} rank {i}: not a rank of the view (ranks 0..{})",
                self.members.len()
            ))
        })
    }
}

impl Transport for Sub<'_> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.members.len()
    }
    fn send(&self, to: usize, tag: u32, data: &[u8]) -> Result<()> {
        let to = self.peer(to, "send to")?;
        self.inner.send(to, self.tag(tag), data)
    }
    fn recv(&self, from: usize, tag: u32, out: &mut [u8]) -> Result<()> {
        let from = self.peer(from, "receive from")?;
        self.inner.recv(from, self.tag(tag), out)
    }
    /// A rank that gives up in one group tells the whole group (every rank may wait on it).
    fn abort(&self, why: &str) {
        self.inner.abort(why)
    }
    fn err(&self, msg: String) -> Error {
        self.inner.err(format!(
            "{} (ranks {:?}, here rank {} of {}): {msg}",
            self.name,
            self.members,
            self.rank,
            self.members.len()
        ))
    }
}

/// One message: its tag and bytes.
pub(crate) type Msg = (u32, Vec<u8>);

/// What every queue-backed transport's receive does with what its queue from rank `from` gave
/// (`msg`, waited for up to `timeout`): nothing in time or a peer that left, an abort notice,
/// a different tag or length are errors naming the peer; else the bytes go to `out`.
pub(crate) fn take_message(
    t: &dyn Transport,
    from: usize,
    tag: u32,
    timeout: Duration,
    msg: std::result::Result<Msg, RecvTimeoutError>,
    out: &mut [u8],
) -> Result<()> {
    let (got_tag, data) = msg.map_err(|e| {
        t.err(match e {
            RecvTimeoutError::Timeout => format!(
                "receive from rank {from} (tag {tag:#x}): nothing within {:.1} s",
                timeout.as_secs_f64()
            ),
            RecvTimeoutError::Disconnected => {
                format!("receive from rank {from} (tag {tag:#x}): that rank has left the group")
            }
        })
    })?;
    if got_tag == ABORT_TAG && tag != ABORT_TAG {
        return Err(t.err(format!(
            "receive from rank {from} (tag {tag:#x}): that rank gave up: {}",
            String::from_utf8_lossy(&data)
        )));
    }
    if got_tag != tag || data.len() != out.len() {
        return Err(t.err(format!(
            "receive from rank {from}: expected tag {tag:#x} with {} bytes, got tag {got_tag:#x} with {} bytes (the ranks disagree on the schedule)",
            out.len(),
            data.len()
        )));
    }
    out.copy_from_slice(&data);
    Ok(())
}

/// Ranks as threads of one process: one channel per ordered pair of ranks. A rank whose
/// transport is dropped (its thread ended or panicked) closes its channels, and its peers'
/// receives from it fail at once; a rank that sends nothing fails its peers' receives after
/// the timeout.
pub struct ThreadTransport {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// `to[j]`: the channel to rank j (None for this rank).
    to: Vec<Option<Sender<Msg>>>,
    /// `from[i]`: the channel from rank i (None for this rank).
    from: Vec<Option<Mutex<Receiver<Msg>>>>,
}

impl ThreadTransport {
    /// A group of `world` ranks (index = rank), each to be moved into its own thread.
    pub fn group(world: usize, timeout: Duration) -> Result<Vec<ThreadTransport>> {
        if world == 0 {
            return Err(Error::Comm {
                rank: 0,
                world,
                msg: "a group needs at least one rank".into(),
            });
        }
        let mut to: Vec<Vec<Option<Sender<Msg>>>> = (0..world)
            .map(|_| (0..world).map(|_| None).collect())
            .collect();
        let mut from: Vec<Vec<Option<Mutex<Receiver<Msg>>>>> = (0..world)
            .map(|_| (0..world).map(|_| None).collect())
            .collect();
        for i in 0..world {
            for j in (0..world).filter(|&j| j != i) {
                let (s, r) = channel();
                to[i][j] = Some(s);
                from[j][i] = Some(Mutex::new(r));
            }
        }
        Ok(to
            .into_iter()
            .zip(from)
            .enumerate()
            .map(|(rank, (to, from))| ThreadTransport {
                rank,
                world,
                timeout,
                to,
                from,
            })
            .collect())
    }

    fn check_peer(&self, peer: usize, what: &str) -> Result<()> {
        if peer >= self.world || peer == self.rank {
            return Err(self.err(format!(
                "{what} rank {peer}: not a peer (ranks 0..{}, this is {})",
                self.world, self.rank
            )));
        }
        Ok(())
    }
}

impl Transport for ThreadTransport {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }

    fn send(&self, to: usize, tag: u32, data: &[u8]) -> Result<()> {
        self.check_peer(to, "send to")?;
        let s = self.to[to].as_ref().expect("a channel to every peer");
        s.send((tag, data.to_vec())).map_err(|_| {
            // Gone: if it said why before leaving, its notice waits among its messages to us.
            let r = self.from[to].as_ref().expect("a channel from every peer");
            let r = r.lock().unwrap_or_else(|e| e.into_inner());
            let why = r.try_iter().find(|m| m.0 == ABORT_TAG);
            self.err(match why {
                Some((_, why)) => format!(
                    "send to rank {to}: that rank gave up: {}",
                    String::from_utf8_lossy(&why)
                ),
                None => format!("send to rank {to}: that rank has left the group"),
            })
        })
    }

    fn recv(&self, from: usize, tag: u32, out: &mut [u8]) -> Result<()> {
        self.check_peer(from, "receive from")?;
        let r = self.from[from].as_ref().expect("a channel from every peer");
        let r = r.lock().unwrap_or_else(|e| e.into_inner());
        let msg = r.recv_timeout(self.timeout);
        take_message(self, from, tag, self.timeout, msg, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// Runs `f(rank transport)` on `p` threads; the results in rank order.
    fn run<T: Send + 'static>(
        p: usize,
        timeout_ms: u64,
        f: impl Fn(ThreadTransport) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let group = ThreadTransport::group(p, Duration::from_millis(timeout_ms)).unwrap();
        let hs: Vec<_> = group
            .into_iter()
            .map(|t| {
                let f = f.clone();
                thread::spawn(move || f(t))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// A rank's test payload: distinct per rank and position, never zero.
    fn payload(rank: usize, n: usize) -> Vec<u8> {
        (0..n).map(|i| (rank * 31 + i * 7 + 1) as u8).collect()
    }

    #[test]
    fn collectives_agree_for_awkward_world_sizes() {
        for p in [1, 2, 3, 5, 8] {
            let n = 7;
            let res = run(p, 5000, move |t| {
                let r = t.rank();
                let mut g = vec![0u8; p * n];
                t.all_gather(&payload(r, n), &mut g).unwrap();
                let send: Vec<u8> = (0..p * 3).map(|i| (r * 100 + i) as u8).collect();
                let mut a2a = vec![0u8; p * 3];
                t.all_to_all(&send, &mut a2a).unwrap();
                let mut x: Vec<f32> = (0..5).map(|i| 0.1 * (r as f32 + 1.0) + i as f32).collect();
                t.all_reduce_sum(&mut x).unwrap();
                t.barrier().unwrap();
                (g, a2a, x)
            });
            for (r, (g, a2a, x)) in res.iter().enumerate() {
                for s in 0..p {
                    assert_eq!(&g[s * n..(s + 1) * n], &payload(s, n)[..], "p {p} rank {r}");
                    // chunk s of rank r's receive = chunk r of rank s's send
                    let want: Vec<u8> = (0..3).map(|i| (s * 100 + r * 3 + i) as u8).collect();
                    assert_eq!(&a2a[s * 3..(s + 1) * 3], &want[..], "p {p} rank {r}");
                }
                for (i, v) in x.iter().enumerate() {
                    let want: f32 = (0..p).map(|s| 0.1 * (s as f32 + 1.0) + i as f32).sum();
                    assert!((v - want).abs() <= 1e-4 * want.abs(), "{v} vs {want}");
                    assert_eq!(
                        v.to_bits(),
                        res[0].2[i].to_bits(),
                        "same bits on every rank"
                    );
                }
            }
        }
    }

    #[test]
    fn ring_of_point_to_point_messages() {
        let p = 5;
        let res = run(p, 5000, move |t| {
            let (r, next, prev) = (t.rank(), (t.rank() + 1) % p, (t.rank() + p - 1) % p);
            t.send(next, 3, &payload(r, 11)).unwrap();
            let mut got = vec![0u8; 11];
            t.recv(prev, 3, &mut got).unwrap();
            got
        });
        for (r, got) in res.iter().enumerate() {
            assert_eq!(got, &payload((r + p - 1) % p, 11));
        }
    }

    #[test]
    fn a_silent_rank_times_out_with_its_name() {
        let res = run(2, 200, |t| {
            if t.rank() == 0 {
                let mut b = [0u8; 4];
                Some(t.recv(1, 9, &mut b).unwrap_err().to_string())
            } else {
                // alive but silent past rank 0's timeout: a timeout, not a departure
                thread::sleep(Duration::from_millis(3000));
                None
            }
        });
        let e = res[0].clone().unwrap();
        assert!(
            e.contains("rank 0 of 2") && e.contains("from rank 1") && e.contains("nothing within"),
            "{e}"
        );
    }

    #[test]
    fn a_rank_that_leaves_is_reported_at_once() {
        let res = run(3, 10_000, |t| {
            if t.rank() == 2 {
                return String::new(); // leaves: its transport is dropped
            }
            let start = std::time::Instant::now();
            let mut b = vec![0u8; 3];
            let e = t
                .all_gather(&[1, 2, 3][..1], &mut b)
                .unwrap_err()
                .to_string();
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no wait for the timeout"
            );
            e
        });
        // (which departure a survivor sees first depends on timing: rank 2's, or that of the
        // other survivor once it has failed)
        for e in &res[..2] {
            assert!(e.contains("left the group"), "{e}");
        }
    }

    /// A rank that gives up tells the others why: rank 0 waits on rank 2, rank 2 on rank 1,
    /// which stalls; rank 2 times out naming rank 1 and aborts, and rank 0 hears of rank 1 at
    /// once through rank 2's notice (long before its own, much longer, timeout).
    #[test]
    fn an_abort_carries_the_cause_to_every_rank() {
        let res = run(3, 300, |mut t| {
            let start = std::time::Instant::now();
            let mut b = [0u8; 4];
            if t.rank() == 0 {
                t.timeout = Duration::from_secs(10);
            }
            match t.rank() {
                0 => {
                    let e = t.recv(2, 1, &mut b).unwrap_err().to_string();
                    Some((e, start.elapsed()))
                }
                1 => {
                    thread::sleep(Duration::from_millis(1500));
                    None
                }
                _ => {
                    let e = t.recv(1, 1, &mut b).unwrap_err();
                    t.abort(&e.to_string());
                    Some((e.to_string(), start.elapsed()))
                }
            }
        });
        let (e2, _) = res[2].clone().unwrap();
        assert!(
            e2.contains("rank 2 of 3")
                && e2.contains("from rank 1")
                && e2.contains("nothing within"),
            "{e2}"
        );
        let (e0, waited) = res[0].clone().unwrap();
        assert!(
            e0.contains("from rank 2") && e0.contains("gave up") && e0.contains("from rank 1"),
            "{e0}"
        );
        assert!(waited < Duration::from_secs(2), "{waited:?}");
    }

    /// P = 6 as a 2 x 3 grid: the rows' views, then the columns' views, each running the
    /// collectives and a ring of point-to-point messages under the same tags; every view sees
    /// its members' data only, in its own numbering.
    #[test]
    fn sub_views_of_rows_and_columns_keep_to_their_members() {
        let (rows, cols) = (2, 3);
        let res = run(rows * cols, 5000, move |t| {
            let me = t.rank();
            let row: Vec<usize> = (0..cols).map(|c| me / cols * cols + c).collect();
            let col: Vec<usize> = (0..rows).map(|r| r * cols + me % cols).collect();
            let mut seen = Vec::new();
            for (members, salt) in [(row, 1), (col, 2)] {
                let v = Sub::new(&t, members.clone(), salt, "test view").unwrap();
                assert_eq!(v.members(), &members[..]);
                let (m, r) = (v.world(), v.rank());
                assert_eq!(members[r], me);
                let mut g = vec![0u8; m * 5];
                v.all_gather(&payload(me, 5), &mut g).unwrap();
                let send: Vec<u8> = (0..m * 2).map(|i| (me * 50 + i) as u8).collect();
                let mut a2a = vec![0u8; m * 2];
                v.all_to_all(&send, &mut a2a).unwrap();
                let mut x = [me as f32 + 0.5];
                v.all_reduce_sum(&mut x).unwrap();
                let mut got = vec![0u8; 3];
                if m > 1 {
                    v.send((r + 1) % m, 7, &payload(me, 3)).unwrap();
                    v.recv((r + m - 1) % m, 7, &mut got).unwrap();
                }
                seen.push((members, g, a2a, x[0], got));
            }
            seen
        });
        for (me, views) in res.iter().enumerate() {
            for (members, g, a2a, x, got) in views {
                let m = members.len();
                let r = members.iter().position(|&x| x == me).unwrap();
                for (i, &who) in members.iter().enumerate() {
                    assert_eq!(&g[i * 5..i * 5 + 5], &payload(who, 5)[..], "rank {me}");
                    let want: Vec<u8> = (0..2).map(|j| (who * 50 + r * 2 + j) as u8).collect();
                    assert_eq!(&a2a[i * 2..i * 2 + 2], &want[..], "rank {me}");
                }
                let sum: f32 = members.iter().map(|&w| w as f32 + 0.5).sum();
                assert_eq!(*x, sum, "rank {me}");
                if m > 1 {
                    assert_eq!(got, &payload(members[(r + m - 1) % m], 3), "rank {me}");
                }
            }
        }
    }

    /// A view's tags are its own: a message sent through another view (or the whole group) is
    /// an error naming both tags, not a silent mix-up; bad member lists and peers are errors.
    #[test]
    fn sub_view_tags_are_separate_and_bad_views_are_errors() {
        let res = run(3, 2000, |t| {
            let v = Sub::new(&t, vec![0, 1], 1, "pair");
            if t.rank() == 2 {
                let e = v.err().unwrap().to_string();
                return vec![e];
            }
            let v = v.unwrap();
            if t.rank() == 0 {
                let w = Sub::new(&t, vec![1, 0], 2, "other").unwrap();
                w.send(0, 4, &[1]).unwrap(); // rank 1 of `other` is rank 0: rank 1 of the whole
                let bad = v.send(2, 4, &[1]).unwrap_err().to_string();
                let dup = Sub::new(&t, vec![0, 0], 1, "dup")
                    .err()
                    .unwrap()
                    .to_string();
                vec![bad, dup]
            } else {
                let mut b = [0u8; 1];
                vec![v.recv(0, 4, &mut b).unwrap_err().to_string()]
            }
        });
        assert!(
            res[0][0].contains(
                "pair (ranks [0, 1], here rank 0 of 2): send to rank 2: not a rank of the view"
            ),
            "{}",
            res[0][0]
        );
        assert!(res[0][1].contains("dup: ranks [0, 0]"), "{}", res[0][1]);
        assert!(
            res[1][0].contains("rank 1 of 3")
                && res[1][0].contains("expected tag 0x1000004")
                && res[1][0].contains("got tag 0x2000004"),
            "{}",
            res[1][0]
        );
        assert!(
            res[2][0].contains("rank 2 of 3") && res[2][0].contains("holding this rank 2"),
            "{}",
            res[2][0]
        );
    }

    #[test]
    fn mismatched_messages_and_bad_peers_are_errors() {
        let res = run(2, 2000, |t| {
            if t.rank() == 0 {
                t.send(1, 5, &[1, 2, 3]).unwrap();
                t.send(1, 6, &[1, 2]).unwrap();
                let bad = t.send(7, 0, &[0]).unwrap_err().to_string();
                let me = t.send(0, 0, &[0]).unwrap_err().to_string();
                vec![bad, me]
            } else {
                let mut b = [0u8; 3];
                let tag = t.recv(0, 4, &mut b).unwrap_err().to_string();
                let len = t.recv(0, 6, &mut b).unwrap_err().to_string();
                let mut g = [0u8; 5];
                let size = t.all_gather(&[1, 2], &mut g).unwrap_err().to_string();
                vec![tag, len, size]
            }
        });
        assert!(
            res[0][0].contains("send to rank 7: not a peer"),
            "{}",
            res[0][0]
        );
        assert!(
            res[0][1].contains("send to rank 0: not a peer"),
            "{}",
            res[0][1]
        );
        assert!(
            res[1][0].contains("expected tag 0x4") && res[1][0].contains("got tag 0x5"),
            "{}",
            res[1][0]
        );
        assert!(
            res[1][1].contains("with 3 bytes") && res[1][1].contains("with 2 bytes"),
            "{}",
            res[1][1]
        );
        assert!(res[1][2].contains("expected 2 ranks x 2"), "{}", res[1][2]);
        assert!(ThreadTransport::group(0, Duration::from_secs(1)).is_err());
    }
}
