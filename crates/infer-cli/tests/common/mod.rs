//! What the CLI's test files share.

/// Flags that make generation run until it is stopped (or for a long while):
/// a raw prompt, a bounded cache and no end of sequence.
pub const ENDLESS: &[&str] = &[
    "--raw",
    "--ignore-eos",
    "--max-tokens",
    "100000",
    "--context-len",
    "64",
    "--allow-past-max-positions",
];
