//! The CUDA backend: the same API and the same block schedule as the CPU path, on NVIDIA GPUs.
//!
//! - [`CudaDevice`]: a context and stream on one GPU, loaded at run time (`cudarc` with dynamic
//!   loading: the crate builds and runs without CUDA; [`CudaDevice::open`] then returns a clear
//!   [`Error::Cuda`]).
//! - [`compile`]: NVRTC compilation of the `.cu` sources in `kernels/` for the device's
//!   architecture (`sm_90a` on Hopper), one variant per (dtype, head dim, tile config, mask
//!   program structure: the mask's constants are kernel arguments), cached in memory and on disk.
//! - [`forward`]: the tensor-core forward kernel driven by the block schedule; Partial tiles run
//!   the mask program generated from the expression ([`crate::mask::BoundMask::cuda_program`]).
//! - [`decode`]: paged KV-cache decode, split over key ranges and merged by LSE.
pub mod backward;
pub mod compile;
pub mod decode;
pub mod forward;
pub mod selftest;
pub(crate) mod wgmma;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys as cu, CudaContext, CudaFunction, CudaStream, DriverError};

use crate::error::{Error, Result};
pub use compile::CompileSource;
pub use cudarc::driver::CudaSlice;
pub use forward::{forward, forward_gathered, forward_with_map, gather_tiles, DevTensor, FwdPlan};

pub fn drv(op: &'static str) -> impl Fn(DriverError) -> Error {
    move |e: DriverError| {
        let msg = if e.0 == cu::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
            "out of device memory (CUDA_ERROR_OUT_OF_MEMORY)".to_string()
        } else {
            format!("{e:?}")
        };
        Error::Cuda { op, msg }
    }
}

/// One record of the module cache: how a kernel variant was obtained and how long it took.
#[derive(Clone, Debug)]
pub struct CompileRecord {
    pub variant: String,
    pub source: CompileSource,
    pub seconds: f64,
}

/// A GPU, its context and the stream every longattn call on it runs on.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    pub sms: usize,
    /// Largest dynamic shared memory a block may opt in to (bytes).
    pub smem_optin: usize,
    /// Size of the L2 cache (bytes).
    pub l2_bytes: usize,
    functions: Mutex<HashMap<String, CudaFunction>>,
    records: Mutex<Vec<CompileRecord>>,
}

impl CudaDevice {
    /// Opens GPU `ordinal`. Errors: no driver library, no device, driver too old.
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>> {
        // SAFETY: only tries to open the shared library.
        if !unsafe { cu::is_culib_present() } {
            return Err(Error::Cuda {
                op: "open",
                msg: "no CUDA driver: libcuda.so was not found (no NVIDIA GPU or driver on this machine)".into(),
            });
        }
        let n = CudaContext::device_count().map_err(drv("open"))?;
        if ordinal >= n.max(0) as usize {
            return Err(Error::Cuda {
                op: "open",
                msg: format!("no CUDA device {ordinal}: the driver reports {n} device(s)"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("open"))?;
        // One stream per device: the cross-stream event bookkeeping is not needed.
        // SAFETY: called before any allocation on this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        // Scratch (segment and chunk states of linear attention, GQA sums, split-KV partials) is
        // allocated stream-ordered on every call: the device's default pool keeps up to an
        // eighth of the device's memory (at least 1 GiB) of freed memory instead of handing it
        // back to the driver at every synchronisation (re-mapping it cost 0.2-0.4 ms per cut
        // linear forward on the H200, and ~9 ms for the 4 GiB of chunk states of a linear
        // backward at 4 x 32k tokens). `trim_pool` gives it back when an allocation fails.
        // Best effort: a driver without pools allocates as before.
        // SAFETY: plain driver calls on this context's device with a live out-pointer / value.
        unsafe {
            let mut pool: cu::CUmemoryPool = std::ptr::null_mut();
            if cu::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
                == cu::CUresult::CUDA_SUCCESS
            {
                let total = ctx.mem_get_info().map_or(0, |(_, t)| t as u64);
                let mut keep: u64 = (total / 8).max(1 << 30);
                let _ = cu::cuMemPoolSetAttribute(
                    pool,
                    cu::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut keep as *mut u64).cast(),
                );
            }
        }
        let attr = |a| ctx.attribute(a).map_err(drv("open"));
        let cc = (
            attr(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        if cc.0 < 8 {
            return Err(Error::Cuda {
                op: "open",
                msg: format!(
                    "device {ordinal} has compute capability {}.{}; longattn's kernels need 8.0 or newer (bf16 tensor cores)",
                    cc.0, cc.1
                ),
            });
        }
        let sms = attr(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let smem_optin =
            attr(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
                as usize;
        let l2_bytes = attr(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize;
        let name = ctx.name().map_err(drv("open"))?;
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            ordinal,
            name,
            cc,
            sms,
            smem_optin,
            l2_bytes,
            functions: Mutex::new(HashMap::new()),
            records: Mutex::new(Vec::new()),
        }))
    }

    /// NVRTC target: the architecture-specific `sm_90a` on Hopper (wgmma, setmaxnreg), plain
    /// `sm_XY` elsewhere.
    pub fn arch(&self) -> String {
        match self.cc {
            (9, 0) => "sm_90a".into(),
            (a, b) => format!("sm_{a}{b}"),
        }
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A caller's stream on this device (`CUstream` as an integer, e.g. PyTorch's
    /// `torch.cuda.current_stream().cuda_stream`); 0 is the device's own (legacy default) stream.
    ///
    /// # Safety
    /// `raw` must be a live stream of this device's primary context, kept alive by its owner
    /// while work queued through the wrapper runs; it is never destroyed here.
    pub unsafe fn borrow_stream(&self, raw: u64) -> Arc<CudaStream> {
        if raw == 0 {
            return self.stream.clone();
        }
        // SAFETY: forwarded to the caller.
        unsafe { self.ctx.wrap_borrowed_stream(raw as cu::CUstream) }
    }

    /// Hands the freed memory the default pool keeps (see `open`) back to the driver, after the
    /// work queued on this device's streams so far: what a caller does before retrying an
    /// allocation that failed. Best effort.
    pub(crate) fn trim_pool(&self) {
        let _ = self.stream.synchronize();
        // SAFETY: plain driver calls on this context's device with a live out-pointer.
        unsafe {
            let mut pool: cu::CUmemoryPool = std::ptr::null_mut();
            if cu::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device())
                == cu::CUresult::CUDA_SUCCESS
            {
                let _ = cu::cuMemPoolTrimTo(pool, 0);
            }
        }
    }

    /// Free and total device memory (bytes).
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(drv("mem_get_info"))
    }

    /// Kernel `entry` of `src` compiled with `defines`, from the in-memory cache, the disk cache
    /// or NVRTC; `smem` is the dynamic shared memory it will be launched with.
    pub(crate) fn function(
        &self,
        variant: &str,
        entry: &str,
        src: &str,
        defines: &[(String, String)],
        smem: usize,
    ) -> Result<CudaFunction> {
        // The source is part of the key: variants differ by their mask program too (its
        // structure only: mask constants are kernel arguments, mask/codegen.rs).
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            src.hash(&mut h);
            format!(
                "{variant}|{entry}|{}|{:016x}",
                defines_key(defines),
                h.finish()
            )
        };
        if let Some(f) = self.functions.lock().unwrap().get(&key) {
            return Ok(f.clone());
        }
        if smem > self.smem_optin {
            return Err(Error::Cuda {
                op: "launch",
                msg: format!(
                    "kernel `{variant}` needs {smem} bytes of shared memory; the device allows {}",
                    self.smem_optin
                ),
            });
        }
        let c = compile::compile(variant, src, &self.arch(), defines)?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(c.cubin))
            .map_err(drv("load module"))?;
        let f = module.load_function(entry).map_err(drv("load function"))?;
        f.set_attribute(
            cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(drv("set shared memory"))?;
        self.records.lock().unwrap().push(CompileRecord {
            variant: variant.to_string(),
            source: c.source,
            seconds: c.seconds,
        });
        self.functions.lock().unwrap().insert(key, f.clone());
        Ok(f)
    }

    /// [`Self::function`] for a source fixed at build time (`include_str!` pieces, so that the
    /// variant name and the defines determine it): the in-memory cache is keyed by those alone,
    /// and a warm call neither builds nor hashes the source (`src` runs on a miss only). Saves
    /// the per-call cost of formatting and hashing tens of KB of source per kernel.
    pub(crate) fn function_static(
        &self,
        variant: &str,
        entry: &str,
        src: impl FnOnce() -> String,
        defines: &[(String, String)],
        smem: usize,
    ) -> Result<CudaFunction> {
        let key = format!("static|{variant}|{entry}|{}|{smem}", defines_key(defines));
        if let Some(f) = self.functions.lock().unwrap().get(&key) {
            return Ok(f.clone());
        }
        let f = self.function(variant, entry, &src(), defines, smem)?;
        self.functions.lock().unwrap().insert(key, f.clone());
        Ok(f)
    }

    /// Every kernel variant this device has loaded, with where it came from.
    pub fn compile_records(&self) -> Vec<CompileRecord> {
        self.records.lock().unwrap().clone()
    }

    pub(crate) fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        x: &[T],
    ) -> Result<CudaSlice<T>> {
        if x.is_empty() {
            // A 1-element placeholder: kernels never read it, but the pointer must be valid.
            return self.alloc_zeros(1);
        }
        self.stream.clone_htod(x).map_err(drv("copy to device"))
    }

    /// Zero-filled device buffer of `n` elements (at least one).
    fn alloc_zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(drv("alloc"))
    }

    /// Zero-filled f32 device buffer (LSE outputs).
    pub fn alloc_f32(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.alloc_zeros(n)
    }

    /// Copies a device buffer to the host (synchronous).
    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        x: &CudaSlice<T>,
    ) -> Result<Vec<T>> {
        self.stream.clone_dtoh(x).map_err(drv("copy to host"))
    }

    /// Device time of the work `f` enqueues, in milliseconds (CUDA events around it).
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        let flags = Some(cu::CUevent_flags::CU_EVENT_DEFAULT);
        let e0 = self.stream.record_event(flags).map_err(drv("event"))?;
        f()?;
        let e1 = self.stream.record_event(flags).map_err(drv("event"))?;
        Ok(e0.elapsed_ms(&e1).map_err(drv("event"))? as f64)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv("synchronize"))
    }

    /// A zero-filled device buffer of `bytes` bytes (scratch, e.g. an L2 flush for [`Self::zero`]).
    pub fn scratch(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.alloc_zeros(bytes)
    }

    /// Enqueues the zeroing of `buf` (as `torch.Tensor.zero_` does to flush L2 in
    /// `triton.testing.do_bench`).
    pub fn zero(&self, buf: &mut CudaSlice<u8>) -> Result<()> {
        self.stream.memset_zeros(buf).map_err(drv("memset"))
    }

    /// Device times of `n` runs of the work `f` enqueues, each after a zeroing of `flush`
    /// (outside the timed span), enqueued back to back with no synchronization between them and
    /// read once all are done: `triton.testing.do_bench`'s timed loop, so that a benchmark of
    /// ours and of a peer timed by it put the same load on the device.
    pub fn time_runs(
        &self,
        n: usize,
        flush: &mut CudaSlice<u8>,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<Vec<f64>> {
        let flags = Some(cu::CUevent_flags::CU_EVENT_DEFAULT);
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            self.zero(flush)?;
            let e0 = self.stream.record_event(flags).map_err(drv("event"))?;
            f()?;
            let e1 = self.stream.record_event(flags).map_err(drv("event"))?;
            events.push((e0, e1));
        }
        self.synchronize()?;
        events
            .iter()
            .map(|(e0, e1)| Ok(e0.elapsed_ms(e1).map_err(drv("event"))? as f64))
            .collect()
    }
}

/// A caller's device allocation seen as a `CudaSlice<T>` for the length of a call: never freed
/// (dropping the wrapper forgets the pointer; the owner, e.g. PyTorch's allocator, keeps it).
pub struct Borrowed<T>(std::mem::ManuallyDrop<CudaSlice<T>>);

impl<T> Borrowed<T> {
    /// # Safety
    /// `ptr` must address `len` elements of `T` in a live allocation on `stream`'s device.
    pub unsafe fn new(stream: &Arc<CudaStream>, ptr: u64, len: usize) -> Self {
        // SAFETY: forwarded to the caller.
        Borrowed(std::mem::ManuallyDrop::new(unsafe {
            stream.upgrade_device_ptr::<T>(ptr, len.max(1))
        }))
    }
}

impl<T> std::ops::Deref for Borrowed<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Borrowed<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.0
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; `leak` releases the wrapper's stream handle, not the memory.
        unsafe { std::mem::ManuallyDrop::take(&mut self.0) }.leak();
    }
}

fn defines_key(d: &[(String, String)]) -> String {
    d.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Opens device 0 if this machine has a usable GPU; the reason otherwise (tests print it when
/// they skip).
pub fn try_default_device() -> std::result::Result<Arc<CudaDevice>, String> {
    CudaDevice::open(0).map_err(|e| e.to_string())
}
