//! The llama.cpp backend on the real SmolLM2-135M-Instruct Q4_1 GGUF and
//! Gemma 3 270M Q4_K_M GGUF (`cargo xtask fetch-models` puts them under
//! `.cache/models`), and beside the MLX backend on the same file (one test
//! binary: each links llama.cpp and MLX, and linking is slow).

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

mod common;

use backend_llamacpp::LlamaCppModel;
use common::TRICKY;
use inference_core::conformance::{assert_conformance, ConformanceConfig};
use inference_core::{
    Backend, Error, FinishReason, GenerateOptions, KvCacheType, LoadOptions, Message, TextModel,
    TokenId,
};

/// One test at a time: each llama.cpp context runs on every core, and two
/// at once on a small machine take many times as long.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn model_file(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache/models")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask fetch-models`",
        path.display()
    );
    path
}

fn smollm2() -> PathBuf {
    model_file("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn gemma3() -> PathBuf {
    model_file("gemma-3-270m-q4_k_m.gguf")
}

fn load_with(opts: &LoadOptions) -> LlamaCppModel {
    LlamaCppModel::load(&smollm2(), opts).unwrap()
}

fn load() -> LlamaCppModel {
    load_with(&LoadOptions::new())
}

fn ids(model: &dyn TextModel, prompt: &str, opts: &GenerateOptions) -> Vec<TokenId> {
    model
        .generate(prompt, opts)
        .unwrap()
        .collect_tokens()
        .unwrap()
        .iter()
        .map(|t| t.id)
        .collect()
}

const PROMPT: &str = "The capital of France is";

#[test]
fn passes_the_conformance_kit() {
    let _one = one_at_a_time();
    let model = load();
    assert_conformance(
        &model,
        &ConformanceConfig::default()
            .prompts(PROMPT, "def add(a, b):")
            .token_counts(8, 200),
    );
}

#[test]
fn answers_a_chat_greedily_and_reports_what_it_is() {
    let _one = one_at_a_time();
    let model = load();
    let info = model.info();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.vocab_size, 49_152);
    assert_eq!(info.num_layers, 30);
    assert_eq!(info.stored_dtype, "Q4_1");
    assert!(info.chat_template);
    let opts = GenerateOptions::new().max_tokens(24);
    let messages = [Message::user("What is the capital of France?")];
    let mut stream = model.chat(&messages, &opts).unwrap();
    let text = stream.collect_text().unwrap();
    assert!(!text.trim().is_empty(), "{text:?}");
    assert!(matches!(
        stream.finish_reason(),
        Some(FinishReason::Stop | FinishReason::Length)
    ));
    // Greedy decoding repeats itself.
    let again = model
        .chat(&messages, &opts)
        .unwrap()
        .collect_text()
        .unwrap();
    assert_eq!(text, again);
    // The prompt it ran is the one our tokenizer renders (as the MLX
    // backend's).
    let tok = model.tokenizer().unwrap();
    let ids = tok
        .encode_chat(&messages, &inference_core::RenderOptions::new())
        .unwrap();
    assert_eq!(stream.prompt_ids(), Some(&ids[..]));
}

#[test]
fn sampling_penalties_and_bias_change_what_is_drawn() {
    let _one = one_at_a_time();
    let model = load();
    let greedy = GenerateOptions::new().max_tokens(24).ignore_eos(true);
    let plain = ids(&model, PROMPT, &greedy);
    // A bias of 100 makes one id win every step.
    let forced = ids(&model, PROMPT, &greedy.clone().logit_bias(1000, 100.0));
    assert!(forced.iter().all(|&id| id == 1000), "{forced:?}");
    // The penalties push greedy decoding off its path, and still decode
    // the same way twice.
    for opts in [
        greedy.clone().frequency_penalty(2.0),
        greedy.clone().presence_penalty(2.0),
        greedy.clone().repeat_penalty(1.5),
    ] {
        let a = ids(&model, PROMPT, &opts);
        assert_ne!(a, plain, "{opts:?}");
        assert_eq!(a, ids(&model, PROMPT, &opts), "{opts:?}");
    }
    // With a frequency penalty of 2 no id comes back more than a few times.
    let penalised = ids(&model, PROMPT, &greedy.clone().frequency_penalty(2.0));
    let most = penalised
        .iter()
        .map(|id| penalised.iter().filter(|&x| x == id).count())
        .max()
        .unwrap();
    let plain_most = plain
        .iter()
        .map(|id| plain.iter().filter(|&x| x == id).count())
        .max()
        .unwrap();
    assert!(most < plain_most, "penalised {most}, plain {plain_most}");
    // Seeds: the same seed repeats, another seed parts; top-k 1 is greedy.
    let sampled = greedy.clone().temperature(1.0).top_p(0.95).min_p(0.01);
    let a = ids(&model, PROMPT, &sampled.clone().seed(1));
    assert_eq!(a, ids(&model, PROMPT, &sampled.clone().seed(1)));
    assert_ne!(a, ids(&model, PROMPT, &sampled.clone().seed(2)));
    let k1 = greedy.clone().temperature(0.8).top_k(1).seed(5);
    assert_eq!(ids(&model, PROMPT, &k1), plain);
}

#[test]
fn prompt_logprobs_agree_with_the_logprob_of_a_generated_token() {
    let _one = one_at_a_time();
    let model = load();
    let opts = GenerateOptions::new().max_tokens(1).logprobs(3);
    let mut stream = model.generate(PROMPT, &opts).unwrap();
    let first = stream.collect_tokens().unwrap().remove(0);
    let prompt = stream.prompt_ids().unwrap().to_vec();
    let lp = first.logprobs.unwrap();
    assert_eq!(lp.top[0].0, first.id, "greedy takes the most likely id");
    assert!(lp.logprob <= 0.0 && (lp.logprob - lp.top[0].1).abs() < 1e-6);
    // The prompt followed by that token, scored position by position.
    let tok = model.tokenizer().unwrap();
    let text = tok
        .decode(&[prompt.clone(), vec![first.id]].concat(), false)
        .unwrap();
    let mut scored = model
        .generate(
            &text,
            &GenerateOptions::new().max_tokens(1).prompt_logprobs(true),
        )
        .unwrap();
    scored.collect_tokens().unwrap();
    let ids = scored.prompt_ids().unwrap().to_vec();
    assert_eq!(ids, [&prompt[..], &[first.id]].concat(), "{text:?}");
    let lps = scored.prompt_logprobs().unwrap();
    assert_eq!(lps.len(), ids.len() - 1);
    assert!(lps.iter().all(|&x| x <= 0.0 && x.is_finite()), "{lps:?}");
    let last = lps[lps.len() - 1];
    assert!(
        (last - lp.logprob).abs() < 1e-2,
        "scored {last}, generated {}",
        lp.logprob
    );
}

#[test]
fn batches_larger_than_a_group_keep_their_order() {
    let _one = one_at_a_time();
    let model = load();
    let opts = GenerateOptions::new().max_tokens(4).ignore_eos(true);
    let prompts: Vec<String> = (0..18).map(|i| format!("{i} plus {i} equals")).collect();
    let rows = model.batch_generate(&prompts, &opts).unwrap();
    assert_eq!(model.metrics().unwrap().generated_tokens, 18 * 4);
    assert_eq!(rows.len(), prompts.len());
    for (p, row) in prompts.iter().zip(&rows) {
        assert!(row.error.is_none(), "{:?}", row.error);
        assert_eq!(row.finish_reason, FinishReason::Length);
        let got: Vec<TokenId> = row.tokens.iter().map(|t| t.id).collect();
        assert_eq!(got, ids(&model, p, &opts), "{p}");
    }
}

#[test]
fn classify_returns_the_logits_it_picked_from() {
    let _one = one_at_a_time();
    let model = load();
    let opts = GenerateOptions::new().return_logits(true);
    let out = model
        .classify(&[PROMPT.to_owned(), "1, 2, 3,".to_owned()], &opts)
        .unwrap();
    for r in &out {
        let logits = r.logits.as_ref().unwrap();
        assert_eq!(logits.len(), 49_152);
        let best = logits
            .iter()
            .enumerate()
            .fold(0, |b, (i, &x)| if x > logits[b] { i } else { b });
        assert_eq!(best as TokenId, r.token.id);
    }
    assert!(matches!(
        model.generate(PROMPT, &opts),
        Err(Error::Unsupported { .. })
    ));
}

#[test]
fn sessions_reuse_the_cache_and_answer_as_a_fresh_chat() {
    let _one = one_at_a_time();
    let model = load();
    let opts = GenerateOptions::new().max_tokens(12);
    let mut session = model.chat_session().unwrap();
    let first = session
        .send("Name a colour.", &opts)
        .unwrap()
        .collect_text()
        .unwrap();
    assert_eq!(model.reused_tokens(), 0);
    let second = session
        .send("And another one?", &opts)
        .unwrap()
        .collect_text()
        .unwrap();
    assert!(
        model.reused_tokens() > 0,
        "the second turn prefilled in full"
    );
    let history = [
        Message::user("Name a colour."),
        Message::assistant(first),
        Message::user("And another one?"),
    ];
    let fresh = model.chat(&history, &opts).unwrap().collect_text().unwrap();
    assert_eq!(second, fresh);
    // Another call between turns leaves the session correct.
    ids(&model, PROMPT, &GenerateOptions::new().max_tokens(3));
    let third = session
        .send("Thanks!", &opts)
        .unwrap()
        .collect_text()
        .unwrap();
    let mut history = session.history();
    history.pop();
    history.pop();
    history.push(Message::user("Thanks!"));
    let fresh = model.chat(&history, &opts).unwrap().collect_text().unwrap();
    assert_eq!(third, fresh);
}

#[test]
fn load_options_are_honoured() {
    let _one = one_at_a_time();
    let greedy = GenerateOptions::new().max_tokens(12).ignore_eos(true);
    let reference = ids(&load(), PROMPT, &greedy);
    // One thread, no mapping, flash attention either way: the same ids.
    for opts in [
        LoadOptions::new().threads(1),
        LoadOptions::new().mmap(false),
        LoadOptions::new().flash_attention(false),
        LoadOptions::new().flash_attention(true),
    ] {
        assert_eq!(
            ids(&load_with(&opts), PROMPT, &greedy),
            reference,
            "{opts:?}"
        );
    }
    // A quantised KV cache still answers (its ids may part from f16's).
    let q8 = load_with(&LoadOptions::new().kv_cache_type(KvCacheType::Q8_0));
    assert_eq!(ids(&q8, PROMPT, &greedy).len(), 12);
}

#[test]
fn refuses_what_it_cannot_do() {
    let _one = one_at_a_time();
    for opts in [
        LoadOptions::new().context_len(256),
        LoadOptions::new().gpu_layers(10),
        LoadOptions::new().dtype(inference_core::DType::F32),
        LoadOptions::new().adapter_path("/tmp/adapter.gguf"),
        LoadOptions::new().parallel_slots(2),
        LoadOptions::new().memory_limit_bytes(1 << 30),
    ] {
        assert!(
            matches!(
                LlamaCppModel::load(&smollm2(), &opts),
                Err(Error::Unsupported { .. })
            ),
            "{opts:?}"
        );
    }
    let quantised_without_flash = LoadOptions::new()
        .kv_cache_type(KvCacheType::Q4_0)
        .flash_attention(false);
    assert!(matches!(
        LlamaCppModel::load(&smollm2(), &quantised_without_flash),
        Err(Error::InvalidOption {
            field: "kv_cache_type",
            ..
        })
    ));
    assert!(matches!(
        LlamaCppModel::load(&smollm2(), &LoadOptions::new().threads(0)),
        Err(Error::InvalidOption {
            field: "threads",
            ..
        })
    ));
    let model = load();
    let bad = [
        GenerateOptions::new().logit_bias(49_152, 1.0),
        GenerateOptions::new().template_arg("enable_thinking", false),
    ];
    assert!(matches!(
        model.generate(PROMPT, &bad[0]),
        Err(Error::InvalidOption { .. })
    ));
    assert!(matches!(
        model.generate(PROMPT, &bad[1]),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        model.batch_generate(
            &[PROMPT.into()],
            &GenerateOptions::new().prompt_logprobs(true)
        ),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        model.classify(&[PROMPT.into()], &GenerateOptions::new().logprobs(2)),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        model.batch_generate(&[String::new()], &GenerateOptions::new()),
        Err(Error::InvalidInput(_))
    ));
}

fn assert_tokenizers_agree(path: &std::path::Path) {
    let model = LlamaCppModel::load(path, &LoadOptions::new()).unwrap();
    let ours = model.tokenizer().unwrap();
    for text in TRICKY {
        let theirs = model.llama_tokenize(text, true).unwrap();
        assert_eq!(ours.encode(text, true).unwrap(), theirs, "{text:?}");
    }
}

#[test]
fn our_tokenizer_gives_llama_cpp_s_ids_on_smollm2() {
    let _one = one_at_a_time();
    assert_tokenizers_agree(&smollm2());
}

#[test]
fn our_tokenizer_gives_llama_cpp_s_ids_on_gemma3() {
    let _one = one_at_a_time();
    assert_tokenizers_agree(&gemma3());
}

#[test]
fn says_which_paths_it_loads_and_takes_gguf_from_mlx_on_the_cpu() {
    let _one = one_at_a_time();
    let b = backend_llamacpp::LlamaCppBackend;
    assert!(b.can_load(&smollm2()).is_yes());
    let tmp = std::env::temp_dir().join("llamacpp-not-gguf");
    std::fs::create_dir_all(&tmp).unwrap();
    assert!(!b.can_load(&tmp).is_yes());
    let junk = tmp.join("junk.gguf");
    std::fs::write(&junk, b"not gguf").unwrap();
    assert!(!b.can_load(&junk).is_yes());
    match LlamaCppModel::load(&junk, &LoadOptions::new()) {
        Err(Error::ModelLoad { .. }) => {}
        Err(other) => panic!("junk: {other:?}"),
        Ok(_) => panic!("junk loaded"),
    }
    assert_eq!(inference_core::get("llamacpp").unwrap().name(), "llamacpp");
    // Only this backend is linked here, so it is the one for GGUF files.
    assert_eq!(
        inference_core::backend_for(smollm2()).unwrap().name(),
        "llamacpp"
    );
}

mod agreement {
    //! Both backends on the same SmolLM2-135M-Instruct Q4_1 GGUF: at every step
    //! of the reference's greedy path, llama.cpp chooses the same id unless the
    //! reference's top-2 margin is small.
    //!
    //! The reference is the MLX backend on the CPU: it computes in f32 on the
    //! file's own 4-bit weights (repacked exactly), so its logits are those of
    //! the quantised model. llama.cpp also quantises the activations (to 8 bits,
    //! per block of 32) before each quantised matrix product, which moves logits
    //! by a few hundredths; where the two most likely tokens are that close the
    //! greedy paths may part, and after that they are different texts. The test
    //! therefore compares choices along one path (the reference's, each step
    //! given the same ids before it) and asserts that every different choice
    //! falls at such a near-tie.

    use super::{one_at_a_time, smollm2};
    use backend_llamacpp::LlamaCppModel;
    use backend_metal::{MlxModel, Placement};
    use inference_core::{GenerateOptions, LoadOptions, Message, TextModel, Token};

    /// The reference top-2 margin (nats) below which the backends may choose
    /// differently. Measured with 32 steps of six prompts (these four and two more): 11 of 192 choices
    /// differed, every one at a margin under 0.154 (`docs/architecture.md`).
    const NEAR_TIE: f32 = 0.25;

    const STEPS: usize = 12;

    /// About 40 s on a 2-core CPU (MLX's CPU path is the slow part), so
    /// CI leaves it out: `cargo test --workspace --features
    /// inference-core/conformance --test smollm2 -- --ignored agreement`.
    #[test]
    #[ignore = "the MLX reference takes ~40 s on a 2-core CPU; run with --ignored"]
    fn greedy_choices_agree_along_the_reference_path_but_at_near_ties() {
        let _one = one_at_a_time();
        // f32 activations: the reference, and MLX's fast path on the CPU.
        let f32 = LoadOptions::new().dtype(inference_core::DType::F32);
        let mlx = MlxModel::load(&smollm2(), &f32, Placement::Cpu).unwrap();
        let llama = LlamaCppModel::load(&smollm2(), &LoadOptions::new()).unwrap();
        let prompts = [
            "Write a haiku about the sea.",
            "List three prime numbers.",
            "Explain what a CPU does in one sentence.",
            "def fibonacci(n):",
        ];
        let one = GenerateOptions::new()
            .max_tokens(1)
            .ignore_eos(true)
            .logprobs(2);
        let (mut steps, mut parted, mut widest) = (0, 0, 0.0f32);
        for p in prompts {
            let messages = [Message::user(p)];
            let mut stream = mlx
                .chat(
                    &messages,
                    &GenerateOptions::new()
                        .max_tokens(STEPS)
                        .ignore_eos(true)
                        .logprobs(2),
                )
                .unwrap();
            let reference: Vec<Token> = stream.collect_tokens().unwrap();
            let prompt = stream.prompt_ids().unwrap().to_vec();
            // llama.cpp's greedy choice at each step of the reference's path
            // (teacher-forced: the same ids before it).
            for (i, r) in reference.iter().enumerate() {
                let mut ids = prompt.clone();
                ids.extend(reference[..i].iter().map(|t| t.id));
                let theirs = llama
                    .generate_ids(ids, &one)
                    .unwrap()
                    .collect_tokens()
                    .unwrap()
                    .remove(0);
                steps += 1;
                if theirs.id != r.id {
                    let top = &r.logprobs.as_ref().unwrap().top;
                    let margin = top[0].1 - top[1].1;
                    parted += 1;
                    widest = widest.max(margin);
                    eprintln!(
                        "{p:?} step {i}: MLX {} / llama.cpp {} at a reference margin of {margin:.4}",
                        r.id, theirs.id
                    );
                    assert!(
                        margin < NEAR_TIE,
                        "{p:?} step {i}: the backends choose differently where the reference margin is {margin}"
                    );
                }
            }
        }
        eprintln!("{parted} of {steps} steps chose differently; the widest reference margin among them {widest:.4}");
        assert!(parted * 4 <= steps, "{parted} of {steps} steps differ");
    }
}
