//! Command line: parses arguments, maps every failure to a meaningful exit status, and
//! runs the chosen command. The only place that uses `anyhow`.
//!
//! Exit statuses (also in README): 0 success; 1 runtime failure; 2 usage error;
//! 74 (EX_IOERR) the spool cannot be opened even after setting it aside;
//! 78 (EX_CONFIG) bad configuration, site file or device key — systemd does not restart
//! on it (`RestartPreventExitStatus=78`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{AuthMode, Config, ConfigError};
use crate::keys::{DeviceKey, KeyError, KeyStore};
use crate::pipeline::{self, PipelineError};
use crate::site::SiteError;
use crate::spool::{Spool, SpoolError};

pub const EX_OK: u8 = 0;
pub const EX_FAILURE: u8 = 1;
pub const EX_USAGE: u8 = 2;
pub const EX_IOERR: u8 = 74;
pub const EX_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(
    name = "chekt-agent",
    version,
    about = "Forwards a site's alarm events from MQTT to CHeKT, one way, losing nothing"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (what systemd starts).
    Run,
    /// Validate the configuration, the site file and the device key; change nothing.
    CheckConfig,
    /// Install: create the device key, write the given settings into the configuration,
    /// create a minimal site file, print the JWK, validate. Idempotent.
    Provision(Box<crate::provision::ProvisionArgs>),
    /// Manage the device key.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Inspect the spool (stop the agent first: the store is locked while it runs).
    #[command(subcommand)]
    Spool(SpoolCommand),
    /// Run the whole agent on embedded defaults: an in-process MQTT broker, the CHeKT
    /// simulator, a scripted site and an outage; print what CHeKT received.
    #[cfg(feature = "simulator")]
    Demo(crate::demo::DemoArgs),
    /// Serve the CHeKT simulator (HTTPS, test CA) for testing gateways.
    #[cfg(feature = "simulator")]
    Simulator(crate::simulator::SimArgs),
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create the device key (ES256), or import an RSA PKCS#8 PEM key with --rsa.
    Generate {
        /// Import this RSA private key (PKCS#8 PEM, >= 2048 bits) instead of generating.
        #[arg(long, value_name = "PEM")]
        rsa: Option<PathBuf>,
        /// Key directory (default: chekt.key_dir from the configuration).
        #[arg(long)]
        key_dir: Option<PathBuf>,
    },
    /// Print the public key(s) as JWK, ready to register with CHeKT.
    Show {
        #[arg(long)]
        key_dir: Option<PathBuf>,
    },
    /// Stage a next key and print its JWK; the agent promotes it once CHeKT accepts it.
    Rotate {
        #[arg(long, value_name = "PEM")]
        rsa: Option<PathBuf>,
        /// Replace an already staged next key.
        #[arg(long)]
        replace: bool,
        #[arg(long)]
        key_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SpoolCommand {
    /// List dead letters as JSON lines (reason, topic, original bytes).
    DeadLetters,
    /// Print backlog and counters.
    Status,
}

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EX_USAGE } else { EX_OK });
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = exit_code_for(&e);
            eprintln!("chekt-agent: error: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// Maps an error to its exit status by its type.
pub fn exit_code_for(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(p) = cause.downcast_ref::<crate::provision::ProvisionError>() {
            return p.exit_code();
        }
        if cause.is::<ConfigError>() || cause.is::<SiteError>() || cause.is::<KeyError>() {
            return EX_CONFIG;
        }
        if let Some(PipelineError::Upload(crate::upload::UploadError::CaFile { .. })) =
            cause.downcast_ref::<PipelineError>()
        {
            return EX_CONFIG;
        }
        if cause.is::<SpoolError>() {
            return EX_IOERR;
        }
        if let Some(PipelineError::Spool(_)) = cause.downcast_ref::<PipelineError>() {
            return EX_IOERR;
        }
    }
    EX_FAILURE
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // journald stamps lines itself.
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).try_init()
    } else {
        builder.try_init()
    };
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn key_store(config: &std::path::Path, key_dir: Option<PathBuf>) -> anyhow::Result<KeyStore> {
    if let Some(d) = key_dir {
        return Ok(KeyStore::from_env(d));
    }
    let (cfg, _) = Config::load(config)?;
    match &cfg.chekt.auth {
        AuthMode::Assertion(a) => Ok(a.key_store()),
        AuthMode::ApiKey(_) => Err(ConfigError::Invalid {
            path: config.display().to_string(),
            key: "chekt.auth".into(),
            message: "is \"api_key\": there is no device key to manage (use --key-dir to manage one anyway)".into(),
        }
        .into()),
    }
}

fn new_key(rsa: Option<PathBuf>) -> anyhow::Result<DeviceKey> {
    Ok(match rsa {
        Some(p) => {
            let pem = std::fs::read_to_string(&p).map_err(|source| KeyError::Read {
                path: p.display().to_string(),
                source,
            })?;
            DeviceKey::from_pem(&pem, &p.display().to_string())?
        }
        None => DeviceKey::generate_es256()?,
    })
}

fn print_jwk(label: &str, k: &DeviceKey) {
    println!("# {label}: kid {} ({:?})", k.kid(), k.alg());
    println!(
        "{}",
        serde_json::to_string_pretty(k.public_jwk()).unwrap_or_default()
    );
}

/// Run a parsed command line; returns the exit status.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    crate::jwt::install();
    match cli.command {
        Command::Run => {
            let (cfg, site) = Config::load(&cli.config)?;
            init_logging(&cfg.log_level);
            if let AuthMode::Assertion(a) = &cfg.chekt.auth {
                // Fail fast (exit 78) on a missing or exposed key, before anything starts.
                let store = a.key_store();
                let k = store.current()?;
                tracing::info!(key = %store.current_path().display(), kid = %k.kid(), alg = ?k.alg(), "device key");
            }
            let rt = runtime()?;
            let report = rt.block_on(async {
                let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
                let shutdown = signals(reload_tx)?;
                anyhow::Ok(
                    pipeline::run(
                        &cfg,
                        site,
                        pipeline::Options::default(),
                        shutdown,
                        reload_rx,
                    )
                    .await?,
                )
            })?;
            Ok(if report.not_stopped.is_empty() {
                EX_OK
            } else {
                EX_FAILURE
            })
        }
        Command::CheckConfig => {
            let (cfg, site) = Config::load(&cli.config)?;
            if let AuthMode::Assertion(a) = &cfg.chekt.auth {
                let store = a.key_store();
                let k = store.current()?;
                println!(
                    "device key: {} kid {} ({:?})",
                    store.current_path().display(),
                    k.kid(),
                    k.alg()
                );
                if let Some(n) = store.next()? {
                    println!(
                        "staged next key: kid {} (promoted once CHeKT accepts it)",
                        n.kid()
                    );
                }
            } else {
                println!("auth: static API key (bring-up tier)");
            }
            println!("{}", cfg.summary(&site));
            Ok(EX_OK)
        }
        Command::Provision(args) => {
            crate::provision::run(&cli.config, &args)?;
            Ok(EX_OK)
        }
        Command::Key(k) => key_command(&cli.config, k),
        Command::Spool(s) => {
            let (cfg, _) = Config::load(&cli.config)?;
            let (spool, reset) = Spool::open(&cfg.spool)?;
            if let Some(r) = reset {
                eprintln!(
                    "note: the store was unreadable ({}); set aside at {}",
                    r.error,
                    r.moved_to.display()
                );
            }
            match s {
                SpoolCommand::DeadLetters => {
                    for dl in spool.dead_letters()? {
                        let line = match dl {
                            Ok(d) => serde_json::json!({
                                "at_ms": d.at_ms,
                                "stage": d.stage,
                                "reason": d.reason,
                                "topic": d.topic,
                                "payload": String::from_utf8_lossy(&d.payload),
                                "event_id": d.event.as_ref().map(|e| e.id.clone()),
                            }),
                            Err(e) => serde_json::json!({ "undecodable": e }),
                        };
                        println!("{line}");
                    }
                }
                SpoolCommand::Status => {
                    let s = spool.stats();
                    println!(
                        "{}",
                        serde_json::json!({
                            "backlog": s.backlog(),
                            "queued": { "alarm": s.queued[0], "trouble": s.queued[1], "arming": s.queued[2], "other": s.queued[3] },
                            "live_bytes": s.live_bytes,
                            "disk_bytes": spool.disk_bytes(),
                            "dropped": { "alarm": s.dropped[0], "trouble": s.dropped[1], "arming": s.dropped[2], "other": s.dropped[3] },
                            "dead_letters": s.dead_letters,
                        })
                    );
                }
            }
            Ok(EX_OK)
        }
        #[cfg(feature = "simulator")]
        Command::Demo(args) => {
            init_logging("warn,rumqttd=off");
            let rt = runtime()?;
            rt.block_on(crate::demo::run(args))?;
            Ok(EX_OK)
        }
        #[cfg(feature = "simulator")]
        Command::Simulator(args) => {
            init_logging("info");
            let rt = runtime()?;
            rt.block_on(async {
                let stop = async {
                    let _ = tokio::signal::ctrl_c().await;
                };
                crate::simulator::run_standalone(args, stop).await
            })?;
            Ok(EX_OK)
        }
    }
}

fn key_command(config: &std::path::Path, k: KeyCommand) -> anyhow::Result<u8> {
    match k {
        KeyCommand::Generate { rsa, key_dir } => {
            let store = key_store(config, key_dir)?;
            let key = new_key(rsa)?;
            let path = store.dir().join(crate::keys::CURRENT_FILE);
            key.write_new(&path)?;
            eprintln!(
                "wrote {} (mode 0600); register this public key with CHeKT:",
                path.display()
            );
            print_jwk("device key", &key);
            Ok(EX_OK)
        }
        KeyCommand::Show { key_dir } => {
            let store = key_store(config, key_dir)?;
            print_jwk("current key", &store.current()?);
            if let Some(n) = store.next()? {
                print_jwk("staged next key", &n);
            }
            Ok(EX_OK)
        }
        KeyCommand::Rotate {
            rsa,
            replace,
            key_dir,
        } => {
            let store = key_store(config, key_dir)?;
            let current = store.current()?;
            if !replace && store.next()?.is_some() {
                return Err(KeyError::Exists {
                    path: store.next_path().display().to_string(),
                }
                .into());
            }
            let key = new_key(rsa)?;
            store.stage_next(&key, replace)?;
            eprintln!(
                "staged {}. Register this key with CHeKT next to the current one (kid {}); the agent switches to it at its next token request and promotes it once CHeKT accepts it. Then retire kid {} at CHeKT.",
                store.next_path().display(),
                current.kid(),
                current.kid()
            );
            print_jwk("next key", &key);
            Ok(EX_OK)
        }
    }
}

/// SIGTERM / SIGINT resolve the returned future; SIGHUP sends on `reload`.
fn signals(
    reload: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = reload.try_send(());
        }
    });
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
