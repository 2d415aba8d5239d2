//! Network namespaces: open one by path or PID, run a closure inside it on a short-lived thread,
//! and build commands (iptables-restore, conntrack) that run inside it through `nsenter`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::{CloneFlags, setns};

use super::ShellError;

/// A workload's network namespace, named by a path that `setns(2)` accepts
/// (`/var/run/netns/NAME` or `/proc/PID/ns/net`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Netns {
    path: PathBuf,
}

impl Netns {
    /// A namespace by path. The path is checked when the namespace is first entered.
    pub fn from_path(path: impl Into<PathBuf>) -> Netns {
        Netns { path: path.into() }
    }

    /// The namespace of a process (`/proc/PID/ns/net`; the agent runs in the host PID namespace).
    pub fn from_pid(pid: u32) -> Netns {
        Netns {
            path: PathBuf::from(format!("/proc/{pid}/ns/net")),
        }
    }

    /// The path given at construction.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> Result<File, ShellError> {
        File::open(&self.path).map_err(|source| ShellError::Netns {
            path: self.path.clone(),
            source,
        })
    }

    /// Moves the calling thread into this namespace for good: for a thread of its own that
    /// lives there (its sockets, devices and child processes are made in the namespace).
    pub fn enter_current_thread(&self) -> Result<(), ShellError> {
        let file = self.open()?;
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| ShellError::Netns {
            path: self.path.clone(),
            source: std::io::Error::from(errno),
        })
    }

    /// Run `f` on a fresh thread that has joined this namespace; the thread exits when `f`
    /// returns, so no thread per workload survives. Sockets created by `f` stay in this namespace.
    pub fn run<T, F>(&self, f: F) -> Result<T, ShellError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let ns = self.clone();
        let handle = std::thread::Builder::new()
            .name("tessera-netns".into())
            .spawn(move || {
                ns.enter_current_thread()?;
                Ok(f())
            })
            .map_err(ShellError::Thread)?;
        handle
            .join()
            .map_err(|_| ShellError::Thread(std::io::Error::other("netns thread panicked")))?
    }

    /// A command that runs `program` inside this namespace (`nsenter --net=PATH program`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        let mut net = std::ffi::OsString::from("--net=");
        net.push(self.path.as_os_str());
        cmd.arg(net).arg("--").arg(program);
        cmd
    }
}

/// Run `cmd`, feeding `stdin`; returns (stdout, stderr). An error carries the command line and
/// its stderr.
pub(crate) fn run_command(
    cmd: Command,
    stdin: Option<&str>,
) -> Result<(String, String), ShellError> {
    let line = format!("{cmd:?}");
    spawn_command(cmd, stdin).and_then(|child| wait_command(child, line))
}

/// Run several commands at once (each fed its stdin); their results in order.
pub(crate) fn run_commands(
    cmds: Vec<(Command, Option<String>)>,
) -> Vec<Result<(String, String), ShellError>> {
    let started: Vec<_> = cmds
        .into_iter()
        .map(|(cmd, stdin)| {
            let line = format!("{cmd:?}");
            (spawn_command(cmd, stdin.as_deref()), line)
        })
        .collect();
    started
        .into_iter()
        .map(|(child, line)| child.and_then(|c| wait_command(c, line)))
        .collect()
}

fn spawn_command(mut cmd: Command, stdin: Option<&str>) -> Result<std::process::Child, ShellError> {
    use std::io::Write;
    use std::process::Stdio;
    let line = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| ShellError::Spawn {
        command: line.clone(),
        source,
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|source| ShellError::Spawn {
                command: line.clone(),
                source,
            })?;
    }
    Ok(child)
}

fn wait_command(child: std::process::Child, line: String) -> Result<(String, String), ShellError> {
    let out = child
        .wait_with_output()
        .map_err(|source| ShellError::Spawn {
            command: line.clone(),
            source,
        })?;
    if out.status.success() {
        Ok((
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    } else {
        Err(ShellError::Command {
            command: line,
            status: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn pid_namespace_path() {
        assert_eq!(Netns::from_pid(1234).path(), Path::new("/proc/1234/ns/net"));
    }

    #[test]
    fn command_enters_the_namespace_with_nsenter() {
        let cmd = Netns::from_path("/var/run/netns/web-1").command("iptables-restore");
        assert_eq!(cmd.get_program(), "nsenter");
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(
            args,
            ["--net=/var/run/netns/web-1", "--", "iptables-restore"]
        );
    }

    #[test]
    fn missing_namespace_is_an_error_naming_the_path() {
        let err = Netns::from_path("/nonexistent/netns/x")
            .run(|| ())
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/netns/x"), "{err}");
    }
}
