//! Tensor views in the flash-attn layout `[batch, seq, heads, dim]`.
//!
//! A [`TensorView`] borrows typed memory (f32, bf16 or f16) with any element strides, so a caller can
//! pass slices of a larger buffer (packed QKV, a KV cache) without copying. A [`Tensor`] owns
//! contiguous memory and is what the kernels return.
use crate::error::{Error, Result};
use half::{bf16, f16};

/// Element types accepted by the kernels. Arithmetic is always f32 (or f64 in the oracle).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    /// Unit roundoff of the storage format (2^-p), the base of every test tolerance.
    pub fn eps(self) -> f64 {
        match self {
            DType::F32 => f32::EPSILON as f64 / 2.0,
            DType::BF16 => 1.0 / 256.0,
            DType::F16 => 1.0 / 2048.0,
        }
    }
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Some(DType::F32),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "f16" | "fp16" | "float16" | "half" => Some(DType::F16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A storage element. One generic kernel serves every dtype through this trait.
pub trait Element: Copy + Send + Sync + 'static + bytemuck::Pod + Default {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    fn slice<'a>(s: &Slice<'a>) -> Option<&'a [Self]>;
    fn wrap(v: Vec<Self>) -> Buffer;
    /// `dst[i] = from_f32(src[i] * scale)` for a whole row (the kernels' epilogue); the default is
    /// the element loop, types override it with a form the compiler vectorizes.
    #[inline]
    fn from_f32_scaled(src: &[f32], scale: f32, dst: &mut [Self]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(x * scale);
        }
    }
}

/// f32 -> bf16 bits with round-to-nearest-even, NaN kept quiet; branch-free so that a loop of it
/// vectorizes (the same results as `half::bf16::from_f32`).
#[inline(always)]
fn bf16_bits_rne(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    fn slice<'a>(s: &Slice<'a>) -> Option<&'a [f32]> {
        match *s {
            Slice::F32(x) => Some(x),
            _ => None,
        }
    }
    fn wrap(v: Vec<Self>) -> Buffer {
        Buffer::F32(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn slice<'a>(s: &Slice<'a>) -> Option<&'a [bf16]> {
        match *s {
            Slice::BF16(x) => Some(x),
            _ => None,
        }
    }
    fn wrap(v: Vec<Self>) -> Buffer {
        Buffer::BF16(v)
    }
    #[inline]
    fn from_f32_scaled(src: &[f32], scale: f32, dst: &mut [Self]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(bf16_bits_rne(x * scale));
        }
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn slice<'a>(s: &Slice<'a>) -> Option<&'a [f16]> {
        match *s {
            Slice::F16(x) => Some(x),
            _ => None,
        }
    }
    fn wrap(v: Vec<Self>) -> Buffer {
        Buffer::F16(v)
    }
}

/// Borrowed typed memory.
#[derive(Clone, Copy, Debug)]
pub enum Slice<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl Slice<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            Slice::F32(_) => DType::F32,
            Slice::BF16(_) => DType::BF16,
            Slice::F16(_) => DType::F16,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Slice::F32(x) => x.len(),
            Slice::BF16(x) => x.len(),
            Slice::F16(x) => x.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Element `i` widened to f32.
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            Slice::F32(x) => x[i],
            Slice::BF16(x) => x[i].to_f32(),
            Slice::F16(x) => x[i].to_f32(),
        }
    }
}

impl<'a> From<&'a [f32]> for Slice<'a> {
    fn from(x: &'a [f32]) -> Self {
        Slice::F32(x)
    }
}
impl<'a> From<&'a [bf16]> for Slice<'a> {
    fn from(x: &'a [bf16]) -> Self {
        Slice::BF16(x)
    }
}
impl<'a> From<&'a [f16]> for Slice<'a> {
    fn from(x: &'a [f16]) -> Self {
        Slice::F16(x)
    }
}

/// Owned typed memory.
#[derive(Clone, Debug, PartialEq)]
pub enum Buffer {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Buffer {
    pub fn as_slice(&self) -> Slice<'_> {
        match self {
            Buffer::F32(x) => Slice::F32(x),
            Buffer::BF16(x) => Slice::BF16(x),
            Buffer::F16(x) => Slice::F16(x),
        }
    }
    pub fn zeros(dtype: DType, n: usize) -> Buffer {
        match dtype {
            DType::F32 => Buffer::F32(vec![0.0; n]),
            DType::BF16 => Buffer::BF16(vec![bf16::ZERO; n]),
            DType::F16 => Buffer::F16(vec![f16::ZERO; n]),
        }
    }
    /// Rounds f32 values into the given dtype.
    pub fn from_f32(dtype: DType, x: &[f32]) -> Buffer {
        match dtype {
            DType::F32 => Buffer::F32(x.to_vec()),
            DType::BF16 => Buffer::BF16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
            DType::F16 => Buffer::F16(x.iter().map(|&v| f16::from_f32(v)).collect()),
        }
    }
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let s = self.as_slice();
        (0..s.len()).map(|i| s.get_f32(i)).collect()
    }
    /// Raw little-endian bytes (for safetensors).
    pub fn bytes(&self) -> &[u8] {
        match self {
            Buffer::F32(x) => bytemuck::cast_slice(x),
            Buffer::BF16(x) => bytemuck::cast_slice(x),
            Buffer::F16(x) => bytemuck::cast_slice(x),
        }
    }
}

/// A contiguous owned tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub data: Buffer,
    pub shape: Vec<usize>,
}

impl Tensor {
    pub fn new(data: Buffer, shape: Vec<usize>) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.as_slice().len() {
            return Err(Error::Shape {
                op: "Tensor::new",
                tensor: "data".into(),
                got: vec![data.as_slice().len()],
                expected: format!("{n} elements for shape {shape:?}"),
            });
        }
        Ok(Tensor { data, shape })
    }
    pub fn dtype(&self) -> DType {
        self.data.as_slice().dtype()
    }
    /// A 4-D view of this tensor (`[batch, seq, heads, dim]`).
    pub fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let shape: [usize; 4] = self.shape.as_slice().try_into().map_err(|_| Error::Shape {
            op: "Tensor::view",
            tensor: name.into(),
            got: self.shape.clone(),
            expected: "rank 4 [batch, seq, heads, dim]".into(),
        })?;
        TensorView::contiguous(self.data.as_slice(), shape)
    }
}

/// A borrowed 4-D view `[batch, seq, heads, dim]` with element strides.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub data: Slice<'a>,
    pub shape: [usize; 4],
    pub strides: [usize; 4],
}

impl<'a> TensorView<'a> {
    /// A view over row-major contiguous memory.
    pub fn contiguous(data: impl Into<Slice<'a>>, shape: [usize; 4]) -> Result<Self> {
        let strides = [
            shape[1] * shape[2] * shape[3],
            shape[2] * shape[3],
            shape[3],
            1,
        ];
        Self::strided(data, shape, strides)
    }

    /// A view with explicit element strides. Every addressed element must lie inside `data`.
    pub fn strided(
        data: impl Into<Slice<'a>>,
        shape: [usize; 4],
        strides: [usize; 4],
    ) -> Result<Self> {
        let data = data.into();
        if shape.contains(&0) {
            return Err(Error::Shape {
                op: "TensorView",
                tensor: "view".into(),
                got: shape.to_vec(),
                expected: "every dimension >= 1".into(),
            });
        }
        let last: usize = (0..4).map(|a| (shape[a] - 1) * strides[a]).sum();
        if last >= data.len() {
            return Err(Error::Shape {
                op: "TensorView",
                tensor: "view".into(),
                got: shape.to_vec(),
                expected: format!(
                    "strides {strides:?} to address at most {} elements (the buffer's length), but the last element is at {last}",
                    data.len()
                ),
            });
        }
        Ok(TensorView {
            data,
            shape,
            strides,
        })
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
    pub fn batch(&self) -> usize {
        self.shape[0]
    }
    pub fn seq(&self) -> usize {
        self.shape[1]
    }
    pub fn heads(&self) -> usize {
        self.shape[2]
    }
    pub fn dim(&self) -> usize {
        self.shape[3]
    }
    #[inline]
    pub fn offset(&self, b: usize, s: usize, h: usize, d: usize) -> usize {
        b * self.strides[0] + s * self.strides[1] + h * self.strides[2] + d * self.strides[3]
    }
    /// One element widened to f32 (slow path: tests, oracle, checks).
    #[inline]
    pub fn get(&self, b: usize, s: usize, h: usize, d: usize) -> f32 {
        self.data.get_f32(self.offset(b, s, h, d))
    }
    /// The typed slice, when the dtype matches `T`.
    pub fn typed<T: Element>(&self) -> Option<&'a [T]> {
        T::slice(&self.data)
    }
    /// First non-finite element, if any (NaN or +-Inf), as (flat index within the view, value).
    pub fn find_non_finite(&self) -> Option<(usize, f32)> {
        let [b, s, h, d] = self.shape;
        let mut flat = 0;
        for ib in 0..b {
            for is in 0..s {
                for ih in 0..h {
                    for id in 0..d {
                        let x = self.get(ib, is, ih, id);
                        if !x.is_finite() {
                            return Some((flat, x));
                        }
                        flat += 1;
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorizable bf16 rounding equals `half`'s on rounding ties, subnormals, infinities,
    /// NaN and a sweep of random bit patterns.
    #[test]
    fn bf16_rounding_matches_half() {
        let mut rng = crate::testing::Rng::new(7);
        let special = [
            0.0f32,
            -0.0,
            1.0,
            f32::from_bits(0x3F80_8000), // 1 + 2^-8: halfway between two bf16 values, ties to even
            f32::from_bits(0x3F81_8000), // 1 + 3 * 2^-8: halfway, ties to even (upwards)
            f32::MIN_POSITIVE,
            1e-40,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let randoms = (0..100_000).map(|_| f32::from_bits(rng.next_u64() as u32));
        for x in special.into_iter().chain(randoms) {
            let ours = bf16_bits_rne(x);
            let theirs = bf16::from_f32(x).to_bits();
            if x.is_nan() {
                assert!(bf16::from_bits(ours).is_nan(), "{x:e}");
            } else {
                assert_eq!(ours, theirs, "{x:e}");
            }
        }
    }
}
