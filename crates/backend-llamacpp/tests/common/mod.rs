//! What the llama.cpp backend's test binaries share.

/// Strings that tokenizers get wrong: unicode, runs of spaces, digits,
/// code, special tokens written in the text.
pub const TRICKY: [&str; 12] = [
    "Hello, world!",
    "  two leading spaces and   three inside",
    "naïve café, Straße, 東京, Москва, مرحبا",
    "emoji 🦀🚀 and a ZWJ 👩‍💻",
    "1234567890 3.14159 1,000,000 2024-12-01",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
    "\ttabs\tand\nnew\n\nlines\r\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "ß ẞ ﬁ Ⅻ ½ ²",
    " ",
    "a",
];
