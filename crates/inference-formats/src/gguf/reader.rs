//! A reader for GGUF files (versions 2 and 3, little-endian).
//!
//! A GGUF file is a header (magic `GGUF`, version, tensor count, metadata
//! count), the metadata as typed key/value pairs, one record per tensor (name,
//! dimensions, GGML type, offset), padding to the file's alignment
//! (`general.alignment`, 32 by default), and then the data section holding
//! every tensor's bytes at its offset.
//!
//! [`GgufFile::open`] maps the file and parses and validates everything but the
//! tensor bytes: every count is checked against the bytes left in the file
//! before anything is allocated for it, all arithmetic on sizes and offsets is
//! overflow-checked, and every tensor's byte range must lie inside the file. A
//! corrupt or truncated file gives a [`GgufError`], never a panic.
//! [`GgufFile::tensor_data`] then hands out the bytes of a tensor as a slice of
//! the map, without copying.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

/// The magic number at the start of every GGUF file: `GGUF` in ASCII.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The data section alignment of a file that does not set `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that sets the data section alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// The most dimensions a GGML tensor can have.
pub const MAX_DIMS: usize = 4;
/// How deeply metadata arrays may nest (arrays of arrays of ...).
pub const MAX_ARRAY_DEPTH: usize = 4;

/// What can go wrong while reading a GGUF file or dequantising its tensors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// The file is a big-endian GGUF file; only little-endian ones are read.
    #[error("big-endian GGUF files are not supported")]
    BigEndian,
    /// The GGUF version is not 2 or 3.
    #[error("unsupported GGUF version {0} (2 and 3 are supported)")]
    UnsupportedVersion(u32),
    /// The file ends inside the header, the metadata or the tensor records.
    #[error("truncated file: {what} at offset {offset} runs past the end of the file")]
    Truncated {
        /// What was being read.
        what: String,
        /// Its byte offset in the file.
        offset: u64,
    },
    /// A string is not valid UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which string.
        what: String,
    },
    /// A count in the file is larger than the file could possibly hold.
    #[error("{what}: count {count} is impossible for a file of {file_len} bytes")]
    TooLarge {
        /// Which count.
        what: String,
        /// The count.
        count: u64,
        /// The file's size in bytes.
        file_len: u64,
    },
    /// A metadata value has a type id that GGUF does not define.
    #[error("metadata `{key}` has unknown value type {id}")]
    UnknownValueType {
        /// The key.
        key: String,
        /// The type id.
        id: u32,
    },
    /// Metadata arrays nest deeper than [`MAX_ARRAY_DEPTH`].
    #[error("metadata `{key}` nests arrays deeper than {MAX_ARRAY_DEPTH} levels")]
    NestedTooDeep {
        /// The key.
        key: String,
    },
    /// A metadata key occurs twice.
    #[error("duplicate metadata key `{0}`")]
    DuplicateKey(String),
    /// Two tensors have the same name.
    #[error("duplicate tensor `{0}`")]
    DuplicateTensor(String),
    /// `general.alignment` is not a positive power of two (or not an integer).
    #[error("invalid general.alignment {0}")]
    BadAlignment(String),
    /// A tensor has a GGML type id this reader does not know.
    #[error("tensor `{tensor}` has unknown GGML type {id}")]
    UnknownType {
        /// The tensor.
        tensor: String,
        /// The type id.
        id: u32,
    },
    /// A tensor's dimensions are invalid: too many, a row that is not a whole
    /// number of blocks, or a size that overflows.
    #[error("tensor `{tensor}`: {reason}")]
    BadShape {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's offset is not a multiple of the file's alignment.
    #[error("tensor `{tensor}` at offset {offset} is not aligned to {alignment} bytes")]
    Misaligned {
        /// The tensor.
        tensor: String,
        /// Its offset relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A tensor's bytes do not lie inside the file.
    #[error("tensor `{tensor}` (bytes {start}..{end}) lies outside the file of {file_len} bytes")]
    OutOfBounds {
        /// The tensor.
        tensor: String,
        /// Its first byte in the file (saturated on overflow).
        start: u64,
        /// One past its last byte in the file (saturated on overflow).
        end: u64,
        /// The file's size in bytes.
        file_len: u64,
    },
    /// Dequantisation or conversion of this GGML type is not implemented.
    #[error("{op} is not implemented for GGML type {ty}")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// The type.
        ty: GgmlType,
    },
    /// Quantised data does not have the length its element count implies, or
    /// the element count is not a whole number of blocks.
    #[error("{ty} data: {reason}")]
    WrongLength {
        /// The type.
        ty: GgmlType,
        /// What is wrong.
        reason: String,
    },
}

/// A GGML tensor type: how a tensor's elements are stored.
///
/// The names are GGML's (`Q4_0`, `Q4_K`, ...). Every type GGML defines is
/// listed so that any file can be opened and its tensors sized and
/// bounds-checked; [`crate::gguf::quant::dequantize`] implements a subset.
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgmlType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// Blocks of 32: f16 scale `d`, 4-bit `q`; `w = d * (q - 8)`.
    Q4_0,
    /// Blocks of 32: f16 scale `d` and minimum `m`, 4-bit `q`; `w = d * q + m`.
    Q4_1,
    /// Blocks of 32: f16 scale `d`, 5-bit `q`; `w = d * (q - 16)`.
    Q5_0,
    /// Blocks of 32: f16 scale `d` and minimum `m`, 5-bit `q`; `w = d * q + m`.
    Q5_1,
    /// Blocks of 32: f16 scale `d`, 8-bit signed `q`; `w = d * q`.
    Q8_0,
    /// Blocks of 32: f32 `d` and sum `s`, 8-bit `q` (an intermediate type).
    Q8_1,
    /// Super-blocks of 256 with 2-bit quants and 4-bit sub-block scales and minima.
    Q2_K,
    /// Super-blocks of 256 with 3-bit quants and 6-bit sub-block scales.
    Q3_K,
    /// Super-blocks of 256 with 4-bit quants and 6-bit sub-block scales and minima.
    Q4_K,
    /// Super-blocks of 256 with 5-bit quants and 6-bit sub-block scales and minima.
    Q5_K,
    /// Super-blocks of 256 with 6-bit quants and 8-bit sub-block scales.
    Q6_K,
    /// Super-blocks of 256: f32 scale, 8-bit quants and block sums.
    Q8_K,
    /// An i-quant (2.06 bits per weight).
    IQ2_XXS,
    /// An i-quant (2.31 bits per weight).
    IQ2_XS,
    /// An i-quant (3.06 bits per weight).
    IQ3_XXS,
    /// An i-quant (1.56 bits per weight).
    IQ1_S,
    /// A non-linear 4-bit quant in blocks of 32.
    IQ4_NL,
    /// An i-quant (3.44 bits per weight).
    IQ3_S,
    /// An i-quant (2.56 bits per weight).
    IQ2_S,
    /// A non-linear 4-bit quant in super-blocks of 256.
    IQ4_XS,
    /// 8-bit signed integer.
    I8,
    /// 16-bit signed integer.
    I16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// 64-bit IEEE float.
    F64,
    /// An i-quant (1.75 bits per weight).
    IQ1_M,
    /// bfloat16.
    BF16,
    /// Ternary quant (1.69 bits per weight).
    TQ1_0,
    /// Ternary quant (2.06 bits per weight).
    TQ2_0,
    /// Microscaling FP4 (E2M1 values with an E8M0 scale per 32).
    MXFP4,
}

impl GgmlType {
    /// The type with GGML's id `id`, or `None` for an id this reader does not
    /// know (including the retired ids 4, 5 and 31 to 33).
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => return None,
        })
    }

    /// GGML's id of this type.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
        }
    }

    /// Elements per block (1 for the plain float and integer types).
    pub fn block_size(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | F64 | I8 | I16 | I32 | I64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => 32,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S
            | IQ3_S | IQ2_S | IQ4_XS | IQ1_M | TQ1_0 | TQ2_0 => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        use GgmlType::*;
        match self {
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            F64 | I64 => 8,
            I8 => 1,
            Q4_0 => 2 + 16,
            Q4_1 => 2 + 2 + 16,
            Q5_0 => 2 + 4 + 16,
            Q5_1 => 2 + 2 + 4 + 16,
            Q8_0 => 2 + 32,
            Q8_1 => 4 + 4 + 32,
            Q2_K => 2 + 2 + QK_K / 16 + QK_K / 4,
            Q3_K => 2 + QK_K / 4 + QK_K / 8 + 12,
            Q4_K => 2 + 2 + QK_K / 2 + 12,
            Q5_K => 2 + 2 + QK_K / 2 + QK_K / 8 + 12,
            Q6_K => 2 + QK_K / 2 + QK_K / 4 + QK_K / 16,
            Q8_K => 4 + QK_K + QK_K / 8,
            IQ2_XXS => 2 + QK_K / 4,
            IQ2_XS => 2 + QK_K / 4 + QK_K / 32,
            IQ3_XXS => 2 + QK_K / 4 + QK_K / 8,
            IQ1_S => 2 + QK_K / 8 + QK_K / 16,
            IQ4_NL => 2 + 16,
            IQ3_S => 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4,
            IQ2_S => 2 + QK_K / 4 + QK_K / 16,
            IQ4_XS => 2 + 2 + QK_K / 2 + QK_K / 64,
            IQ1_M => QK_K / 8 + QK_K / 16 + QK_K / 32,
            TQ1_0 => 2 + 4 * 13,
            TQ2_0 => 2 + QK_K / 4,
            MXFP4 => 1 + 16,
        }
    }

    /// GGML's name of the type (`"Q4_K"`, `"BF16"`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
        }
    }

    /// The bytes `n_elements` elements of this type take, or `None` when
    /// `n_elements` is not a whole number of blocks or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let block = self.block_size() as u64;
        if n_elements % block != 0 {
            return None;
        }
        (n_elements / block).checked_mul(self.block_bytes() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Elements per super-block of the K-quants.
pub const QK_K: usize = 256;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 7 (one byte; any non-zero value reads as `true`).
    Bool(bool),
    /// GGUF type 8: a UTF-8 string.
    String(String),
    /// GGUF type 9: an array of values of one type (possibly empty).
    Array(Vec<MetaValue>),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 12.
    F64(f64),
}

impl MetaValue {
    /// GGUF's name of the value's type (`"UINT32"`, `"STRING"`, ...), as
    /// gguf-py spells it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "UINT8",
            Self::I8(_) => "INT8",
            Self::U16(_) => "UINT16",
            Self::I16(_) => "INT16",
            Self::U32(_) => "UINT32",
            Self::I32(_) => "INT32",
            Self::F32(_) => "FLOAT32",
            Self::Bool(_) => "BOOL",
            Self::String(_) => "STRING",
            Self::Array(_) => "ARRAY",
            Self::U64(_) => "UINT64",
            Self::I64(_) => "INT64",
            Self::F64(_) => "FLOAT64",
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an `i128`, if it is an integer of any width.
    fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as a `u64`, if it is an integer of any width that is not
    /// negative.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|v| u64::try_from(v).ok())
    }

    /// The value as an `i64`, if it is an integer of any width that fits.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_i128().and_then(|v| i64::try_from(v).ok())
    }

    /// The value as an `i32`, if it is an integer of any width that fits.
    pub fn as_i32(&self) -> Option<i32> {
        self.as_i128().and_then(|v| i32::try_from(v).ok())
    }

    /// The value as an `f32`, if it is a float (`F64` rounds to nearest).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Self::F32(v) => Some(v),
            Self::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// The value as an `f64`, if it is a float.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a `bool`, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value's elements, if it is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor's record in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`, ...).
    pub name: String,
    /// The dimensions in GGML order: `dims[0]` varies fastest (the row
    /// length). [`TensorInfo::shape`] gives them in row-major order.
    pub dims: Vec<u64>,
    /// How the elements are stored.
    pub ggml_type: GgmlType,
    /// The offset of the tensor's first byte from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The number of elements (the product of the dimensions, saturated at
    /// `u64::MAX`; [`GgufFile::open`] rejects tensors where it overflows).
    pub fn n_elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// The number of bytes the tensor's data takes.
    ///
    /// Fails when the row length (`dims[0]`) is not a whole number of blocks
    /// of the type, or the size overflows.
    pub fn n_bytes(&self) -> Result<u64, GgufError> {
        let bad = |reason: String| GgufError::BadShape {
            tensor: self.name.clone(),
            reason,
        };
        let n = self
            .dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| bad(format!("element count of dims {:?} overflows", self.dims)))?;
        let block = self.ggml_type.block_size() as u64;
        let row = self.dims.first().copied().unwrap_or(1);
        if row % block != 0 {
            return Err(bad(format!(
                "row length {row} is not a multiple of the {} block size {block}",
                self.ggml_type
            )));
        }
        self.ggml_type.bytes_for(n).ok_or_else(|| {
            bad(format!(
                "byte size of {n} {} elements overflows",
                self.ggml_type
            ))
        })
    }

    /// The shape in row-major (numpy) order: the dimensions reversed, so the
    /// last entry is the row length.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// An open GGUF file: its parsed header, metadata and tensor records, and a
/// read-only map of the file for the tensor data.
pub struct GgufFile {
    /// The file, for messages.
    path: PathBuf,
    /// The whole file, mapped.
    map: Mmap,
    /// 2 or 3.
    version: u32,
    /// Every metadata pair, by key.
    metadata: BTreeMap<String, MetaValue>,
    /// The tensor records, in file order.
    tensors: Vec<TensorInfo>,
    /// Tensor name to its index in `tensors`.
    index: HashMap<String, usize>,
    /// The data section alignment.
    alignment: u64,
    /// The data section's offset in the file.
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("len", &self.map.len())
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses the file at `path`, validating its header, metadata
    /// and tensor records (see the module documentation).
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let started = std::time::Instant::now();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let map = crate::mmap::map_file(&file).map_err(io)?;
        let parsed = parse(&map)?;
        tracing::debug!(
            path = %path.display(),
            version = parsed.version,
            metadata = parsed.metadata.len(),
            tensors = parsed.tensors.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "opened GGUF file"
        );
        let index = parsed
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            index,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data section alignment in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The offset in the file where the data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The file's size in bytes.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Every metadata pair, by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// The string value of `key` (`None` if absent or not a string).
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetaValue::as_str)
    }

    /// The value of `key` as a `u64`, from an integer of any width (`None` if
    /// absent, not an integer, or negative).
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(MetaValue::as_u64)
    }

    /// The value of `key` as an `i64`, from an integer of any width (`None`
    /// if absent, not an integer, or out of range).
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(MetaValue::as_i64)
    }

    /// The value of `key` as an `f32`, from either float type (`None` if
    /// absent or not a float).
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(MetaValue::as_f32)
    }

    /// The boolean value of `key` (`None` if absent or not a bool).
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(MetaValue::as_bool)
    }

    /// The array value of `key` (`None` if absent or not an array).
    pub fn get_array(&self, key: &str) -> Option<&[MetaValue]> {
        self.get(key).and_then(MetaValue::as_array)
    }

    /// The value of `key` as strings (`None` if absent, not an array, or an
    /// element is not a string).
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        self.get_array(key)?.iter().map(MetaValue::as_str).collect()
    }

    /// The value of `key` as `f32`s (`None` if absent, not an array, or an
    /// element is not a float).
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        self.get_array(key)?.iter().map(MetaValue::as_f32).collect()
    }

    /// The value of `key` as `i32`s, from integers of any width (`None` if
    /// absent, not an array, or an element is not an integer that fits).
    pub fn get_i32_array(&self, key: &str) -> Option<Vec<i32>> {
        self.get_array(key)?.iter().map(MetaValue::as_i32).collect()
    }

    /// The value of `key` as `u64`s, from integers of any width (`None` if
    /// absent, not an array, or an element is not a non-negative integer).
    pub fn get_u64_array(&self, key: &str) -> Option<Vec<u64>> {
        self.get_array(key)?.iter().map(MetaValue::as_u64).collect()
    }

    /// The tensor records, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The record of the tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The bytes of tensor `t`: a slice of the mapped file.
    ///
    /// Fails if `t`'s byte range does not lie inside the file (which
    /// [`GgufFile::open`] has checked for its own records, but `t` may come
    /// from elsewhere).
    pub fn tensor_data(&self, t: &TensorInfo) -> Result<&[u8], GgufError> {
        let (start, end) = tensor_range(t, self.data_offset, self.map.len() as u64)?;
        // Both ends are at most the map's length (checked above), so they fit
        // in `usize` and the slice is in bounds; the errors cannot occur.
        let oob = || out_of_bounds(t, start, end, self);
        let (Ok(s), Ok(e)) = (usize::try_from(start), usize::try_from(end)) else {
            return Err(oob());
        };
        self.map.get(s..e).ok_or_else(oob)
    }
}

/// The `OutOfBounds` error for `t` in `file`.
fn out_of_bounds(t: &TensorInfo, start: u64, end: u64, file: &GgufFile) -> GgufError {
    GgufError::OutOfBounds {
        tensor: t.name.clone(),
        start,
        end,
        file_len: file.map.len() as u64,
    }
}

/// The absolute byte range `start..end` of `t` in a file of `file_len` bytes
/// whose data section starts at `data_offset`, checked to lie in the file.
fn tensor_range(t: &TensorInfo, data_offset: u64, file_len: u64) -> Result<(u64, u64), GgufError> {
    let n_bytes = t.n_bytes()?;
    let start = data_offset.checked_add(t.offset);
    let end = start.and_then(|s| s.checked_add(n_bytes));
    match (start, end) {
        (Some(start), Some(end)) if end <= file_len => Ok((start, end)),
        _ => Err(GgufError::OutOfBounds {
            tensor: t.name.clone(),
            start: start.unwrap_or(u64::MAX),
            end: end.unwrap_or(u64::MAX),
            file_len,
        }),
    }
}

/// What [`parse`] finds in a file.
struct Parsed {
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// GGUF's metadata value type ids.
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The fewest bytes one value of GGUF type `id` takes (`None` for an unknown
/// id): a string is at least its 8-byte length, an array its 4-byte type and
/// 8-byte count.
fn min_value_size(id: u32) -> Option<u64> {
    use value_type::*;
    Some(match id {
        U8 | I8 | BOOL => 1,
        U16 | I16 => 2,
        U32 | I32 | F32 => 4,
        U64 | I64 | F64 | STRING => 8,
        ARRAY => 12,
        _ => return None,
    })
}

/// A position in the file's bytes, reading little-endian values.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The next `n` bytes.
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let truncated = || GgufError::Truncated {
            what: what(),
            offset: self.pos as u64,
        };
        let n = usize::try_from(n).map_err(|_| truncated())?;
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let slice = self.bytes.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let slice = self.take(N as u64, what)?;
        // `take` returned exactly N bytes.
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &dyn Fn() -> String) -> Result<u16, GgufError> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A string: its u64 length, then that many bytes of UTF-8.
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(&|| format!("length of {}", what()))?;
        let bytes = self.take(len, what)?;
        let s = std::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 { what: what() })?;
        Ok(s.to_owned())
    }

    /// A count of items of at least `min_size` bytes each, checked against
    /// the bytes left so that a corrupt count cannot make us allocate more
    /// than the file could hold.
    fn count(&mut self, min_size: u64, what: &dyn Fn() -> String) -> Result<usize, GgufError> {
        let count = self.u64(what)?;
        let fits = count
            .checked_mul(min_size)
            .is_some_and(|bytes| bytes <= self.remaining());
        match usize::try_from(count) {
            Ok(n) if fits => Ok(n),
            _ => Err(GgufError::TooLarge {
                what: what(),
                count,
                file_len: self.file_len(),
            }),
        }
    }

    /// One metadata value of type `ty` for `key`, `depth` arrays deep.
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue, GgufError> {
        use value_type::*;
        let what = || format!("value of metadata `{key}`");
        Ok(match ty {
            U8 => MetaValue::U8(self.u8(&what)?),
            I8 => MetaValue::I8(self.u8(&what)? as i8),
            U16 => MetaValue::U16(self.u16(&what)?),
            I16 => MetaValue::I16(self.u16(&what)? as i16),
            U32 => MetaValue::U32(self.u32(&what)?),
            I32 => MetaValue::I32(self.u32(&what)? as i32),
            F32 => MetaValue::F32(f32::from_bits(self.u32(&what)?)),
            BOOL => MetaValue::Bool(self.u8(&what)? != 0),
            STRING => MetaValue::String(self.string(&what)?),
            U64 => MetaValue::U64(self.u64(&what)?),
            I64 => MetaValue::I64(self.u64(&what)? as i64),
            F64 => MetaValue::F64(f64::from_bits(self.u64(&what)?)),
            ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::NestedTooDeep {
                        key: key.to_owned(),
                    });
                }
                let elem = self.u32(&|| format!("element type of metadata `{key}`"))?;
                let min = min_value_size(elem).ok_or_else(|| GgufError::UnknownValueType {
                    key: key.to_owned(),
                    id: elem,
                })?;
                let n = self.count(min, &|| format!("length of metadata array `{key}`"))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            id => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_owned(),
                    id,
                })
            }
        })
    }
}

/// The smallest multiple of `alignment` (a power of two) that is at least `n`.
fn align_up(n: u64, alignment: u64) -> Option<u64> {
    n.checked_add(alignment - 1).map(|m| m & !(alignment - 1))
}

/// The alignment that `general.alignment` sets, if present.
fn alignment_of(metadata: &BTreeMap<String, MetaValue>) -> Result<u64, GgufError> {
    let Some(value) = metadata.get(ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match value.as_u64() {
        Some(a) if a.is_power_of_two() => Ok(a),
        _ => Err(GgufError::BadAlignment(format!("{value:?}"))),
    }
}

/// Parses and validates everything but the tensor bytes.
fn parse(bytes: &[u8]) -> Result<Parsed, GgufError> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic: [u8; 4] = c.array(&|| "magic".to_owned())?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = c.u32(&|| "version".to_owned())?;
    match version {
        2 | 3 => {}
        // A big-endian file's version reads as 0x0N00_0000 here.
        v if v & 0xFFFF == 0 && (1..=3).contains(&v.swap_bytes()) => {
            return Err(GgufError::BigEndian)
        }
        v => return Err(GgufError::UnsupportedVersion(v)),
    }
    // Each tensor record takes at least 8 (name length) + 4 (dimension count)
    // + 4 (type) + 8 (offset) bytes; each metadata pair at least 8 (key
    // length) + 4 (type) + 1 (the smallest value).
    let n_tensors = c.u64(&|| "tensor count".to_owned())?;
    let n_kv = c.count(13, &|| "metadata count".to_owned())?;
    let fits = n_tensors
        .checked_mul(24)
        .is_some_and(|b| b <= c.remaining());
    let n_tensors = match usize::try_from(n_tensors) {
        Ok(n) if fits => n,
        _ => {
            return Err(GgufError::TooLarge {
                what: "tensor count".to_owned(),
                count: n_tensors,
                file_len: c.file_len(),
            })
        }
    };

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("key of metadata pair {i}"))?;
        let ty = c.u32(&|| format!("type of metadata `{key}`"))?;
        let value = c.value(ty, &key, 0)?;
        if metadata.contains_key(&key) {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.insert(key, value);
    }
    let alignment = alignment_of(&metadata)?;

    let mut tensors = Vec::with_capacity(n_tensors);
    let mut seen = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string(&|| format!("name of tensor {i}"))?;
        let what = |field: &str| format!("{field} of tensor `{name}`");
        let n_dims = c.u32(&|| what("dimension count"))?;
        let n_dims = usize::try_from(n_dims)
            .ok()
            .filter(|&n| n <= MAX_DIMS)
            .ok_or_else(|| GgufError::BadShape {
                tensor: name.clone(),
                reason: format!("{n_dims} dimensions (at most {MAX_DIMS})"),
            })?;
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(c.u64(&|| what("dimensions"))?);
        }
        let type_id = c.u32(&|| what("type"))?;
        let offset = c.u64(&|| what("offset"))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownType {
            tensor: name.clone(),
            id: type_id,
        })?;
        if seen.insert(name.clone(), i).is_some() {
            return Err(GgufError::DuplicateTensor(name));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }

    let data_offset = align_up(c.pos as u64, alignment).ok_or_else(|| GgufError::TooLarge {
        what: "data offset".to_owned(),
        count: c.pos as u64,
        file_len: c.file_len(),
    })?;
    for t in &tensors {
        // Element count and block fit first, for the clearer error.
        if t.dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .is_none()
        {
            return Err(GgufError::BadShape {
                tensor: t.name.clone(),
                reason: format!("element count of dims {:?} overflows", t.dims),
            });
        }
        t.n_bytes()?;
        if t.offset % alignment != 0 {
            return Err(GgufError::Misaligned {
                tensor: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        tensor_range(t, data_offset, c.file_len())?;
    }

    Ok(Parsed {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    //! Synthetic files written by a small writer of our own (valid and
    //! corrupt), and the metadata of the two real model files against
    //! gguf-py's reading of them (`tests/fixtures/gguf/real-*.json`, written
    //! by `scripts/fixtures/make_gguf_goldens.py`).

    use super::*;
    use std::io::Write;

    /// A minimal GGUF writer for tests.
    #[derive(Default)]
    pub(crate) struct Writer {
        pub version: u32,
        pub kv: Vec<u8>,
        pub n_kv: u64,
        pub infos: Vec<u8>,
        pub n_tensors: u64,
        pub data: Vec<u8>,
        pub alignment: u64,
    }

    pub(crate) fn put_str(buf: &mut Vec<u8>, s: &str) {
        buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
    }

    impl Writer {
        pub fn new() -> Self {
            Self {
                version: 3,
                alignment: 32,
                ..Self::default()
            }
        }

        /// A pair whose value bytes (after the type id) are given raw.
        pub fn kv_raw(&mut self, key: &str, ty: u32, value: &[u8]) -> &mut Self {
            put_str(&mut self.kv, key);
            self.kv.extend_from_slice(&ty.to_le_bytes());
            self.kv.extend_from_slice(value);
            self.n_kv += 1;
            self
        }

        pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
            self.kv_raw(key, value_type::U32, &v.to_le_bytes())
        }

        pub fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
            let mut b = Vec::new();
            put_str(&mut b, v);
            self.kv_raw(key, value_type::STRING, &b)
        }

        /// A tensor record; `data` is appended to the data section at the
        /// next aligned offset.
        pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: &[u8]) -> &mut Self {
            while self.data.len() as u64 % self.alignment != 0 {
                self.data.push(0);
            }
            let offset = self.data.len() as u64;
            self.tensor_at(name, dims, ty, offset);
            self.data.extend_from_slice(data);
            self
        }

        /// A tensor record at an explicit offset, with no data.
        pub fn tensor_at(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
            put_str(&mut self.infos, name);
            self.infos
                .extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                self.infos.extend_from_slice(&d.to_le_bytes());
            }
            self.infos.extend_from_slice(&ty.to_le_bytes());
            self.infos.extend_from_slice(&offset.to_le_bytes());
            self.n_tensors += 1;
            self
        }

        pub fn bytes(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(b"GGUF");
            out.extend_from_slice(&self.version.to_le_bytes());
            out.extend_from_slice(&self.n_tensors.to_le_bytes());
            out.extend_from_slice(&self.n_kv.to_le_bytes());
            out.extend_from_slice(&self.kv);
            out.extend_from_slice(&self.infos);
            while out.len() as u64 % self.alignment != 0 {
                out.push(0);
            }
            out.extend_from_slice(&self.data);
            out
        }
    }

    /// Writes `bytes` to a file in a fresh temporary directory and opens it.
    pub(crate) fn open_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.gguf");
        let mut f = File::create(&path).expect("create");
        f.write_all(bytes).expect("write");
        drop(f);
        GgufFile::open(&path)
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A small valid file with metadata of every type and two tensors.
    fn sample() -> Writer {
        sample_aligned(32)
    }

    /// [`sample`] with the data section aligned to `alignment` bytes (set in
    /// `general.alignment` unless it is the default).
    fn sample_aligned(alignment: u64) -> Writer {
        let mut w = Writer::new();
        w.alignment = alignment;
        if alignment != DEFAULT_ALIGNMENT {
            w.kv_u32(ALIGNMENT_KEY, alignment as u32);
        }
        w.kv_str("general.architecture", "llama")
            .kv_u32("llama.block_count", 2)
            .kv_raw("u8", value_type::U8, &[200])
            .kv_raw("i8", value_type::I8, &[0xFF])
            .kv_raw("u16", value_type::U16, &60000u16.to_le_bytes())
            .kv_raw("i16", value_type::I16, &(-300i16).to_le_bytes())
            .kv_raw("i32", value_type::I32, &(-7i32).to_le_bytes())
            .kv_raw("f32", value_type::F32, &1.5f32.to_le_bytes())
            .kv_raw("bool", value_type::BOOL, &[1])
            .kv_raw("u64", value_type::U64, &(u64::MAX - 1).to_le_bytes())
            .kv_raw("i64", value_type::I64, &(-5i64).to_le_bytes())
            .kv_raw("f64", value_type::F64, &0.25f64.to_le_bytes());
        let mut arr = Vec::new();
        arr.extend_from_slice(&value_type::STRING.to_le_bytes());
        arr.extend_from_slice(&3u64.to_le_bytes());
        for s in ["a", "ü", ""] {
            put_str(&mut arr, s);
        }
        w.kv_raw("strs", value_type::ARRAY, &arr);
        let mut arr = Vec::new();
        arr.extend_from_slice(&value_type::I16.to_le_bytes());
        arr.extend_from_slice(&2u64.to_le_bytes());
        arr.extend_from_slice(&(-2i16).to_le_bytes());
        arr.extend_from_slice(&9i16.to_le_bytes());
        w.kv_raw("ints", value_type::ARRAY, &arr);
        w.tensor("a", &[3, 2], 0, &f32_bytes(&[1., 2., 3., 4., 5., 6.]));
        // Q8_0: one block of 32 in 34 bytes.
        let mut q = vec![0u8; 34];
        q[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        w.tensor("b", &[32], 8, &q);
        w
    }

    #[test]
    fn reads_a_valid_file() {
        let bytes = sample().bytes();
        let f = open_bytes(&bytes).expect("valid file");
        assert_eq!(f.version(), 3);
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.file_len(), bytes.len() as u64);
        assert_eq!(f.get_str("general.architecture"), Some("llama"));
        assert_eq!(f.get_u64("llama.block_count"), Some(2));
        assert_eq!(f.get("u8"), Some(&MetaValue::U8(200)));
        assert_eq!(f.get("i8"), Some(&MetaValue::I8(-1)));
        assert_eq!(f.get_u64("u16"), Some(60000));
        assert_eq!(f.get_i64("i16"), Some(-300));
        assert_eq!(f.get_u64("i16"), None, "negative is not a u64");
        assert_eq!(f.get_i64("i32"), Some(-7));
        assert_eq!(f.get_f32("f32"), Some(1.5));
        assert_eq!(f.get_bool("bool"), Some(true));
        assert_eq!(f.get_u64("u64"), Some(u64::MAX - 1));
        assert_eq!(f.get_i64("u64"), None, "too large for i64");
        assert_eq!(f.get_i64("i64"), Some(-5));
        assert_eq!(f.get_f32("f64"), Some(0.25));
        assert_eq!(f.get_f32("u8"), None, "an integer is not a float");
        assert_eq!(f.get_str_array("strs"), Some(vec!["a", "ü", ""]));
        assert_eq!(f.get_i32_array("ints"), Some(vec![-2, 9]));
        assert_eq!(f.get_str_array("ints"), None);
        assert_eq!(f.metadata().len(), 14);

        assert_eq!(f.tensors().len(), 2);
        let a = f.tensor("a").expect("a").clone();
        assert_eq!(a.dims, vec![3, 2]);
        assert_eq!(a.shape(), vec![2, 3]);
        assert_eq!(a.n_elements(), 6);
        assert_eq!(a.n_bytes().expect("size"), 24);
        assert_eq!(a.ggml_type, GgmlType::F32);
        let data = f.tensor_data(&a).expect("data");
        assert_eq!(data, &f32_bytes(&[1., 2., 3., 4., 5., 6.])[..]);
        let b = f.tensor("b").expect("b").clone();
        assert_eq!(b.ggml_type, GgmlType::Q8_0);
        assert_eq!(b.offset, 32);
        assert_eq!(f.tensor_data(&b).expect("data").len(), 34);
        assert!(f.tensor("c").is_none());

        // A record from elsewhere that points past the end is refused.
        let bogus = TensorInfo {
            offset: 64,
            ..b.clone()
        };
        assert!(matches!(
            f.tensor_data(&bogus),
            Err(GgufError::OutOfBounds { .. })
        ));
        let bogus = TensorInfo {
            offset: u64::MAX - 3,
            ..b
        };
        assert!(matches!(
            f.tensor_data(&bogus),
            Err(GgufError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn version_2_and_custom_alignment() {
        let mut w = sample_aligned(64);
        w.version = 2;
        let f = open_bytes(&w.bytes()).expect("valid v2 file");
        assert_eq!(f.version(), 2);
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.data_offset() % 64, 0);
        assert_eq!(f.tensor("b").expect("b").offset, 64);
        let b = f.tensor("b").expect("b").clone();
        assert_eq!(
            f.tensor_data(&b).expect("data")[..2],
            half::f16::from_f32(0.5).to_bits().to_le_bytes()
        );
    }

    #[test]
    fn bad_alignment_values() {
        for value in [0u32, 3, 48] {
            let mut w = Writer::new();
            w.kv_u32(ALIGNMENT_KEY, value);
            assert!(
                matches!(open_bytes(&w.bytes()), Err(GgufError::BadAlignment(_))),
                "alignment {value}"
            );
        }
        let mut w = Writer::new();
        w.kv_str(ALIGNMENT_KEY, "32");
        assert!(matches!(
            open_bytes(&w.bytes()),
            Err(GgufError::BadAlignment(_))
        ));
    }

    #[test]
    fn empty_and_bad_magic_and_versions() {
        assert!(matches!(open_bytes(&[]), Err(GgufError::Truncated { .. })));
        assert!(matches!(
            open_bytes(b"GGU"),
            Err(GgufError::Truncated { .. })
        ));
        let mut bytes = sample().bytes();
        bytes[0] = b'X';
        assert!(matches!(open_bytes(&bytes), Err(GgufError::BadMagic(m)) if &m == b"XGUF"));

        for (version, big) in [
            (1u32, false),
            (4, false),
            (0, false),
            (3u32.swap_bytes(), true),
        ] {
            let mut bytes = sample().bytes();
            bytes[4..8].copy_from_slice(&version.to_le_bytes());
            let err = open_bytes(&bytes).expect_err("bad version");
            if big {
                assert!(matches!(err, GgufError::BigEndian), "{err}");
            } else {
                assert!(
                    matches!(err, GgufError::UnsupportedVersion(v) if v == version),
                    "{err}"
                );
            }
        }
        // A real big-endian header: every integer byte-swapped.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(b"GGUF");
        bytes.extend_from_slice(&3u32.to_be_bytes());
        bytes.extend_from_slice(&0u64.to_be_bytes());
        bytes.extend_from_slice(&0u64.to_be_bytes());
        assert!(matches!(open_bytes(&bytes), Err(GgufError::BigEndian)));
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let mut w = sample();
        // Make the data section end exactly at the last tensor's end, so
        // cutting anywhere leaves something missing.
        w.data.truncate(32 + 34);
        let bytes = w.bytes();
        assert!(open_bytes(&bytes).is_ok());
        let records_end = 24 + w.kv.len() + w.infos.len();
        for len in 0..bytes.len() {
            let err = open_bytes(&bytes[..len]).expect_err("truncated file");
            if len < records_end {
                // Inside the header, metadata or records: a read runs past the
                // end, or a count no longer fits in what is left.
                assert!(
                    matches!(
                        err,
                        GgufError::Truncated { .. } | GgufError::TooLarge { .. }
                    ),
                    "cut at {len}: {err}"
                );
            } else {
                // In the padding or the data: the tensors no longer fit.
                assert!(
                    matches!(err, GgufError::OutOfBounds { .. }),
                    "cut at {len}: {err}"
                );
            }
        }
    }

    #[test]
    fn absurd_counts_are_refused_before_allocating() {
        // Tensor count.
        let mut bytes = sample().bytes();
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            open_bytes(&bytes),
            Err(GgufError::TooLarge { .. })
        ));
        // Metadata count.
        let mut bytes = sample().bytes();
        bytes[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            open_bytes(&bytes),
            Err(GgufError::TooLarge { .. })
        ));
        // Array length.
        let mut w = Writer::new();
        let mut arr = Vec::new();
        arr.extend_from_slice(&value_type::U64.to_le_bytes());
        arr.extend_from_slice(&(u64::MAX / 4).to_le_bytes());
        w.kv_raw("big", value_type::ARRAY, &arr);
        assert!(matches!(
            open_bytes(&w.bytes()),
            Err(GgufError::TooLarge { .. })
        ));
        // String length.
        let mut w = Writer::new();
        w.kv_raw("s", value_type::STRING, &(u64::MAX - 2).to_le_bytes());
        assert!(matches!(
            open_bytes(&w.bytes()),
            Err(GgufError::Truncated { .. })
        ));
        // Dimension count.
        let mut w = Writer::new();
        w.tensor_at("t", &[1, 1, 1, 1, 1], 0, 0);
        assert!(matches!(
            open_bytes(&w.bytes()),
            Err(GgufError::BadShape { .. })
        ));
        // Element count overflow.
        let mut w = Writer::new();
        w.tensor_at("t", &[1 << 32, 1 << 32, 2], 0, 0);
        assert!(matches!(
            open_bytes(&w.bytes()),
            Err(GgufError::BadShape { .. })
        ));
        // Byte size overflow (elements fit, bytes do not).
        let mut w = Writer::new();
        w.tensor_at("t", &[1 << 62, 2], 0, 0);
        assert!(matches!(
            open_bytes(&w.bytes()),
            Err(GgufError::BadShape { .. })
        ));
        // Nesting.
        let mut w = Writer::new();
        let mut arr = Vec::new();
        for _ in 0..=MAX_ARRAY_DEPTH {
            arr.extend_from_slice(&value_type::ARRAY.to_le_bytes());
            arr.extend_from_slice(&1u64.to_le_bytes());
        }
        arr.extend_from_slice(&value_type::U8.to_le_bytes());
        arr.extend_from_slice(&1u64.to_le_bytes());
        arr.push(7);
        w.kv_raw("deep", value_type::ARRAY, &arr);
        assert!(matches!(
            open_bytes(&w.bytes()),
            Err(GgufError::NestedTooDeep { .. })
        ));
    }

    #[test]
    fn tensor_records_are_validated() {
        // Out of bounds.
        let mut w = Writer::new();
        w.tensor_at("t", &[8], 0, 0);
        let err = open_bytes(&w.bytes()).expect_err("no data");
        assert!(
            matches!(err, GgufError::OutOfBounds { ref tensor, .. } if tensor == "t"),
            "{err}"
        );
        // Offset that overflows.
        let mut w = Writer::new();
        w.tensor_at("t", &[8], 0, !31u64);
        assert!(matches!(
            open_bytes(&w.bytes()),
            Err(GgufError::OutOfBounds { .. })
        ));
        // Misaligned.
        let mut w = Writer::new();
        w.tensor_at("t", &[1], 0, 4);
        w.data = vec![0; 64];
        assert!(matches!(
            open_bytes(&w.bytes()),
            Err(GgufError::Misaligned { offset: 4, .. })
        ));
        // Unknown type id.
        for id in [4u32, 31, 36, 1000] {
            let mut w = Writer::new();
            w.tensor("t", &[32], id, &[0; 64]);
            let err = open_bytes(&w.bytes()).expect_err("unknown type");
            assert!(
                matches!(err, GgufError::UnknownType { id: i, .. } if i == id),
                "{err}"
            );
        }
        // Row not a whole number of blocks.
        let mut w = Writer::new();
        w.tensor("t", &[16, 2], 2, &[0; 64]);
        assert!(matches!(
            open_bytes(&w.bytes()),
            Err(GgufError::BadShape { .. })
        ));
        // Duplicate tensor.
        let mut w = Writer::new();
        w.tensor("t", &[1], 0, &[0; 4])
            .tensor("t", &[1], 0, &[0; 4]);
        assert!(matches!(open_bytes(&w.bytes()), Err(GgufError::DuplicateTensor(n)) if n == "t"));
        // Duplicate key.
        let mut w = Writer::new();
        w.kv_u32("k", 1).kv_u32("k", 2);
        assert!(matches!(open_bytes(&w.bytes()), Err(GgufError::DuplicateKey(k)) if k == "k"));
        // Unknown value type, also as an array element type.
        let mut w = Writer::new();
        w.kv_raw("k", 13, &[0; 8]);
        assert!(matches!(
            open_bytes(&w.bytes()),
            Err(GgufError::UnknownValueType { id: 13, .. })
        ));
        let mut w = Writer::new();
        let mut arr = 99u32.to_le_bytes().to_vec();
        arr.extend_from_slice(&0u64.to_le_bytes());
        w.kv_raw("k", value_type::ARRAY, &arr);
        assert!(matches!(
            open_bytes(&w.bytes()),
            Err(GgufError::UnknownValueType { id: 99, .. })
        ));
        // Invalid UTF-8 in a key and in a tensor name.
        let mut bytes = sample().bytes();
        let at = 24 + 8; // the first key's first byte
        bytes[at] = 0xFF;
        assert!(matches!(
            open_bytes(&bytes),
            Err(GgufError::InvalidUtf8 { .. })
        ));
        let mut w = Writer::new();
        w.tensor("é", &[1], 0, &[0; 4]);
        let mut bytes = w.bytes();
        let at = 24 + 8 + 1; // the second byte of the first tensor's name
        bytes[at] = 0x41;
        assert!(matches!(
            open_bytes(&bytes),
            Err(GgufError::InvalidUtf8 { .. })
        ));
        // A zero-sized tensor may sit at the very end of the file.
        let mut w = Writer::new();
        w.tensor_at("empty", &[0, 4], 0, 0);
        let f = open_bytes(&w.bytes()).expect("empty tensor");
        let t = f.tensor("empty").expect("t").clone();
        assert_eq!(f.tensor_data(&t).expect("data"), &[] as &[u8]);
    }

    #[test]
    fn ggml_type_table_matches_ggml() {
        // Sizes as published in ggml's type traits (bytes per block, block size).
        let expected: &[(u32, usize, usize)] = &[
            (0, 1, 4),
            (1, 1, 2),
            (2, 32, 18),
            (3, 32, 20),
            (6, 32, 22),
            (7, 32, 24),
            (8, 32, 34),
            (9, 32, 40),
            (10, 256, 84),
            (11, 256, 110),
            (12, 256, 144),
            (13, 256, 176),
            (14, 256, 210),
            (15, 256, 292),
            (30, 1, 2),
            (39, 32, 17),
        ];
        for &(id, block, bytes) in expected {
            let ty = GgmlType::from_id(id).expect("known id");
            assert_eq!(ty.id(), id);
            assert_eq!((ty.block_size(), ty.block_bytes()), (block, bytes), "{ty}");
        }
        for id in 0..64 {
            if let Some(ty) = GgmlType::from_id(id) {
                assert_eq!(ty.id(), id, "{ty} round trip");
            }
        }
    }

    /// The repository root.
    pub(crate) fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// The real model file named in a fixture; fails (does not skip) when absent.
    pub(crate) fn real_model(file: &str, size: u64) -> PathBuf {
        let path = repo_root().join(".cache/models").join(file);
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}: the real GGUF models are needed; run `cargo xtask fetch-models`",
                path.display()
            )
        });
        assert_eq!(
            meta.len(),
            size,
            "{} is not the pinned file (size differs); run `cargo xtask fetch-models`",
            path.display()
        );
        path
    }

    /// A fixture of `tests/fixtures/gguf/`.
    pub(crate) fn fixture(name: &str) -> serde_json::Value {
        let path = repo_root().join("tests/fixtures/gguf").join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).expect("fixture JSON")
    }

    /// A JSON value as the metadata value gguf-py reports with type name `ty`.
    fn expected_meta(ty: &str, v: &serde_json::Value) -> MetaValue {
        let int = || v.as_i64().expect("integer");
        match ty {
            "STRING" => MetaValue::String(v.as_str().expect("string").to_owned()),
            "UINT32" => MetaValue::U32(u32::try_from(int()).expect("u32")),
            "INT32" => MetaValue::I32(i32::try_from(int()).expect("i32")),
            "FLOAT32" => MetaValue::F32(v.as_f64().expect("float") as f32),
            "BOOL" => MetaValue::Bool(v.as_bool().expect("bool")),
            other => panic!("fixture type {other} not handled"),
        }
    }

    fn check_real_metadata(model: &str) {
        let fx = fixture(&format!("real-{model}.json"));
        let file = fx["file"].as_str().expect("file");
        let path = real_model(file, fx["file_size"].as_u64().expect("size"));
        let started = std::time::Instant::now();
        let f = GgufFile::open(&path).expect("open");
        eprintln!("{model}: opened in {:?}", started.elapsed());

        assert_eq!(u64::from(f.version()), fx["version"].as_u64().expect("v"));
        assert_eq!(
            f.tensors().len() as u64,
            fx["tensor_count"].as_u64().expect("n")
        );
        assert_eq!(
            f.metadata().len() as u64,
            fx["kv_count"].as_u64().expect("n")
        );
        assert_eq!(f.alignment(), fx["alignment"].as_u64().expect("a"));
        assert_eq!(f.data_offset(), fx["data_offset"].as_u64().expect("o"));

        for (key, expected) in fx["scalars"].as_object().expect("scalars") {
            let ty = expected["type"].as_str().expect("type");
            let value = f
                .get(key)
                .unwrap_or_else(|| panic!("{model}: {key} missing"));
            assert_eq!(value.type_name(), ty, "{model}: {key}");
            assert_eq!(
                value,
                &expected_meta(ty, &expected["value"]),
                "{model}: {key}"
            );
        }
        let arch = f.get_str("general.architecture").expect("arch");
        assert_eq!(
            f.get_u64(&format!("{arch}.block_count")),
            fx["scalars"][format!("{arch}.block_count")]["value"].as_u64()
        );

        for (key, expected) in fx["arrays"].as_object().expect("arrays") {
            let array = f.get_array(key).unwrap_or_else(|| panic!("{model}: {key}"));
            assert_eq!(
                array.len() as u64,
                expected["len"].as_u64().expect("len"),
                "{model}: {key}"
            );
            let ty = expected["element_type"].as_str().expect("type");
            for sample in expected["samples"].as_array().expect("samples") {
                let i = sample[0].as_u64().expect("index") as usize;
                assert_eq!(array[i].type_name(), ty, "{model}: {key}[{i}]");
                assert_eq!(
                    array[i],
                    expected_meta(ty, &sample[1]),
                    "{model}: {key}[{i}]"
                );
            }
        }
        let tokens = f.get_str_array("tokenizer.ggml.tokens").expect("tokens");
        assert_eq!(
            tokens.len() as u64,
            fx["arrays"]["tokenizer.ggml.tokens"]["len"]
                .as_u64()
                .expect("len")
        );

        for t in fx["tensors"].as_array().expect("tensors") {
            let name = t["name"].as_str().expect("name");
            let info = f
                .tensor(name)
                .unwrap_or_else(|| panic!("{model}: tensor {name}"));
            assert_eq!(info.ggml_type.name(), t["type"].as_str().expect("type"));
            assert_eq!(
                u64::from(info.ggml_type.id()),
                t["type_id"].as_u64().expect("id")
            );
            let dims: Vec<u64> = t["dims"]
                .as_array()
                .expect("dims")
                .iter()
                .map(|d| d.as_u64().expect("dim"))
                .collect();
            assert_eq!(info.dims, dims, "{model}: {name}");
            assert_eq!(info.n_elements(), t["n_elements"].as_u64().expect("n"));
            assert_eq!(
                info.n_bytes().expect("bytes"),
                t["n_bytes"].as_u64().expect("n")
            );
            assert_eq!(info.offset, t["offset"].as_u64().expect("offset"));
            let data = f.tensor_data(info).expect("data");
            assert_eq!(data.len() as u64, t["n_bytes"].as_u64().expect("n"));
        }
    }

    #[test]
    fn real_smollm2_metadata() {
        check_real_metadata("smollm2");
    }

    #[test]
    fn real_gemma3_metadata() {
        check_real_metadata("gemma3");
    }
}
