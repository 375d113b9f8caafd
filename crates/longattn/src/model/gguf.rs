//! GGUF reader: header, metadata (every value type, arrays included), tensor table, data section,
//! and dequantization of the tensors to f32.
//!
//! File layout (GGUF v2/v3, little endian):
//! ```text
//! "GGUF" u32 version | u64 tensor_count | u64 kv_count
//! kv_count x (string key, u32 value_type, value)           string = u64 len + UTF-8 bytes
//! tensor_count x (string name, u32 n_dims, n_dims x u64 dim, u32 ggml_type, u64 offset)
//! padding to `general.alignment` (default 32), then the data section;
//! a tensor's bytes start at data_start + offset (offset a multiple of the alignment).
//! ```
//! Dimensions are in GGML order: `dims[0]` is the contiguous one, so a 2-D tensor is a row-major
//! `[dims[1]][dims[0]]` matrix, and the quantization blocks run along `dims[0]`.
//!
//! Everything read from the file is bounds-checked: a truncated file, an offset past the end, or a
//! count too large for the bytes that remain is an [`Error::File`] naming the problem, never a panic
//! or a huge allocation (see the fuzz target `fuzz/fuzz_targets/gguf_read.rs`).
use crate::error::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// GGML's limit on the number of dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays deeper than this are rejected (no real file nests arrays at all).
const MAX_ARRAY_DEPTH: u32 = 4;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The GGUF name of the value's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }

    /// The value as an integer, when it is one of the integer types (or a bool).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v as i128,
            MetaValue::I8(v) => v as i128,
            MetaValue::U16(v) => v as i128,
            MetaValue::I16(v) => v as i128,
            MetaValue::U32(v) => v as i128,
            MetaValue::I32(v) => v as i128,
            MetaValue::U64(v) => v as i128,
            MetaValue::I64(v) => v as i128,
            MetaValue::Bool(v) => v as i128,
            _ => return None,
        })
    }

    /// The value as a float, when it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }
}

/// The GGML tensor types. Those with a dequantizer are listed in [`GgmlType::block`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    BF16,
    /// A type this reader knows by number but cannot dequantize (IQ*, TQ*, integer types, ...).
    Other(u32),
}

/// Names of the GGML type ids, for error messages (index = id; empty = unassigned).
const TYPE_NAMES: [&str; 42] = [
    "F32",
    "F16",
    "Q4_0",
    "Q4_1",
    "Q4_2",
    "Q4_3",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q8_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "Q8_K",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ3_XXS",
    "IQ1_S",
    "IQ4_NL",
    "IQ3_S",
    "IQ2_S",
    "IQ4_XS",
    "I8",
    "I16",
    "I32",
    "I64",
    "F64",
    "IQ1_M",
    "BF16",
    "Q4_0_4_4",
    "Q4_0_4_8",
    "Q4_0_8_8",
    "TQ1_0",
    "TQ2_0",
    "IQ4_NL_4_4",
    "IQ4_NL_4_8",
    "IQ4_NL_8_8",
    "MXFP4",
    "",
    "",
];

impl GgmlType {
    pub fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// The GGML name ("Q4_K", "F16", ...), or "type N" for an unknown id.
    pub fn name(self) -> String {
        let id = self.id() as usize;
        match TYPE_NAMES.get(id) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => format!("type {id}"),
        }
    }

    /// `(elements per block, bytes per block)` for the types this reader dequantizes; `None` for
    /// the others.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q8_1 => (32, 36),
            GgmlType::Q2K => (QK_K, 84),
            GgmlType::Q3K => (QK_K, 110),
            GgmlType::Q4K => (QK_K, 144),
            GgmlType::Q5K => (QK_K, 176),
            GgmlType::Q6K => (QK_K, 210),
            GgmlType::Q8K => (QK_K, 292),
            GgmlType::Other(_) => return None,
        })
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the contiguous dimension.
    pub dims: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Offset of the first byte relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements (the product of `dims`; checked against overflow when the file is read).
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// Length of a row (`dims[0]`) and number of rows (the product of the other dims).
    pub fn rows(&self) -> (usize, usize) {
        let row = self.dims.first().copied().unwrap_or(1);
        let n = self.dims.iter().skip(1).product();
        (row, n)
    }

    /// Bytes of one row, for a type with a dequantizer (validated when the file is read).
    fn row_bytes(&self) -> Option<usize> {
        let (be, bb) = self.ggml_type.block()?;
        Some(self.rows().0 / be * bb)
    }
}

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata and tensor table, with the tensor bytes memory-mapped (or owned).
pub struct Gguf {
    origin: String,
    version: u32,
    storage: Storage,
    meta: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_start: usize,
    architecture: String,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("origin", &self.origin)
            .field("version", &self.version)
            .field("architecture", &self.architecture)
            .field("metadata", &self.meta.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn file_err(origin: &str, msg: impl Into<String>) -> Error {
    Error::File {
        path: origin.to_string(),
        msg: msg.into(),
    }
}

/// A bounds-checked little-endian cursor over the header.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    origin: &'a str,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(file_err(
                self.origin,
                format!(
                    "truncated GGUF: {what} needs {n} bytes at offset {}, but the file has {} bytes",
                    self.pos,
                    self.b.len()
                ),
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(file_err(
                self.origin,
                format!(
                    "truncated GGUF: {what}: string length {len} at offset {} exceeds the {} bytes \
                     left in the file",
                    self.pos - 8,
                    self.remaining()
                ),
            ));
        }
        let s = self.take(len as usize, what)?;
        // Vocabularies hold arbitrary bytes in principle; keep them, replacing invalid UTF-8.
        Ok(String::from_utf8_lossy(s).into_owned())
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.arr::<1>(key)?[0]),
            1 => MetaValue::I8(self.arr::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => {
                let b = self.arr::<1>(key)?[0];
                if b > 1 {
                    return Err(file_err(
                        self.origin,
                        format!("metadata `{key}`: bool byte {b} is neither 0 nor 1"),
                    ));
                }
                MetaValue::Bool(b == 1)
            }
            8 => MetaValue::Str(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(file_err(
                        self.origin,
                        format!("metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    ));
                }
                let et = self.u32(key)?;
                let n = self.u64(key)?;
                // Every element takes at least one byte (a string 8, an array 12): a count larger
                // than the bytes left is malformed, and checking it first bounds the allocation.
                let min_size: u64 = match et {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(file_err(
                            self.origin,
                            format!("metadata `{key}`: unknown array element type {other}"),
                        ))
                    }
                };
                if n.saturating_mul(min_size) > self.remaining() as u64 {
                    return Err(file_err(
                        self.origin,
                        format!(
                            "metadata `{key}`: array of {n} elements does not fit in the {} bytes left",
                            self.remaining()
                        ),
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, key, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.arr(key)?)),
            other => {
                return Err(file_err(
                    self.origin,
                    format!("metadata `{key}`: unknown value type {other}"),
                ))
            }
        })
    }
}

impl Gguf {
    /// Opens and parses a GGUF file, memory-mapping it.
    pub fn open(path: &Path) -> Result<Gguf> {
        let origin = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                format!("; {}", super::fixtures::HOW_TO_FETCH)
            } else {
                String::new()
            };
            file_err(&origin, format!("cannot open GGUF file: {e}{hint}"))
        })?;
        // SAFETY: the map is read-only and private to this process; the file is not modified while
        // mapped (fixtures are written once by the fetch step). A file truncated underneath the map
        // would fault, as for any mmap reader; every offset is checked against the length at open.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| file_err(&origin, format!("cannot memory-map GGUF file: {e}")))?;
        Gguf::parse(Storage::Mmap(map), origin)
    }

    /// Parses a GGUF file held in memory (copies the bytes). `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Gguf> {
        Gguf::parse(Storage::Owned(bytes.to_vec()), origin.to_string())
    }

    fn parse(storage: Storage, origin: String) -> Result<Gguf> {
        let b = storage.bytes();
        let mut c = Cursor {
            b,
            pos: 0,
            origin: &origin,
        };
        if b.len() < 4 {
            return Err(file_err(
                &origin,
                format!("not a GGUF file: {} bytes, shorter than the magic", b.len()),
            ));
        }
        let magic = c.take(4, "magic")?;
        if magic != MAGIC {
            return Err(file_err(
                &origin,
                format!("not a GGUF file: magic is {magic:02x?}, expected \"GGUF\""),
            ));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(file_err(
                &origin,
                format!("unsupported GGUF version {version} (supported: 2 and 3)"),
            ));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // A key-value pair takes at least 12 bytes, a tensor entry at least 24.
        if n_kv.saturating_mul(12) > c.remaining() as u64 {
            return Err(file_err(
                &origin,
                format!(
                    "metadata count {n_kv} cannot fit in the {} bytes of the file",
                    b.len()
                ),
            ));
        }
        let mut meta = Vec::with_capacity(n_kv as usize);
        let mut meta_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key {i}"))?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), meta.len()).is_some() {
                return Err(file_err(&origin, format!("duplicate metadata key `{key}`")));
            }
            meta.push((key, v));
        }
        if n_tensors.saturating_mul(24) > c.remaining() as u64 {
            return Err(file_err(
                &origin,
                format!(
                    "tensor count {n_tensors} cannot fit in the {} bytes of the file",
                    b.len()
                ),
            ));
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name {i}"))?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(file_err(
                    &origin,
                    format!("tensor `{name}`: {n_dims} dimensions (expected 1 to {MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            let mut count: usize = 1;
            for _ in 0..n_dims {
                let d = c.u64(&name)?;
                let d = usize::try_from(d).ok().filter(|_| d > 0).ok_or_else(|| {
                    file_err(&origin, format!("tensor `{name}`: invalid dimension {d}"))
                })?;
                count = count.checked_mul(d).ok_or_else(|| {
                    file_err(&origin, format!("tensor `{name}`: element count overflows"))
                })?;
                dims.push(d);
            }
            let ggml_type = GgmlType::from_id(c.u32(&name)?);
            let offset = c.u64(&name)?;
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(file_err(&origin, format!("duplicate tensor name `{name}`")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &meta[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(MetaValue::U32(a)) if *a > 0 && a.is_power_of_two() => *a as u64,
            Some(v) => {
                return Err(file_err(
                    &origin,
                    format!("general.alignment must be a power-of-two u32, got {v:?}"),
                ))
            }
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        if data_start > b.len() as u64 && !tensors.is_empty() {
            return Err(file_err(
                &origin,
                format!(
                    "truncated GGUF: data section would start at {data_start}, past the end ({} bytes)",
                    b.len()
                ),
            ));
        }
        let data_start = data_start.min(b.len() as u64) as usize;
        let data_len = (b.len() - data_start) as u64;

        // Check every tensor's extent now, so that later reads cannot go out of bounds.
        for t in &tensors {
            if !t.offset.is_multiple_of(alignment) {
                return Err(file_err(
                    &origin,
                    format!(
                        "tensor `{}`: offset {} is not a multiple of the alignment {alignment}",
                        t.name, t.offset
                    ),
                ));
            }
            let Some((be, bb)) = t.ggml_type.block() else {
                // Unknown types are reported when dequantized; their extent cannot be checked.
                continue;
            };
            if !t.dims[0].is_multiple_of(be) {
                return Err(file_err(
                    &origin,
                    format!(
                        "tensor `{}` ({}): row length {} is not a multiple of the block size {be}",
                        t.name, t.ggml_type, t.dims[0]
                    ),
                ));
            }
            let nbytes = ((t.n_elements() / be) as u64).checked_mul(bb as u64);
            let end = nbytes.and_then(|n| t.offset.checked_add(n));
            if end.is_none_or(|e| e > data_len) {
                return Err(file_err(
                    &origin,
                    format!(
                        "truncated GGUF: tensor `{}` ({} {:?}) needs bytes {}..{} of the data \
                         section, which has {data_len}",
                        t.name,
                        t.ggml_type,
                        t.dims,
                        t.offset,
                        t.offset as u128 + (t.n_elements() / be) as u128 * bb as u128
                    ),
                ));
            }
        }

        let architecture = match meta_index.get("general.architecture").map(|&i| &meta[i].1) {
            Some(MetaValue::Str(s)) => s.clone(),
            Some(v) => {
                return Err(file_err(
                    &origin,
                    format!(
                        "general.architecture must be a string, got {}",
                        v.type_name()
                    ),
                ))
            }
            None => String::new(),
        };

        Ok(Gguf {
            origin,
            version,
            storage,
            meta,
            meta_index,
            tensors,
            tensor_index,
            alignment,
            data_start,
            architecture,
        })
    }

    /// The path (or origin) the file was read from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Byte offset of the data section in the file.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// `general.architecture` ("llama", "gemma3", ...); empty when the file does not say.
    pub fn architecture(&self) -> &str {
        &self.architecture
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.meta
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.meta[i].1)
    }

    fn meta_req(&self, key: &str) -> Result<&MetaValue> {
        self.meta(key).ok_or_else(|| {
            file_err(
                &self.origin,
                format!(
                    "metadata key `{key}` is missing (architecture `{}`)",
                    self.architecture
                ),
            )
        })
    }

    fn wrong_type(&self, key: &str, expected: &str, v: &MetaValue) -> Error {
        file_err(
            &self.origin,
            format!(
                "metadata `{key}` is {} but {expected} was expected",
                v.type_name()
            ),
        )
    }

    /// A non-negative integer of any width that fits in u32.
    pub fn meta_u32(&self, key: &str) -> Result<u32> {
        let v = self.meta_req(key)?;
        match v.as_i128() {
            Some(x) if (0..=u32::MAX as i128).contains(&x) && !matches!(v, MetaValue::Bool(_)) => {
                Ok(x as u32)
            }
            _ => Err(self.wrong_type(key, "an integer in u32 range", v)),
        }
    }

    /// An integer of any width that fits in u64.
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        let v = self.meta_req(key)?;
        match v.as_i128() {
            Some(x) if (0..=u64::MAX as i128).contains(&x) && !matches!(v, MetaValue::Bool(_)) => {
                Ok(x as u64)
            }
            _ => Err(self.wrong_type(key, "an integer in u64 range", v)),
        }
    }

    /// A float (f32 or f64; integers are accepted too).
    pub fn meta_f32(&self, key: &str) -> Result<f32> {
        let v = self.meta_req(key)?;
        match v {
            MetaValue::Bool(_) => Err(self.wrong_type(key, "a number", v)),
            _ => v
                .as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    pub fn meta_bool(&self, key: &str) -> Result<bool> {
        match self.meta_req(key)? {
            MetaValue::Bool(b) => Ok(*b),
            v => Err(self.wrong_type(key, "bool", v)),
        }
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        match self.meta_req(key)? {
            MetaValue::Str(s) => Ok(s),
            v => Err(self.wrong_type(key, "string", v)),
        }
    }

    fn meta_array(&self, key: &str) -> Result<&[MetaValue]> {
        match self.meta_req(key)? {
            MetaValue::Array(a) => Ok(a),
            v => Err(self.wrong_type(key, "array", v)),
        }
    }

    pub fn meta_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.meta_array(key)?
            .iter()
            .map(|v| match v {
                MetaValue::Str(s) => Ok(s.as_str()),
                v => Err(self.wrong_type(key, "array of strings", v)),
            })
            .collect()
    }

    /// An array of integers (any width) that fit in i32.
    pub fn meta_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.meta_array(key)?
            .iter()
            .map(|v| match v.as_i128() {
                Some(x) if i32::try_from(x).is_ok() && !matches!(v, MetaValue::Bool(_)) => {
                    Ok(x as i32)
                }
                _ => Err(self.wrong_type(key, "array of i32", v)),
            })
            .collect()
    }

    pub fn meta_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.meta_array(key)?
            .iter()
            .map(|v| match v {
                MetaValue::F32(x) => Ok(*x),
                MetaValue::F64(x) => Ok(*x as f32),
                v => Err(self.wrong_type(key, "array of f32", v)),
            })
            .collect()
    }

    /// Convenience: `<architecture>.<suffix>` as u32 (e.g. `arch_u32("block_count")`).
    pub fn arch_u32(&self, suffix: &str) -> Result<u32> {
        self.meta_u32(&format!("{}.{suffix}", self.architecture))
    }

    /// Convenience: `<architecture>.<suffix>` as f32.
    pub fn arch_f32(&self, suffix: &str) -> Result<f32> {
        self.meta_f32(&format!("{}.{suffix}", self.architecture))
    }

    /// All tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn tensor_req(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| {
            file_err(
                &self.origin,
                format!(
                    "tensor `{name}` not found (architecture `{}`, {} tensors)",
                    self.architecture,
                    self.tensors.len()
                ),
            )
        })
    }

    fn unsupported(&self, t: &TensorInfo) -> Error {
        file_err(
            &self.origin,
            format!(
                "tensor `{}` has quantization type {} (id {}), which this reader cannot \
                 dequantize (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, \
                 Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)",
                t.name,
                t.ggml_type,
                t.ggml_type.id()
            ),
        )
    }

    /// The raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensor_req(name)?;
        let (be, bb) = t.ggml_type.block().ok_or_else(|| self.unsupported(t))?;
        let start = self.data_start + t.offset as usize;
        let n = t.n_elements() / be * bb;
        Ok(&self.storage.bytes()[start..start + n])
    }

    /// The whole tensor as f32, `dims[0]` fastest (a `[dims[1]][dims[0]]` matrix for 2-D).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor_req(name)?;
        let (_, n_rows) = t.rows();
        self.dequantize_rows(name, 0, n_rows)
    }

    /// Rows `start..start + count` (a row = `dims[0]` elements) as f32: e.g. a few embedding rows
    /// without dequantizing the whole table.
    pub fn dequantize_rows(&self, name: &str, start: usize, count: usize) -> Result<Vec<f32>> {
        let t = self.tensor_req(name)?;
        let row_bytes = t.row_bytes().ok_or_else(|| self.unsupported(t))?;
        let (row_len, n_rows) = t.rows();
        if start.checked_add(count).is_none_or(|e| e > n_rows) {
            return Err(Error::Param {
                op: "gguf dequantize",
                msg: format!(
                    "rows {start}..{} of tensor `{}` requested, it has {n_rows} rows",
                    start as u128 + count as u128,
                    t.name
                ),
            });
        }
        let all = self.tensor_bytes(name)?;
        let src = &all[start * row_bytes..(start + count) * row_bytes];
        let mut out = vec![0f32; count * row_len];
        dequantize_into(t.ggml_type, src, &mut out)?;
        Ok(out)
    }
}

/// Dequantizes whole blocks of type `ty` from `src` into `out` (`out.len()` elements; `src` must
/// hold exactly `out.len() / block_elems` blocks). Large inputs are split over rayon threads.
pub fn dequantize_into(ty: GgmlType, src: &[u8], out: &mut [f32]) -> Result<()> {
    let (be, bb) = ty.block().ok_or_else(|| Error::DType {
        op: "gguf dequantize",
        tensor: String::new(),
        got: ty.name(),
        expected: "one of F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q8_K".into(),
    })?;
    if !out.len().is_multiple_of(be) || src.len() != out.len() / be * bb {
        return Err(Error::Param {
            op: "gguf dequantize",
            msg: format!(
                "{ty}: {} bytes do not hold {} elements (blocks of {be} elements in {bb} bytes)",
                src.len(),
                out.len()
            ),
        });
    }
    let f: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::BF16 => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => dq_q4_0,
        GgmlType::Q4_1 => dq_q4_1,
        GgmlType::Q5_0 => dq_q5_0,
        GgmlType::Q5_1 => dq_q5_1,
        GgmlType::Q8_0 => dq_q8_0,
        GgmlType::Q8_1 => dq_q8_1,
        GgmlType::Q2K => dq_q2_k,
        GgmlType::Q3K => dq_q3_k,
        GgmlType::Q4K => dq_q4_k,
        GgmlType::Q5K => dq_q5_k,
        GgmlType::Q6K => dq_q6_k,
        GgmlType::Q8K => dq_q8_k,
        GgmlType::Other(_) => unreachable!("block() is None for Other"),
    };
    // Chunks of whole blocks, ~64k elements each, in parallel.
    let blocks_per_chunk = (65536 / be).max(1);
    out.par_chunks_mut(blocks_per_chunk * be)
        .zip(src.par_chunks(blocks_per_chunk * bb))
        .for_each(|(y, b)| {
            for (yb, bb_) in y.chunks_exact_mut(be).zip(b.chunks_exact(bb)) {
                f(bb_, yb);
            }
        });
    Ok(())
}

/// Elements per super-block of the K-quants.
const QK_K: usize = 256;

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

// Formats of the 32-element blocks (llama.cpp `ggml-quants.c`); y = output block, b = block bytes.
// Low nibbles hold elements 0..16, high nibbles elements 16..32.

/// Q4_0: d (f16), 16 bytes of nibbles. y = d * (q - 8).
fn dq_q4_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: d, m (f16), 16 bytes of nibbles. y = d * q + m.
fn dq_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (h(b, 0), h(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0xF) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// Q5_0: d (f16), qh (u32: bit j = 5th bit of element j), 16 bytes of nibbles. y = d * (q - 16).
fn dq_q5_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        y[j] = (((qs[j] & 0xF) | (h0 << 4)) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | (h1 << 4)) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: d, m (f16), qh (u32), 16 bytes of nibbles. y = d * q + m.
fn dq_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (h(b, 0), h(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        y[j] = ((qs[j] & 0xF) | (h0 << 4)) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) | (h1 << 4)) as f32 * d + m;
    }
}

/// Q8_0: d (f16), 32 x i8. y = d * q.
fn dq_q8_0(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    for j in 0..32 {
        y[j] = b[2 + j] as i8 as f32 * d;
    }
}

/// Q8_1: d, s (f16; s = d * sum q, unused here), 32 x i8. y = d * q.
fn dq_q8_1(b: &[u8], y: &mut [f32]) {
    let d = h(b, 0);
    for j in 0..32 {
        y[j] = b[4 + j] as i8 as f32 * d;
    }
}

// K-quants: super-blocks of 256 elements split into sub-blocks of 16 or 32 elements, each with its
// own 4/6/8-bit scale (and min) relative to the super-block's f16 d (and dmin).

/// Q2_K: scales[16] (low nibble scale, high nibble min, per 16 elements), qs[64] (2-bit), d, dmin.
/// y = d * sc * q - dmin * m.
fn dq_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let (d, dmin) = (h(b, 80), h(b, 82));
    let mut is = 0;
    let mut yi = 0;
    for n in 0..2 {
        let q = &qs[32 * n..32 * n + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0xF) as f32;
                let ml = dmin * (sc >> 4) as f32;
                for l in 0..16 {
                    y[yi] = dl * ((q[l + 16 * half] >> shift) & 3) as f32 - ml;
                    yi += 1;
                }
            }
        }
    }
}

/// Q3_K: hmask[32] (3rd bit, cleared = subtract 4), qs[64] (2 low bits), scales[12] (16 x 6-bit,
/// offset 32), d. y = d * (sc - 32) * (q - 4 * !hbit).
fn dq_q3_k(b: &[u8], y: &mut [f32]) {
    let hm = &b[0..32];
    let qs = &b[32..96];
    let sb = &b[96..108];
    let d_all = h(b, 108);
    // Unpack the 16 6-bit scales: low 4 bits from bytes 0..8, high 2 bits from bytes 8..12.
    let mut scales = [0i8; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = if i < 8 { sb[i] & 0xF } else { sb[i - 8] >> 4 };
        let high = (sb[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = ((low | (high << 4)) as i32 - 32) as i8;
    }
    let mut is = 0;
    let mut yi = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &qs[32 * n..32 * n + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let dl = d_all * scales[is] as f32;
                is += 1;
                for l in 0..16 {
                    let k = l + 16 * half;
                    let sub = if hm[k] & m != 0 { 0 } else { 4 };
                    y[yi] = dl * (((q[k] >> shift) & 3) as i32 - sub) as f32;
                    yi += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// The 6-bit (scale, min) pair `j` of the 12-byte Q4_K/Q5_K scale array.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K: d, dmin (f16), scales[12] (8 x 6-bit scale + min, per 32 elements), qs[128] (nibbles).
/// y = d * sc * q - dmin * m.
fn dq_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let sc = &b[4..16];
    let qs = &b[16..144];
    for j in 0..4 {
        let q = &qs[32 * j..32 * j + 32];
        let (s1, m1) = scale_min_k4(2 * j, sc);
        let (s2, m2) = scale_min_k4(2 * j + 1, sc);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let yo = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            yo[l] = d1 * (q[l] & 0xF) as f32 - m1;
            yo[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: as Q4_K plus qh[32] holding the 5th bit (bit 2j / 2j+1 for sub-blocks 2j / 2j+1).
fn dq_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let sc = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for j in 0..4 {
        let q = &qs[32 * j..32 * j + 32];
        let (s1, m1) = scale_min_k4(2 * j, sc);
        let (s2, m2) = scale_min_k4(2 * j + 1, sc);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
        let yo = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            yo[l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
            yo[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (i8, per 16 elements), d.
/// y = d * sc * (q - 32).
fn dq_q6_k(b: &[u8], y: &mut [f32]) {
    let d = h(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let yo = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            yo[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            yo[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            yo[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            yo[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Q8_K: d (f32), 256 x i8, bsums[16] (i16, unused here). y = d * q.
fn dq_q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for j in 0..QK_K {
        y[j] = b[4 + j] as i8 as f32 * d;
    }
}
