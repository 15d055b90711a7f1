//! Child processes and commands.
//!
//! Two rules hold everywhere: a child never outlives xtask (every child sits in a guard that
//! kills it on drop, a [`testkit::Proc`] for servers, so `?` on any error path cleans up, and
//! blocking waits give up when a stop signal arrives, see `stop`), and no wait is unbounded
//! (every wait takes a timeout and says what it was waiting for when it gives up).

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use testkit::Proc;
use tokio::io::{AsyncBufReadExt, BufReader};

/// How often blocking waits poll a child for exit.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    // xtask lives one level below the root; the path is baked in at compile time so the
    // subcommands work from any current directory.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR` like cargo itself does.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() { dir } else { workspace_root().join(dir) }
        }
        _ => workspace_root().join("target"),
    }
}

/// The cargo that runs us (`$CARGO` under `cargo run`), so nested builds use the same toolchain.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"))
}

/// A `cargo` command run from the workspace root.
pub fn cargo_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(cargo());
    command.args(args).current_dir(workspace_root());
    command
}

/// A `git` command run from the workspace root.
pub fn git_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new("git");
    command.args(args).current_dir(workspace_root());
    command
}

/// Finds an executable by name on `PATH`, and in the sbin directories, which a non-login root
/// shell may lack but where Debian puts `bpftool`.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path).chain(extra).map(|dir| dir.join(name)).find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Renders a command the way a person would type it, for messages.
pub fn display_command(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|arg| arg.to_string_lossy().into_owned()));
    words.join(" ")
}

/// A blocking child (cargo, rustup, apt-get) in a process group of its own, so that stopping
/// it also stops what it started (rustc processes, dpkg). Dropped before it finished (error
/// paths, stop signals, panics), the whole group is terminated.
struct BlockingChild {
    child: std::process::Child,
    finished: bool,
}

impl BlockingChild {
    /// Starts `command` as the leader of a new process group.
    fn spawn(command: &mut Command, what: &str) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        // A terminal's Ctrl-C reaches only our group now; our stop flag catches it and the
        // drop below passes it on to this group.
        let child = command.process_group(0).spawn().with_context(|| format!("starting {what}"))?;
        Ok(Self { child, finished: false })
    }

    /// Waits for exit, polling, and stops the child when `timeout` passes.
    fn wait_timeout(&mut self, timeout: Duration, what: &str) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().with_context(|| format!("waiting for {what}"))? {
                self.finished = true;
                return Ok(status);
            }
            if let Some(signal) = crate::stop::requested() {
                // Drop stops the child.
                bail!("{what} was stopped: xtask received {signal}");
            }
            if Instant::now() >= deadline {
                bail!("{what} did not finish within {} and was stopped", crate::ui::human(timeout));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// SIGTERM to the group (apt and dpkg clean up on it), up to two seconds for the leader to
    /// exit, then SIGKILL to whatever of the group is left.
    fn stop_group(&mut self) {
        use rustix::process::{Pid, Signal, kill_process_group};
        let Some(group) = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        };
        let _ = kill_process_group(group, Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        // The group outlives its leader while any member runs; ESRCH means all are gone.
        let _ = kill_process_group(group, Signal::KILL);
        let _ = self.child.wait();
    }
}

impl Drop for BlockingChild {
    fn drop(&mut self) {
        if !self.finished {
            self.stop_group();
        }
    }
}

/// Runs a command with its output going straight to our terminal (so cargo's progress and
/// test summaries appear as they happen); fails on a non-zero exit or after `timeout`.
pub fn run_streaming(command: &mut Command, timeout: Duration) -> Result<()> {
    let what = format!("`{}`", display_command(command));
    let mut child = BlockingChild::spawn(command.stdin(Stdio::null()), &what)?;
    let status = child.wait_timeout(timeout, &what)?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// What a captured command printed.
pub struct Captured {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

/// Runs a command and captures its output, killing it after `timeout`.
///
/// Only a failure to start or a timeout is an error; the caller judges the exit status.
pub fn capture(command: &mut Command, timeout: Duration) -> Result<Captured> {
    let what = format!("`{}`", display_command(command));
    let mut child =
        BlockingChild::spawn(command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()), &what)?;
    // Pipes are drained on threads so a chatty child cannot block on a full pipe while we
    // poll for its exit.
    let stdout = drain_on_thread(child.child.stdout.take());
    let stderr = drain_on_thread(child.child.stderr.take());
    let status = child.wait_timeout(timeout, &what)?;
    // A grandchild could hold the pipes open after the child exits; joining would then block,
    // so the threads are joined only once they are done and otherwise left behind.
    let collect = |handle: thread::JoinHandle<Vec<u8>>| {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !handle.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if handle.is_finished() {
            String::from_utf8_lossy(&handle.join().unwrap_or_default()).into_owned()
        } else {
            String::new()
        }
    };
    Ok(Captured { status, stdout: collect(stdout), stderr: collect(stderr) })
}

fn drain_on_thread<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buffer = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buffer);
        }
        buffer
    })
}

/// What to start as a long-running server child.
pub struct ServerSpec {
    /// Short name used in messages (`gateway`, `engine llama-0`).
    pub name: String,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Where its stderr and stdout go (see `stdout`).
    pub log: PathBuf,
    /// What happens to its stdout.
    pub stdout: StdoutTo,
    /// Environment variables to set.
    pub env: Vec<(String, String)>,
    /// Environment variables to remove, so a developer's shell cannot change what runs.
    pub env_remove: Vec<String>,
    /// Pin the child to this CPU with `taskset`, when given.
    pub cpu: Option<usize>,
}

/// Where a server child's stdout goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdoutTo {
    /// Straight into the log file.
    Log,
    /// A pipe, read by [`ChildGuard::read_stdout_line`] (which must then be called: it hands
    /// the rest of the pipe to the log, and an undrained pipe would block the child).
    Pipe,
}

/// A running server child. Dropping it kills the process.
pub struct ChildGuard {
    name: String,
    log: PathBuf,
    proc: Proc,
    stdout: Option<std::process::ChildStdout>,
}

impl ChildGuard {
    /// Starts the server described by `spec`, its stdout piped (see [`Self::read_stdout_line`]),
    /// its stderr in the log file.
    pub fn spawn(spec: ServerSpec) -> Result<Self> {
        let ServerSpec { name, program, args, log, stdout, env, env_remove, cpu } = spec;
        // Truncate once, then write in append mode only: the child's stderr, its stdout and
        // our copy of a piped stdout all land at the end without overwriting each other.
        std::fs::File::create(&log).with_context(|| format!("creating log file {}", log.display()))?;
        let log_file = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .with_context(|| format!("opening log file {}", log.display()))?;
        let stdout = match stdout {
            StdoutTo::Log => Stdio::from(log_file.try_clone().context("duplicating the log file handle")?),
            StdoutTo::Pipe => Stdio::piped(),
        };
        let mut command = match cpu {
            // taskset execs the program, so the pid we hold is the server's own.
            Some(cpu) => {
                let mut command = Command::new("taskset");
                command.arg("-c").arg(cpu.to_string()).arg(&program);
                command
            }
            None => Command::new(&program),
        };
        command.args(&args).envs(env).stdin(Stdio::null()).stdout(stdout).stderr(Stdio::from(log_file));
        for key in env_remove {
            command.env_remove(key);
        }
        let mut proc = Proc::spawn(&mut command).with_context(|| {
            format!(
                "starting {name}: {} {}",
                program.display(),
                args.iter().map(|arg| arg.to_string_lossy()).collect::<Vec<_>>().join(" ")
            )
        })?;
        let stdout = proc.child_mut().stdout.take();
        Ok(Self { name, log, proc, stdout })
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log file of this child.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Reads stdout lines until one starts with `prefix` (bounded by `timeout`), then hands
    /// the rest of stdout to a task that appends it to the log, so the child never blocks on a
    /// full pipe. Returns the matching line.
    pub async fn read_stdout_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let stdout = self.stdout.take().ok_or_else(|| anyhow!("stdout of {} was already taken", self.name))?;
        let mut stdout = BufReader::new(
            tokio::process::ChildStdout::from_std(stdout)
                .with_context(|| format!("reading stdout of {} asynchronously", self.name))?,
        );
        let name = self.name.clone();
        let found = tokio::time::timeout(timeout, async {
            let mut skipped = Vec::new();
            loop {
                let mut line = String::new();
                let read = stdout.read_line(&mut line).await.with_context(|| format!("reading stdout of {name}"))?;
                if read == 0 {
                    bail!("{name} closed its stdout before printing `{prefix}...` (printed: {skipped:?})");
                }
                let line = line.trim_end().to_owned();
                if line.starts_with(prefix) {
                    return Ok(line);
                }
                skipped.push(line);
            }
        })
        .await;
        let line = match found {
            Ok(result) => result,
            Err(_) => Err(anyhow!("{} printed no `{prefix}...` line within {}", self.name, crate::ui::human(timeout))),
        }
        .with_context(|| format!("see {}", self.log.display()))?;
        let log = self.log.clone();
        tokio::spawn(async move {
            if let Ok(mut file) = tokio::fs::OpenOptions::new().append(true).open(&log).await {
                let _ = tokio::io::copy(&mut stdout, &mut file).await;
            }
        });
        Ok(line)
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.proc.exited()
    }

    /// Stops the child: SIGTERM, up to `grace` to exit, then SIGKILL. Returns how it ended.
    pub async fn stop(self, grace: Duration) -> Result<String> {
        let Self { name, mut proc, .. } = self;
        if let Some(status) = proc.exited() {
            return Ok(format!("had already exited ({status})"));
        }
        proc.terminate();
        let (mut proc, status) = wait_exit_off_runtime(proc, grace).await?;
        if let Some(status) = status {
            return Ok(format!("stopped ({status})"));
        }
        proc.kill();
        let (_, status) = wait_exit_off_runtime(proc, Duration::from_secs(5)).await?;
        status.ok_or_else(|| anyhow!("{name} did not die after SIGKILL within 5 s"))?;
        Ok(format!("killed (did not stop within {} of SIGTERM)", crate::ui::human(grace)))
    }

    /// The last `lines` lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

/// [`Proc::wait_exit`] on the blocking pool, so the runtime's thread keeps serving. Should the
/// caller give up, the task still ends within `timeout` and drops (kills) the child.
async fn wait_exit_off_runtime(mut proc: Proc, timeout: Duration) -> Result<(Proc, Option<ExitStatus>)> {
    tokio::task::spawn_blocking(move || {
        let status = proc.wait_exit(timeout);
        (proc, status)
    })
    .await
    .context("waiting for a child to exit")
}

/// The last `lines` lines of a text file (empty when unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Parses the address out of a `... listening on 127.0.0.1:PORT` line.
pub fn parse_listening_line(line: &str) -> Result<SocketAddr> {
    testkit::listening_addr(line).ok_or_else(|| anyhow!("no `listening on ADDR` in {line:?}"))
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn process_cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_stat_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))?;
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// utime + stime (fields 14 and 15, in clock ticks) of a `/proc/<pid>/stat` line.
pub fn parse_stat_cpu_ticks(stat: &str) -> Result<u64> {
    // The command name (field 2) is in parentheses and may itself hold spaces or ')', so the
    // fields are counted from the last ')'.
    let (_, rest) = stat.rsplit_once(')').ok_or_else(|| anyhow!("no `)` closing the command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11, stime → index 12.
    let field = |index: usize, name: &str| -> Result<u64> {
        fields
            .get(index)
            .ok_or_else(|| anyhow!("missing {name}"))?
            .parse::<u64>()
            .with_context(|| format!("bad {name}"))
    };
    Ok(field(11, "utime")? + field(12, "stime")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_ticks_counts_from_last_paren() {
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 4 0 \
                    12345 1000000 200 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat).unwrap(), 42);
        assert!(parse_stat_cpu_ticks("4242 (x) S 1").is_err());
    }

    #[test]
    fn listening_line() {
        let addr = parse_listening_line("mock-engine listening on 127.0.0.1:40123").unwrap();
        assert_eq!(addr, "127.0.0.1:40123".parse().unwrap());
        assert!(parse_listening_line("mock-engine ready").is_err());
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(process_cpu_time(std::process::id()).is_ok());
    }

    #[test]
    fn capture_and_timeout() {
        let out = capture(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]), Duration::from_secs(10))
            .unwrap();
        assert_eq!(out.stdout.trim(), "out");
        assert_eq!(out.stderr.trim(), "err");
        assert_eq!(out.status.code(), Some(3));
        let slow = capture(Command::new("sleep").arg("5"), Duration::from_millis(200));
        assert!(slow.is_err());
    }

    #[test]
    fn a_timed_out_command_takes_its_children_along() {
        let pid_file = std::env::temp_dir().join(format!("xtask-group-{}.pid", std::process::id()));
        let script = format!("sleep 30 & echo $! > {}; sleep 30", pid_file.display());
        let started = Instant::now();
        let err = run_streaming(Command::new("sh").args(["-c", &script]), Duration::from_millis(500)).unwrap_err();
        assert!(format!("{err:#}").contains("did not finish within"), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let grandchild: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_alive(grandchild) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(!is_alive(grandchild), "the background sleep survived");
        std::fs::remove_file(&pid_file).unwrap();
    }

    fn sh_server(script: &str, stdout: StdoutTo, log: &Path) -> ChildGuard {
        ChildGuard::spawn(ServerSpec {
            name: "test child".into(),
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            log: log.to_path_buf(),
            stdout,
            env: Vec::new(),
            env_remove: Vec::new(),
            cpu: None,
        })
        .unwrap()
    }

    /// Alive means running or sleeping; a killed child is a zombie until reaped, then gone.
    fn is_alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
    }

    #[tokio::test]
    async fn child_guard_reads_its_line_logs_the_rest_and_stops() {
        let log = std::env::temp_dir().join(format!("xtask-child-{}.log", std::process::id()));
        let mut child = sh_server(
            "echo noise; echo 'x listening on 127.0.0.1:5'; echo after; echo err >&2; exec sleep 30",
            StdoutTo::Pipe,
            &log,
        );
        let line = child.read_stdout_line("x listening on", Duration::from_secs(5)).await.unwrap();
        assert_eq!(parse_listening_line(&line).unwrap().port(), 5);
        let pid = child.pid();
        assert!(is_alive(pid));
        // stderr is written after "after": once it is in the log, "after" is in the pipe, and
        // stopping the child cannot race the script.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&log).unwrap().contains("err") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let outcome = child.stop(Duration::from_secs(5)).await.unwrap();
        assert!(outcome.starts_with("stopped"), "{outcome}");
        assert!(!is_alive(pid));
        // The rest of stdout reaches the log through a task; give it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut logged = String::new();
        while !logged.contains("after") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            logged = std::fs::read_to_string(&log).unwrap();
        }
        assert!(logged.contains("after") && logged.contains("err"), "{logged:?}");
        std::fs::remove_file(&log).unwrap();
    }

    #[tokio::test]
    async fn child_guard_kills_on_drop_and_times_out() {
        let log = std::env::temp_dir().join(format!("xtask-drop-{}.log", std::process::id()));
        let mut child = sh_server("exec sleep 30", StdoutTo::Pipe, &log);
        let err = child.read_stdout_line("never", Duration::from_millis(100)).await.unwrap_err();
        assert!(format!("{err:#}").contains("printed no `never...` line"), "{err:#}");
        let pid = child.pid();
        drop(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!is_alive(pid));
        std::fs::remove_file(&log).unwrap();
    }
}
