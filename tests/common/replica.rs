//! `tally run` as a child process — a replica — that tests start, SIGKILL, SIGTERM and
//! restart on the same state directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tally::config::Config;

use super::{free_port, try_get_raw};

/// One replica: its config file, state directory, HTTP address and log.
pub struct Replica {
    pub name: String,
    pub addr: SocketAddr,
    pub state: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// The tally binary it runs (this build's, unless [`Replica::run_binary`] says otherwise).
    binary: PathBuf,
}

impl Replica {
    /// A replica of `cfg` living in `dir/name`, on its own port and state directory.
    pub fn new(dir: &Path, name: &str, cfg: &Config) -> Replica {
        let home = dir.join(name);
        std::fs::create_dir_all(&home).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut r = Replica {
            name: name.into(),
            addr,
            state: home.join("state"),
            config: home.join("tally.toml"),
            log: home.join("tally.log"),
            child: None,
            binary: env!("CARGO_BIN_EXE_tally").into(),
        };
        r.configure(cfg);
        r
    }

    /// Rewrites its config file from `cfg` (its own state directory and port kept); the next
    /// start reads it.
    pub fn configure(&mut self, cfg: &Config) {
        let mut cfg = cfg.clone();
        cfg.state.dir = self.state.clone();
        cfg.http.listen = self.addr.to_string();
        std::fs::write(&self.config, toml::to_string(&cfg).unwrap()).unwrap();
    }

    /// Runs `binary` from the next start on (another version of tally).
    pub fn run_binary(&mut self, binary: &Path) {
        self.binary = binary.to_path_buf();
    }

    /// Starts the process (logs append to `tally.log` beside its config).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(&self.binary)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", std::env::var("TALLY_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting tally");
        self.child = Some(child);
    }

    /// Whether the process was started and not stopped since.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, and wait for a clean exit; returns how long shutting down took.
    pub fn terminate(&mut self) -> Duration {
        let mut c = self.child.take().expect("running");
        let started = Instant::now();
        let status = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap();
        assert!(status.success());
        let exit = c.wait().unwrap();
        assert!(exit.success(), "{} exited with {exit} on SIGTERM", self.name);
        started.elapsed()
    }

    /// Pauses the process (SIGSTOP): it holds its sockets but answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Resumes a paused process (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let c = self.child.as_ref().expect("running");
        assert!(Command::new("kill").args([sig, &c.id().to_string()]).status().unwrap().success());
    }

    /// Waits until the replica answers `/ready` with 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !matches!(try_get_raw(self.addr, "/ready"), Some((200, _))) {
            assert!(Instant::now() < deadline, "{} never became ready; log: {}", self.name, self.log.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process's peak resident set so far (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let c = self.child.as_ref()?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", c.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    }

    /// The replica's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim_start().starts_with("at ") && !l.contains("CONFWARN")).collect();
            eprintln!("--- last lines of {}'s log ---\n{}", self.name, lines[lines.len().saturating_sub(40)..].join("\n"));
        }
    }
}
