//! A minimal GGUF writer for synthesized test files (shared by the integration tests).
#![allow(dead_code)]

#[derive(Clone)]
pub struct Builder {
    pub version: u32,
    pub kv: Vec<(String, u32, Vec<u8>)>,
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    pub alignment: u64,
}

pub fn s(x: &str) -> Vec<u8> {
    let mut v = (x.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(x.as_bytes());
    v
}

impl Builder {
    pub fn new() -> Builder {
        Builder {
            version: 3,
            kv: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
        }
    }
    pub fn kv(mut self, key: &str, ty: u32, val: Vec<u8>) -> Builder {
        self.kv.push((key.into(), ty, val));
        self
    }
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Builder {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }
    /// Bytes of the file; `offsets` overrides the tensor offsets when given.
    pub fn build_with(&self, offsets: Option<&[u64]>) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            b.extend(s(k));
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        let mut off = 0u64;
        let mut offs = Vec::new();
        for (_, _, _, data) in &self.tensors {
            offs.push(off);
            off += (data.len() as u64).div_ceil(self.alignment) * self.alignment;
        }
        for (i, (name, dims, ty, _)) in self.tensors.iter().enumerate() {
            b.extend(s(name));
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            let o = offsets.map_or(offs[i], |o| o[i]);
            b.extend_from_slice(&o.to_le_bytes());
        }
        while !(b.len() as u64).is_multiple_of(self.alignment) {
            b.push(0);
        }
        for (_, _, _, data) in &self.tensors {
            b.extend_from_slice(data);
            while !(b.len() as u64).is_multiple_of(self.alignment) {
                b.push(0);
            }
        }
        b
    }
    pub fn build(&self) -> Vec<u8> {
        self.build_with(None)
    }
}

pub fn u32v(x: u32) -> Vec<u8> {
    x.to_le_bytes().to_vec()
}

pub fn array(et: u32, n: u64, elems: &[u8]) -> Vec<u8> {
    let mut v = et.to_le_bytes().to_vec();
    v.extend_from_slice(&n.to_le_bytes());
    v.extend_from_slice(elems);
    v
}
