//! `redirect run --backend auto|ebpf|proxy` and the proxy's options: which
//! backend runs, and running the fallback proxy until SIGINT or SIGTERM.

use std::{
    io::{self, Write as _},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use redirect::{MappingSet, Proxy, ProxyOptions, ProxyProtocol, proxy::ProxyError};

/// Which implementation does the redirecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// eBPF where its programs load and attach, otherwise the proxy.
    Auto,
    /// The eBPF programs only (Linux; root or CAP_BPF + CAP_NET_ADMIN).
    Ebpf,
    /// The userspace proxy only: listens on FROM, connects to TO.
    Proxy,
}

/// `--backend` and the fallback proxy's options (flattened into `run`).
#[derive(Args, Debug, Clone)]
pub struct BackendArgs {
    /// Which backend redirects: `ebpf` rewrites connects in the kernel
    /// (scoped, transparent, no copy); `proxy` listens on FROM and forwards
    /// to TO in userspace (any OS, no privileges beyond binding FROM);
    /// `auto` tries eBPF and falls back to the proxy, saying why.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,

    /// Proxy only: send a PROXY protocol header (v1 or v2) to TO first, so
    /// that the backend learns the real client address (nginx
    /// `listen … proxy_protocol`, haproxy `accept-proxy`).
    #[arg(long, value_name = "v1|v2")]
    pub proxy_protocol: Option<ProxyProtocol>,

    /// Proxy only: open TCP connections per mapping beyond which new
    /// clients are closed at once.
    #[arg(long, value_name = "N", default_value_t = ProxyOptions::default().max_connections)]
    pub max_connections: usize,

    /// Proxy only: close a TCP connection idle for this many seconds
    /// (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub idle_timeout: u64,

    /// Proxy only: on SIGINT or SIGTERM, let open connections finish for
    /// up to this many seconds before closing them.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub drain_timeout: u64,

    /// Proxy only: copy through a buffer instead of splice(2) (Linux).
    #[arg(long)]
    pub no_splice: bool,

    /// Proxy only: threads accepting and serving TCP connections, each
    /// with its own SO_REUSEPORT listener per mapping (Linux; elsewhere
    /// 1). Default: one per CPU, at most 4.
    // No `default_value_t`: clap would compute it (reading the cgroup's CPU
    // quota) each time the CLI is built, for every command.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
}

impl BackendArgs {
    /// The proxy's options from the flags.
    pub fn proxy_options(&self) -> ProxyOptions {
        ProxyOptions {
            proxy_protocol: self.proxy_protocol,
            max_connections: self.max_connections.max(1),
            idle_timeout: (self.idle_timeout > 0).then(|| Duration::from_secs(self.idle_timeout)),
            drain_timeout: Duration::from_secs(self.drain_timeout),
            splice: cfg!(target_os = "linux") && !self.no_splice,
            workers: self
                .workers
                .unwrap_or_else(redirect::proxy::default_workers)
                .max(1),
            ..ProxyOptions::default()
        }
    }
}

/// Runs the proxy for `mappings` until SIGINT or SIGTERM, then drains.
/// `why` says why this backend was chosen (printed on the ready line).
pub async fn run(mappings: &MappingSet, args: &BackendArgs, why: &str) -> anyhow::Result<ExitCode> {
    // Handlers first: a signal while binding is then handled like one after.
    let shutdown = shutdown_signal()?;
    raise_open_files_limit();
    let proxy = Proxy::bind(mappings, args.proxy_options()).map_err(explain)?;
    let addrs: Vec<String> = proxy
        .local_addrs()
        .iter()
        .map(|(proto, addr)| format!("{addr}/{}", proto.as_str()))
        .collect();
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "ready: proxying {mappings} on {} (backend proxy: {why})",
        addrs.join(", ")
    )?;
    out.flush()?;
    drop(out);
    let stats = proxy.stats();
    proxy
        .run(async {
            let signal = shutdown.await;
            log::info!(
                "{signal}: no new connections; draining for up to {}s",
                args.drain_timeout
            );
        })
        .await?;
    log::debug!("proxy stopped: {stats:?}");
    Ok(ExitCode::SUCCESS)
}

/// Room for as many connections as the hard limit on open files allows
/// (the usual soft limit, 1,024, holds ~500). A failure only means the
/// limit stays as it was: a proxy that runs out logs it at accept time.
fn raise_open_files_limit() {
    match redirect::proxy::raise_open_files_limit() {
        Ok(Some(n)) => log::debug!("open files limit: {n}"),
        Ok(None) => {}
        Err(e) => log::warn!("raising the open files limit: {e}; keeping the current one"),
    }
}

fn explain(e: ProxyError) -> anyhow::Error {
    anyhow::Error::new(e).context("the proxy backend cannot listen on FROM")
}

/// Resolves with the name of the first SIGINT or SIGTERM (Ctrl-C or
/// Ctrl-Break on Windows).
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("installing a signal handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing a signal handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    })
}

#[cfg(windows)]
fn shutdown_signal() -> anyhow::Result<impl Future<Output = &'static str>> {
    use tokio::signal::windows::{ctrl_break, ctrl_c};
    let mut c = ctrl_c().context("installing a Ctrl-C handler")?;
    let mut b = ctrl_break().context("installing a Ctrl-Break handler")?;
    Ok(async move {
        tokio::select! {
            _ = c.recv() => "Ctrl-C",
            _ = b.recv() => "Ctrl-Break",
        }
    })
}

/// Whether `--backend proxy` was asked for: then the reason for the ready
/// line. Options only the eBPF backend has (`--cgroup`, `--owner`,
/// `--grant`: `scoped`) are a usage error with it (exit 2), and so is
/// `--proxy-protocol` with `--backend ebpf`.
pub fn chosen(args: &BackendArgs, scoped: bool) -> Option<&'static str> {
    match args.backend {
        Backend::Proxy if scoped => usage_error(
            "--cgroup, --owner and --grant need the eBPF backend: the proxy listens on FROM \
             for every process of the host and cannot be scoped",
        ),
        Backend::Proxy => Some("chosen with --backend proxy"),
        Backend::Ebpf if args.proxy_protocol.is_some() => usage_error(
            "--proxy-protocol is for the proxy backend: with eBPF the server already sees the \
             real client address",
        ),
        Backend::Auto | Backend::Ebpf => None,
    }
}

fn usage_error(msg: &str) -> ! {
    clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, format!("{msg}\n")).exit()
}

/// What the ready line adds when eBPF runs.
pub fn ebpf_why(args: &BackendArgs) -> &'static str {
    match args.backend {
        Backend::Auto => " (backend ebpf: auto, its programs loaded and attached)",
        _ => " (backend ebpf)",
    }
}

/// eBPF could not be set up (`err`): with `--backend auto` and nothing
/// that needs eBPF (`scoped`), run the proxy instead and say why;
/// otherwise fail with `err`.
pub async fn fall_back(
    mappings: &MappingSet,
    args: &BackendArgs,
    scoped: bool,
    err: anyhow::Error,
) -> anyhow::Result<ExitCode> {
    if args.backend != Backend::Auto || scoped {
        let err = if scoped && args.backend == Backend::Auto {
            err.context(
                "the eBPF backend is needed for --cgroup, --owner and --grant (the proxy \
                 cannot be scoped), so there is no fallback",
            )
        } else {
            err
        };
        return Err(err);
    }
    let cause = format!("{err:#}");
    log::warn!("eBPF backend unavailable ({cause}); falling back to the proxy");
    let why = format!("auto, because eBPF is unavailable: {cause}");
    run(mappings, args, &why).await
}

/// `run` in a build without the eBPF backend (macOS, Windows, or Linux
/// built with `--no-default-features`): the proxy for `auto` and `proxy`;
/// `--backend ebpf` and the options only eBPF has are errors.
#[cfg(not(with_ebpf))]
pub async fn run_without_ebpf(
    mappings: &MappingSet,
    args: &BackendArgs,
    scoped: bool,
) -> anyhow::Result<ExitCode> {
    let missing = if cfg!(target_os = "linux") {
        "this build has no eBPF backend (built without the `ebpf` feature)"
    } else {
        "eBPF redirection exists only on Linux"
    };
    if args.backend == Backend::Ebpf || scoped {
        anyhow::bail!(
            "{missing}: --backend ebpf, --cgroup, --netns, --owner and --grant are not \
             available; use --backend proxy (or auto) without them"
        );
    }
    let why = match args.backend {
        Backend::Proxy => "chosen with --backend proxy".to_owned(),
        _ => format!("auto, because {missing}"),
    };
    run(mappings, args, &why).await
}
