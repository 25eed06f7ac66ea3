//! `redirect doctor`: prints what works on this host and what to do about
//! the rest; exits 0 only when the chosen backend can run.

use std::{
    io::{self, Write as _},
    process::ExitCode,
};

use clap::Args;
use redirect::{MappingSet, doctor};

use super::proxy::Backend;

/// `redirect doctor [--map …] [--backend …] [--json]`.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Also check this mapping: is TO listened on (by whom), is FROM free,
    /// can the proxy bind FROM, do firewall rules touch the ports
    /// (repeatable).
    #[arg(long = "map", value_name = "[ADDR:]FROM:TO[/tcp|/udp]")]
    maps: Vec<String>,

    /// The backend that must be able to run for exit code 0.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    backend: Backend,

    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs the checks and prints the report.
pub fn run(args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let mappings = if args.maps.is_empty() {
        MappingSet::default()
    } else {
        MappingSet::parse(&args.maps)?
    };
    let report = doctor::diagnose(&mappings);
    let backend = match args.backend {
        Backend::Auto => "auto",
        Backend::Ebpf => "ebpf",
        Backend::Proxy => "proxy",
    };
    let ok = report.can_run(backend);
    let runs = if report.ebpf.can_run {
        "ebpf"
    } else if report.proxy.can_run {
        "proxy"
    } else {
        "nothing"
    };
    let mut out = io::stdout().lock();
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["backend"] = backend.into();
        value["auto_runs"] = runs.into();
        value["ok"] = ok.into();
        serde_json::to_writer_pretty(&mut out, &value)?;
        writeln!(out)?;
    } else {
        render(&mut out, &report)?;
        writeln!(out)?;
        for (name, v) in [("ebpf", &report.ebpf), ("proxy", &report.proxy)] {
            let can = if v.can_run { "can run" } else { "cannot run" };
            writeln!(out, "backend {name:<6} {can}: {}", v.why)?;
        }
        writeln!(out, "--backend auto runs: {runs}")?;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn render(out: &mut impl io::Write, report: &doctor::Report) -> io::Result<()> {
    let width = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    writeln!(out, "{:<width$}  {:<6} DETAIL", "CHECK", "STATUS")?;
    for c in &report.checks {
        writeln!(
            out,
            "{:<width$}  {:<6} {}",
            c.name,
            c.status.label(),
            c.detail
        )?;
        if !c.fix.is_empty() {
            writeln!(out, "{:<width$}  {:<6} -> {}", "", "", c.fix)?;
        }
    }
    Ok(())
}
