//! Zeroed buffers aligned to a cache line (64 bytes).
//!
//! Every row the micro-kernels load or store (an AMX tile row of 64 bytes, a zmm register) starts
//! at a multiple of 64 bytes inside its buffer; with a 64-byte aligned base no access is split
//! over two cache lines. A `Vec` only guarantees the alignment of its element (and glibc's
//! large allocations sit 16 bytes past a page boundary), which made every AMX tile load and store
//! a split load: `qk` alone ran 2.5x slower (1140 -> 2790 cycles per 64 x 64 x 128 product on
//! this machine).
use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of every [`AlignedBuf`]: one cache line.
pub const ALIGN: usize = 64;

/// A fixed-length, zero-initialized, 64-byte aligned buffer of plain-old-data elements.
///
/// Allocated by `alloc_zeroed` at the allocator's natural alignment (16) with one extra line, the
/// start moved up to the next line: the system allocator zeroes an over-aligned request with a
/// memset, while a large naturally aligned one comes as fresh zero pages from `calloc` (the
/// packed K/V of a call is megabytes; the memset was ~2% of a 1k-token forward).
pub struct AlignedBuf<T: bytemuck::Pod> {
    ptr: NonNull<T>,
    len: usize,
    raw: *mut u8,
}

// SAFETY: the buffer owns its elements like a `Vec<T>` does.
unsafe impl<T: bytemuck::Pod + Send> Send for AlignedBuf<T> {}
unsafe impl<T: bytemuck::Pod + Sync> Sync for AlignedBuf<T> {}

impl<T: bytemuck::Pod> AlignedBuf<T> {
    fn layout(len: usize) -> Layout {
        let bytes = len * std::mem::size_of::<T>() + ALIGN;
        Layout::from_size_align(bytes, std::mem::align_of::<T>().max(16))
            .expect("buffer size overflows")
    }

    /// `len` elements, all bits zero (0.0 for floats, 0 for integers and bf16 bits).
    pub fn zeroed(len: usize) -> Self {
        assert!(std::mem::align_of::<T>() <= ALIGN);
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size; all-zero bits are a valid `T` (Pod).
        let raw = unsafe { alloc_zeroed(layout) };
        if raw.is_null() {
            handle_alloc_error(layout);
        }
        // The first line boundary at or after `raw`; `len` elements fit before raw + size.
        let start = raw.wrapping_add(raw.align_offset(ALIGN)) as *mut T;
        let ptr = NonNull::new(start).expect("non-null");
        AlignedBuf { ptr, len, raw }
    }
}

impl<T: bytemuck::Pod> Drop for AlignedBuf<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with the same layout.
        unsafe { dealloc(self.raw, Self::layout(self.len)) }
    }
}

/// Buffers kept between calls for a role (the packed K^T, the packed V): the allocator hands a
/// freed multi-megabyte block back through `calloc`, which zeroes it with a memset on every
/// call (~5% of a 1k-token causal forward). The packers write every element the kernels read,
/// so a kept buffer needs no zeroing. One buffer is kept per role (the largest seen, up to
/// [`Reuse::MAX_BYTES`]).
pub struct Reuse(Mutex<Option<AlignedBuf<u8>>>);

impl Reuse {
    /// Larger buffers are freed after the call instead of kept.
    pub const MAX_BYTES: usize = 64 << 20;

    pub const fn new() -> Reuse {
        Reuse(Mutex::new(None))
    }

    /// A buffer of at least `bytes` bytes: the kept one when it is large enough (its contents
    /// are whatever the last call left), else a new zeroed one.
    pub fn take(&self, bytes: usize) -> AlignedBuf<u8> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match kept.take() {
            Some(b) if b.len() >= bytes => b,
            other => {
                *kept = other;
                AlignedBuf::zeroed(bytes)
            }
        }
    }

    /// Gives a buffer back for the next call (kept if it is the largest so far and not too big).
    pub fn give(&self, buf: AlignedBuf<u8>) {
        if buf.len() > Self::MAX_BYTES {
            return;
        }
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.as_ref().is_none_or(|k| k.len() < buf.len()) {
            *kept = Some(buf);
        }
    }
}

impl Default for Reuse {
    fn default() -> Self {
        Reuse::new()
    }
}

/// A `Vec` of `len` zero elements from `alloc_zeroed` (`calloc`: fresh zero pages for a large
/// output instead of a memset as `vec![T::default(); len]` does for bf16 and f16).
pub fn zeroed_vec<T: bytemuck::Pod>(len: usize) -> Vec<T> {
    if len == 0 || std::mem::size_of::<T>() == 0 {
        return Vec::new();
    }
    let layout = Layout::array::<T>(len).expect("vector size overflows");
    // SAFETY: non-zero size; the pointer is allocated by the global allocator with exactly the
    // layout `Vec<T>` uses for capacity `len`, and all-zero bits are valid `T`s (Pod).
    unsafe {
        let p = alloc_zeroed(layout) as *mut T;
        if p.is_null() {
            handle_alloc_error(layout);
        }
        Vec::from_raw_parts(p, len, len)
    }
}

impl<T: bytemuck::Pod> Deref for AlignedBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` initialized elements owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: bytemuck::Pod> DerefMut for AlignedBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0usize, 1, 3, 17, 4096, 100_003] {
            let mut b = AlignedBuf::<u16>::zeroed(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            b.iter_mut().for_each(|x| *x = 7);
            let f = AlignedBuf::<f32>::zeroed(len);
            assert_eq!(f.as_ptr() as usize % ALIGN, 0);
            assert!(f.iter().all(|&x| x == 0.0));
            let v = zeroed_vec::<half::bf16>(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|x| x.to_bits() == 0));
            // A kept buffer comes back when large enough, a new one otherwise.
            let r = Reuse::new();
            let mut k = r.take(len + 1);
            k[0] = 9;
            r.give(k);
            assert_eq!(r.take(len)[0], 9);
            assert!(r.take(2 * len + 2).iter().all(|&x| x == 0));
        }
    }
}
