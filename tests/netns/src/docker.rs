//! A private Docker daemon per test: its own data root, exec root, socket and pidfile under
//! `/tmp/ts-<pid>-docker-<n>/`, started with `--bridge=none --iptables=false --ip-masq=false`
//! so that it never touches the host's networking. Containers get `--network none`; a test
//! gives one connectivity with [`crate::Testbed::attach_netns`].
//!
//! No image can be pulled: [`DockerDaemon::import_busybox`] imports a rootfs made of Debian's
//! `/bin/busybox` (busybox-static) and its applet links. The client is Debian's 20.10
//! `/usr/bin/docker` (package docker.io), always with `-H`.
//!
//! Drop removes the containers, stops the daemon (and its containerd), unmounts what is left
//! under its roots and removes the directory, even when the test panics;
//! [`sweep_leftovers`] does the same for the directories of test processes that died.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Debian's Docker client (API 1.41), not a newer one that may be first on PATH.
pub const DOCKER: &str = "/usr/bin/docker";
const DOCKERD: &str = "dockerd";
/// Applets linked in the busybox image.
const APPLETS: [&str; 7] = ["sh", "nc", "wget", "httpd", "sleep", "cat", "echo"];
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A container started by [`DockerDaemon::run`].
#[derive(Clone, Debug)]
pub struct Container {
    pub name: String,
    pub id: String,
    /// Its init process in the host PID namespace (its netns is `/proc/PID/ns/net`).
    pub pid: u32,
}

/// A private `dockerd`. Stopped and cleaned up on drop.
pub struct DockerDaemon {
    dir: PathBuf,
    child: Option<Child>,
    live_restore: bool,
}

impl DockerDaemon {
    /// Starts a daemon and waits until it answers.
    pub fn start() -> DockerDaemon {
        Self::start_with(false)
    }

    /// Starts a daemon with `--live-restore`: its containers survive its restarts.
    pub fn start_live_restore() -> DockerDaemon {
        Self::start_with(true)
    }

    fn start_with(live_restore: bool) -> DockerDaemon {
        sweep_leftovers();
        let dir = PathBuf::from(format!(
            "/tmp/ts-{}-docker-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let mut d = DockerDaemon {
            dir,
            child: None,
            live_restore,
        };
        d.spawn();
        d
    }

    /// The directory holding roots, socket, pidfile and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// `unix:///tmp/ts-…/docker.sock`: for `--docker-host` and `docker -H`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.sock().display())
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        let d = &self.dir;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))
            .expect("dockerd log");
        let mut args: Vec<String> = vec![
            "--data-root".into(),
            d.join("data").display().to_string(),
            "--exec-root".into(),
            d.join("exec").display().to_string(),
            "-H".into(),
            self.host(),
            "--pidfile".into(),
            d.join("docker.pid").display().to_string(),
            "--bridge=none".into(),
            "--iptables=false".into(),
            "--ip-masq=false".into(),
            "--shutdown-timeout=2".into(),
        ];
        if self.live_restore {
            args.push("--live-restore".into());
        }
        let child = Command::new(DOCKERD)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start dockerd: {e} (apt package docker.io)"));
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "dockerd exited during start-up ({st}); log:\n{}",
                    self.log_tail()
                );
            }
            if self.sock().exists() && self.docker_status(&["version"]).status.success() {
                return;
            }
            if start.elapsed() > READY_TIMEOUT {
                panic!(
                    "dockerd not ready after {READY_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last 40 lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `docker -H … ARGS`, whatever its exit status.
    pub fn docker_status(&self, args: &[&str]) -> Output {
        Command::new(DOCKER)
            .arg("-H")
            .arg(self.host())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {DOCKER}: {e} (apt package docker.io)"))
    }

    /// `docker -H … ARGS`; panics with its output unless it succeeds. Returns stdout.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = self.docker_status(args);
        if !out.status.success() {
            panic!(
                "docker {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Imports a busybox image as `tag` (e.g. `tsbox:1`): `/bin/busybox` of busybox-static and
    /// links for sh, nc, wget, httpd, sleep, cat, echo.
    pub fn import_busybox(&self, tag: &str) {
        let root = self.dir.join("rootfs");
        std::fs::create_dir_all(root.join("bin")).expect("rootfs/bin");
        let bb = root.join("bin/busybox");
        if !bb.exists() {
            std::fs::copy("/bin/busybox", &bb)
                .expect("copy /bin/busybox (apt package busybox-static)");
        }
        for a in APPLETS {
            let link = root.join("bin").join(a);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", &link).expect("applet link");
            }
        }
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .output()
            .expect("tar");
        assert!(tar.status.success(), "tar of the busybox rootfs failed");
        let mut import = Command::new(DOCKER)
            .arg("-H")
            .arg(self.host())
            .args(["import", "-", tag])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker import");
        import
            .stdin
            .take()
            .expect("stdin")
            .write_all(&tar.stdout)
            .expect("write rootfs to docker import");
        let out = import.wait_with_output().expect("docker import");
        assert!(
            out.status.success(),
            "docker import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `docker run -d --name NAME --network none --label K=V… IMAGE ARGS…` (`args[0]` is the
    /// image). The container stops on SIGKILL at once (`--stop-signal KILL`: busybox as PID 1
    /// ignores SIGTERM).
    pub fn run(&self, name: &str, labels: &[(&str, &str)], args: &[&str]) -> Container {
        self.run_with(name, labels, &["--network", "none"], args)
    }

    /// Like [`DockerDaemon::run`], with `opts` instead of `--network none` (e.g.
    /// `["--network", "host"]`).
    pub fn run_with(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        opts: &[&str],
        args: &[&str],
    ) -> Container {
        let label_args: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut all: Vec<&str> = vec!["run", "-d", "--name", name, "--stop-signal", "KILL"];
        for l in &label_args {
            all.push("--label");
            all.push(l);
        }
        all.extend_from_slice(opts);
        all.extend_from_slice(args);
        let id = self.docker(&all).trim().to_owned();
        let pid = self.container_pid(name);
        Container {
            name: name.to_owned(),
            id,
            pid,
        }
    }

    /// `State.Pid` of a container (0 when it does not run).
    pub fn container_pid(&self, name: &str) -> u32 {
        self.docker(&["inspect", "-f", "{{.State.Pid}}", name])
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("pid of container {name}: {e}"))
    }

    /// `docker start NAME`: returns the container with its new pid.
    pub fn start_container(&self, name: &str) -> Container {
        self.docker(&["start", name]);
        let id = self
            .docker(&["inspect", "-f", "{{.Id}}", name])
            .trim()
            .to_owned();
        Container {
            name: name.to_owned(),
            id,
            pid: self.container_pid(name),
        }
    }

    /// `docker stop NAME` (immediate: the stop signal is KILL).
    pub fn stop(&self, name: &str) {
        self.docker(&["stop", name]);
    }

    /// `docker rm -f NAME`.
    pub fn rm(&self, name: &str) {
        self.docker(&["rm", "-f", name]);
    }

    /// Stops the daemon (SIGTERM, waits) and starts it again with the same roots. Without
    /// `--live-restore` its containers die with it (and are not restarted).
    pub fn restart_daemon(&mut self) {
        self.stop_daemon();
        self.spawn();
    }

    /// SIGTERM, wait (then SIGKILL) for the daemon.
    pub fn stop_daemon(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let start = Instant::now();
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if start.elapsed() > STOP_TIMEOUT {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if !self.live_restore {
            // Its containerd stops with it; make sure (it would keep the roots mounted).
            kill_pidfile(&self.dir.join("exec/containerd/containerd.pid"));
        }
    }
}

impl Drop for DockerDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- docker daemon {} (test failed); log:\n{}",
                self.dir.display(),
                self.log_tail()
            );
        }
        if self.child.is_some() {
            let ids = self.docker_status(&["ps", "-aq"]);
            let ids = String::from_utf8_lossy(&ids.stdout).into_owned();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.docker_status(&args);
            }
        }
        self.live_restore = false;
        self.stop_daemon();
        cleanup_dir(&self.dir);
    }
}

/// SIGKILLs the process named by a pidfile, if any.
fn kill_pidfile(pidfile: &Path) {
    if let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Kills whatever still runs from a daemon directory (dockerd, containerd, shims and container
/// processes found by their command line or cgroup mentioning it), unmounts everything under
/// it (deepest first) and removes it.
fn cleanup_dir(dir: &Path) {
    let d = dir.display().to_string();
    kill_pidfile(&dir.join("docker.pid"));
    kill_pidfile(&dir.join("exec/containerd/containerd.pid"));
    // Shims started for this daemon name its directory on their command line; the containers'
    // processes are their children.
    let mut procs: Vec<(i32, i32, bool)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for p in entries.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            // `pid (comm) state ppid ...`: comm may hold spaces, so parse after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let ours = String::from_utf8_lossy(&cmdline).contains(&d);
            procs.push((pid, ppid, ours));
        }
    }
    let me = std::process::id() as i32;
    let shims: Vec<i32> = procs
        .iter()
        .filter(|(pid, _, ours)| *ours && *pid != me)
        .map(|(pid, _, _)| *pid)
        .collect();
    for (pid, ppid, _) in &procs {
        if shims.contains(ppid) {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
    for pid in shims {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.replace("\\040", " "))
        .filter(|m| m.starts_with(&d))
        .collect();
    points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in points {
        let _ = Command::new("umount").args(["-l", &m]).status();
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Cleans up the daemon directories (`/tmp/ts-<pid>-docker-<n>`) of test processes that died.
pub fn sweep_leftovers() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = docker_dir_owner(&name) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        cleanup_dir(&e.path());
    }
}

/// `ts-<pid>-docker-<n>` → pid.
fn docker_dir_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("ts-")?;
    let (pid, rest) = rest.split_once("-docker-")?;
    rest.parse::<u32>().ok()?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_dirs_are_recognised_by_their_pid() {
        assert_eq!(docker_dir_owner("ts-1234-docker-0"), Some(1234));
        assert_eq!(docker_dir_owner("ts-1234-docker-x"), None);
        assert_eq!(docker_dir_owner("ts-1234-0-n1"), None);
        assert_eq!(docker_dir_owner("ts-x-docker-1"), None);
    }
}
