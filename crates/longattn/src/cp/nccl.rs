//! NCCL for ranks on GPUs: the library found and loaded at run time, and [`NcclComm`], a
//! communicator made from rank 0's unique id, with device-buffer send / receive, all-gather,
//! all-to-all and all-reduce over cudarc `CudaSlice`s on a given stream.
//!
//! Loading. cudarc (its `nccl` feature, loaded at run time like the rest of CUDA) opens NCCL by
//! name only: `libnccl.so` and `libnccl.so.<N>` for some N, but not `libnccl.so.2`, the name NCCL
//! ships under (and the only one torch's `nvidia-nccl-cu13` package holds); and its loader
//! panics when nothing loads, or when a symbol is missing. So before any NCCL call, [`find`]
//! settles where the library is, a file counting only if it loads and holds every function of
//! [`SYMBOLS`]:
//! - `LONGATTN_NCCL_LIB` ([`LIB_VAR`]) names the file: it must exist and load;
//! - else cudarc's names load: NCCL is ready as it is;
//! - else the folders of [`search_dirs`] (LD_LIBRARY_PATH, CUDA's and the system's library
//!   folders, the `nvidia/nccl/lib` of Python's site-packages: torch's package) are searched for
//!   `libnccl.so*`; the first that loads is taken;
//! - else an error naming the library, the names cudarc tries, the variable and every folder
//!   searched.
//!
//! A file found that way loads by name only if a folder holding a link `libnccl.so -> file` is on
//! LD_LIBRARY_PATH when the process starts (the dynamic loader reads the variable once, at
//! start): [`prepare`] makes that folder ([`link_dir`]) and says so ([`Loaded::Restart`]); the
//! CLI then starts itself again, once, with the folder first on LD_LIBRARY_PATH (the restarted
//! process is marked: if it still cannot load NCCL by name it fails with the reason).
//!
//! The communicator ([`NcclComm::new`]) is made over a host [`Transport`] the ranks already share
//! (the [`TcpTransport`](super::launch::TcpTransport) of a job joined through rank 0's rendezvous,
//! or threads in one process): rank 0 draws NCCL's unique id and sends its 128 bytes to every
//! other rank, which receive them under the transport's timeout. Every rank has thus arrived,
//! with the same job (the rendezvous's fingerprint), before any rank enters NCCL's init; a rank 0
//! that cannot draw the id tells the others why ([`Transport::abort`]).
//!
//! Collectives ([`NcclComm`]), all enqueued on the communicator's stream (asynchronous: the
//! stream orders them with the kernels around them):
//! - `all_gather`: rank r's n values land at `out[r n .. (r + 1) n]` on every rank;
//! - `all_to_all`: chunk j of rank i's `send` lands in chunk i of rank j's `recv` (P grouped
//!   send / receive pairs: NCCL has no all-to-all of its own);
//! - `all_reduce_sum`: `out <- sum over ranks of x` (NCCL's order of summation, which may differ
//!   from the host transports' rank order in the last bits).
//!
//! Timeouts ([`NcclComm`]): the communicator is non-blocking (`ncclCommInitRankConfig` with
//! `blocking = 0`); its init, every call NCCL answers "in progress" and [`NcclComm::wait`] (the
//! stream's work) poll `ncclCommGetAsyncError` under the timeout and abort the communicator
//! (`ncclCommAbort`, which also ends its kernels waiting on a dead peer) past it or on an
//! error, so a rank that never arrives, stalls or dies is a clear error on the others, never a
//! hang. Before NCCL is entered at all, the host transport's timeout has covered the rendezvous
//! and the unique id's exchange.
use std::ffi::{CStr, CString, OsStr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
};
use cudarc::nccl::{Id, NcclType};

use super::transport::Transport;
use crate::error::{Error, Result};

/// The environment variable naming the NCCL library file (e.g. `.../nvidia/nccl/lib/libnccl.so.2`).
pub const LIB_VAR: &str = "LONGATTN_NCCL_LIB";

/// The bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// The host transport's tag of the unique id rank 0 sends to every other rank.
pub const ID_TAG: u32 = 0x6e63_0001;

/// Where NCCL is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// cudarc's names load it: nothing to do.
    ByName,
    /// This file (it loads), which cudarc opens only through a `libnccl.so` link on the search
    /// path ([`link_dir`]).
    File(PathBuf),
}

/// Whether NCCL can be used in this process now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Loaded {
    /// Loaded; NCCL's version code (e.g. 22703 for 2.27.3).
    Ready { version: i32 },
    /// Found at `file`, loadable by name once the process starts with `dir` (holding the link
    /// `libnccl.so -> file`) first on LD_LIBRARY_PATH.
    Restart { dir: PathBuf, file: PathBuf },
}

fn lib_err(msg: String) -> Error {
    Error::Cuda { op: "nccl", msg }
}

/// The names cudarc tries, in its order.
pub fn cudarc_names() -> Vec<String> {
    let mut names = cudarc::get_lib_name_candidates("nccl");
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// The NCCL functions longattn calls (through cudarc): a library lacking one is not taken for
/// NCCL (cudarc would panic on the missing symbol).
pub const SYMBOLS: &[&str] = &[
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclCommInitRankConfig",
    "ncclCommGetAsyncError",
    "ncclCommAbort",
    "ncclGetErrorString",
    "ncclSend",
    "ncclRecv",
    "ncclAllGather",
    "ncclAllReduce",
    "ncclGroupStart",
    "ncclGroupEnd",
];

/// Whether cudarc's names load NCCL in this process: the first of them that the dynamic loader
/// opens (the one cudarc would take) holds every function of [`SYMBOLS`].
pub fn loads_by_name() -> bool {
    for name in cudarc_names() {
        let Ok(c) = CString::new(name) else { continue };
        match open_nccl(&c) {
            Ok(()) => return true,
            Err((true, _)) => return false, // it loads, but it is not NCCL
            Err((false, _)) => {}
        }
    }
    false
}

/// Opens `name` (a path, or a bare name searched as the loader does) and closes it again:
/// `Err((loaded, why))` when it does not load (`loaded` false, the loader's message) or lacks
/// some of [`SYMBOLS`] (`loaded` true).
fn open_nccl(name: &CStr) -> std::result::Result<(), (bool, String)> {
    // SAFETY: dlopen / dlsym / dlerror / dlclose with valid C strings; nothing found is called,
    // and the handle is closed at once.
    unsafe {
        let h = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if h.is_null() {
            let e = libc::dlerror();
            return Err((
                false,
                if e.is_null() {
                    "dlopen failed".to_string()
                } else {
                    CStr::from_ptr(e).to_string_lossy().into_owned()
                },
            ));
        }
        let missing: Vec<&str> = SYMBOLS
            .iter()
            .copied()
            .filter(|s| {
                let c = CString::new(*s).expect("no NUL in a symbol");
                libc::dlsym(h, c.as_ptr()).is_null()
            })
            .collect();
        libc::dlclose(h);
        if !missing.is_empty() {
            return Err((true, format!("it lacks {}", missing.join(", "))));
        }
    }
    Ok(())
}

/// [`open_nccl`] of a file: `Err(why)` when it does not load or is not NCCL.
fn try_load(path: &Path) -> std::result::Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| "a NUL in the path".to_string())?;
    open_nccl(&c).map_err(|e| e.1)
}

/// The folders searched for `libnccl.so*` when cudarc's names do not load: LD_LIBRARY_PATH's,
/// CUDA's and the system's library folders, and `nvidia/nccl/lib` in the site-packages of the
/// Python installations under /usr, /usr/local, /opt/conda, $CONDA_PREFIX, $VIRTUAL_ENV and
/// ~/.local (torch's `nvidia-nccl-cu13` package).
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()));
    }
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/local/lib",
    ] {
        dirs.push(d.into());
    }
    let mut prefixes: Vec<PathBuf> = ["/usr", "/usr/local", "/opt/conda"]
        .iter()
        .map(PathBuf::from)
        .collect();
    for var in ["CONDA_PREFIX", "VIRTUAL_ENV"] {
        if let Some(p) = std::env::var_os(var) {
            prefixes.push(p.into());
        }
    }
    if let Some(h) = std::env::var_os("HOME") {
        prefixes.push(Path::new(&h).join(".local"));
    }
    for pre in prefixes {
        let Ok(entries) = std::fs::read_dir(pre.join("lib")) else {
            continue;
        };
        let mut pys: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pys.sort();
        for py in pys {
            for site in ["site-packages", "dist-packages"] {
                dirs.push(py.join(site).join("nvidia/nccl/lib"));
            }
        }
    }
    dirs
}

/// Where NCCL is (module header): `var` is [`LIB_VAR`]'s value, `dirs` the folders to search.
/// Errors name the library, cudarc's names, the variable and the folders.
pub fn find(var: Option<&OsStr>, dirs: &[PathBuf]) -> Result<Found> {
    if let Some(v) = var.filter(|v| !v.is_empty()) {
        let file = PathBuf::from(v);
        if !file.is_file() {
            return Err(lib_err(format!(
                "{LIB_VAR}={}: no such file (it names the NCCL library, e.g. .../site-packages/nvidia/nccl/lib/libnccl.so.2)",
                file.display()
            )));
        }
        try_load(&file).map_err(|e| {
            lib_err(format!(
                "{LIB_VAR}={}: the file does not load as NCCL: {e}",
                file.display()
            ))
        })?;
        return Ok(Found::File(file));
    }
    if loads_by_name() {
        return Ok(Found::ByName);
    }
    let mut refused = Vec::new();
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(d) else {
            continue;
        };
        let mut libs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libnccl.so"))
            })
            .collect();
        libs.sort();
        for lib in libs {
            match try_load(&lib) {
                Ok(()) => return Ok(Found::File(lib)),
                Err(e) => refused.push(format!("{} ({e})", lib.display())),
            }
        }
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(lib_err(format!(
        "the NCCL library (libnccl) was not found: cudarc loads it by the names {} (not libnccl.so.2, the name NCCL ships under), {LIB_VAR} is not set, and no libnccl.so* that loads is in {}{}; install NCCL (e.g. torch's nvidia-nccl-cu13 package) and set {LIB_VAR}=/path/to/libnccl.so.2",
        cudarc_names().join(", "),
        if searched.is_empty() { "no folder".to_string() } else { searched.join(", ") },
        if refused.is_empty() {
            String::new()
        } else {
            format!(" (found but not loadable: {})", refused.join("; "))
        }
    )))
}

/// A folder holding the link `libnccl.so -> file` (under the system's temporary folder, one per
/// file), made or refreshed.
pub fn link_dir(file: &Path) -> Result<PathBuf> {
    let file = file
        .canonicalize()
        .map_err(|e| lib_err(format!("{}: {e}", file.display())))?;
    // FNV-1a of the path: one folder per library file.
    let h = file
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    let dir = std::env::temp_dir().join(format!("longattn-nccl-{h:016x}"));
    let link = dir.join("libnccl.so");
    // Ranks of one machine may make it at once: each writes a link of its own and renames it
    // over the shared name (atomic), so every rank ends with the same, whole link.
    let made = std::fs::create_dir_all(&dir).and_then(|_| {
        if std::fs::read_link(&link).ok().as_deref() == Some(file.as_path()) {
            return Ok(());
        }
        let mine = dir.join(format!("libnccl.so.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&mine);
        std::os::unix::fs::symlink(&file, &mine)?;
        std::fs::rename(&mine, &link)
    });
    made.map_err(|e| {
        lib_err(format!(
            "cannot make the link {} -> {}: {e}",
            link.display(),
            file.display()
        ))
    })?;
    Ok(dir)
}

/// Settles NCCL for this process (module header): ready (with its version), or the folder to put
/// first on LD_LIBRARY_PATH before starting again; an error when NCCL is nowhere.
pub fn prepare() -> Result<Loaded> {
    let var = std::env::var_os(LIB_VAR);
    match find(var.as_deref(), &search_dirs())? {
        Found::ByName => Ok(Loaded::Ready {
            version: version()?,
        }),
        Found::File(file) => {
            let dir = link_dir(&file)?;
            // Already started with the link first on the search path: cudarc's names find it.
            let first =
                std::env::var_os("LD_LIBRARY_PATH").and_then(|p| std::env::split_paths(&p).next());
            if first.as_deref() == Some(dir.as_path()) && loads_by_name() {
                return Ok(Loaded::Ready {
                    version: version()?,
                });
            }
            Ok(Loaded::Restart { dir, file })
        }
    }
}

/// NCCL's version code; an error (not a panic) when the library does not load by name.
pub fn version() -> Result<i32> {
    ready()?;
    cudarc::nccl::result::get_nccl_version().map_err(|e| lib_err(format!("ncclGetVersion: {e:?}")))
}

/// Ok when cudarc can open NCCL; otherwise [`find`]'s error (or advice for a file found that
/// needs the link), so that no cudarc call panics on a missing library.
fn ready() -> Result<()> {
    if loads_by_name() {
        return Ok(());
    }
    let var = std::env::var_os(LIB_VAR);
    match find(var.as_deref(), &search_dirs())? {
        Found::ByName => Ok(()),
        Found::File(file) => Err(lib_err(format!(
            "NCCL is at {}, but cudarc opens it by name only: start the process with a folder holding the link libnccl.so -> that file first on LD_LIBRARY_PATH (`longattn::cp::nccl::prepare` makes it; the CLI does this itself)",
            file.display()
        ))),
    }
}

/// `ncclConfig_t` as NCCL 2.17 laid it out (the fields this module sets): NCCL reads the `size`
/// bytes it is given and takes its defaults for the rest and for fields newer than `version`
/// (`parseCommConfig`), so one layout serves every NCCL >= 2.17 whatever cudarc's bindings were
/// generated for. `NCCL_CONFIG_INITIALIZER`: magic 0xcafebeef, every int "undefined" (INT_MIN),
/// pointers null.
#[repr(C)]
struct CommConfig {
    size: usize,
    magic: std::ffi::c_uint,
    version: std::ffi::c_uint,
    blocking: std::ffi::c_int,
    cga_cluster_size: std::ffi::c_int,
    min_ctas: std::ffi::c_int,
    max_ctas: std::ffi::c_int,
    net_name: *const std::ffi::c_char,
    split_share: std::ffi::c_int,
}

impl CommConfig {
    /// A non-blocking communicator's config: init and every call return at once
    /// (`ncclInProgress`), their completion polled with `ncclCommGetAsyncError`.
    fn non_blocking() -> CommConfig {
        const UNDEF: std::ffi::c_int = std::ffi::c_int::MIN;
        CommConfig {
            size: std::mem::size_of::<CommConfig>(),
            magic: 0xcafe_beef,
            version: 21700, // NCCL_VERSION(2, 17, 0)
            blocking: 0,
            cga_cluster_size: UNDEF,
            min_ctas: UNDEF,
            max_ctas: UNDEF,
            net_name: std::ptr::null(),
            split_share: UNDEF,
        }
    }
}

/// NCCL's result codes as numbers (an async error is read into a `u32`: a code this build's
/// bindings do not list is then a number in the message, not an invalid enum value).
const NCCL_SUCCESS: u32 = 0;
const NCCL_IN_PROGRESS: u32 = 7;

/// NCCL's name of result `code`, e.g. "remote process exited or there was a network error".
fn nccl_reason(code: u32) -> String {
    use cudarc::nccl::sys::ncclResult_t as R;
    let known = [
        R::ncclSuccess,
        R::ncclUnhandledCudaError,
        R::ncclSystemError,
        R::ncclInternalError,
        R::ncclInvalidArgument,
        R::ncclInvalidUsage,
        R::ncclRemoteError,
        R::ncclInProgress,
    ];
    match known.into_iter().find(|r| *r as u32 == code) {
        Some(r) => {
            // SAFETY: NCCL returns a static string for every result code.
            let s = unsafe { cudarc::nccl::sys::ncclGetErrorString(r) };
            if s.is_null() {
                format!("NCCL result {code}")
            } else {
                // SAFETY: non-null, NUL-terminated, static (above).
                let text = unsafe { CStr::from_ptr(s) }.to_string_lossy();
                format!("{text} (NCCL result {code})")
            }
        }
        None => format!("NCCL result {code}"),
    }
}

/// A communicator of one rank, on one stream, made non-blocking so that nothing waits on a
/// peer without a deadline:
/// - init (`ncclCommInitRankConfig` with `blocking = 0`) returns at once; [`NcclComm::new`]
///   polls `ncclCommGetAsyncError` until the communicator is ready, and past the timeout aborts
///   it (`ncclCommAbort`) with an error naming the ranks that were expected: a rank that never
///   arrives (stalled, killed, or a different job) costs the others the timeout, not a hang;
/// - every call that NCCL answers with "in progress" (a non-blocking communicator may, e.g.
///   while it connects to a peer for the first time) is settled the same way before the next;
/// - [`NcclComm::wait`] waits for the stream's work (the collectives enqueued and the kernels
///   around them) under the timeout, polling the stream and the communicator's async error
///   (NCCL reports a peer's death it detects as a remote error); on either, or past the
///   deadline, it aborts the communicator, which also ends its kernels still waiting on a peer.
///
/// Once aborted, every call is refused with the reason; drop aborts (it never waits on peers).
pub struct NcclComm {
    comm: cudarc::nccl::sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout: std::time::Duration,
    /// Why the communicator was aborted, once it was.
    aborted: std::sync::Mutex<Option<String>>,
}

// SAFETY: an NCCL communicator may be used from any thread (one call at a time: every method
// takes `&self` but the struct is not `Sync`).
unsafe impl Send for NcclComm {}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.aborted.get_mut().map_or(true, |a| a.is_none()) {
            // SAFETY: the communicator is valid and not yet aborted; abort does not wait on
            // peers (destroy would, for a peer that has died).
            unsafe {
                let _ = cudarc::nccl::sys::ncclCommAbort(self.comm);
            }
        }
    }
}

impl NcclComm {
    /// A new NCCL unique id (what rank 0 hands to the others in [`NcclComm::new`]).
    pub fn unique_id() -> Result<Vec<u8>> {
        ready()?;
        let id = Id::new().map_err(|e| lib_err(format!("ncclGetUniqueId: {e:?}")))?;
        Ok(id.internal().iter().map(|&c| c as u8).collect())
    }

    /// This rank's communicator of the group of `t` (rank r of P here is rank r of P in NCCL),
    /// its operations on `stream` (the rank's GPU): rank 0 draws the unique id and sends it to
    /// every other rank over `t` (module header). Waits for NCCL's init at most `timeout`
    /// (struct header); an error on any rank is sent to its peers ([`Transport::abort`]).
    pub fn new(
        stream: Arc<CudaStream>,
        t: &dyn Transport,
        timeout: std::time::Duration,
    ) -> Result<NcclComm> {
        let res = Self::init(stream, t, timeout);
        res.inspect_err(|e| t.abort(&e.to_string()))
    }

    fn init(
        stream: Arc<CudaStream>,
        t: &dyn Transport,
        timeout: std::time::Duration,
    ) -> Result<NcclComm> {
        let (rank, world) = (t.rank(), t.world());
        let err = |msg: String| Error::Comm { rank, world, msg };
        ready()?;
        let mut blob = vec![0u8; ID_BYTES];
        if rank == 0 {
            blob = Self::unique_id()?;
            if blob.len() != ID_BYTES {
                return Err(err(format!(
                    "nccl: ncclGetUniqueId gave {} bytes, expected {ID_BYTES}",
                    blob.len()
                )));
            }
            for to in 1..world {
                t.send(to, ID_TAG, &blob)?;
            }
        } else {
            t.recv(0, ID_TAG, &mut blob)?;
        }
        let mut id = cudarc::nccl::sys::ncclUniqueId {
            internal: [0; ID_BYTES],
        };
        for (d, &s) in id.internal.iter_mut().zip(&blob) {
            *d = s as std::ffi::c_char;
        }
        let (nranks, me) = (
            i32::try_from(world).map_err(|_| err(format!("nccl: {world} ranks")))?,
            rank as i32,
        );
        // NCCL creates the communicator on the current device: the stream's.
        stream.context().bind_to_thread().map_err(|e| {
            err(format!(
                "nccl: binding the stream's GPU to this thread: {e:?}"
            ))
        })?;
        let mut config = CommConfig::non_blocking();
        let mut raw: cudarc::nccl::sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` and `config` outlive the call; NCCL copies the config and the id.
        let code = unsafe {
            cudarc::nccl::sys::ncclCommInitRankConfig(
                &mut raw,
                nranks,
                id,
                me,
                (&mut config as *mut CommConfig).cast(),
            )
        } as u32;
        if code != NCCL_SUCCESS && code != NCCL_IN_PROGRESS {
            if !raw.is_null() {
                // SAFETY: a communicator NCCL handed out, never used after this.
                unsafe {
                    let _ = cudarc::nccl::sys::ncclCommAbort(raw);
                }
            }
            return Err(err(format!(
                "nccl: ncclCommInitRankConfig (rank {rank} of {world}): {}",
                nccl_reason(code)
            )));
        }
        if raw.is_null() {
            return Err(err(format!(
                "nccl: ncclCommInitRankConfig (rank {rank} of {world}) gave no communicator"
            )));
        }
        let comm = NcclComm {
            comm: raw,
            stream,
            rank,
            world,
            timeout,
            aborted: std::sync::Mutex::new(None),
        };
        comm.settle(&format!(
            "communicator init (the {world} ranks joining; the ranks that did not arrive stalled, died or run another job)"
        ))?;
        Ok(comm)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.world
    }
    /// The stream every operation is enqueued on.
    pub fn stream(&self) -> Arc<CudaStream> {
        self.stream.clone()
    }
    /// How long a call waits on the peers before it aborts the communicator.
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
    }

    fn err(&self, msg: String) -> Error {
        Error::Comm {
            rank: self.rank,
            world: self.world,
            msg: format!("nccl {msg}"),
        }
    }

    /// The communicator's async state: `NCCL_SUCCESS`, `NCCL_IN_PROGRESS` or an error code.
    fn async_state(&self) -> u32 {
        let mut state: u32 = NCCL_SUCCESS;
        // SAFETY: a live communicator (callers check `aborted` first); NCCL writes one result
        // code, read as a number.
        let code = unsafe {
            cudarc::nccl::sys::ncclCommGetAsyncError(
                self.comm,
                (&mut state as *mut u32).cast::<cudarc::nccl::sys::ncclResult_t>(),
            )
        } as u32;
        if code != NCCL_SUCCESS {
            code
        } else {
            state
        }
    }

    /// Aborts the communicator (once) and returns the error `why` (also kept: later calls are
    /// refused with it).
    fn abort_with(&self, why: String) -> Error {
        let mut a = self.aborted.lock().unwrap_or_else(|p| p.into_inner());
        if a.is_none() {
            // SAFETY: live and not yet aborted (checked under the lock).
            unsafe {
                let _ = cudarc::nccl::sys::ncclCommAbort(self.comm);
            }
            *a = Some(why.clone());
        }
        self.err(why)
    }

    /// Refuses calls on an aborted communicator, with the reason it was aborted.
    fn live(&self, what: &str) -> Result<()> {
        let a = self.aborted.lock().unwrap_or_else(|p| p.into_inner());
        match &*a {
            None => Ok(()),
            Some(why) => Err(self.err(format!("{what}: the communicator was aborted: {why}"))),
        }
    }

    /// Waits until the communicator has no call in progress: an error code, or the timeout,
    /// aborts it with an error naming `what`.
    fn settle(&self, what: &str) -> Result<()> {
        let start = std::time::Instant::now();
        let mut nap = std::time::Duration::from_micros(20);
        loop {
            match self.async_state() {
                NCCL_SUCCESS => return Ok(()),
                NCCL_IN_PROGRESS => {}
                code => {
                    return Err(self.abort_with(format!("{what}: {}", nccl_reason(code))));
                }
            }
            if start.elapsed() > self.timeout {
                return Err(self.abort_with(format!(
                    "{what}: not complete after {:.1} s (the timeout): aborted",
                    self.timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(std::time::Duration::from_millis(5));
        }
    }

    /// The result of an NCCL call `what` returned `code`: in progress is settled, an error
    /// named (the communicator stays usable after an argument error NCCL refused at once).
    fn call(&self, what: &str, code: cudarc::nccl::sys::ncclResult_t) -> Result<()> {
        match code as u32 {
            NCCL_SUCCESS => Ok(()),
            NCCL_IN_PROGRESS => self.settle(what),
            c => Err(self.err(format!("{what}: {}", nccl_reason(c)))),
        }
    }

    /// Waits for everything enqueued on the stream (this communicator's collectives and the
    /// kernels around them), at most the timeout: a peer that stalls or dies leaves NCCL's
    /// kernels waiting, and this aborts the communicator (ending them) with an error instead of
    /// hanging; an async error NCCL detects (a remote error) aborts at once.
    pub fn wait(&self, what: &str) -> Result<()> {
        self.live(what)?;
        use cudarc::driver::sys::{cuStreamQuery, CUresult};
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| self.err(format!("{what}: binding the GPU to this thread: {e:?}")))?;
        let start = std::time::Instant::now();
        let mut nap = std::time::Duration::from_micros(20);
        loop {
            // SAFETY: the stream is alive (we hold it) and its context is current.
            match unsafe { cuStreamQuery(self.stream.cu_stream()) } {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY => {}
                e => {
                    return Err(self.abort_with(format!("{what}: the stream failed: {e:?}")));
                }
            }
            match self.async_state() {
                NCCL_SUCCESS | NCCL_IN_PROGRESS => {}
                code => {
                    return Err(self.abort_with(format!(
                        "{what}: {} (a peer rank failed or left)",
                        nccl_reason(code)
                    )));
                }
            }
            if start.elapsed() > self.timeout {
                return Err(self.abort_with(format!(
                    "{what}: the GPU's work did not complete within {:.1} s (the timeout): a peer rank stalled or died; the communicator was aborted",
                    self.timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(std::time::Duration::from_millis(2));
        }
    }

    fn peer(&self, peer: usize, what: &str) -> Result<i32> {
        if peer >= self.world || peer == self.rank {
            return Err(self.err(format!(
                "{what} rank {peer}: not a peer (ranks 0..{}, this is {})",
                self.world, self.rank
            )));
        }
        Ok(peer as i32)
    }

    fn raw_stream(&self) -> cudarc::nccl::sys::cudaStream_t {
        self.stream.cu_stream() as _
    }

    /// Enqueues a send of `x` to `to` (inside or outside a group).
    fn enqueue_send<T: NcclType + DeviceRepr>(
        &self,
        x: &CudaView<'_, T>,
        to: i32,
        what: &str,
    ) -> Result<()> {
        let (src, _rec) = x.device_ptr(&self.stream);
        // SAFETY: a device buffer of x.len() values kept alive by the borrow (the stream orders
        // its use; `_rec` records the access for cudarc's tracking).
        let code = unsafe {
            cudarc::nccl::sys::ncclSend(
                src as _,
                x.len(),
                T::as_nccl_type(),
                to,
                self.comm,
                self.raw_stream(),
            )
        };
        self.call(what, code)
    }

    /// Enqueues a receive into `out` from `from`.
    fn enqueue_recv<T: NcclType + DeviceRepr>(
        &self,
        out: &mut CudaViewMut<'_, T>,
        from: i32,
        what: &str,
    ) -> Result<()> {
        let n = out.len();
        let (dst, _rec) = out.device_ptr_mut(&self.stream);
        // SAFETY: as in `enqueue_send`, for a writable buffer of n values.
        let code = unsafe {
            cudarc::nccl::sys::ncclRecv(
                dst as _,
                n,
                T::as_nccl_type(),
                from,
                self.comm,
                self.raw_stream(),
            )
        };
        self.call(what, code)
    }

    /// Runs `body` between ncclGroupStart and ncclGroupEnd; the group is closed whatever
    /// happened inside it, and an "in progress" end settled.
    fn group(&self, what: &str, body: impl FnOnce() -> Result<()>) -> Result<()> {
        // SAFETY: group calls take no arguments.
        let code = unsafe { cudarc::nccl::sys::ncclGroupStart() };
        self.call(&format!("{what}: ncclGroupStart"), code)?;
        let res = body();
        // SAFETY: as above.
        let end = unsafe { cudarc::nccl::sys::ncclGroupEnd() };
        res?;
        self.call(&format!("{what}: ncclGroupEnd"), end)
    }

    /// Sends `x` to rank `to` (the receiver posts a receive of the same length).
    pub fn send<T: NcclType + DeviceRepr>(&self, x: &CudaSlice<T>, to: usize) -> Result<()> {
        let what = format!("send to rank {to} ({} values)", x.len());
        self.live(&what)?;
        let p = self.peer(to, "send to")?;
        self.enqueue_send(&x.as_view(), p, &what)
    }

    /// Receives `out.len()` values from rank `from`.
    pub fn recv<T: NcclType + DeviceRepr>(
        &self,
        out: &mut CudaSlice<T>,
        from: usize,
    ) -> Result<()> {
        let what = format!("receive from rank {from} ({} values)", out.len());
        self.live(&what)?;
        let p = self.peer(from, "receive from")?;
        self.enqueue_recv(&mut out.as_view_mut(), p, &what)
    }

    /// Sends `x` to rank `to` and receives `out` from rank `from` in one NCCL group (a ring's
    /// step: every rank sends and receives at once without waiting on the other's order).
    pub fn send_recv<T: NcclType + DeviceRepr>(
        &self,
        x: &CudaSlice<T>,
        to: usize,
        out: &mut CudaSlice<T>,
        from: usize,
    ) -> Result<()> {
        let what = format!("send_recv (to rank {to}, from rank {from})");
        self.live(&what)?;
        let (pt, pf) = (self.peer(to, "send to")?, self.peer(from, "receive from")?);
        self.group(&what, || {
            self.enqueue_send(&x.as_view(), pt, &what)?;
            self.enqueue_recv(&mut out.as_view_mut(), pf, &what)
        })
    }

    /// Every rank's `x` (all of one length n) in rank order into `out` (P n values).
    pub fn all_gather<T: NcclType + DeviceRepr>(
        &self,
        x: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.live("all_gather")?;
        if out.len() != self.world * x.len() {
            return Err(self.err(format!(
                "all_gather: output holds {} values, expected {} ranks x {}",
                out.len(),
                self.world,
                x.len()
            )));
        }
        let n = x.len();
        let (src, _rs) = x.device_ptr(&self.stream);
        let (dst, _rd) = out.device_ptr_mut(&self.stream);
        // SAFETY: n values in, P n out (checked above), both alive for the call.
        let code = unsafe {
            cudarc::nccl::sys::ncclAllGather(
                src as _,
                dst as _,
                n,
                T::as_nccl_type(),
                self.comm,
                self.raw_stream(),
            )
        };
        self.call("all_gather", code)
    }

    /// Chunk j of `send` (P equal chunks) to rank j, chunk i of `recv` from rank i: P grouped
    /// send / receive pairs (this rank's own chunk a device copy).
    pub fn all_to_all<T: NcclType + DeviceRepr>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.live("all_to_all")?;
        let p = self.world;
        if !send.len().is_multiple_of(p) || recv.len() != send.len() {
            return Err(self.err(format!(
                "all_to_all: {} values to send and {} to receive; both must be the same multiple of {p} ranks",
                send.len(),
                recv.len()
            )));
        }
        let n = send.len() / p;
        let r = self.rank;
        self.stream
            .memcpy_dtod(
                &send.slice(r * n..(r + 1) * n),
                &mut recv.slice_mut(r * n..(r + 1) * n),
            )
            .map_err(|e| self.err(format!("all_to_all: the own chunk's copy: {e:?}")))?;
        if p == 1 {
            return Ok(());
        }
        self.group("all_to_all", || {
            for j in (0..p).filter(|&j| j != r) {
                let what = format!("all_to_all: with rank {j}");
                self.enqueue_send(&send.slice(j * n..(j + 1) * n), j as i32, &what)?;
                self.enqueue_recv(&mut recv.slice_mut(j * n..(j + 1) * n), j as i32, &what)?;
            }
            Ok(())
        })
    }

    /// `out <- sum over ranks of x` (module header).
    pub fn all_reduce_sum<T: NcclType + DeviceRepr>(
        &self,
        x: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.live("all_reduce")?;
        if out.len() != x.len() {
            return Err(self.err(format!(
                "all_reduce: {} values in, {} out",
                x.len(),
                out.len()
            )));
        }
        let n = x.len();
        let (src, _rs) = x.device_ptr(&self.stream);
        let (dst, _rd) = out.device_ptr_mut(&self.stream);
        // SAFETY: n values in and out, both alive for the call.
        let code = unsafe {
            cudarc::nccl::sys::ncclAllReduce(
                src as _,
                dst as _,
                n,
                T::as_nccl_type(),
                cudarc::nccl::sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.raw_stream(),
            )
        };
        self.call("all_reduce", code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("longattn-nccl-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Without NCCL on the machine (CI, this one) every way in is a clear error naming the
    /// library, cudarc's names and the variable; never a panic. With NCCL it loads.
    #[test]
    fn a_missing_nccl_is_a_clear_error() {
        let empty = scratch("empty");
        match find(None, std::slice::from_ref(&empty)) {
            Ok(Found::ByName) => {
                assert!(loads_by_name());
                assert!(version().unwrap() > 0);
            }
            Ok(Found::File(f)) => panic!("nothing to find in an empty folder: {f:?}"),
            Err(e) => {
                let e = e.to_string();
                for part in [
                    "the NCCL library (libnccl) was not found",
                    "libnccl.so",
                    "not libnccl.so.2",
                    "LONGATTN_NCCL_LIB is not set",
                    empty.to_str().unwrap(),
                ] {
                    assert!(e.contains(part), "`{part}` in {e}");
                }
                assert!(!loads_by_name());
                // Every entry point refuses the same way, none panics.
                let e = NcclComm::unique_id().unwrap_err().to_string();
                assert!(e.contains("libnccl"), "{e}");
                let e = version().unwrap_err().to_string();
                assert!(e.contains("libnccl"), "{e}");
            }
        }
    }

    #[test]
    fn a_bad_library_file_is_named() {
        let d = scratch("bad");
        let e = find(Some(d.join("nope.so").as_os_str()), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("LONGATTN_NCCL_LIB=") && e.contains("nope.so: no such file"),
            "{e}"
        );
        let fake = d.join("libnccl.so.2");
        std::fs::write(&fake, b"not a shared object").unwrap();
        let e = find(Some(fake.as_os_str()), &[]).unwrap_err().to_string();
        assert!(e.contains("does not load as NCCL"), "{e}");
        if !loads_by_name() {
            // found in a searched folder, but it does not load: reported with the loader's reason
            let e = find(None, std::slice::from_ref(&d))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("found but not loadable") && e.contains(fake.to_str().unwrap()),
                "{e}"
            );
        }
    }

    #[test]
    fn the_link_folder_points_at_the_file() {
        let d = scratch("link");
        let f = d.join("libnccl.so.2");
        std::fs::write(&f, b"x").unwrap();
        let dir = link_dir(&f).unwrap();
        assert_eq!(
            std::fs::read_link(dir.join("libnccl.so")).unwrap(),
            f.canonicalize().unwrap()
        );
        assert_eq!(link_dir(&f).unwrap(), dir, "made once per file");
        let _ = std::fs::remove_dir_all(&dir);
        let e = link_dir(&d.join("absent")).unwrap_err().to_string();
        assert!(e.contains("absent"), "{e}");
    }
}
