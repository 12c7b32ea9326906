//! Configuration: flags, then environment variables, then a `.env` file in the working directory.
//!
//! Every flag has an `env` twin (the README's Configuration section) and its doc comment is its
//! `--help` text. Values are checked while parsing, so a bad one stops the start with one line
//! naming the variable; the checks that need several values run once, when the flags become
//! [`Settings`], the plain struct the server takes.
//!
//! - `groups.rs`: the flags, a struct per group (Redis, gRPC/TLS, decisions, ShouldAllow, Envoy,
//!   HTTP/debug, shutdown, logging), flattened into [`ServeArgs`];
//! - `values.rs`: what a flag's value may be (Redis URLs never shown with their password, listen
//!   addresses, numbers in range) and the one reading of every bool flag;
//! - `settings.rs`: [`Settings`], validated.

mod groups;
mod settings;
mod values;

use std::path::PathBuf;

use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

pub use groups::{
    DecisionArgs, EnvoyArgs, GrpcArgs, HttpArgs, LogArgs, ShouldAllowArgs, ShutdownArgs,
    StorageArgs,
};
pub use settings::{GrpcSettings, HttpSettings, RedisSettings, Settings, Storage, TlsSettings};
pub use values::{RedisType, RedisUrl};

#[derive(Debug, Parser)]
#[command(
    name = "sluicegate",
    version,
    about = "A rate-limit decision service (token buckets over gRPC)."
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `sluicegate` with no subcommand serves, with these flags.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the decision service (the default).
    Serve(Box<ServeArgs>),
    /// Validate a rules file or directory offline and print each rule with its bucket shape.
    CheckRules {
        /// A rules file, or a directory of *.yaml files.
        path: PathBuf,
        /// A sample RLQS bucket id to match, as `DOMAIN:key=value,key=value` (pairs in any
        /// order, as Envoy's quota filter builds them); repeatable.
        #[arg(long = "bucket", value_name = "DOMAIN:K=V,...")]
        buckets: Vec<String>,
    },
}

impl Cli {
    /// Parses the command line after loading `.env` (which never overrides the real environment).
    /// A bad value prints one line naming the flag and its variable, and exits with status 2.
    pub fn load() -> Self {
        if let Err(e) = load_dotenv() {
            eprintln!("sluicegate: {e}");
            std::process::exit(2);
        }
        match Self::parse_args(std::env::args_os()) {
            Ok(cli) => cli,
            Err(e) => {
                use clap::error::ErrorKind;
                if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                    e.exit();
                }
                eprintln!("sluicegate: {}", one_line(&e.render().to_string()));
                std::process::exit(2);
            }
        }
    }

    /// The command line: clap's derive, with every bool flag read the same way (`values::switch`).
    pub fn definition() -> clap::Command {
        Self::command()
            .mut_args(values::switch)
            .mut_subcommand("serve", |serve| serve.mut_args(values::switch))
    }

    /// Parses `argv` (program name first) by [`Cli::definition`].
    pub fn parse_args<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut matches = Self::definition().try_get_matches_from(argv)?;
        Self::from_arg_matches_mut(&mut matches)
    }

    /// The serve arguments, whichever way they were given (None for another subcommand).
    pub fn into_serve(self) -> Option<ServeArgs> {
        match self.command {
            Some(Command::Serve(args)) => Some(*args),
            None => Some(self.serve),
            Some(Command::CheckRules { .. }) => None,
        }
    }
}

/// Loads `.env` from the working directory; it never overrides the real environment. A line that
/// does not parse stops the start (a setting silently dropped is worse); the message gives its
/// number, never its text, which may hold a password.
pub fn load_dotenv() -> Result<(), String> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        Err(dotenvy::Error::LineParse(line, _)) => {
            let first = line.lines().next().unwrap_or("").trim();
            let number = std::fs::read_to_string(".env")
                .ok()
                .and_then(|text| text.lines().position(|l| l.trim() == first))
                .map_or_else(|| "?".to_string(), |i| (i + 1).to_string());
            Err(format!(
                ".env line {number} does not parse: expected NAME=value (the line is not shown: \
                 it may hold a secret)"
            ))
        }
        Err(e) => Err(format!(".env cannot be read: {e}")),
    }
}

/// clap's error as one line: its first line, plus the valid values and its "did you mean" tip.
fn one_line(rendered: &str) -> String {
    let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("invalid arguments");
    let mut line = first.trim_start_matches("error: ").to_string();
    let extras: Vec<String> = lines
        .filter_map(|l| {
            if let Some(values) = l
                .strip_prefix("[possible values: ")
                .and_then(|v| v.strip_suffix(']'))
            {
                Some(format!("expected one of: {values}"))
            } else {
                l.strip_prefix("tip: ").map(str::to_string)
            }
        })
        .collect();
    if !extras.is_empty() {
        line.push_str(&format!(" ({})", extras.join("; ")));
    }
    line
}

/// Everything `sluicegate serve` reads, by group. Value names are the environment variables.
#[derive(Clone, Debug, Args, serde::Serialize)]
pub struct ServeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub grpc: GrpcArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub decisions: DecisionArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub should_allow: ShouldAllowArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub envoy: EnvoyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub shutdown: ShutdownArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub log: LogArgs,
}

impl ServeArgs {
    /// The effective settings, keyed by environment variable, with REDIS_URL's password
    /// redacted: what /debug/config shows and the start logs.
    pub fn effective(&self) -> serde_json::Map<String, serde_json::Value> {
        let serde_json::Value::Object(mut by_field) =
            serde_json::to_value(self).expect("every setting serializes")
        else {
            unreachable!("a struct serializes to an object");
        };
        let command = <Self as Args>::augment_args(clap::Command::new("sluicegate"));
        command
            .get_arguments()
            .filter_map(|arg| {
                let env = arg.get_env()?.to_str()?.to_string();
                let value = by_field.remove(arg.get_id().as_str())?;
                Some((env, value))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::values::{listen_addr, positive_f64};
    use super::*;
    use sluicegate_core::FailureMode;

    /// The serve arguments of a command line (without the program name).
    fn args(flags: &[&str]) -> ServeArgs {
        let argv = std::iter::once(&"sluicegate").chain(flags);
        Cli::parse_args(argv).unwrap().into_serve().unwrap()
    }

    #[test]
    fn listen_addresses_as_go_programs_take_them() {
        let ok = |s| listen_addr(s).unwrap().to_string();
        assert_eq!(ok(":8081"), "0.0.0.0:8081");
        assert_eq!(ok("localhost:8080"), "127.0.0.1:8080");
        assert_eq!(ok(" 127.0.0.1:0 "), "127.0.0.1:0");
        assert_eq!(ok("[::1]:9"), "[::1]:9");
        for bad in ["8081", "host:8081", ":", ":70000", "localhost:x"] {
            let e = listen_addr(bad).unwrap_err();
            assert!(e.contains("IP:PORT") && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn redacts_passwords() {
        let url: RedisUrl = "redis://user:s3cret@localhost:6379/0".parse().unwrap();
        assert!(!format!("{url:?}").contains("s3cret"));
        assert!(!url.to_string().contains("s3cret"));
        assert!(url.to_string().contains("***"));
        assert_eq!(url.expose(), "redis://user:s3cret@localhost:6379/0");
    }

    #[test]
    fn effective_settings_name_every_variable_and_hide_the_password() {
        let a = args(&["--redis-url", "redis://user:s3cret@localhost:6379/0"]);
        let e = a.effective();
        let text = serde_json::to_string(&e).unwrap();
        assert!(!text.contains("s3cret"), "{text}");
        assert_eq!(e["REDIS_URL"], "redis://user:***@localhost:6379/0");
        assert_eq!(e["FAILURE_MODE"], "error");
        assert_eq!(e["REDIS_TYPE"], "single");
        assert_eq!(e["LOG_FORMAT"], "text");
        assert_eq!(e["REDIS_TIMEOUT_MS"], 15);
        assert_eq!(e["NEAR_LIMIT_RATIO"], 0.8);
        // Every variable of --help is there, under its own name.
        let command = <ServeArgs as Args>::augment_args(clap::Command::new("t"));
        let envs: Vec<String> = command
            .get_arguments()
            .filter_map(|a| Some(a.get_env()?.to_str()?.to_string()))
            .collect();
        assert_eq!(e.len(), envs.len());
        assert!(envs.iter().all(|v| e.contains_key(v)), "{envs:?}");
    }

    #[test]
    fn never_shows_a_password_that_does_not_parse() {
        for raw in [
            "redis://user:s3cret@host:port/0",
            "redis://:s3cret@[::1",
            "rediss://u:s3cret@h:99999",
        ] {
            let url: RedisUrl = raw.parse().unwrap();
            assert!(!url.redacted().contains("s3cret"), "{raw}");
            let err = url.check(RedisType::Single).unwrap_err();
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn urls_are_checked_against_the_topology() {
        let ok = |s: &str, t| s.parse::<RedisUrl>().unwrap().check(t);
        assert!(ok("redis://127.0.0.1:6379/0", RedisType::Single).is_ok());
        assert!(ok("localhost:6379", RedisType::Single).is_err());
        assert!(
            ok("10.0.0.1:6379", RedisType::Cluster).is_ok(),
            "one seed is enough"
        );
        assert!(ok("10.0.0.1:6379,redis://10.0.0.2:6379", RedisType::Cluster).is_ok());
        assert!(ok("10.0.0.1", RedisType::Cluster).is_err());
        assert!(ok("mymaster,10.0.0.1:26379", RedisType::Sentinel).is_ok());
        assert!(ok("10.0.0.1:26379", RedisType::Sentinel).is_err());
        assert!(ok("redis://:pw@mymaster,10.0.0.1:26379", RedisType::Sentinel).is_ok());
        assert!(ok("redis://h:1/db", RedisType::Single).is_err());
    }

    #[test]
    fn prefixes_must_be_set_and_apart() {
        let with = |prefix: &str| args(&["--bucket-prefix", prefix]).settings();
        assert!(args(&[]).settings().is_ok());
        assert!(with("").unwrap_err().contains("BUCKET_PREFIX"));
        let err = with("tb:").unwrap_err();
        assert!(err.contains("overlap"), "{err}");
        assert!(with("tb:rls:x").is_err());
        assert!(with("tb:user:").is_ok());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(positive_f64("0").is_err());
        assert!(positive_f64("nan").is_err());
        assert!(positive_f64("inf").is_err());
        assert_eq!(positive_f64("2.5"), Ok(2.5));
    }

    #[test]
    fn defaults_match_the_spec() {
        let a = args(&[]);
        assert_eq!(a.should_allow.capacity, 20.0);
        assert_eq!(a.should_allow.rate, 20.0);
        assert_eq!(a.storage.redis_timeout_ms, 15);
        assert_eq!(a.should_allow.bucket_prefix, "tb:user:");
        assert_eq!(a.envoy.rls_key_prefix, "tb:rls:");
        assert_eq!(a.decisions.failure_mode, FailureMode::Error);
        assert_eq!(a.grpc.grpc_addr.to_string(), "0.0.0.0:8081");
        assert_eq!(a.http.http_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(a.storage.memory_max_buckets, 1_000_000);
        assert_eq!(a.shutdown.shutdown_grace_secs, 10);
        assert!(!a.decisions.shadow_mode);
        assert!(a.storage.local_deny_cache);
        assert!(a.decisions.allow_client_shapes);
        assert!(!a.decisions.allow_refunds);
    }

    #[test]
    fn serve_subcommand_takes_the_same_flags() {
        let a = Cli::parse_args(["sluicegate", "serve", "--capacity", "5", "--shadow-mode"])
            .unwrap()
            .into_serve()
            .unwrap();
        assert_eq!(a.should_allow.capacity, 5.0);
        assert!(a.decisions.shadow_mode);
    }

    #[test]
    fn every_bool_flag_reads_the_same_way() {
        // Alone, with a value, and each spelling; the defaults of true flags can be turned off.
        assert!(args(&["--shadow-mode"]).decisions.shadow_mode);
        assert!(args(&["--shadow-mode=yes"]).decisions.shadow_mode);
        assert!(args(&["--shadow-mode", "on"]).decisions.shadow_mode);
        assert!(!args(&["--shadow-mode=0"]).decisions.shadow_mode);
        assert!(!args(&["--local-deny-cache=false"]).storage.local_deny_cache);
        assert!(
            !args(&["--allow-client-shapes", "off"])
                .decisions
                .allow_client_shapes
        );
        assert!(
            args(&[
                "--grpc-tls=1",
                "--grpc-tls-cert",
                "c",
                "--grpc-tls-key",
                "k"
            ])
            .grpc
            .grpc_tls
        );
        let err = Cli::parse_args(["sluicegate", "--debug-endpoints=maybe"]).unwrap_err();
        assert!(err.to_string().contains("expected true or false"), "{err}");
        // Every bool flag of --help is a switch: none is left with clap's plain SetTrue.
        let serve = Cli::definition();
        for arg in serve.get_arguments() {
            assert!(
                !matches!(arg.get_action(), clap::ArgAction::SetTrue),
                "{} is not a switch",
                arg.get_id()
            );
        }
    }

    #[test]
    fn settings_are_validated_once_and_name_the_variables() {
        let s = Settings::from_flags(["--grpc-addr", "127.0.0.1:0", "--capacity", "7"]).unwrap();
        assert_eq!(s.should_allow.shape.capacity(), 7.0);
        assert_eq!(s.grpc.addr.to_string(), "127.0.0.1:0");
        assert!(matches!(
            s.storage,
            Storage::Memory {
                max_buckets: 1_000_000
            }
        ));
        let err = Settings::from_flags(["--grpc-tls"]).unwrap_err();
        assert!(err.contains("GRPC_SERVER_TLS_CERT"), "{err}");
        let err = Settings::from_flags(["--capacity", "5e9"]).unwrap_err();
        assert!(err.contains("MAX_CAPACITY"), "{err}");
        let err = Settings::from_flags(["--redis-url", "localhost:6379"]).unwrap_err();
        assert!(err.starts_with("REDIS_URL"), "{err}");
        let err = Settings::from_flags(["--capacity", "-1"]).unwrap_err();
        assert!(
            err.contains("capacity") || err.contains("TB_CAPACITY"),
            "{err}"
        );
    }
}
