//! `mock-cloud-hypervisor`: a stand-in for `cloud-hypervisor` that serves its REST API on the API socket and
//! answers as the real VMM v54 does (`shared/reference/cloud-hypervisor-behaviour.md`), without KVM or a guest.
//!
//! Command line (as the real one): `--api-socket <path>` (also `--api-socket path=<path>` and
//! `--api-socket=<...>`), `--no-shutdown`, `--version` / `-V` (prints `cloud-hypervisor v54.0.0-mock`); every
//! other flag is ignored.
//!
//! Behaviour (as observed on the real VMM):
//! * a second instance on a socket another live instance serves exits 1 ("already in use by another running
//!   instance"); a stale socket file (left by SIGKILL) does not block;
//! * states Created / Running / Paused (v54 never shows `Shutdown`: `vm.shutdown` returns to Created);
//!   `vm.create` 204 (paths not checked), 500 when a VM exists;
//!   `vm.boot` 204, 404 with no VM, 500 when running, 500 when the payload's kernel (or firmware) or a disk
//!   file is missing (the state stays Created); `vm.shutdown` → Created (500 when not running);
//!   `vm.pause`/`vm.resume` 500 on invalid transitions; `vm.delete` always 204; `vm.power-button` (running)
//!   makes the guest power off shortly after;
//! * `vmm.shutdown` answers **200**, then the process exits 0 and removes its socket, leaving `<socket>.lock`;
//! * a guest power-off ends the process (exit 0, socket removed) unless `--no-shutdown`, then the state
//!   returns to Created;
//! * error bodies are JSON arrays of strings (the error chain); malformed JSON 400; unknown endpoint 404; a
//!   known endpoint with the wrong method 400;
//! * SIGTERM: exits 0 at once, removing the socket;
//! * the serial `File` (if configured) is truncated on every boot and reboot, and gets a line of "guest" output.
//!
//! Injectable faults (environment variables, read at start):
//! | variable | effect |
//! |---|---|
//! | `MOCK_CH_FAIL_BOOT=1` | `vm.boot` answers 500 `["Error from API","The VM could not boot","mock: injected boot failure"]` |
//! | `MOCK_CH_CRASH_AFTER_BOOT_MS=N` | N ms after a boot the process exits with status 1 ("fatal vCPU error"), leaving a stale socket |
//! | `MOCK_CH_GUEST_POWEROFF_AFTER_MS=N` | N ms after a boot the guest powers off (see above) |
//! | `MOCK_CH_DELAY_MS=N` | every answer is sent N ms late |
//! | `MOCK_CH_STARTUP_DELAY_MS=N` | the socket appears N ms after start |
//! | `MOCK_CH_EXIT_AT_START=N` | prints an error and exits with status N before serving |
//! | `MOCK_CH_POWER_BUTTON=ignore` | the guest ignores the ACPI power button (default: powers off after `MOCK_CH_POWER_BUTTON_DELAY_MS`, 50) |
//! | `MOCK_CH_HANG_VMM_SHUTDOWN=1` | `vmm.shutdown` answers 200 but the process stays |
//! | `MOCK_CH_IGNORE_SIGTERM=1` | SIGTERM is ignored (only SIGKILL ends it) |
//!
//! What the mock received, for tests: the last `vm.create` body verbatim in `<socket>.vmconfig.json`, and one
//! line `<METHOD> <endpoint>` per request in `<socket>.requests.log`.
//!
//! Test hygiene (not in the real VMM): the mock exits 0 when its socket file disappears (e.g. a test's
//! temporary directory was removed), so that no mock outlives its test.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const VERSION: &str = "v54.0.0-mock";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VmState {
    Created,
    Running,
    Paused,
}

impl VmState {
    fn name(self) -> &'static str {
        match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Faults {
    fail_boot: bool,
    crash_after_boot_ms: Option<u64>,
    poweroff_after_boot_ms: Option<u64>,
    delay_ms: u64,
    startup_delay_ms: u64,
    exit_at_start: Option<i32>,
    ignore_power_button: bool,
    power_button_delay_ms: u64,
    hang_vmm_shutdown: bool,
    ignore_sigterm: bool,
}

impl Faults {
    fn from_env() -> Faults {
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<u64>().ok());
        let flag = |k: &str| {
            std::env::var(k)
                .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
                .unwrap_or(false)
        };
        Faults {
            fail_boot: flag("MOCK_CH_FAIL_BOOT"),
            crash_after_boot_ms: num("MOCK_CH_CRASH_AFTER_BOOT_MS"),
            poweroff_after_boot_ms: num("MOCK_CH_GUEST_POWEROFF_AFTER_MS"),
            delay_ms: num("MOCK_CH_DELAY_MS").unwrap_or(0),
            startup_delay_ms: num("MOCK_CH_STARTUP_DELAY_MS").unwrap_or(0),
            exit_at_start: std::env::var("MOCK_CH_EXIT_AT_START")
                .ok()
                .and_then(|v| v.trim().parse().ok()),
            ignore_power_button: std::env::var("MOCK_CH_POWER_BUTTON")
                .map(|v| v == "ignore")
                .unwrap_or(false),
            power_button_delay_ms: num("MOCK_CH_POWER_BUTTON_DELAY_MS").unwrap_or(50),
            hang_vmm_shutdown: flag("MOCK_CH_HANG_VMM_SHUTDOWN"),
            ignore_sigterm: flag("MOCK_CH_IGNORE_SIGTERM"),
        }
    }
}

struct Vm {
    config: Value,
    state: VmState,
}

struct Inner {
    vm: Option<Vm>,
    /// Bumped on every boot/shutdown, so that a timer armed for one boot does nothing after the next change.
    generation: u64,
}

struct Mock {
    socket: PathBuf,
    no_shutdown: bool,
    faults: Faults,
    inner: Mutex<Inner>,
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl Mock {
    /// Ends the process the way the real VMM does on a clean exit: socket removed, `<socket>.lock` left.
    fn exit_clean(&self, code: i32) -> ! {
        let _ = std::fs::remove_file(&self.socket);
        std::process::exit(code)
    }

    fn log_request(&self, method: &Method, endpoint: &str) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(with_suffix(&self.socket, ".requests.log"))
        {
            let _ = writeln!(f, "{method} {endpoint}");
        }
    }

    fn serial_file(config: &Value) -> Option<PathBuf> {
        let serial = config.get("serial")?;
        if serial.get("mode")?.as_str()? != "File" {
            return None;
        }
        Some(PathBuf::from(serial.get("file")?.as_str()?))
    }

    /// The guest powered itself off.
    fn guest_poweroff(self: &Arc<Self>) {
        if self.no_shutdown {
            let mut inner = self.inner.lock().unwrap();
            if let Some(vm) = inner.vm.as_mut() {
                vm.state = VmState::Created;
            }
            inner.generation += 1;
        } else {
            eprintln!("mock-cloud-hypervisor: guest powered off, VMM exiting");
            self.exit_clean(0);
        }
    }

    /// Arms a timer for the current boot generation.
    fn after_boot(self: &Arc<Self>, ms: u64, what: fn(&Arc<Mock>)) {
        let generation = self.inner.lock().unwrap().generation;
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let current = {
                let inner = me.inner.lock().unwrap();
                inner.generation == generation && inner.vm.as_ref().map(|v| v.state) == Some(VmState::Running)
            };
            if current {
                what(&me);
            }
        });
    }
}

fn reply(status: StatusCode, body: Option<Value>) -> Response<Full<Bytes>> {
    let mut b = Response::builder().status(status);
    let bytes = match body {
        Some(v) => {
            b = b.header("Content-Type", "application/json");
            Bytes::from(serde_json::to_vec(&v).unwrap())
        }
        None => Bytes::new(),
    };
    b.body(Full::new(bytes)).unwrap()
}

fn chain(status: StatusCode, parts: &[&str]) -> Response<Full<Bytes>> {
    reply(status, Some(json!(parts)))
}

fn fill_defaults(mut cfg: Value) -> Value {
    let obj = cfg.as_object_mut().expect("checked object");
    obj.entry("cpus").or_insert(json!({"boot_vcpus": 1, "max_vcpus": 1}));
    obj.entry("memory").or_insert(json!({"size": 536_870_912u64}));
    obj.entry("console").or_insert(json!({"mode": "Tty"}));
    obj.entry("serial").or_insert(json!({"mode": "Null"}));
    obj.entry("disks").or_insert(Value::Null);
    obj.entry("net").or_insert(Value::Null);
    cfg
}

const GET_ENDPOINTS: &[&str] = &["vmm.ping", "vm.info", "vm.counters"];
const PUT_ENDPOINTS: &[&str] = &[
    "vmm.shutdown",
    "vm.create",
    "vm.delete",
    "vm.boot",
    "vm.pause",
    "vm.resume",
    "vm.shutdown",
    "vm.reboot",
    "vm.power-button",
    "vm.resize",
    "vm.resize-disk",
    "vm.resize-zone",
    "vm.add-device",
    "vm.remove-device",
    "vm.add-disk",
    "vm.add-fs",
    "vm.add-pmem",
    "vm.add-net",
    "vm.add-vsock",
    "vm.add-vdpa",
    "vm.add-user-device",
    "vm.snapshot",
    "vm.coredump",
    "vm.nmi",
    "vm.restore",
    "vm.receive-migration",
    "vm.send-migration",
];

async fn handle(mock: Arc<Mock>, req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if mock.faults.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(mock.faults.delay_ms)).await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let Some(endpoint) = path.strip_prefix("/api/v1/") else {
        return Ok(chain(StatusCode::NOT_FOUND, &["Error from API", "Unknown path"]));
    };
    mock.log_request(&method, endpoint);
    let wants = if GET_ENDPOINTS.contains(&endpoint) {
        Method::GET
    } else if PUT_ENDPOINTS.contains(&endpoint) {
        Method::PUT
    } else {
        return Ok(chain(StatusCode::NOT_FOUND, &["Error from API", "Unknown endpoint"]));
    };
    if method != wants {
        return Ok(chain(
            StatusCode::BAD_REQUEST,
            &["Error from API", "Bad request: wrong method"],
        ));
    }
    Ok(route(&mock, endpoint, &body))
}

fn route(mock: &Arc<Mock>, endpoint: &str, body: &[u8]) -> Response<Full<Bytes>> {
    use StatusCode as S;
    let mut inner = mock.inner.lock().unwrap();
    match endpoint {
        "vmm.ping" => reply(
            S::OK,
            Some(json!({
                "build_version": VERSION,
                "version": VERSION.trim_start_matches('v'),
                "pid": std::process::id(),
                "features": ["kvm", "io_uring"],
            })),
        ),
        "vmm.shutdown" => {
            if !mock.faults.hang_vmm_shutdown {
                let me = mock.clone();
                tokio::spawn(async move {
                    // Let the answer go out first.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    me.exit_clean(0);
                });
            }
            reply(S::OK, None)
        }
        "vm.info" => match &inner.vm {
            None => chain(S::NOT_FOUND, &["Error from API", "VM is not created"]),
            Some(vm) => {
                let mut info = json!({
                    "config": vm.config,
                    "state": vm.state.name(),
                    "memory_actual_size": vm.config["memory"]["size"],
                });
                if vm.state != VmState::Created {
                    info["device_tree"] = json!({});
                }
                reply(S::OK, Some(info))
            }
        },
        "vm.counters" => match &inner.vm {
            Some(vm) if vm.state == VmState::Running || vm.state == VmState::Paused => reply(S::OK, Some(json!({}))),
            _ => chain(S::INTERNAL_SERVER_ERROR, &["Error from API", "VM is not running"]),
        },
        "vm.create" => {
            let cfg: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => {
                    return chain(
                        S::BAD_REQUEST,
                        &["Error from API", &format!("Failed to parse request body: {e}")],
                    )
                }
            };
            if !cfg.is_object() || cfg.get("payload").is_none_or(|p| !p.is_object()) {
                return chain(
                    S::BAD_REQUEST,
                    &[
                        "Error from API",
                        "Failed to parse request body: missing field `payload`",
                    ],
                );
            }
            if inner.vm.is_some() {
                return chain(
                    S::INTERNAL_SERVER_ERROR,
                    &["Error from API", "The VM could not be created", "VM is already created"],
                );
            }
            let _ = std::fs::write(with_suffix(&mock.socket, ".vmconfig.json"), body);
            inner.vm = Some(Vm {
                config: fill_defaults(cfg),
                state: VmState::Created,
            });
            reply(S::NO_CONTENT, None)
        }
        "vm.boot" => {
            let Some(vm) = inner.vm.as_mut() else {
                return chain(
                    S::NOT_FOUND,
                    &["Error from API", "The VM could not boot", "VM config is missing"],
                );
            };
            if vm.state == VmState::Running || vm.state == VmState::Paused {
                return chain(
                    S::INTERNAL_SERVER_ERROR,
                    &["Error from API", "The VM could not boot", "VM is already running"],
                );
            }
            if mock.faults.fail_boot {
                return chain(
                    S::INTERNAL_SERVER_ERROR,
                    &["Error from API", "The VM could not boot", "mock: injected boot failure"],
                );
            }
            let payload = &vm.config["payload"];
            let boot_file = payload
                .get("kernel")
                .or_else(|| payload.get("firmware"))
                .and_then(|k| k.as_str());
            match boot_file {
                None => {
                    return chain(
                        S::INTERNAL_SERVER_ERROR,
                        &[
                            "Error from API",
                            "The VM could not boot",
                            "Error booting VM: no kernel or firmware in the payload",
                        ],
                    )
                }
                Some(k) if !Path::new(k).is_file() => {
                    let msg = format!("Cannot load kernel {k}: No such file or directory (os error 2)");
                    return chain(
                        S::INTERNAL_SERVER_ERROR,
                        &["Error from API", "The VM could not boot", &msg],
                    );
                }
                _ => {}
            }
            let disks = vm.config["disks"].as_array().cloned().unwrap_or_default();
            for d in disks {
                let p = d["path"].as_str().unwrap_or("");
                if !Path::new(p).is_file() {
                    let msg = format!("Failed to open disk image {p}: No such file or directory (os error 2)");
                    return chain(
                        S::INTERNAL_SERVER_ERROR,
                        &["Error from API", "The VM could not boot", &msg],
                    );
                }
            }
            if let Some(serial) = Mock::serial_file(&vm.config) {
                let _ = std::fs::write(&serial, b"mock guest: booted\n");
            }
            vm.state = VmState::Running;
            inner.generation += 1;
            drop(inner);
            if let Some(ms) = mock.faults.crash_after_boot_ms {
                mock.after_boot(ms, |_| {
                    eprintln!("mock-cloud-hypervisor: fatal vCPU error (injected); exiting");
                    std::process::exit(1);
                });
            }
            if let Some(ms) = mock.faults.poweroff_after_boot_ms {
                mock.after_boot(ms, |m| m.guest_poweroff());
            }
            reply(S::NO_CONTENT, None)
        }
        "vm.shutdown" => match inner.vm.as_mut() {
            Some(vm) if vm.state == VmState::Running || vm.state == VmState::Paused => {
                vm.state = VmState::Created;
                inner.generation += 1;
                reply(S::NO_CONTENT, None)
            }
            _ => chain(
                S::INTERNAL_SERVER_ERROR,
                &["Error from API", "The VM could not shut down", "VM is not running"],
            ),
        },
        "vm.pause" => match inner.vm.as_mut() {
            Some(vm) if vm.state == VmState::Running => {
                vm.state = VmState::Paused;
                reply(S::NO_CONTENT, None)
            }
            _ => chain(
                S::INTERNAL_SERVER_ERROR,
                &["Error from API", "The VM could not be paused", "Invalid transition"],
            ),
        },
        "vm.resume" => match inner.vm.as_mut() {
            Some(vm) if vm.state == VmState::Paused => {
                vm.state = VmState::Running;
                reply(S::NO_CONTENT, None)
            }
            _ => chain(
                S::INTERNAL_SERVER_ERROR,
                &["Error from API", "The VM could not resume", "Invalid transition"],
            ),
        },
        "vm.reboot" => match inner.vm.as_ref() {
            Some(vm) if vm.state == VmState::Running => {
                if let Some(serial) = Mock::serial_file(&vm.config) {
                    let _ = std::fs::write(&serial, b"mock guest: rebooted\n");
                }
                reply(S::NO_CONTENT, None)
            }
            _ => chain(
                S::INTERNAL_SERVER_ERROR,
                &["Error from API", "The VM could not reboot", "VM is not running"],
            ),
        },
        "vm.power-button" => match inner.vm.as_ref() {
            Some(vm) if vm.state == VmState::Running => {
                drop(inner);
                if !mock.faults.ignore_power_button {
                    mock.after_boot(mock.faults.power_button_delay_ms, |m| m.guest_poweroff());
                }
                reply(S::NO_CONTENT, None)
            }
            _ => chain(
                S::INTERNAL_SERVER_ERROR,
                &["Error from API", "The VM could not be powered off", "VM is not running"],
            ),
        },
        "vm.delete" => {
            inner.vm = None;
            inner.generation += 1;
            reply(S::NO_CONTENT, None)
        }
        _ => chain(
            S::INTERNAL_SERVER_ERROR,
            &["Error from API", &format!("{endpoint} is not supported by the mock")],
        ),
    }
}

/// `--api-socket <v>`, `--api-socket=<v>`, with `<v>` = `<path>` or `path=<path>[,...]`.
fn socket_arg(value: &str) -> PathBuf {
    let v = value
        .split(',')
        .find_map(|kv| kv.strip_prefix("path="))
        .unwrap_or(value);
    PathBuf::from(v)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut socket: Option<PathBuf> = None;
    let mut no_shutdown = false;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        match a.as_str() {
            "--version" | "-V" => {
                println!("cloud-hypervisor {VERSION}");
                return;
            }
            "--no-shutdown" => no_shutdown = true,
            "--api-socket" => {
                i += 1;
                socket = args.get(i).map(|v| socket_arg(v));
            }
            _ => {
                if let Some(v) = a.strip_prefix("--api-socket=") {
                    socket = Some(socket_arg(v));
                }
            }
        }
        i += 1;
    }
    let Some(socket) = socket else {
        eprintln!("Error: mock-cloud-hypervisor needs --api-socket <path>");
        std::process::exit(1);
    };
    let faults = Faults::from_env();
    if let Some(code) = faults.exit_at_start {
        eprintln!("Error: mock: injected start failure");
        std::process::exit(code);
    }
    if faults.startup_delay_ms > 0 {
        std::thread::sleep(Duration::from_millis(faults.startup_delay_ms));
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            eprintln!(
                "Error: Error creating the API socket: {} is already in use by another running instance",
                socket.display()
            );
            std::process::exit(1);
        }
        let _ = std::fs::remove_file(&socket);
    }
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(with_suffix(&socket, ".lock"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(serve(Arc::new(Mock {
        socket,
        no_shutdown,
        faults,
        inner: Mutex::new(Inner {
            vm: None,
            generation: 0,
        }),
    })));
}

async fn serve(mock: Arc<Mock>) {
    let listener = match tokio::net::UnixListener::bind(&mock.socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("Error: Error creating the API socket {}: {e}", mock.socket.display());
            std::process::exit(1);
        }
    };
    eprintln!(
        "mock-cloud-hypervisor {VERSION}: serving {} (pid {})",
        mock.socket.display(),
        std::process::id()
    );
    {
        let me = mock.clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
            loop {
                term.recv().await;
                if !me.faults.ignore_sigterm {
                    eprintln!("mock-cloud-hypervisor: SIGTERM, exiting");
                    me.exit_clean(0);
                }
            }
        });
    }
    {
        let me = mock.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if std::fs::symlink_metadata(&me.socket).is_err() {
                    eprintln!("mock-cloud-hypervisor: socket removed, exiting");
                    std::process::exit(0);
                }
            }
        });
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let me = mock.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(me.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
