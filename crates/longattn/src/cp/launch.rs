//! Joining a job of several processes: torchrun's environment, a TCP rendezvous hosted by rank 0,
//! and [`TcpTransport`], the [`Transport`] over TCP sockets between the processes.
//!
//! `torchrun --no-python --nproc-per-node=N longattn cp run ... --transport tcp` starts N
//! processes with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` set
//! ([`Job::from_env`]). Then ([`join`]):
//! 1. every rank opens a listener for the mesh (an ephemeral port on the address its connection
//!    to rank 0 leaves from, so the same code spans nodes);
//! 2. rank 0 listens on `MASTER_ADDR:MASTER_PORT`; every other rank connects (retrying until the
//!    timeout: rank 0 may start later) and says hello: its rank, the world size, a fingerprint
//!    of its job (the caller's: shapes, mask, scheme, ...) and its mesh address;
//! 3. rank 0 checks every hello (world size, rank in range and not taken twice, fingerprint equal
//!    to its own) and answers every rank with the table of mesh addresses, or with the error,
//!    so a wrong rank fails every rank with the same message;
//! 4. rank j connects to the mesh listener of every rank i < j and sends its rank; each pair of
//!    ranks then holds one socket, read by a thread of its own into a queue, so that a send never
//!    waits for the peer to read (two ranks sending large messages to each other at once cannot
//!    deadlock on full socket buffers).
//!
//! Frames: `tag: u32, length: u64` (little endian), then the bytes. A receive checks source, tag
//! and length as [`ThreadTransport`](super::transport::ThreadTransport) does; a peer whose socket
//! closes is reported at once ("that rank has left the group"), a peer that sends nothing after
//! the timeout. Every wait (accept, connect, hello, answer, mesh, receive) is bounded by the
//! timeout: a rank that never arrives is named on every other rank, never a hang.
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::transport::{take_message, Msg, Transport};
use crate::error::{Error, Result};

/// A process's place in the job, from torchrun's environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// Where rank 0 hosts the rendezvous: `MASTER_ADDR:port` (see [`Job::from_env`]).
    pub master: String,
}

impl Job {
    /// Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (default: `RANK`), `MASTER_ADDR` (default
    /// 127.0.0.1) and `MASTER_PORT`; a missing or malformed variable is an error naming it.
    /// The rendezvous port is `LONGATTN_RDZV_PORT` when set; else `MASTER_PORT + 1` under
    /// torchrun (`TORCHELASTIC_USE_AGENT_STORE=True`: torchrun's own store already listens on
    /// `MASTER_PORT`), `MASTER_PORT` otherwise.
    pub fn from_env() -> Result<Job> {
        Job::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Job::from_env`] over any source of variables (tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Job> {
        let bad = |msg: String| Error::Comm {
            rank: 0,
            world: 0,
            msg,
        };
        let num = |k: &str, need: bool| -> Result<Option<usize>> {
            match get(k) {
                None if need => Err(bad(format!(
                    "environment variable {k} is not set (start the ranks with torchrun, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
                ))),
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    bad(format!("environment variable {k}={v:?} is not a non-negative integer"))
                }),
            }
        };
        let rank = num("RANK", true)?.expect("required");
        let world = num("WORLD_SIZE", true)?.expect("required");
        let local_rank = num("LOCAL_RANK", false)?.unwrap_or(rank);
        let master_port = num("MASTER_PORT", true)?.expect("required");
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let port = match num("LONGATTN_RDZV_PORT", false)? {
            Some(p) => p,
            None => master_port + agent_store as usize,
        };
        if world == 0 || rank >= world {
            return Err(bad(format!(
                "RANK={rank} and WORLD_SIZE={world}: the rank must be below the world size (>= 1)"
            )));
        }
        if port == 0 || port > 65535 {
            return Err(bad(format!(
                "rendezvous port {port} (MASTER_PORT={master_port}{}) is not a port (1..65535)",
                if agent_store {
                    ", + 1 under torchrun"
                } else {
                    ""
                }
            )));
        }
        let addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        if addr.trim().is_empty() {
            return Err(bad("environment variable MASTER_ADDR is empty".into()));
        }
        Ok(Job {
            rank,
            world,
            local_rank,
            master: format!("{}:{port}", addr.trim()),
        })
    }
}

const MAGIC: &[u8; 4] = b"LACP";
const VERSION: u32 = 1;

fn comm(rank: usize, world: usize, msg: String) -> Error {
    Error::Comm { rank, world, msg }
}

/// Reads exactly `buf.len()` bytes before `deadline` (the socket's read timeout is set to what
/// is left; a peer that closes is an error).
fn read_exact_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock) => {
                return Err(std::io::ErrorKind::TimedOut.into())
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A length-prefixed blob (u32 length, little endian).
fn write_blob(s: &mut TcpStream, b: &[u8]) -> std::io::Result<()> {
    s.write_all(&(b.len() as u32).to_le_bytes())?;
    s.write_all(b)
}
fn read_blob(s: &mut TcpStream, deadline: Instant, most: usize) -> std::io::Result<Vec<u8>> {
    let mut n = [0u8; 4];
    read_exact_by(s, &mut n, deadline)?;
    let n = u32::from_le_bytes(n) as usize;
    if n > most {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message of {n} bytes (at most {most} expected): not a longattn rank"),
        ));
    }
    let mut b = vec![0u8; n];
    read_exact_by(s, &mut b, deadline)?;
    Ok(b)
}

/// Accepts one connection on `l` before `deadline` (None when the time is up).
fn accept_by(l: &TcpListener, deadline: Instant) -> std::io::Result<Option<TcpStream>> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connects to `addr`, retrying until `deadline` (the listener may not be up yet).
fn connect_by(addr: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::from(std::io::ErrorKind::TimedOut);
    loop {
        let addrs: Vec<SocketAddr> = match addr.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => return Err(e),
        };
        for a in &addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(last);
            }
            match TcpStream::connect_timeout(a, left.min(Duration::from_secs(2))) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Hello of rank `rank` to rank 0.
struct Hello {
    rank: usize,
    world: usize,
    fingerprint: u64,
    mesh_port: u16,
}

impl Hello {
    fn bytes(&self) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend(VERSION.to_le_bytes());
        b.extend((self.rank as u32).to_le_bytes());
        b.extend((self.world as u32).to_le_bytes());
        b.extend(self.fingerprint.to_le_bytes());
        b.extend(self.mesh_port.to_le_bytes());
        b
    }
    fn parse(b: &[u8]) -> Option<Hello> {
        if b.len() != 26 || &b[..4] != MAGIC || b[4..8] != VERSION.to_le_bytes() {
            return None;
        }
        let u32at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
        Some(Hello {
            rank: u32at(8),
            world: u32at(12),
            fingerprint: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            mesh_port: u16::from_le_bytes(b[24..26].try_into().unwrap()),
        })
    }
}

/// Joins `job` (see the module documentation) and returns the transport of this rank.
/// `fingerprint` stands for the job as this rank sees it: every rank must give the same.
pub fn join(job: &Job, fingerprint: u64, timeout: Duration) -> Result<TcpTransport> {
    let (rank, world) = (job.rank, job.world);
    let e = |msg: String| comm(rank, world, msg);
    let deadline = Instant::now() + timeout;
    if world == 1 {
        return Ok(TcpTransport::from_streams(rank, world, timeout, Vec::new()));
    }
    // The mesh addresses of every rank, in rank order.
    let table: Vec<SocketAddr>;
    let mesh: TcpListener;
    if rank == 0 {
        let master = TcpListener::bind(&job.master).map_err(|x| {
            e(format!(
                "rank 0 cannot listen for the rendezvous on {}: {x} (choose a free port with LONGATTN_RDZV_PORT)",
                job.master
            ))
        })?;
        let ip = master.local_addr().map_err(|x| e(x.to_string()))?.ip();
        mesh = TcpListener::bind((ip, 0)).map_err(|x| e(format!("mesh listener: {x}")))?;
        let mut peers: Vec<Option<(TcpStream, SocketAddr)>> = (0..world).map(|_| None).collect();
        let mut problem: Option<String> = None;
        let mut joined = 1;
        while joined < world && problem.is_none() {
            let Some(mut s) = accept_by(&master, deadline).map_err(|x| e(x.to_string()))? else {
                let missing: Vec<usize> = (1..world).filter(|&r| peers[r].is_none()).collect();
                problem = Some(format!(
                    "rank(s) {missing:?} did not join within {:.1} s",
                    timeout.as_secs_f64()
                ));
                break;
            };
            let hello = read_blob(&mut s, deadline, 64)
                .ok()
                .and_then(|b| Hello::parse(&b));
            let peer_ip = s.peer_addr().map(|a| a.ip()).ok();
            match (hello, peer_ip) {
                (Some(h), Some(ip)) => {
                    if h.world != world {
                        problem = Some(format!(
                            "rank {} says the world has {} ranks, rank 0 says {world}",
                            h.rank, h.world
                        ));
                    } else if h.rank == 0 || h.rank >= world {
                        problem = Some(format!(
                            "a process joined as rank {} (ranks 1..{world} connect to rank 0)",
                            h.rank
                        ));
                    } else if peers[h.rank].is_some() {
                        problem = Some(format!("two processes joined as rank {}", h.rank));
                    } else if h.fingerprint != fingerprint {
                        problem = Some(format!(
                            "rank {}'s job differs from rank 0's (fingerprint {:016x} vs {fingerprint:016x}): the ranks were given different inputs or options",
                            h.rank, h.fingerprint
                        ));
                    }
                    let r = h.rank.min(world - 1);
                    if problem.is_none() || peers[r].is_none() {
                        peers[r] = Some((s, SocketAddr::new(ip, h.mesh_port)));
                        joined += 1;
                    } else {
                        let _ = write_blob(&mut s, problem.as_deref().unwrap_or("").as_bytes());
                    }
                }
                _ => {
                    problem = Some(
                        "a connection to MASTER_PORT did not say a longattn hello (another program on the port?)"
                            .into(),
                    )
                }
            }
        }
        let mut addrs = vec![mesh.local_addr().map_err(|x| e(x.to_string()))?];
        addrs.extend(peers.iter().skip(1).map(|p| {
            p.as_ref()
                .map_or(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0), |p| p.1)
        }));
        // The answer: "OK" and the table, or the problem for everybody.
        let answer = match &problem {
            None => {
                let mut b = b"OK".to_vec();
                for a in &addrs {
                    let s = a.to_string();
                    b.extend((s.len() as u16).to_le_bytes());
                    b.extend(s.as_bytes());
                }
                b
            }
            Some(p) => format!("ER{p}").into_bytes(),
        };
        for (s, _) in peers.iter_mut().flatten() {
            let _ = write_blob(s, &answer);
        }
        if let Some(p) = problem {
            return Err(e(format!("rendezvous: {p}")));
        }
        table = addrs;
    } else {
        let mut s = connect_by(&job.master, deadline).map_err(|x| {
            e(format!(
                "rank {rank} cannot reach rank 0's rendezvous at {} within {:.1} s: {x}",
                job.master,
                timeout.as_secs_f64()
            ))
        })?;
        let ip = s.local_addr().map_err(|x| e(x.to_string()))?.ip();
        mesh = TcpListener::bind((ip, 0)).map_err(|x| e(format!("mesh listener: {x}")))?;
        let port = mesh.local_addr().map_err(|x| e(x.to_string()))?.port();
        let hello = Hello {
            rank,
            world,
            fingerprint,
            mesh_port: port,
        };
        write_blob(&mut s, &hello.bytes()).map_err(|x| e(format!("hello to rank 0: {x}")))?;
        // Rank 0 answers by its own deadline (also to say who did not join): wait past ours.
        let answer = read_blob(&mut s, deadline + timeout, 1 << 20).map_err(|x| {
            e(format!(
                "no answer from rank 0 within {:.1} s ({x}): a rank did not join, or rank 0 failed",
                timeout.as_secs_f64()
            ))
        })?;
        if answer.starts_with(b"ER") {
            return Err(e(format!(
                "rendezvous (rank 0 says): {}",
                String::from_utf8_lossy(&answer[2..])
            )));
        }
        if !answer.starts_with(b"OK") {
            return Err(e("rendezvous: a malformed answer from rank 0".into()));
        }
        let mut addrs = Vec::with_capacity(world);
        let mut i = 2;
        while i + 2 <= answer.len() {
            let n = u16::from_le_bytes([answer[i], answer[i + 1]]) as usize;
            let txt = std::str::from_utf8(answer.get(i + 2..i + 2 + n).unwrap_or_default())
                .map_err(|_| e("rendezvous: a malformed answer from rank 0".into()))?;
            addrs.push(
                txt.parse::<SocketAddr>()
                    .map_err(|_| e(format!("rendezvous: bad address {txt:?}")))?,
            );
            i += 2 + n;
        }
        if addrs.len() != world {
            return Err(e(format!(
                "rendezvous: rank 0 sent {} addresses for {world} ranks",
                addrs.len()
            )));
        }
        table = addrs;
    }
    // The mesh: rank j connects to every i < j and says its rank; i accepts from every j > i.
    let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    for (i, addr) in table.iter().enumerate().take(rank) {
        let mut s = connect_by(&addr.to_string(), deadline)
            .map_err(|x| e(format!("cannot reach rank {i} at {addr}: {x}")))?;
        s.write_all(&(rank as u32).to_le_bytes())
            .map_err(|x| e(format!("to rank {i}: {x}")))?;
        streams[i] = Some(s);
    }
    for _ in rank + 1..world {
        let Some(mut s) = accept_by(&mesh, deadline).map_err(|x| e(x.to_string()))? else {
            let missing: Vec<usize> = (rank + 1..world)
                .filter(|&r| streams[r].is_none())
                .collect();
            return Err(e(format!(
                "rank(s) {missing:?} did not connect within {:.1} s",
                timeout.as_secs_f64()
            )));
        };
        let mut r = [0u8; 4];
        read_exact_by(&mut s, &mut r, deadline).map_err(|x| e(format!("mesh hello: {x}")))?;
        let r = u32::from_le_bytes(r) as usize;
        if r <= rank || r >= world || streams[r].is_some() {
            return Err(e(format!("mesh: a connection says it is rank {r}")));
        }
        s.set_nodelay(true).map_err(|x| e(x.to_string()))?;
        streams[r] = Some(s);
    }
    Ok(TcpTransport::from_streams(rank, world, timeout, streams))
}

/// Ranks as processes, one TCP socket per pair of ranks (see the module documentation).
pub struct TcpTransport {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// The socket to rank j, for writing (None for this rank).
    to: Vec<Option<Mutex<TcpStream>>>,
    /// What the reader thread of rank i's socket has received (None for this rank).
    from: Vec<Option<Mutex<Receiver<Msg>>>>,
}

impl TcpTransport {
    fn from_streams(
        rank: usize,
        world: usize,
        timeout: Duration,
        streams: Vec<Option<TcpStream>>,
    ) -> TcpTransport {
        let mut to = Vec::with_capacity(world);
        let mut from = Vec::with_capacity(world);
        for s in streams
            .into_iter()
            .chain(std::iter::repeat_with(|| None))
            .take(world)
        {
            // The rendezvous left a read timeout on the socket: the reader waits without one
            // (the receives have their own), or a quiet peer would look gone.
            let s = s.filter(|s| s.set_read_timeout(None).is_ok());
            match s.and_then(|s| s.try_clone().ok().map(|r| (s, r))) {
                Some((w, r)) => {
                    let (tx, rx) = channel();
                    std::thread::spawn(move || read_frames(r, tx));
                    to.push(Some(Mutex::new(w)));
                    from.push(Some(Mutex::new(rx)));
                }
                None => {
                    to.push(None);
                    from.push(None);
                }
            }
        }
        TcpTransport {
            rank,
            world,
            timeout,
            to,
            from,
        }
    }

    fn check_peer(&self, peer: usize, what: &str) -> Result<()> {
        if peer >= self.world || peer == self.rank || self.to[peer].is_none() {
            return Err(self.err(format!(
                "{what} rank {peer}: not a peer (ranks 0..{}, this is {})",
                self.world, self.rank
            )));
        }
        Ok(())
    }
}

/// The reader of one peer's socket: frames into the queue until the socket closes (the queue's
/// sender is then dropped, and a receive from that peer reports it left).
fn read_frames(mut s: TcpStream, tx: Sender<Msg>) {
    loop {
        let mut h = [0u8; 12];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let tag = u32::from_le_bytes(h[..4].try_into().unwrap());
        let n = u64::from_le_bytes(h[4..].try_into().unwrap()) as usize;
        let mut b = Vec::new();
        if b.try_reserve_exact(n).is_err() {
            return;
        }
        b.resize(n, 0);
        if s.read_exact(&mut b).is_err() || tx.send((tag, b)).is_err() {
            return;
        }
    }
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }

    fn send(&self, to: usize, tag: u32, data: &[u8]) -> Result<()> {
        self.check_peer(to, "send to")?;
        let s = self.to[to].as_ref().expect("a socket to every peer");
        let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&tag.to_le_bytes());
        h[4..].copy_from_slice(&(data.len() as u64).to_le_bytes());
        s.set_write_timeout(Some(self.timeout)).ok();
        s.write_all(&h)
            .and_then(|_| s.write_all(data))
            .map_err(|x| {
                self.err(format!(
                    "send to rank {to} (tag {tag:#x}): {x} (that rank has left the group, or stopped reading)"
                ))
            })
    }

    fn recv(&self, from: usize, tag: u32, out: &mut [u8]) -> Result<()> {
        self.check_peer(from, "receive from")?;
        let r = self.from[from].as_ref().expect("a queue from every peer");
        let r = r.lock().unwrap_or_else(|e| e.into_inner());
        let msg = r.recv_timeout(self.timeout);
        take_message(self, from, tag, self.timeout, msg, out)
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        // Close the sockets so the peers' readers see this rank leave at once.
        for s in self.to.iter().flatten() {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(m: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = m
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn the_environment_is_read_and_checked() {
        let j = Job::from_vars(vars(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "10.0.0.7"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!(
            j,
            Job {
                rank: 2,
                world: 4,
                local_rank: 2,
                master: "10.0.0.7:29500".into()
            }
        );
        // Under torchrun its store holds MASTER_PORT: the rendezvous takes the next port, or
        // LONGATTN_RDZV_PORT.
        let under = |extra: &[(&'static str, &'static str)]| {
            let mut v = vec![
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("MASTER_PORT", "29500"),
                ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ];
            v.extend_from_slice(extra);
            Job::from_vars(vars(&v)).unwrap().master
        };
        assert_eq!(under(&[]), "127.0.0.1:29501");
        assert_eq!(under(&[("LONGATTN_RDZV_PORT", "4000")]), "127.0.0.1:4000");
        for (env, want) in [
            (vec![("WORLD_SIZE", "2"), ("MASTER_PORT", "1")], "RANK"),
            (vec![("RANK", "0"), ("MASTER_PORT", "1")], "WORLD_SIZE"),
            (vec![("RANK", "0"), ("WORLD_SIZE", "2")], "MASTER_PORT"),
            (
                vec![("RANK", "x"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")],
                "RANK=\"x\"",
            ),
            (
                vec![("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")],
                "below the world size",
            ),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")],
                "not a port",
            ),
        ] {
            let err = Job::from_vars(vars(&env)).unwrap_err().to_string();
            assert!(err.contains(want), "{env:?}: {err}");
        }
    }

    /// A free port on 127.0.0.1 (bound, read, released).
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn job(rank: usize, world: usize, port: u16) -> Job {
        Job {
            rank,
            world,
            local_rank: rank,
            master: format!("127.0.0.1:{port}"),
        }
    }

    /// Runs `f` on ranks 0..world joined over 127.0.0.1, each with `fp(rank)` as its fingerprint.
    fn on_ranks<T: Send>(
        world: usize,
        ranks: &[usize],
        fp: impl Fn(usize) -> u64 + Sync,
        timeout: Duration,
        f: impl Fn(Result<TcpTransport>) -> T + Sync,
    ) -> Vec<T> {
        let port = free_port();
        std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .iter()
                .map(|&r| {
                    let (f, fp) = (&f, &fp);
                    s.spawn(move || f(join(&job(r, world, port), fp(r), timeout)))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn ranks_join_and_the_collectives_agree() {
        for world in 1..=4 {
            let all: Vec<usize> = (0..world).collect();
            let got = on_ranks(
                world,
                &all,
                |_| 7,
                Duration::from_secs(20),
                |t| {
                    let t = t.unwrap();
                    let r = t.rank();
                    // Unequal payloads, seeded by rank: a ring, then the collectives.
                    let mine: Vec<u8> =
                        (0..1000 + 37 * r).map(|i| (i * 31 + r * 7) as u8).collect();
                    let to = (r + 1) % world;
                    let from = (r + world - 1) % world;
                    if world > 1 {
                        t.send(to, 5, &mine).unwrap();
                        let mut back = vec![0u8; 1000 + 37 * from];
                        t.recv(from, 5, &mut back).unwrap();
                        let want: Vec<u8> = (0..1000 + 37 * from)
                            .map(|i| (i * 31 + from * 7) as u8)
                            .collect();
                        assert_eq!(back, want);
                    }
                    let mut x: Vec<f32> = (0..100).map(|i| (i * (r + 1)) as f32 * 0.25).collect();
                    t.all_reduce_sum(&mut x).unwrap();
                    let mut g = vec![0u8; 3 * world];
                    t.all_gather(&[r as u8, 1, 2], &mut g).unwrap();
                    t.barrier().unwrap();
                    (x, g)
                },
            );
            for (x, g) in &got {
                assert_eq!((x, g), (&got[0].0, &got[0].1));
                let s: usize = (1..=world).sum();
                assert_eq!(x[3], (3 * s) as f32 * 0.25);
                assert_eq!(g[3 * (world - 1)], (world - 1) as u8);
            }
        }
    }

    #[test]
    fn large_messages_both_ways_do_not_deadlock() {
        let got = on_ranks(
            2,
            &[0, 1],
            |_| 1,
            Duration::from_secs(30),
            |t| {
                let t = t.unwrap();
                let peer = 1 - t.rank();
                let big = vec![t.rank() as u8 + 1; 16 << 20];
                t.send(peer, 9, &big).unwrap();
                let mut back = vec![0u8; 16 << 20];
                t.recv(peer, 9, &mut back).unwrap();
                back[12345]
            },
        );
        assert_eq!(got, vec![2, 1]);
    }

    #[test]
    fn a_missing_rank_is_named_on_every_rank() {
        let t0 = Instant::now();
        let got = on_ranks(
            3,
            &[0, 1],
            |_| 3,
            Duration::from_millis(1500),
            |t| t.err().map(|e| e.to_string()).unwrap_or_default(),
        );
        assert!(got[0].contains("rank(s) [2] did not join"), "{}", got[0]);
        assert!(got[1].contains("rank(s) [2] did not join"), "{}", got[1]);
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn mismatched_jobs_and_duplicate_ranks_are_refused() {
        let got = on_ranks(
            2,
            &[0, 1],
            |r| r as u64,
            Duration::from_secs(10),
            |t| t.err().map(|e| e.to_string()).unwrap_or_default(),
        );
        for g in &got {
            assert!(g.contains("job differs from rank 0's"), "{g}");
        }
        let got = on_ranks(
            3,
            &[0, 1, 1],
            |_| 5,
            Duration::from_secs(5),
            |t| t.err().map(|e| e.to_string()).unwrap_or_default(),
        );
        assert!(
            got[0].contains("two processes joined as rank 1"),
            "{}",
            got[0]
        );
    }

    #[test]
    fn a_rank_that_leaves_is_reported_at_once_and_a_silent_one_times_out() {
        let got = on_ranks(
            2,
            &[0, 1],
            |_| 1,
            Duration::from_secs(20),
            |t| {
                let t = t.unwrap();
                if t.rank() == 1 {
                    drop(t); // leaves at once
                    return String::new();
                }
                let t0 = Instant::now();
                let mut b = [0u8; 4];
                let e = t.recv(1, 1, &mut b).unwrap_err().to_string();
                assert!(t0.elapsed() < Duration::from_secs(5), "reported late");
                e
            },
        );
        assert!(
            got[0].contains("rank 1") && got[0].contains("left the group"),
            "{}",
            got[0]
        );
        let got = on_ranks(
            2,
            &[0, 1],
            |_| 1,
            Duration::from_millis(800),
            |t| {
                let t = t.unwrap();
                if t.rank() == 1 {
                    std::thread::sleep(Duration::from_millis(1500));
                    return String::new();
                }
                let mut b = [0u8; 4];
                t.recv(1, 1, &mut b).unwrap_err().to_string()
            },
        );
        assert!(got[0].contains("nothing within 0.8 s"), "{}", got[0]);
    }
}
