//! `redirect oci-hook`: the OCI runtime hook (createRuntime and poststop)
//! that asks the running daemon for a scope per annotated container.
//!
//! It is synchronous and starts no runtime of its own: a hook adds its run
//! time to every container start, so it reads stdin, decides
//! ([`redirect::oci::plan`]), sends one request and exits. Exit codes: 0
//! done (or nothing to do), 2 bad state or annotations, 1 the daemon is
//! unreachable or refused.

use std::{
    io::{self, Read as _},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use redirect::{
    control::{Client, ControlError, DEFAULT_CONTROL, ErrorKind, Request},
    oci::{self, Action, HookInput, OciError, State},
};

/// Arguments of `redirect oci-hook`.
#[derive(clap::Args, Debug)]
pub struct OciHookArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL)]
    control: PathBuf,

    /// How long to wait for the daemon, in milliseconds (runtimes have
    /// their own hook timeout; this one should be shorter).
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    timeout_ms: u64,
}

/// The largest state accepted on stdin; real ones are a few KiB.
const MAX_STATE: u64 = 1 << 20;

/// Runs the hook; never fails past this point: every error is printed and
/// turned into the exit code.
pub fn run(args: &OciHookArgs) -> ExitCode {
    match hook(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("redirect oci-hook: error: {message}");
            ExitCode::from(code)
        }
    }
}

fn hook(args: &OciHookArgs) -> Result<(), (u8, String)> {
    let oci_error = |e: OciError| (if e.is_bad_input() { 2 } else { 1 }, e.to_string());
    let mut text = String::new();
    io::stdin()
        .take(MAX_STATE)
        .read_to_string(&mut text)
        .map_err(|e| (2, format!("reading the container state on stdin: {e}")))?;
    let state = State::parse(&text).map_err(oci_error)?;
    let host = match (oci::needs_host(&state), state.pid) {
        (true, Some(pid)) => Some(HookInput::read_host(pid).map_err(oci_error)?),
        _ => None,
    };
    let request = match oci::plan(&state, host.as_ref()).map_err(oci_error)? {
        Action::Nothing(why) => {
            log::debug!("container {}: {why}", state.id);
            return Ok(());
        }
        Action::Send(request) => request,
    };
    let client = Client::new(&args.control).with_timeout(Duration::from_millis(args.timeout_ms));
    match (client.request(&request), &request) {
        (Ok(_), _) => Ok(()),
        // Gone already: the daemon removes scopes whose cgroup disappeared.
        (Err(e), Request::RemoveScope { .. }) if e.kind() == Some(ErrorKind::NotFound) => Ok(()),
        // In a pod, the first container to start adds the pod's scope.
        (Err(e), Request::AddScope { scope })
            if e.kind() == Some(ErrorKind::Conflict)
                && scope
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("oci-pod-"))
                && has_scope(&client, &scope.name()) =>
        {
            Ok(())
        }
        (Err(e), _) => Err((1, refusal(&state, &e))),
    }
}

/// Whether the daemon's status names a scope `name` (anywhere in it, so
/// that this does not depend on the status's exact shape).
fn has_scope(client: &Client, name: &str) -> bool {
    fn find(v: &serde_json::Value, name: &str) -> bool {
        match v {
            serde_json::Value::Object(m) => {
                m.get("name").and_then(|n| n.as_str()) == Some(name)
                    || m.values().any(|v| find(v, name))
            }
            serde_json::Value::Array(a) => a.iter().any(|v| find(v, name)),
            _ => false,
        }
    }
    matches!(client.request(&Request::Status), Ok(Some(v)) if find(&v, name))
}

/// The message for a failed exchange, saying what it means for the
/// container.
fn refusal(state: &State, e: &ControlError) -> String {
    let what = match e {
        ControlError::Unavailable { .. } => {
            "the container is not started, because it asked (io.redirect.*) for ports that \
             nothing would serve"
        }
        _ => "the daemon did not set up the container's scope",
    };
    format!("container {}: {e}; {what}", state.id)
}
