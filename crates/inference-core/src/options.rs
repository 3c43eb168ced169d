//! Generation and load options, with builders and validation.
//!
//! Defaults follow go-inference. Every option is honoured or refused: a backend
//! that cannot do what an option asks returns [`Error::Unsupported`] rather than
//! ignoring it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::types::TokenId;

/// Options of one generation call.
///
/// Sampling applies its steps in this fixed order: repeat penalty → presence
/// and frequency penalties → logit bias → top-p → min-p → top-k →
/// temperature → categorical draw. A temperature of 0 means greedy (argmax)
/// decoding and the filters then change nothing; the penalties and the bias
/// still do. Log-probabilities ([`logprobs`](Self::logprobs)) are those of
/// the model's raw distribution, before any of these steps.
///
/// Deserialising refuses unknown keys, so a misspelt option is an error rather
/// than a default silently used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct GenerateOptions {
    /// Most tokens to generate (stop tokens not counted). Default 256; at least 1.
    pub max_tokens: usize,
    /// Softmax temperature; 0 (the default) is greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 (the default) is off.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens whose probability
    /// reaches `top_p`; 0 (the default) and 1 are off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 is off.
    pub min_p: f32,
    /// Penalise tokens seen in the last `repeat_last_n` tokens (prompt included)
    /// with transformers' semantics: positive logits of those tokens are
    /// divided by it, negative ones multiplied. 1 (the default) is off; above 1
    /// discourages repetition, between 0 and 1 encourages it. Must be > 0.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at. Default 64.
    pub repeat_last_n: usize,
    /// Token ids that end generation; they are not yielded.
    pub stop_tokens: Vec<TokenId>,
    /// Strings that end generation; neither they nor anything after them is yielded.
    pub stop_strings: Vec<String>,
    /// Seed of the sampler; `None` (the default) seeds from entropy.
    pub seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens, up to `max_tokens`.
    pub ignore_eos: bool,
    /// Extra variables for chat templates, e.g. `enable_thinking`.
    pub template_args: BTreeMap<String, serde_json::Value>,
    /// Tool definitions (JSON schemas, as OpenAI's `tools`) that
    /// [`chat`](crate::TextModel::chat) gives its template as `tools`; raw
    /// prompts refuse them.
    pub tools: Vec<serde_json::Value>,
    /// Text the assistant's reply starts with: [`chat`](crate::TextModel::chat)
    /// renders it after the template's generation prompt, and the model
    /// continues it (a forced start: the opening of a tool call, a JSON
    /// brace). The returned tokens are the continuation only. Raw prompts
    /// and chat sessions refuse it; it must not be empty.
    pub reply_prefix: Option<String>,
    /// Return the last-position logits. Meaningful for
    /// [`classify`](crate::TextModel::classify); `generate` refuses it with
    /// [`Error::Unsupported`].
    pub return_logits: bool,
    /// Report each generated token's log-probability under the model's raw
    /// distribution (log-softmax of its logits, before penalties, bias,
    /// filters and temperature) in [`Token::logprobs`](crate::Token::logprobs).
    pub logprobs: bool,
    /// With [`logprobs`](Self::logprobs), also the `top_logprobs` most likely
    /// ids at each step and their log-probabilities; at most 20.
    pub top_logprobs: usize,
    /// Report the log-probability of each prompt id after the ones before it
    /// ([`TokenStream::prompt_logprobs`](crate::TokenStream::prompt_logprobs)),
    /// from the model's raw distribution.
    pub prompt_logprobs: bool,
    /// Added to the logits of these ids before sampling (OpenAI's
    /// `logit_bias`); each bias in [-100, 100].
    pub logit_bias: BTreeMap<TokenId, f32>,
    /// OpenAI's presence penalty, in [-2, 2]: subtracted from the logit of
    /// every id generated so far in this call (the prompt does not count).
    /// 0 (the default) is off.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2]: subtracted from an id's logit
    /// once per time it was generated so far in this call. 0 (the default)
    /// is off.
    pub frequency_penalty: f32,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_k: 0,
            top_p: 0.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            stop_tokens: Vec::new(),
            stop_strings: Vec::new(),
            seed: None,
            ignore_eos: false,
            template_args: BTreeMap::new(),
            tools: Vec::new(),
            reply_prefix: None,
            return_logits: false,
            logprobs: false,
            top_logprobs: 0,
            prompt_logprobs: false,
            logit_bias: BTreeMap::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// The most alternatives [`GenerateOptions::top_logprobs`] may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl GenerateOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`max_tokens`](Self::max_tokens).
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n;
        self
    }

    /// Sets [`temperature`](Self::temperature).
    pub fn temperature(mut self, t: f32) -> Self {
        self.temperature = t;
        self
    }

    /// Sets [`top_k`](Self::top_k).
    pub fn top_k(mut self, k: usize) -> Self {
        self.top_k = k;
        self
    }

    /// Sets [`top_p`](Self::top_p).
    pub fn top_p(mut self, p: f32) -> Self {
        self.top_p = p;
        self
    }

    /// Sets [`min_p`](Self::min_p).
    pub fn min_p(mut self, p: f32) -> Self {
        self.min_p = p;
        self
    }

    /// Sets [`repeat_penalty`](Self::repeat_penalty).
    pub fn repeat_penalty(mut self, penalty: f32) -> Self {
        self.repeat_penalty = penalty;
        self
    }

    /// Sets [`repeat_last_n`](Self::repeat_last_n).
    pub fn repeat_last_n(mut self, n: usize) -> Self {
        self.repeat_last_n = n;
        self
    }

    /// Adds a stop token id.
    pub fn stop_token(mut self, id: TokenId) -> Self {
        self.stop_tokens.push(id);
        self
    }

    /// Adds a stop string.
    pub fn stop_string(mut self, s: impl Into<String>) -> Self {
        self.stop_strings.push(s.into());
        self
    }

    /// Sets [`seed`](Self::seed).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Sets [`ignore_eos`](Self::ignore_eos).
    pub fn ignore_eos(mut self, yes: bool) -> Self {
        self.ignore_eos = yes;
        self
    }

    /// Sets one chat-template variable.
    pub fn template_arg(
        mut self,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.template_args.insert(key.into(), value.into());
        self
    }

    /// Adds a tool definition (see [`tools`](Self::tools)).
    pub fn tool(mut self, definition: serde_json::Value) -> Self {
        self.tools.push(definition);
        self
    }

    /// Sets [`reply_prefix`](Self::reply_prefix).
    pub fn reply_prefix(mut self, text: impl Into<String>) -> Self {
        self.reply_prefix = Some(text.into());
        self
    }

    /// Whether a chat template is asked for: template arguments, tools or a
    /// reply prefix, which raw prompts refuse.
    pub fn uses_template(&self) -> bool {
        !self.template_args.is_empty() || !self.tools.is_empty() || self.reply_prefix.is_some()
    }

    /// Sets [`return_logits`](Self::return_logits).
    pub fn return_logits(mut self, yes: bool) -> Self {
        self.return_logits = yes;
        self
    }

    /// Sets [`logprobs`](Self::logprobs) and
    /// [`top_logprobs`](Self::top_logprobs): log-probabilities with `top`
    /// alternatives per step.
    pub fn logprobs(mut self, top: usize) -> Self {
        self.logprobs = true;
        self.top_logprobs = top;
        self
    }

    /// Sets [`prompt_logprobs`](Self::prompt_logprobs).
    pub fn prompt_logprobs(mut self, yes: bool) -> Self {
        self.prompt_logprobs = yes;
        self
    }

    /// Adds `bias` to the logit of `id` (see [`logit_bias`](Self::logit_bias)).
    pub fn logit_bias(mut self, id: TokenId, bias: f32) -> Self {
        self.logit_bias.insert(id, bias);
        self
    }

    /// Sets [`presence_penalty`](Self::presence_penalty).
    pub fn presence_penalty(mut self, penalty: f32) -> Self {
        self.presence_penalty = penalty;
        self
    }

    /// Sets [`frequency_penalty`](Self::frequency_penalty).
    pub fn frequency_penalty(mut self, penalty: f32) -> Self {
        self.frequency_penalty = penalty;
        self
    }

    /// Whether the presence or frequency penalty is on.
    pub fn uses_presence_frequency(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }

    /// Whether anything changes the logits before the filters: a penalty
    /// (repeat, presence or frequency) or a logit bias.
    pub fn changes_logits(&self) -> bool {
        self.uses_repeat_penalty() || self.uses_presence_frequency() || !self.logit_bias.is_empty()
    }

    /// Whether these options ask for greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether the repeat penalty changes anything (it is not 1).
    pub fn uses_repeat_penalty(&self) -> bool {
        self.repeat_penalty != 1.0
    }

    /// Whether any sampling filter beyond the temperature is switched on.
    pub fn uses_filters(&self) -> bool {
        self.top_k > 0
            || (self.top_p > 0.0 && self.top_p < 1.0)
            || self.min_p > 0.0
            || self.uses_repeat_penalty()
    }

    /// Rejects out-of-range values with [`Error::InvalidOption`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(Error::invalid_option("max_tokens", "must be at least 1"));
        }
        if self.reply_prefix.as_deref() == Some("") {
            return Err(Error::invalid_option("reply_prefix", "must not be empty"));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::invalid_option(
                "temperature",
                format!("must be finite and ≥ 0, got {}", self.temperature),
            ));
        }
        for (field, v) in [("top_p", self.top_p), ("min_p", self.min_p)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::invalid_option(
                    field,
                    format!("must be in [0, 1], got {v}"),
                ));
            }
        }
        // transformers refuses a penalty that is not strictly positive too.
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return Err(Error::invalid_option(
                "repeat_penalty",
                format!("must be finite and > 0, got {}", self.repeat_penalty),
            ));
        }
        if self.uses_repeat_penalty() && self.repeat_last_n == 0 {
            return Err(Error::invalid_option(
                "repeat_last_n",
                "must be at least 1 when repeat_penalty is on",
            ));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(Error::invalid_option(
                "stop_strings",
                "must not contain an empty string",
            ));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(Error::invalid_option(
                "top_logprobs",
                format!(
                    "must be at most {MAX_TOP_LOGPROBS}, got {}",
                    self.top_logprobs
                ),
            ));
        }
        if self.top_logprobs > 0 && !self.logprobs {
            return Err(Error::invalid_option(
                "top_logprobs",
                "needs logprobs to be on",
            ));
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::invalid_option(
                    field,
                    format!("must be in [-2, 2], got {v}"),
                ));
            }
        }
        if let Some((id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(*b))
        {
            return Err(Error::invalid_option(
                "logit_bias",
                format!("the bias of id {id} must be in [-100, 100], got {b}"),
            ));
        }
        Ok(())
    }
}

/// The dtype weights are converted to (or dequantised to) on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 16-bit brain float.
    BF16,
}

impl DType {
    /// The dtype's name (`float32`, `float16`, `bfloat16`).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }
}

impl std::str::FromStr for DType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => Err(Error::invalid_option(
                "dtype",
                format!("unknown dtype {other:?} (expected f32, f16 or bf16)"),
            )),
        }
    }
}

/// The element type of the KV cache (llama.cpp's `type_k` / `type_v`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum KvCacheType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 16-bit brain float.
    BF16,
    /// 8-bit blocks (GGML `q8_0`).
    Q8_0,
    /// 5-bit blocks with a minimum (GGML `q5_1`).
    Q5_1,
    /// 5-bit blocks (GGML `q5_0`).
    Q5_0,
    /// 4-bit blocks with a minimum (GGML `q4_1`).
    Q4_1,
    /// 4-bit blocks (GGML `q4_0`).
    Q4_0,
}

impl KvCacheType {
    /// The type's GGML name (`f32`, `q8_0`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            KvCacheType::F32 => "f32",
            KvCacheType::F16 => "f16",
            KvCacheType::BF16 => "bf16",
            KvCacheType::Q8_0 => "q8_0",
            KvCacheType::Q5_1 => "q5_1",
            KvCacheType::Q5_0 => "q5_0",
            KvCacheType::Q4_1 => "q4_1",
            KvCacheType::Q4_0 => "q4_0",
        }
    }

    /// Whether the type is a block-quantised one.
    pub fn is_quantised(self) -> bool {
        !matches!(
            self,
            KvCacheType::F32 | KvCacheType::F16 | KvCacheType::BF16
        )
    }
}

impl std::str::FromStr for KvCacheType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        const ALL: [KvCacheType; 8] = [
            KvCacheType::F32,
            KvCacheType::F16,
            KvCacheType::BF16,
            KvCacheType::Q8_0,
            KvCacheType::Q5_1,
            KvCacheType::Q5_0,
            KvCacheType::Q4_1,
            KvCacheType::Q4_0,
        ];
        let lower = s.to_ascii_lowercase();
        ALL.into_iter()
            .find(|t| t.as_str() == lower)
            .ok_or_else(|| {
                Error::invalid_option(
                    "kv_cache_type",
                    format!("unknown KV cache type {s:?} (expected f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0)"),
                )
            })
    }
}

impl std::fmt::Display for KvCacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Options of [`load_model`](crate::load_model).
///
/// Deserialising refuses unknown keys, so a misspelt option is an error rather
/// than a default silently used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LoadOptions {
    /// The backend to load with; `None` picks [`default_backend`](crate::default_backend).
    pub backend: Option<String>,
    /// Bound the KV memory to this many positions per layer: every cache
    /// keeps the first [`sink_tokens`](Self::sink_tokens) positions and the
    /// most recent `context_len − sink_tokens`, and generation goes on past
    /// `context_len` with each token attending those positions (a rotating
    /// cache, as mlx-lm's `--max-kv-size`). Layers with a sliding window of
    /// their own no longer than this keep it. Positions still count up, so a
    /// call ends at the model's `max_position_embeddings` unless
    /// [`allow_past_max_positions`](Self::allow_past_max_positions). `None`
    /// (the default) keeps every position up to `max_position_embeddings`.
    /// Must not exceed `max_position_embeddings` (unless allowed past it).
    pub context_len: Option<usize>,
    /// Attention sinks: with [`context_len`](Self::context_len), how many
    /// leading positions a rotating cache never drops (after StreamingLLM;
    /// mlx-lm keeps 4). Default 4; must be below `context_len`; 0 keeps the
    /// most recent positions alone.
    pub sink_tokens: usize,
    /// Let positions pass the model's `max_position_embeddings` (with a
    /// rotating cache, or a `context_len` above it); a warning is logged at
    /// load. RoPE extrapolates there, and quality usually falls. Default
    /// false: a call that reaches the limit ends with
    /// [`FinishReason::Length`](crate::FinishReason::Length).
    pub allow_past_max_positions: bool,
    /// Layers to place on the GPU: −1 (the default) is the backend's default
    /// device (the GPU where there is one), 0 is the CPU. Other values are
    /// refused with [`Error::Unsupported`] by backends that cannot split a model.
    pub gpu_layers: i32,
    /// Generations a model may decode at once (its batch size): calls
    /// beyond it wait, first come first served. `None` (the default) is the
    /// backend's choice: the MLX backend batches up to
    /// [`DEFAULT_PARALLEL_SLOTS`](Self::DEFAULT_PARALLEL_SLOTS) calls as they
    /// come (continuous batching); a backend that runs one call at a time
    /// refuses values above 1.
    pub parallel_slots: Option<usize>,
    /// A budget for the KV caches of the calls running at once, in bytes:
    /// calls wait for room to start, and when running calls outgrow it the
    /// newest are paused (their caches dropped, recomputed when they
    /// resume); a call that alone outgrows it ends with
    /// [`Error::MemoryBudget`]. `None` (the default): no budget.
    pub kv_budget_bytes: Option<u64>,
    /// Calls that may wait for a slot; one more is refused at once with
    /// [`Error::Busy`]. `None` (the default): no limit.
    pub max_queue: Option<usize>,
    /// How long a call may wait for a slot before it ends with
    /// [`Error::Timeout`]. `None` (the default): as long as it takes.
    pub queue_timeout: Option<std::time::Duration>,
    /// Bytes of KV caches kept from finished calls, so that a later prompt
    /// sharing a prefix with an earlier one (a system prompt, a growing
    /// conversation) prefills only the rest. `None` (the default) is the
    /// backend's choice; `Some(0)` keeps nothing.
    pub prompt_cache_bytes: Option<u64>,
    /// A LoRA adapter to apply on load.
    pub adapter_path: Option<PathBuf>,
    /// The dtype to compute in; `None` keeps the checkpoint's.
    pub dtype: Option<DType>,
    /// Limit on the device memory the backend may allocate, in bytes.
    pub memory_limit_bytes: Option<u64>,
    /// Limit on the backend's buffer cache, in bytes.
    pub cache_limit_bytes: Option<u64>,
    /// Limit on wired (resident) memory, in bytes, where the platform has one.
    pub wired_limit_bytes: Option<u64>,
    /// CPU threads for the forward passes; `None` (the default) uses every
    /// core. Backends that do not choose their thread count refuse it.
    pub threads: Option<usize>,
    /// The KV cache's element type; `None` (the default) is the backend's
    /// (llama.cpp: f16). Backends that cannot choose it refuse it.
    pub kv_cache_type: Option<KvCacheType>,
    /// Fused (flash) attention: `Some(true)` on, `Some(false)` off, `None`
    /// (the default) the backend decides. Backends without the choice
    /// refuse `Some`.
    pub flash_attention: Option<bool>,
    /// Map the weights file into memory (the default) rather than reading
    /// it; backends that always map refuse `false`.
    pub mmap: bool,
    /// Run tensor-parallel over the distributed group of this communication
    /// backend (`any`, `ring`, `mpi`, `nccl` or `jaccl`, MLX's names): each
    /// process of the group (a *rank*) loads its share of every layer's
    /// heads and MLP units and the ranks sum their partial results, so a
    /// model too large for one machine or GPU runs on several. The group
    /// comes from the environment the launcher sets (`MLX_RANK`,
    /// `MLX_HOSTFILE`, …; see `infer launch`); a group of one runs as
    /// usual. Every rank must load the same model with the same options and
    /// make the same calls, one at a time. `None` (the default): one
    /// process. Backends without it refuse `Some`.
    pub tensor_parallel: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            backend: None,
            context_len: None,
            sink_tokens: Self::DEFAULT_SINK_TOKENS,
            allow_past_max_positions: false,
            gpu_layers: -1,
            parallel_slots: None,
            kv_budget_bytes: None,
            max_queue: None,
            queue_timeout: None,
            prompt_cache_bytes: None,
            adapter_path: None,
            dtype: None,
            memory_limit_bytes: None,
            cache_limit_bytes: None,
            wired_limit_bytes: None,
            threads: None,
            kv_cache_type: None,
            flash_attention: None,
            mmap: true,
            tensor_parallel: None,
        }
    }
}

impl LoadOptions {
    /// Attention sinks a rotating cache keeps by default (as mlx-lm).
    pub const DEFAULT_SINK_TOKENS: usize = 4;

    /// The batch size of a backend that batches calls, unless
    /// [`parallel_slots`](Self::parallel_slots) says otherwise (mlx-lm's
    /// `BatchGenerator` decodes 32 at once by default too).
    pub const DEFAULT_PARALLEL_SLOTS: usize = 32;

    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`sink_tokens`](Self::sink_tokens).
    pub fn sink_tokens(mut self, n: usize) -> Self {
        self.sink_tokens = n;
        self
    }

    /// Sets [`allow_past_max_positions`](Self::allow_past_max_positions).
    pub fn allow_past_max_positions(mut self, yes: bool) -> Self {
        self.allow_past_max_positions = yes;
        self
    }

    /// Sets [`backend`](Self::backend).
    pub fn backend(mut self, name: impl Into<String>) -> Self {
        self.backend = Some(name.into());
        self
    }

    /// Sets [`context_len`](Self::context_len).
    pub fn context_len(mut self, n: usize) -> Self {
        self.context_len = Some(n);
        self
    }

    /// Sets [`gpu_layers`](Self::gpu_layers).
    pub fn gpu_layers(mut self, n: i32) -> Self {
        self.gpu_layers = n;
        self
    }

    /// The communication backends [`tensor_parallel`](Self::tensor_parallel)
    /// takes (MLX distributed's names; `any` lets MLX pick).
    pub const TENSOR_PARALLEL_BACKENDS: &'static [&'static str] =
        &["any", "ring", "mpi", "nccl", "jaccl"];

    /// Sets [`tensor_parallel`](Self::tensor_parallel).
    pub fn tensor_parallel(mut self, backend: impl Into<String>) -> Self {
        self.tensor_parallel = Some(backend.into());
        self
    }

    /// Sets [`parallel_slots`](Self::parallel_slots).
    pub fn parallel_slots(mut self, n: usize) -> Self {
        self.parallel_slots = Some(n);
        self
    }

    /// Sets [`kv_budget_bytes`](Self::kv_budget_bytes).
    pub fn kv_budget_bytes(mut self, bytes: u64) -> Self {
        self.kv_budget_bytes = Some(bytes);
        self
    }

    /// Sets [`max_queue`](Self::max_queue).
    pub fn max_queue(mut self, n: usize) -> Self {
        self.max_queue = Some(n);
        self
    }

    /// Sets [`queue_timeout`](Self::queue_timeout).
    pub fn queue_timeout(mut self, wait: std::time::Duration) -> Self {
        self.queue_timeout = Some(wait);
        self
    }

    /// Sets [`prompt_cache_bytes`](Self::prompt_cache_bytes).
    pub fn prompt_cache_bytes(mut self, bytes: u64) -> Self {
        self.prompt_cache_bytes = Some(bytes);
        self
    }

    /// Sets [`adapter_path`](Self::adapter_path).
    pub fn adapter_path(mut self, path: impl AsRef<Path>) -> Self {
        self.adapter_path = Some(path.as_ref().to_path_buf());
        self
    }

    /// Sets [`dtype`](Self::dtype).
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Sets [`memory_limit_bytes`](Self::memory_limit_bytes).
    pub fn memory_limit_bytes(mut self, bytes: u64) -> Self {
        self.memory_limit_bytes = Some(bytes);
        self
    }

    /// Sets [`cache_limit_bytes`](Self::cache_limit_bytes).
    pub fn cache_limit_bytes(mut self, bytes: u64) -> Self {
        self.cache_limit_bytes = Some(bytes);
        self
    }

    /// Sets [`wired_limit_bytes`](Self::wired_limit_bytes).
    pub fn wired_limit_bytes(mut self, bytes: u64) -> Self {
        self.wired_limit_bytes = Some(bytes);
        self
    }

    /// Sets [`threads`](Self::threads).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = Some(n);
        self
    }

    /// Sets [`kv_cache_type`](Self::kv_cache_type).
    pub fn kv_cache_type(mut self, t: KvCacheType) -> Self {
        self.kv_cache_type = Some(t);
        self
    }

    /// Sets [`flash_attention`](Self::flash_attention).
    pub fn flash_attention(mut self, on: bool) -> Self {
        self.flash_attention = Some(on);
        self
    }

    /// Sets [`mmap`](Self::mmap).
    pub fn mmap(mut self, yes: bool) -> Self {
        self.mmap = yes;
        self
    }

    /// Rejects out-of-range values with [`Error::InvalidOption`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if let Some(name) = &self.backend {
            if name.trim().is_empty() {
                return Err(Error::invalid_option("backend", "must not be empty"));
            }
        }
        if self.context_len == Some(0) {
            return Err(Error::invalid_option("context_len", "must be at least 1"));
        }
        if let Some(n) = self.context_len {
            if self.sink_tokens >= n {
                return Err(Error::invalid_option(
                    "sink_tokens",
                    format!(
                        "must be below context_len ({n}) so that recent positions fit, got {}",
                        self.sink_tokens
                    ),
                ));
            }
        }
        if self.gpu_layers < -1 {
            return Err(Error::invalid_option(
                "gpu_layers",
                format!(
                    "must be −1 (default device), 0 (CPU) or a layer count, got {}",
                    self.gpu_layers
                ),
            ));
        }
        if self.parallel_slots == Some(0) {
            return Err(Error::invalid_option(
                "parallel_slots",
                "must be at least 1",
            ));
        }
        if self.kv_budget_bytes == Some(0) {
            return Err(Error::invalid_option(
                "kv_budget_bytes",
                "must be more than 0",
            ));
        }
        if self.queue_timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::invalid_option(
                "queue_timeout",
                "must be more than 0",
            ));
        }
        if self.threads == Some(0) {
            return Err(Error::invalid_option("threads", "must be at least 1"));
        }
        if let Some(b) = &self.tensor_parallel {
            if !Self::TENSOR_PARALLEL_BACKENDS.contains(&b.as_str()) {
                return Err(Error::invalid_option(
                    "tensor_parallel",
                    format!(
                        "must be one of {}, got {b:?}",
                        Self::TENSOR_PARALLEL_BACKENDS.join(", ")
                    ),
                ));
            }
        }
        if self.memory_limit_bytes == Some(0) {
            return Err(Error::invalid_option(
                "memory_limit_bytes",
                "must be more than 0",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: Error) -> &'static str {
        match e {
            Error::InvalidOption { field, .. } => field,
            other => panic!("expected InvalidOption, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_go_inference() {
        let g = GenerateOptions::default();
        assert_eq!(g.max_tokens, 256);
        assert_eq!(g.temperature, 0.0);
        assert_eq!((g.top_k, g.top_p, g.min_p), (0, 0.0, 0.0));
        assert_eq!((g.repeat_penalty, g.repeat_last_n), (1.0, 64));
        assert!(g.is_greedy() && !g.uses_filters());
        assert!(g.validate().is_ok());
        let l = LoadOptions::default();
        assert_eq!(l.gpu_layers, -1);
        assert_eq!(l.parallel_slots, None);
        assert!(l.validate().is_ok());
    }

    #[test]
    fn generate_validation_names_the_field() {
        let cases: Vec<(GenerateOptions, &str)> = vec![
            (GenerateOptions::new().max_tokens(0), "max_tokens"),
            (GenerateOptions::new().temperature(-0.1), "temperature"),
            (GenerateOptions::new().temperature(f32::NAN), "temperature"),
            (GenerateOptions::new().top_p(1.5), "top_p"),
            (GenerateOptions::new().top_p(-0.5), "top_p"),
            (GenerateOptions::new().min_p(2.0), "min_p"),
            (
                GenerateOptions::new().repeat_penalty(-1.0),
                "repeat_penalty",
            ),
            (GenerateOptions::new().repeat_penalty(0.0), "repeat_penalty"),
            (
                GenerateOptions::new().repeat_penalty(0.5).repeat_last_n(0),
                "repeat_last_n",
            ),
            (
                GenerateOptions::new().repeat_penalty(1.2).repeat_last_n(0),
                "repeat_last_n",
            ),
            (GenerateOptions::new().stop_string(""), "stop_strings"),
        ];
        for (opts, field) in cases {
            assert_eq!(field_of(opts.validate().unwrap_err()), field, "{opts:?}");
        }
        let ok = GenerateOptions::new()
            .temperature(0.7)
            .top_p(1.0)
            .top_k(40)
            .min_p(0.05)
            .repeat_penalty(1.1);
        assert!(ok.validate().is_ok());
        assert!(ok.uses_filters());
    }

    #[test]
    fn load_validation_names_the_field() {
        let cases: Vec<(LoadOptions, &str)> = vec![
            (LoadOptions::new().context_len(0), "context_len"),
            (LoadOptions::new().context_len(4), "sink_tokens"),
            (
                LoadOptions::new().context_len(8).sink_tokens(8),
                "sink_tokens",
            ),
            (LoadOptions::new().gpu_layers(-2), "gpu_layers"),
            (LoadOptions::new().parallel_slots(0), "parallel_slots"),
            (LoadOptions::new().backend(" "), "backend"),
            (
                LoadOptions::new().memory_limit_bytes(0),
                "memory_limit_bytes",
            ),
        ];
        for (opts, field) in cases {
            assert_eq!(field_of(opts.validate().unwrap_err()), field, "{opts:?}");
        }
        assert!(LoadOptions::new()
            .gpu_layers(0)
            .context_len(4096)
            .validate()
            .is_ok());
    }

    #[test]
    fn dtype_parses() {
        assert_eq!("bf16".parse::<DType>().unwrap(), DType::BF16);
        assert_eq!("Float32".parse::<DType>().unwrap(), DType::F32);
        assert_eq!(field_of("int8".parse::<DType>().unwrap_err()), "dtype");
    }

    #[test]
    fn a_penalty_below_one_is_on() {
        let o = GenerateOptions::new().repeat_penalty(0.8);
        assert!(o.uses_repeat_penalty() && o.uses_filters());
        assert!(o.validate().is_ok());
        assert!(!GenerateOptions::new().uses_repeat_penalty());
    }

    #[test]
    fn misspelt_keys_do_not_deserialise() {
        let e = serde_json::from_str::<GenerateOptions>(r#"{"max_token": 3}"#).unwrap_err();
        assert!(e.to_string().contains("max_token"), "{e}");
        let e = serde_json::from_str::<LoadOptions>(r#"{"context_length": 3}"#).unwrap_err();
        assert!(e.to_string().contains("context_length"), "{e}");
        let ok: GenerateOptions = serde_json::from_str(r#"{"max_tokens": 3}"#).unwrap();
        assert_eq!(ok.max_tokens, 3);
        let ok: LoadOptions = serde_json::from_str(r#"{"sink_tokens": 0}"#).unwrap();
        assert_eq!((ok.sink_tokens, ok.gpu_layers), (0, -1));
    }

    #[test]
    fn serde_round_trip() {
        let g = GenerateOptions::new()
            .seed(7)
            .template_arg("enable_thinking", false);
        let back: GenerateOptions =
            serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(g, back);
    }
}
