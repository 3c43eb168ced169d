//! Tensor parallelism over MLX distributed (ring backend, TCP) on this
//! machine's CPU: `infer launch -n 2` and ranks started by hand (on
//! localhost, and on two "hosts" made of network namespaces) give the
//! single process's greedy ids on the f32 fixture of every architecture (a
//! divergence excused only where the single process's top-2 margin is
//! below 1e-3, since `all_sum` reorders additions), the same sampled
//! tokens with a seed, typed errors for sizes that do not divide, and a
//! killed rank ends the other with an error within 30 seconds.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const INFER: &str = env!("CARGO_BIN_EXE_infer");
const PROMPT: &str = "The quick brown fox jumps over the lazy dog because";
const MARGIN: f64 = 1e-3;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// `infer generate --format json` with `args` on `model`, in one process.
fn generate_args(model: &Path, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "generate".into(),
        "--model".into(),
        model.display().to_string(),
        "--gpu-layers".into(),
        "0".into(),
        "--format".into(),
        "json".into(),
    ];
    v.extend(args.iter().map(|s| (*s).to_owned()));
    v
}

fn json_of(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn single(model: &Path, args: &[&str]) -> Value {
    let out = Command::new(INFER)
        .args(generate_args(model, args))
        .env_remove("MLX_RANK")
        .output()
        .unwrap();
    json_of(&out)
}

fn launched(ranks: usize, model: &Path, args: &[&str]) -> Output {
    Command::new(INFER)
        .args(["launch", "-n", &ranks.to_string(), "--"])
        .args(generate_args(model, args))
        .output()
        .unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v["ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no ids: {v}"))
        .iter()
        .map(|i| i.as_u64().unwrap())
        .collect()
}

/// The split run's ids equal the single run's, up to the first position
/// where the single run's top-2 margin is below [`MARGIN`] (where the two
/// may part; nothing after it is compared).
fn assert_same_greedy(what: &str, one: &Value, split: &Value) {
    let (a, b) = (ids(one), ids(split));
    let margins: Vec<f64> = one["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|lp| {
            let top = lp["top"].as_array().unwrap();
            top[0][1].as_f64().unwrap() - top[1][1].as_f64().unwrap()
        })
        .collect();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        if x != y {
            assert!(
                margins[i] < MARGIN,
                "{what}: token {i} differs ({x} vs {y}) at a margin of {}",
                margins[i]
            );
            eprintln!("{what}: parted at token {i}, a near-tie ({})", margins[i]);
            return;
        }
    }
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
}

/// A chat generation that runs until it is stopped.
fn endless() -> Vec<&'static str> {
    // The shared flags less `--raw` (the fixture's template renders the prompt).
    let mut flags = common::ENDLESS[1..].to_vec();
    flags.push(PROMPT);
    flags
}

const GREEDY: &[&str] = &[
    "--max-tokens",
    "24",
    "--ignore-eos",
    "--logprobs",
    "2",
    PROMPT,
];

#[test]
fn two_ranks_give_the_single_process_greedy_ids_on_every_architecture() {
    for name in ["qwen3-f32", "qwen2-f32", "llama-f32", "gemma3-f32"] {
        let model = fixture(name);
        let one = single(&model, GREEDY);
        let split = json_of(&launched(2, &model, GREEDY));
        assert_same_greedy(name, &one, &split);
        assert_eq!(split["finish_reason"], "length", "{name}: {split}");
    }
}

#[test]
fn two_ranks_sample_the_same_tokens_with_a_seed() {
    let model = fixture("qwen3-f32");
    let args = [
        "--max-tokens",
        "32",
        "--ignore-eos",
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--seed",
        "11",
        PROMPT,
    ];
    let one = single(&model, &args);
    let split = json_of(&launched(2, &model, &args));
    assert_eq!(ids(&one), ids(&split));
    // Sampling really happened: greedy picks other tokens.
    let greedy = single(&model, &["--max-tokens", "32", "--ignore-eos", PROMPT]);
    assert_ne!(ids(&one), ids(&greedy));
}

#[test]
fn sizes_that_do_not_divide_and_a_missing_group_are_typed_errors() {
    // 4 attention heads do not divide over 3 ranks.
    let out = launched(3, &fixture("qwen3-f32"), &["--max-tokens", "2", PROMPT]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("divide by 3"), "{stderr}");
    // The ring backend without its environment.
    let out = Command::new(INFER)
        .args(generate_args(
            &fixture("qwen3-f32"),
            &["--tensor-parallel", "ring", PROMPT],
        ))
        .env_remove("MLX_RANK")
        .env_remove("MLX_HOSTFILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no distributed backend started"),
        "{stderr}"
    );
    // An unknown backend is a usage error.
    let out = Command::new(INFER)
        .args(generate_args(
            &fixture("qwen3-f32"),
            &["--tensor-parallel", "tcp", PROMPT],
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn free_ports(n: usize) -> Vec<u16> {
    let l: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    l.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// A child process killed when dropped (a failed test leaves none behind).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `signal` (`-9`, `-INT`) to process `pid`.
fn signal(signal: &str, pid: u32) {
    assert!(Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// Waits for `child` to end within 30 s of `since` (`what` names what
/// would still run otherwise); its status and stderr.
fn ended_within_30s(
    child: &mut Reaped,
    since: Instant,
    what: &str,
) -> (std::process::ExitStatus, String) {
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "{what} still runs 30 s later"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

/// Ranks started by hand (MLX_RANK, MLX_HOSTFILE): rank 1 is killed once
/// rank 0 has streamed tokens; rank 0 ends with an error within 30 s —
/// MLX's ring reports the lost peer, or, where a collective was left
/// waiting inside MLX, the watchdog (its limit set to 10 s here) ends it.
#[test]
fn a_killed_rank_ends_the_other_with_an_error_within_30_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(2);
    let hostfile = dir.path().join("hosts.json");
    std::fs::write(
        &hostfile,
        format!(
            "[[\"127.0.0.1:{}\"], [\"127.0.0.1:{}\"]]",
            ports[0], ports[1]
        ),
    )
    .unwrap();
    let mut args = generate_args(&fixture("qwen3-f32"), &endless());
    // Streamed text, so that the test sees the answer arrive.
    args.retain(|a| a != "--format" && a != "json");
    let start = |rank: usize| {
        Command::new(INFER)
            .args(&args)
            .env("MLX_RANK", rank.to_string())
            .env("MLX_HOSTFILE", &hostfile)
            .env("INFER_DIST_TIMEOUT", "10")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut zero = Reaped(start(0));
    let mut one = Reaped(start(1));
    // Rank 0 prints; wait for some of its answer.
    let mut out = BufReader::new(zero.0.stdout.take().unwrap());
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < 64 && Instant::now() < deadline {
        let buf = out.fill_buf().unwrap();
        assert!(!buf.is_empty(), "rank 0 stopped printing early");
        got.extend_from_slice(buf);
        let n = buf.len();
        out.consume(n);
    }
    assert!(got.len() >= 64, "rank 0 printed too little");
    one.0.kill().unwrap();
    one.0.wait().unwrap();
    let killed = Instant::now();
    // Drain rank 0's output so that it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let (status, stderr) = ended_within_30s(&mut zero, killed, "rank 0 (its peer died)");
    assert!(
        !status.success(),
        "rank 0 succeeded without its peer: {stderr}"
    );
    assert!(stderr.contains("error"), "{stderr}");
    eprintln!(
        "rank 0 ended {:.1} s after its peer: {}",
        killed.elapsed().as_secs_f64(),
        stderr.lines().last().unwrap_or_default()
    );
}

/// Runs `cmd` (`ip …`), true when it worked.
fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Two network namespaces joined by a veth pair: two hosts, 10.201.0.1
/// and .2, each reaching the other only over that link.
struct Hosts {
    names: [String; 2],
}

impl Hosts {
    fn new() -> Option<Hosts> {
        let id = std::process::id();
        let names = [format!("infer-tp-a-{id}"), format!("infer-tp-b-{id}")];
        let hosts = Hosts { names };
        let [a, b] = &hosts.names;
        let (va, vb) = (
            format!("vtpa{}", id % 100_000),
            format!("vtpb{}", id % 100_000),
        );
        let ok = ip(&["netns", "add", a])
            && ip(&["netns", "add", b])
            && ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])
            && ip(&["link", "set", &va, "netns", a])
            && ip(&["link", "set", &vb, "netns", b])
            && ip(&["-n", a, "addr", "add", "10.201.0.1/24", "dev", &va])
            && ip(&["-n", b, "addr", "add", "10.201.0.2/24", "dev", &vb])
            && ip(&["-n", a, "link", "set", &va, "up"])
            && ip(&["-n", b, "link", "set", &vb, "up"])
            && ip(&["-n", a, "link", "set", "lo", "up"])
            && ip(&["-n", b, "link", "set", "lo", "up"]);
        ok.then_some(hosts)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.names {
            ip(&["netns", "del", n]);
        }
    }
}

#[test]
fn two_ranks_on_two_network_namespaces_give_the_single_process_ids() {
    let Some(hosts) = Hosts::new() else {
        eprintln!("skipped: cannot make network namespaces here (needs root and iproute2)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hosts.json");
    std::fs::write(&hostfile, r#"[["10.201.0.1:5821"], ["10.201.0.2:5821"]]"#).unwrap();
    for name in ["qwen3-f32", "gemma3-f32"] {
        let model = fixture(name);
        let one = single(&model, GREEDY);
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                Command::new("ip")
                    .args(["netns", "exec", &hosts.names[rank], INFER])
                    .args(generate_args(&model, GREEDY))
                    .env("MLX_RANK", rank.to_string())
                    .env("MLX_HOSTFILE", &hostfile)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<Output> = ranks
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let split = json_of(&outs[0]);
        assert_same_greedy(name, &one, &split);
        // Rank 1 computed alongside but printed nothing.
        assert!(
            outs[1].status.success(),
            "{}",
            String::from_utf8_lossy(&outs[1].stderr)
        );
        assert!(outs[1].stdout.is_empty());
    }
}

/// Under `infer launch`, a rank that dies takes the run down: the launcher
/// stops the others and exits with an error.
#[test]
fn the_launcher_stops_the_run_when_a_rank_dies() {
    let mut launch = Reaped(
        Command::new(INFER)
            .args(["launch", "-n", "2", "--"])
            .args(generate_args(&fixture("qwen3-f32"), &endless()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Find rank 1 (a child of the launcher with MLX_RANK=1) once it runs.
    let launcher = launch.0.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let rank1 = loop {
        let found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid: u32 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let rank1 = env.split(|b| *b == 0).any(|v| v == b"MLX_RANK=1");
            (ppid == launcher && rank1).then_some(pid)
        });
        if let Some(pid) = found {
            break pid;
        }
        assert!(Instant::now() < deadline, "rank 1 never started");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Let it generate, then kill it.
    std::thread::sleep(Duration::from_secs(2));
    signal("-9", rank1);
    let (status, stderr) = ended_within_30s(&mut launch, Instant::now(), "the launcher");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rank 1 failed"), "{stderr}");
}

/// The Qwen3 fixture quantised as mlx-community does (every matrix but the
/// norms, affine, 4 bits, groups of `group`), written to a new directory.
fn quantised_fixture(group: i32) -> tempfile::TempDir {
    use backend_metal::mlx_rs::ops::quantize;
    use backend_metal::mlx_rs::Array;

    let src = fixture("qwen3-f32");
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&src).unwrap().flatten() {
        let name = f.file_name();
        if name != "model.safetensors" {
            std::fs::copy(f.path(), dir.path().join(&name)).unwrap();
        }
    }
    let tensors = Array::load_safetensors(src.join("model.safetensors")).unwrap();
    let mut out = std::collections::HashMap::new();
    for (name, a) in tensors {
        match name.strip_suffix(".weight").filter(|_| a.ndim() == 2) {
            Some(prefix) => {
                let (w, s, b) = quantize(&a, group, 4).unwrap();
                out.insert(name.clone(), w);
                out.insert(format!("{prefix}.scales"), s);
                out.insert(format!("{prefix}.biases"), b);
            }
            None => {
                out.insert(name, a);
            }
        }
    }
    Array::save_safetensors(out, None, dir.path().join("model.safetensors")).unwrap();
    let config_path = dir.path().join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["quantization"] = serde_json::json!({"group_size": group, "bits": 4});
    std::fs::write(&config_path, config.to_string()).unwrap();
    dir
}

#[test]
fn quantised_models_split_their_packed_weights_or_say_why_not() {
    // o_proj's 64 inputs and down_proj's 128 split into 32 and 64 per rank:
    // whole groups of 32.
    let q32 = quantised_fixture(32);
    let one = single(q32.path(), GREEDY);
    let split = json_of(&launched(2, q32.path(), GREEDY));
    assert_same_greedy("qwen3 4-bit", &one, &split);
    // Groups of 64 would cut o_proj's groups in half.
    let q64 = quantised_fixture(64);
    let out = launched(2, q64.path(), &["--max-tokens", "2", PROMPT]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("o_proj.") && stderr.contains("group size"),
        "{stderr}"
    );
}

/// `infer serve` (or its `launch`ed ranks) on a free port; its base URL
/// once `/health` answers.
fn serve(cmd: &mut Command, port: u16) -> (Reaped, String) {
    let child = Reaped(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.get(format!("{base}/health")).send().is_err() {
        assert!(Instant::now() < deadline, "the server never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, base)
}

fn ask(base: &str, body: &Value) -> Value {
    let r = reqwest::blocking::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().unwrap();
    assert_eq!(status, 200, "{v}");
    v
}

/// A tensor-parallel server answers as one process does; a client that goes
/// away mid-stream ends its call on every rank at the same step (the next
/// answers are still right, so the ranks stayed in step); Ctrl-C stops the
/// ranks together.
#[test]
fn a_tensor_parallel_server_keeps_its_ranks_in_step() {
    let model = fixture("qwen3-f32");
    let args = |port: u16| {
        vec![
            "serve".to_owned(),
            "--model".into(),
            model.display().to_string(),
            "--gpu-layers".into(),
            "0".into(),
            "--port".into(),
            port.to_string(),
        ]
    };
    let ports = free_ports(2);
    let (_one, single) = serve(
        Command::new(INFER)
            .args(args(ports[0]))
            .env_remove("MLX_RANK"),
        ports[0],
    );
    let (mut launch, split) = serve(
        Command::new(INFER)
            .args(["launch", "-n", "2", "--"])
            .args(args(ports[1])),
        ports[1],
    );
    let body = |words: &str, max: u32| {
        serde_json::json!({
            "model": "m",
            "messages": [{"role": "user", "content": words}],
            "max_tokens": max,
            "temperature": 0,
        })
    };
    let first = body(PROMPT, 16);
    let want = ask(&single, &first)["choices"][0]["message"].clone();
    assert_eq!(ask(&split, &first)["choices"][0]["message"], want);

    // A streamed answer whose client leaves after its first chunk.
    let mut stream = body("Tell me a long story about the sea", 400);
    stream["stream"] = serde_json::json!(true);
    let mut r = reqwest::blocking::Client::new()
        .post(format!("{split}/v1/chat/completions"))
        .json(&stream)
        .send()
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(std::io::Read::read(&mut r, &mut buf).unwrap() > 0);
    drop(r);
    // The ranks are still in step: the same answers again.
    for _ in 0..2 {
        assert_eq!(ask(&split, &first)["choices"][0]["message"], want);
    }
    let other = body("What is the capital of France?", 12);
    assert_eq!(
        ask(&split, &other)["choices"][0]["message"],
        ask(&single, &other)["choices"][0]["message"]
    );

    // Ctrl-C to the launcher: rank 0 stops serving, the other follows it.
    let stopped = Instant::now();
    signal("-INT", launch.0.id());
    let (status, stderr) = ended_within_30s(&mut launch, stopped, "a rank");
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(
        !stderr.contains("stopping rank"),
        "a rank had to be killed: {stderr}"
    );
    assert!(!stderr.contains("error"), "{stderr}");
}

/// Runs `cmd` with `input` on its stdin; its output.
fn with_stdin(cmd: &mut Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// `infer chat` under `infer launch`: rank 0 reads the conversation (the
/// whole of it goes to `chat` each turn, as sessions are refused under
/// tensor parallelism) and answers as one process does.
#[test]
fn a_tensor_parallel_chat_answers_as_one_process() {
    let model = fixture("qwen3-f32");
    let args = [
        "chat".to_owned(),
        "--model".into(),
        model.display().to_string(),
        "--gpu-layers".into(),
        "0".into(),
        "--max-tokens".into(),
        "8".into(),
        "-q".into(),
    ];
    let input = "Hello there\nWhat is the capital of France?\n/quit\n";
    let run = |cmd: &mut Command| {
        let out = with_stdin(cmd, input);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let one = run(Command::new(INFER).args(&args).env_remove("MLX_RANK"));
    let split = run(Command::new(INFER)
        .args(["launch", "-n", "2", "--"])
        .args(&args));
    assert!(!one.trim().is_empty());
    assert_eq!(split, one);
}

/// A prompt piped to `infer launch` reaches rank 0 (the others follow it
/// and read nothing).
#[test]
fn a_piped_prompt_goes_to_rank_0() {
    let model = fixture("qwen3-f32");
    let args = generate_args(&model, &["--max-tokens", "6", "--ignore-eos"]);
    let run = |cmd: &mut Command| json_of(&with_stdin(cmd, PROMPT));
    let one = run(Command::new(INFER).args(&args).env_remove("MLX_RANK"));
    let split = run(Command::new(INFER)
        .args(["launch", "-n", "2", "--"])
        .args(&args));
    assert_eq!(ids(&split), ids(&one));
}
