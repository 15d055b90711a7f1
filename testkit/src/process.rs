//! Child processes that never outlive their owner: a [`Proc`] kills its child when dropped,
//! and every wait on it is bounded.

use std::io;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How often a bounded wait polls the child.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A child process, killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Starts `command`.
    pub fn spawn(command: &mut Command) -> io::Result<Self> {
        command.spawn().map(Self::from)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child, for taking its piped stdout or stderr.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends SIGTERM, the signal a graceful shutdown starts with; a child that has exited
    /// already is left alone.
    pub fn terminate(&self) {
        let pid = i32::try_from(self.child.id()).ok().and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }

    /// Sends SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// `Some(status)` once the child has exited (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the child to exit, at most `timeout`; `None` if it did not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl From<Child> for Proc {
    fn from(child: Child) -> Self {
        Self { child }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in a server's `... listening on 127.0.0.1:PORT` banner (the mock engine prints
/// one when it binds `127.0.0.1:0`).
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    line.rsplit_once("listening on ").and_then(|(_, addr)| addr.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminate_ends_a_child_and_wait_exit_is_bounded() {
        let mut sleeper = Proc::spawn(Command::new("sleep").arg("30")).expect("spawn sleep");
        assert_eq!(sleeper.wait_exit(Duration::from_millis(100)), None, "still sleeping");
        sleeper.terminate();
        let status = sleeper.wait_exit(Duration::from_secs(5)).expect("exits on SIGTERM");
        assert!(!status.success());
    }

    #[test]
    fn dropping_kills_the_child() {
        let sleeper = Proc::spawn(Command::new("sleep").arg("30")).expect("spawn sleep");
        let pid = sleeper.pid();
        drop(sleeper);
        // Reaped on drop: the pid no longer names a process of ours.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(!stat.contains("(sleep)"), "{stat}");
    }

    #[test]
    fn listening_banner() {
        assert_eq!(
            listening_addr("mock-engine listening on 127.0.0.1:40123\n"),
            Some("127.0.0.1:40123".parse().expect("address"))
        );
        assert_eq!(listening_addr("mock-engine ready"), None);
    }
}
