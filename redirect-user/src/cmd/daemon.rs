//! `redirect daemon`, and the verbs that talk to it over the control
//! socket: `add`, `remove`, `reload`, `status` (its daemon part) and
//! `reset`.

use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Args;
use redirect::{
    control::{Client, ControlError, DEFAULT_CONTROL, ErrorKind, Request},
    daemon::{self, config::Config},
    ebpf::pin::{self, DEFAULT_PIN_DIR},
};

/// `redirect daemon`.
#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// The config file (TOML): pin_dir, control, metrics and [[scope]]
    /// tables.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/redirect/redirect.toml"
    )]
    pub config: PathBuf,
}

/// The control socket of a running daemon.
#[derive(Args, Debug)]
pub struct ControlArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,
}

/// `redirect add|remove SCOPE MAPPING`.
#[derive(Args, Debug)]
pub struct EditArgs {
    /// The scope's name (`redirect status` lists them).
    pub scope: String,
    /// The mapping, `[ADDR:]FROM:TO[/tcp|/udp]`.
    pub mapping: String,
    #[command(flatten)]
    pub control: ControlArgs,
}

/// `redirect reset`.
#[derive(Args, Debug)]
pub struct ResetArgs {
    /// Take the pin directory from this config file.
    #[arg(long, value_name = "FILE", conflicts_with = "pin_dir")]
    pub config: Option<PathBuf>,
    /// The pin directory to clear [default: /sys/fs/bpf/redirect].
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// The control socket of the daemon that must not be running
    /// [default: the config's, or /run/redirect/control.sock].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// Runs the daemon until SIGTERM; tells systemd when the state is live.
pub async fn daemon(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    daemon::run(&args.config, |config| {
        // Not under systemd (no NOTIFY_SOCKET): nothing is sent.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let mut out = io::stdout().lock();
        let _ = writeln!(
            out,
            "ready: redirect daemon with {} scope(s), control {}{}",
            config.scopes.len(),
            config.control.display(),
            config
                .metrics
                .map(|m| format!(", metrics http://{m}/metrics"))
                .unwrap_or_default()
        );
        let _ = out.flush();
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// Sends one request; prints what it returns.
pub fn request(control: &Path, request: Request) -> anyhow::Result<ExitCode> {
    match Client::new(control).request(&request) {
        Ok(result) => {
            if let Some(v) = result {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("redirect: error: {e}");
            let code = match e.kind() {
                Some(ErrorKind::Invalid | ErrorKind::Conflict | ErrorKind::NotFound) => 2,
                _ => 1,
            };
            Ok(ExitCode::from(code))
        }
    }
}

/// The daemon's status, when one answers on `control`.
pub fn daemon_status(control: &Path) -> Option<serde_json::Value> {
    match Client::new(control).request(&Request::Status) {
        Ok(v) => v,
        Err(ControlError::Unavailable { .. }) => None,
        Err(e) => {
            eprintln!("redirect: warning: daemon status: {e}");
            None
        }
    }
}

/// Prints a daemon status (from the control socket or the pins).
pub fn print_daemon(out: &mut impl io::Write, status: &serde_json::Value) -> io::Result<()> {
    let d = &status["daemon"];
    match d["pid"].as_u64() {
        Some(pid) => writeln!(
            out,
            "redirect daemon (pid {pid}), config {}, pins {}",
            d["config"].as_str().unwrap_or("?"),
            d["pin_dir"].as_str().unwrap_or("?")
        )?,
        None => writeln!(
            out,
            "no daemon answers; pinned state in {} (still in force):",
            d["pin_dir"].as_str().unwrap_or("?")
        )?,
    }
    for s in status["scopes"].as_array().into_iter().flatten() {
        let backend = s["backend"].as_str().unwrap_or("ebpf");
        writeln!(
            out,
            "  scope {} ({}) {}{} backend {backend}",
            s["name"].as_str().unwrap_or("?"),
            s["origin"].as_str().unwrap_or("pinned"),
            s["cgroup"]
                .as_str()
                .map_or("every process (proxy)".to_owned(), |c| format!(
                    "cgroup {c}"
                )),
            s["netns"]
                .as_str()
                .map(|n| format!(" netns {n}"))
                .unwrap_or_default()
        )?;
        if let Some(why) = s["backend_reason"].as_str() {
            writeln!(out, "    backend: {why}")?;
        }
        let p = &s["proxy"];
        if p.is_object() {
            writeln!(
                out,
                "    proxy: connections {} active {} refused {} connect failures {} bytes up {} down {}",
                p["accepted"],
                p["active"],
                p["refused"],
                p["connect_failed"],
                p["bytes_up"],
                p["bytes_down"]
            )?;
        }
        for m in s["mappings"].as_array().into_iter().flatten() {
            if p.is_object() {
                writeln!(out, "    {}", m["mapping"].as_str().unwrap_or("?"))?;
                continue;
            }
            writeln!(
                out,
                "    {:<32} connects {:>8} established {:>6} datagrams {:>8}",
                m["mapping"].as_str().unwrap_or("?"),
                m["connects"],
                m["established"],
                m["datagrams"]
            )?;
        }
        if let Some(note) = s["note"].as_str() {
            writeln!(out, "    note: {note}")?;
        }
    }
    Ok(())
}

/// `redirect reset`: removes every pin under the pin directory, which
/// detaches every scope the daemon made; a running daemon is refused.
pub fn reset(args: ResetArgs) -> anyhow::Result<ExitCode> {
    let (pin_dir, default_control) = match &args.config {
        Some(path) => {
            let c = Config::load(path)?;
            (c.pin_dir, c.control)
        }
        None => (
            args.pin_dir
                .clone()
                .unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
            PathBuf::from(DEFAULT_CONTROL),
        ),
    };
    let control = args.control.clone().unwrap_or(default_control);
    if Client::new(&control).request(&Request::Status).is_ok() {
        anyhow::bail!(
            "a redirect daemon answers on {}: stop it first (`systemctl stop redirect`), or it \
             would keep running without its state",
            control.display()
        );
    }
    let removed = pin::reset(&pin_dir)?;
    daemon::state::RuntimeStore::new(&control)
        .remove_all()
        .map_err(|e| {
            anyhow::anyhow!(
                "removing the runtime scopes saved beside {}: {e}",
                control.display()
            )
        })?;
    println!(
        "removed {removed} pin(s) under {}: nothing redirect attached there remains",
        pin_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
