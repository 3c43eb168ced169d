//! `infer launch`: starts the ranks of a tensor-parallel run, as `mlx.launch`
//! does, each one `infer` with the environment MLX distributed reads, and
//! watches them: rank 0's output is the run's output, and when one rank
//! fails the others are stopped within a bounded time.

use std::io::{self, BufRead, BufReader, IsTerminal};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Deserialize;

use crate::error::{CliError, EXIT_INTERRUPTED, EXIT_RUNTIME};

/// How long the other ranks get to end on their own once one failed (a
/// lost peer usually ends theirs at once) before they are killed.
const GRACE: Duration = Duration::from_secs(5);

/// `infer launch`'s flags.
#[derive(Debug, Clone, Args)]
pub struct LaunchArgs {
    /// Ranks to start on this machine (without --hostfile).
    #[arg(long, short = 'n', value_name = "N", default_value_t = 2)]
    pub ranks: usize,

    /// Start one rank per entry of FILE over ssh: a JSON list as mlx.launch
    /// takes it, `[{"ssh": "host", "ips": ["10.0.0.2"]}, …]` (rank 0 first;
    /// `ips` are the addresses the ranks reach each other on, default the
    /// ssh host).
    #[arg(long, value_name = "FILE")]
    pub hostfile: Option<PathBuf>,

    /// The communication backend: ring (TCP; every build of MLX) or nccl
    /// (NVIDIA GPUs: rank i on GPU i of its host). MPI ranks are started by
    /// mpirun instead, with `--tensor-parallel mpi`.
    #[arg(long, value_name = "NAME", default_value = "ring")]
    pub backend: String,

    /// The ring's first TCP port: rank i listens on PORT + i [default:
    /// free ports on this machine; 32323 with --hostfile].
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,

    /// The `infer` binary on the remote hosts [default: this binary's
    /// path].
    #[arg(long, value_name = "PATH")]
    pub remote_infer: Option<PathBuf>,

    /// What each rank runs: `generate`, `chat` or `serve` and its flags, after
    /// `--` (e.g. `-- generate --model DIR "Hello"`); rank 0 prints or
    /// serves, the others run its calls alongside it.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// An entry of an mlx.launch hostfile.
#[derive(Debug, Clone, Deserialize, PartialEq)]
struct HostEntry {
    ssh: String,
    #[serde(default)]
    ips: Vec<String>,
}

impl HostEntry {
    /// The address the other ranks reach this host on: its first `ips`
    /// entry, else its ssh name.
    fn address(&self) -> String {
        self.ips
            .first()
            .cloned()
            .unwrap_or_else(|| self.ssh.clone())
    }
}

/// Where one rank runs.
#[derive(Debug, Clone, PartialEq)]
enum Place {
    /// A child process of this one.
    Here,
    /// Over ssh on this host.
    Ssh(String),
}

/// One rank's process and environment.
#[derive(Debug, Clone, PartialEq)]
struct RankPlan {
    rank: usize,
    place: Place,
    env: Vec<(String, String)>,
}

/// Runs `infer launch`.
pub fn run(args: &LaunchArgs) -> Result<(), CliError> {
    let first = args.command.first().map(String::as_str).unwrap_or_default();
    if !["generate", "chat", "serve"].contains(&first) {
        return Err(CliError::Usage(format!(
            "`infer launch` runs `generate`, `chat` or `serve` on every rank (got {first:?})"
        )));
    }
    let hosts = match &args.hostfile {
        Some(path) => Some(read_hostfile(path)?),
        None => None,
    };
    let ranks = hosts.as_ref().map_or(args.ranks, Vec::len);
    if ranks < 1 {
        return Err(CliError::Usage("--ranks must be at least 1".into()));
    }
    let plans = plan(&args.backend, ranks, hosts.as_deref(), args.port)?;
    let hostfile_json = ring_hostfile(&args.backend, ranks, hosts.as_deref(), args.port)?;
    let local_hostfile = match &hostfile_json {
        Some(json) => {
            let path =
                std::env::temp_dir().join(format!("infer-launch-{}.json", std::process::id()));
            std::fs::write(&path, json)
                .map_err(|e| CliError::io(format!("cannot write {}", path.display()), e))?;
            Some(path)
        }
        None => None,
    };
    let outcome = supervise(
        args,
        &plans,
        local_hostfile.as_deref(),
        hostfile_json.as_deref(),
    );
    if let Some(path) = local_hostfile {
        let _ = std::fs::remove_file(path);
    }
    outcome
}

/// Reads an mlx.launch hostfile.
fn read_hostfile(path: &Path) -> Result<Vec<HostEntry>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::io(format!("cannot read {}", path.display()), e))?;
    let hosts: Vec<HostEntry> = serde_json::from_str(&text).map_err(|e| {
        CliError::Input(format!(
            "{}: expected a JSON list of {{\"ssh\": HOST, \"ips\": [ADDRESS, …]}}: {e}",
            path.display()
        ))
    })?;
    if hosts.is_empty() {
        return Err(CliError::Input(format!("{}: no hosts", path.display())));
    }
    Ok(hosts)
}

/// Free TCP ports on the loopback interface, all different.
fn free_ports(n: usize) -> Result<Vec<u16>, CliError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| CliError::io("cannot find a free port", e))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| CliError::io("cannot find a free port", e))
}

/// The ring backend's hostfile (MLX's JSON: one list of `ip:port` per
/// rank), or `None` for a backend that takes none.
fn ring_hostfile(
    backend: &str,
    ranks: usize,
    hosts: Option<&[HostEntry]>,
    port: Option<u16>,
) -> Result<Option<String>, CliError> {
    if backend != "ring" {
        return Ok(None);
    }
    let ports: Vec<u16> = if port.is_some() || hosts.is_some() {
        let first = port.unwrap_or(32323);
        (0..ranks)
            .map(|i| {
                u16::try_from(usize::from(first) + i)
                    .map_err(|_| CliError::Usage(format!("--port {first} + {i} is past 65535")))
            })
            .collect::<Result<_, _>>()?
    } else {
        free_ports(ranks)?
    };
    let addresses: Vec<Vec<String>> = (0..ranks)
        .map(|i| {
            let ip = hosts.map_or_else(|| "127.0.0.1".to_owned(), |h| h[i].address());
            vec![format!("{ip}:{}", ports[i])]
        })
        .collect();
    serde_json::to_string(&addresses)
        .map(Some)
        .map_err(|e| CliError::Input(format!("cannot write the ring hostfile: {e}")))
}

/// Each rank's place and the environment MLX reads (the ring hostfile's
/// path is added when it is written).
fn plan(
    backend: &str,
    ranks: usize,
    hosts: Option<&[HostEntry]>,
    port: Option<u16>,
) -> Result<Vec<RankPlan>, CliError> {
    let nccl_port =
        match backend {
            "ring" => None,
            "nccl" => Some(match port {
                Some(p) => p,
                None if hosts.is_some() => 32323,
                None => free_ports(1)?[0],
            }),
            "mpi" => return Err(CliError::Usage(
                "MPI ranks are started by mpirun: `mpirun -np N infer generate --tensor-parallel \
                 mpi …`"
                    .into(),
            )),
            other => {
                return Err(CliError::Usage(format!(
                    "--backend {other:?}: `infer launch` starts ring or nccl ranks"
                )))
            }
        };
    let coordinator = hosts.map_or_else(|| "127.0.0.1".to_owned(), |h| h[0].address());
    Ok((0..ranks)
        .map(|rank| {
            let mut env = vec![
                ("MLX_RANK".to_owned(), rank.to_string()),
                ("INFER_TENSOR_PARALLEL".to_owned(), backend.to_owned()),
            ];
            if let Some(p) = nccl_port {
                env.push(("MLX_WORLD_SIZE".into(), ranks.to_string()));
                env.push(("NCCL_HOST_IP".into(), coordinator.clone()));
                env.push(("NCCL_PORT".into(), p.to_string()));
                // One GPU per rank: rank i of a host on its GPU i.
                let on_host = match hosts {
                    Some(h) => h[..rank].iter().filter(|e| e.ssh == h[rank].ssh).count(),
                    None => rank,
                };
                env.push(("CUDA_VISIBLE_DEVICES".into(), on_host.to_string()));
            }
            RankPlan {
                rank,
                place: match hosts {
                    Some(h) => Place::Ssh(h[rank].ssh.clone()),
                    None => Place::Here,
                },
                env,
            }
        })
        .collect())
}

/// Quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The `ssh` command line that starts `plan`'s rank: the ring hostfile is
/// written to a temporary file there first.
fn ssh_command(
    host: &str,
    plan: &RankPlan,
    infer: &Path,
    command: &[String],
    hostfile_json: Option<&str>,
) -> Command {
    let mut script = String::new();
    if let Some(json) = hostfile_json {
        script.push_str(&format!(
            "f=$(mktemp) && printf %s {} > \"$f\" && export MLX_HOSTFILE=\"$f\" && ",
            shell_quote(json)
        ));
    }
    if let Ok(dir) = std::env::current_dir() {
        script.push_str(&format!(
            "cd {} 2>/dev/null; ",
            shell_quote(&dir.to_string_lossy())
        ));
    }
    for (k, v) in &plan.env {
        script.push_str(&format!("export {k}={}; ", shell_quote(v)));
    }
    script.push_str("exec ");
    script.push_str(&shell_quote(&infer.to_string_lossy()));
    for arg in command {
        script.push(' ');
        script.push_str(&shell_quote(arg));
    }
    let mut cmd = Command::new("ssh");
    cmd.args(["-o", "BatchMode=yes", host, &script]);
    cmd
}

/// Starts every rank and waits for them: the first failure's status is the
/// run's, and once a rank failed the others are killed after [`GRACE`].
fn supervise(
    args: &LaunchArgs,
    plans: &[RankPlan],
    local_hostfile: Option<&Path>,
    hostfile_json: Option<&str>,
) -> Result<(), CliError> {
    let exe =
        std::env::current_exe().map_err(|e| CliError::io("cannot find the infer binary", e))?;
    let remote = args.remote_infer.clone().unwrap_or_else(|| exe.clone());
    let interrupts = Arc::new(AtomicUsize::new(0));
    {
        let count = Arc::clone(&interrupts);
        // The ranks get the terminal's Ctrl-C themselves; this process
        // waits for them (a second Ctrl-C stops them all).
        let _ = ctrlc::set_handler(move || {
            count.fetch_add(1, Ordering::SeqCst);
        });
    }
    let mut children: Vec<(usize, Child)> = Vec::new();
    for plan in plans {
        let mut cmd = match &plan.place {
            Place::Here => {
                let mut c = Command::new(&exe);
                c.args(&args.command);
                c.envs(plan.env.iter().map(|(k, v)| (k, v)));
                if let Some(path) = local_hostfile {
                    c.env("MLX_HOSTFILE", path);
                }
                c
            }
            Place::Ssh(host) => ssh_command(host, plan, &remote, &args.command, hostfile_json),
        };
        // Rank 0 takes the input (a prompt, a conversation) and prints;
        // the others follow it.
        if plan.rank == 0 {
            cmd.stdin(Stdio::inherit())
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit());
        } else {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop(&mut children);
                return Err(CliError::io(format!("cannot start rank {}", plan.rank), e));
            }
        };
        if let Some(err) = child.stderr.take() {
            let rank = plan.rank;
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("[rank {rank}] {line}");
                }
            });
        }
        tracing::info!(rank = plan.rank, pid = child.id(), "rank started");
        children.push((plan.rank, child));
    }
    let mut failure: Option<(usize, ExitStatus)> = None;
    let mut deadline: Option<Instant> = None;
    let mut running = children.len();
    let mut forwarded = false;
    let mut done = vec![false; children.len()];
    while running > 0 {
        let mut failed = Vec::new();
        for (i, (rank, child)) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    done[i] = true;
                    running -= 1;
                    if !status.success() {
                        tracing::warn!(rank = *rank, %status, "rank failed");
                        failed.push((*rank, status));
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(rank = *rank, "cannot wait for the rank: {e}"),
            }
        }
        // Of ranks found ended together, one killed by a signal is the
        // cause (the others then lost their peer).
        failed.sort_by_key(|(_, s)| s.code().is_some());
        if let (None, Some(first)) = (&failure, failed.into_iter().next()) {
            failure = Some(first);
            deadline = Some(Instant::now() + GRACE);
        }
        let hits = interrupts.load(Ordering::SeqCst);
        if hits >= 1 && !forwarded {
            // Rank 0 decides what Ctrl-C means (a reply stops, a server
            // finishes its requests) and the others follow it. From a
            // terminal every local rank got it already (the others ignore
            // it); otherwise rank 0 is told here.
            forwarded = true;
            if !io::stdin().is_terminal() {
                if let Some((_, child)) = children.iter().find(|(r, _)| *r == 0) {
                    if plans[0].place == Place::Here {
                        let _ = Command::new("kill")
                            .args(["-INT", &child.id().to_string()])
                            .status();
                    }
                }
            }
        }
        if hits >= 2 && deadline.is_none() {
            // A second Ctrl-C: stop everything now.
            deadline = Some(Instant::now());
        }
        if done.first() == Some(&true) && running > 0 && deadline.is_none() {
            // Rank 0 ended well: the others stop with it.
            deadline = Some(Instant::now() + GRACE);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) && running > 0 {
            for (i, (rank, child)) in children.iter_mut().enumerate() {
                if !done[i] {
                    eprintln!("[launch] stopping rank {rank}");
                    let _ = child.kill();
                }
            }
            deadline = None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if interrupts.load(Ordering::SeqCst) > 0 && failure.is_none() {
        return Err(CliError::Interrupted);
    }
    match failure {
        None => Ok(()),
        Some((rank, status)) => {
            let code = status
                .code()
                .map_or(EXIT_RUNTIME, |c| u8::try_from(c).unwrap_or(EXIT_RUNTIME));
            if code == EXIT_INTERRUPTED {
                return Err(CliError::Interrupted);
            }
            Err(CliError::RankFailed {
                rank,
                status: status.to_string(),
                code,
            })
        }
    }
}

/// Kills the ranks started so far.
fn stop(children: &mut [(usize, Child)]) {
    for (_, child) in children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> Vec<HostEntry> {
        serde_json::from_str(
            r#"[{"ssh": "alpha", "ips": ["10.0.0.1"]}, {"ssh": "beta"}, {"ssh": "alpha", "ips": ["10.0.0.1"]}]"#,
        )
        .unwrap()
    }

    #[test]
    fn ring_hostfiles_are_mlx_json() {
        let json = ring_hostfile("ring", 3, Some(&hosts()), Some(5000))
            .unwrap()
            .unwrap();
        assert_eq!(
            json,
            r#"[["10.0.0.1:5000"],["beta:5001"],["10.0.0.1:5002"]]"#
        );
        let local = ring_hostfile("ring", 2, None, None).unwrap().unwrap();
        let parsed: Vec<Vec<String>> = serde_json::from_str(&local).unwrap();
        assert_eq!(parsed.len(), 2);
        assert!(parsed.iter().all(|r| r[0].starts_with("127.0.0.1:")));
        assert_ne!(parsed[0], parsed[1]);
        assert_eq!(ring_hostfile("nccl", 2, None, None).unwrap(), None);
    }

    #[test]
    fn plans_give_each_rank_its_environment() {
        let p = plan("nccl", 3, Some(&hosts()), None).unwrap();
        let env = |r: usize, k: &str| {
            p[r].env
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(env(1, "MLX_RANK").as_deref(), Some("1"));
        assert_eq!(env(2, "MLX_WORLD_SIZE").as_deref(), Some("3"));
        assert_eq!(env(2, "NCCL_HOST_IP").as_deref(), Some("10.0.0.1"));
        // The second rank on host alpha takes its second GPU.
        assert_eq!(env(2, "CUDA_VISIBLE_DEVICES").as_deref(), Some("1"));
        assert_eq!(env(1, "CUDA_VISIBLE_DEVICES").as_deref(), Some("0"));
        assert_eq!(p[1].place, Place::Ssh("beta".into()));
        assert!(matches!(
            plan("mpi", 2, None, None),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            plan("tcp", 2, None, None),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn remote_commands_quote_everything() {
        let p = plan("ring", 2, Some(&hosts()[..2]), Some(6000)).unwrap();
        let cmd = ssh_command(
            "beta",
            &p[1],
            Path::new("/opt/infer"),
            &["generate".into(), "it's".into()],
            Some(r#"[["a:1"]]"#),
        );
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[..3], ["-o", "BatchMode=yes", "beta"]);
        let script = &args[3];
        assert!(
            script.contains(r#"printf %s '[["a:1"]]' > "$f""#),
            "{script}"
        );
        assert!(script.contains("export MLX_RANK='1';"), "{script}");
        assert!(
            script.ends_with(r#"exec '/opt/infer' 'generate' 'it'\''s'"#),
            "{script}"
        );
    }
}
