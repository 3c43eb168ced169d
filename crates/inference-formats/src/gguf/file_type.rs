//! GGUF file types: `general.file_type`, llama.cpp's `llama_ftype`.

/// A GGUF file type (`general.file_type`, llama.cpp's `llama_ftype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgufFileType {
    /// The name llama.cpp gives it (`Q4_1`, `Q4_K_M`, `F16`, …).
    pub name: &'static str,
    /// Bits per quantised weight (nominal for mixed K-quant types); `None`
    /// for float types.
    pub bits: Option<u32>,
    /// Weights sharing one scale (for K-quants, the sub-block); `None` for
    /// float types.
    pub group: Option<u32>,
}

impl GgufFileType {
    /// The type of `general.file_type = id`, if known.
    pub fn from_id(id: u32) -> Option<Self> {
        let (name, bits, group) = match id {
            0 => ("F32", None, None),
            1 => ("F16", None, None),
            2 => ("Q4_0", Some(4), Some(32)),
            3 => ("Q4_1", Some(4), Some(32)),
            7 => ("Q8_0", Some(8), Some(32)),
            8 => ("Q5_0", Some(5), Some(32)),
            9 => ("Q5_1", Some(5), Some(32)),
            10 => ("Q2_K", Some(2), Some(16)),
            11 => ("Q3_K_S", Some(3), Some(16)),
            12 => ("Q3_K_M", Some(3), Some(16)),
            13 => ("Q3_K_L", Some(3), Some(16)),
            14 => ("Q4_K_S", Some(4), Some(32)),
            15 => ("Q4_K_M", Some(4), Some(32)),
            16 => ("Q5_K_S", Some(5), Some(32)),
            17 => ("Q5_K_M", Some(5), Some(32)),
            18 => ("Q6_K", Some(6), Some(16)),
            19 => ("IQ2_XXS", Some(2), Some(256)),
            20 => ("IQ2_XS", Some(2), Some(256)),
            21 => ("Q2_K_S", Some(2), Some(16)),
            22 => ("IQ3_XS", Some(3), Some(256)),
            23 => ("IQ3_XXS", Some(3), Some(256)),
            24 => ("IQ1_S", Some(1), Some(256)),
            25 => ("IQ4_NL", Some(4), Some(32)),
            26 => ("IQ3_S", Some(3), Some(256)),
            27 => ("IQ3_M", Some(3), Some(256)),
            28 => ("IQ2_S", Some(2), Some(256)),
            29 => ("IQ2_M", Some(2), Some(256)),
            30 => ("IQ4_XS", Some(4), Some(256)),
            31 => ("IQ1_M", Some(1), Some(256)),
            32 => ("BF16", None, None),
            36 => ("TQ1_0", Some(1), Some(256)),
            37 => ("TQ2_0", Some(2), Some(256)),
            _ => return None,
        };
        Some(Self { name, bits, group })
    }

    /// Whether the type is quantised.
    pub fn is_quantized(&self) -> bool {
        self.bits.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_file_types() {
        let t = GgufFileType::from_id(3).unwrap();
        assert_eq!((t.name, t.bits, t.group), ("Q4_1", Some(4), Some(32)));
        assert_eq!(GgufFileType::from_id(15).unwrap().name, "Q4_K_M");
        assert!(!GgufFileType::from_id(1).unwrap().is_quantized());
        assert!(GgufFileType::from_id(9999).is_none());
    }
}
